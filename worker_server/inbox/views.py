"""What the inbox pages (and ``taskwarden humans inbox``) show: data, not HTML.

The inbox shows human tasks only. Its tabs:

- **needs reply** — tasks *you* claimed that are back with you: in progress,
  and the latest message on the thread is the agent's (it answered your
  question, asked for changes, or wrote to you);
- **open** — posted, nobody has claimed them yet (``queued``);
- **in progress** — claimed by anyone: being worked on (``working``), or
  waiting for the agent (``input_required``: a question or a hand-in);
- **approvals** — tool calls the guard holds for a human (pending approvals),
  only those the signed-in person may decide (their role, the rule's approvers);
- **done** — completed, failed (expired) or cancelled, newest first.

"needs reply" is a view of "in progress" for you, so a task can be counted in
both.
"""

from __future__ import annotations

import builtins
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from guard.approvals import Approval, ApprovalStatus
from guard.audit import DECISIONS, AuditEntry, InvalidDecision, parse_decision
from guard.times import InvalidSince, parse_since
from worker_server.store import MessageRow, TaskRow
from worker_server.task import TaskStatus

if TYPE_CHECKING:
    from worker_server.inbox.deps import InboxDeps as App

S = TaskStatus
HUMAN = "human"
TABS: list[tuple[str, str]] = [
    ("needs_reply", "Needs reply"),
    ("open", "Open"),
    ("in_progress", "In progress"),
    ("approvals", "Approvals"),
    ("done", "Done"),
]
TAB_NAMES = {key for key, _ in TABS}
# Rows shown per tab, and on the audit page.
LIMIT = 200
DONE_LIMIT = 50
AUDIT_LIMIT = 200


@dataclass(frozen=True)
class TaskItem:
    task: TaskRow
    note: str  # one line: who has it, what it waits for
    needs_you: bool = False


@dataclass
class InboxPage:
    tab: str
    counts: dict[str, int]
    tasks: list[TaskItem] = field(default_factory=list)
    approvals: list[Approval] = field(default_factory=list)


@dataclass(frozen=True)
class TaskPage:
    task: TaskRow
    thread: list[MessageRow]
    me: str
    can_claim: bool
    can_work: bool  # ask a question, hand in, release (the claimer, while working)
    can_reply: bool  # anyone, while the task is open
    waiting_for: str | None  # what the task waits on, in words
    # What the task used and changed, and the spend budgets it counts against: (label, text).
    facts: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class AuditPage:
    entries: list[AuditEntry]
    filters: dict[str, str]
    error: str | None = None
    decisions: tuple[str, ...] = ()


def when(ts: float | None) -> str:
    """A time as people read it: ``2024-05-01 12:00:05 UTC``."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _last_word(thread: list[MessageRow]) -> MessageRow | None:
    """The latest message from the agent or a person (system notes do not count)."""
    for message in reversed(thread):
        if message.author != "system":
            return message
    return None


async def _human_tasks(app: App, *statuses: TaskStatus, limit: int = LIMIT) -> list[TaskRow]:
    rows: list[TaskRow] = []
    for status in statuses:
        page, _ = await app.store.list(status=status.value, worker=HUMAN, limit=limit)
        rows.extend(r for r in page if r.kind == "human")
    rows.sort(key=lambda r: r.seq, reverse=True)
    return rows[:limit]


async def _back_with_claimer(app: App, rows: list[TaskRow]) -> dict[str, bool]:
    """For working tasks: is the latest word on the thread the agent's?"""
    result: dict[str, bool] = {}
    for row in rows:
        if row.status == S.WORKING and row.claimed_by:
            last = _last_word(await app.store.messages(row.id))
            result[row.id] = last is not None and last.author == "agent"
    return result


def _note(row: TaskRow, me: str | None, agent_replied: bool) -> str:
    who = "you" if row.claimed_by and row.claimed_by == me else row.claimed_by
    if row.status == S.QUEUED:
        return "open — nobody has claimed it"
    if row.status == S.WORKING:
        if agent_replied:
            return f"the agent replied — claimed by {who}"
        return f"in progress — claimed by {who}"
    if row.status == S.INPUT_REQUIRED:
        kind = (row.pending or {}).get("kind")
        what = "an answer to the question" if kind == "question" else "the agent's review of the hand-in"
        return f"waiting for {what} — claimed by {who}"
    return row.status.value + (f" ({row.status_message})" if row.status_message else "")


async def pending_approvals(app: App, me: str | None = None, role: str | None = None) -> list[Approval]:
    """Pending approvals; with ``me``, only those ``me`` (with ``role``) may decide."""
    now = app.store.clock.now()
    return [
        a for a in await app.guard.approvals.list(ApprovalStatus.PENDING)
        if a.status_at(now) == ApprovalStatus.PENDING and (me is None or a.may_decide(me, role))
    ]  # fmt: skip


async def inbox_page(app: App, me: str, tab: str, role: str = "worker") -> InboxPage:
    """The inbox on ``tab``; with no tab asked for, the first tab with something in it."""
    active = await _human_tasks(app, S.WORKING, S.INPUT_REQUIRED)
    replied = await _back_with_claimer(app, active)
    needs = [r for r in active if r.status == S.WORKING and r.claimed_by == me and replied.get(r.id)]
    queued = await _human_tasks(app, S.QUEUED)
    approvals = await pending_approvals(app, me, role)
    done = await _human_tasks(app, S.COMPLETED, S.FAILED, S.CANCELLED, limit=DONE_LIMIT)
    counts = {
        "needs_reply": len(needs),
        "open": len(queued),
        "in_progress": len(active),
        "approvals": len(approvals),
        "done": len(done),
    }
    if tab not in TAB_NAMES:
        tab = next((key for key, _ in TABS if counts[key]), "needs_reply")
    page = InboxPage(tab=tab, counts=counts)
    chosen = {"needs_reply": needs, "open": queued, "in_progress": active, "done": done}.get(tab)
    if chosen is not None:
        yours = {r.id for r in needs}
        page.tasks = [TaskItem(r, _note(r, me, replied.get(r.id, False)), needs_you=r.id in yours) for r in chosen]
    else:
        page.approvals = approvals
    return page


async def task_page(app: App, me: str, row: TaskRow) -> TaskPage:
    thread = await app.store.messages(row.id)
    open_ = row.status in (S.QUEUED, S.WORKING, S.INPUT_REQUIRED)
    mine = row.claimed_by == me
    waiting_for = None
    if row.status == S.INPUT_REQUIRED:
        kind = (row.pending or {}).get("kind")
        waiting_for = "the agent's answer to the question" if kind == "question" else "the agent's review of the hand-in"
    return TaskPage(
        task=row,
        thread=thread,
        me=me,
        can_claim=row.status == S.QUEUED,
        can_work=row.status == S.WORKING and mine,
        can_reply=open_,
        waiting_for=waiting_for,
        facts=await _task_facts(app, row),
    )


async def _task_facts(app: App, row: TaskRow) -> list[tuple[str, str]]:
    """Usage, changes, worktree and budget state, each only when the task has it."""
    from guard.budgets import METRICS, BudgetTarget

    facts: list[tuple[str, str]] = []
    if row.usage:
        facts.append(("Usage", ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in row.usage.items() if v is not None)))
    if row.changes:
        c = row.changes
        files = ", ".join(f"{f['path']} ({f['status']})" for f in c.get("files", [])[:20])
        more = " and more" if c.get("truncated") or len(c.get("files", [])) > 20 else ""
        facts.append(("Changes", f"+{c.get('insertions', 0)} -{c.get('deletions', 0)}: {files}{more}"))
    if row.worktree:
        facts.append(("Worktree", f"{row.worktree} (branch {row.branch})"))
    targets = [BudgetTarget.from_json(t) for t in row.budgets or []]
    if targets:
        for use in await app.guard.budgets.uses(targets):
            t = use.target
            shown = "; ".join(t.describe(m, use.used[m]) for m in METRICS if t.limit(m) is not None)
            facts.append(("Budget", f"{t.name}: used {shown}"))
    return facts


async def audit_page(app: App, filters: dict[str, str]) -> AuditPage:
    clean = {k: (filters.get(k) or "").strip() for k in ("tool", "decision", "identity", "since")}
    page = AuditPage(entries=[], filters=clean, decisions=DECISIONS)
    try:
        since = parse_since(clean["since"], app.store.clock.now()) if clean["since"] else None
        decision = parse_decision(clean["decision"]) if clean["decision"] else None
    except (InvalidSince, InvalidDecision) as exc:
        page.error = str(exc)
        return page
    entries = await app.guard.audit.query(
        since=since,
        tool=clean["tool"] or None,
        decision=decision,
        identity=clean["identity"] or None,
        limit=AUDIT_LIMIT,
        newest=True,
    )
    entries.reverse()  # newest first on the page
    page.entries = entries
    return page


async def needs_person(app: App) -> builtins.list[str]:
    """One line per thing a person should look at, for ``taskwarden humans inbox``."""
    lines: list[str] = []
    active = await _human_tasks(app, S.WORKING)
    replied = await _back_with_claimer(app, active)
    for row in active:
        if replied.get(row.id):
            lines.append(f"{row.id}  agent replied, claimed by {row.claimed_by}  {row.title}")
    for row in reversed(await _human_tasks(app, S.QUEUED)):  # oldest first: claim those first
        deadline = f" (due {when(row.deadline)})" if row.deadline else ""
        lines.append(f"{row.id}  open, unclaimed  {row.title}{deadline}")
    for approval in await pending_approvals(app):
        args = _one_line(approval.args)
        lines.append(f"{approval.id}  approval pending  {approval.tool} {args} (asked by {approval.identity})")
    return lines


def _one_line(value: Any, width: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return text if len(text) <= width else text[: width - 1] + "…"
