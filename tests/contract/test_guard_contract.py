"""The storage contract, guard half: what the limiter, approvals and audit need of a backend.

Every case runs on SQLite and on PostgreSQL (``db_target``), with an injected
``FakeClock``; "another connection" is a second ``Database`` on the same
target, which is what another process or another daemon has.

- limits are exact under concurrency, within one connection and across two,
  and ``retry_after_s`` is exact to the microsecond at the window's edge;
- an approved approval is used once, however many consumers race for it;
- the audit trail is append-only: UPDATE and DELETE are refused;
- a change committed and notified on one connection wakes a feed started on
  another within 1 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from guard.approvals import Approvals
from guard.audit import AuditLog, AuditRecord
from guard.limits import Exhausted, Limiter, LimitRequest, Reservation, ScopeKeys
from guard.schema import open_guard_db
from guard.storage import ChangeFeed, Database, FakeClock, integrity_errors

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0
KEYS = ScopeKeys(session="s1", identity="alice")
LIMIT = LimitRequest(
    "spawn-task#1",
    "spawn-task#1",
    max=30,
    window_s=60,
    scope="identity",
    reason="30 per 60 s",
)


@pytest.fixture
async def db(db_target: str) -> AsyncIterator[Database]:
    database = await open_guard_db(db_target)
    yield database
    await database.close()


@pytest.fixture
async def other(db: Database, db_target: str) -> AsyncIterator[Database]:
    """A second connection to the same database (after ``db`` made the tables)."""
    database = await open_guard_db(db_target)
    yield database
    await database.close()


def admitted(results: list[Reservation | Exhausted]) -> int:
    return sum(isinstance(r, Reservation) for r in results)


# -- limits -------------------------------------------------------------------


async def test_limits_admit_exactly_max_of_100_concurrent_reservations(
    db: Database,
) -> None:
    limiter = Limiter(db, FakeClock(T0))
    results = await asyncio.gather(
        *(limiter.reserve([LIMIT], KEYS) for _ in range(100))
    )
    assert admitted(results) == 30
    assert {r.retry_after_s for r in results if isinstance(r, Exhausted)} == {60.0}


async def test_limits_stay_exact_across_two_connections(
    db: Database, other: Database
) -> None:
    clock = FakeClock(T0)
    ours, theirs = Limiter(db, clock), Limiter(other, clock)
    results = await asyncio.gather(
        *(
            limiter.reserve([LIMIT], KEYS)
            for _ in range(50)
            for limiter in (ours, theirs)
        )
    )
    assert admitted(results) == 30


async def test_retry_after_is_exact_at_the_window_edge(db: Database) -> None:
    clock = FakeClock(T0)
    limiter = Limiter(db, clock)
    assert (
        admitted(
            await asyncio.gather(*(limiter.reserve([LIMIT], KEYS) for _ in range(30)))
        )
        == 30
    )

    clock.set(T0 + 60 - 1e-6)  # one microsecond before the 30 hits leave the window
    one_us = await limiter.reserve([LIMIT], KEYS)
    assert isinstance(one_us, Exhausted) and one_us.retry_after_s == 1e-6

    clock.set(T0 + 60)  # a hit at t counts while now < t + window: all 30 have left
    results = await asyncio.gather(*(limiter.reserve([LIMIT], KEYS) for _ in range(31)))
    assert admitted(results) == 30
    (refused,) = [r for r in results if isinstance(r, Exhausted)]
    assert refused.retry_after_s == 60.0


# -- approvals ----------------------------------------------------------------


async def _approved(approvals: Approvals) -> str:
    args = {"task_id": "tsk_1"}
    digest = await approvals.digest("cancel-task", args, "alice")
    approval = await approvals.open(
        digest,
        "cancel-task",
        args,
        "alice",
        "s1",
        "cancel-task#1",
        "needs a human",
        900,
    )
    await approvals.decide(approval.id, True, "bob")
    return approval.id


async def test_two_concurrent_consumers_of_one_approval_one_wins(db: Database) -> None:
    clock = FakeClock(T0)
    approvals = Approvals(db, clock)
    approval_id = await _approved(approvals)
    results = await asyncio.gather(
        approvals.consume(approval_id), approvals.consume(approval_id)
    )
    assert sorted(results) == [False, True]
    assert (
        await approvals.find_usable((await approvals.get(approval_id)).digest) is None
    )


async def test_consumers_on_two_connections_one_wins(
    db: Database, other: Database
) -> None:
    clock = FakeClock(T0)
    ours, theirs = Approvals(db, clock), Approvals(other, clock)
    approval_id = await _approved(ours)
    results = await asyncio.gather(
        *(a.consume(approval_id) for _ in range(10) for a in (ours, theirs))
    )
    assert results.count(True) == 1


# -- audit --------------------------------------------------------------------


async def test_audit_rows_cannot_be_updated_or_deleted(db: Database) -> None:
    log = AuditLog(db, FakeClock(T0))
    row_id = await log.record(
        AuditRecord("alice", "s1", "spawn-task", {"prompt": "hi"}, "allow")
    )
    with pytest.raises(integrity_errors(), match="append-only"):
        await db.write(
            lambda tx: tx.execute(
                "UPDATE guard_audit SET decision = 'deny' WHERE id = ?", (row_id,)
            )
        )
    with pytest.raises(integrity_errors(), match="append-only"):
        await db.write(
            lambda tx: tx.execute("DELETE FROM guard_audit WHERE id = ?", (row_id,))
        )
    (entry,) = await log.query()
    assert (entry.id, entry.decision) == (row_id, "allow")


# -- change notification --------------------------------------------------------


async def _listening(db: Database, feed: ChangeFeed) -> int:
    """The feed's generation once it listens (PostgreSQL: its LISTEN connection is up)."""
    if db.dialect == "postgresql":
        # The listener fires once when connected; its safety poll is 2 s away from then.
        assert await feed.wait(0, timeout=10), "the change feed never connected"
    return feed.generation


async def test_a_change_notified_on_one_connection_wakes_a_feed_on_another(
    db: Database, other: Database
) -> None:
    writer_feed, waiter_feed = db.change_feed(), other.change_feed()
    writer_feed.start()
    waiter_feed.start()
    try:
        await _listening(db, writer_feed)
        seen = await _listening(other, waiter_feed)
        started = time.monotonic()
        clock = FakeClock(T0)
        await Limiter(db, clock).reserve([LIMIT], KEYS)  # a write ...
        writer_feed.notify()  # ... and its notification
        assert await waiter_feed.wait(seen, timeout=1.0), "not woken within 1 s"
        assert time.monotonic() - started < 1.0
        # The other connection sees the write once woken.
        used = await Limiter(other, clock).usage(
            [("spawn-task#1", 60, "identity")], KEYS
        )
        assert used == {"spawn-task#1": 1}
    finally:
        writer_feed.close()
        waiter_feed.close()


async def test_an_announce_without_a_feed_wakes_a_feed_on_another_connection(
    db: Database, other: Database
) -> None:
    # The CLI's path: no feed of its own, it announces through the database.
    waiter_feed = other.change_feed()
    waiter_feed.start()
    try:
        seen = await _listening(other, waiter_feed)
        await db.announce()
        assert await waiter_feed.wait(seen, timeout=1.0), "not woken within 1 s"
    finally:
        waiter_feed.close()
