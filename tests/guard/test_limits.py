"""The sliding-window limiter: exact counts, exact retry times, atomic across callers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.limits import (
    Exhausted,
    InvalidLimit,
    Limiter,
    LimitRequest,
    Reservation,
    ScopeKeys,
)
from guard.schema import open_guard_db
from guard.storage.clock import FakeClock

pytestmark = pytest.mark.anyio

ALICE = ScopeKeys(session="s1", identity="alice")


def per_session(max_: int = 30, window_s: float = 60, cost: int = 1, counter: str = "spawn-task#1") -> LimitRequest:
    return LimitRequest(
        rule_id=counter, counter=counter, max=max_, window_s=window_s, scope="session",
        cost=cost, reason=f"{max_} calls per {window_s:g} s per session",
    )  # fmt: skip


@pytest.fixture
async def db(db_target: str):
    """The guard's tables in a fresh database: a SQLite file, then PostgreSQL."""
    database = await open_guard_db(db_target)
    yield database
    await database.close()


async def test_exactly_max_of_100_concurrent_calls_are_admitted(db) -> None:
    clock = FakeClock()
    limiter = Limiter(db, clock)
    results = await asyncio.gather(*(limiter.reserve([per_session()], ALICE) for _ in range(100)))

    admitted = [r for r in results if isinstance(r, Reservation)]
    refused = [r for r in results if isinstance(r, Exhausted)]
    assert len(admitted) == 30
    assert len(refused) == 70
    # All 30 hits share one timestamp, so the window frees up exactly 60 s later.
    assert {r.retry_after_s for r in refused} == {60.0}
    assert refused[0].rule_id == "spawn-task#1"
    assert refused[0].reason == "30 calls per 60 s per session"


async def test_retry_after_is_the_time_until_the_oldest_hit_leaves_the_window(db) -> None:
    clock = FakeClock(1000.0)
    limiter = Limiter(db, clock)
    limit = per_session(max_=3, window_s=10)
    for step in (0.0, 2.5, 1.0):  # hits at 1000, 1002.5, 1003.5
        clock.advance(step)
        assert isinstance(await limiter.reserve([limit], ALICE), Reservation)

    clock.set(1004.0)
    full = await limiter.reserve([limit], ALICE)
    assert full == Exhausted("spawn-task#1", "3 calls per 10 s per session", 6.0)

    # A hit at t counts while now < t + window: at 1009.999999 still full ...
    clock.set(1009.999999)
    assert (await limiter.reserve([limit], ALICE)).retry_after_s == pytest.approx(1e-6)
    # ... at exactly 1010 the first hit has left.
    clock.set(1010.0)
    assert isinstance(await limiter.reserve([limit], ALICE), Reservation)
    # Next to leave: the hit at 1002.5.
    full = await limiter.reserve([limit], ALICE)
    assert full.retry_after_s == 2.5


async def test_retry_after_accounts_for_cost_and_shared_timestamps(db) -> None:
    clock = FakeClock(0.0)
    limiter = Limiter(db, clock)
    limit = per_session(max_=10, window_s=60)
    await limiter.reserve([per_session(max_=10, window_s=60, cost=2)], ALICE)  # t=0: 2 units
    clock.set(5)
    await limiter.reserve([limit], ALICE)  # t=5: 1
    await limiter.reserve([limit], ALICE)  # t=5: 1
    clock.set(20)
    await limiter.reserve([per_session(max_=10, window_s=60, cost=6)], ALICE)  # t=20: 6 -> 10 used

    clock.set(30)
    # Needs 1 unit: the 2 units at t=0 leave at 60.
    assert (await limiter.reserve([limit], ALICE)).retry_after_s == 30.0
    # Needs 4 units: t=0 frees 2, both hits at t=5 free 2 more, at 65.
    assert (await limiter.reserve([per_session(max_=10, window_s=60, cost=4)], ALICE)).retry_after_s == 35.0
    # Needs 5 units: only the 6 units at t=20 suffice, at 80.
    assert (await limiter.reserve([per_session(max_=10, window_s=60, cost=5)], ALICE)).retry_after_s == 50.0


async def test_all_limits_are_reserved_or_none(db) -> None:
    clock = FakeClock()
    limiter = Limiter(db, clock)
    per_minute = per_session(max_=5, window_s=60, counter="writes#minute")
    per_hour = per_session(max_=2, window_s=3600, counter="writes#hour")

    assert isinstance(await limiter.reserve([per_minute, per_hour], ALICE), Reservation)
    assert isinstance(await limiter.reserve([per_minute, per_hour], ALICE), Reservation)
    clock.advance(1)
    full = await limiter.reserve([per_minute, per_hour], ALICE)
    assert isinstance(full, Exhausted)
    assert full.rule_id == "writes#hour"
    assert full.retry_after_s == 3599.0

    # The refused call took no room in the per-minute limit: 3 more fit there.
    for _ in range(3):
        assert isinstance(await limiter.reserve([per_minute], ALICE), Reservation)
    assert isinstance(await limiter.reserve([per_minute], ALICE), Exhausted)


async def test_the_first_full_limit_is_reported(db) -> None:
    limiter = Limiter(db, FakeClock())
    a = per_session(max_=1, window_s=10, counter="a")
    b = per_session(max_=1, window_s=20, counter="b")
    await limiter.reserve([a, b], ALICE)
    assert (await limiter.reserve([a, b], ALICE)).rule_id == "a"
    assert (await limiter.reserve([b, a], ALICE)).rule_id == "b"


async def test_rules_sharing_a_counter_see_each_others_cost_in_one_call(db) -> None:
    limiter = Limiter(db, FakeClock())
    first = LimitRequest("tool#1", "shared", max=3, window_s=60, scope="global", cost=2)
    second = LimitRequest("tool#2", "shared", max=3, window_s=60, scope="global", cost=2)
    refused = await limiter.reserve([first, second], ALICE)
    # 2 + 2 units can never fit in 3.
    assert refused == Exhausted("tool#2", "", 60.0)
    assert isinstance(await limiter.reserve([first], ALICE), Reservation)


async def test_release_gives_the_room_back(db) -> None:
    limiter = Limiter(db, FakeClock())
    limit = per_session(max_=2)
    first = await limiter.reserve([limit], ALICE)
    await limiter.reserve([limit], ALICE)
    assert isinstance(await limiter.reserve([limit], ALICE), Exhausted)

    assert isinstance(first, Reservation)
    await limiter.release(first)
    assert isinstance(await limiter.reserve([limit], ALICE), Reservation)
    # Releasing again frees nothing more.
    await limiter.release(first)
    assert isinstance(await limiter.reserve([limit], ALICE), Exhausted)


async def test_a_cancelled_reservation_takes_no_room(db) -> None:
    limiter = Limiter(db, FakeClock())
    limit = per_session(max_=1)
    for pause in range(3):  # cancelled before, while and after its batch is written
        waiting = asyncio.ensure_future(limiter.reserve([limit], ALICE))
        for _ in range(pause):
            await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    assert isinstance(await limiter.reserve([limit], ALICE), Reservation)
    assert isinstance(await limiter.reserve([limit], ALICE), Exhausted)


async def test_scopes_keep_separate_counters(db) -> None:
    limiter = Limiter(db, FakeClock())

    def limit(scope: str) -> LimitRequest:
        return LimitRequest(f"r-{scope}", f"c-{scope}", max=1, window_s=60, scope=scope)  # type: ignore[arg-type]

    alice_s1 = ScopeKeys("s1", "alice")
    alice_s2 = ScopeKeys("s2", "alice")
    bob_s3 = ScopeKeys("s3", "bob")

    assert isinstance(await limiter.reserve([limit("session")], alice_s1), Reservation)
    assert isinstance(await limiter.reserve([limit("session")], alice_s2), Reservation)
    assert isinstance(await limiter.reserve([limit("session")], alice_s1), Exhausted)

    assert isinstance(await limiter.reserve([limit("identity")], alice_s1), Reservation)
    assert isinstance(await limiter.reserve([limit("identity")], alice_s2), Exhausted)
    assert isinstance(await limiter.reserve([limit("identity")], bob_s3), Reservation)

    assert isinstance(await limiter.reserve([limit("global")], alice_s1), Reservation)
    assert isinstance(await limiter.reserve([limit("global")], bob_s3), Exhausted)


async def test_max_zero_blocks_and_cost_zero_takes_nothing(db) -> None:
    limiter = Limiter(db, FakeClock())
    blocked = per_session(max_=0, window_s=60)
    assert await limiter.reserve([blocked], ALICE) == Exhausted("spawn-task#1", blocked.reason, 60.0)
    assert isinstance(await limiter.reserve([per_session(max_=0, cost=0)], ALICE), Exhausted)
    # A cost larger than max can never fit either.
    assert (await limiter.reserve([per_session(max_=2, cost=3)], ALICE)).retry_after_s == 60.0

    one = per_session(max_=1)
    await limiter.reserve([one], ALICE)
    free = await limiter.reserve([per_session(max_=1, cost=0)], ALICE)
    assert free == Reservation(())


async def test_bad_requests_are_refused_with_the_field_named(db) -> None:
    limiter = Limiter(db, FakeClock())
    with pytest.raises(InvalidLimit, match="cost must be >= 0"):
        await limiter.reserve([per_session(cost=-1)], ALICE)
    with pytest.raises(InvalidLimit, match="window must be > 0"):
        await limiter.reserve([per_session(window_s=0)], ALICE)
    with pytest.raises(InvalidLimit, match="scope must be one of"):
        await limiter.reserve([LimitRequest("r", "c", 1, 60, "tenant")], ALICE)  # type: ignore[arg-type]


async def test_counts_survive_reopening_the_database(db_target: str) -> None:
    clock = FakeClock()
    path = db_target
    db = await open_guard_db(path)
    for _ in range(3):
        await Limiter(db, clock).reserve([per_session(max_=3)], ALICE)
    await db.close()

    clock.advance(15)
    db = await open_guard_db(path)
    try:
        full = await Limiter(db, clock).reserve([per_session(max_=3)], ALICE)
        assert full == Exhausted("spawn-task#1", "3 calls per 60 s per session", 45.0)
    finally:
        await db.close()


async def test_a_shorter_window_on_a_shared_counter_counts_only_its_window(db) -> None:
    clock = FakeClock(0.0)
    limiter = Limiter(db, clock)
    long = LimitRequest("long#1", "shared", max=2, window_s=100, scope="global")
    short = LimitRequest("short#1", "shared", max=1, window_s=10, scope="global")
    await limiter.reserve([long], ALICE)  # t=0
    clock.set(10)  # the hit at 0 has just left the short window
    assert isinstance(await limiter.reserve([short], ALICE), Reservation)
    clock.set(19.5)
    assert await limiter.reserve([short], ALICE) == Exhausted("short#1", "", 0.5)
    assert await limiter.reserve([long], ALICE) == Exhausted("long#1", "", 80.5)


async def test_expired_hits_are_swept_but_the_longest_window_is_kept(db) -> None:
    clock = FakeClock(0.0)
    limiter = Limiter(db, clock, sweep_interval_s=1)
    short = LimitRequest("a#1", "shared", max=100, window_s=10, scope="global")
    long = LimitRequest("b#1", "shared", max=2, window_s=100, scope="global")
    await limiter.reserve([long], ALICE)
    await limiter.reserve([short], ALICE)
    clock.set(50)
    await limiter.reserve([short], ALICE)  # sweeps: nothing is older than 100 s

    assert await limiter.reserve([long], ALICE) == Exhausted("b#1", "", 50.0)
    clock.set(200)
    await limiter.reserve([short], ALICE)  # sweeps the hits at 0 and 50
    count = await db.read(lambda c: c.execute("SELECT COUNT(*) FROM guard_limit_hits").fetchone()[0])
    assert count == 1


# -- several processes sharing one database ----------------------------------

_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from guard.storage.clock import FakeClock
    from guard.storage import open_database
    from guard.limits import Limiter, LimitRequest, Reservation, ScopeKeys

    async def main(path):
        db = await open_database(path)  # schema made by the parent
        limiter = Limiter(db, FakeClock(1_700_000_000.0))
        limit = LimitRequest("spawn-task#1", "spawn-task#1", 30, 60, "global")
        results = await asyncio.gather(
            *(limiter.reserve([limit], ScopeKeys("s", "i")) for _ in range(50))
        )
        await db.close()
        print(sum(isinstance(r, Reservation) for r in results))

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.parametrize("processes", [2, 4])
async def test_processes_sharing_the_database_admit_exactly_max_in_total(db_target: str, processes: int) -> None:
    # SQLite: processes sharing one file. PostgreSQL: daemons sharing one
    # database (the write lock is the advisory lock): 50 each, 30 admitted in all.
    db = await open_guard_db(db_target)
    await db.close()

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, db_target], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    admitted = 0
    for proc in procs:
        stdout, stderr = await asyncio.to_thread(proc.communicate, timeout=120)
        assert proc.returncode == 0, stderr
        admitted += int(stdout)
    assert admitted == 30


# -- against a reference model ---------------------------------------------


class ReferenceLimiter:
    """The documented behaviour, written plainly: a list of hits, scanned in full.

    Retention is modelled as documented: a counter keeps hits for the longest
    window requested of it so far; a key is pruned when it is checked, and
    every key at each sweep.
    """

    def __init__(self, sweep_interval_s: float) -> None:
        self.hits: list[tuple[int, tuple[str, str], float, int]] = []  # (reservation, key, t, cost)
        self.retain: dict[str, float] = {}
        self.sweep_interval_s = sweep_interval_s
        self.next_sweep = 0.0
        self.next_id = 0

    def used(self, key: tuple[str, str], window: float, at: float) -> int:
        return sum(c for _, k, t, c in self.hits if k == key and at < t + window)

    def prune(self, now: float, key: tuple[str, str] | None = None) -> None:
        self.hits = [
            h for h in self.hits
            if (key is not None and h[1] != key) or h[2] > now - self.retain.get(h[1][0], float("inf"))
        ]  # fmt: skip

    def reserve(self, requests: list[LimitRequest], now: float) -> int | Exhausted:
        if now >= self.next_sweep:
            self.prune(now)
            self.next_sweep = now + self.sweep_interval_s
        for i, r in enumerate(requests):
            key = (r.counter, r.scope)
            earlier = sum(q.cost for q in requests[:i] if (q.counter, q.scope) == key)
            if r.max == 0 or earlier + r.cost > r.max:
                return Exhausted(r.rule_id, r.reason, r.window_s)
            if not r.cost:
                continue
            self.retain[r.counter] = max(self.retain.get(r.counter, 0), r.window_s)
            self.prune(now, key)
            if self.used(key, r.window_s, now) + earlier + r.cost > r.max:
                # The earliest moment at which it fits: when some hit leaves.
                leave = sorted({t + r.window_s for _, k, t, _ in self.hits if k == key and now < t + r.window_s})
                wait = next(w for w in leave if self.used(key, r.window_s, w) + earlier + r.cost <= r.max)
                return Exhausted(r.rule_id, r.reason, wait - now)
        self.next_id += 1
        for r in requests:
            if r.cost:
                self.hits.append((self.next_id, (r.counter, r.scope), now, r.cost))
        return self.next_id

    def release(self, reservation: int) -> None:
        self.hits = [h for h in self.hits if h[0] != reservation]


_LIMITS = {
    # Three rules sharing one counter, one of them over a longer window, and
    # a rule with its own counter.
    "small": LimitRequest("small", "shared", max=4, window_s=10, scope="global"),
    "large": LimitRequest("large", "shared", max=6, window_s=10, scope="global"),
    "long": LimitRequest("long", "shared", max=8, window_s=20, scope="global"),
    "slow": LimitRequest("slow", "slow", max=3, window_s=6.5, scope="global"),
}
_SWEEP_S = 15

_reserve = st.tuples(
    st.just("reserve"),
    st.lists(st.tuples(st.sampled_from(sorted(_LIMITS)), st.integers(0, 3)), min_size=1, max_size=3),
)
_operation = st.one_of(
    _reserve,
    _reserve,  # twice as likely: keep the counters near full
    # Whole seconds land exactly on window edges; quarters (exact in binary) in between.
    st.tuples(st.just("advance"), st.integers(0, 3)),
    st.tuples(st.just("advance"), st.integers(0, 60).map(lambda q: q / 4)),
    st.tuples(st.just("release"), st.integers(0, 50)),
)


@settings(
    max_examples=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
@given(operations=st.lists(_operation, min_size=20, max_size=100))
def test_matches_the_reference_model(db_target: str, operations: list) -> None:
    # One database for every example (a fresh PostgreSQL database each would
    # dominate the run): each example starts from empty tables.
    async def run(target: str) -> None:
        db = await open_guard_db(target)
        try:
            await db.write(_empty_limit_tables)
            clock = FakeClock(1000.0)
            limiter = Limiter(db, clock, sweep_interval_s=_SWEEP_S)
            model = ReferenceLimiter(_SWEEP_S)
            reservations: list[tuple[Reservation, int]] = []
            for op, arg in operations:
                if op == "advance":
                    clock.advance(arg)
                elif op == "release":
                    if reservations:
                        ours, theirs = reservations[arg % len(reservations)]
                        await limiter.release(ours)
                        model.release(theirs)
                else:
                    requests = [
                        LimitRequest(**{**_LIMITS[name].__dict__, "cost": cost}) for name, cost in arg
                    ]
                    got = await limiter.reserve(requests, ALICE)
                    expected = model.reserve(requests, clock.now())
                    if isinstance(expected, Exhausted):
                        assert got == expected
                    else:
                        assert isinstance(got, Reservation)
                        reservations.append((got, expected))
        finally:
            await db.close()

    asyncio.run(run(db_target))


def _empty_limit_tables(c) -> None:
    c.execute("DELETE FROM guard_limit_hits")
    c.execute("DELETE FROM guard_limit_totals")
    c.execute("DELETE FROM guard_limit_counters")


async def test_reservations_committed_together_see_each_others_hits(db) -> None:
    # Concurrent reservations share one transaction; each counts the hits of
    # those before it, and a full limit's retry time walks them too.
    clock = FakeClock(0.0)
    limiter = Limiter(db, clock)
    one = per_session(max_=10, window_s=60)
    await limiter.reserve([one], ALICE)  # t=0: 1 unit
    clock.set(5)
    results = await asyncio.gather(
        *(limiter.reserve([one], ALICE) for _ in range(9)),  # t=5: 9 more, full
        limiter.reserve([per_session(max_=10, window_s=60, cost=3)], ALICE),
        limiter.reserve([one], ALICE),
    )
    assert all(isinstance(r, Reservation) for r in results[:9])
    # 3 units must leave: the one at t=0 and two of those at t=5 (at 65).
    assert results[9] == Exhausted("spawn-task#1", "10 calls per 60 s per session", 60.0)
    assert results[10] == Exhausted("spawn-task#1", "10 calls per 60 s per session", 55.0)
    ids = [i for r in results[:9] for i in r.ids]
    assert len(set(ids)) == 9
    await limiter.release(results[0])
    assert isinstance(await limiter.reserve([one], ALICE), Reservation)


async def test_a_batch_over_many_keys_counts_each_key_on_its_own(db) -> None:
    clock = FakeClock(0.0)
    limiter = Limiter(db, clock)
    two = per_session(max_=2, window_s=10)
    sessions = [ScopeKeys(f"s{n}", "alice") for n in range(5)]
    await limiter.reserve([two], sessions[0])  # t=0: s0 has one already
    clock.set(4)
    results = await asyncio.gather(*(limiter.reserve([two], keys) for keys in sessions for _ in range(3)))
    admitted = {keys.session: 0 for keys in sessions}
    for keys, result in zip([k for k in sessions for _ in range(3)], results, strict=True):
        admitted[keys.session] += isinstance(result, Reservation)
    assert admitted == {"s0": 1, "s1": 2, "s2": 2, "s3": 2, "s4": 2}
    # s0's oldest hit leaves at 10, the others' at 14.
    assert {r.retry_after_s for r in results[:3] if isinstance(r, Exhausted)} == {6.0}
    assert {r.retry_after_s for r in results[3:] if isinstance(r, Exhausted)} == {10.0}
    clock.set(10)  # s0's first hit has left; the batch prunes it
    assert isinstance(await limiter.reserve([two], sessions[0]), Reservation)
    assert isinstance(await limiter.reserve([two], sessions[1]), Exhausted)
