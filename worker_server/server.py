"""Assembling the server: the app's parts, the MCPServer, and its transports."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from guard.budgets import BudgetLedger
from guard.storage.changes import ChangeFeed
from guard.storage.clock import SystemClock
from guard.storage import open_database
from guard.storage.database import Database
from guard.storage.lease import DaemonRegistry
from guard.gate import Call, Guard
from guard.middleware import GuardMiddleware
from worker_server import __version__
from worker_server.config import ConfigError, Settings
from worker_server.hosts import HostLease, LeaseLiveness, ProcessLiveness, reap_lost_turns
from worker_server.humans import Humans
from worker_server.identity import CallerResolver, TokenIdentities
from worker_server.intake import Intake
from worker_server.mcp_tasks import TaskMiddleware, TasksExtension
from worker_server.inbox.accounts import STEPS as ACCOUNT_STEPS
from worker_server.notify.delivery import Deliverer
from worker_server.notify.events import Notices
from worker_server.notify.links import LinkSigner
from worker_server.notify.outbox import Outbox
from worker_server.protocol import ProtocolEdges
from worker_server.runner import Runner
from worker_server.sandbox import Sandbox, SandboxError
from worker_server.service import TaskService
from worker_server.store import Store
from worker_server.log_pages import PagePosition
from worker_server.tools import ToolDeps, build_tools, register_resources, resource_call, tool_lifespan
from worker_server.workers import summary_for_agents
from worker_server.telemetry import wanted, without_sdk_spans

logger = logging.getLogger(__name__)

INSTRUCTIONS = """\
taskwarden runs background work for you. spawn-task hands a prompt to an agent worker (Codex, \
Claude Code, a shell script) or, with worker "human", to a person; it returns at once. wait-task \
blocks until tasks finish or need you (input_required). message-task continues a session; \
cancel-task stops work. Every call passes a policy guard: a result with isError and an "error" \
field (rate_limited, approval_required, policy_denied, ...) says what to do next."""


@dataclass
class App:
    settings: Settings
    db: Database
    feed: ChangeFeed
    store: Store
    runner: Runner | None
    service: TaskService
    guard: Guard
    callers: CallerResolver
    tasks: TasksExtension
    # Notifications: the daemon serves its loop; the inbox and CLI use its parts.
    deliverer: Deliverer
    # Closed by a draining daemon: new agent turns are refused.
    intake: Intake
    # OpenTelemetry, when on (worker_server.telemetry); None: off, at no cost.
    telemetry: Any = None
    # The daemons using this database, and this process's lease among them (if it runs workers).
    registry: DaemonRegistry | None = None
    lease: HostLease | None = None


@asynccontextmanager
async def open_app(
    settings: Settings, *, run_workers: bool = True, background: bool = True, guard_enabled: bool = True,
    telemetry: Any = None, url: str | None = None,
) -> AsyncIterator[App]:
    """Open the database and start the runner; stop every turn on the way out.

    ``run_workers`` runs agent turns (only the MCP server does); ``background``
    keeps human deadlines and reloads the policy (servers and the inbox do,
    one-shot CLI commands do not). A process that runs workers registers in
    the daemon registry (``url``: its inbox over HTTP, shown to the others)
    and holds a lease there while it runs (worker_server.hosts).
    """
    if telemetry is None and background and wanted(settings):
        telemetry = _start_telemetry(settings)
    sandbox = worker_sandbox(settings) if run_workers else None
    if run_workers:
        _say_start_up(settings)
    db = await open_database(settings.db_target)
    feed = db.change_feed()
    feed.start()
    guard: Guard | None = None
    try:
        # People and the outbox first: the store and the guard queue
        # notifications inside their own transactions.
        await db.migrate_component("inbox", ACCOUNT_STEPS)
        outbox = Outbox(db, SystemClock())
        await outbox.migrate()
        notices = Notices(settings, SystemClock())
        store = await Store.open(db, feed, on_events=notices.task_events)
        profiles = settings.profiles()
        # The guard's budget ledger: the runner charges turns' usage to it.
        ledger = BudgetLedger(db, SystemClock())
        registry = DaemonRegistry(db)
        await registry.migrate()
        # One host: an owner lives while its process does. Many hosts: while its lease runs,
        # which is then also how often the others look for one that is gone.
        liveness = LeaseLiveness(registry) if db.dialect == "postgresql" else ProcessLiveness()
        reconcile_s = min(settings.reconcile_s, settings.lease_s) if db.dialect == "postgresql" else settings.reconcile_s
        runner = (
            Runner(
                store, feed, profiles, settings.logs_path, reconcile_s,
                sandbox=sandbox, scratch_dir=settings.scratch_path, budgets=ledger, liveness=liveness,
            )
            if run_workers
            else None
        )  # fmt: skip
        lease = (
            HostLease(registry, runner.owner, lease_s=settings.lease_s, version=__version__, url=url,
                      on_lapse=runner.give_up)
            if runner is not None
            else None
        )  # fmt: skip
        intake = Intake()
        service = TaskService(store, runner, feed, settings, profiles, intake, liveness=liveness)
        humans = Humans(store, feed, settings)
        humans.view = service.view
        service.humans = humans
        callers = CallerResolver(settings.identity)

        async def changes_nothing(call: Call) -> bool:
            # Cancelling tasks that already finished needs nobody's approval.
            if call.tool != "cancel-task":
                return False
            ids = call.args.get("task_id")
            ids = [ids] if isinstance(ids, str) else list(ids or [])
            return await service.cancels_nothing(ids)

        guard = await Guard.open(
            db, feed, policy_path=settings.policy, enabled=guard_enabled, callers=callers.caller,
            inbox_url=settings.inbox_url, resource_calls=resource_call, approval_events=notices,
            changes_nothing=changes_nothing, telemetry=telemetry,
        )  # fmt: skip
        deliverer = Deliverer(
            outbox, guard.approvals, notices, await LinkSigner.for_database(db), settings, feed, SystemClock()
        )
        tasks = TasksExtension(service, guard, callers.caller)
        async with contextlib.AsyncExitStack() as held:
            if lease is not None:
                # Registered before the first claim; removed after the last turn has stopped.
                await held.enter_async_context(lease.held())
            async with anyio.create_task_group() as tg:
                if runner is not None:
                    await runner.reconcile()
                    if isinstance(liveness, LeaseLiveness):
                        # What a daemon of this host that died left running, once its turns were failed elsewhere.
                        await reap_lost_turns(db, registry, liveness.host)
                    await tg.start(runner.serve)
                    if background:  # the daemon (or a server on its own) delivers notifications
                        await tg.start(deliverer.serve)
                if background:
                    await tg.start(humans.keep_deadlines)
                    await tg.start(guard.serve)
                    await tg.start(tasks.watchers.serve)
                    if telemetry is not None:
                        await tg.start(telemetry.serve, store)
                try:
                    yield App(
                        settings, db, feed, store, runner, service, guard, callers, tasks, deliverer, intake,
                        telemetry, registry, lease,
                    )  # fmt: skip
                finally:
                    tg.cancel_scope.cancel()
    finally:
        if guard is not None:
            # Every audit record queued so far is written before the database
            # closes, whether or not guard.serve ran (it does only in background).
            with anyio.CancelScope(shield=True):
                await guard.audit.aclose()
        feed.close()
        await db.close()


def _start_telemetry(settings: Settings) -> Any:
    """OpenTelemetry exporting over OTLP, or None (with a warning) when the SDK is not installed."""
    from worker_server.telemetry import Telemetry, install_exporters

    try:
        install_exporters()
    except ImportError:
        logger.warning("telemetry is on, but the OpenTelemetry SDK is not installed: pip install 'taskwarden[otel]'")
        return None
    logger.info("OpenTelemetry on: traces and metrics go to %s",
                os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "the OTLP default (localhost:4318)"))  # fmt: skip
    return Telemetry(policy_name=str(settings.policy or "built-in"))


def _say_start_up(settings: Settings) -> None:
    """What an operator should know when a server that runs workers starts."""
    note = settings.default_worker_note
    if note is not None:
        (logger.warning if settings.default_worker == "shell" else logger.info)(note)
    if not settings.inside_roots(Path.cwd()):
        logger.warning(
            "the working directory %s is outside allowed_roots (%s): spawn-task without a cwd inside them "
            "will be refused", Path.cwd(), ", ".join(settings.allowed_roots),
        )  # fmt: skip


def worker_sandbox(settings: Settings) -> Sandbox:
    """The sandbox every turn runs in; a server that cannot sandbox as configured does not start."""
    if settings.sandbox_backend == "none":
        logger.warning(
            'sandbox_backend = "none": workers run unsandboxed, as this user, and can read the database '
            "and decide approvals; set sandbox_backend = \"bwrap\" (the default) to sandbox them"
        )
    try:
        return Sandbox.create(
            settings.sandbox_backend, hidden=settings.sandbox_hidden(), read_only=settings.sandbox_read_only()
        )
    except SandboxError as exc:
        raise ConfigError(str(exc)) from None


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
