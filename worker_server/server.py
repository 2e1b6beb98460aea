"""The MCPServer over an open ``App`` (worker_server.app), and its transports: stdio,
streamable HTTP with the inbox beside it, the inbox alone."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from guard.middleware import GuardMiddleware
from worker_server import __version__
from worker_server.app import App, open_app
from worker_server.config import ConfigError, Settings
from worker_server.identity import TokenIdentities
from worker_server.mcp_tasks import TaskMiddleware
from worker_server.protocol import ProtocolEdges
from worker_server.log_pages import PagePosition
from worker_server.tools import ToolDeps, build_tools, register_resources, tool_lifespan
from worker_server.workers import summary_for_agents
from worker_server.telemetry import without_sdk_spans

logger = logging.getLogger(__name__)

INSTRUCTIONS = """\
taskwarden runs background work for you. spawn-task hands a prompt to an agent worker (Codex, \
Claude Code, a shell script) or, with worker "human", to a person; it returns at once. wait-task \
blocks until tasks finish or need you (input_required). message-task continues a session; \
cancel-task stops work. Every call passes a policy guard: a result with isError and an "error" \
field (rate_limited, approval_required, policy_denied, ...) says what to do next."""


def build_mcp(app: App, *, token_auth: bool = False, issuer: str = "http://127.0.0.1") -> MCPServer[Any]:
    kwargs: dict[str, Any] = {}
    if token_auth:
        kwargs["token_verifier"] = TokenIdentities(app.settings.identities)
        kwargs["auth"] = AuthSettings(issuer_url=issuer, resource_server_url=None)
    mcp: MCPServer[Any] = MCPServer(
        "taskwarden",
        title="taskwarden",
        instructions=INSTRUCTIONS,
        version=__version__,
        log_level=app.settings.log_level,
        # The guard is the single way in: every tools/call passes it first.
        # Task surfaces that rewrite whole results sit outside it, so a
        # task-augmented call passes the same rules and limits.
        middleware=[TaskMiddleware(app.tasks), GuardMiddleware(app.guard), PagePosition()],
        # MCP Tasks (2026-07-28 extension and the 2025-11-25 tasks/* methods).
        extensions=[app.tasks],
        tools=build_tools(summary_for_agents(app.settings)),
        # What the tools and resources work with, handed to each request by the SDK.
        lifespan=tool_lifespan(ToolDeps(app.service, app.callers, app.guard.sees_all)),
        **kwargs,
    )
    if app.telemetry is None:
        # The SDK puts its span middleware on every server; with telemetry off it goes.
        # (The SDK documents dropping it from the list as the way to opt out.)
        mcp.middleware[:] = without_sdk_spans(mcp.middleware)
    register_resources(mcp)
    mcp.middleware.append(ProtocolEdges(mcp.list_prompts))
    app.guard.set_tools(mcp)
    return mcp


def watch_children_with_pidfds() -> None:
    """Reap worker processes through pidfds where Python does not already (3.11 on Linux).

    asyncio's default child watcher on 3.11 starts a thread per process to
    wait for it; a pidfd is one more file descriptor in the event loop's
    selector instead (3.12+ does this by itself). Call it once, from inside
    the loop that runs for the life of the process.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))  # kernels before 5.3 have no pidfds
    except OSError:
        return
    import asyncio

    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)


async def serve_stdio(settings: Settings) -> None:
    watch_children_with_pidfds()
    async with open_app(settings) as app, _stop_on_signals() as scope:
        with scope:
            mcp = build_mcp(app)
            logger.info("taskwarden %s serving MCP on stdio (db %s)", __version__, settings.db_path)
            await mcp.run_stdio_async()


def check_http(settings: Settings, host: str, *, allow_anonymous: bool) -> None:
    """Refuse an HTTP listener that would let strangers in, before anything starts."""
    if allow_anonymous and not _is_loopback(host):
        raise ConfigError(f"--allow-anonymous is only allowed on a loopback address, not {host}")
    if not allow_anonymous and not settings.identities:
        raise ConfigError(
            "HTTP needs bearer tokens: add [identities.NAME] token_sha256 = \"...\" to the config, "
            "or listen on 127.0.0.1 with --allow-anonymous"
        )


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket for ``--http HOST:PORT``, bound before anything else starts,
    so a port that is taken is one clear error instead of a server that half started."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--http {host}:{port}: cannot resolve {host!r} ({exc.strerror})") from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is taken: another program listens there; pick another with --http HOST:PORT"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


async def serve_http(
    settings: Settings, host: str, port: int, *, allow_anonymous: bool, with_inbox: bool = True,
    sock: socket.socket | None = None,
) -> None:  # fmt: skip
    check_http(settings, host, allow_anonymous=allow_anonymous)
    watch_children_with_pidfds()
    async with open_app(settings) as app:
        await serve_http_app(app, host, port, allow_anonymous=allow_anonymous, with_inbox=with_inbox, sock=sock)


async def serve_http_app(
    app: App, host: str, port: int, *, allow_anonymous: bool, with_inbox: bool = True,
    sock: socket.socket | None = None,
) -> None:  # fmt: skip
    """Serve /mcp (and the inbox) for ``app`` until SIGTERM/SIGINT.

    uvicorn handles SIGTERM/SIGINT itself and shuts down gracefully (open
    streams end, the MCP session manager stops); then open_app stops turns.
    """
    import uvicorn

    mcp = build_mcp(app, token_auth=not allow_anonymous, issuer=f"http://{host}:{port}")
    starlette_app = mcp.streamable_http_app(host=host, transport_security=_rebinding_guard(host))
    if with_inbox:
        from worker_server.inbox.app import mount_inbox

        mount_inbox(starlette_app, app)
    config = uvicorn.Config(starlette_app, host=host, port=port, log_config=None, access_log=False, lifespan="on")
    logger.info("taskwarden %s serving MCP at http://%s:%d/mcp", __version__, host, port)
    await run_uvicorn(uvicorn.Server(config), sock)


async def serve_inbox(settings: Settings, host: str, port: int, sock: socket.socket | None = None) -> None:
    """``taskwarden inbox``: the inbox alone, at ``http://HOST:PORT/inbox``, against the same database.

    SIGTERM/SIGINT stop it gracefully (uvicorn's own handling): it stops
    accepting, event streams end, requests in flight finish, for at most
    ``GRACEFUL_S``; a second Ctrl-C cuts them off.
    """
    import uvicorn

    from worker_server.inbox.app import GRACEFUL_S, MOUNT, inbox_root

    async with open_app(settings, run_workers=False) as app:
        config = uvicorn.Config(
            inbox_root(app), host=host, port=port, log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_S,
        )  # fmt: skip
        logger.info("taskwarden %s serving the inbox at http://%s:%d%s/ (db %s)",
                    __version__, host, port, MOUNT, settings.db_path)  # fmt: skip
        await run_uvicorn(uvicorn.Server(config), sock)


async def run_uvicorn(server: Any, sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM/SIGINT, which uvicorn handles gracefully.

    uvicorn raises the signal that stopped it again once it has shut down; a
    no-op handler for that moment lets our context managers close the
    database and stop turns instead of the process dying there.
    """
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, _stopped) for sig in handled}
    try:
        await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(signum: int, frame: Any) -> None:
    logger.info("stopping (%s)", signal.Signals(signum).name)


@asynccontextmanager
async def _stop_on_signals() -> AsyncIterator[anyio.CancelScope]:
    """A scope that SIGTERM/SIGINT cancel, so turns are stopped cleanly."""
    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    logger.info("received %s; stopping", signal.Signals(signum).name)
                    scope.cancel()
                    return

        tg.start_soon(watch)
        try:
            yield scope
        finally:
            tg.cancel_scope.cancel()


def _rebinding_guard(host: str) -> TransportSecuritySettings | None:
    """Host and Origin checks for a loopback listener (DNS rebinding).

    The SDK turns them on by itself only for 127.0.0.1, localhost and ::1;
    any loopback address gets them here. Elsewhere bearer tokens guard /mcp.
    """
    if not _is_loopback(host):
        return None
    hosts = sorted({host, "127.0.0.1", "localhost", "[::1]" if host != "::1" else "[::1]"})
    shown = [f"[{h}]" if ":" in h and not h.startswith("[") else h for h in hosts]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{h}:*" for h in shown],
        allowed_origins=[f"http://{h}:*" for h in shown],
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
