"""The composition root: every part of a taskwarden process, made and wired in one place.

``open_app`` opens the database and makes the parts in the order they depend
on each other (people and the outbox, the store, the runner, the people's
side of human tasks, the task service, the guard, notifications), handing
each what it needs when it is made; ``App`` holds them for the hosts: the MCP
server and its transports (worker_server.server), the daemon, the inbox and
the CLI. Nothing here imports a host.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from guard.budgets import BudgetLedger
from guard.storage.changes import ChangeFeed
from guard.storage.clock import SystemClock
from guard.storage import open_database
from guard.storage.database import Database
from guard.storage.lease import DaemonRegistry
from guard.gate import Call, Guard
from worker_server import __version__
from worker_server.config import ConfigError, Settings
from worker_server.hosts import HostLease, LeaseLiveness, ProcessLiveness, reap_lost_turns
from worker_server.humans import Humans
from worker_server.identity import CallerResolver
from worker_server.intake import Intake
from worker_server.mcp_tasks import TasksExtension
from worker_server.inbox.accounts import STEPS as ACCOUNT_STEPS
from worker_server.notify.delivery import Deliverer
from worker_server.notify.events import Notices
from worker_server.notify.links import LinkSigner
from worker_server.notify.outbox import Outbox
from worker_server.runner import Runner
from worker_server.sandbox import Sandbox, SandboxError
from worker_server.service import TaskService
from worker_server.store import Store
from worker_server.tools import resource_call
from worker_server.telemetry import wanted

logger = logging.getLogger(__name__)


@dataclass
class App:
    """Every part of an open taskwarden process (``open_app`` makes them)."""

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
        humans = Humans(store, feed, settings)
        service = TaskService(store, runner, feed, settings, profiles, intake, liveness=liveness, humans=humans)
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
