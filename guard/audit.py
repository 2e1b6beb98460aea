"""The audit trail: one append-only row per guarded call.

``AuditLog.record`` redacts the arguments itself (callers are never trusted
to have done it) and hands the row to a writer that commits whatever has
queued up in one transaction — a group commit — so many concurrent calls
share one commit. The future ``record`` returns resolves only after that
commit: a host that awaits it before returning the tool result never
reports a call the trail does not hold. (Commits are WAL with
``synchronous = NORMAL``: they survive a crash of the process, and only a
power loss can drop the last ones.)

Triggers make the table append-only on both backends: UPDATE and DELETE
(and, on PostgreSQL, TRUNCATE) are refused.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from dataclasses import dataclass
from typing import Any

from guard.storage.clock import iso
from guard.storage.clock import Clock
from guard.storage.database import Database, Tx
from guard.storage.group_commit import GroupCommit
from guard.digests import Digester
from guard.redaction import INLINE_TEXT_CHARS, redact, redact_text, text_size

logger = logging.getLogger(__name__)


class Decision(str, enum.Enum):
    #: the call was let through to the handler
    ALLOW = "allow"
    #: a deny rule, a failed condition or the default refused it (``policy_denied``)
    DENY = "deny"
    #: the tool is hidden; the caller got "Unknown tool"
    HIDDEN = "hidden"
    #: the arguments failed the tool's schema or bounds
    INVALID_ARGUMENTS = "invalid_arguments"
    #: a rate limit had no room
    RATE_LIMITED = "rate_limited"
    #: a human must approve it first; an approval is pending
    APPROVAL_REQUIRED = "approval_required"
    #: a human denied the approval
    APPROVAL_DENIED = "approval_denied"
    #: the approval expired before anyone decided
    APPROVAL_EXPIRED = "approval_expired"
    #: a budget the call's rule charges is spent
    BUDGET_EXHAUSTED = "budget_exhausted"
    # Shadow mode: what enforce mode would have done; the call was allowed.
    SHADOW_DENY = "shadow_deny"
    SHADOW_HIDDEN = "shadow_hidden"
    SHADOW_RATE_LIMITED = "shadow_rate_limited"
    SHADOW_APPROVAL_REQUIRED = "shadow_approval_required"
    SHADOW_BUDGET_EXHAUSTED = "shadow_budget_exhausted"


DECISIONS: tuple[str, ...] = tuple(d.value for d in Decision)


class Outcome(str, enum.Enum):
    """Common outcomes; ``AuditRecord.outcome`` accepts other strings too."""

    #: the handler ran and returned a result
    OK = "ok"
    #: the guard refused the call (the decision says why)
    REFUSED = "refused"
    #: the handler ran and returned ``isError: true``
    TOOL_ERROR = "tool_error"
    #: the call ended in a JSON-RPC error (its rate-limit room was given back)
    PROTOCOL_ERROR = "protocol_error"
    #: the handler raised unexpectedly
    ERROR = "error"
    #: the client cancelled the call
    CANCELLED = "cancelled"


class InvalidDecision(ValueError):
    def __init__(self, value: object) -> None:
        super().__init__(f"decision must be one of {', '.join(DECISIONS)}; got {value!r}")


class AuditWriteFailed(RuntimeError):
    """The batch holding this record could not be committed."""


class AuditLogClosed(RuntimeError):
    pass


@dataclass(frozen=True)
class AuditRecord:
    """What happened to one call, as the host reports it (arguments unredacted)."""

    identity: str
    session: str | None
    tool: str
    args: Any
    decision: Decision | str
    rule: str | None = None
    reason: str | None = None
    approval_id: str | None = None
    duration_ms: float | None = None
    outcome: Outcome | str | None = None
    time: float | None = None  # default: the log's clock when recorded


@dataclass(frozen=True)
class AuditEntry:
    """One stored row (arguments redacted)."""

    id: int
    time: float
    identity: str
    session: str | None
    tool: str
    args: Any
    args_digest: str
    decision: str
    rule: str | None
    reason: str | None
    approval_id: str | None
    duration_ms: float | None
    outcome: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": iso(self.time),
            "identity": self.identity,
            "session": self.session,
            "tool": self.tool,
            "args": self.args,
            "args_digest": self.args_digest,
            "decision": self.decision,
            "rule": self.rule,
            "reason": self.reason,
            "approval_id": self.approval_id,
            "duration_ms": self.duration_ms,
            "outcome": self.outcome,
        }


# Tool names an agent sends are kept at most this long (no real tool's name comes close).
MAX_TOOL_CHARS = 200


_COLUMNS = (
    "time, identity, session, tool, args, args_digest, decision, rule, reason,"
    " approval_id, duration_ms, outcome"
)
_INSERT_SQL = f"INSERT INTO guard_audit ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"

_Row = tuple[Any, ...]


class AuditLog:
    """Appends audit records to ``db`` through one batching writer per log."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        max_batch: int = 512,
        linger_s: float = 0.02,
        digester: Digester | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        # Keyed digests (guard.digests); the key file sits beside the database.
        self._digester = digester
        # Records nobody awaits yet linger up to linger_s for company; every
        # record is written, even if its caller stopped waiting.
        self._writer: GroupCommit[_Row, int] = GroupCommit(
            self._commit, max_batch=max_batch, linger_s=linger_s, failed=_write_failed,
            cancelled=lambda: AuditWriteFailed("the audit writer was cancelled"), name="guard-audit-writer",
        )  # fmt: skip
        self._closed = False
        # Records waiting for a server database's digest key (see record()).
        self._awaiting_key: list[tuple[AuditRecord, asyncio.Future[int], bool]] = []
        # Large records being redacted on a worker thread, and the key being read.
        self._preparing: set[asyncio.Task[None]] = set()

    def record(self, record: AuditRecord, *, urgent: bool = True) -> asyncio.Future[int]:
        """Queue ``record``; the returned future resolves to its row id once committed.

        Validation happens here, synchronously: a bad decision raises
        ``InvalidDecision`` at once. Redaction too, for records with little
        text; larger ones are redacted on a worker thread first. A write failure sets
        ``AuditWriteFailed`` on the future. Cancelling the future does not
        un-record the call. An urgent record (someone awaits it) is committed
        at once, with whatever else is queued; records that are not urgent
        wait up to ``linger_s`` for company, so a burst shares one commit.
        """
        if self._closed:
            raise AuditLogClosed("the audit log is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        if self._digester is None and self._db.path is None:
            # A server database's key is a row, read by awaiting: records wait
            # for it in order, then go on as usual.
            parse_decision(record.decision)  # a bad decision still raises here
            self._awaiting_key.append((record, future, urgent))
            if len(self._awaiting_key) == 1:
                loading = loop.create_task(self._load_key())
                self._preparing.add(loading)
                loading.add_done_callback(self._preparing.discard)
            return future
        self._route(record, future, urgent)
        return future

    def _route(self, record: AuditRecord, future: asyncio.Future[int], urgent: bool) -> None:
        if text_size(record.args, INLINE_TEXT_CHARS + 1) <= INLINE_TEXT_CHARS:
            self._enqueue(self._prepare(record), future, urgent)
            return
        # Redacting a large record (the secret detector's plugins are
        # Python) takes milliseconds: do it on a worker thread so the event
        # loop keeps serving other clients meanwhile.
        parse_decision(record.decision)  # a bad decision still raises here
        preparing = asyncio.get_running_loop().create_task(self._prepare_later(record, future, urgent))
        self._preparing.add(preparing)
        preparing.add_done_callback(self._preparing.discard)

    async def _load_key(self) -> None:
        try:
            digester = await Digester.for_database(self._db)
        except Exception as exc:
            logger.exception("could not read the audit digest key")
            waiting, self._awaiting_key = self._awaiting_key, []
            for _, future, _ in waiting:
                if not future.done():
                    future.set_exception(AuditWriteFailed(f"audit record not prepared: {exc}"))
            return
        self._digester = digester
        waiting, self._awaiting_key = self._awaiting_key, []
        for record, future, urgent in waiting:
            try:
                self._route(record, future, urgent)
            except Exception as exc:  # noqa: BLE001 - one bad record fails alone
                if not future.done():
                    future.set_exception(AuditWriteFailed(f"audit record not prepared: {exc}"))

    async def _prepare_later(self, record: AuditRecord, future: asyncio.Future[int], urgent: bool) -> None:
        try:
            row = await asyncio.to_thread(self._prepare, record)
        except Exception as exc:
            logger.exception("could not prepare an audit record")
            if not future.done():
                future.set_exception(AuditWriteFailed(f"audit record not prepared: {exc}"))
            return
        self._enqueue(row, future, urgent)

    def _enqueue(self, row: _Row, future: asyncio.Future[int], urgent: bool) -> None:
        committed = self._writer.submit(row, urgent=urgent)
        committed.add_done_callback(lambda done: _pass_on(done, future))

    async def flush(self) -> None:
        """Wait until everything recorded so far is committed (or has failed)."""
        while self._preparing:
            await asyncio.wait(set(self._preparing))
        await self._writer.flush()

    async def aclose(self) -> None:
        """Flush and refuse further records. Call before closing the database."""
        self._closed = True
        while self._preparing:
            await asyncio.wait(set(self._preparing))
        await self._writer.close()

    async def query(
        self,
        since: float | None = None,
        tool: str | None = None,
        decision: Decision | str | None = None,
        limit: int = 100,
        after_id: int | None = None,
        newest: bool = False,
        identity: str | None = None,
    ) -> list[AuditEntry]:
        """Matching rows in the order they were written.

        ``since``: time >= since (seconds since the epoch); ``after_id``: rows
        written after that one. ``limit`` caps the result: the oldest matching
        rows, or with ``newest=True`` the newest ones (still oldest first).
        """
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        if tool is not None:
            where.append("tool = ?")
            params.append(tool)
        if decision is not None:
            where.append("decision = ?")
            params.append(parse_decision(decision))
        if identity is not None:
            where.append("identity = ?")
            params.append(identity)
        if after_id is not None:
            where.append("id > ?")
            params.append(after_id)
        sql = f"SELECT id, {_COLUMNS} FROM guard_audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY id {'DESC' if newest else 'ASC'} LIMIT ?"
        params.append(max(limit, 0))
        rows = await self._db.read(lambda c: c.execute(sql, params).fetchall())
        entries = [_entry(r) for r in rows]
        if newest:
            entries.reverse()
        return entries

    # -- the writer --------------------------------------------------------

    def _prepare(self, record: AuditRecord) -> _Row:
        decision = parse_decision(record.decision)
        outcome = record.outcome.value if isinstance(record.outcome, Outcome) else record.outcome
        if self._digester is None:
            self._digester = Digester.for_file_database(self._db)
        # Before redaction: ties the row to the exact call. Hashing is linear
        # and cheap; everything else below reads a bounded copy.
        digest = self._digester.args(record.args)
        args = json.dumps(redact(record.args), ensure_ascii=False, default=lambda o: redact_text(str(o)))
        reason = redact_text(record.reason) if record.reason else record.reason
        tool = redact_text(record.tool[:MAX_TOOL_CHARS]) if len(record.tool) >= 8 else record.tool
        when = record.time if record.time is not None else self._clock.now()
        return (when, record.identity, record.session, tool, args, digest, decision,
                record.rule, reason, record.approval_id, record.duration_ms, outcome)  # fmt: skip

    async def _commit(self, rows: list[_Row]) -> list[int]:
        def tx(c: Tx) -> list[int]:
            return [c.execute(_INSERT_SQL, row).fetchone()[0] for row in rows]

        try:
            return await self._db.write(tx)
        except Exception:
            logger.exception("could not write %d audit records", len(rows))
            raise


def _write_failed(exc: Exception) -> BaseException:
    return AuditWriteFailed(f"audit record not written: {exc}")


def _pass_on(done: asyncio.Future[int], future: asyncio.Future[int]) -> None:
    """The writer's outcome to the future ``record`` returned (which its caller may have cancelled)."""
    if future.done():
        return
    if done.cancelled():
        future.cancel()
    elif done.exception() is not None:
        future.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        future.set_result(done.result())


def parse_decision(value: Decision | str) -> str:
    """The decision's string value; ``InvalidDecision`` if it is not one."""
    try:
        return Decision(value).value
    except ValueError:
        raise InvalidDecision(value) from None


def _entry(row: _Row) -> AuditEntry:
    (id_, time, identity, session, tool, args, digest, decision, rule, reason,
     approval_id, duration_ms, outcome) = tuple(row)  # fmt: skip
    return AuditEntry(
        id=id_,
        time=time,
        identity=identity,
        session=session,
        tool=tool,
        args=json.loads(args),
        args_digest=digest,
        decision=decision,
        rule=rule,
        reason=reason,
        approval_id=approval_id,
        duration_ms=duration_ms,
        outcome=outcome,
    )
