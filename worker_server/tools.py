"""The MCP tools: module-level typed functions whose signatures are the input
schemas, registered in one place (``TOOLS``). What they work with (the task
service, who is calling) is the server's lifespan state, ``ToolDeps``.

Every tool returns a pydantic model (its output schema). An argument that
fits the schema but not the situation comes back as an ``isError`` result
with ``{error: "invalid_arguments", tool, rule, reason, field}``.

What a tool publishes is made strict here, for clients that hold a server
to its word: input schemas refuse unknown names (as the guard does), output
schemas admit the guard's refusal shape (strict clients validate error
results too), and descriptions carry no docstring indentation.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, ParamSpec, TypeVar
from urllib.parse import unquote

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError
from mcp.server.mcpserver.tools import Tool
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import Field

from guard.middleware import refusal_result
from guard.outcomes import Refusal, admit_refusals
from worker_server.humans import Humans
from worker_server.identity import CallerResolver
from worker_server.intake import NotTakingTurns
from worker_server.log_pages import PAGE_BYTES, read_page, remember_page
from worker_server.service import Caller, InvalidArgument, TaskService, Viewer
from worker_server.task import CancelResult, Message, MessageList, TaskDetail, TaskList, TaskStatus, TaskView, WaitResult

P = ParamSpec("P")
R = TypeVar("R")

# Ids are "tsk_" + base32 (see store.new_id); the pattern refuses junk (NUL
# bytes, spaces, another kind of id) before any lookup.
TASK_ID_PATTERN = r"^tsk_[a-z0-9]+$"
TaskId = Annotated[
    str,
    Field(min_length=5, max_length=64, pattern=TASK_ID_PATTERN, description="A task id, e.g. tsk_k3v9q0m2x7ab"),
]
Label = Annotated[str, Field(min_length=1, max_length=64)]

# Annotations, as a client reads them (MCP ToolAnnotations):
# - spawn-task is destructive: a worker runs arbitrary work in cwd (a shell
#   script, or an agent allowed to edit files), so it may delete or
#   overwrite, not only add. Clients that confirm destructive calls will ask
#   before spawning; that is the honest trade. Not idempotent (an
#   idempotency_key makes one spawn repeatable, the tool in general is not).
# - list-task-messages marks the person's messages read: it changes state,
#   so it is not read-only; harmless and idempotent (reading twice marks
#   nothing more). The built-in policy allows it by name.
# - cancel-task stops work: destructive, idempotent (a second cancel finds
#   the task already terminal).
SPAWN = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=True)
WRITE = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True)
MARKS_READ = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
READ = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=True)


def invalid(tool: str, exc: InvalidArgument) -> CallToolResult:
    """The guard's invalid_arguments refusal, for what only the tool can see."""
    return refusal_result(
        Refusal("invalid_arguments", tool, None, f"{exc.field}: {exc.message}", extra={"field": exc.field})
    )


def _reports_invalid(tool: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(*args, **kwargs)
            except InvalidArgument as exc:
                return invalid(tool, exc)  # type: ignore[return-value]
            except NotTakingTurns as exc:
                return refusal_result(Refusal("unavailable", tool, None, exc.reason))  # type: ignore[return-value]

        return wrapper

    return decorate


def strict_tool(fn: Callable[..., Any], *, name: str, title: str, annotations: ToolAnnotations) -> Tool:
    """``fn`` as an MCP tool whose published schemas say what the server enforces."""
    tool = Tool.from_function(
        fn, name=name, title=title, description=inspect.cleandoc(fn.__doc__ or ""), annotations=annotations
    )
    output_schema = tool.fn_metadata.output_schema
    if output_schema is None:
        raise TypeError(f"{name}: a tool must return a model (its output schema)")
    # The guard refuses unknown argument names; the schema says so.
    parameters = {**tool.parameters, "additionalProperties": False}
    metadata = tool.fn_metadata.model_copy(update={"output_schema": admit_refusals(output_schema)})
    return tool.model_copy(update={"parameters": parameters, "fn_metadata": metadata})


@dataclass(frozen=True)
class ToolDeps:
    """What the tools and resources work with: the server's lifespan state
    (``MCPServer(lifespan=tool_lifespan(deps))``), read from each request's
    context as the SDK hands it over. ``sees_all(identity)``: whether the
    policy shares every session with that identity."""

    service: TaskService
    callers: CallerResolver
    sees_all: Callable[[str], bool]

    def caller(self, ctx: ToolContext) -> Caller:
        return self.callers.caller(ctx.request_context)

    def viewer(self, ctx: ToolContext) -> Viewer:
        identity = self.caller(ctx).identity
        return Viewer(identity, self.sees_all(identity))

    def humans(self) -> Humans:
        if self.service.humans is None:
            raise InvalidArgument("task_id", "human workers are not configured on this server")
        return self.service.humans


#: A tool's request context; its lifespan context is the server's ``ToolDeps``.
ToolContext = Context[ToolDeps, Any]


def tool_deps(ctx: ToolContext) -> ToolDeps:
    return ctx.request_context.lifespan_context


def tool_lifespan(deps: ToolDeps) -> Callable[[MCPServer[ToolDeps]], AbstractAsyncContextManager[ToolDeps]]:
    """The MCPServer ``lifespan`` that hands ``deps`` to every tool (entered per session; it opens nothing)."""

    @asynccontextmanager
    async def lifespan(_server: MCPServer[ToolDeps]) -> AsyncIterator[ToolDeps]:
        yield deps

    return lifespan


# -- the tools: the signature is the input schema, the return type the output schema


async def spawn_task(
    prompt: Annotated[str, Field(min_length=1, max_length=100_000, description="What the worker should do")],
    ctx: ToolContext,
    worker: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=64,
            description="Worker profile (codex, claude, shell, or one from the config), or 'human' to post "
            "the task to a person's inbox. Default: the configured default_worker.",
        ),
    ] = None,
    title: Annotated[str | None, Field(min_length=1, max_length=200, description="Short title")] = None,
    cwd: Annotated[
        str | None,
        Field(min_length=1, max_length=4096, description="Absolute working directory inside an allowed root"),
    ] = None,
    timeout_s: Annotated[
        int | None, Field(ge=1, le=86_400, description="Seconds before the task fails as timed_out/expired")
    ] = None,
    labels: Annotated[list[Label] | None, Field(max_length=16, description="Up to 16 labels")] = None,
    idempotency_key: Annotated[
        str | None,
        Field(min_length=1, max_length=200, description="Repeat a spawn safely: the same key returns the same task"),
    ] = None,
    model: Annotated[
        str | None,
        Field(min_length=1, max_length=200, description="Agent workers: the model, passed to the CLI as is"),
    ] = None,
    effort: Annotated[
        Literal["low", "medium", "high"] | None,
        Field(description="Agent workers: reasoning effort (Codex model_reasoning_effort, Claude --effort)"),
    ] = None,
    sandbox: Annotated[
        Literal["read-only", "workspace-write"],
        Field(description="workspace-write: the worker may write inside cwd; read-only: it may not"),
    ] = "workspace-write",
    isolation: Annotated[
        Literal["none", "worktree"],
        Field(
            description="worktree: run the session in a new git worktree of cwd on branch "
            "taskwarden/<session_id> (cwd must be in a git work tree)"
        ),
    ] = "none",
    max_tokens: Annotated[
        int | None,
        Field(ge=1, le=1_000_000_000, description="Agent workers: stop a turn of this session once it has used "
              "this many tokens (input + output); budgets in the policy can only narrow further"),
    ] = None,
    max_cost_usd: Annotated[
        float | None,
        Field(gt=0, le=100_000, description="Agent workers: stop a turn of this session once it has cost this "
              "many dollars (as the CLI reports cost)"),
    ] = None,
) -> TaskView:
    """Start work in the background: an agent CLI turn (Codex, Claude Code, a shell script) or a task
    for a person. Returns at once with the task (status queued or working). Then call wait-task with
    its task_id to be told when it finishes or needs you; message-task continues the same session."""
    deps = tool_deps(ctx)
    return await deps.service.spawn(
        deps.caller(ctx),
        prompt=prompt,
        worker=worker,
        title=title,
        cwd=cwd,
        timeout_s=timeout_s,
        labels=labels,
        idempotency_key=idempotency_key,
        model=model,
        effort=effort,
        sandbox=sandbox,
        isolation=isolation,
        max_tokens=max_tokens,
        max_cost_usd=max_cost_usd,
    )


async def wait_task(
    task_ids: Annotated[
        TaskId | Annotated[list[TaskId], Field(min_length=1, max_length=50)],
        Field(description="One task id, or a list of 1..50"),
    ],
    ctx: ToolContext,
    timeout_s: Annotated[
        float, Field(ge=0, le=50, description="Seconds to wait at most (0 checks without waiting)")
    ] = 25,
    mode: Annotated[
        Literal["any", "all"], Field(description="Return when any task settles, or only when all have")
    ] = "any",
) -> WaitResult:
    """Block until tasks finish or need you (status completed, failed, cancelled or input_required),
    up to timeout_s (max 50). Returns every task's state, timed_out, and the ids still running.
    Sends progress notifications with the latest activity while it waits."""
    deps = tool_deps(ctx)
    ids = [task_ids] if isinstance(task_ids, str) else task_ids
    progress = None
    meta = ctx.request_context.meta or {}
    if meta.get("progress_token") is not None or meta.get("progressToken") is not None:

        async def progress(elapsed: float, total: float, line: str) -> None:
            await ctx.report_progress(round(elapsed, 1), total, line)

    return await deps.service.wait(ids, timeout_s=timeout_s, mode=mode, progress=progress, viewer=deps.viewer(ctx))


async def message_task(
    task_id: TaskId,
    message: Annotated[str, Field(min_length=1, max_length=100_000, description="The next prompt or reply")],
    ctx: ToolContext,
) -> TaskView:
    """Continue a task's session. Agent task: starts the next turn on the same worker session (queued
    behind a running turn) and returns the new task. Human task: posts the message to its thread."""
    deps = tool_deps(ctx)
    return await deps.service.message(deps.caller(ctx), task_id, message, viewer=deps.viewer(ctx))


async def cancel_task(
    task_id: Annotated[
        TaskId | Annotated[list[TaskId], Field(min_length=1, max_length=100)],
        Field(description="One task id, or a list of 1..100"),
    ],
    ctx: ToolContext,
    reason: Annotated[str | None, Field(max_length=2000, description="Why; shown to the worker/person")] = None,
) -> CancelResult:
    """Cancel tasks: stops their worker processes (SIGTERM, then SIGKILL after 5 s) or withdraws them
    from people. Returns which were cancelled, already finished, or not found. Needs human approval
    under the default policy, except when every task named has already finished (nothing changes)."""
    deps = tool_deps(ctx)
    ids = [task_id] if isinstance(task_id, str) else task_id
    return await deps.service.cancel(ids, reason, viewer=deps.viewer(ctx))


async def list_tasks(
    ctx: ToolContext,
    status: Annotated[TaskStatus | None, Field(description="Only tasks in this status")] = None,
    worker: Annotated[str | None, Field(min_length=1, max_length=64, description="Only this worker")] = None,
    label: Annotated[Label | None, Field(description="Only tasks with this label")] = None,
    limit: Annotated[int, Field(ge=1, le=200, description="Page size")] = 50,
    cursor: Annotated[
        str | None,
        Field(max_length=200, pattern=r"^[A-Za-z0-9_-]+$", description="next_cursor from the previous page"),
    ] = None,
) -> TaskList:
    """List tasks, newest first, with optional filters. Page with next_cursor."""
    deps = tool_deps(ctx)
    return await deps.service.list(
        status=status.value if status else None, worker=worker, label=label, limit=limit, cursor=cursor,
        viewer=deps.viewer(ctx),
    )


async def get_task(
    task_id: TaskId,
    ctx: ToolContext,
    tail_lines: Annotated[int, Field(ge=0, le=500, description="Lines of recent activity to include")] = 20,
) -> TaskDetail:
    """One task in full: status, output (capped; the whole log is the resource at output.log_uri),
    its session's turns and, for human tasks, the message thread."""
    deps = tool_deps(ctx)
    return await deps.service.get(task_id, tail_lines=tail_lines, viewer=deps.viewer(ctx))


async def send_task_message(
    task_id: TaskId,
    body: Annotated[
        str, Field(min_length=1, max_length=20_000, description="Markdown or HTML; sanitised before display")
    ],
    ctx: ToolContext,
) -> Message:
    """Post a message to a human task's thread, e.g. to answer the person's question
    (pending.kind = question). Then call wait-task again."""
    deps = tool_deps(ctx)
    humans = deps.humans()
    await deps.service.check_visible(task_id, deps.viewer(ctx))
    return await humans.send(deps.caller(ctx), task_id, body)


async def list_task_messages(
    task_id: TaskId,
    ctx: ToolContext,
    since: Annotated[
        str | None,
        Field(max_length=64, pattern=r"^msg_[a-z0-9]+$", description="Only messages after this message id"),
    ] = None,
) -> MessageList:
    """The message thread of a human task, oldest first. What people wrote is marked author=human.
    Marks the person's messages as read."""
    deps = tool_deps(ctx)
    humans = deps.humans()
    await deps.service.check_visible(task_id, deps.viewer(ctx))
    return await humans.list(task_id, since)


async def review_task(
    task_id: TaskId,
    decision: Annotated[
        Literal["accept", "request_changes"],
        Field(description="accept completes the task; request_changes sends it back"),
    ],
    ctx: ToolContext,
    feedback: Annotated[
        str | None,
        Field(max_length=20_000, description="Required for request_changes: what to change"),
    ] = None,
) -> TaskView:
    """Accept a human task's hand-in (it becomes completed with the result as output.final) or request
    changes with feedback (it goes back to the person, status working)."""
    deps = tool_deps(ctx)
    humans = deps.humans()
    await deps.service.check_visible(task_id, deps.viewer(ctx))
    return await deps.service.view(await humans.review(deps.caller(ctx), task_id, decision, feedback))


# -- registered in one place ----------------------------------------------------

#: Every taskwarden tool, in the order tools/list shows them: (name, title, annotations, function).
TOOLS: tuple[tuple[str, str, ToolAnnotations, Callable[..., Awaitable[Any]]], ...] = (
    ("spawn-task", "Start a background task", SPAWN, spawn_task),
    ("wait-task", "Wait for tasks", READ, wait_task),
    ("message-task", "Send the next turn", WRITE, message_task),
    ("cancel-task", "Cancel tasks", DESTRUCTIVE, cancel_task),
    ("list-tasks", "List tasks", READ, list_tasks),
    ("get-task", "Get a task", READ, get_task),
    ("send-task-message", "Message a person about a task", WRITE, send_task_message),
    ("list-task-messages", "Read a task's messages", MARKS_READ, list_task_messages),
    ("review-task", "Review a person's hand-in", WRITE, review_task),
)


def build_tools(workers: str = "") -> list[Tool]:
    """Every taskwarden tool, for ``MCPServer(tools=..., lifespan=tool_lifespan(deps))``.
    ``workers``: the sentence on the workers of this server in spawn-task's ``worker``
    field (see worker_server.workers); agents read it before calling (the signature is static)."""
    tools = [
        strict_tool(_reports_invalid(name)(fn), name=name, title=title, annotations=annotations)
        for name, title, annotations, fn in TOOLS
    ]
    if workers:
        tools = [t.model_copy(update={"description": f"{t.description} {workers}"}) if t.name == "spawn-task" else t
                 for t in tools]  # fmt: skip
    return tools


def input_schemas() -> dict[str, dict[str, Any]]:
    """Each tool's input schema as the server publishes it, with no server running: what
    ``taskwarden policy explain`` checks arguments against, as the guard does."""
    return {t.name: t.parameters for t in build_tools()}


async def task_resource(task_id: str, ctx: ToolContext) -> str:
    """A task in full, as get-task returns it."""
    deps = tool_deps(ctx)
    try:
        detail = await deps.service.get(task_id, viewer=deps.viewer(ctx))
    except InvalidArgument as exc:
        raise ResourceNotFoundError(str(exc)) from None
    return detail.model_dump_json(indent=2)


async def task_log(task_id: str, ctx: ToolContext, offset: str = "0", limit: str = str(PAGE_BYTES)) -> str | bytes:
    """The task's log (its worker's stdout and stderr) in pages of at most 256 KB from byte
    ``offset``: UTF-8 text, or a base64 blob where the bytes are binary. The content's
    _meta["taskwarden/log"] says {offset, next_offset, size, eof}."""
    deps = tool_deps(ctx)
    start = _bounded("offset", offset, 0, 2**62)
    count = _bounded("limit", limit, 1, PAGE_BYTES)
    try:
        path = await deps.service.log_path(task_id, viewer=deps.viewer(ctx))
    except InvalidArgument as exc:
        raise ResourceNotFoundError(str(exc)) from None
    page = await anyio.to_thread.run_sync(lambda: read_page(path, start, count))
    remember_page(page)
    return page.content


def register_resources(mcp: MCPServer[Any]) -> None:
    """``task://{id}`` and ``task://{id}/log{?offset,limit}``: the guard decides each read as
    ``get-task`` (see ``resource_call``); here, another identity's task does not exist."""
    mcp.resource("task://{task_id}", name="task", mime_type="application/json")(task_resource)
    mcp.resource("task://{task_id}/log{?offset,limit}", name="task-log", mime_type="text/plain")(task_log)


def _bounded(name: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise ResourceError(f"invalid_arguments: {name}: must be an integer in {low}..{high}, got {value[:40]!r}")
    return number


def resource_call(uri: str) -> tuple[str, dict[str, Any]] | None:
    """The tool call that decides reading ``uri``: any ``task://ID…`` resource is ``get-task`` of ID."""
    if not uri.startswith("task://"):
        return None
    rest = uri[len("task://") :]
    task_id = unquote(rest.split("/", 1)[0].split("?", 1)[0])
    return "get-task", {"task_id": task_id}
