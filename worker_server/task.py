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


class Usage(BaseModel):
    """What a turn cost, as its worker reported it; null where it reports nothing."""

    input_tokens: int | None = Field(default=None, description="Input tokens, cached ones included")
    cached_input_tokens: int | None = Field(default=None, description="Input tokens read from the cache")
    output_tokens: int | None = None
    reasoning_tokens: int | None = Field(default=None, description="Output tokens spent reasoning")
    cost_usd: float | None = Field(default=None, description="As the worker CLI computed it (Claude Code)")
    worker_s: float | None = Field(default=None, description="Seconds the worker process ran")


class ChangedFile(BaseModel):
    path: str
    status: Literal["added", "modified", "deleted", "renamed", "type_changed"]
    insertions: int | None = Field(description="null for binary files")
    deletions: int | None


class Changes(BaseModel):
    """What a turn changed in its git work tree (work tree before vs after)."""

    files: list[ChangedFile]
    insertions: int
    deletions: int
    truncated: bool = Field(description="True when more files changed than are listed")


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
    usage: Usage | None = Field(default=None, description="Tokens, cost and time of this turn, once it ran")
    owner: str | None = Field(default=None, description="The identity the task's session belongs to")


class TaskView(TaskSummary):
    output: Output
    cwd: str | None
    options: dict[str, str] = Field(
        default_factory=dict, description="The session's worker options: model, effort, sandbox"
    )
    worktree: str | None = Field(default=None, description="isolation=worktree: the git worktree the session runs in")
    branch: str | None = Field(default=None, description="isolation=worktree: the worktree's branch")
    changes: Changes | None = Field(default=None, description="What this turn changed, when cwd is a git work tree")
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
    usage: Usage | None = None


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
    session_usage: Usage | None = Field(default=None, description="The usage of every turn of the session, summed")
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
