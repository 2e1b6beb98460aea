"""Which daemons are alive, and what a daemon does about its own lease.

A turn in the store carries its owner, the (pid, start time) of the daemon
that runs it. Whether that owner is still alive decides whether its
``working`` turns are left alone or ended, and whether its queued turns may
be taken by another daemon. How to tell is a dependency given to the runner
and the task service (``Liveness``):

- SQLite (one host): the owner's process exists (``ProcessLiveness``).
- A server database (many hosts): the owner's lease in the daemon registry
  (guard.storage.lease) has not lapsed; when the owner ran on this host, its
  process must exist too (``LeaseLiveness``). A lapsed owner's working turns
  end ``failed`` with ``interrupted: host lost``; only a daemon on the same
  host kills what such a turn left running (a pid means nothing elsewhere).

``HostLease`` registers this daemon, renews its lease every third of
``lease_s`` and removes it on a clean exit. A daemon that finds its own lease
lapsed (it stalled: a suspended VM, a long pause) knows the others have given
up its running turns; it stops them here and registers again.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import anyio.to_thread
import psutil

from guard.storage.database import Database
from guard.storage.lease import FORGET_AFTER_S, DaemonRecord, DaemonRegistry

logger = logging.getLogger(__name__)

Owner = tuple[int | None, float | None]

#: A turn whose daemon stopped on this host (SQLite, or a restart found it).
INTERRUPTED = "interrupted: server restarted"
#: A turn whose daemon's lease lapsed (a server database).
HOST_LOST = "interrupted: host lost"


def current_owner() -> tuple[int, float]:
    """This process's identity in the store: pid plus start time (pids get reused)."""
    return os.getpid(), psutil.Process().create_time()


def owner_alive(pid: int | None, started: float | None) -> bool:
    """Whether the process (pid, start time) still runs on this host."""
    if pid is None or started is None:
        return False
    try:
        return abs(psutil.Process(pid).create_time() - started) < 0.01
    except psutil.Error:
        return False


def host_name() -> str:
    return socket.gethostname()


class Liveness(Protocol):
    """How the runner and the task service tell whether a turn's owner is alive."""

    #: The status message of a working turn whose owner is gone.
    lost_message: str

    async def alive(self, owner: Owner) -> bool: ...

    async def on_this_host(self, owner: Owner) -> bool:
        """Whether the owner's processes are on this host (only then may this host kill them)."""
        ...


class ProcessLiveness:
    """One host (SQLite): an owner lives while its process does."""

    lost_message = INTERRUPTED

    async def alive(self, owner: Owner) -> bool:
        return owner_alive(*owner)

    async def on_this_host(self, owner: Owner) -> bool:
        return True


class LeaseLiveness:
    """Many hosts (a server database): an owner lives while its lease runs."""

    lost_message = HOST_LOST

    def __init__(self, registry: DaemonRegistry, host: str | None = None) -> None:
        self.registry = registry
        self.host = host or host_name()

    async def alive(self, owner: Owner) -> bool:
        pid, started = owner
        if pid is None or started is None:
            return False
        now, record = await self.registry.find((pid, started))
        if record is None:
            # Never registered (or its row is gone): only a live process here vouches for it.
            return owner_alive(pid, started)
        if not record.live(now):
            return False
        # On this host a process that died is known at once, before its lease runs out.
        return record.host != self.host or owner_alive(pid, started)

    async def on_this_host(self, owner: Owner) -> bool:
        pid, started = owner
        if pid is None or started is None:
            return False
        _, record = await self.registry.find((pid, started))
        if record is None:
            return owner_alive(pid, started)
        return record.host == self.host


async def reap_lost_turns(db: Database, registry: DaemonRegistry, host: str, *, since: float | None = None) -> list[str]:
    """Kill what turns of this host's lost daemons still run; returns their task ids.

    A daemon that dies (``kill -9``, a crash) leaves its workers running.
    Another host fails its turns ``host lost`` but cannot kill them, a pid
    meaning nothing there; the next daemon on this host does, at start. Only
    turns whose owner ran on this host and whose process is gone are looked
    at, and only processes carrying the turn's marker are signalled.
    """
    from worker_server.process_group import MARKER_ENV, terminate
    from worker_server.task import TaskStatus

    since = time.time() - FORGET_AFTER_S if since is None else since

    def read(tx: Any) -> list[Any]:
        return tx.execute(
            "SELECT id, pid, started_at, owner_pid, owner_started FROM tasks"
            " WHERE status = ? AND status_message = ? AND kind = 'agent' AND ended_at >= ?",
            (TaskStatus.FAILED.value, HOST_LOST, since),
        ).fetchall()

    lost = {row["id"]: row for row in await db.read(read)}
    if not lost:
        return []
    running = await anyio.to_thread.run_sync(_marked_tasks, MARKER_ENV, set(lost))
    reaped = []
    for task_id in sorted(running):
        row = lost[task_id]
        owner = (row["owner_pid"], row["owner_started"])
        if owner[0] is None or owner[1] is None or owner_alive(*owner):
            continue  # a live daemon of this host stops its own turns
        _, record = await registry.find((owner[0], owner[1]))
        if record is None or record.host != host:
            continue
        logger.warning("task %s was lost with its daemon (pid %s) on this host; killing what it left running",
                       task_id, owner[0])  # fmt: skip
        await terminate(task_id, row["pid"], not_before=row["started_at"])
        reaped.append(task_id)
    return reaped


def _marked_tasks(marker: str, wanted: set[str]) -> set[str]:
    """Which of ``wanted`` have a live process carrying their marker (one pass over the processes)."""
    found = set()
    for proc in psutil.process_iter():
        try:
            value = proc.environ().get(marker)
            if value in wanted and proc.status() != psutil.STATUS_ZOMBIE:
                found.add(value)
        except (psutil.Error, OSError):
            continue
    return found


class HostLease:
    """This daemon's row in the registry, kept alive while the daemon runs."""

    def __init__(
        self,
        registry: DaemonRegistry,
        owner: tuple[int, float],
        *,
        lease_s: float,
        version: str,
        url: str | None = None,
        host: str | None = None,
        on_lapse: Callable[[str], Awaitable[Any]] | None = None,
    ) -> None:
        self.registry = registry
        self.owner = owner
        self.lease_s = lease_s
        self.version = version
        self.url = url
        self.host = host or host_name()
        # Told (with HOST_LOST) to stop the turns the others have given up.
        self.on_lapse = on_lapse
        self.record: DaemonRecord | None = None
        self.lapses = 0

    async def register(self) -> DaemonRecord:
        self.record = await self.registry.register(
            host=self.host, pid=self.owner[0], started=self.owner[1], version=self.version, url=self.url,
            lease_s=self.lease_s, replaces=self.record.id if self.record else None,
        )  # fmt: skip
        return self.record

    @asynccontextmanager
    async def held(self) -> AsyncIterator[HostLease]:
        """Registered (and renewed) inside the block; the row is removed on the way out."""
        await self.register()
        logger.info("registered as daemon %s on host %s (lease %g s)", self.record.id, self.host, self.lease_s)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._renew)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    if self.record is not None:
                        await self.registry.unregister(self.record.id)
                except Exception as exc:  # noqa: BLE001 - the lease lapses by itself
                    logger.warning("could not remove this daemon from the registry (%s); its lease lapses", exc)
                await self.registry.close()

    async def _renew(self) -> None:
        interval = self.lease_s / 3
        renewed_at = time.monotonic()
        while True:
            await anyio.sleep(max(0.0, renewed_at + interval - time.monotonic()))
            assert self.record is not None
            # The lease runs from when the database took the renewal, which is
            # before its answer arrives: timed from the asking, a slow answer
            # brings the next renewal forward rather than late.
            asked = time.monotonic()
            try:
                ok = await self.registry.renew(self.record.id, self.lease_s)
            except Exception as exc:  # noqa: BLE001 - the database is away: try again, the lease may lapse
                logger.warning("could not renew this daemon's lease: %s", exc)
                await anyio.sleep(min(interval, 1.0))
                continue
            if ok:
                renewed_at = asked
                continue
            self.lapses += 1
            logger.warning(
                "this daemon's lease lapsed (last renewed %.1f s ago, lease %g s): the other daemons treat its "
                "running turns as lost (%s); stopping them here and registering again",
                time.monotonic() - renewed_at, self.lease_s, HOST_LOST,
            )  # fmt: skip
            if self.on_lapse is not None:
                try:
                    await self.on_lapse(HOST_LOST)
                except Exception:
                    logger.exception("stopping this daemon's turns after its lease lapsed failed")
            try:
                await self.register()
            except Exception as exc:  # noqa: BLE001 - try again at the next renewal
                logger.warning("could not register again: %s", exc)
                continue
            renewed_at = time.monotonic()
            logger.info("registered again as daemon %s", self.record.id)
