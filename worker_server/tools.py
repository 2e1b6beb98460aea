"""The MCP tools: typed functions whose signatures are the input schemas.

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
from collections.abc import Awaitable, Callable
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
from worker_server.identity import CallerResolver
from worker_server.intake import NotTakingTurns
from worker_server.log_pages import PAGE_BYTES, read_page, remember_page
from worker_server.service import InvalidArgument, TaskService, Viewer
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


def build_tools(
    service: TaskService, callers: CallerResolver, sees_all: Callable[[str], bool], workers: str = ""
) -> list[Tool]:
    """Every taskwarden tool, for ``MCPServer(tools=...)``. ``sees_all(identity)``: whether
    the policy shares every session with that identity; ``workers``: the sentence on the
    workers of this server in spawn-task's ``worker`` field (see worker_server.workers)."""
    tools: list[Tool] = []

    def tool(name: str, title: str, annotations: ToolAnnotations) -> Callable[[Callable[..., Any]], Any]:
        def register(fn: Callable[..., Any]) -> Any:
            tools.append(strict_tool(fn, name=name, title=title, annotations=annotations))
            return fn

        return register

    def caller(ctx: Context) -> Any:
        return callers.caller(ctx.request_context)

    def viewer(ctx: Context) -> Viewer:
        identity = caller(ctx).identity
        return Viewer(identity, sees_all(identity))

    @tool("spawn-task", "Start a background task", SPAWN)
    @_reports_invalid("spawn-task")
    async def spawn_task(
        prompt: Annotated[str, Field(min_length=1, max_length=100_000, description="What the worker should do")],
        ctx: Context,
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
        return await service.spawn(
            caller(ctx),
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

    @tool("wait-task", "Wait for tasks", READ)
    @_reports_invalid("wait-task")
    async def wait_task(
        task_ids: Annotated[
            TaskId | Annotated[list[TaskId], Field(min_length=1, max_length=50)],
            Field(description="One task id, or a list of 1..50"),
        ],
        ctx: Context,
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
        ids = [task_ids] if isinstance(task_ids, str) else task_ids
        progress = None
        meta = ctx.request_context.meta or {}
        if meta.get("progress_token") is not None or meta.get("progressToken") is not None:

            async def progress(elapsed: float, total: float, line: str) -> None:
                await ctx.report_progress(round(elapsed, 1), total, line)

        return await service.wait(ids, timeout_s=timeout_s, mode=mode, progress=progress, viewer=viewer(ctx))

    @tool("message-task", "Send the next turn", WRITE)
    @_reports_invalid("message-task")
    async def message_task(
        task_id: TaskId,
        message: Annotated[str, Field(min_length=1, max_length=100_000, description="The next prompt or reply")],
        ctx: Context,
    ) -> TaskView:
        """Continue a task's session. Agent task: starts the next turn on the same worker session (queued
        behind a running turn) and returns the new task. Human task: posts the message to its thread."""
        return await service.message(caller(ctx), task_id, message, viewer=viewer(ctx))

    @tool("cancel-task", "Cancel tasks", DESTRUCTIVE)
    @_reports_invalid("cancel-task")
    async def cancel_task(
        task_id: Annotated[
            TaskId | Annotated[list[TaskId], Field(min_length=1, max_length=100)],
            Field(description="One task id, or a list of 1..100"),
        ],
        ctx: Context,
        reason: Annotated[str | None, Field(max_length=2000, description="Why; shown to the worker/person")] = None,
    ) -> CancelResult:
        """Cancel tasks: stops their worker processes (SIGTERM, then SIGKILL after 5 s) or withdraws them
        from people. Returns which were cancelled, already finished, or not found. Needs human approval
        under the default policy, except when every task named has already finished (nothing changes)."""
        ids = [task_id] if isinstance(task_id, str) else task_id
        return await service.cancel(ids, reason, viewer=viewer(ctx))

    @tool("list-tasks", "List tasks", READ)
    @_reports_invalid("list-tasks")
    async def list_tasks(
        ctx: Context,
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
        return await service.list(
            status=status.value if status else None, worker=worker, label=label, limit=limit, cursor=cursor,
            viewer=viewer(ctx),
        )

    @tool("get-task", "Get a task", READ)
    @_reports_invalid("get-task")
    async def get_task(
        task_id: TaskId,
        ctx: Context,
        tail_lines: Annotated[int, Field(ge=0, le=500, description="Lines of recent activity to include")] = 20,
    ) -> TaskDetail:
        """One task in full: status, output (capped; the whole log is the resource at output.log_uri),
        its session's turns and, for human tasks, the message thread."""
        return await service.get(task_id, tail_lines=tail_lines, viewer=viewer(ctx))

    @tool("send-task-message", "Message a person about a task", WRITE)
    @_reports_invalid("send-task-message")
    async def send_task_message(
        task_id: TaskId,
        body: Annotated[
            str, Field(min_length=1, max_length=20_000, description="Markdown or HTML; sanitised before display")
        ],
        ctx: Context,
    ) -> Message:
        """Post a message to a human task's thread, e.g. to answer the person's question
        (pending.kind = question). Then call wait-task again."""
        humans = _humans(service)
        await service.check_visible(task_id, viewer(ctx))
        return await humans.send(caller(ctx), task_id, body)

    @tool("list-task-messages", "Read a task's messages", MARKS_READ)
    @_reports_invalid("list-task-messages")
    async def list_task_messages(
        task_id: TaskId,
        ctx: Context,
        since: Annotated[
            str | None,
            Field(max_length=64, pattern=r"^msg_[a-z0-9]+$", description="Only messages after this message id"),
        ] = None,
    ) -> MessageList:
        """The message thread of a human task, oldest first. What people wrote is marked author=human.
        Marks the person's messages as read."""
        humans = _humans(service)
        await service.check_visible(task_id, viewer(ctx))
        return await humans.list(task_id, since)

    @tool("review-task", "Review a person's hand-in", WRITE)
    @_reports_invalid("review-task")
    async def review_task(
        task_id: TaskId,
        decision: Annotated[
            Literal["accept", "request_changes"],
            Field(description="accept completes the task; request_changes sends it back"),
        ],
        ctx: Context,
        feedback: Annotated[
            str | None,
            Field(max_length=20_000, description="Required for request_changes: what to change"),
        ] = None,
    ) -> TaskView:
        """Accept a human task's hand-in (it becomes completed with the result as output.final) or request
        changes with feedback (it goes back to the person, status working)."""
        humans = _humans(service)
        await service.check_visible(task_id, viewer(ctx))
        return await humans.review(caller(ctx), task_id, decision, feedback)

    if workers:
        # What may be spawned here, where agents read before calling (the signature is static).
        tools = [t.model_copy(update={"description": f"{t.description} {workers}"}) if t.name == "spawn-task" else t
                 for t in tools]  # fmt: skip
    return tools


def input_schemas() -> dict[str, dict[str, Any]]:
    """Each tool's input schema as the server publishes it, with no server running: what
    ``taskwarden policy explain`` checks arguments against, as the guard does. Only the
    schemas are read; no handler is ever called, so they need no service."""
    no_service: Any = None
    return {t.name: t.parameters for t in build_tools(no_service, no_service, lambda _identity: False)}


def _humans(service: TaskService) -> Any:
    if service.humans is None:
        raise InvalidArgument("task_id", "human workers are not configured on this server")
    return service.humans


def register_resources(
    mcp: MCPServer[Any], service: TaskService, callers: CallerResolver, sees_all: Callable[[str], bool]
) -> None:
    """``task://{id}`` and ``task://{id}/log{?offset,limit}``: the guard decides each read as
    ``get-task`` (see ``resource_call``); here, another identity's task does not exist."""

    def viewer(ctx: Context) -> Viewer:
        identity = callers.caller(ctx.request_context).identity
        return Viewer(identity, sees_all(identity))

    @mcp.resource("task://{task_id}", name="task", mime_type="application/json")
    async def task_resource(task_id: str, ctx: Context) -> str:
        """A task in full, as get-task returns it."""
        try:
            detail = await service.get(task_id, viewer=viewer(ctx))
        except InvalidArgument as exc:
            raise ResourceNotFoundError(str(exc)) from None
        return detail.model_dump_json(indent=2)

    @mcp.resource("task://{task_id}/log{?offset,limit}", name="task-log", mime_type="text/plain")
    async def task_log(task_id: str, ctx: Context, offset: str = "0", limit: str = str(PAGE_BYTES)) -> str | bytes:
        """The task's log (its worker's stdout and stderr) in pages of at most 256 KB from byte
        ``offset``: UTF-8 text, or a base64 blob where the bytes are binary. The content's
        _meta["taskwarden/log"] says {offset, next_offset, size, eof}."""
        start = _bounded("offset", offset, 0, 2**62)
        count = _bounded("limit", limit, 1, PAGE_BYTES)
        try:
            path = await service.log_path(task_id, viewer=viewer(ctx))
        except InvalidArgument as exc:
            raise ResourceNotFoundError(str(exc)) from None
        page = await anyio.to_thread.run_sync(lambda: read_page(path, start, count))
        remember_page(page)
        return page.content


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
