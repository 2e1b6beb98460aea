"""The task store: sessions, tasks (one row per turn), task events and messages.

Everything lives in the shared database (a SQLite file in WAL mode, or a
PostgreSQL database several daemons share), beside the guard's tables and
used by other taskwarden processes (the inbox, the CLI). The schema migrates
by ``PRAGMA user_version`` on SQLite and as component ``taskwarden`` on
PostgreSQL. Every write commits before its result is returned, then wakes
waiters here and in other processes.

Statuses in SQL come from ``TaskStatus`` (bound parameters, or DDL text built
from the enum): no status literal is written out in a query.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from guard.storage.changes import ChangeFeed
from guard.storage.clock import Clock, SystemClock
from guard.storage.database import Database, Migrations, Tx
from worker_server.task import SETTLED, TERMINAL, TaskStatus

_SQLITE_SCHEMA: list[str] = [
    # 1: sessions, tasks, events, messages
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('agent', 'human')),
        worker TEXT NOT NULL,
        title TEXT NOT NULL,
        cwd TEXT,
        worker_session TEXT,
        labels TEXT NOT NULL DEFAULT '[]',
        created_by TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE tasks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        session_id TEXT NOT NULL REFERENCES sessions(id),
        turn INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('agent', 'human')),
        worker TEXT NOT NULL,
        title TEXT NOT NULL,
        prompt TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN
            ('queued', 'working', 'input_required', 'completed', 'failed', 'cancelled')),
        status_message TEXT,
        pending TEXT,
        final TEXT,
        exit_code INTEGER,
        labels TEXT NOT NULL DEFAULT '[]',
        cwd TEXT,
        timeout_s REAL,
        deadline REAL,
        idempotency_key TEXT,
        created_by TEXT,
        owner_pid INTEGER,
        owner_started REAL,
        pid INTEGER,
        cancel_reason TEXT,
        last_activity TEXT,
        tail TEXT,
        log_path TEXT,
        claimed_by TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL,
        UNIQUE (session_id, turn)
    );
    CREATE UNIQUE INDEX tasks_idempotency ON tasks(created_by, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX tasks_status ON tasks(status, worker, seq);
    CREATE INDEX tasks_session ON tasks(session_id, turn);
    CREATE TABLE task_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL,
        at REAL NOT NULL,
        type TEXT NOT NULL,
        data TEXT
    );
    CREATE INDEX task_events_task ON task_events(task_id, id);
    CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        task_id TEXT NOT NULL REFERENCES tasks(id),
        author TEXT NOT NULL CHECK (author IN ('agent', 'human', 'system')),
        author_name TEXT,
        kind TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at REAL NOT NULL,
        read_at REAL
    );
    CREATE INDEX messages_task ON messages(task_id, seq);
    """,
    # 2: per-session worker options and worktree; per-turn usage and changes
    """
    ALTER TABLE sessions ADD COLUMN options TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE sessions ADD COLUMN worktree TEXT;
    ALTER TABLE sessions ADD COLUMN branch TEXT;
    ALTER TABLE tasks ADD COLUMN usage TEXT;
    ALTER TABLE tasks ADD COLUMN changes TEXT;
    """,
    # 3: spend budgets: the budget keys a turn charges (guard.budgets targets,
    # JSON), and the session's per-turn caps (max_tokens, max_cost_usd)
    """
    ALTER TABLE tasks ADD COLUMN budgets TEXT;
    ALTER TABLE sessions ADD COLUMN caps TEXT NOT NULL DEFAULT '{}';
    """,
    # 4: a session belongs to the identity that created it
    """
    ALTER TABLE sessions ADD COLUMN owner TEXT;
    UPDATE sessions SET owner = created_by;
    CREATE INDEX sessions_owner ON sessions(owner);
    """,
]

def _check_in(values: Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


#: Turns not yet ended (a later turn of the same session waits for them).
UNFINISHED = (TaskStatus.QUEUED, TaskStatus.WORKING, TaskStatus.INPUT_REQUIRED)

_PG_SCHEMA: list[str] = [
    # 1: the whole schema of SQLite steps 1-4
    f"""
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('agent', 'human')),
        worker TEXT NOT NULL,
        title TEXT NOT NULL,
        cwd TEXT,
        worker_session TEXT,
        labels TEXT NOT NULL DEFAULT '[]',
        created_by TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        options TEXT NOT NULL DEFAULT '{{}}',
        worktree TEXT,
        branch TEXT,
        caps TEXT NOT NULL DEFAULT '{{}}',
        owner TEXT
    );
    CREATE INDEX sessions_owner ON sessions(owner);
    CREATE TABLE tasks (
        seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        session_id TEXT NOT NULL REFERENCES sessions(id),
        turn BIGINT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('agent', 'human')),
        worker TEXT NOT NULL,
        title TEXT NOT NULL,
        prompt TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ({_check_in(TaskStatus)})),
        status_message TEXT,
        pending TEXT,
        final TEXT,
        exit_code BIGINT,
        labels TEXT NOT NULL DEFAULT '[]',
        cwd TEXT,
        timeout_s DOUBLE PRECISION,
        deadline DOUBLE PRECISION,
        idempotency_key TEXT,
        created_by TEXT,
        owner_pid BIGINT,
        owner_started DOUBLE PRECISION,
        pid BIGINT,
        cancel_reason TEXT,
        last_activity TEXT,
        tail TEXT,
        log_path TEXT,
        claimed_by TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        ended_at DOUBLE PRECISION,
        usage TEXT,
        changes TEXT,
        budgets TEXT,
        UNIQUE (session_id, turn)
    );
    CREATE UNIQUE INDEX tasks_idempotency ON tasks(created_by, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX tasks_status ON tasks(status, worker, seq);
    CREATE INDEX tasks_session ON tasks(session_id, turn);
    CREATE TABLE task_events (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        task_id TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        type TEXT NOT NULL,
        data TEXT
    );
    CREATE INDEX task_events_task ON task_events(task_id, id);
    CREATE TABLE messages (
        seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        task_id TEXT NOT NULL REFERENCES tasks(id),
        author TEXT NOT NULL CHECK (author IN ('agent', 'human', 'system')),
        author_name TEXT,
        kind TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        read_at DOUBLE PRECISION
    );
    CREATE INDEX messages_task ON messages(task_id, seq);
    """,
]
SCHEMA = Migrations(sqlite=_SQLITE_SCHEMA, postgresql=_PG_SCHEMA)


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


def _values(statuses: Iterable[TaskStatus]) -> list[str]:
    return [s.value for s in statuses]


@dataclass(frozen=True)
class TaskEvent:
    """A row written to ``task_events`` in the current transaction."""

    task_id: str
    type: str  # created | status | ...
    data: dict[str, Any]


#: Told of a transaction's task events inside that transaction (notifications
#: are queued there, so they commit or roll back with the change).
TaskEventHook = Callable[[Tx, list[TaskEvent]], None]

# The events of the transaction running on this thread (a transaction runs whole on one
# thread on both backends).
_collected = threading.local()


def new_id(prefix: str) -> str:
    """A short random id, e.g. ``tsk_k3v9q0m2x7ab``."""
    return prefix + "_" + base64.b32encode(os.urandom(10)).decode().lower()[:12]


@dataclass(frozen=True)
class TaskRow:
    seq: int
    id: str
    session_id: str
    turn: int
    kind: str
    worker: str
    title: str
    prompt: str
    status: TaskStatus
    status_message: str | None
    pending: dict[str, Any] | None
    final: str | None
    exit_code: int | None
    labels: list[str]
    cwd: str | None
    timeout_s: float | None
    deadline: float | None
    idempotency_key: str | None
    created_by: str | None
    owner_pid: int | None
    owner_started: float | None
    pid: int | None
    cancel_reason: str | None
    last_activity: str | None
    tail: str | None
    log_path: str | None
    claimed_by: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    ended_at: float | None
    usage: dict[str, Any] | None = None
    changes: dict[str, Any] | None = None
    budgets: list[dict[str, Any]] | None = None
    # From the session row: the worker's own session id, the options every
    # turn runs with (model, effort, sandbox), and its git worktree if any.
    worker_session: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    worktree: str | None = None
    branch: str | None = None
    caps: dict[str, float] = field(default_factory=dict)
    session_owner: str | None = None  # the identity the session belongs to

    @classmethod
    def from_row(cls, row: Any) -> TaskRow:
        data = dict(row)
        data["status"] = TaskStatus(data["status"])
        data["pending"] = json.loads(data["pending"]) if data["pending"] else None
        data["labels"] = json.loads(data["labels"])
        for key in ("usage", "changes", "budgets"):
            data[key] = json.loads(data[key]) if data.get(key) else None
        data["options"] = json.loads(data.get("options") or "{}")
        data["caps"] = json.loads(data.get("caps") or "{}")
        return cls(**data)

    @property
    def run_dir(self) -> str | None:
        """Where the worker runs: the session's worktree, else its cwd."""
        return self.worktree or self.cwd

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def settled(self) -> bool:
        return self.status in SETTLED


@dataclass(frozen=True)
class PrunedSession:
    """A session ``Store.prune`` deleted, with the files it leaves behind."""

    id: str
    cwd: str | None
    worktree: str | None
    branch: str | None
    task_ids: tuple[str, ...]
    log_paths: tuple[str, ...]


@dataclass(frozen=True)
class MessageRow:
    seq: int
    id: str
    task_id: str
    author: str
    author_name: str | None
    kind: str
    body: str
    created_at: float
    read_at: float | None


_TASK_SELECT = (
    "SELECT t.*, s.worker_session AS worker_session, s.options AS options, s.worktree AS worktree,"
    " s.branch AS branch, s.caps AS caps, s.owner AS session_owner FROM tasks t JOIN sessions s ON s.id = t.session_id"
)


class TaskNotFound(Exception):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task_id: no task {task_id!r}")
        self.task_id = task_id


class Store:
    """Typed access to the task tables; every method is one transaction."""

    def __init__(
        self, db: Database, feed: ChangeFeed, clock: Clock | None = None, on_events: TaskEventHook | None = None
    ) -> None:
        self.db = db
        self.feed = feed
        self.clock = clock or SystemClock()
        self._on_events = on_events

    @classmethod
    async def open(
        cls, db: Database, feed: ChangeFeed, clock: Clock | None = None, on_events: TaskEventHook | None = None
    ) -> Store:
        await db.migrate_user_version(SCHEMA)
        return cls(db, feed, clock, on_events)

    def _with_events(self, fn: Any) -> Any:
        """``fn`` as a transaction whose task events are handed to the hook before it commits."""

        def tx(c: Tx) -> Any:
            _collected.events = []
            try:
                result = fn(c)
                if self._on_events is not None and _collected.events:
                    self._on_events(c, list(_collected.events))
            finally:
                _collected.events = None
            return result

        return tx

    async def _write(self, fn: Any) -> Any:
        result = await self.db.write(self._with_events(fn))
        self.feed.notify()
        return result

    # -- reading -----------------------------------------------------------

    async def get(self, task_id: str) -> TaskRow:
        rows = await self.get_many([task_id])
        if not rows:
            raise TaskNotFound(task_id)
        return rows[0]

    async def get_many(self, task_ids: Sequence[str]) -> list[TaskRow]:
        """The tasks that exist, in the order asked for."""

        def read(c: Tx) -> list[TaskRow]:
            marks = ",".join("?" * len(task_ids))
            rows = c.execute(f"{_TASK_SELECT} WHERE t.id IN ({marks})", list(task_ids)).fetchall()
            by_id = {r["id"]: TaskRow.from_row(r) for r in rows}
            return [by_id[i] for i in task_ids if i in by_id]

        return await self.db.read(read) if task_ids else []

    async def session_turns(self, session_id: str) -> list[TaskRow]:
        def read(c: Tx) -> list[TaskRow]:
            rows = c.execute(f"{_TASK_SELECT} WHERE t.session_id = ? ORDER BY t.turn", (session_id,))
            return [TaskRow.from_row(r) for r in rows]

        return await self.db.read(read)

    async def list(
        self,
        *,
        status: str | None = None,
        worker: str | None = None,
        label: str | None = None,
        limit: int = 50,
        before_seq: int | None = None,
        owner: str | None = None,
    ) -> tuple[list[TaskRow], bool]:
        """Newest first; returns the page and whether more rows follow. ``owner``: only
        sessions of this identity."""

        def read(c: Tx) -> tuple[list[TaskRow], bool]:
            where, args = [], []
            if owner is not None:
                where.append("s.owner = ?")
                args.append(owner)
            if status:
                where.append("t.status = ?")
                args.append(status)
            if worker:
                where.append("t.worker = ?")
                args.append(worker)
            if label:
                if c.dialect == "postgresql":
                    where.append("EXISTS (SELECT 1 FROM jsonb_array_elements_text(t.labels::jsonb) AS l(value)"
                                 " WHERE l.value = ?)")
                else:
                    where.append("EXISTS (SELECT 1 FROM json_each(t.labels) WHERE json_each.value = ?)")
                args.append(label)
            if before_seq is not None:
                where.append("t.seq < ?")
                args.append(before_seq)
            clause = f" WHERE {' AND '.join(where)}" if where else ""
            rows = c.execute(f"{_TASK_SELECT}{clause} ORDER BY t.seq DESC LIMIT ?", [*args, limit + 1]).fetchall()
            return [TaskRow.from_row(r) for r in rows[:limit]], len(rows) > limit

        return await self.db.read(read)

    # -- creating ----------------------------------------------------------

    async def create_session(
        self,
        *,
        kind: str,
        worker: str,
        title: str,
        prompt: str,
        cwd: str | None,
        labels: list[str],
        created_by: str,
        idempotency_key: str | None,
        timeout_s: float | None,
        deadline: float | None,
        owner: tuple[int, float] | None,
        session_id: str | None = None,
        options: dict[str, str] | None = None,
        worktree: str | None = None,
        branch: str | None = None,
        budgets: list[dict[str, Any]] | None = None,
        caps: dict[str, float] | None = None,
    ) -> tuple[TaskRow, bool]:
        """Open a session with its first task. Returns (task, created); an
        idempotency key already used by this caller returns the earlier task."""
        now = self.clock.now()
        session_id, task_id = session_id or new_id("ses"), new_id("tsk")

        def write(c: Tx) -> tuple[TaskRow, bool]:
            if idempotency_key is not None:
                row = c.execute(
                    f"{_TASK_SELECT} WHERE t.created_by = ? AND t.idempotency_key = ?",
                    (created_by, idempotency_key),
                ).fetchone()
                if row:
                    return TaskRow.from_row(row), False
            c.execute(
                "INSERT INTO sessions (id, kind, worker, title, cwd, labels, created_by, owner, created_at, options,"
                " worktree, branch, caps) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (session_id, kind, worker, title, cwd, json.dumps(labels), created_by, created_by, now,
                 json.dumps(options or {}), worktree, branch, json.dumps(caps or {})),
            )
            _insert_task(
                c,
                task_id=task_id,
                session_id=session_id,
                turn=1,
                kind=kind,
                worker=worker,
                title=title,
                prompt=prompt,
                labels=labels,
                cwd=cwd,
                timeout_s=timeout_s,
                deadline=deadline,
                idempotency_key=idempotency_key,
                created_by=created_by,
                owner=owner,
                now=now,
                budgets=budgets,
            )
            _event(c, task_id, now, "created", {"status": TaskStatus.QUEUED.value})
            return _task(c, task_id), True

        return await self._write(write)

    async def add_turn(
        self, session_id: str, *, prompt: str, created_by: str, owner: tuple[int, float] | None,
        budgets: list[dict[str, Any]] | None = None,
    ) -> TaskRow:
        """The next task (turn) on an agent session, queued behind any running turn."""
        now = self.clock.now()
        task_id = new_id("tsk")

        def write(c: Tx) -> TaskRow:
            last = c.execute(
                "SELECT * FROM tasks WHERE session_id = ? ORDER BY turn DESC LIMIT 1", (session_id,)
            ).fetchone()
            _insert_task(
                c,
                task_id=task_id,
                session_id=session_id,
                turn=last["turn"] + 1,
                kind=last["kind"],
                worker=last["worker"],
                title=last["title"],
                prompt=prompt,
                labels=json.loads(last["labels"]),
                cwd=last["cwd"],
                timeout_s=last["timeout_s"],
                deadline=None,
                idempotency_key=None,
                created_by=created_by,
                owner=owner,
                now=now,
                budgets=budgets,
            )
            _event(c, task_id, now, "created", {"status": TaskStatus.QUEUED.value, "turn": last["turn"] + 1})
            return _task(c, task_id)

        return await self._write(write)

    # -- agent turns -------------------------------------------------------

    async def claim_next(self, worker: str, max_concurrent: int, owner: tuple[int, float]) -> TaskRow | None:
        """Move the oldest runnable queued task of ``worker`` to working, if a slot is free.

        Runnable: owned by this server (or by none), and no earlier turn of its
        session is still unfinished — turns of a session run one at a time.
        The slot count spans every server sharing the database.
        """
        now = self.clock.now()

        def write(c: Tx) -> TaskRow | None:
            # The count and the claim are one write transaction, serialised
            # against every writer of the database (on PostgreSQL across
            # daemons too): max_concurrent holds however many daemons claim.
            busy = c.execute(
                "SELECT count(*) FROM tasks WHERE status = ? AND worker = ? AND kind = 'agent'",
                (TaskStatus.WORKING.value, worker),
            ).fetchone()[0]
            if busy >= max_concurrent:
                return None
            # PostgreSQL: a row another claimer holds is skipped, never waited for.
            lock = " FOR UPDATE OF t SKIP LOCKED" if c.dialect == "postgresql" else ""
            row = c.execute(
                f"""
                SELECT t.id, t.timeout_s FROM tasks t
                WHERE t.status = ? AND t.kind = 'agent' AND t.worker = ?
                  AND (t.owner_pid IS NULL OR (t.owner_pid = ? AND t.owner_started = ?))
                  AND NOT EXISTS (
                      SELECT 1 FROM tasks e WHERE e.session_id = t.session_id AND e.turn < t.turn
                      AND e.status IN ({_marks(UNFINISHED)}))
                ORDER BY t.seq LIMIT 1{lock}
                """,
                (TaskStatus.QUEUED.value, worker, owner[0], owner[1], *_values(UNFINISHED)),
            ).fetchone()
            if row is None:
                return None
            deadline = now + row["timeout_s"] if row["timeout_s"] else None
            cur = c.execute(
                "UPDATE tasks SET status = ?, started_at = ?, updated_at = ?, deadline = ?,"
                " owner_pid = ?, owner_started = ? WHERE id = ? AND status = ?",
                (TaskStatus.WORKING.value, now, now, deadline, owner[0], owner[1], row["id"], TaskStatus.QUEUED.value),
            )
            if cur.rowcount != 1:
                return None
            _event(c, row["id"], now, "status", {"status": TaskStatus.WORKING.value})
            return _task(c, row["id"])

        # Wake waiters only for a real claim: a claim that finds no slot
        # changes nothing, and waking the scheduler for it would loop.
        claimed = await self.db.write(write)
        if claimed is not None:
            self.feed.notify()
        return claimed

    async def set_process(self, task_id: str, pid: int, log_path: str) -> None:
        def write(c: Tx) -> None:
            c.execute("UPDATE tasks SET pid = ?, log_path = ? WHERE id = ?", (pid, log_path, task_id))

        await self.db.write(write)

    async def set_worker_session(self, session_id: str, worker_session: str) -> None:
        def write(c: Tx) -> None:
            c.execute("UPDATE sessions SET worker_session = ? WHERE id = ?", (worker_session, session_id))

        await self.db.write(write)

    async def set_usage(self, task_id: str, usage: dict[str, Any]) -> None:
        """A running turn's usage so far (what the worker reported until now)."""

        def write(c: Tx) -> None:
            # Only while it runs: a late write must not replace the final usage.
            c.execute(
                "UPDATE tasks SET usage = ? WHERE id = ? AND status = ?",
                (json.dumps(usage), task_id, TaskStatus.WORKING.value),
            )

        await self.db.write(write)

    async def set_activity(self, task_id: str, line: str, tail: str) -> None:
        """Record the latest activity (throttled by the caller); no wake-up needed."""

        def write(c: Tx) -> None:
            c.execute("UPDATE tasks SET last_activity = ?, tail = ? WHERE id = ?", (line, tail, task_id))

        await self.db.write(write)

    async def finish(
        self,
        task_id: str,
        status: TaskStatus,
        *,
        message: str | None = None,
        final: str | None = None,
        exit_code: int | None = None,
        tail: str | None = None,
        usage: dict[str, Any] | None = None,
        changes: dict[str, Any] | None = None,
        only_from: Iterable[TaskStatus] = (TaskStatus.WORKING, TaskStatus.QUEUED, TaskStatus.INPUT_REQUIRED),
    ) -> bool:
        """Move a task to a terminal status; False if it was no longer in ``only_from``."""
        now = self.clock.now()
        allowed = [s.value for s in only_from]
        usage_json = json.dumps(usage) if usage is not None else None
        changes_json = json.dumps(changes) if changes is not None else None

        def write(c: Tx) -> bool:
            marks = ",".join("?" * len(allowed))
            cur = c.execute(
                f"UPDATE tasks SET status = ?, status_message = ?, final = COALESCE(?, final),"
                f" exit_code = COALESCE(?, exit_code), tail = COALESCE(?, tail), pending = NULL,"
                f" usage = COALESCE(?, usage), changes = COALESCE(?, changes),"
                f" updated_at = ?, ended_at = ? WHERE id = ? AND status IN ({marks})",
                (status.value, message, final, exit_code, tail, usage_json, changes_json, now, now, task_id,
                 *allowed),
            )
            if cur.rowcount:
                _event(c, task_id, now, "status", {"status": status.value, "message": message})
            return cur.rowcount > 0

        return await self._write(write)

    async def request_cancel(self, task_id: str, reason: str) -> None:
        def write(c: Tx) -> None:
            c.execute(
                "UPDATE tasks SET cancel_reason = ?, updated_at = ? WHERE id = ? AND status = ?",
                (reason, self.clock.now(), task_id, TaskStatus.WORKING.value),
            )

        await self._write(write)

    async def cancel_requests(self, owner: tuple[int, float]) -> list[TaskRow]:
        """Working tasks of this server that another process asked to cancel."""

        def read(c: Tx) -> list[TaskRow]:
            rows = c.execute(
                f"{_TASK_SELECT} WHERE t.status = ? AND t.cancel_reason IS NOT NULL"
                " AND t.owner_pid = ? AND t.owner_started = ?",
                (TaskStatus.WORKING.value, *owner),
            )
            return [TaskRow.from_row(r) for r in rows]

        return await self.db.read(read)

    async def working_agent_tasks(self) -> list[TaskRow]:
        def read(c: Tx) -> list[TaskRow]:
            rows = c.execute(f"{_TASK_SELECT} WHERE t.status = ? AND t.kind = 'agent'", (TaskStatus.WORKING.value,))
            return [TaskRow.from_row(r) for r in rows]

        return await self.db.read(read)

    async def adopt_queued(self, dead_owners: Sequence[tuple[int, float]]) -> int:
        """Queued tasks of servers that are gone become anyone's to run."""

        def write(c: Tx) -> int:
            total = 0
            for pid, started in dead_owners:
                cur = c.execute(
                    "UPDATE tasks SET owner_pid = NULL, owner_started = NULL"
                    " WHERE status = ? AND owner_pid = ? AND owner_started = ?",
                    (TaskStatus.QUEUED.value, pid, started),
                )
                total += cur.rowcount
            return total

        return await self._write(write)

    async def queued_owners(self) -> list[tuple[int, float]]:
        def read(c: Tx) -> list[tuple[int, float]]:
            rows = c.execute(
                "SELECT DISTINCT owner_pid, owner_started FROM tasks"
                " WHERE status = ? AND kind = 'agent' AND owner_pid IS NOT NULL",
                (TaskStatus.QUEUED.value,),
            )
            return [(r[0], r[1]) for r in rows]

        return await self.db.read(read)

    # -- human tasks and threads --------------------------------------------

    async def human_step(
        self,
        task_id: str,
        *,
        allowed: Sequence[TaskStatus],
        wanted: str,
        status: TaskStatus,
        message: dict[str, Any] | None = None,
        pending_kind: str | None = None,
        claimed_by: str | None | type[Ellipsis] = ...,
        final: str | None = None,
        final_from_pending: bool = False,
        status_message: str | None = None,
        claimer: str | None = None,
    ) -> tuple[TaskRow, MessageRow | None]:
        """One step of a human task, atomically: check its status (and, with
        ``claimer``, that this person claimed it), post the step's message (if
        any), and move it on. ``pending_kind`` makes the new message the task's
        pending question or hand-in."""
        now = self.clock.now()

        def write(c: Tx) -> tuple[TaskRow, MessageRow | None]:
            task = _task_or_none(c, task_id)
            if task is None:
                raise TaskNotFound(task_id)
            if task.kind != "human":
                raise TransitionRefused(task, "this step is only for human tasks")
            if task.status not in allowed:
                raise TransitionRefused(task, wanted)
            if claimer is not None and task.claimed_by != claimer:
                raise TransitionRefused(task, f"it is claimed by {task.claimed_by}, not by {claimer}")
            posted = _insert_message(c, task_id, now, **message) if message else None
            pending = (
                json.dumps({"kind": pending_kind, "text": posted.body, "message_id": posted.id})
                if pending_kind and posted
                else None
            )
            sets = ["status = ?", "pending = ?", "updated_at = ?", "status_message = ?"]
            args: list[Any] = [status.value, pending, now, status_message]
            if claimed_by is not ...:
                sets.append("claimed_by = ?")
                args.append(claimed_by)
            # Read in this transaction: the result is the hand-in pending now.
            result = (task.pending or {}).get("text", "") if final_from_pending else final
            if result is not None:
                sets.append("final = ?")
                args.append(result)
            if status in TERMINAL:
                sets.append("ended_at = ?")
                args.append(now)
            c.execute(f"UPDATE tasks SET {', '.join(sets)} WHERE id = ?", (*args, task_id))
            if status != task.status:
                # Where it came from says what happened (an answer, changes asked for).
                was = (task.pending or {}).get("kind")
                _event(c, task_id, now, "status", {"status": status.value, "from": task.status.value, "was": was})
            return _task(c, task_id), posted

        return await self._write(write)

    async def post_message(self, task_id: str, **message: Any) -> MessageRow:
        """A message that does not change the task's state."""
        now = self.clock.now()

        def write(c: Tx) -> MessageRow:
            if _task_or_none(c, task_id) is None:
                raise TaskNotFound(task_id)
            return _insert_message(c, task_id, now, **message)

        return await self._write(write)

    async def messages(
        self, task_id: str, *, since: str | None = None, mark_read_from: str | None = None
    ) -> list[MessageRow]:
        """A task's thread, oldest first; optionally after ``since`` (a message
        id). ``mark_read_from`` ("human"/"agent") marks those authors' messages read."""
        now = self.clock.now()

        def run(c: Tx) -> list[MessageRow]:
            after = 0
            if since:
                row = c.execute("SELECT seq FROM messages WHERE id = ? AND task_id = ?", (since, task_id)).fetchone()
                if row is None:
                    raise KeyError(since)
                after = row[0]
            rows = c.execute(
                "SELECT * FROM messages WHERE task_id = ? AND seq > ? ORDER BY seq", (task_id, after)
            ).fetchall()
            if mark_read_from:
                c.execute(
                    "UPDATE messages SET read_at = ? WHERE task_id = ? AND author = ? AND read_at IS NULL AND seq > ?",
                    (now, task_id, mark_read_from, after),
                )
            return [MessageRow(**dict(r)) for r in rows]

        if mark_read_from:
            return await self.db.write(run)
        return await self.db.read(run)

    async def expire_due(self) -> list[str]:
        """Human tasks past their deadline fail as ``expired``."""
        now = self.clock.now()

        def write(c: Tx) -> list[str]:
            rows = c.execute(
                "SELECT id FROM tasks WHERE kind = 'human' AND deadline IS NOT NULL AND deadline <= ?"
                f" AND status IN ({_marks(UNFINISHED)}) ORDER BY seq",
                (now, *_values(UNFINISHED)),
            ).fetchall()
            for row in rows:
                c.execute(
                    "UPDATE tasks SET status = ?, status_message = 'expired', pending = NULL,"
                    " updated_at = ?, ended_at = ? WHERE id = ?",
                    (TaskStatus.FAILED.value, now, now, row[0]),
                )
                _insert_message(
                    c, row[0], now, author="system", author_name=None, kind="event",
                    body="The deadline passed; the task expired.",
                )
                _event(c, row[0], now, "status", {"status": TaskStatus.FAILED.value, "message": "expired"})
            return [r[0] for r in rows]

        expired = await self.db.write(self._with_events(write))
        if expired:
            self.feed.notify()
        return expired

    async def next_human_deadline(self) -> float | None:
        def read(c: Tx) -> float | None:
            return c.execute(
                f"SELECT min(deadline) FROM tasks WHERE kind = 'human' AND status IN ({_marks(UNFINISHED)})",
                _values(UNFINISHED),
            ).fetchone()[0]

        return await self.db.read(read)

    async def queued_count(self, owner: tuple[int, float]) -> int:
        """Agent turns waiting for a slot that this server (or any) may run."""

        def read(c: Tx) -> int:
            return c.execute(
                "SELECT count(*) FROM tasks WHERE status = ? AND kind = 'agent'"
                " AND (owner_pid IS NULL OR (owner_pid = ? AND owner_started = ?))",
                (TaskStatus.QUEUED.value, *owner),
            ).fetchone()[0]

        return await self.db.read(read)

    async def prune(self, before: float, *, dry_run: bool = False) -> list[PrunedSession]:
        """Delete the sessions whose every turn is terminal and last changed before ``before``
        (their tasks, events and messages); returns what went, for the caller to remove files."""
        terminal = sorted(s.value for s in TERMINAL)

        def run(c: Tx) -> list[PrunedSession]:
            rows = c.execute(
                f"""SELECT s.id, s.cwd, s.worktree, s.branch FROM sessions s
                    WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.session_id = s.id
                                      AND (t.status NOT IN ({_marks(terminal)}) OR t.updated_at >= ?))
                    ORDER BY s.created_at""",
                (*terminal, before),
            ).fetchall()
            pruned = []
            for row in rows:
                tasks = c.execute("SELECT id, log_path FROM tasks WHERE session_id = ?", (row["id"],)).fetchall()
                pruned.append(PrunedSession(
                    row["id"], row["cwd"], row["worktree"], row["branch"],
                    tuple(t["id"] for t in tasks), tuple(t["log_path"] for t in tasks if t["log_path"]),
                ))  # fmt: skip
                if dry_run:
                    continue
                ids = [t["id"] for t in tasks]
                marks = ",".join("?" * len(ids))
                if ids:
                    c.execute(f"DELETE FROM messages WHERE task_id IN ({marks})", ids)
                    c.execute(f"DELETE FROM task_events WHERE task_id IN ({marks})", ids)
                    c.execute(f"DELETE FROM tasks WHERE id IN ({marks})", ids)
                c.execute("DELETE FROM sessions WHERE id = ?", (row["id"],))
            return pruned

        return await (self.db.read(run) if dry_run else self._write(run))

    async def last_event_id(self) -> int:
        return await self.db.read(lambda c: c.execute("SELECT COALESCE(MAX(id), 0) FROM task_events").fetchone()[0])

    async def events_after(self, after_id: int, limit: int = 500) -> list[tuple[int, str, float, str, str | None]]:
        """Task events (id, task_id, at, type, data JSON) newer than ``after_id``, oldest first."""
        return await self.db.read(lambda c: [tuple(r) for r in c.execute(
            "SELECT id, task_id, at, type, data FROM task_events WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        ).fetchall()])  # fmt: skip

    async def events_of(self, task_id: str) -> list[tuple[int, str, float, str, str | None]]:
        """Every event of one task, oldest first."""
        return await self.db.read(lambda c: [tuple(r) for r in c.execute(
            "SELECT id, task_id, at, type, data FROM task_events WHERE task_id = ? ORDER BY id", (task_id,)
        ).fetchall()])  # fmt: skip

    async def queued_workers(self) -> list[str]:
        def read(c: Tx) -> list[str]:
            rows = c.execute(
                "SELECT DISTINCT worker FROM tasks WHERE status = ? AND kind = 'agent'", (TaskStatus.QUEUED.value,)
            )
            return [r[0] for r in rows]

        return await self.db.read(read)


def _insert_task(
    c: Tx,
    *,
    task_id: str,
    session_id: str,
    turn: int,
    kind: str,
    worker: str,
    title: str,
    prompt: str,
    labels: list[str],
    cwd: str | None,
    timeout_s: float | None,
    deadline: float | None,
    idempotency_key: str | None,
    created_by: str,
    owner: tuple[int, float] | None,
    now: float,
    budgets: list[dict[str, Any]] | None = None,
) -> None:
    c.execute(
        "INSERT INTO tasks (id, session_id, turn, kind, worker, title, prompt, status, labels, cwd,"
        " timeout_s, deadline, idempotency_key, created_by, owner_pid, owner_started, created_at, updated_at,"
        " budgets) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            task_id,
            session_id,
            turn,
            kind,
            worker,
            title,
            prompt,
            TaskStatus.QUEUED.value,
            json.dumps(labels),
            cwd,
            timeout_s,
            deadline,
            idempotency_key,
            created_by,
            owner[0] if owner else None,
            owner[1] if owner else None,
            now,
            now,
            json.dumps(budgets) if budgets else None,
        ),
    )


def _task_or_none(c: Tx, task_id: str) -> TaskRow | None:
    row = c.execute(f"{_TASK_SELECT} WHERE t.id = ?", (task_id,)).fetchone()
    return TaskRow.from_row(row) if row else None


def _insert_message(
    c: Tx, task_id: str, now: float, *, author: str, author_name: str | None, kind: str, body: str
) -> MessageRow:
    message_id = new_id("msg")
    cur = c.execute(
        "INSERT INTO messages (id, task_id, author, author_name, kind, body, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " RETURNING seq",
        (message_id, task_id, author, author_name, kind, body, now),
    )
    return MessageRow(
        seq=cur.fetchone()[0], id=message_id, task_id=task_id, author=author, author_name=author_name,
        kind=kind, body=body, created_at=now, read_at=None,
    )


def _task(c: Tx, task_id: str) -> TaskRow:
    return TaskRow.from_row(c.execute(f"{_TASK_SELECT} WHERE t.id = ?", (task_id,)).fetchone())


def _event(c: Tx, task_id: str, at: float, type_: str, data: dict[str, Any]) -> None:
    c.execute(
        "INSERT INTO task_events (task_id, at, type, data) VALUES (?, ?, ?, ?)",
        (task_id, at, type_, json.dumps(data)),
    )
    collected = getattr(_collected, "events", None)
    if collected is not None:
        collected.append(TaskEvent(task_id, type_, data))


class TransitionRefused(Exception):
    """The task was not in a state that allows this step."""

    def __init__(self, task: TaskRow, wanted: str) -> None:
        super().__init__(f"task {task.id} is {task.status.value}; {wanted}")
        self.task = task

