"""Bodies of the ``taskwarden approvals`` and ``taskwarden audit`` verbs.

The CLI parses argv and runs these coroutines (``anyio.run``, asyncio
backend); each opens the database, writes what a human reads to ``out`` and
returns the exit code: 0 done, 1 the action could not be done (unknown id,
already decided, expired), 2 bad input. ``audit(follow=True)`` runs until
cancelled — Ctrl-C surfaces as ``KeyboardInterrupt`` from ``anyio.run``, which
the CLI treats as a normal end.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TextIO

import anyio

from guard.approvals import Approval, ApprovalError, Approvals, ReasonRequired
from guard.audit import AuditEntry, AuditLog, InvalidDecision, parse_decision
from guard.storage.clock import Clock, SystemClock, iso
from guard.storage.database import Database
from guard.schema import open_guard_db
from guard.times import InvalidSince, parse_since

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# `taskwarden audit` shows at most this many of the newest matching rows.
RECENT_ROWS = 200
_PAGE = 1000

# -- approvals ----------------------------------------------------------------


async def approvals_list(
    db_path: str | Path, as_json: bool, out: TextIO, *, clock: Clock | None = None
) -> int:
    """Print every approval, newest first (pending ones past their time are marked expired first)."""
    clock = clock or SystemClock()

    async def run(db: Database) -> int:
        approvals = Approvals(db, clock)
        await approvals.expire_due()
        items = await approvals.list()
        if as_json:
            rows = [{**a.to_dict(), "decisions": [d.to_dict() for d in await approvals.decisions(a.id)]}
                    for a in items]  # fmt: skip
            out.write(json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
            return EXIT_OK
        if not items:
            out.write("no approvals\n")
            return EXIT_OK
        now = clock.now()
        out.write(_approval_header())
        for approval in items:
            out.write(_approval_line(approval, now))
        if any(a.status_at(now) == "pending" for a in items):
            out.write("\napprove: taskwarden approvals approve ID [--comment TEXT]\n")
            out.write("deny:    taskwarden approvals deny ID --reason TEXT\n")
        return EXIT_OK

    return await _with_db(db_path, run)


#: The role of a person by name (None: no such person, the operator at the
#: terminal), read from ``db``; the host application supplies it.
RoleOf = Callable[[Database, str], Awaitable["str | None"]]


async def _no_roles(db: Database, name: str) -> str | None:
    return None


async def approvals_approve(
    db_path: str | Path,
    approval_id: str,
    as_name: str | None,
    comment: str | None,
    out: TextIO,
    *,
    clock: Clock | None = None,
    role_of: RoleOf = _no_roles,
) -> int:
    """Approve a pending approval as ``as_name`` (default: the OS user).

    A registered person decides within their role (``role_of``); a name that
    is nobody's is the operator at the terminal, who may decide anything."""
    by = as_name or _os_user()
    clock = clock or SystemClock()

    async def run(db: Database) -> int:
        try:
            role = await role_of(db, by)
            approval = await Approvals(db, clock).decide(approval_id, True, by, comment, channel="cli", role=role)
        except ApprovalError as exc:
            out.write(f"error: {exc}\n")
            return EXIT_FAILED
        if approval.status == "pending":
            out.write(
                f"approval recorded for {approval.id} by {by}: {approval.approvals_so_far} of {approval.quorum}; "
                "the call stays held until enough approvers agree.\n"
            )
            return EXIT_OK
        out.write(
            f"approved {approval.id}: {approval.tool} for {approval.identity} (by {approval.decided_by}). "
            f"Its next identical call will run, until {iso(approval.expires_at)}.\n"
        )
        return EXIT_OK

    return await _with_db(db_path, run)


async def approvals_deny(
    db_path: str | Path,
    approval_id: str,
    reason: str | None,
    out: TextIO,
    *,
    by: str | None = None,
    clock: Clock | None = None,
    role_of: RoleOf = _no_roles,
) -> int:
    """Deny a pending approval as ``by`` (default: the OS user).

    ``reason`` is required; the caller is shown it."""
    if not reason or not reason.strip():
        out.write("error: a reason is required: taskwarden approvals deny ID --reason TEXT\n")
        return EXIT_USAGE
    by = by or _os_user()
    clock = clock or SystemClock()

    async def run(db: Database) -> int:
        try:
            role = await role_of(db, by)
            approval = await Approvals(db, clock).decide(approval_id, False, by, reason, channel="cli", role=role)
        except ReasonRequired as exc:  # pragma: no cover - checked above
            out.write(f"error: {exc}\n")
            return EXIT_USAGE
        except ApprovalError as exc:
            out.write(f"error: {exc}\n")
            return EXIT_FAILED
        out.write(
            f"denied {approval.id}: {approval.tool} for {approval.identity} "
            f"(by {approval.decided_by}): {approval.decision_note}\n"
        )
        return EXIT_OK

    return await _with_db(db_path, run)


# -- audit --------------------------------------------------------------------


class _Stop(Protocol):
    def is_set(self) -> bool: ...


async def audit(
    db_path: str | Path,
    as_json: bool,
    since: str | None,
    tool: str | None,
    decision: str | None,
    follow: bool,
    out: TextIO,
    *,
    limit: int = RECENT_ROWS,
    clock: Clock | None = None,
    poll_interval_s: float = 0.25,
    stop: _Stop | None = None,
) -> int:
    """Print the newest ``limit`` matching audit rows, oldest first; with ``follow``, then
    every new matching row as it is written, until cancelled (or ``stop`` is set).

    ``since``: ISO 8601 (UTC unless it names an offset) or an age such as ``10m``, ``2h``, ``1d``.
    """
    clock = clock or SystemClock()
    try:
        since_ts = parse_since(since, clock.now()) if since else None
        decision = parse_decision(decision) if decision else None
    except InvalidSince as exc:
        out.write(f"error: --since: {exc}\n")
        return EXIT_USAGE
    except InvalidDecision as exc:
        out.write(f"error: {exc}\n")
        return EXIT_USAGE

    async def run(db: Database) -> int:
        log = AuditLog(db, clock)
        printed_header = False
        last_id: int | None = None

        def emit(entries: list[AuditEntry]) -> None:
            nonlocal printed_header, last_id
            for entry in entries:
                if as_json:
                    out.write(json.dumps(entry.to_dict(), ensure_ascii=False) + "\n")
                else:
                    if not printed_header:
                        out.write(_audit_header())
                        printed_header = True
                    out.write(_audit_line(entry))
                last_id = entry.id
            out.flush()

        # Read before the first page, so no row falls between it and the follow.
        newest = await log.query(limit=1, newest=True) if follow else []
        emit(await log.query(since=since_ts, tool=tool, decision=decision, limit=limit, newest=True))
        if not follow:
            if last_id is None and not as_json:
                out.write("no audit records\n")
            return EXIT_OK
        if last_id is None:  # nothing matched yet: follow from the newest row of any kind
            last_id = newest[0].id if newest else 0
        while stop is None or not stop.is_set():
            emit(await log.query(since=since_ts, tool=tool, decision=decision, limit=_PAGE, after_id=last_id))
            # A short poll: this process has no share in the server's change feed.
            await anyio.sleep(poll_interval_s)
        return EXIT_OK

    return await _with_db(db_path, run)


async def budgets(db_path: str | Path, as_json: bool, out: TextIO, clock: Clock | None = None) -> int:
    """``taskwarden budgets``: each budget's use per scope key in its window, and recent crossings."""
    from guard.budgets import METRICS, BudgetLedger

    async def run(db: Database) -> int:
        ledger = BudgetLedger(db, clock or SystemClock())
        uses = await ledger.report()
        overruns = await ledger.overruns()
        if as_json:
            for use in uses:
                t = use.target
                limits = {m: t.limit(m) for m in METRICS if t.limit(m) is not None}
                out.write(json.dumps({"budget": t.name, "rule": t.rule_id, "scope": t.scope, "key": t.scope_value,
                                      "window_s": t.window_s, "limits": limits,
                                      "used": {m: use.used[m] for m in limits}}) + "\n")
            return EXIT_OK
        if not uses:
            out.write("no budget has been charged yet\n")
        for use in uses:
            t = use.target
            key = t.scope_value if t.scope != "global" else "(everyone)"
            shown = "; ".join(t.describe(m, use.used[m]) for m in METRICS if t.limit(m) is not None)
            out.write(f"{t.name} [{t.scope} {key}]: {shown}\n")
        if overruns:
            out.write("recent crossings:\n")
            for o in overruns:
                what = "would have stopped (shadow)" if o["shadow"] else "stopped"
                out.write(f"  {iso(o['at'])} {o['budget']} [{o['scope_value'] or '(everyone)'}] {what} "
                          f"{o['task'] or ''}: {o['message']}\n")
        return EXIT_OK

    return await _with_db(db_path, run)


async def budget_state(db_path: str | Path, targets: Any, clock: Clock | None = None) -> list[str]:
    """What each budget key has used now, one line each (for ``policy explain``)."""
    from guard.budgets import METRICS, BudgetLedger

    lines: list[str] = []

    async def run(db: Database) -> int:
        for use in await BudgetLedger(db, clock or SystemClock()).uses(targets):
            t = use.target
            shown = "; ".join(t.describe(m, use.used[m]) for m in METRICS if t.limit(m) is not None)
            lines.append(f"{t.name} [{t.scope} {t.scope_value or '(everyone)'}]: used {shown}")
        return EXIT_OK

    await _with_db(db_path, run)
    return lines


# -- helpers ------------------------------------------------------------------


async def _with_db(db_path: str | Path, body: Callable[[Database], Awaitable[int]]) -> int:
    db = await open_guard_db(db_path)
    try:
        return await body(db)
    finally:
        with anyio.CancelScope(shield=True):
            await db.close()


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no $USER
        return "unknown"


def _cut(text: Any, width: int) -> str:
    text = "" if text is None else str(text)
    text = " ".join(text.split())  # one line per row
    return text if len(text) <= width else text[: width - 1] + "…"


def _approval_header() -> str:
    return (
        f"{'ID':<14}  {'STATUS':<14}  {'TOOL':<18}  {'IDENTITY':<14}  {'CREATED':<24}  "
        f"{'EXPIRES':<24}  {'DECIDED BY':<14}  ARGS\n"
    )


def _approval_line(a: Approval, now: float) -> str:
    status = a.status_at(now).value + (", used" if a.used_at is not None else "")
    args = json.dumps(a.args, ensure_ascii=False, separators=(",", ":"))
    return (
        f"{a.id:<14}  {status:<14}  {_cut(a.tool, 18):<18}  {_cut(a.identity, 14):<14}  "
        f"{iso(a.created_at):<24}  {iso(a.expires_at):<24}  {_cut(a.decided_by or '-', 14):<14}  "
        f"{_cut(args, 80)}\n"
    )


def _audit_header() -> str:
    return (
        f"{'TIME':<24}  {'DECISION':<24}  {'TOOL':<18}  {'IDENTITY':<14}  {'OUTCOME':<14}  "
        f"{'MS':>8}  {'RULE':<18}  DETAIL\n"
    )


def _audit_line(e: AuditEntry) -> str:
    ms = f"{e.duration_ms:.1f}" if e.duration_ms is not None else "-"
    detail = e.reason or ""
    if e.approval_id:
        detail = f"{detail} [{e.approval_id}]".strip()
    return (
        f"{iso(e.time):<24}  {e.decision:<24}  {_cut(e.tool, 18):<18}  {_cut(e.identity, 14):<14}  "
        f"{_cut(e.outcome or '-', 14):<14}  {ms:>8}  {_cut(e.rule or '-', 18):<18}  {_cut(detail, 100)}"
    ).rstrip() + "\n"
