"""Approvals: bound to one exact call, decided once by a human, used once."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from guard.approvals import (
    ApprovalExpired,
    ApprovalNotFound,
    ApprovalNotPending,
    Approvals,
    ApprovalStatus,
    ReasonRequired,
)
from guard.storage.clock import FakeClock
from guard.digests import Digester
from guard.schema import open_guard_db

pytestmark = pytest.mark.anyio

ARGS = {"task_id": "t_123", "reason": "stuck"}


@pytest.fixture
async def db(db_target: str):
    """The guard's tables in a fresh database: a SQLite file, then PostgreSQL."""
    database = await open_guard_db(db_target)
    yield database
    await database.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


async def open_for(approvals: Approvals, args: dict = ARGS, identity: str = "alice", expires_s: float = 900):
    digest = await approvals.digest("cancel-task", args, identity)
    return await approvals.open(
        digest, "cancel-task", args, identity, "s1", "cancel-task#1", "cancelling needs a human", expires_s
    )


def test_the_digest_binds_tool_arguments_and_identity() -> None:
    call_digest = Digester(b"k" * 32).call
    digest = call_digest("cancel-task", {"b": 1, "a": [1, "é"]}, "alice")
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    # Key order does not matter; anything else does.
    assert digest == call_digest("cancel-task", {"a": [1, "é"], "b": 1}, "alice")
    assert digest != call_digest("cancel-task", {"b": 2, "a": [1, "é"]}, "alice")
    assert digest != call_digest("cancel-task", {"b": 1, "a": [1, "é"]}, "bob")
    assert digest != call_digest("spawn-task", {"b": 1, "a": [1, "é"]}, "alice")


async def test_opening_twice_reuses_the_pending_approval(db, clock) -> None:
    approvals = Approvals(db, clock)
    first = await open_for(approvals)
    assert re.fullmatch(r"apr_[a-z2-7]{10}", first.id)
    assert first.status is ApprovalStatus.PENDING
    assert first.expires_at == clock.now() + 900
    assert first.how_to_approve.startswith(
        f"Ask a human to run `taskwarden approvals approve {first.id}` (or approve it in the inbox "
        f"at /inbox/approvals/{first.id}), then call the tool again with the same arguments."
    )
    assert "No tool you can call approves it" in first.how_to_approve
    linked = first.instructions("http://127.0.0.1:8765/inbox/")
    assert f"open http://127.0.0.1:8765/inbox/approvals/{first.id} and approve it there" in linked
    clock.advance(10)
    assert (await open_for(approvals)).id == first.id
    # Other arguments are another call, with its own approval.
    other = await open_for(approvals, {"task_id": "t_456"})
    assert other.id != first.id
    assert len(await approvals.list(status="pending")) == 2


async def test_secrets_in_arguments_are_not_stored(db, clock) -> None:
    approvals = Approvals(db, clock)
    approval = await open_for(approvals, {"task_id": "t1", "api_key": "hunter2-secret"})
    assert approval.args == {"task_id": "t1", "api_key": "[REDACTED]"}


async def test_approve_then_the_call_uses_it_once(db, clock) -> None:
    approvals = Approvals(db, clock)
    pending = await open_for(approvals)
    assert await approvals.find_usable(pending.digest) is None

    clock.advance(5)
    approved = await approvals.decide(pending.id, True, "bob", "looks fine")
    assert approved.status is ApprovalStatus.APPROVED
    assert (approved.decided_by, approved.decided_at, approved.decision_note) == ("bob", clock.now(), "looks fine")

    usable = await approvals.find_usable(pending.digest)
    assert usable is not None and usable.id == pending.id
    assert await approvals.consume(pending.id) is True
    assert await approvals.consume(pending.id) is False
    assert await approvals.find_usable(pending.digest) is None
    assert (await approvals.get(pending.id)).used_at == clock.now()


async def test_racing_consumers_one_wins(db, db_target: str, clock) -> None:
    approvals = Approvals(db, clock)
    approval = await open_for(approvals)
    await approvals.decide(approval.id, True, "bob")
    other_db = await open_guard_db(db_target)  # a second connection, as another process would have
    try:
        others = Approvals(other_db, clock)
        results = await asyncio.gather(
            *(approvals.consume(approval.id) for _ in range(10)),
            *(others.consume(approval.id) for _ in range(10)),
        )
    finally:
        await other_db.close()
    assert results.count(True) == 1


async def test_the_first_decision_wins(db, clock) -> None:
    approvals = Approvals(db, clock)
    approval = await open_for(approvals)
    await approvals.decide(approval.id, False, "carol", "not this one")
    expected = rf"{approval.id} is already denied by carol at .*first answer stands"
    with pytest.raises(ApprovalNotPending, match=expected):
        await approvals.decide(approval.id, True, "bob")
    latest = await approvals.latest(approval.digest)
    assert (latest.status, latest.decision_note) == (ApprovalStatus.DENIED, "not this one")


async def test_racing_deciders_one_wins(db, clock) -> None:
    approvals = Approvals(db, clock)
    approval = await open_for(approvals)
    results = await asyncio.gather(
        *(approvals.decide(approval.id, i % 2 == 0, f"human{i}", "because") for i in range(6)),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, Exception)]
    assert len(winners) == 1
    assert all(isinstance(r, ApprovalNotPending) for r in results if isinstance(r, Exception))


async def test_deny_needs_a_reason(db, clock) -> None:
    approvals = Approvals(db, clock)
    approval = await open_for(approvals)
    for empty in (None, "", "   "):
        with pytest.raises(ReasonRequired, match="a reason is required"):
            await approvals.decide(approval.id, False, "bob", empty)
    assert (await approvals.get(approval.id)).status is ApprovalStatus.PENDING


async def test_unknown_id(db, clock) -> None:
    with pytest.raises(ApprovalNotFound, match="no approval apr_nope"):
        await Approvals(db, clock).decide("apr_nope", True, "bob")


async def test_an_expired_approval_cannot_be_decided(db, clock) -> None:
    approvals = Approvals(db, clock)
    approval = await open_for(approvals, expires_s=60)
    clock.advance(60)  # expires_at is the first moment it is expired
    with pytest.raises(ApprovalExpired, match="expired at 2023-11-14T22:14:20.000Z"):
        await approvals.decide(approval.id, True, "bob")
    assert (await approvals.get(approval.id)).status is ApprovalStatus.EXPIRED
    # Asking again opens a fresh one.
    fresh = await open_for(approvals, expires_s=60)
    assert fresh.id != approval.id and fresh.status is ApprovalStatus.PENDING


async def test_expire_due_and_an_approval_left_unused(db, clock) -> None:
    approvals = Approvals(db, clock)
    pending = await open_for(approvals, expires_s=60)
    approved = await open_for(approvals, {"task_id": "t_2"}, expires_s=60)
    await approvals.decide(approved.id, True, "bob")
    clock.advance(30)
    assert await approvals.expire_due() == 0
    clock.advance(30)
    assert await approvals.expire_due() == 1
    assert (await approvals.get(pending.id)).status is ApprovalStatus.EXPIRED
    # Approved but not used in time: no longer usable, and a caller sees it as expired.
    assert await approvals.find_usable(approved.digest) is None
    assert await approvals.consume(approved.id) is False
    latest = await approvals.latest(approved.digest)
    assert latest.status_at(clock.now()) is ApprovalStatus.EXPIRED


async def test_a_decision_wakes_a_waiter(db, clock, tmp_path: Path) -> None:
    feed = db.change_feed()
    feed.start()
    try:
        approvals = Approvals(db, clock, feed)
        approval = await open_for(approvals)
        seen = feed.generation

        async def decide_soon() -> None:
            await asyncio.sleep(0.05)
            # Another Approvals without a feed, as the CLI process would use.
            await Approvals(db, clock).decide(approval.id, True, "bob")

        task = asyncio.create_task(decide_soon())
        assert await feed.wait(seen, timeout=5) is True
        await task
        assert (await approvals.latest(approval.digest)).status is ApprovalStatus.APPROVED
    finally:
        feed.close()


async def test_list_is_newest_first_and_filters_by_status(db, clock) -> None:
    approvals = Approvals(db, clock)
    a = await open_for(approvals, {"n": 1})
    clock.advance(1)
    b = await open_for(approvals, {"n": 2})
    await approvals.decide(a.id, True, "bob")
    assert [x.id for x in await approvals.list()] == [b.id, a.id]
    assert [x.id for x in await approvals.list("approved")] == [a.id]
    assert [x.id for x in await approvals.list(ApprovalStatus.PENDING)] == [b.id]


async def test_a_denial_is_reported_once_then_a_new_approval_opens(db, clock) -> None:
    approvals = Approvals(db, clock)
    approval = await open_for(approvals)
    assert await approvals.acknowledge(approval.id) is False  # pending: nothing to report yet
    await approvals.decide(approval.id, False, "carol", "no")
    results = await asyncio.gather(*(approvals.acknowledge(approval.id) for _ in range(5)))
    assert results.count(True) == 1
    assert (await approvals.latest(approval.digest)).used_at == clock.now()
    assert (await open_for(approvals)).id != approval.id


async def test_an_overdue_approval_is_acknowledged_as_expired(db, clock) -> None:
    approvals = Approvals(db, clock)
    approval = await open_for(approvals, expires_s=60)
    clock.advance(60)
    assert await approvals.acknowledge(approval.id) is True
    assert (await approvals.get(approval.id)).status is ApprovalStatus.EXPIRED
