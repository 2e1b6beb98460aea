"""The outbox: one row per notification to send on one channel.

A row is written in the transaction of the change it reports (``enqueue``
takes that transaction's connection), so a notification exists exactly when
its change does. The delivery loop leases due rows (``lease``), sends them,
and marks them ``sent`` — or schedules a retry, and after the last attempt
marks them ``failed``. A process killed after the send but before the mark
sends that one row again when its lease runs out (at least once); a row
marked ``sent`` is never sent again. ``(event_key, recipient, channel)`` is
unique, so an event noticed twice (a timed scan in two daemons) queues once.

All SQL here is plain standard SQL that runs on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import builtins
import json
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from guard.storage.clock import Clock, iso
from guard.storage.database import Database, Migrations, Step, Tx

_SQLITE: list[Step] = [
    # 1: the outbox and the spent one-click decision links
    """
    CREATE TABLE notify_outbox (
        id           TEXT PRIMARY KEY,          -- "ntf_" + 16 hex
        event_key    TEXT NOT NULL,             -- what happened, e.g. "approval_pending:apr_x"
        kind         TEXT NOT NULL,             -- the event kind (see worker_server.notify.events)
        recipient    TEXT NOT NULL,             -- a person's name, or "(team)" for a default channel
        channel      TEXT NOT NULL CHECK (channel IN ('webhook', 'email')),
        target       TEXT NOT NULL,             -- the URL or e-mail address
        payload      TEXT NOT NULL,             -- JSON: title, text, link, ids
        status       TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
        attempts     INTEGER NOT NULL,
        next_at      REAL NOT NULL,             -- seconds since the epoch
        leased_until REAL,
        last_error   TEXT,
        created_at   REAL NOT NULL,
        sent_at      REAL,
        UNIQUE (event_key, recipient, channel)
    );
    CREATE INDEX notify_outbox_due ON notify_outbox (status, next_at);
    CREATE TABLE notify_spent_links (
        nonce      TEXT PRIMARY KEY,
        approval_id TEXT NOT NULL,
        spent_at   REAL NOT NULL
    );
    """,
]
_POSTGRESQL: list[Step] = [
    # 1: SQLite's step 1
    """
    CREATE TABLE notify_outbox (
        id           TEXT PRIMARY KEY,
        event_key    TEXT NOT NULL,
        kind         TEXT NOT NULL,
        recipient    TEXT NOT NULL,
        channel      TEXT NOT NULL CHECK (channel IN ('webhook', 'email')),
        target       TEXT NOT NULL,
        payload      TEXT NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
        attempts     BIGINT NOT NULL,
        next_at      DOUBLE PRECISION NOT NULL,
        leased_until DOUBLE PRECISION,
        last_error   TEXT,
        created_at   DOUBLE PRECISION NOT NULL,
        sent_at      DOUBLE PRECISION,
        UNIQUE (event_key, recipient, channel)
    );
    CREATE INDEX notify_outbox_due ON notify_outbox (status, next_at);
    CREATE TABLE notify_spent_links (
        nonce       TEXT PRIMARY KEY,
        approval_id TEXT NOT NULL,
        spent_at    DOUBLE PRECISION NOT NULL
    );
    """,
]
STEPS = Migrations(sqlite=_SQLITE, postgresql=_POSTGRESQL)

#: A leased row is someone's for this long; a daemon that died lets it go then.
LEASE_S = 120.0


class Status(StrEnum):
    #: waiting to be sent (again)
    PENDING = "pending"
    #: the channel acknowledged it (a 2xx answer, an accepted e-mail)
    SENT = "sent"
    #: every attempt failed; ``last_error`` says why
    FAILED = "failed"


@dataclass(frozen=True)
class Notification:
    id: str
    event_key: str
    kind: str
    recipient: str
    channel: str
    target: str
    payload: dict[str, Any]
    status: Status
    attempts: int
    next_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "event": self.kind, "event_key": self.event_key, "recipient": self.recipient,
            "channel": self.channel, "target": self.target, "status": self.status.value,
            "attempts": self.attempts, "next_at": iso(self.next_at), "last_error": self.last_error,
            "created_at": iso(self.created_at), "sent_at": iso(self.sent_at),
            "title": self.payload.get("title"), "link": self.payload.get("link"),
        }  # fmt: skip


_COLUMNS = (
    "id, event_key, kind, recipient, channel, target, payload, status, attempts, next_at, last_error,"
    " created_at, sent_at"
)


def _row(r: Any) -> Notification:
    v = tuple(r)
    return Notification(v[0], v[1], v[2], v[3], v[4], v[5], json.loads(v[6]), Status(v[7]), *v[8:])


def enqueue(
    c: Tx,
    now: float,
    *,
    event_key: str,
    kind: str,
    recipient: str,
    channel: str,
    target: str,
    payload: dict[str, Any],
) -> bool:
    """Queue one notification inside the caller's transaction; False if it was queued already."""
    seen = c.execute(
        "SELECT 1 FROM notify_outbox WHERE event_key = ? AND recipient = ? AND channel = ?",
        (event_key, recipient, channel),
    ).fetchone()
    if seen is not None:
        return False
    c.execute(
        f"INSERT INTO notify_outbox ({_COLUMNS}, leased_until) VALUES"
        " (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, NULL, ?, NULL, NULL)",
        ("ntf_" + secrets.token_hex(8), event_key, kind, recipient, channel, target,
         json.dumps(payload, ensure_ascii=False), Status.PENDING.value, now, now),
    )  # fmt: skip
    return True


def spend_link(c: Tx, nonce: str, approval_id: str, now: float) -> bool:
    """Mark a decision link used, inside the decision's transaction; False if it was already."""
    if c.execute("SELECT 1 FROM notify_spent_links WHERE nonce = ?", (nonce,)).fetchone() is not None:
        return False
    c.execute(
        "INSERT INTO notify_spent_links (nonce, approval_id, spent_at) VALUES (?, ?, ?)", (nonce, approval_id, now)
    )
    return True


def link_spent(c: Tx, nonce: str) -> bool:
    return c.execute("SELECT 1 FROM notify_spent_links WHERE nonce = ?", (nonce,)).fetchone() is not None


class Outbox:
    """The delivery side of the outbox in ``db``."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    async def migrate(self) -> None:
        await self.db.migrate_component("notify", STEPS)

    async def lease(self, limit: int = 20) -> builtins.list[Notification]:
        """Due pending rows, leased to the caller for ``LEASE_S``."""
        now = self.clock.now()

        def tx(c: Tx) -> builtins.list[Notification]:
            rows = c.execute(
                f"SELECT {_COLUMNS} FROM notify_outbox WHERE status = ? AND next_at <= ?"
                " AND (leased_until IS NULL OR leased_until <= ?) ORDER BY next_at, created_at, id LIMIT ?",
                (Status.PENDING.value, now, now, limit),
            ).fetchall()
            taken = []
            for r in rows:
                n = _row(r)
                changed = c.execute(
                    "UPDATE notify_outbox SET leased_until = ? WHERE id = ? AND status = ?"
                    " AND (leased_until IS NULL OR leased_until <= ?)",
                    (now + LEASE_S, n.id, Status.PENDING.value, now),
                ).rowcount
                if changed:
                    taken.append(n)
            return taken

        return await self.db.write(tx)

    async def mark_sent(self, notification_id: str) -> None:
        now = self.clock.now()
        await self.db.write(
            lambda c: c.execute(
                "UPDATE notify_outbox SET status = ?, sent_at = ?, attempts = attempts + 1,"
                " leased_until = NULL, last_error = NULL WHERE id = ?",
                (Status.SENT.value, now, notification_id),
            )
        )

    async def mark_failed_attempt(self, notification_id: str, error: str, retry_at: float | None) -> None:
        """One attempt failed: retry at ``retry_at``, or (None) give up: ``failed``."""
        status = Status.PENDING if retry_at is not None else Status.FAILED
        await self.db.write(
            lambda c: c.execute(
                "UPDATE notify_outbox SET status = ?, attempts = attempts + 1, next_at = ?,"
                " leased_until = NULL, last_error = ? WHERE id = ?",
                (status.value, retry_at if retry_at is not None else self.clock.now(), error[:500], notification_id),
            )
        )

    async def next_due(self) -> float | None:
        """When the earliest pending row is due (or its lease ends)."""

        def read(c: Tx) -> float | None:
            row = c.execute(
                "SELECT min(CASE WHEN leased_until IS NOT NULL AND leased_until > next_at"
                " THEN leased_until ELSE next_at END) FROM notify_outbox WHERE status = ?",
                (Status.PENDING.value,),
            ).fetchone()
            return row[0] if row else None

        return await self.db.read(read)

    async def list(self, *, failed_only: bool = False, limit: int = 200) -> builtins.list[Notification]:
        """Notifications, newest first."""
        where = "WHERE status = ?" if failed_only else ""
        args: tuple[Any, ...] = (Status.FAILED.value,) if failed_only else ()
        rows = await self.db.read(
            lambda c: c.execute(
                f"SELECT {_COLUMNS} FROM notify_outbox {where} ORDER BY created_at DESC, id LIMIT ?", (*args, limit)
            ).fetchall()
        )
        return [_row(r) for r in rows]
