"""Native MCP Tasks: ``spawn-task`` and ``message-task`` as MCP tasks, on taskwarden's own rows.

Two wire formats serve the same tasks (an MCP task id *is* the taskwarden
task id; nothing is stored twice):

- 2026-07-28, the ``io.modelcontextprotocol/tasks`` extension (SEP-2663),
  through the SDK's ``Extension`` API: a ``tools/call`` whose own request
  ``_meta`` capabilities declare the extension gets a flat
  ``CreateTaskResult`` (``resultType: "task"``); ``tasks/get`` returns the
  state and, once terminal, the final tool result inline; ``tasks/update``
  answers a person's question or review (``inputRequests``);
  ``tasks/cancel`` acks; ``notifications/tasks`` ride a
  ``subscriptions/listen`` stream that asks for ``taskIds``. ``tasks/result``
  and ``tasks/list`` do not exist there (-32601).
- 2025-11-25, the core ``tasks`` utility: ``capabilities.tasks`` in
  ``initialize``, ``execution.taskSupport`` on the two tools, a ``tools/call``
  with ``params.task`` gets ``{task: {...}}``; ``tasks/get|result|list|cancel``
  and ``notifications/tasks/status`` on the session's standalone stream.
  These surfaces are wire-shape rewrites of whole results, so they live in
  ``TaskMiddleware`` (server middleware), outside the guard.

Status: ``queued`` shows as ``working`` (MCP has no queued; the status
message says so). A worker that fails is a tool that ran and reported an
error: on 2026-07-28 that is ``completed`` with ``result.isError`` (SEP-2663
reserves ``failed`` for JSON-RPC errors); 2025-11-25 keeps ``failed``.

``tasks/cancel`` is decided by the guard exactly as ``cancel-task {task_id}``
(same rules, same approval digest), and every ``tasks/*`` request is audited.
A refusal is the JSON-RPC error ``GUARD_REFUSED`` whose message is the
refusal's first line (with the approval id and how to approve) and whose
data is the refusal's structured content.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import anyio
import anyio.abc
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver import require_client_extension
from mcp.shared.exceptions import MCPError
from mcp_types import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    CallToolRequestParams,
    CallToolResult,
    ElicitResult,
    PaginatedRequestParams,
    RequestParams,
    SubscriptionFilter,
    SubscriptionsAcknowledgedNotification,
    SubscriptionsAcknowledgedNotificationParams,
    TextContent,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field, ValidationError

from guard.audit import Outcome
from guard.storage.clock import iso
from guard.outcomes import Refusal
from guard.gate import Call, Guard, UnknownTool
from worker_server.service import Caller, InvalidArgument, TaskService, Viewer
from worker_server.store import TaskNotFound, TaskRow
from worker_server.task import TaskStatus

logger = logging.getLogger(__name__)

EXTENSION = "io.modelcontextprotocol/tasks"
#: The tools a client may receive as tasks: they start work that outlives the call.
TASK_TOOLS = frozenset({"spawn-task", "message-task"})
#: Handshake-era versions with the core tasks utility.
LEGACY_TASK_VERSIONS = frozenset({"2025-11-25"})
#: JSON-RPC error for a ``tasks/cancel`` the guard refused (implementation-defined range).
GUARD_REFUSED = -32030
RELATED_TASK_META = "io.modelcontextprotocol/related-task"
SUBSCRIPTION_ID_META = "io.modelcontextprotocol/subscriptionId"
#: ``tasks/update`` keys: a question to answer, a hand-in to review.
QUESTION, REVIEW = "question", "review"
LEGACY_CAPABILITIES = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}

CallerOf = Callable[[Any], Caller]


class TaskIdParams(RequestParams):
    task_id: str = Field(min_length=1, max_length=64)


class UpdateParams(TaskIdParams):
    input_responses: dict[str, dict[str, Any]] = Field(max_length=16)


class TaskNotification(BaseModel):
    """``notifications/tasks`` (2026-07-28 extension, not in the SDK's vocabulary) or
    ``notifications/tasks/status`` (2025-11-25). Params stay a plain dict so a
    ``null`` TTL is sent as ``null`` (the SDK's typed notification drops it)."""

    method: Literal["notifications/tasks", "notifications/tasks/status"]
    params: dict[str, Any]


class TaskViews:
    """One task row as each wire format shows it."""

    def __init__(self, service: TaskService) -> None:
        self.service = service
        self.poll_ms = int(round(service.settings.poll_interval_s * 1000))

    async def row(self, task_id: str, viewer: Viewer | None = None) -> TaskRow:
        """The task, if ``viewer`` may see it: another identity's task is unknown here too."""
        try:
            row = await self.service.store.get(task_id)
        except TaskNotFound:
            row = None
        if row is None or (viewer is not None and not viewer.may_see(row.session_owner)):
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown task: no task {task_id!r}")
        return row

    def base(self, row: TaskRow, *, modern: bool) -> dict[str, Any]:
        status = row.status.value
        message = row.status_message
        if row.status == TaskStatus.QUEUED:
            status = "working"
            message = "queued: waiting for a worker slot" if row.kind == "agent" else "queued: no person has claimed it yet"
        elif row.status == TaskStatus.FAILED and modern:
            status = "completed"  # the tool ran and reported an error; `failed` means a JSON-RPC error
        elif row.status == TaskStatus.INPUT_REQUIRED:
            message = _pending_message(row, modern=modern)
        task: dict[str, Any] = {
            "taskId": row.id,
            "status": status,
            "createdAt": iso(row.created_at),
            "lastUpdatedAt": iso(row.updated_at),
        }
        if message:
            task["statusMessage"] = message
        # Tasks are kept until `taskwarden tasks prune`: no server-chosen expiry.
        if modern:
            task.update(ttlMs=None, pollIntervalMs=self.poll_ms)
        else:
            task.update(ttl=None, pollInterval=self.poll_ms)
        return task

    async def tool_result(self, row: TaskRow) -> dict[str, Any]:
        """The final ``tools/call`` result: the task as the tool returns it."""
        view = (await self.service.view(row)).model_dump(mode="json")
        result = CallToolResult(
            content=[TextContent(type="text", text=json.dumps(view, ensure_ascii=False))],
            structured_content=view,
            is_error=row.status != TaskStatus.COMPLETED,
        )
        return result.model_dump(by_alias=True, mode="json", exclude_none=True)

    async def detailed(self, row: TaskRow) -> dict[str, Any]:
        """SEP-2663 ``DetailedTask``: the base plus ``result`` or ``inputRequests``."""
        task = self.base(row, modern=True)
        if row.status in (TaskStatus.COMPLETED, TaskStatus.FAILED):
            task["result"] = await self.tool_result(row)
        elif row.status == TaskStatus.INPUT_REQUIRED:
            task["inputRequests"] = _input_requests(row)
        return task


def _pending(row: TaskRow) -> tuple[str, str, str] | None:
    """(kind, key, text) of what the person waits on, or None."""
    pending = row.pending or {}
    kind, message_id = pending.get("kind"), pending.get("message_id")
    if kind not in (QUESTION, REVIEW) or not message_id:
        return None
    return kind, f"{kind}-{message_id}", str(pending.get("text") or "")


def _pending_message(row: TaskRow, *, modern: bool) -> str:
    pending = _pending(row)
    if pending is None:
        return row.status_message or "waiting for the agent"
    kind, _, text = pending
    if kind == QUESTION:
        how = "answer with tasks/update" if modern else "answer with send-task-message"
        return f"The person asks: {text} ({how})"
    how = "accept or request changes with tasks/update" if modern else "call review-task"
    return f"The person handed in a result to review ({how}): {text}"


def _input_requests(row: TaskRow) -> dict[str, Any]:
    """The person's question or hand-in as an elicitation the client answers through ``tasks/update``."""
    pending = _pending(row)
    if pending is None:
        return {}
    kind, key, text = pending
    if kind == QUESTION:
        params = {
            "mode": "form",
            "message": f"The person working on task {row.id} ({row.title}) asks: {text}",
            "requestedSchema": {
                "type": "object",
                "properties": {"answer": {"type": "string", "title": "Answer", "description": "Your reply to the person"}},
                "required": ["answer"],
            },
        }
    else:
        params = {
            "mode": "form",
            "message": f"The person working on task {row.id} ({row.title}) handed in: {text}",
            "requestedSchema": {
                "type": "object",
                "properties": {
                    "decision": {
                        "type": "string",
                        "title": "Decision",
                        "enum": ["accept", "request_changes"],
                        "description": "accept completes the task; request_changes sends it back",
                    },
                    "feedback": {"type": "string", "title": "Feedback", "description": "Required to request changes"},
                },
                "required": ["decision"],
            },
        }
    return {key: {"method": "elicitation/create", "params": params}}


def _modern(ctx: ServerRequestContext[Any, Any]) -> bool:
    return ctx.protocol_version in MODERN_PROTOCOL_VERSIONS


def _declares_extension(ctx: ServerRequestContext[Any, Any]) -> bool:
    caps = ctx.session.client_capabilities
    return bool(caps is not None and caps.extensions and EXTENSION in caps.extensions)


def _check_name_header(ctx: ServerRequestContext[Any, Any], task_id: str) -> None:
    """SEP-2663: over streamable HTTP, ``tasks/*`` carry ``Mcp-Name: <taskId>`` for routing."""
    request = ctx.request
    headers = getattr(request, "headers", None)
    if headers is None or not _modern(ctx):
        return
    name = headers.get("mcp-name")
    if name != task_id:
        raise MCPError(
            code=HEADER_MISMATCH,
            message=f"Mcp-Name header must equal params.taskId ({task_id!r}); got {name!r}",
        )


class TasksExtension(Extension):
    """The 2026-07-28 tasks extension and the 2025-11-25 ``tasks/*`` methods, on taskwarden's rows."""

    identifier = EXTENSION

    def __init__(self, service: TaskService, guard: Guard, callers: CallerOf) -> None:
        self.service = service
        self.guard = guard
        self.callers = callers
        self.views = TaskViews(service)
        self.watchers = LegacyWatchers(service, self.views)

    def methods(self) -> Sequence[MethodBinding]:
        legacy = LEGACY_TASK_VERSIONS
        modern = frozenset(MODERN_PROTOCOL_VERSIONS)
        return (
            MethodBinding("tasks/get", TaskIdParams, self._get, legacy | modern),
            MethodBinding("tasks/cancel", TaskIdParams, self._cancel, legacy | modern),
            MethodBinding("tasks/update", UpdateParams, self._update, modern),
            # Removed by SEP-2663: on 2026-07-28 these are -32601.
            MethodBinding("tasks/result", TaskIdParams, self._result, legacy),
            MethodBinding("tasks/list", PaginatedRequestParams, self._list, legacy),
        )

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        # Only when this very request declares the extension: a client that
        # did not (e.g. `claude -p`) would show a task handle as an error.
        if params.name not in TASK_TOOLS or not _modern(ctx) or not _declares_extension(ctx):
            return await call_next(ctx)
        result = await call_next(ctx)
        task_id = _created_task_id(result)
        if task_id is None:
            return result  # a refusal or an invalid argument: the plain tool result says why
        # The row was committed by the handler, so tasks/get resolves already.
        row = await self.views.row(task_id)
        return {"resultType": "task", **self.views.base(row, modern=True)}

    # -- the methods -----------------------------------------------------------

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        async with self._audited(ctx, "tasks/get", params.task_id, read_only=True):
            self._gate(ctx, params.task_id)
            row = await self.views.row(params.task_id, self.viewer(ctx))
            if _modern(ctx):
                return await self.views.detailed(row)
            return self.views.base(row, modern=False)

    async def _result(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        """2025-11-25: block until the task is terminal, then its tool result."""
        async with self._audited(ctx, "tasks/result", params.task_id, read_only=True):
            row = await self.views.row(params.task_id, self.viewer(ctx))
            while not row.terminal:
                since = self.service.feed.generation
                row = await self.views.row(params.task_id, self.viewer(ctx))
                if row.terminal:
                    break
                await self.service.feed.wait(since, 30.0)
            result = await self.views.tool_result(row)
            result["_meta"] = {RELATED_TASK_META: {"taskId": row.id}}
            return result

    async def _list(self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams) -> dict[str, Any]:
        async with self._audited(ctx, "tasks/list", None, read_only=True, args={"cursor": params.cursor}):
            try:
                page = await self.service.list(cursor=params.cursor, viewer=self.viewer(ctx))
            except InvalidArgument as exc:
                raise MCPError(code=INVALID_PARAMS, message=f"{exc.field}: {exc.message}") from None
            rows = await self.service.store.get_many([t.task_id for t in page.tasks])
            by_id = {r.id: r for r in rows}
            tasks = [self.views.base(by_id[t.task_id], modern=False) for t in page.tasks if t.task_id in by_id]
            result: dict[str, Any] = {"tasks": tasks}
            if page.next_cursor:
                result["nextCursor"] = page.next_cursor
            return result

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: UpdateParams) -> dict[str, Any]:
        args = {"task_id": params.task_id, "input_responses": params.input_responses}
        async with self._audited(ctx, "tasks/update", params.task_id, args=args):
            self._gate(ctx, params.task_id)
            row = await self.views.row(params.task_id, self.viewer(ctx))
            pending = _pending(row) if row.status == TaskStatus.INPUT_REQUIRED else None
            # Keys that are not outstanding (never issued, answered, superseded) are ignored.
            if pending is not None and pending[1] in params.input_responses:
                await self._answer(ctx, row, pending[0], params.input_responses[pending[1]])
            return {}

    async def _answer(self, ctx: ServerRequestContext[Any, Any], row: TaskRow, kind: str, raw: dict[str, Any]) -> None:
        """The answer goes where send-task-message or review-task would put it, decided as that tool."""
        try:
            answer = ElicitResult.model_validate(raw)
        except ValidationError:
            raise MCPError(code=INVALID_PARAMS, message="inputResponses: each response must be an elicitation result") from None
        if answer.action != "accept":
            return  # declined or dismissed: the person keeps waiting
        content = answer.content or {}
        caller = self.callers(ctx)
        humans = self.service.humans
        if humans is None:
            raise MCPError(code=INVALID_PARAMS, message="human workers are not configured on this server")
        if kind == QUESTION:
            text = content.get("answer")
            if not isinstance(text, str) or not text.strip() or len(text) > 20_000:
                raise MCPError(code=INVALID_PARAMS, message="invalid_arguments: answer: must be a string of 1..20000 characters")
            call = Call("send-task-message", {"task_id": row.id, "body": text}, caller.identity, caller.session, via="tasks/update")
            await self._run_guarded(call, lambda: humans.send(caller, row.id, text))
            return
        decision = content.get("decision")
        feedback = content.get("feedback")
        if decision not in ("accept", "request_changes"):
            raise MCPError(code=INVALID_PARAMS, message="invalid_arguments: decision: must be accept or request_changes")
        if feedback is not None and (not isinstance(feedback, str) or len(feedback) > 20_000):
            raise MCPError(code=INVALID_PARAMS, message="invalid_arguments: feedback: must be a string of at most 20000 characters")
        args = {"task_id": row.id, "decision": decision, **({"feedback": feedback} if feedback is not None else {})}
        call = Call("review-task", args, caller.identity, caller.session, via="tasks/update")
        await self._run_guarded(call, lambda: humans.review(caller, row.id, decision, feedback))

    async def _run_guarded(self, call: Call, run: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``run`` as the guard decides ``call``; a refusal is the ``GUARD_REFUSED`` error."""
        try:
            decided = await self.guard.admit(call)
        except UnknownTool:
            raise MCPError(code=METHOD_NOT_FOUND, message=f"Method not found: {call.tool} is not available") from None
        if isinstance(decided, Refusal):
            message = decided.first_line()
            if decided.error == "approval_required":
                message += f" (Here: send {call.via} again.)"
            raise MCPError(code=GUARD_REFUSED, message=message, data=decided.structured())
        try:
            result = await run()
        except InvalidArgument as exc:
            await self.guard.settle(decided, Outcome.TOOL_ERROR)
            raise MCPError(code=INVALID_PARAMS, message=f"invalid_arguments: {exc.field}: {exc.message}") from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.guard.settle(decided, Outcome.ERROR)
            raise
        await self.guard.settle(decided, Outcome.OK)
        return result

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        """Decided as ``cancel-task {task_id}``: the same rules, limits and approval."""
        modern = _modern(ctx)
        caller = self.callers(ctx)
        call = Call("cancel-task", {"task_id": params.task_id}, caller.identity, caller.session, via="tasks/cancel")
        started = time.monotonic()
        try:
            self._gate(ctx, params.task_id)
            row = await self.views.row(params.task_id, self.viewer(ctx))
            if not modern and row.terminal:
                raise MCPError(code=INVALID_PARAMS, message=f"Task {row.id} is already {row.status.value}")
        except MCPError as exc:
            await self.guard.record_request(call, Outcome.PROTOCOL_ERROR, started, reason=exc.error.message)
            raise
        await self._run_guarded(call, lambda: self.service.cancel([row.id], "cancelled through tasks/cancel"))
        if modern:
            return {}  # an ack; the state shows on the next tasks/get
        return self.views.base(await self.views.row(row.id), modern=False)

    # -- helpers -----------------------------------------------------------------

    def viewer(self, ctx: ServerRequestContext[Any, Any]) -> Viewer:
        identity = self.callers(ctx).identity
        return Viewer(identity, self.guard.sees_all(identity))

    def _gate(self, ctx: ServerRequestContext[Any, Any], task_id: str) -> None:
        if _modern(ctx):
            require_client_extension(ctx, EXTENSION)
            _check_name_header(ctx, task_id)

    def _audited(
        self,
        ctx: ServerRequestContext[Any, Any],
        method: str,
        task_id: str | None,
        *,
        read_only: bool = False,
        args: dict[str, Any] | None = None,
    ) -> _AuditScope:
        caller = self.callers(ctx)
        call = Call(method, args if args is not None else {"task_id": task_id}, caller.identity, caller.session, via=method)
        return _AuditScope(self.guard, call, read_only)


class _AuditScope:
    """Audits one ``tasks/*`` request with its outcome, however it ends."""

    def __init__(self, guard: Guard, call: Call, read_only: bool) -> None:
        self.guard, self.call, self.read_only = guard, call, read_only
        self.started = time.monotonic()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            outcome, reason = Outcome.OK, None
        elif isinstance(exc, MCPError):
            outcome, reason = Outcome.PROTOCOL_ERROR, exc.error.message
        elif exc_type is not None and issubclass(exc_type, anyio.get_cancelled_exc_class()):
            outcome, reason = Outcome.CANCELLED, None
        else:
            outcome, reason = Outcome.ERROR, str(exc)
        with anyio.CancelScope(shield=True):
            await self.guard.record_request(self.call, outcome, self.started, reason=reason, read_only=self.read_only)


def _created_task_id(result: Any) -> str | None:
    """The task id a successful spawn-task/message-task result carries."""
    if isinstance(result, CallToolResult):
        if result.is_error or not isinstance(result.structured_content, dict):
            return None
        task_id = result.structured_content.get("task_id")
    elif isinstance(result, dict):
        structured = result.get("structuredContent")
        if result.get("isError") or not isinstance(structured, dict):
            return None
        task_id = structured.get("task_id")
    else:
        return None
    return task_id if isinstance(task_id, str) else None


class LegacyWatchers:
    """``notifications/tasks/status`` for 2025-11-25 sessions, one watcher per task made there."""

    def __init__(self, service: TaskService, views: TaskViews) -> None:
        self.service = service
        self.views = views
        self._tg: anyio.abc.TaskGroup | None = None

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None

    def watch(self, session: Any, task_id: str) -> None:
        if self._tg is not None:
            self._tg.start_soon(self._watch, session, task_id)

    async def _watch(self, session: Any, task_id: str) -> None:
        last: tuple[str, str | None] | None = None
        try:
            while True:
                since = self.service.feed.generation
                row = await self.service.store.get(task_id)
                shown = self.views.base(row, modern=False)
                key = (shown["status"], shown.get("statusMessage"))
                if last is not None and key != last:
                    notification = TaskNotification(method="notifications/tasks/status", params=shown)
                    await session.send_notification(notification)  # type: ignore[arg-type]
                last = key
                if row.terminal:
                    return
                await self.service.feed.wait(since, 30.0)
        except (TaskNotFound, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        except Exception:
            logger.warning("task status notifications for %s stopped", task_id, exc_info=True)


class TaskMiddleware:
    """The whole-result rewrites: 2025-11-25 task surfaces, and 2026-07-28 ``notifications/tasks`` streams.

    Sits outside the guard, so a task-augmented ``tools/call`` passes every
    rule, limit and audit a plain one does.
    """

    def __init__(self, extension: TasksExtension) -> None:
        self.ext = extension
        self.views = extension.views

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        method = ctx.method
        if method == "initialize":
            result = await call_next(ctx)
            if isinstance(result, dict) and result.get("protocolVersion") in LEGACY_TASK_VERSIONS:
                result.setdefault("capabilities", {})["tasks"] = LEGACY_CAPABILITIES
            return result
        if method == "tools/list" and ctx.protocol_version in LEGACY_TASK_VERSIONS:
            result = await call_next(ctx)
            if isinstance(result, dict) and isinstance(result.get("tools"), list):
                for tool in result["tools"]:
                    if isinstance(tool, dict) and tool.get("name") in TASK_TOOLS:
                        tool["execution"] = {"taskSupport": "optional"}
            return result
        if method == "tools/call" and ctx.protocol_version in LEGACY_TASK_VERSIONS:
            params = ctx.params or {}
            if params.get("task") is not None and params.get("name") in TASK_TOOLS:
                return await self._legacy_task_call(ctx, call_next)
        if method == "subscriptions/listen" and _modern(ctx):
            wanted = ((ctx.params or {}).get("notifications") or {}).get("taskIds")
            if wanted is not None:
                return await self._listen(ctx, wanted)
        return await call_next(ctx)

    async def _legacy_task_call(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        result = await call_next(ctx)
        task_id = _created_task_id(result)
        if task_id is None:
            return result
        row = await self.views.row(task_id)
        self.ext.watchers.watch(ctx.session, task_id)
        return {"task": self.views.base(row, modern=False)}

    async def _listen(self, ctx: ServerRequestContext[Any, Any], wanted: Any) -> dict[str, Any]:
        """A ``subscriptions/listen`` stream of ``notifications/tasks`` for the tasks asked for."""
        require_client_extension(ctx, EXTENSION)
        if not isinstance(wanted, list) or not all(isinstance(t, str) for t in wanted) or len(wanted) > 100:
            raise MCPError(code=INVALID_PARAMS, message="notifications.taskIds: must be a list of at most 100 task ids")
        subscription_id = ctx.request_id
        meta = {SUBSCRIPTION_ID_META: subscription_id}
        viewer = self.ext.viewer(ctx)
        rows = await self.ext.service.store.get_many(list(dict.fromkeys(wanted)))
        honored = [r.id for r in rows if viewer.may_see(r.session_owner)]  # unknown ids are not honored
        await ctx.session.send_notification(
            SubscriptionsAcknowledgedNotification(
                params=SubscriptionsAcknowledgedNotificationParams(
                    notifications=SubscriptionFilter.model_validate({"taskIds": honored}), _meta=meta
                )
            ),
            related_request_id=subscription_id,
        )
        feed = self.ext.service.feed
        last: dict[str, tuple[str, float]] = {}
        open_ids = set(honored)
        while open_ids:
            since = feed.generation
            for row in await self.ext.service.store.get_many(sorted(open_ids)):
                key = (row.status.value, row.updated_at)
                if last.get(row.id) != key:
                    last[row.id] = key
                    params = {**await self.views.detailed(row), "_meta": meta}
                    await ctx.session.send_notification(
                        TaskNotification(method="notifications/tasks", params=params),  # type: ignore[arg-type]
                        related_request_id=subscription_id,
                    )
                if row.terminal:
                    open_ids.discard(row.id)
            if open_ids:
                await feed.wait(since, 30.0)
        # Every task is terminal: end the stream gracefully.
        return {"resultType": "complete", "_meta": meta}
