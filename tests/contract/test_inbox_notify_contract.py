"""The inbox's people and the notification outbox, on SQLite and on PostgreSQL (``db_target``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from guard.storage import Database, FakeClock, open_database
from worker_server.inbox.accounts import SIGNIN_TTL_S, Accounts, LinkState, people, role_in
from worker_server.notify.outbox import LEASE_S, STEPS, Outbox, Status, enqueue, link_spent, spend_link

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture
async def dbs(db_target: str) -> AsyncIterator[tuple[Database, Database]]:
    a = await open_database(db_target)
    b = await open_database(db_target)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_names_compare_without_case_and_keep_their_first_spelling(
    dbs: tuple[Database, Database], clock: FakeClock
) -> None:
    accounts = Accounts(dbs[0], clock)
    await accounts.add("Alice", "http://x", role="admin", email="alice@example.com")
    await accounts.add("ALICE", "http://x", webhook="https://hooks.example/a")
    await accounts.add("bob", "http://x")
    listed = await accounts.list()
    assert [(h.name, h.role, h.email, h.webhook) for h in listed] == [
        ("Alice", "admin", "alice@example.com", "https://hooks.example/a"), ("bob", "worker", None, None),
    ]  # fmt: skip
    assert await accounts.role_of("alice") == "admin"
    assert await dbs[1].read(lambda tx: role_in(tx, "aLiCe")) == "admin"
    assert [p.name for p in await dbs[1].read(people)] == ["Alice", "bob"]


async def test_a_sign_in_link_works_once_and_removal_signs_out(
    dbs: tuple[Database, Database], clock: FakeClock
) -> None:
    a, b = Accounts(dbs[0], clock), Accounts(dbs[1], clock)
    link = await a.add("carol", "http://inbox")
    token = link.rsplit("/", 1)[1]
    assert await b.link_state(token) == (LinkState.VALID, "carol")
    results = []

    async def try_sign_in(acc: Accounts) -> None:
        results.append(await acc.sign_in(token))

    async with anyio.create_task_group() as tg:
        for acc in (a, b, a, b):
            tg.start_soon(try_sign_in, acc)
    signed = [r for r in results if r is not None]
    assert len(signed) == 1 and signed[0].human == "carol"
    assert await b.session_human(signed[0].session_id) == "carol"
    assert (await a.list())[0].signed_in
    assert await b.remove("CAROL")
    assert await a.session_human(signed[0].session_id) is None
    link2 = await a.add("dave", "http://inbox")
    clock.advance(SIGNIN_TTL_S)
    assert (await a.link_state(link2.rsplit("/", 1)[1]))[0] is LinkState.EXPIRED


async def test_the_outbox_queues_once_leases_once_and_records_attempts(
    dbs: tuple[Database, Database], clock: FakeClock
) -> None:
    first, second = Outbox(dbs[0], clock), Outbox(dbs[1], clock)
    await first.migrate()
    await second.migrate()
    now = clock.now()
    queued = await dbs[0].write(lambda tx: [
        enqueue(tx, now, event_key="e1", kind="task_posted", recipient="ann", channel="email",
                target="ann@example.com", payload={"title": "t1"}),
        enqueue(tx, now, event_key="e1", kind="task_posted", recipient="ann", channel="email",
                target="ann@example.com", payload={"title": "t1"}),
        enqueue(tx, now, event_key="e2", kind="task_posted", recipient="ann", channel="webhook",
                target="https://hooks.example/ann", payload={"title": "t2"}),
    ])  # fmt: skip
    assert queued == [True, False, True]
    assert await first.next_due() == now

    leased: list[list[str]] = []

    async def lease(outbox: Outbox) -> None:
        leased.append([n.id for n in await outbox.lease()])

    async with anyio.create_task_group() as tg:
        for outbox in (first, second, first, second):
            tg.start_soon(lease, outbox)
    ids = [i for batch in leased for i in batch]
    assert len(ids) == 2 and len(set(ids)) == 2  # each row leased to one caller
    assert await first.next_due() == now + LEASE_S

    e1, e2 = sorted(await first.list(), key=lambda n: n.event_key)
    await first.mark_sent(e1.id)
    clock.advance(10)
    await second.mark_failed_attempt(e2.id, "HTTP 500", retry_at=clock.now() + 30)
    assert await first.next_due() == clock.now() + 30
    await second.mark_failed_attempt(e2.id, "HTTP 500 again", retry_at=None)
    by_key = {n.event_key: n for n in await second.list()}
    assert (by_key["e1"].status, by_key["e1"].attempts, by_key["e1"].sent_at) == (Status.SENT, 1, now)
    assert (by_key["e2"].status, by_key["e2"].attempts, by_key["e2"].last_error) == (Status.FAILED, 2, "HTTP 500 again")
    assert [n.event_key for n in await first.list(failed_only=True)] == ["e2"]
    assert await first.next_due() is None


async def test_a_decision_link_is_spent_once(dbs: tuple[Database, Database], clock: FakeClock) -> None:
    await dbs[0].migrate_component("notify", STEPS)
    results: list[bool] = []

    async def spend(db: Database) -> None:
        results.append(await db.write(lambda tx: spend_link(tx, "nonce-1", "apr_1", clock.now())))

    async with anyio.create_task_group() as tg:
        for db in (*dbs, *dbs):
            tg.start_soon(spend, db)
    assert sorted(results) == [False, False, False, True]
    assert await dbs[1].read(lambda tx: link_spent(tx, "nonce-1"))
    assert not await dbs[1].read(lambda tx: link_spent(tx, "nonce-2"))
