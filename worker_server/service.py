"""TaskService: what the task tools do, independent of MCP.

The tools, the CLI and the inbox all go through here. Arguments that pass the
input schema but still make no sense (an unknown worker, a cwd outside the
allowed roots, an unknown task id) raise ``InvalidArgument`` naming the field.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from guard.budgets import admitted_budgets
from guard.storage.changes import ChangeFeed
from guard.storage.clock import iso
from worker_server.config import Settings
from worker_server.intake import Intake
from worker_server import git_work
from worker_server import usage as usage_
from worker_server.profiles import DEFAULT_SANDBOX, EFFORTS, SANDBOXES, WorkerProfile
from worker_server.hosts import Liveness, ProcessLiveness
from worker_server.runner import Runner, stop_orphan
from worker_server.workers import find_program
from worker_server.store import MessageRow, Store, TaskNotFound, TaskRow, new_id
from worker_server.task import (
    CancelResult,
    Changes,
    Message,
    Output,
    Pending,
    TaskDetail,
    TaskList,
    TaskStatus,
    TaskSummary,
    TaskView,
    Turn,
    Usage,
    WaitResult,
)

if TYPE_CHECKING:
    from worker_server.humans import Humans  # which imports this module

logger = logging.getLogger(__name__)

HUMAN = "human"
# wait-task sends a progress notification at least this often.
PROGRESS_EVERY_S = 4.0
# Tail lines in results other than get-task.
DEFAULT_TAIL_LINES = 10
# wait-task shares max_result_bytes among its tasks, down to this much each.
MIN_TASK_BUDGET = 512
# get-task shows the newest messages of a human task's thread, each cut to
# this many characters; list-task-messages has them all, whole.
THREAD_MESSAGES = 50
THREAD_BODY_CHARS = 2000
# How long cancel-task waits for another server process to stop its turn.
REMOTE_CANCEL_WAIT_S = 15.0

ProgressFn = Callable[[float, float, str], Awaitable[None]]
# A model name is passed through to the CLI (which knows its models); it may
# not look like an option or carry anything but a name's characters.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+\[\]-]{0,199}")
ISOLATIONS = ("none", "worktree")


class InvalidArgument(Exception):
    """An argument that fits the schema but not the situation."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Caller:
    identity: str
    session: str
    # The client's working directory (a forwarder's), the default cwd of its tasks.
    cwd: str | None = None


@dataclass(frozen=True)
class Viewer:
    """Whose sessions a request may see: its identity's own, or every one when the
    policy's ``share`` names it. ``None`` in place of a viewer is an operator on
    this machine (the CLI, the inbox), who sees everything."""

    identity: str
    sees_all: bool = False

    def may_see(self, owner: str | None) -> bool:
        return self.sees_all or owner == self.identity


def _visible(row: TaskRow, viewer: Viewer | None) -> bool:
    return viewer is None or viewer.may_see(row.session_owner)


class TaskService:
    def __init__(
        self,
        store: Store,
        runner: Runner | None,
        feed: ChangeFeed,
        settings: Settings,
        profiles: dict[str, WorkerProfile],
        intake: Intake | None = None,
        liveness: Liveness | None = None,
        humans: Humans | None = None,
    ) -> None:
        self.store = store
        # Whether the server running a turn is alive (see worker_server.hosts).
        self.liveness: Liveness = liveness or ProcessLiveness()
        # Closed while the daemon drains: new agent turns are refused.
        self.intake = intake or Intake()
        self.runner = runner
        self.feed = feed
        self.settings = settings
        self.profiles = profiles
        # The people's side of human tasks (worker_server.humans); None: no human workers here.
        self.humans = humans

    # -- spawn-task --------------------------------------------------------

    async def spawn(
        self,
        caller: Caller,
        *,
        prompt: str,
        worker: str | None = None,
        title: str | None = None,
        cwd: str | None = None,
        timeout_s: int | None = None,
        labels: Sequence[str] | None = None,
        idempotency_key: str | None = None,
        model: str | None = None,
        effort: str | None = None,
        sandbox: str | None = None,
        isolation: str | None = None,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
    ) -> TaskView:
        if not prompt.strip():
            raise InvalidArgument("prompt", "must not be empty or only whitespace (1..100000 characters)")
        worker = worker or self.settings.default_worker or "shell"
        labels = list(labels or [])
        title = (title or _title_from(prompt)).strip() or _title_from(prompt)
        common = {
            "worker": worker,
            "title": title,
            "prompt": prompt,
            "labels": labels,
            "created_by": caller.identity,
            "idempotency_key": idempotency_key,
        }
        if worker == HUMAN:
            if self.humans is None:
                raise InvalidArgument("worker", "human workers are not configured on this server")
            for name, value in (("model", model), ("effort", effort), ("sandbox", sandbox)):
                if value is not None and not (name == "sandbox" and value == DEFAULT_SANDBOX):
                    raise InvalidArgument(name, f"{name} is for agent workers, not human tasks")
            if isolation not in (None, "none"):
                raise InvalidArgument("isolation", "worktree isolation is for agent workers, not human tasks")
            for name, cap in (("max_tokens", max_tokens), ("max_cost_usd", max_cost_usd)):
                if cap is not None:
                    raise InvalidArgument(name, f"{name} is for agent workers, not human tasks")
            timeout = float(timeout_s or self.settings.human_timeout_s)
            row, _ = await self.store.create_session(
                kind="human", cwd=None, timeout_s=timeout, deadline=self.store.clock.now() + timeout, owner=None,
                **common,
            )  # fmt: skip
        else:
            self.intake.check()
            profile = self.profiles.get(worker)
            if profile is None:
                known = ", ".join([*sorted(self.profiles), HUMAN])
                raise InvalidArgument("worker", f"unknown worker {worker!r}; known workers: {known}")
            _check_passable("prompt", prompt, profile)
            options = _check_options(
                worker, profile, model=model, effort=effort, sandbox=sandbox or DEFAULT_SANDBOX
            )
            if isolation not in (None, *ISOLATIONS):
                raise InvalidArgument("isolation", f"must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
            _check_installed(worker, profile)
            path = str(self._check_cwd(cwd, caller.cwd))
            session_id = new_id("ses")
            worktree = branch = None
            if (isolation or "none") == "worktree":
                worktree, branch = await self._add_worktree(path, session_id)
            row, created = await self.store.create_session(
                kind="agent",
                cwd=path,
                timeout_s=float(timeout_s or profile.timeout_s),
                deadline=None,  # set when a worker slot is claimed
                owner=self.runner.owner if self.runner else None,
                session_id=session_id,
                options=options,
                worktree=worktree,
                branch=branch,
                # Charged by the runner as the worker reports usage (guard.budgets).
                budgets=[t.to_json() for t in admitted_budgets()],
                caps={k: v for k, v in (("max_tokens", max_tokens), ("max_cost_usd", max_cost_usd)) if v is not None},
                **common,
            )
            if not created and worktree:
                # The idempotency key named an earlier session: this worktree is not needed.
                await git_work.remove_worktree(path, worktree, branch or "")
        return await self.view(row)

    async def _add_worktree(self, cwd: str, session_id: str) -> tuple[str, str]:
        branch = f"taskwarden/{session_id}"
        try:
            path = await git_work.add_worktree(cwd, self.settings.worktrees_path, session_id, branch)
        except git_work.GitError as exc:
            raise InvalidArgument("isolation", f"worktree needs cwd in a git work tree with a commit: {exc}") from None
        return path, branch

    def _check_cwd(self, cwd: str | None, default: str | None = None) -> Path:
        roots = self.settings.roots
        shown = ", ".join(self.settings.allowed_roots)
        if cwd is None:
            path = Path(default or os.getcwd()).resolve()
            if not _inside(path, roots):
                raise InvalidArgument(
                    "cwd",
                    f"not given, and the server's directory {path} is outside the allowed roots ({shown}); "
                    "pass an absolute cwd inside them",
                )
            return path
        if "\x00" in cwd:
            raise InvalidArgument("cwd", "must not contain a NUL byte")
        if not os.path.isabs(cwd):
            raise InvalidArgument("cwd", f"must be an absolute path, got {cwd!r}")
        try:
            path = Path(cwd).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
            raise InvalidArgument("cwd", f"{cwd} cannot be resolved: {exc}") from None
        if not _inside(path, roots):
            raise InvalidArgument("cwd", f"{cwd} is outside the allowed roots ({shown})")
        if not path.is_dir():
            raise InvalidArgument("cwd", f"{cwd} is not an existing directory")
        return path

    # -- wait-task ---------------------------------------------------------

    async def wait(
        self,
        task_ids: Sequence[str],
        *,
        timeout_s: float = 25,
        mode: str = "any",
        progress: ProgressFn | None = None,
        viewer: Viewer | None = None,
    ) -> WaitResult:
        ids = list(dict.fromkeys(task_ids))
        start = time.monotonic()
        deadline = start + timeout_s
        last_progress = start
        while True:
            since = self.feed.generation
            rows = [r for r in await self.store.get_many(ids) if _visible(r, viewer)]
            if len(rows) != len(ids):
                missing = sorted(set(ids) - {r.id for r in rows})
                raise InvalidArgument("task_ids", f"no task {missing[0]!r}")
            settled = [r for r in rows if r.settled]
            met = len(settled) == len(rows) if mode == "all" else bool(settled)
            remaining = deadline - time.monotonic()
            if met or remaining <= 0:
                # The result stays small however many tasks it reports.
                budget = max(MIN_TASK_BUDGET, self.settings.max_result_bytes // len(rows))
                return WaitResult(
                    tasks=[await self.view(r, budget=budget) for r in rows],
                    timed_out=not met,
                    still_waiting=[r.id for r in rows if not r.settled],
                )
            now = time.monotonic()
            if progress is not None and now - last_progress >= PROGRESS_EVERY_S:
                # Sent on time even when unrelated writes keep waking us.
                last_progress = now
                await progress(now - start, timeout_s, self._latest_activity(rows))
            step = min(remaining, last_progress + PROGRESS_EVERY_S - now) if progress else remaining
            await self.feed.wait(since, max(step, 0.0))

    def _latest_activity(self, rows: list[TaskRow]) -> str:
        for row in rows:
            running = self.runner.running(row.id) if self.runner else None
            line = running.activity if running else row.last_activity
            if line:
                return f"{row.id}: {line}"
        waiting = [r for r in rows if not r.settled]
        return f"waiting for {len(waiting)} task(s): " + ", ".join(f"{r.id} {r.status.value}" for r in waiting)

    # -- message-task ------------------------------------------------------

    async def message(self, caller: Caller, task_id: str, message: str, viewer: Viewer | None = None) -> TaskView:
        if not message.strip():
            raise InvalidArgument("message", "must not be empty (1..100000 characters)")
        task = await self._get(task_id, viewer)
        if task.kind == "human":
            if self.humans is None:
                raise InvalidArgument("task_id", "human workers are not configured on this server")
            return await self.view(await self.humans.agent_message(caller, task, message))
        if task.worker not in self.profiles:
            raise InvalidArgument("task_id", f"its worker {task.worker!r} is no longer configured")
        _check_passable("message", message, self.profiles[task.worker])
        self.intake.check()
        row = await self.store.add_turn(
            task.session_id,
            prompt=message,
            created_by=caller.identity,
            owner=self.runner.owner if self.runner else None,
            budgets=[t.to_json() for t in admitted_budgets()],
        )
        return await self.view(row)

    # -- cancel-task -------------------------------------------------------

    async def cancel(
        self, task_ids: Sequence[str], reason: str | None = None, viewer: Viewer | None = None
    ) -> CancelResult:
        ids = list(dict.fromkeys(task_ids))
        reason = (reason or "").strip() or "cancelled by the agent"
        rows = {r.id: r for r in await self.store.get_many(ids) if _visible(r, viewer)}
        result = CancelResult(cancelled=[], already_terminal=[], not_found=[])
        outcomes: dict[str, str] = {}

        async def one(row: TaskRow) -> None:
            outcomes[row.id] = await self._cancel_one(row, reason)

        async with anyio.create_task_group() as tg:
            for task_id in ids:
                row = rows.get(task_id)
                if row is None:
                    outcomes[task_id] = "not_found"
                else:
                    tg.start_soon(one, row)
        for task_id in ids:
            getattr(result, outcomes[task_id]).append(task_id)
        return result

    async def cancels_nothing(self, task_ids: Sequence[str]) -> bool:
        """Whether cancelling ``task_ids`` would change nothing, whoever asks: each exists and has
        finished. (Whose task it is does not matter: the answer must not depend on who is
        looking. An unknown id is decided like a running task, so a held call cannot be used
        to probe which ids exist.)"""
        wanted = list(dict.fromkeys(task_ids))
        rows = await self.store.get_many(wanted)
        return len(rows) == len(wanted) and all(r.terminal for r in rows)

    async def _cancel_one(self, row: TaskRow, reason: str) -> str:
        if row.terminal:
            return "already_terminal"
        message = f"cancelled: {reason}"
        if row.kind == "human":
            if await self.store.finish(row.id, TaskStatus.CANCELLED, message=message):
                if self.humans is not None:
                    await self.humans.note_cancelled(row, reason)
                return "cancelled"
            return "already_terminal"
        if row.status == TaskStatus.QUEUED:
            if await self.store.finish(row.id, TaskStatus.CANCELLED, message=message, only_from=[TaskStatus.QUEUED]):
                return "cancelled"
            row = await self.store.get(row.id)  # it started meanwhile
            if row.terminal:
                return "already_terminal"
        if self.runner is not None and await self.runner.cancel(row.id, reason):
            return "cancelled" if (await self.store.get(row.id)).status == TaskStatus.CANCELLED else "already_terminal"
        owner = (row.owner_pid, row.owner_started)
        if await self.liveness.alive(owner):
            # Another server process runs it: ask, then wait for it to stop.
            await self.store.request_cancel(row.id, reason)
            with anyio.move_on_after(REMOTE_CANCEL_WAIT_S):
                final = await self.wait([row.id], timeout_s=REMOTE_CANCEL_WAIT_S, mode="all")
                status = final.tasks[0].status
                return "cancelled" if status == TaskStatus.CANCELLED else "already_terminal"
            raise InvalidArgument("task_id", f"{row.id}: the server running it did not stop it in time")
        # Its server is gone and nobody reconciled it yet.
        if await stop_orphan(self.store, row, TaskStatus.CANCELLED, message, kill=await self.liveness.on_this_host(owner)):
            return "cancelled"
        return "already_terminal"

    # -- list-tasks / get-task ---------------------------------------------

    async def list(
        self,
        *,
        status: str | None = None,
        worker: str | None = None,
        label: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        viewer: Viewer | None = None,
    ) -> TaskList:
        before = _decode_cursor(cursor) if cursor else None
        owner = viewer.identity if viewer is not None and not viewer.sees_all else None
        rows, more = await self.store.list(
            status=status, worker=worker, label=label, limit=limit, before_seq=before, owner=owner
        )
        next_cursor = _encode_cursor(rows[-1].seq) if more and rows else None
        return TaskList(tasks=[self.summary(r) for r in rows], next_cursor=next_cursor)

    async def get(self, task_id: str, tail_lines: int = 20, viewer: Viewer | None = None) -> TaskDetail:
        row = await self._get(task_id, viewer)
        view = await self.view(row, tail_lines=tail_lines)
        turns = [
            Turn(
                task_id=t.id,
                turn=t.turn,
                status=t.status,
                status_message=t.status_message,
                prompt=_clip(t.prompt, 500),
                created_at=iso(t.created_at) or "",
                final=_clip(t.final, 500) if t.final is not None else None,
                usage=Usage(**t.usage) if t.usage else None,
            )
            for t in await self.store.session_turns(row.session_id)
        ]
        thread = await self.thread(row) if row.kind == "human" else None
        total = usage_.add(t.usage.model_dump() if t.usage else None for t in turns)
        return TaskDetail(
            **view.model_dump(), turns=turns, thread=thread, session_usage=Usage(**total) if total else None
        )

    async def thread(self, row: TaskRow) -> list[Message]:
        if self.humans is None:
            return []
        messages = [message_view(m) for m in (await self.humans.messages(row.id))[-THREAD_MESSAGES:]]
        for m in messages:
            if len(m.body) > THREAD_BODY_CHARS:
                m.body = m.body[: THREAD_BODY_CHARS - 1] + "… [cut: list-task-messages has it whole]"
        return messages

    async def _get(self, task_id: str, viewer: Viewer | None = None) -> TaskRow:
        """The task, if ``viewer`` may see it; another identity's task does not exist for it."""
        try:
            row = await self.store.get(task_id)
        except TaskNotFound:
            row = None
        if row is None or not _visible(row, viewer):
            raise InvalidArgument("task_id", f"no task {task_id!r}")
        return row

    async def check_visible(self, task_id: str, viewer: Viewer | None) -> None:
        """Raise the task's not-found error unless ``viewer`` may see it."""
        await self._get(task_id, viewer)

    async def log_path(self, task_id: str, viewer: Viewer | None = None) -> Path | None:
        """Where the task's log is (None: its turn has not started yet)."""
        row = await self._get(task_id, viewer)
        return Path(row.log_path) if row.log_path else None

    # -- rendering ---------------------------------------------------------

    def summary(self, row: TaskRow) -> TaskSummary:
        return TaskSummary(
            task_id=row.id,
            session_id=row.session_id,
            turn=row.turn,
            worker=row.worker,
            kind=row.kind,  # type: ignore[arg-type]
            title=row.title,
            status=row.status,
            status_message=row.status_message,
            created_at=iso(row.created_at) or "",
            updated_at=iso(row.updated_at) or "",
            pending=Pending(**row.pending) if row.pending else None,
            exit_code=row.exit_code,
            labels=row.labels,
            usage=Usage(**row.usage) if row.usage else None,
            owner=row.session_owner,
        )

    async def view(self, row: TaskRow, tail_lines: int = DEFAULT_TAIL_LINES, budget: int | None = None) -> TaskView:
        """The task as agents see it; its text fits ``budget`` bytes (default: max_result_bytes)."""
        budget = budget or self.settings.max_result_bytes
        final, final_cut = _cap(row.final, budget, keep="head")
        running = self.runner.running(row.id) if self.runner else None
        tail_source = running.tail.text() if running else row.tail
        tail_text = _last_lines(tail_source, tail_lines)
        tail, tail_cut = _cap(tail_text, budget // 2, keep="tail")
        summary = self.summary(row)
        return TaskView(
            **summary.model_dump(),
            output=Output(
                final=final, tail=tail or None, truncated=final_cut or tail_cut, log_uri=f"task://{row.id}/log"
            ),
            cwd=row.cwd,
            options=row.options,
            worktree=row.worktree,
            branch=row.branch,
            changes=Changes(**row.changes) if row.changes else None,
            deadline=iso(row.deadline),
            poll_interval_s=self.settings.poll_interval_s,
            next_action=next_action(row),
        )


def message_view(m: MessageRow) -> Message:
    return Message(
        message_id=m.id,
        task_id=m.task_id,
        author=m.author,  # type: ignore[arg-type]
        author_name=m.author_name,
        kind=m.kind,  # type: ignore[arg-type]
        body=m.body,
        created_at=iso(m.created_at) or "",
        read_at=iso(m.read_at),
    )


def next_action(row: TaskRow) -> str:
    """One sentence telling the agent what to call next."""
    human = row.kind == "human"
    match row.status:
        case TaskStatus.QUEUED if human:
            return "Call wait-task with this task_id; no person has claimed the task yet."
        case TaskStatus.QUEUED:
            return f"Call wait-task with this task_id; it is waiting for a free {row.worker} worker slot."
        case TaskStatus.WORKING if human:
            return "Call wait-task with this task_id; a person is working on it and may ask a question."
        case TaskStatus.WORKING:
            return "Call wait-task with this task_id to block until it finishes, or get-task to see its progress."
        case TaskStatus.INPUT_REQUIRED if (row.pending or {}).get("kind") == "review":
            return (
                "Read the hand-in in pending.text, then call review-task with decision accept, or "
                "request_changes with feedback."
            )
        case TaskStatus.INPUT_REQUIRED:
            return "Answer the question in pending.text with send-task-message, then call wait-task again."
        case TaskStatus.COMPLETED if human:
            return "Use output.final: the person's accepted result. Nothing more is needed."
        case TaskStatus.COMPLETED:
            return "Use output.final; to continue this session, call message-task with this task_id."
        case TaskStatus.FAILED if human:
            return "The task ended without a result (see status_message); post a new one with spawn-task if needed."
        case TaskStatus.FAILED:
            return (
                "See status_message and the log at output.log_uri; call message-task with this task_id "
                "to retry or resume the session."
            )
        case _:
            return "The task was cancelled; call message-task with this task_id to start another turn if needed."


def _check_options(
    worker: str, profile: WorkerProfile, *, model: str | None, effort: str | None, sandbox: str | None
) -> dict[str, str]:
    """The session's worker options, each one the profile takes and a value it accepts."""
    supported = profile.supported_options()
    if sandbox == DEFAULT_SANDBOX and "sandbox" not in supported:
        # Writing inside cwd is what every worker may do (a shell script does);
        # only narrowing it needs the worker's support.
        sandbox = None
    given = {"model": model, "effort": effort, "sandbox": sandbox}
    for name, value in given.items():
        if value is not None and name not in supported:
            takes = ", ".join(supported) or "no options"
            raise InvalidArgument(name, f"the {worker} worker does not take {name} (it takes: {takes})")
    if model is not None and not MODEL_NAME.fullmatch(model):
        raise InvalidArgument(
            "model", "must be a model name: 1..200 letters, digits and . _ : / @ + [ ] -, not starting with -"
        )
    if effort is not None and effort not in EFFORTS:
        raise InvalidArgument("effort", f"must be one of {', '.join(EFFORTS)}, got {effort!r}")
    if sandbox is not None and sandbox not in SANDBOXES:
        raise InvalidArgument("sandbox", f"must be one of {', '.join(SANDBOXES)}, got {sandbox!r}")
    return {name: value for name, value in given.items() if value is not None}


def _check_installed(worker: str, profile: WorkerProfile) -> None:
    """Refuse a turn that could not start: the worker's program is not there."""
    if find_program(profile) is not None:
        return
    program = profile.command[0]
    if os.sep in program:
        raise InvalidArgument("worker", f"{worker}: {program} is not an executable file")
    raise InvalidArgument(
        "worker", f"{program} CLI not found on PATH: the {worker} worker is not installed on this server; "
        "pick another worker (`taskwarden workers` lists them)",
    )


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _title_from(prompt: str) -> str:
    first = next((line.strip() for line in prompt.splitlines() if line.strip()), "task")
    return _clip(first, 80)


def _clip(text: str | None, limit: int) -> str:
    if text is None:
        return ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _last_lines(text: str | None, n: int) -> str:
    if not text or n <= 0:
        return ""
    return "\n".join(text.splitlines()[-n:])


def _cap(text: str | None, max_bytes: int, keep: str) -> tuple[str | None, bool]:
    """Cut ``text`` to ``max_bytes`` of UTF-8, keeping its head or its tail."""
    if text is None:
        return None, False
    data = text.encode()
    if len(data) <= max_bytes:
        return text, False
    marker = "\n…[truncated; the whole output is at log_uri]…\n"
    room = max(0, max_bytes - len(marker.encode()))
    if keep == "head":
        return data[:room].decode("utf-8", errors="ignore") + marker, True
    return marker + data[len(data) - room :].decode("utf-8", errors="ignore"), True


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def _check_passable(field: str, prompt: str, profile: WorkerProfile) -> None:
    """A prompt passed as a command-line argument cannot hold a NUL byte (exec refuses it)."""
    if profile.prompt == "arg" and "\x00" in prompt:
        raise InvalidArgument(field, "must not contain a NUL byte: this worker gets it as a command-line argument")


# Cursors carry a row's seq, an SQLite integer: anything wider is not ours.
_MAX_SEQ = 2**63 - 1


def _decode_cursor(cursor: str) -> int:
    try:
        if len(cursor) > 64:
            raise ValueError
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = raw.partition(":")
        if kind != "seq" or not (value.isascii() and value.isdigit()) or not 0 <= int(value) <= _MAX_SEQ:
            raise ValueError
        return int(value)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("cursor", "not a cursor returned by list-tasks") from None
