"""The guard as MCP server middleware: the single way into every tool.

``tools/list`` loses hidden tools; ``tools/call`` is decided before the
handler runs. A hidden or absent tool is the JSON-RPC error "Unknown tool";
a refusal is an ``isError`` result with structured content; an approval can
be asked of the person at the client through elicitation, in the SDK's
resolver form, which works on every protocol version.
"""

from __future__ import annotations

import getpass
import json
import logging
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import AcceptedElicitation, Context, Elicit, Resolve
from mcp.server.mcpserver.resolve import build_resolver_plans, resolve_arguments
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, CallToolRequestParams, CallToolResult, InputRequiredResult, TextContent
from mcp_types.version import is_version_at_least
from pydantic import BaseModel, Field, ValidationError

from guard.approvals import Approval
from guard.audit import Outcome
from guard.budgets import reset_admitted, set_admitted
from guard.outcomes import Refusal
from guard.gate import Admission, InputRequired, Call, Guard, UnknownTool

logger = logging.getLogger(__name__)

# The first protocol version that elicits by returning input_required.
_ROUNDS_VERSION = "2026-07-28"


class ApprovalAnswer(BaseModel):
    approve: bool = Field(description="Allow this call to run?")


class ClientAsker:
    """Asks the person at the MCP client, through the SDK's resolver machinery."""

    def __init__(self, ctx: ServerRequestContext[Any, Any]) -> None:
        self.ctx = ctx
        version = ctx.protocol_version
        self.rounds = version is not None and is_version_at_least(version, _ROUNDS_VERSION)

    @staticmethod
    def supported(ctx: ServerRequestContext[Any, Any]) -> bool:
        caps = ctx.session.client_capabilities
        elicitation = caps.elicitation if caps is not None else None
        # A bare `elicitation: {}` means form support; url-only does not.
        return elicitation is not None and (elicitation.form is not None or elicitation.url is None)

    async def ask(self, approval: Approval, call: Call) -> bool | None:
        args = json.dumps(approval.args, ensure_ascii=False, sort_keys=True)
        message = (
            f"taskwarden: {call.identity} wants to call {call.tool} with {args}. "
            f"The policy holds it for approval ({approval.rule_id}: {approval.reason}). "
            f"Approval {approval.id}. Allow it?"
        )

        async def approval_question() -> Elicit[ApprovalAnswer]:
            return Elicit(message, ApprovalAnswer)

        wanted = {"answer": (Resolve(approval_question), True)}
        plans = build_resolver_plans(wanted, set())
        params = CallToolRequestParams.model_validate(self.ctx.params or {}, by_name=False)
        context: Context[Any, Any] = Context(request_context=self.ctx, input_params=params)
        resolved = await resolve_arguments(wanted, plans, {}, context)
        if isinstance(resolved, InputRequiredResult):
            raise InputRequired(resolved)
        outcome = resolved["answer"]
        # Anything but an explicit "accept, approve: true" is a no.
        return isinstance(outcome, AcceptedElicitation) and bool(outcome.data.approve)


class GuardMiddleware:
    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._fallback_identity = getpass.getuser()

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method == "tools/list":
            return self._without_hidden(await call_next(ctx))
        if ctx.method == "resources/read":
            return await self._read_resource(ctx, call_next)
        if ctx.method != "tools/call":
            return await call_next(ctx)
        params = ctx.params or {}
        name, args = params.get("name"), params.get("arguments") or {}
        if not isinstance(name, str) or not isinstance(args, dict):
            return await call_next(ctx)  # malformed: the SDK answers INVALID_PARAMS

        call = self._call(ctx, name, args)
        asker = ClientAsker(ctx) if ClientAsker.supported(ctx) else None
        try:
            decided = await self.guard.admit(call, asker)
        except UnknownTool:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown tool: {_shown_name(name)}") from None
        except InputRequired as later:
            return later.result
        if isinstance(decided, Refusal):
            return refusal_result(decided)
        return await self._run(ctx, call_next, decided)

    async def _read_resource(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """A resource read passes the guard as the tool call the host maps it to (and is audited)."""
        uri = (ctx.params or {}).get("uri")
        mapped = self.guard.resource_calls(uri) if isinstance(uri, str) and self.guard.resource_calls else None
        if mapped is None:
            return await call_next(ctx)
        tool, args = mapped
        call = self._call(ctx, tool, args, via="resources/read", target=uri)
        try:
            decided = await self.guard.admit(call, None)  # a read is never held for a client's answer
        except UnknownTool:
            raise MCPError(code=INVALID_PARAMS, message=f"Resource not found: {uri}", data={"uri": uri}) from None
        if isinstance(decided, Refusal):
            raise MCPError(code=INVALID_PARAMS, message=decided.text(), data={**decided.structured(), "uri": uri})
        return await self._run(ctx, call_next, decided)

    async def _run(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext, admission: Admission) -> HandlerResult:
        # The handler reads the budgets it must record on the turns it starts.
        token = set_admitted(admission.budgets)
        try:
            result = await call_next(ctx)
        except (MCPError, ValidationError):
            with anyio.CancelScope(shield=True):
                await self.guard.settle(admission, Outcome.PROTOCOL_ERROR)
            raise
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self.guard.settle(admission, Outcome.CANCELLED)
            raise
        except Exception:
            with anyio.CancelScope(shield=True):
                await self.guard.settle(admission, Outcome.ERROR)
            raise
        finally:
            reset_admitted(token)
        failed = isinstance(result, dict) and bool(result.get("isError"))
        await self.guard.settle(admission, Outcome.TOOL_ERROR if failed else Outcome.OK)
        return result

    def _call(
        self,
        ctx: ServerRequestContext[Any, Any],
        name: str,
        args: dict[str, Any],
        via: str | None = None,
        target: str | None = None,
    ) -> Call:
        if self.guard.callers is not None:
            caller = self.guard.callers(ctx)
            return Call(name, args, caller.identity, caller.session, via, target)
        return Call(name, args, self._fallback_identity, f"conn-{id(ctx.session):x}", via, target)

    def _without_hidden(self, result: HandlerResult) -> HandlerResult:
        if isinstance(result, dict) and isinstance(result.get("tools"), list):
            result["tools"] = [
                t for t in result["tools"] if not (isinstance(t, dict) and self.guard.is_hidden(str(t.get("name"))))
            ]
        return result


# No tool's name is longer; an agent's megabyte "name" is not echoed back whole.
MAX_SHOWN_NAME = 200


def _shown_name(name: str) -> str:
    return name if len(name) <= MAX_SHOWN_NAME else f"{name[:MAX_SHOWN_NAME]}… ({len(name)} characters)"


def refusal_result(refusal: Refusal) -> CallToolResult:
    """The ``isError`` result for a refusal; its structured content fits ``admit_refusals`` schemas."""
    return CallToolResult(
        content=[TextContent(type="text", text=refusal.text())],
        structured_content=refusal.structured(),
        is_error=True,
    )
