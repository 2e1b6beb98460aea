"""The guard in front of any MCP server: ``taskwarden guard -- CMD ARGS…``.

Our client talks to a low-level SDK ``Server`` whose handlers relay every
request to the ``Upstream``; the same ``GuardMiddleware`` that guards
taskwarden's own tools sits in front of them, so ``tools/list`` loses hidden
tools and each ``tools/call`` is decided (hide, deny, conditions, approval,
limits), forwarded only once admitted, and audited. The guard learns the
tools — input schemas for argument checks, annotations for audit batching —
from the upstream's own ``tools/list``. Prompts and resources the policy's
``hide`` names are absent from their lists and unknown when asked for.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from mcp.server.auth.provider import TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions, Server
from mcp.server.session import ServerSession
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from starlette.applications import Starlette

from guard.storage import open_database
from guard.gate import Guard
from guard.middleware import GuardMiddleware
from guard.upstream import RestartPolicy, Upstream

logger = logging.getLogger(__name__)


class ClientRelay:
    """Delivers the upstream's requests and notifications to our client.

    A request from the upstream (elicitation, sampling) belongs to a tool call
    in flight, so it goes out on that call's channel; with several calls in
    flight, the newest one's. Notifications go to the client that spoke last.
    """

    def __init__(self) -> None:
        self._calls: list[ServerRequestContext[Any, Any]] = []
        self._last: ServerSession | None = None

    def saw(self, ctx: ServerRequestContext[Any, Any]) -> None:
        self._last = ctx.session

    @contextmanager
    def in_flight(self, ctx: ServerRequestContext[Any, Any]) -> Any:
        self._calls.append(ctx)
        try:
            yield
        finally:
            self._calls.remove(ctx)

    async def ask_client(self, request: types.ServerRequest, result_type: type[Any]) -> Any:
        for ctx in reversed(self._calls):
            if ctx.session.can_send_request:
                return await ctx.session.send_request(
                    request, result_type, metadata=ServerMessageMetadata(related_request_id=ctx.request_id)
                )
        if self._last is not None and not self._calls:
            # Not about a call (roots/list after initialize): the connection's own channel.
            return await self._last.send_request(request, result_type)
        why = "has not connected yet" if self._last is None else "has no call in flight that can carry it"
        raise MCPError(code=types.INVALID_REQUEST, message=f"the guard's client cannot take {request.method}: it {why}")

    async def notify_client(self, notification: types.ServerNotification) -> None:
        if self._last is not None:
            await self._last.send_notification(notification)


def _without_meta(params: Any) -> Any:
    """The downstream's ``_meta`` (its progress token) means nothing upstream."""
    if params is None or getattr(params, "meta", None) is None:
        return params
    return params.model_copy(update={"meta": None})


class GuardProxy:
    """The guarded server our client sees, relaying to ``upstream``."""

    def __init__(self, guard: Guard, upstream: Upstream, relay: ClientRelay, *, name: str) -> None:
        self.guard = guard
        self.upstream = upstream
        self.relay = relay
        self.name = name
        guard.set_tools(self)  # the guard learns tools from us, i.e. from the upstream

    async def list_tools(self) -> list[types.Tool]:
        return await self.upstream.list_tools()

    def tools_changed(self) -> None:
        """The upstream's tools changed (or it restarted): learn them again on next use."""
        self.guard.set_tools(self)

    # -- handlers ------------------------------------------------------------

    async def _list_tools(self, ctx: ServerRequestContext[Any, Any], params: Any) -> Any:
        self.relay.saw(ctx)
        return await self.upstream.request(types.ListToolsRequest(params=_without_meta(params)), types.ListToolsResult)

    async def _call_tool(self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        # Only admitted calls reach here: GuardMiddleware decided this one already.
        self.relay.saw(ctx)
        progress = None
        if ctx.meta is not None and ctx.meta.get("progress_token") is not None:

            async def progress(value: float, total: float | None, message: str | None) -> None:
                await ctx.session.report_progress(value, total, message)

        forward = types.CallToolRequestParams(name=params.name, arguments=params.arguments)
        with self.relay.in_flight(ctx):
            # No client-side output-schema check here: the client at the other end does its own.
            return await self.upstream.request(
                types.CallToolRequest(params=forward), types.CallToolResult, progress=progress
            )

    async def _list_prompts(self, ctx: ServerRequestContext[Any, Any], params: Any) -> Any:
        self.relay.saw(ctx)
        result = await self.upstream.request(
            types.ListPromptsRequest(params=_without_meta(params)), types.ListPromptsResult
        )
        result.prompts = [p for p in result.prompts if not self.guard.is_hidden(p.name)]
        return result

    async def _get_prompt(self, ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams) -> Any:
        self.relay.saw(ctx)
        if self.guard.is_hidden(params.name):
            raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown prompt: {params.name}")
        return await self.upstream.request(types.GetPromptRequest(params=_without_meta(params)), types.GetPromptResult)

    async def _list_resources(self, ctx: ServerRequestContext[Any, Any], params: Any) -> Any:
        self.relay.saw(ctx)
        result = await self.upstream.request(
            types.ListResourcesRequest(params=_without_meta(params)), types.ListResourcesResult
        )
        result.resources = [r for r in result.resources if not self.guard.is_hidden(str(r.uri))]
        return result

    async def _list_templates(self, ctx: ServerRequestContext[Any, Any], params: Any) -> Any:
        self.relay.saw(ctx)
        result = await self.upstream.request(
            types.ListResourceTemplatesRequest(params=_without_meta(params)), types.ListResourceTemplatesResult
        )
        result.resource_templates = [
            t for t in result.resource_templates if not self.guard.is_hidden(t.uri_template)
        ]
        return result

    async def _read_resource(self, ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams) -> Any:
        self.relay.saw(ctx)
        if self.guard.is_hidden(str(params.uri)):
            raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown resource: {params.uri}")
        return await self.upstream.request(
            types.ReadResourceRequest(params=_without_meta(params)), types.ReadResourceResult
        )

    async def _subscribe(self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams) -> Any:
        self.relay.saw(ctx)
        if self.guard.is_hidden(str(params.uri)):
            raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown resource: {params.uri}")
        return await self.upstream.request(types.SubscribeRequest(params=_without_meta(params)), types.EmptyResult)

    async def _unsubscribe(self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams) -> Any:
        self.relay.saw(ctx)
        return await self.upstream.request(types.UnsubscribeRequest(params=_without_meta(params)), types.EmptyResult)

    async def _complete(self, ctx: ServerRequestContext[Any, Any], params: types.CompleteRequestParams) -> Any:
        self.relay.saw(ctx)
        return await self.upstream.request(types.CompleteRequest(params=_without_meta(params)), types.CompleteResult)

    async def _set_level(self, ctx: ServerRequestContext[Any, Any], params: types.SetLevelRequestParams) -> Any:
        self.relay.saw(ctx)
        return await self.upstream.request(types.SetLevelRequest(params=_without_meta(params)), types.EmptyResult)

    # -- the server ----------------------------------------------------------

    def server(self) -> Server[Any]:
        """A low-level server offering what the upstream offers, behind the guard."""
        caps = self.upstream.capabilities or types.ServerCapabilities(tools=types.ToolsCapability())
        info = self.upstream.server_info
        server: Server[Any] = Server(
            self.name,
            version=info.version if info is not None else "",
            instructions=self.upstream.instructions,
        )
        # Registered by hand: the handlers a server has decide what it advertises.
        handlers: list[tuple[bool, str, type[Any], Callable[..., Any]]] = [
            (caps.tools is not None, "tools/list", types.PaginatedRequestParams, self._list_tools),
            (caps.tools is not None, "tools/call", types.CallToolRequestParams, self._call_tool),
            (caps.prompts is not None, "prompts/list", types.PaginatedRequestParams, self._list_prompts),
            (caps.prompts is not None, "prompts/get", types.GetPromptRequestParams, self._get_prompt),
            (caps.resources is not None, "resources/list", types.PaginatedRequestParams, self._list_resources),
            (caps.resources is not None, "resources/templates/list", types.PaginatedRequestParams,
             self._list_templates),
            (caps.resources is not None, "resources/read", types.ReadResourceRequestParams, self._read_resource),
            (bool(caps.resources and caps.resources.subscribe), "resources/subscribe",
             types.SubscribeRequestParams, self._subscribe),
            (bool(caps.resources and caps.resources.subscribe), "resources/unsubscribe",
             types.UnsubscribeRequestParams, self._unsubscribe),
            (caps.completions is not None, "completion/complete", types.CompleteRequestParams, self._complete),
            (caps.logging is not None, "logging/setLevel", types.SetLevelRequestParams, self._set_level),
        ]
        for offered, method, params_type, handler in handlers:
            if offered:
                server.add_request_handler(method, params_type, handler)
        # The guard is the single way in: every tools/call passes it first.
        server.middleware.append(GuardMiddleware(self.guard))
        return server

    def init_options(self, server: Server[Any]) -> Any:
        caps = self.upstream.capabilities
        return server.create_initialization_options(
            NotificationOptions(
                prompts_changed=bool(caps and caps.prompts and caps.prompts.list_changed),
                resources_changed=bool(caps and caps.resources and caps.resources.list_changed),
                tools_changed=bool(caps and caps.tools and caps.tools.list_changed),
            )
        )

    async def serve_stdio(self) -> None:
        from guard.stdio import serve_stdio_streams

        server = self.server()
        async with serve_stdio_streams() as (read, write):
            await server.run(read, write, self.init_options(server))

    def http_app(
        self,
        *,
        host: str,
        token_verifier: TokenVerifier | None,
        issuer: str,
        transport_security: TransportSecuritySettings | None,
    ) -> Starlette:
        server = self.server()
        kwargs: dict[str, Any] = {}
        if token_verifier is not None:
            kwargs["token_verifier"] = token_verifier
            kwargs["auth"] = AuthSettings(issuer_url=issuer, resource_server_url=None)
        return server.streamable_http_app(host=host, transport_security=transport_security, **kwargs)


async def run_guard(
    upstream_target: Any,
    *,
    db_path: str | Path,
    policy_path: str | Path | None,
    name: str,
    callers: Callable[[Any], Any] | None,
    restart: RestartPolicy,
    http: tuple[str, int] | None = None,
    token_verifier: TokenVerifier | None = None,
    transport_security: TransportSecuritySettings | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Serve ``upstream_target`` behind the guard until our client leaves (stdio)
    or a signal stops the HTTP listener (on ``sock`` when given: bound already). Raises ``UpstreamExited`` when the
    upstream cannot be started, or goes away and ``restart`` says not to restart it."""
    db = await open_database(db_path)
    feed = db.change_feed()
    feed.start()
    try:
        guard = await Guard.open(db, feed, policy_path=policy_path, callers=callers)
        relay = ClientRelay()
        proxy: GuardProxy | None = None

        def tools_changed() -> None:
            if proxy is not None:
                proxy.tools_changed()

        upstream = Upstream(upstream_target, relay, restart=restart, on_tools_changed=tools_changed)
        proxy = GuardProxy(guard, upstream, relay, name=name)
        async with anyio.create_task_group() as tg:
            await tg.start(guard.serve)
            await tg.start(upstream.run)
            if http is None:
                logger.info("guarding %s on stdio (db %s)", upstream_target.describe(), db_path)
                await proxy.serve_stdio()
            else:
                import uvicorn

                host, port = http
                app = proxy.http_app(
                    host=host, token_verifier=token_verifier, issuer=f"http://{host}:{port}",
                    transport_security=transport_security,
                )
                config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on")
                logger.info("guarding %s at http://%s:%d/mcp", upstream_target.describe(), host, port)
                await uvicorn.Server(config).serve(sockets=[sock] if sock is not None else None)
            tg.cancel_scope.cancel()
    finally:
        feed.close()
        await db.close()
