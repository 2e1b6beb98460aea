"""The MCP server the guard stands in front of: started, watched, restarted.

``Upstream`` keeps one client connection to another MCP server — a command
spoken to over stdio, or a streamable-HTTP URL — through the SDK's public
``ClientSession``. It notices when the server goes away (its stdout ends, or
the HTTP stream fails), makes every request fail with a clear error while it
is down, and either starts it again with back-off or stops the guard, as
configured. Requests the upstream sends back (elicitation, sampling, roots)
and its notifications go to a ``Downstream``: whoever serves our own client.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import mcp_types as types
from mcp import ClientSession
from mcp.client import ClientRequestContext
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

logger = logging.getLogger(__name__)

# JSON-RPC "server error" range: the upstream, not the request, is at fault.
UPSTREAM_DOWN = -32002


@dataclass(frozen=True)
class StdioTarget:
    """An MCP server started as a child process and spoken to over stdio."""

    command: str
    args: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    cwd: str | None = None

    def describe(self) -> str:
        return shlex.join([self.command, *self.args])


@dataclass(frozen=True)
class HttpTarget:
    """An MCP server reached over streamable HTTP."""

    url: str

    def describe(self) -> str:
        return self.url


Target = StdioTarget | HttpTarget


@dataclass(frozen=True)
class RestartPolicy:
    """What to do when the upstream goes away: start it again (with back-off) or stop."""

    restart: bool = True
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    # A connection that lived this long resets the back-off.
    healthy_after_s: float = 30.0


class Downstream(Protocol):
    """Where the upstream's own requests and notifications go (our client)."""

    async def ask_client(self, request: types.ServerRequest, result_type: type[Any]) -> Any:
        """Send a server→client request (elicitation, sampling, roots) to our client."""
        ...

    async def notify_client(self, notification: types.ServerNotification) -> None: ...


class UpstreamExited(Exception):
    """The upstream went away and the guard is configured not to restart it."""


@dataclass
class _State:
    session: ClientSession | None = None
    capabilities: types.ServerCapabilities | None = None
    server_info: types.Implementation | None = None
    instructions: str | None = None
    problem: str = "not started yet"
    retry_at: float | None = None
    generation: int = 0
    changed: anyio.Event = field(default_factory=anyio.Event)


class Upstream:
    def __init__(
        self,
        target: Target,
        downstream: Downstream,
        *,
        restart: RestartPolicy | None = None,
        on_tools_changed: Callable[[], None] | None = None,
        init_timeout_s: float = 30.0,
    ) -> None:
        self.target = target
        self.downstream = downstream
        self.restart = restart or RestartPolicy()
        self.on_tools_changed = on_tools_changed
        self.init_timeout_s = init_timeout_s
        self._state = _State()

    # -- the connection ------------------------------------------------------

    @property
    def capabilities(self) -> types.ServerCapabilities | None:
        return self._state.capabilities

    @property
    def server_info(self) -> types.Implementation | None:
        return self._state.server_info

    @property
    def instructions(self) -> str | None:
        return self._state.instructions

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the upstream connected; ``task_status`` is reported once it first answers.

        Raises ``UpstreamExited`` when it goes away (or cannot start) and
        restarting is off.
        """
        delay = self.restart.first_delay_s
        started = False
        while True:
            began = anyio.current_time()
            try:
                async with self._connect() as ended:
                    if not started:
                        started = True
                        task_status.started()
                    await ended.wait()
                reason = "it closed the connection (exited)"
            except Exception as exc:  # a failed start or a broken transport
                reason = _describe(exc)
            self._set(None, self._gone(reason))
            logger.error("%s", self._state.problem)
            if not started:
                # It never answered: a wrong command or URL, not a crash to ride out.
                raise UpstreamExited(
                    f"the upstream MCP server ({self.target.describe()}) could not be started: {reason}"
                )
            if not self.restart.restart:
                raise UpstreamExited(self._state.problem)
            if anyio.current_time() - began >= self.restart.healthy_after_s:
                delay = self.restart.first_delay_s
            self._state.retry_at = anyio.current_time() + delay
            logger.info("restarting the upstream in %.1f s", delay)
            await anyio.sleep(delay)
            self._state.retry_at = None
            delay = min(delay * 2, self.restart.max_delay_s)

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[anyio.Event]:
        """Connect and initialize; yields the event set when the connection ends."""
        async with self._transport() as (read, write):
            # Relay the transport's messages through our own stream so its end
            # (the server's stdout closing) is seen the moment it happens.
            send, receive = anyio.create_memory_object_stream[SessionMessage | Exception](64)
            ended = anyio.Event()

            async def pump() -> None:
                try:
                    async with send:
                        async for item in read:
                            await send.send(item)
                finally:
                    # Calls from now on fail at once, with the reason.
                    self._set(None, self._gone("it closed the connection (exited)"))
                    ended.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pump)
                session = ClientSession(
                    receive,
                    write,
                    sampling_callback=self._sampling,
                    elicitation_callback=self._elicitation,
                    list_roots_callback=self._roots,
                    message_handler=self._message,
                    client_info=types.Implementation(name="taskwarden-guard", version="1"),
                )
                async with session:
                    with anyio.fail_after(self.init_timeout_s):
                        init = await session.initialize()
                    self._state.capabilities = init.capabilities
                    self._state.server_info = init.server_info
                    self._state.instructions = init.instructions
                    self._set(session, "")
                    if self.on_tools_changed is not None:
                        self.on_tools_changed()  # a restarted server may offer other tools
                    logger.info(
                        "upstream %s connected (%s %s)", self.target.describe(), init.server_info.name,
                        init.server_info.version,
                    )
                    yield ended
                tg.cancel_scope.cancel()

    @asynccontextmanager
    async def _transport(self) -> AsyncIterator[tuple[Any, Any]]:
        target = self.target
        if isinstance(target, StdioTarget):
            params = StdioServerParameters(
                command=target.command, args=list(target.args), env=target.env, cwd=target.cwd
            )
            async with stdio_client(params, errlog=sys.stderr) as (read, write):
                yield read, write
        else:
            async with streamable_http_client(target.url) as streams:
                yield streams[0], streams[1]

    def _gone(self, reason: str) -> str:
        return f"the upstream MCP server ({self.target.describe()}) went away: {reason}"

    def _set(self, session: ClientSession | None, problem: str) -> None:
        state = self._state
        state.session = session
        state.problem = problem
        state.generation += 1
        state.changed.set()
        state.changed = anyio.Event()

    async def session(self, wait_s: float = 0.0) -> ClientSession:
        """The live connection, or ``MCPError`` saying why there is none.

        ``wait_s`` waits that long for a first start or a restart in progress.
        """
        with anyio.move_on_after(wait_s):
            while self._state.session is None:
                await self._state.changed.wait()
        if self._state.session is None:
            raise MCPError(code=UPSTREAM_DOWN, message=self.down_message())
        return self._state.session

    def down_message(self) -> str:
        state = self._state
        message = state.problem or "the upstream MCP server is not connected"
        if state.retry_at is not None:
            wait = max(0.0, state.retry_at - anyio.current_time())
            message += f"; the guard restarts it in {wait:.1f} s"
        elif self.restart.restart:
            message += "; the guard is restarting it"
        return message + ". The call was not forwarded."

    # -- requests to the upstream --------------------------------------------

    async def request(
        self,
        request: types.ClientRequest,
        result_type: Any,
        *,
        progress: Callable[[float, float | None, str | None], Awaitable[None]] | None = None,
    ) -> Any:
        session = await self.session()
        try:
            return await session.send_request(request, result_type, progress_callback=progress)
        except MCPError as exc:
            if exc.error.code == types.CONNECTION_CLOSED:
                if not self._state.problem:
                    self._set(None, self._gone("it closed the connection"))
                raise MCPError(code=UPSTREAM_DOWN, message=self.down_message()) from None
            raise

    async def list_tools(self) -> list[types.Tool]:
        """Every tool the upstream offers, across pages."""
        tools: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(1000):  # a server that pages forever is cut off
            params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await self.request(types.ListToolsRequest(params=params), types.ListToolsResult)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    # -- what the upstream sends us ------------------------------------------

    async def _elicitation(self, context: ClientRequestContext, params: types.ElicitRequestParams) -> Any:
        return await self._ask(types.ElicitRequest(params=params), types.ElicitResult)

    async def _sampling(self, context: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
        return await self._ask(types.CreateMessageRequest(params=params), types.CreateMessageResult)

    async def _roots(self, context: ClientRequestContext) -> Any:
        return await self._ask(types.ListRootsRequest(), types.ListRootsResult)

    async def _ask(self, request: types.ServerRequest, result_type: type[Any]) -> Any:
        try:
            return await self.downstream.ask_client(request, result_type)
        except MCPError as exc:
            return exc.error
        except Exception as exc:
            logger.warning("relaying %s to the client failed: %s", request.method, exc)
            return types.ErrorData(code=types.INTERNAL_ERROR, message=f"the guard could not ask its client: {exc}")

    async def _message(self, message: Any) -> None:
        if isinstance(message, Exception):
            logger.warning("upstream transport: %s", message)
            return
        if isinstance(message, types.ToolListChangedNotification) and self.on_tools_changed is not None:
            self.on_tools_changed()
        try:
            await self.downstream.notify_client(message)
        except Exception as exc:  # the client went away; nothing to relay to
            logger.debug("dropped %s for the client: %s", getattr(message, "method", message), exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    if isinstance(exc, TimeoutError):
        return "it did not answer initialize in time"
    if isinstance(exc, FileNotFoundError):
        return f"command not found: {exc.filename or exc}"
    return f"{type(exc).__name__}: {exc}"
