"""Human workers: tasks for people, their message threads and reviews.

A human task moves: queued (posted) → working (a person claimed it) →
input_required (they asked a question, or handed in a result) → working
again (the agent answered, or asked for changes) → completed (the agent
accepted). Past its deadline it fails as ``expired``. Only the person who
claimed a task can ask, hand in or release it; anyone may reply on an open
thread. Message bodies are stored as given; whatever shows them to a person
sanitises them first.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import anyio

from guard.storage.changes import ChangeFeed
from worker_server.config import Settings
from worker_server.service import Caller, InvalidArgument
from worker_server.store import MessageRow, Store, TaskNotFound, TaskRow, TransitionRefused
from worker_server.task import Message, MessageList, TaskStatus

logger = logging.getLogger(__name__)

S = TaskStatus
OPEN = (S.QUEUED, S.WORKING, S.INPUT_REQUIRED)


class Humans:
    def __init__(self, store: Store, feed: ChangeFeed, settings: Settings) -> None:
        self.store = store
        self.feed = feed
        self.settings = settings

    async def _step(self, task_id: str, **kwargs: Any) -> tuple[TaskRow, MessageRow | None]:
        try:
            return await self.store.human_step(task_id, **kwargs)
        except TaskNotFound:
            raise InvalidArgument("task_id", f"no task {task_id!r}") from None
        except TransitionRefused as exc:
            raise InvalidArgument("task_id", str(exc)) from None

    # -- the agent's side ----------------------------------------------------

    async def send(self, caller: Caller, task_id: str, body: str) -> Message:
        """Post to the thread; an answer to a pending question puts the person back to work."""
        from worker_server.service import message_view

        if not body.strip():
            raise InvalidArgument("body", "must not be empty (1..20000 characters)")
        task = await self._task(task_id)
        message = {"author": "agent", "author_name": caller.identity, "kind": "message", "body": body}
        if task.status == S.INPUT_REQUIRED and (task.pending or {}).get("kind") == "question":
            _, posted = await self._step(
                task_id,
                allowed=[S.INPUT_REQUIRED],
                wanted="its question was already answered",
                status=S.WORKING,
                message=message,
            )
        elif task.status in OPEN:
            posted = await self.store.post_message(task_id, **message)
        else:
            raise InvalidArgument("task_id", f"task {task_id} is {task.status.value}; its thread is closed")
        assert posted is not None
        return message_view(posted)

    async def agent_message(self, caller: Caller, task: TaskRow, message: str) -> TaskRow:
        """message-task on a human task: the same as send-task-message, returning the task."""
        await self.send(caller, task.id, message)
        return await self.store.get(task.id)

    async def list(self, task_id: str, since: str | None) -> MessageList:
        from worker_server.service import message_view

        await self._task(task_id)
        try:
            rows = await self.store.messages(task_id, since=since, mark_read_from="human")
        except KeyError:
            raise InvalidArgument("since", f"no message {since!r} in task {task_id}") from None
        return MessageList(messages=[message_view(m) for m in rows])

    async def review(
        self, caller: Caller, task_id: str, decision: Literal["accept", "request_changes"], feedback: str | None
    ) -> TaskRow:
        task = await self._task(task_id)
        pending = task.pending or {}
        if task.status != S.INPUT_REQUIRED or pending.get("kind") != "review":
            raise InvalidArgument(
                "task_id", f"task {task_id} has nothing to review (status {task.status.value}); wait for a hand-in"
            )
        feedback = (feedback or "").strip()
        if decision == "accept":
            body = "Accepted." + (f"\n\n{feedback}" if feedback else "")
            row, _ = await self._step(
                task_id,
                allowed=[S.INPUT_REQUIRED],
                wanted="it has nothing to review",
                status=S.COMPLETED,
                final_from_pending=True,
                message={"author": "agent", "author_name": caller.identity, "kind": "review", "body": body},
            )
        else:
            if not feedback:
                raise InvalidArgument("feedback", "required when decision is request_changes (1..20000 characters)")
            row, _ = await self._step(
                task_id,
                allowed=[S.INPUT_REQUIRED],
                wanted="it has nothing to review",
                status=S.WORKING,
                message={
                    "author": "agent",
                    "author_name": caller.identity,
                    "kind": "review",
                    "body": f"Changes requested:\n\n{feedback}",
                },
            )
        return row

    async def note_cancelled(self, task: TaskRow, reason: str) -> None:
        await self.store.post_message(
            task.id, author="system", author_name=None, kind="event", body=f"The agent cancelled this task: {reason}"
        )

    async def messages(self, task_id: str) -> list[MessageRow]:
        return await self.store.messages(task_id)

    # -- the person's side (inbox and CLI) -------------------------------------

    async def claim(self, human: str, task_id: str) -> TaskRow:
        row, _ = await self._step(
            task_id,
            allowed=[S.QUEUED],
            wanted="only a task nobody has claimed can be claimed",
            status=S.WORKING,
            claimed_by=human,
            message={"author": "system", "author_name": None, "kind": "event", "body": f"{human} claimed the task."},
        )
        return row

    async def release(self, human: str, task_id: str) -> TaskRow:
        row, _ = await self._step(
            task_id,
            allowed=[S.WORKING],
            wanted="only a task in progress can be released",
            claimer=human,
            status=S.QUEUED,
            claimed_by=None,
            message={
                "author": "system",
                "author_name": None,
                "kind": "event",
                "body": f"{human} released the task; it is open again.",
            },
        )
        return row

    async def ask(self, human: str, task_id: str, text: str) -> TaskRow:
        self._need_text("question", text)
        row, _ = await self._step(
            task_id,
            allowed=[S.WORKING],
            wanted="claim it before asking a question",
            claimer=human,
            status=S.INPUT_REQUIRED,
            pending_kind="question",
            message={"author": "human", "author_name": human, "kind": "question", "body": text},
        )
        return row

    async def reply(self, human: str, task_id: str, text: str) -> MessageRow:
        self._need_text("message", text)
        task = await self._task(task_id)
        if task.status not in OPEN:
            raise InvalidArgument("task_id", f"task {task_id} is {task.status.value}; its thread is closed")
        return await self.store.post_message(task_id, author="human", author_name=human, kind="message", body=text)

    async def handin(self, human: str, task_id: str, text: str) -> TaskRow:
        self._need_text("result", text)
        row, _ = await self._step(
            task_id,
            allowed=[S.WORKING],
            wanted="claim it (or wait for the agent's answer) before handing in",
            claimer=human,
            status=S.INPUT_REQUIRED,
            pending_kind="review",
            message={"author": "human", "author_name": human, "kind": "handin", "body": text},
        )
        return row

    @staticmethod
    def _need_text(field: str, text: str) -> None:
        if not text or not text.strip():
            raise InvalidArgument(field, "must not be empty (1..20000 characters)")
        if len(text) > 20_000:
            raise InvalidArgument(field, f"must be at most 20000 characters, got {len(text)}")

    async def _task(self, task_id: str) -> TaskRow:
        try:
            task = await self.store.get(task_id)
        except TaskNotFound:
            raise InvalidArgument("task_id", f"no task {task_id!r}") from None
        if task.kind != "human":
            raise InvalidArgument("task_id", f"task {task_id} is an agent task; this is for human tasks")
        return task

    # -- deadlines ---------------------------------------------------------

    async def keep_deadlines(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Expire human tasks at their deadlines (sleeping until the next one, or a change)."""
        task_status.started()
        while True:
            since = self.feed.generation
            # One read per change; a write only when a deadline has passed.
            nxt = await self.store.next_human_deadline()
            if nxt is not None and nxt <= self.store.clock.now():
                expired = await self.store.expire_due()
                if expired:
                    logger.info("human task(s) expired: %s", ", ".join(expired))
                continue
            wait = 3600.0 if nxt is None else nxt - self.store.clock.now() + 0.01
            await self.feed.wait(since, min(wait, 3600.0))
