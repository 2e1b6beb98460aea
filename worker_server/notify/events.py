"""Which changes notify whom; each is queued in the transaction of its change.

| event | when | who |
|---|---|---|
| ``task_posted`` | a human task is posted | everyone (any role may claim) |
| ``question_answered`` | the agent answers a person's question | who claimed it |
| ``changes_requested`` | the agent sends a hand-in back | who claimed it |
| ``claimed_task_ended`` | a claimed task is cancelled or expires | who claimed it |
| ``approval_pending`` | a call is held for approval | those who may decide it |
| ``approval_expiring`` | a pending approval expires within ``expiring_warn_s`` | those who may decide it |
| ``approval_escalated`` | nobody decided within ``escalate_after_s`` | the rule's ``escalate_to`` |

Every event also goes to the team channels of ``[notify]`` (if set). Each
person gets it on each of their channels (e-mail, webhook); a person with
none is not notified (the inbox still shows it).
"""

from __future__ import annotations

import json
from typing import Any

from guard.approvals import Approval
from guard.approvers import has_role, is_role, may_decide
from guard.storage.clock import Clock, iso
from guard.storage.database import Tx
from worker_server.config import Settings
from worker_server.inbox.accounts import Person, people
from worker_server.notify.outbox import enqueue
from worker_server.store import TaskEvent
from worker_server.task import TaskStatus

TEAM = "(team)"
MAX_BRIEF = 2000


class Notices:
    """The hooks: ``task_events`` (the store's) and ``opened`` (the guard's approvals)."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.inbox_url = settings.inbox_url.rstrip("/")

    # -- where ---------------------------------------------------------------

    def _queue(
        self, c: Tx, key: str, kind: str, to: list[Person], payload: dict[str, Any]
    ) -> int:
        now = self.clock.now()
        count = 0
        for person in to:
            for channel, target in (("email", person.email), ("webhook", person.webhook)):
                if target:
                    count += enqueue(c, now, event_key=key, kind=kind, recipient=person.name, channel=channel,
                                     target=target, payload={**payload, "recipient": person.name})  # fmt: skip
        team = self.settings.notify
        for channel, target in (("email", team.email), ("webhook", team.webhook)):
            if target:
                count += enqueue(c, now, event_key=key, kind=kind, recipient=TEAM, channel=channel, target=target,
                                 payload={**payload, "recipient": None})  # fmt: skip
        return count

    # -- tasks -----------------------------------------------------------------

    def task_events(self, c: Tx, events: list[TaskEvent]) -> None:
        for event in events:
            row = c.execute(
                "SELECT kind, title, prompt, claimed_by, status_message, turn FROM tasks WHERE id = ?",
                (event.task_id,),
            ).fetchone()
            if row is None or row[0] != "human":
                continue
            _, title, prompt, claimed_by, status_message, turn = tuple(row)
            link = f"{self.inbox_url}/tasks/{event.task_id}"
            base = {"task_id": event.task_id, "link": link, "task_title": title}
            data = event.data
            if event.type == "created" and turn == 1:
                self._queue(c, f"task_posted:{event.task_id}", "task_posted", people(c), {
                    **base, "title": f"New task for people: {title}",
                    "text": "An agent posted a task; claim it in the inbox.", "brief": prompt[:MAX_BRIEF],
                })  # fmt: skip
                continue
            if event.type != "status" or not claimed_by:
                continue
            claimer = [p for p in people(c) if p.name.casefold() == claimed_by.casefold()]
            status, came_from, was = data.get("status"), data.get("from"), data.get("was")
            if status == TaskStatus.WORKING and came_from == TaskStatus.INPUT_REQUIRED and was in ("question", "review"):
                kind = "question_answered" if was == "question" else "changes_requested"
                what = "The agent answered your question" if was == "question" else "The agent asked for changes"
                last = c.execute(
                    "SELECT id, body FROM messages WHERE task_id = ? AND author = 'agent' ORDER BY seq DESC LIMIT 1",
                    (event.task_id,),
                ).fetchone()
                key = f"{kind}:{event.task_id}:{last[0] if last else ''}"
                self._queue(c, key, kind, claimer, {
                    **base, "title": f"{what}: {title}", "text": f"{what} on a task you claimed.",
                    "brief": (last[1] if last else "")[:MAX_BRIEF],
                })  # fmt: skip
            elif status in (TaskStatus.CANCELLED, TaskStatus.FAILED):
                ended = "was cancelled" if status == TaskStatus.CANCELLED else f"ended ({status_message or status})"
                self._queue(c, f"claimed_task_ended:{event.task_id}", "claimed_task_ended", claimer, {
                    **base, "title": f"A task you claimed {ended}: {title}",
                    "text": f"The task {ended}; there is nothing more to do on it.", "brief": status_message or "",
                })  # fmt: skip

    # -- approvals -------------------------------------------------------------

    def _approval_payload(self, a: Approval, title: str, text: str) -> dict[str, Any]:
        args = json.dumps(a.args, ensure_ascii=False, separators=(",", ":"))
        return {
            "approval_id": a.id, "link": f"{self.inbox_url}/approvals/{a.id}", "title": title, "text": text,
            "brief": f"{a.tool} {args[:MAX_BRIEF]}", "expires_at": iso(a.expires_at), "decide": True,
        }  # fmt: skip

    def opened(self, c: Tx, approval: Approval) -> None:
        """``guard.approvals.ApprovalEvents``: a call was held for approval."""
        deciders = [p for p in people(c) if may_decide(approval.approvers, (), p.name, p.role)]
        self._queue(c, f"approval_pending:{approval.id}", "approval_pending", deciders, self._approval_payload(
            approval, f"Approval needed: {approval.tool} (asked by {approval.identity})",
            f"{approval.reason or 'The policy asks a person to approve this call.'} "
            f"Needs {approval.who_decides}; expires {iso(approval.expires_at)}.",
        ))  # fmt: skip

    def due_timed(self, pending: list[Approval]) -> tuple[list[tuple[str, Approval]], float | None]:
        """The expiring-soon and escalation notices due now (as (event key, approval)), and
        when the next one falls due. Reads nothing: the caller queues them with ``queue_timed``."""
        now = self.clock.now()
        warn = self.settings.notify.expiring_warn_s
        due: list[tuple[str, Approval]] = []
        upcoming: list[float] = []
        for a in pending:
            if a.expires_at <= now:
                continue
            if a.expires_at - warn <= now:
                due.append((f"approval_expiring:{a.id}", a))
            else:
                upcoming.append(a.expires_at - warn)
            if a.escalate_after_s is not None and a.escalate_to:
                at = a.created_at + a.escalate_after_s
                if at <= now:
                    due.append((f"approval_escalated:{a.id}", a))
                else:
                    upcoming.append(at)
        return due, (min(upcoming) if upcoming else None)

    def queue_timed(self, c: Tx, due: list[tuple[str, Approval]]) -> None:
        """Queue notices from ``due_timed`` in the caller's transaction (each once: see ``enqueue``)."""
        everyone = people(c)
        for key, a in due:
            if key.startswith("approval_expiring:"):
                deciders = [p for p in everyone if a.may_decide(p.name, p.role)]
                self._queue(c, key, "approval_expiring", deciders, self._approval_payload(
                    a, f"Approval expires soon: {a.tool} (asked by {a.identity})",
                    f"Nobody has decided yet; it expires {iso(a.expires_at)} and the call is then refused.",
                ))  # fmt: skip
            else:
                group = [p for p in everyone if _in_group(a.escalate_to, p)]
                self._queue(c, key, "approval_escalated", group, self._approval_payload(
                    a, f"Escalated: approval needed for {a.tool} (asked by {a.identity})",
                    f"Nobody decided within {a.escalate_after_s:g} s. {a.reason or ''}".strip(),
                ))  # fmt: skip


def _in_group(entries: tuple[str, ...], person: Person) -> bool:
    for entry in entries:
        if is_role(entry) and has_role(person.role, entry):
            return True
        if not is_role(entry) and entry.casefold() == person.name.casefold():
            return True
    return False
