"""The daemon registry and leases (guard.storage.lease, worker_server.hosts), on both backends, with an injected clock."""

from __future__ import annotations

import os
import subprocess
import sys

import anyio
import pytest

from guard.storage import FakeClock, open_database
from guard.storage.lease import DaemonRegistry
from worker_server.hosts import (
    HOST_LOST,
    HostLease,
    LeaseLiveness,
    ProcessLiveness,
    current_owner,
)

pytestmark = pytest.mark.anyio


async def test_register_renew_lapse_and_unregister(db_target: str) -> None:
    clock = FakeClock()
    db = await open_database(db_target)
    try:
        registry = DaemonRegistry(db, clock)
        await registry.migrate()
        await registry.migrate()  # idempotent
        a = await registry.register(host="h1", pid=101, started=1.5, version="1", url="http://a/inbox", lease_s=15)
        b = await registry.register(host="h2", pid=202, started=2.5, version="1", url=None, lease_s=15)
        now, seen = await registry.all()
        assert now == clock.now()
        assert {r.id for r in seen} == {a.id, b.id}

        clock.advance(10)
        assert await registry.renew(a.id, 15)
        clock.advance(10)  # b: 20 s since its last renewal
        _, found = await registry.find((202, 2.5))
        assert found is not None and not found.live(clock.now())
        _, found = await registry.find((101, 1.5))
        assert found is not None and found.live(clock.now()) and found.url == "http://a/inbox"
        # A lapsed lease is not renewed: its daemon must know it was given up.
        assert not await registry.renew(b.id, 15)
        b2 = await registry.register(host="h2", pid=202, started=2.5, version="1", url=None, lease_s=15, replaces=b.id)
        _, found = await registry.find((202, 2.5))
        assert found is not None and found.id == b2.id and found.live(clock.now())
        # A start time read back with a few digits fewer still finds its daemon.
        _, found = await registry.find((202, 2.5000001))
        assert found is not None and found.id == b2.id

        await registry.unregister(a.id)
        _, rows = await registry.all()
        assert [r.id for r in rows] == [b2.id]
        described = rows[0].describe(clock.now(), this=b2.id)
        assert described["this"] and described["live"] and described["host"] == "h2"
    finally:
        await db.close()


async def test_lease_liveness(db_target: str) -> None:
    clock = FakeClock()
    db = await open_database(db_target)
    try:
        registry = DaemonRegistry(db, clock)
        await registry.migrate()
        me = current_owner()
        here = LeaseLiveness(registry, host="here")
        # A process of this host on another host's row: the lease alone decides there.
        await registry.register(host="elsewhere", pid=4242, started=42.0, version="1", url=None, lease_s=5)
        assert await here.alive((4242, 42.0))
        assert not await here.on_this_host((4242, 42.0))
        clock.advance(6)
        assert not await here.alive((4242, 42.0))
        # On this host a dead process is dead before its lease runs out.
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        await registry.register(host="here", pid=gone.pid, started=7.0, version="1", url=None, lease_s=60)
        assert not await here.alive((gone.pid, 7.0))
        assert await here.on_this_host((gone.pid, 7.0))
        await registry.register(host="here", pid=me[0], started=me[1], version="1", url=None, lease_s=60)
        assert await here.alive(me)
        # Unregistered: only a live process of this host vouches for it.
        assert not await here.alive((999_999, 1.0))
        assert not await here.alive((None, None))
        assert await ProcessLiveness().alive(me)
        assert not await ProcessLiveness().alive((gone.pid, 7.0))
    finally:
        await db.close()


async def test_host_lease_renews_finds_its_own_lapse_and_leaves(db_target: str) -> None:
    db = await open_database(db_target)
    try:
        registry = DaemonRegistry(db)
        await registry.migrate()
        stopped: list[str] = []

        async def give_up(reason: str) -> None:
            stopped.append(reason)

        lease = HostLease(registry, (os.getpid(), 123.0), lease_s=0.6, version="t", on_lapse=give_up, host="h")
        async with lease.held():
            first = lease.record
            assert first is not None
            await anyio.sleep(0.5)
            _, rows = await registry.all()
            assert [r.id for r in rows] == [first.id] and rows[0].renewed_at > first.renewed_at
            # Stalled: the lease lapses without this daemon knowing, until its next renewal.
            await db.write(lambda tx: tx.execute("UPDATE daemons SET lease_until = 0 WHERE id = ?", (first.id,)))
            with anyio.fail_after(5):
                while lease.lapses == 0 or lease.record is first:
                    await anyio.sleep(0.05)
            assert stopped == [HOST_LOST]
            _, rows = await registry.all()
            assert [r.id for r in rows] == [lease.record.id] and lease.record.id != first.id
        _, rows = await registry.all()
        assert rows == []  # a clean exit leaves no row
    finally:
        await db.close()


async def test_a_new_daemon_kills_what_a_lost_daemon_of_its_host_left_running(db_target: str, tmp_path) -> None:
    """Another host failed the turns 'host lost' but could not kill them; the next daemon here does."""
    from worker_server.hosts import reap_lost_turns
    from worker_server.process_group import MARKER_ENV
    from worker_server.store import Store
    from worker_server.task import TaskStatus

    db = await open_database(db_target)
    feed = db.change_feed()
    feed.start()
    workers: list[subprocess.Popen[bytes]] = []
    try:
        store = await Store.open(db, feed)
        registry = DaemonRegistry(db)
        await registry.migrate()
        turns = {}
        for host in ("here", "elsewhere"):
            gone = subprocess.Popen([sys.executable, "-c", "pass"])
            gone.wait()
            owner = (gone.pid, 7.25)
            await registry.register(host=host, pid=owner[0], started=owner[1], version="1", url=None, lease_s=1)
            row, _ = await store.create_session(
                kind="agent", worker="fake", title=host, prompt="p", cwd=str(tmp_path), labels=[], created_by="t",
                idempotency_key=None, timeout_s=None, deadline=None, owner=owner,
            )  # fmt: skip
            claimed = await store.claim_next("fake", 5, owner)
            assert claimed is not None and claimed.id == row.id
            worker = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(120)"],
                env={**os.environ, MARKER_ENV: row.id}, start_new_session=True,
            )  # fmt: skip
            workers.append(worker)
            await store.set_process(row.id, worker.pid, str(tmp_path / f"{row.id}.log"))
            assert await store.finish(row.id, TaskStatus.FAILED, message=HOST_LOST)
            turns[host] = (row.id, worker)
        reaped = await reap_lost_turns(db, registry, "here")
        assert reaped == [turns["here"][0]]
        assert turns["here"][1].wait(timeout=10) is not None
        assert turns["elsewhere"][1].poll() is None, "a turn of another host's daemon was killed"
        assert await reap_lost_turns(db, registry, "here") == []
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        feed.close()
        await db.close()
