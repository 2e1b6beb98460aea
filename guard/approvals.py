"""Approvals: a human's yes or no for one exact call, used at most once.

An approval is bound to a *digest* of the call — tool, canonical arguments
and caller identity, HMAC-keyed per database (``guard.digests``) — so approving ``cancel-task {"task_id": "t1"}`` for alice
approves nothing else. Its life::

    pending ──decide(approve)──▶ approved ──consume──▶ (used_at set)
       │  └────decide(deny)────▶ denied ───acknowledge──▶ (used_at set)
       └──expires_at passes────▶ expired ──acknowledge──▶ (used_at set)

``expires_at`` bounds the whole approval: a pending one can no longer be
decided, an approved one no longer used. Who may decide, and how many must agree, comes from the rule
(``guard.approvers``): an approval stays pending until ``quorum`` distinct
eligible people approved it; one denial denies. Every decision is recorded
(``decisions``: who, when, the channel, the comment). ``used_at`` means "spent": the call
ran (approved), or its caller was told the answer (denied, expired) — after
which the next identical call opens a new approval. Only ``decide`` changes
the answer, and only the CLI and the inbox call it; no MCP tool can.
"""

from __future__ import annotations

import builtins
import enum
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from guard.storage.changes import ChangeFeed
from guard.storage.clock import Clock, iso
from guard.storage.database import Database, Tx
from guard.approvers import may_decide
from guard.digests import Digester
from guard.policy import ApprovalSettings
from guard.redaction import redact_off_loop

logger = logging.getLogger(__name__)

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # base32, lower case for typing


class ApprovalStatus(str, enum.Enum):
    #: waiting for a human; the call that asked for it was told how to approve
    PENDING = "pending"
    #: a human said yes; the next identical call runs (once)
    APPROVED = "approved"
    #: a human said no, with a reason the caller is shown
    DENIED = "denied"
    #: nobody decided before ``expires_at``
    EXPIRED = "expired"


class ApprovalError(Exception):
    """Base class for approval errors a human can act on; the message says what happened."""


class ApprovalNotFound(ApprovalError):
    def __init__(self, approval_id: str) -> None:
        super().__init__(f"no approval {approval_id}")
        self.approval_id = approval_id


class ApprovalNotPending(ApprovalError):
    """Someone decided first (or it expired earlier); the first answer stands."""

    def __init__(self, approval: Approval) -> None:
        if approval.status is ApprovalStatus.EXPIRED:
            what = f"expired at {iso(approval.expires_at)}"
        else:
            what = f"already {approval.status.value}"
            if approval.decided_by:
                what += f" by {approval.decided_by}"
            if approval.decided_at is not None:
                what += f" at {iso(approval.decided_at)}"
        super().__init__(f"{approval.id} is {what}; the first answer stands")
        self.approval = approval


class ApprovalExpired(ApprovalError):
    """It was still pending but its time ran out; it is now marked expired."""

    def __init__(self, approval: Approval) -> None:
        super().__init__(f"{approval.id} expired at {iso(approval.expires_at)}; it can no longer be decided")
        self.approval = approval


class NotAnApprover(ApprovalError):
    """The person may not decide this approval (their role, or the rule's approvers)."""

    def __init__(self, approval: Approval, name: str) -> None:
        super().__init__(f"{name} may not decide {approval.id}: it needs {approval.who_decides}")
        self.approval = approval


class AlreadyDecided(ApprovalError):
    """This person already approved; the approval waits for others (the quorum)."""

    def __init__(self, approval: Approval, name: str) -> None:
        super().__init__(f"{name} already approved {approval.id}; it waits for {approval.who_decides}")
        self.approval = approval


class ReasonRequired(ApprovalError, ValueError):
    def __init__(self) -> None:
        super().__init__("a reason is required to deny an approval")


@dataclass(frozen=True)
class Approval:
    id: str
    digest: str
    status: ApprovalStatus
    tool: str
    args: Any  # redacted
    identity: str
    session: str | None
    rule_id: str | None
    reason: str | None  # why the rule asks for approval
    created_at: float
    expires_at: float
    decided_at: float | None
    decided_by: str | None
    decision_note: str | None  # the approver's comment or the denier's reason
    used_at: float | None
    approvers: tuple[str, ...] | None = None  # names or roles; None: any approver
    quorum: int = 1
    escalate_after_s: float | None = None
    escalate_to: tuple[str, ...] = ()
    approvals_so_far: int = 0  # distinct approvals recorded while pending

    @property
    def who_decides(self) -> str:
        who = ", ".join(self.approvers) if self.approvers else "any approver"
        if self.escalate_to:
            who += " (or, after escalation, " + ", ".join(self.escalate_to) + ")"
        return f"{self.quorum} approval(s) from {who}"

    def may_decide(self, name: str, role: str | None) -> bool:
        """Whether ``name`` with ``role`` (``None``: the operator) may decide it."""
        return may_decide(self.approvers, self.escalate_to, name, role)

    @property
    def how_to_approve(self) -> str:
        return self.instructions()

    def instructions(self, inbox_url: str | None = None) -> str:
        """What the agent should ask its person to do: the exact CLI command and, when an
        inbox address is configured, the page to open. Only a person can approve."""
        if inbox_url:
            page = f"open {inbox_url.rstrip('/')}/approvals/{self.id} and approve it there"
        else:
            page = f"approve it in the inbox at /inbox/approvals/{self.id}"
        return (
            f"Ask a human to run `taskwarden approvals approve {self.id}` (or {page}), "
            "then call the tool again with the same arguments. No tool you can call approves it; "
            f"it stays pending for a person until {iso(self.expires_at)}."
        )

    def status_at(self, now: float) -> ApprovalStatus:
        """The status as a caller sees it at ``now``: unused approvals past ``expires_at`` are expired."""
        if self.status in (ApprovalStatus.PENDING, ApprovalStatus.APPROVED) and self.used_at is None:
            if now >= self.expires_at:
                return ApprovalStatus.EXPIRED
        return self.status

    def summary(self, inbox_url: str | None = None) -> dict[str, Any]:
        """The ``approval`` object of an approval outcome's structured content."""
        return {
            "id": self.id,
            "status": self.status.value,
            "expires_at": iso(self.expires_at),
            "how_to_approve": self.instructions(inbox_url),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready, times as ISO 8601 UTC."""
        return {
            "id": self.id,
            "status": self.status.value,
            "tool": self.tool,
            "args": self.args,
            "identity": self.identity,
            "session": self.session,
            "rule_id": self.rule_id,
            "reason": self.reason,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "decided_at": iso(self.decided_at),
            "decided_by": self.decided_by,
            "decision_note": self.decision_note,
            "used_at": iso(self.used_at),
            "approvers": list(self.approvers) if self.approvers else None,
            "quorum": self.quorum,
            "approvals_so_far": self.approvals_so_far,
            "escalate_after_s": self.escalate_after_s,
            "escalate_to": list(self.escalate_to),
            "digest": self.digest,
            "how_to_approve": self.how_to_approve,
        }


@dataclass(frozen=True)
class DecisionRecord:
    """One person's answer to an approval."""

    approval_id: str
    decided_by: str
    decision: str  # approve | deny
    channel: str  # cli | inbox | link | client
    comment: str | None
    decided_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"by": self.decided_by, "decision": self.decision, "channel": self.channel,
                "comment": self.comment, "at": iso(self.decided_at)}  # fmt: skip


_INSERT_COLUMNS = (
    "id, digest, status, tool, args, identity, session, rule_id, reason, created_at,"
    " expires_at, decided_at, decided_by, decision_note, used_at, approvers, quorum, escalate_after_s, escalate_to"
)
# The count of approvals so far rides along with every read.
_COLUMNS = (
    _INSERT_COLUMNS
    + ", (SELECT count(*) FROM guard_approval_decisions d WHERE d.approval_id = guard_approvals.id"
    " AND d.decision = 'approve')"
)


def _row(row: tuple[Any, ...]) -> Approval:
    (id_, digest, status, tool, args, identity, session, rule_id, reason, created_at,
     expires_at, decided_at, decided_by, note, used_at, approvers, quorum, escalate_after_s, escalate_to,
     so_far) = tuple(row)  # fmt: skip
    return Approval(
        approvers=tuple(json.loads(approvers)) if approvers else None,
        quorum=quorum,
        escalate_after_s=escalate_after_s,
        escalate_to=tuple(json.loads(escalate_to)) if escalate_to else (),
        approvals_so_far=so_far,
        id=id_,
        digest=digest,
        status=ApprovalStatus(status),
        tool=tool,
        args=json.loads(args),
        identity=identity,
        session=session,
        rule_id=rule_id,
        reason=reason,
        created_at=created_at,
        expires_at=expires_at,
        decided_at=decided_at,
        decided_by=decided_by,
        decision_note=note,
        used_at=used_at,
    )


def _get(c: Tx, approval_id: str) -> Approval | None:
    row = c.execute(f"SELECT {_COLUMNS} FROM guard_approvals WHERE id = ?", (approval_id,)).fetchone()
    return _row(row) if row else None


def _order(c: Tx) -> str:
    """The column that orders approvals created at the same instant (their insertion order)."""
    return "rowid" if c.dialect == "sqlite" else "seq"


def _new_id() -> str:
    return "apr_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


class ApprovalEvents(Protocol):
    """Told, inside the transaction that made it, that an approval opened (the
    host queues its notifications there: they commit or roll back with it)."""

    def opened(self, c: Tx, approval: Approval) -> None: ...


class Approvals:
    """The approvals stored in ``db``; ``feed`` (if given) is told about every change.

    ``digester`` keys the call digests (default: the database's own key file).
    ``events`` hears of every approval opened, in its transaction.
    """

    def __init__(
        self,
        db: Database,
        clock: Clock,
        feed: ChangeFeed | None = None,
        digester: Digester | None = None,
        events: ApprovalEvents | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        self._feed = feed
        self._digester = digester
        self._events = events

    async def digest(self, tool: str, args: Any, identity: str) -> str:
        """The digest an approval for this call is bound to (keyed: see ``guard.digests``)."""
        if self._digester is None:
            self._digester = await Digester.for_database(self._db)
        return self._digester.call(tool, args, identity)

    async def _notify(self) -> None:
        # Wakes calls waiting for a decision here and in other processes.
        if self._feed is not None:
            self._feed.notify()
        else:
            # No feed of our own (the CLI): wake the daemons through the database.
            await self._db.announce()

    # -- reading -----------------------------------------------------------

    async def get(self, approval_id: str) -> Approval | None:
        return await self._db.read(lambda c: _get(c, approval_id))

    async def find_usable(self, digest: str) -> Approval | None:
        """An approved, unused, unexpired approval for this call, oldest first."""
        now = self._clock.now()
        row = await self._db.read(
            lambda c: c.execute(
                f"SELECT {_COLUMNS} FROM guard_approvals WHERE digest = ? AND status = 'approved'"
                f" AND used_at IS NULL AND expires_at > ? ORDER BY created_at, {_order(c)} LIMIT 1",
                (digest, now),
            ).fetchone()
        )
        return _row(row) if row else None

    async def latest(self, digest: str) -> Approval | None:
        """The most recent approval for this call, to tell a retrying caller how it ended."""
        row = await self._db.read(
            lambda c: c.execute(
                f"SELECT {_COLUMNS} FROM guard_approvals WHERE digest = ?"
                f" ORDER BY created_at DESC, {_order(c)} DESC LIMIT 1",
                (digest,),
            ).fetchone()
        )
        return _row(row) if row else None

    async def list(self, status: ApprovalStatus | str | None = None) -> builtins.list[Approval]:
        """Approvals, newest first; only those with ``status`` if given."""
        if status is None:
            sql, params = f"SELECT {_COLUMNS} FROM guard_approvals", ()
        else:
            sql = f"SELECT {_COLUMNS} FROM guard_approvals WHERE status = ?"
            params = (ApprovalStatus(status).value,)
        rows = await self._db.read(
            lambda c: c.execute(sql + f" ORDER BY created_at DESC, {_order(c)} DESC", params).fetchall()
        )
        return [_row(r) for r in rows]

    # -- changing ----------------------------------------------------------

    async def open(
        self,
        digest: str,
        tool: str,
        args_redacted: Any,
        identity: str,
        session: str | None,
        rule_id: str | None,
        reason: str | None,
        expires_s: float,
        settings: ApprovalSettings | None = None,
    ) -> Approval:
        """The pending, unexpired approval for ``digest``, created if there is none.

        ``settings`` (the rule's) say who may decide and how many must agree."""
        settings = settings or ApprovalSettings()
        approvers_json = json.dumps(list(settings.approvers)) if settings.approvers else None
        escalate_json = json.dumps(list(settings.escalate_to)) if settings.escalate_to else None
        if expires_s <= 0:
            raise ValueError(f"expires_s must be > 0, not {expires_s}")
        # Redacted again: the inbox shows these, and redaction is idempotent.
        args_json = json.dumps(await redact_off_loop(args_redacted), ensure_ascii=False, default=str)

        def tx(c: Tx) -> tuple[Approval, bool]:
            now = self._clock.now()
            c.execute(
                "UPDATE guard_approvals SET status = 'expired'"
                " WHERE digest = ? AND status = 'pending' AND expires_at <= ?",
                (digest, now),
            )
            row = c.execute(
                f"SELECT {_COLUMNS} FROM guard_approvals WHERE digest = ? AND status = 'pending'"
                f" ORDER BY created_at, {_order(c)} LIMIT 1",
                (digest,),
            ).fetchone()
            if row:
                return _row(row), False
            while True:
                approval_id = _new_id()
                # ON CONFLICT rather than catching the error: on PostgreSQL a
                # failed statement would abort the whole transaction.
                inserted = c.execute(
                    f"INSERT INTO guard_approvals ({_INSERT_COLUMNS}) VALUES"
                    " (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL, ?, ?, ?, ?)"
                    " ON CONFLICT (id) DO NOTHING RETURNING id",
                    (approval_id, digest, tool, args_json, identity, session, rule_id,
                     reason, now, now + expires_s, approvers_json, settings.quorum,
                     settings.escalate_after_s, escalate_json),
                ).fetchone()  # fmt: skip
                if inserted is None:  # pragma: no cover - 50 random bits collided
                    continue
                created = _get(c, approval_id)
                assert created is not None
                if self._events is not None:
                    self._events.opened(c, created)
                return created, True

        approval, created = await self._db.write(tx)
        if created:
            logger.info("approval %s opened for %s by %s", approval.id, tool, identity)
            await self._notify()
        return approval

    async def consume(self, approval_id: str) -> bool:
        """Mark an approved, unused, unexpired approval used; False if it was not (another caller won)."""
        now = self._clock.now()
        changed = await self._db.write(
            lambda c: c.execute(
                "UPDATE guard_approvals SET used_at = ? WHERE id = ? AND status = 'approved'"
                " AND used_at IS NULL AND expires_at > ?",
                (now, approval_id, now),
            ).rowcount
        )
        return changed == 1

    async def acknowledge(self, approval_id: str) -> bool:
        """Mark a denied or expired approval as reported to its caller (sets ``used_at``).

        The caller is told "denied" or "expired" once; the next identical call
        opens a new approval. Atomic like ``consume``: True only for the one
        caller that marked it. A pending one past its time is marked expired too.
        """
        now = self._clock.now()
        changed = await self._db.write(
            lambda c: c.execute(
                "UPDATE guard_approvals SET used_at = ?,"
                " status = CASE WHEN status IN ('pending', 'approved') THEN 'expired' ELSE status END"
                " WHERE id = ? AND used_at IS NULL"
                " AND (status IN ('denied', 'expired') OR expires_at <= ?)",
                (now, approval_id, now),
            ).rowcount
        )
        return changed == 1

    async def decisions(self, approval_id: str) -> builtins.list[DecisionRecord]:
        """Every decision recorded on an approval, oldest first."""
        rows = await self._db.read(
            lambda c: c.execute(
                "SELECT approval_id, decided_by, decision, channel, comment, decided_at"
                " FROM guard_approval_decisions WHERE approval_id = ? ORDER BY decided_at, decided_by",
                (approval_id,),
            ).fetchall()
        )
        return [DecisionRecord(*tuple(r)) for r in rows]

    async def decide(
        self,
        approval_id: str,
        approve: bool,
        by: str,
        note: str | None = None,
        *,
        channel: str = "cli",
        role: str | None = None,
        check: Callable[[Tx], None] | None = None,
    ) -> Approval:
        """Record ``by``'s approval or denial of a pending approval.

        A denial denies at once; approvals count until the rule's quorum is
        met, which approves. ``role`` is the decider's role (``None``: the
        operator, who may decide anything). ``check``, if given, runs in the
        transaction first (a signed link spends itself there) and may raise.

        Raises ``ReasonRequired`` for a denial without a reason,
        ``ApprovalNotFound``, ``NotAnApprover``, ``AlreadyDecided`` (this
        person approved already), ``ApprovalNotPending`` if it was already
        decided or expired, and ``ApprovalExpired`` if its time ran out just
        now (it is then marked expired).
        """
        note = note.strip() if note else None
        if not approve and not note:
            raise ReasonRequired()
        if not by or not by.strip():
            raise ValueError("the decider's name must not be empty")
        by = by.strip()

        def tx(c: Tx) -> tuple[Approval | None, ApprovalError | None]:
            now = self._clock.now()
            current = _get(c, approval_id)
            if current is None:
                return None, ApprovalNotFound(approval_id)
            if current.status is not ApprovalStatus.PENDING:
                return None, ApprovalNotPending(current)
            if now >= current.expires_at:
                c.execute("UPDATE guard_approvals SET status = 'expired' WHERE id = ?", (approval_id,))
                expired = _get(c, approval_id)
                assert expired is not None
                return expired, ApprovalExpired(expired)
            if not current.may_decide(by, role):
                return None, NotAnApprover(current, by)
            mine = c.execute(
                "SELECT decision FROM guard_approval_decisions WHERE approval_id = ? AND lower(decided_by) = lower(?)",
                (approval_id, by),
            ).fetchone()
            if mine is not None:
                return None, AlreadyDecided(current, by)
            if check is not None:
                check(c)
            c.execute(
                "INSERT INTO guard_approval_decisions (approval_id, decided_by, decision, channel, comment, decided_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (approval_id, by, "approve" if approve else "deny", channel, note, now),
            )
            if approve:
                rows = c.execute(
                    "SELECT decided_by, comment FROM guard_approval_decisions"
                    " WHERE approval_id = ? AND decision = 'approve' ORDER BY decided_at, decided_by",
                    (approval_id,),
                ).fetchall()
                if len(rows) < current.quorum:
                    return _get(c, approval_id), None  # still pending: more must agree
                decided_by = ", ".join(r[0] for r in rows)
                comments = [f"{r[0]}: {r[1]}" if len(rows) > 1 else r[1] for r in rows if r[1]]
                status, final_note = ApprovalStatus.APPROVED, "; ".join(comments) or None
            else:
                status, decided_by, final_note = ApprovalStatus.DENIED, by, note
            c.execute(
                "UPDATE guard_approvals SET status = ?, decided_at = ?, decided_by = ?,"
                " decision_note = ? WHERE id = ? AND status = 'pending'",
                (status.value, now, decided_by, final_note, approval_id),
            )
            return _get(c, approval_id), None

        approval, error = await self._db.write(tx)
        if approval is not None:  # something changed: decided, counted, or marked expired
            await self._notify()
        if error is not None:
            raise error
        assert approval is not None
        logger.info("approval %s: %s by %s via %s (now %s)", approval.id, "approve" if approve else "deny",
                    by, channel, approval.status.value)  # fmt: skip
        return approval

    async def expire_due(self) -> int:
        """Mark pending approvals past ``expires_at`` expired; returns how many."""
        now = self._clock.now()
        count = await self._db.write(
            lambda c: c.execute(
                "UPDATE guard_approvals SET status = 'expired' WHERE status = 'pending' AND expires_at <= ?",
                (now,),
            ).rowcount
        )
        if count:
            await self._notify()
        return count
