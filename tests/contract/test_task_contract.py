"""The task store's contract, run on SQLite and on PostgreSQL (``db_target``).

Every case runs against both backends with an injected ``FakeClock``: tasks,
turns, claims, events, messages, idempotency keys and change notification.
Claims and notification use two separate ``Database`` connections, as two
daemons sharing one database would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from guard.storage import Database, FakeClock, is_unique_violation, open_database
from guard.storage.changes import ChangeFeed
from worker_server.db_errors import DB_ERRORS
from worker_server.store import Store, TaskEvent, TaskNotFound
from worker_server.task import TaskStatus

pytestmark = pytest.mark.anyio

S = TaskStatus
ME = (111, 1000.5)  # a server's owner key: (pid, process start time)
OTHER = (222, 2000.25)


@dataclass
class Node:
    """One connection to the shared database, as one daemon holds it."""

    db: Database
    feed: ChangeFeed
    store: Store
    events: list[TaskEvent]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture
async def nodes(db_target: str, clock: FakeClock) -> AsyncIterator[tuple[Node, Node]]:
    opened: list[Node] = []
    try:
        for _ in range(2):
            db = await open_database(db_target)
            feed = db.change_feed()
            feed.start()
            seen: list[TaskEvent] = []
            store = await Store.open(db, feed, clock, on_events=lambda _tx, events, seen=seen: seen.extend(events))
            opened.append(Node(db, feed, store, seen))
        yield opened[0], opened[1]
    finally:
        for node in opened:
            node.feed.close()
            await node.db.close()


@pytest.fixture
def store(nodes: tuple[Node, Node]) -> Store:
    return nodes[0].store


async def agent_session(store: Store, **overrides: Any):
    args: dict[str, Any] = dict(
        kind="agent", worker="fake", title="a title", prompt="do it", cwd="/tmp", labels=[],
        created_by="alice", idempotency_key=None, timeout_s=None, deadline=None, owner=None,
    )  # fmt: skip
    args.update(overrides)
    return await store.create_session(**args)


# -- tasks -------------------------------------------------------------------


async def test_a_created_task_reads_back_whole(store: Store, clock: FakeClock) -> None:
    task, created = await agent_session(
        store, labels=["red", "big"], timeout_s=30.0, owner=ME, options={"model": "m"}, caps={"max_tokens": 10.0},
        budgets=[{"scope": "identity", "key": "alice"}],
    )  # fmt: skip
    assert created
    got = await store.get(task.id)
    assert got == task
    assert got.status is S.QUEUED and got.turn == 1 and got.kind == "agent"
    assert got.labels == ["red", "big"] and got.options == {"model": "m"} and got.caps == {"max_tokens": 10.0}
    assert got.budgets == [{"scope": "identity", "key": "alice"}]
    assert got.created_at == clock.now() == got.updated_at
    assert (got.owner_pid, got.owner_started) == ME  # a float key survives the round trip exactly
    assert got.session_owner == "alice"
    with pytest.raises(TaskNotFound):
        await store.get("tsk_nosuchtask0")


async def test_get_many_keeps_the_order_asked_for_and_skips_unknown_ids(store: Store) -> None:
    a, _ = await agent_session(store)
    b, _ = await agent_session(store)
    assert [t.id for t in await store.get_many([b.id, "tsk_missing", a.id])] == [b.id, a.id]
    assert await store.get_many([]) == []


async def test_list_filters_by_status_worker_label_and_owner_newest_first(store: Store) -> None:
    red, _ = await agent_session(store, labels=["red", "x"], worker="fake")
    blue, _ = await agent_session(store, labels=["blue"], worker="other")
    mine, _ = await agent_session(store, labels=["red"], created_by="bob")
    await store.finish(blue.id, S.COMPLETED, final="done")

    async def ids(**kw: Any) -> list[str]:
        page, _more = await store.list(**kw)
        return [t.id for t in page]

    assert await ids() == [mine.id, blue.id, red.id]
    assert await ids(label="red") == [mine.id, red.id]
    assert await ids(label="x") == [red.id]
    assert await ids(label="r") == []  # a whole label, never a substring of the JSON
    assert await ids(status=S.COMPLETED.value) == [blue.id]
    assert await ids(status=S.QUEUED.value, worker="fake") == [mine.id, red.id]
    assert await ids(owner="bob") == [mine.id]
    assert await ids(owner="alice", label="red") == [red.id]


async def test_list_pages_by_seq(store: Store) -> None:
    made = [(await agent_session(store))[0] for _ in range(5)]
    first, more = await store.list(limit=2)
    assert [t.id for t in first] == [made[4].id, made[3].id] and more
    rest, more = await store.list(limit=10, before_seq=first[-1].seq)
    assert [t.id for t in rest] == [made[2].id, made[1].id, made[0].id] and not more


async def test_the_status_check_refuses_a_status_outside_the_enum(store: Store) -> None:
    task, _ = await agent_session(store)
    with pytest.raises(DB_ERRORS):
        await store.db.write(lambda tx: tx.execute("UPDATE tasks SET status = ? WHERE id = ?", ("paused", task.id)))
    assert (await store.get(task.id)).status is S.QUEUED


async def test_a_duplicate_key_is_a_unique_violation_on_either_backend(store: Store) -> None:
    task, _ = await agent_session(store)

    def again(tx: Any) -> None:
        tx.execute("INSERT INTO messages (id, task_id, author, kind, body, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                   ("msg_same", task.id, "agent", "message", "one", 1.0))  # fmt: skip
        tx.execute("INSERT INTO messages (id, task_id, author, kind, body, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                   ("msg_same", task.id, "agent", "message", "two", 1.0))  # fmt: skip

    with pytest.raises(DB_ERRORS) as caught:
        await store.db.write(again)
    assert is_unique_violation(caught.value)
    assert await store.messages(task.id) == []  # the whole transaction rolled back


# -- idempotency ------------------------------------------------------------


async def test_an_idempotency_key_returns_the_earlier_task_for_the_same_caller_only(store: Store) -> None:
    first, created = await agent_session(store, idempotency_key="k1")
    again, created_again = await agent_session(store, idempotency_key="k1", prompt="something else")
    assert created and not created_again and again.id == first.id and again.prompt == "do it"
    other, created_other = await agent_session(store, idempotency_key="k1", created_by="bob")
    assert created_other and other.id != first.id


async def test_one_key_used_on_two_connections_at_once_makes_one_task(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    results: list[tuple[Any, bool]] = []

    async def create(node: Node) -> None:
        results.append(await agent_session(node.store, idempotency_key="same"))

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(create, (a, b)[i % 2])
    assert len({task.id for task, _ in results}) == 1
    assert sum(created for _, created in results) == 1


# -- turns -----------------------------------------------------------------


async def test_the_next_turn_queues_behind_the_running_one_and_inherits_the_session(
    store: Store, clock: FakeClock
) -> None:
    first, _ = await agent_session(store, labels=["l"], timeout_s=60.0, owner=ME)
    claimed = await store.claim_next("fake", 5, ME)
    assert claimed is not None and claimed.id == first.id
    assert claimed.deadline == clock.now() + 60.0
    clock.advance(5)
    second = await store.add_turn(first.session_id, prompt="and then", created_by="alice", owner=ME)
    assert (second.turn, second.status, second.labels, second.cwd, second.timeout_s) == (2, S.QUEUED, ["l"], "/tmp", 60.0)
    assert second.session_id == first.session_id and second.created_at == clock.now()
    # Turns of one session run one at a time.
    assert await store.claim_next("fake", 5, ME) is None
    await store.finish(first.id, S.COMPLETED, final="one")
    after = await store.claim_next("fake", 5, ME)
    assert after is not None and after.id == second.id
    assert [t.id for t in await store.session_turns(first.session_id)] == [first.id, second.id]


async def test_a_worker_session_and_process_are_recorded(store: Store) -> None:
    task, _ = await agent_session(store, owner=ME)
    await store.claim_next("fake", 1, ME)
    await store.set_worker_session(task.session_id, "worker-ses-1")
    await store.set_process(task.id, 4242, "/tmp/log")
    await store.set_usage(task.id, {"input_tokens": 3})
    got = await store.get(task.id)
    assert (got.worker_session, got.pid, got.log_path, got.usage) == ("worker-ses-1", 4242, "/tmp/log", {"input_tokens": 3})
    assert [t.id for t in await store.working_agent_tasks()] == [task.id]


# -- claims ------------------------------------------------------------------


async def test_claims_follow_queue_order_owner_and_worker(store: Store) -> None:
    theirs, _ = await agent_session(store, owner=OTHER)
    other_worker, _ = await agent_session(store, worker="other")
    anyones, _ = await agent_session(store)
    mine, _ = await agent_session(store, owner=ME)
    assert await store.queued_count(ME) == 3  # not OTHER's
    assert set(await store.queued_workers()) == {"fake", "other"}
    got = [await store.claim_next("fake", 10, ME) for _ in range(3)]
    assert [t.id if t else None for t in got] == [anyones.id, mine.id, None]
    assert got[0] is not None and (got[0].owner_pid, got[0].owner_started) == ME
    assert await store.queued_owners() == [OTHER]
    assert await store.adopt_queued([OTHER]) == 1  # a gone server's queued turn becomes anyone's
    claimed = await store.claim_next("fake", 10, ME)
    assert claimed is not None and claimed.id == theirs.id
    assert other_worker.status is S.QUEUED


async def test_two_claimers_on_two_connections_never_claim_the_same_turn(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    made = {(await agent_session(a.store))[0].id for _ in range(24)}
    claimed: list[tuple[str, str]] = []

    async def claimer(node: Node, owner: tuple[int, float], name: str) -> None:
        while (task := await node.store.claim_next("fake", 1000, owner)) is not None:
            claimed.append((task.id, name))

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(claimer, a, ME, f"a{i}")
            tg.start_soon(claimer, b, OTHER, f"b{i}")
    ids = [task_id for task_id, _ in claimed]
    assert sorted(ids) == sorted(made)  # each turn claimed exactly once
    assert len(set(ids)) == len(ids)
    for task_id in made:  # claimed by the one who was told so, and marked working once
        row = await a.store.get(task_id)
        events = [e for e in await a.store.events_of(task_id) if e[3] == "status"]
        assert row.status is S.WORKING and len(events) == 1


async def test_max_concurrent_holds_across_connections(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    for _ in range(12):
        await agent_session(a.store)
    peak = 0
    done = 0

    async def working() -> int:
        page, _ = await a.store.list(status=S.WORKING.value, limit=100)
        return len(page)

    async def claimer(node: Node, owner: tuple[int, float]) -> None:
        nonlocal peak, done
        while done < 12:
            task = await node.store.claim_next("fake", 3, owner)
            if task is None:
                await anyio.sleep(0.01)
                continue
            peak = max(peak, await working())
            await anyio.sleep(0.02)
            assert await node.store.finish(task.id, S.COMPLETED, final="ok")
            done += 1

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(claimer, a, ME)
                tg.start_soon(claimer, b, OTHER)
    assert done == 12
    assert 1 <= peak <= 3
    # With three already working, nobody on either connection gets a fourth.
    for _ in range(4):
        await agent_session(a.store)
    assert [await a.store.claim_next("fake", 3, ME) for _ in range(2)].count(None) == 0
    assert await b.store.claim_next("fake", 3, OTHER) is not None
    assert await b.store.claim_next("fake", 3, OTHER) is None
    assert await a.store.claim_next("fake", 3, ME) is None
    assert await working() == 3


# -- events ----------------------------------------------------------------


async def test_events_record_each_change_in_order_and_reach_the_hook(nodes: tuple[Node, Node], clock: FakeClock) -> None:
    a, _ = nodes
    start = await a.store.last_event_id()
    task, _ = await agent_session(a.store, owner=ME)
    clock.advance(1)
    await a.store.claim_next("fake", 1, ME)
    clock.advance(1)
    assert await a.store.finish(task.id, S.FAILED, message="boom")
    assert not await a.store.finish(task.id, S.COMPLETED)  # already terminal: no change, no event
    events = await a.store.events_of(task.id)
    assert [(e[3], e[2]) for e in events] == [
        ("created", clock.now() - 2), ("status", clock.now() - 1), ("status", clock.now())
    ]
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    assert '"failed"' in events[-1][4] and '"boom"' in events[-1][4]
    assert await a.store.events_after(start) == events
    assert await a.store.last_event_id() == events[-1][0]
    # The hook (notifications, queued in the same transaction) sees the
    # store's writes; a claim is the runner's own and notifies nobody.
    assert [(e.task_id, e.type, e.data.get("status")) for e in a.events] == [
        (task.id, "created", S.QUEUED), (task.id, "status", S.FAILED)
    ]


async def test_a_cancel_request_reaches_the_owning_server(store: Store) -> None:
    task, _ = await agent_session(store, owner=ME)
    await store.claim_next("fake", 1, ME)
    await store.request_cancel(task.id, "stop please")
    assert [t.id for t in await store.cancel_requests(ME)] == [task.id]
    assert await store.cancel_requests(OTHER) == []


# -- messages (human tasks) ----------------------------------------------------


async def test_messages_get_increasing_seq_and_read_marks(store: Store, clock: FakeClock) -> None:
    task, _ = await agent_session(store, kind="human", worker="human")
    posted = []
    for i in range(5):
        clock.advance(1)
        posted.append(await store.post_message(task.id, author="agent", author_name="a", kind="message", body=f"m{i}"))
    seqs = [m.seq for m in posted]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert [m.body for m in await store.messages(task.id)] == [f"m{i}" for i in range(5)]
    assert [m.body for m in await store.messages(task.id, since=posted[2].id)] == ["m3", "m4"]
    with pytest.raises(KeyError):
        await store.messages(task.id, since="msg_unknown")
    clock.advance(1)
    await store.messages(task.id, mark_read_from="agent")
    assert {m.read_at for m in await store.messages(task.id)} == {clock.now()}
    with pytest.raises(TaskNotFound):
        await store.post_message("tsk_missing", author="agent", author_name=None, kind="message", body="x")


async def test_a_human_step_moves_the_task_and_posts_atomically(store: Store) -> None:
    task, _ = await agent_session(store, kind="human", worker="human")
    row, _ = await store.human_step(task.id, allowed=[S.QUEUED], wanted="claim", status=S.WORKING, claimed_by="ann")
    assert row.status is S.WORKING and row.claimed_by == "ann"
    row, msg = await store.human_step(
        task.id, allowed=[S.WORKING], wanted="ask", status=S.INPUT_REQUIRED, claimer="ann",
        message={"author": "human", "author_name": "ann", "kind": "question", "body": "which one?"},
        pending_kind="question",
    )  # fmt: skip
    assert msg is not None and row.pending == {"kind": "question", "text": "which one?", "message_id": msg.id}


async def test_human_tasks_past_their_deadline_expire_by_the_clock(store: Store, clock: FakeClock) -> None:
    task, _ = await agent_session(store, kind="human", worker="human", deadline=clock.now() + 100)
    assert await store.next_human_deadline() == clock.now() + 100
    assert await store.expire_due() == []
    clock.advance(100)
    assert await store.expire_due() == [task.id]
    got = await store.get(task.id)
    assert (got.status, got.status_message, got.ended_at) == (S.FAILED, "expired", clock.now())
    assert await store.next_human_deadline() is None


async def test_prune_deletes_old_finished_sessions_only(store: Store, clock: FakeClock) -> None:
    old, _ = await agent_session(store)
    await store.finish(old.id, S.COMPLETED, final="x")
    running, _ = await agent_session(store)
    clock.advance(3600)
    assert [p.id for p in await store.prune(clock.now() - 60, dry_run=True)] == [old.session_id]
    assert [p.task_ids for p in await store.prune(clock.now() - 60)] == [(old.id,)]
    assert [t.id for t in (await store.list())[0]] == [running.id]
    assert await store.events_of(old.id) == []


# -- change notification -----------------------------------------------------


async def test_a_write_on_one_connection_wakes_a_feed_started_on_another(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await anyio.sleep(0.2)  # B's listener is connected
    since = b.feed.generation
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def write_soon() -> None:
                await anyio.sleep(0.1)
                await agent_session(a.store)

            tg.start_soon(write_soon)
            woke = await b.feed.wait(since, timeout=5)
    assert woke and b.feed.generation > since
