"""A task (one turn of work on a session) as agents see it."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field


class TaskStatus(StrEnum):
    QUEUED = "queued"  # accepted; waiting for a worker slot, or for a human to claim it
    WORKING = "working"  # a worker is on it
    INPUT_REQUIRED = "input_required"  # the worker waits for the agent; `pending` says why
    COMPLETED = "completed"  # done; output.final holds the result
    FAILED = "failed"  # ended without a result; status_message says why
    CANCELLED = "cancelled"  # cancelled through cancel-task

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
# wait-task returns once every awaited task is in one of these.
SETTLED = TERMINAL | {TaskStatus.INPUT_REQUIRED}


class Pending(BaseModel):
    """What the worker is waiting on the agent for."""

    kind: Literal["question", "review"]
    text: str
    message_id: str


class Output(BaseModel):
    final: str | None = Field(description="The result (capped; see truncated and log_uri)")
    tail: str | None = Field(description="The last lines of activity")
    truncated: bool = Field(description="True when final or tail was cut to fit the result")
    log_uri: str = Field(description="MCP resource with the whole log")


class TaskSummary(BaseModel):
    task_id: str
    session_id: str
    turn: int = Field(description="1 for the first task of a session, then 2, 3, …")
    worker: str
    kind: Literal["agent", "human"]
    title: str
    status: TaskStatus
    status_message: str | None
    created_at: str
    updated_at: str
    pending: Pending | None
    exit_code: int | None
    labels: list[str]
    owner: str | None = Field(default=None, description="The identity the task's session belongs to")


class TaskView(TaskSummary):
    output: Output
    cwd: str | None
    deadline: str | None = Field(description="When the task times out (ISO 8601 UTC), if it has started or is human")
    poll_interval_s: float
    next_action: str


class Turn(BaseModel):
    task_id: str
    turn: int
    status: TaskStatus
    status_message: str | None
    prompt: str = Field(description="The turn's prompt (first 500 characters)")
    created_at: str
    final: str | None = Field(description="The turn's result (first 500 characters)")


class Message(BaseModel):
    message_id: str
    task_id: str
    author: Literal["agent", "human", "system"]
    author_name: str | None
    kind: Literal["message", "question", "handin", "review", "event"]
    body: str
    created_at: str
    read_at: str | None


class TaskDetail(TaskView):
    turns: list[Turn] = Field(description="Every turn of this task's session, oldest first")
    thread: list[Message] | None = Field(description="Human tasks: the message thread, oldest first")


class WaitResult(BaseModel):
    tasks: list[TaskView]
    timed_out: bool = Field(description="True when timeout_s passed before the mode was met")
    still_waiting: list[str] = Field(description="Ids that are neither terminal nor input_required")


class CancelResult(BaseModel):
    cancelled: list[str]
    already_terminal: list[str]
    not_found: list[str]


class TaskList(BaseModel):
    tasks: list[TaskSummary]
    next_cursor: str | None = Field(description="Pass as cursor to get the next page; null on the last page")


class MessageList(BaseModel):
    messages: list[Message]
