"""Sliding-window rate limits kept in the guard's database (SQLite or PostgreSQL).

Each unit of room a call takes is one row in ``guard_limit_hits`` (a log, not
a counter), so "at most ``max`` units in any ``window_s`` seconds" is checked
exactly: a hit at time ``t`` counts while ``now < t + window_s``. Times are
stored as integer microseconds, so the window arithmetic and the reported
``retry_after_s`` carry no float rounding.

A reservation checks and takes room in every requested counter inside one
write transaction: all or nothing, serialised against every other writer of
the database in this process and in any other (``BEGIN IMMEDIATE`` on a
SQLite file; the write advisory lock on PostgreSQL, so several daemons on
several hosts never admit twice at a window's edge).

Checking costs O(1), not O(hits in the window): each counter key's rows
older than its counter's longest window are pruned as it is checked, and
triggers keep ``guard_limit_totals`` equal to the sum of the rows left, which
is then exactly the room used in that window. (A shorter window on a counter
shared with a longer one sums its range instead.) Only a full limit walks
hits, oldest first, and only until enough room would be free.

Reservations that arrive while a batch commits share the next transaction
(``guard.storage.group_commit``); each is checked in turn, counting the hits
of those before it, and their hits are written together at the end, in one
statement. On PostgreSQL, where every statement is a round trip, the prunes
and the totals of every key the batch counts are one statement, the batch
is one instant (the clock read once, under the write lock), and the
transaction commits with ``synchronous_commit = off``: acknowledged once in
the server's memory and visible to every daemon at once; only a crash of the
database server can lose the last moments' hits (letting a few more calls
through after it), as only a power loss can with SQLite's
``synchronous = NORMAL``.

Edge cases, decided:

- ``max == 0`` blocks every call, whatever its cost; so does a cost larger
  than ``max`` (it can never fit). Both report ``retry_after_s = window_s``:
  there is no time at which the call will succeed under this policy, and a
  window is the soonest a changed policy could be expected to let it through.
- ``cost == 0`` takes no room and always fits (except under ``max == 0``).
- Requests naming the same counter key (two rules sharing a named counter)
  see each other's cost within one reservation.
- Hits are kept for the longest window ever requested of their counter
  (remembered in ``guard_limit_counters``); keys nobody checks any more (old
  sessions) are swept at most once per ``sweep_interval_s``. So a counter
  first asked for with a longer window than before (a policy change, or a
  rule sharing the counter that had not run yet) can only count hits younger
  than the previous longest window.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from guard.storage.clock import Clock
from guard.storage.database import Database, Tx
from guard.storage.group_commit import GroupCommit
from guard.policy import Scope

logger = logging.getLogger(__name__)

_US = 1_000_000
_SCOPES: tuple[str, ...] = ("session", "identity", "global")

_SUM_SQL = (
    # CAST: PostgreSQL sums BIGINT as NUMERIC (a Decimal in Python).
    "SELECT CAST(COALESCE(SUM(cost), 0) AS BIGINT) FROM guard_limit_hits"
    " WHERE counter = ? AND scope = ? AND scope_value = ? AND at_us > ?"
)
_OLDEST_SQL = (
    "SELECT at_us, cost FROM guard_limit_hits"
    " WHERE counter = ? AND scope = ? AND scope_value = ? AND at_us > ?"
    " ORDER BY at_us"
)
_TOTAL_SQL = (
    "SELECT total FROM guard_limit_totals WHERE counter = ? AND scope = ? AND scope_value = ?"
)
_PRUNE_SQL = (
    "DELETE FROM guard_limit_hits"
    " WHERE counter = ? AND scope = ? AND scope_value = ? AND at_us <= ?"
)
# PostgreSQL: prune every key a batch checks and read what each has left, in
# one round trip. Every part of the statement sees the tables as they were
# before it (the totals trigger runs at its end), so what is left is the
# total before minus what was pruned.
_PRUNE_AND_TOTALS_SQL = """
WITH k (counter, scope, scope_value, cutoff) AS (VALUES {values}),
pruned AS (
    DELETE FROM guard_limit_hits h USING k
    WHERE h.counter = k.counter AND h.scope = k.scope AND h.scope_value = k.scope_value AND h.at_us <= k.cutoff
    RETURNING h.counter, h.scope, h.scope_value, h.cost
),
gone AS (SELECT counter, scope, scope_value, SUM(cost) AS cost FROM pruned GROUP BY counter, scope, scope_value)
SELECT k.counter, k.scope, k.scope_value, CAST(COALESCE(t.total, 0) - COALESCE(g.cost, 0) AS BIGINT)
FROM k
LEFT JOIN guard_limit_totals t ON t.counter = k.counter AND t.scope = k.scope AND t.scope_value = k.scope_value
LEFT JOIN gone g ON g.counter = k.counter AND g.scope = k.scope AND g.scope_value = k.scope_value
"""
_KEY_VALUES = "(CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS BIGINT))"
_KEYS_PER_STATEMENT = 500
_INSERT_ROWS = 200  # hits per INSERT statement (5 parameters each)
_RETAINED_SQL = "SELECT retain_us FROM guard_limit_counters WHERE counter = ?"
_RETAIN_SQL = (
    "INSERT INTO guard_limit_counters (counter, retain_us) VALUES (?, ?)"
    # Qualified, and CASE rather than max()/GREATEST(): the one spelling both backends accept.
    " ON CONFLICT (counter) DO UPDATE SET retain_us = CASE"
    " WHEN guard_limit_counters.retain_us > excluded.retain_us THEN guard_limit_counters.retain_us"
    " ELSE excluded.retain_us END"
    " RETURNING retain_us"
)


@dataclass(frozen=True)
class LimitRequest:
    """One matching rate limit a call must find room in."""

    rule_id: str  # e.g. "spawn-task#1", reported back when the limit is full
    counter: str  # counter name: the rule's named counter, else the rule id
    max: int
    window_s: float
    scope: Scope
    cost: int = 1
    reason: str = ""  # human text, e.g. "30 calls per 60 s per session"


@dataclass(frozen=True)
class ScopeKeys:
    """Who is calling: the values the three scopes key their counters by."""

    session: str
    identity: str


@dataclass(frozen=True)
class Reservation:
    """Room taken in every requested counter; give it back with ``Limiter.release``."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class Exhausted:
    """No room: the first full limit and when a retry can succeed."""

    rule_id: str
    reason: str
    retry_after_s: float


class InvalidLimit(ValueError):
    """A request the limiter cannot count: negative max or cost, empty window, unknown scope."""


# (counter, scope, scope value): the rows one counter is kept in.
_Key = tuple[str, str, str]


@dataclass(frozen=True)
class _Planned:
    request: LimitRequest
    key: _Key
    window_us: int


class Limiter:
    """Reserves room in sliding-window counters stored in ``db``.

    Reservations that arrive while another batch is committing are checked
    and taken together in the next transaction, one after another (each sees
    the hits of those before it): the same answers as one transaction each,
    at a fraction of the cost under concurrency.
    """

    def __init__(
        self, db: Database, clock: Clock, *, sweep_interval_s: float = 60.0, max_batch: int = 256
    ) -> None:
        self._db = db
        self._clock = clock
        self._sweep_interval_us = round(sweep_interval_s * _US)
        self._next_sweep_us = 0  # only touched inside transactions (one at a time)
        # Reservations queued while a batch commits are taken in the next one;
        # one whose caller gave up before its batch began takes no room, one
        # whose caller gave up during the commit is given back.
        self._writer: GroupCommit[list[_Planned], Reservation | Exhausted] = GroupCommit(
            self._commit, max_batch=max_batch, drop_abandoned=True, abandoned=self._give_back,
            name="guard-limiter",
        )  # fmt: skip

    async def reserve(
        self, requests: Sequence[LimitRequest], keys: ScopeKeys
    ) -> Reservation | Exhausted:
        """Take room for every request at once, or none and say which limit is full.

        A caller cancelled while waiting takes no room: if its reservation
        was already committed, it is given back.
        """
        plan = [_plan(request, keys) for request in requests]
        if not plan:
            return Reservation(())
        return await self._writer.submit(plan)

    async def usage(
        self, counters: Sequence[tuple[str, float, str]], keys: ScopeKeys
    ) -> dict[str, int]:
        """Units now in each ``(counter, window_s, scope)`` window, for ``state.<counter>`` conditions."""
        planned = [
            (name, _plan(LimitRequest(name, name, 0, window_s, scope), keys))  # type: ignore[arg-type]
            for name, window_s, scope in counters
        ]
        if not planned:
            return {}
        now = round(self._clock.now() * _US)

        def read(c: Tx) -> dict[str, int]:
            return {
                name: c.execute(_SUM_SQL, (*item.key, now - item.window_us)).fetchone()[0] for name, item in planned
            }

        return await self._db.read(read)

    async def release(self, reservation: Reservation) -> None:
        """Give the room back (the call did not happen). Releasing twice is harmless."""
        if not reservation.ids:
            return
        ids = [(row_id,) for row_id in reservation.ids]
        await self._db.write(
            lambda c: c.executemany("DELETE FROM guard_limit_hits WHERE id = ?", ids)
        )

    # -- batching (event loop) ---------------------------------------------

    async def _commit(self, plans: list[list[_Planned]]) -> list[Reservation | Exhausted]:
        results = await self._db.write(lambda c: self._reserve_all(c, plans))
        for result in results:
            if isinstance(result, Exhausted):
                logger.debug("limit %s full; retry after %.6f s", result.rule_id, result.retry_after_s)
        return results

    async def _give_back(self, results: list[Reservation | Exhausted]) -> None:
        orphaned = [row_id for result in results if isinstance(result, Reservation) for row_id in result.ids]
        if orphaned:
            await self.release(Reservation(tuple(orphaned)))

    # -- inside the transaction (a worker thread) --------------------------

    def _reserve_all(self, c: Tx, plans: list[list[_Planned]]) -> list[Reservation | Exhausted]:
        # Retention read once per counter per transaction: no other process
        # can change it while we hold the write lock.
        retained: dict[str, int] = {}
        # Hits taken by earlier reservations of this batch, written together
        # at its end (one statement, not one per reservation): (at_us, cost) per key.
        batch = _Batch()
        if c.dialect == "postgresql":
            # The commit is acknowledged once it is in the server's memory, visible
            # to every other daemon at once; only a crash of the database server
            # can lose the last moments' hits (as a power loss can on SQLite).
            c.execute("SET LOCAL synchronous_commit = off")
            # Every statement is a round trip here: the batch is one instant
            # (read under the write lock), and what each key has used is read
            # for all of them at once.
            now = self._now()
            self._maybe_sweep(c, now)
            known = self._prefetch(c, plans, now, retained)
            results = [self._reserve_one(c, plan, retained, batch, now, known) for plan in plans]
        else:
            results = [self._reserve_one(c, plan, retained, batch, None, {}) for plan in plans]
        ids = batch.write(c)
        return [
            Reservation(tuple(ids[n] for n in result)) if isinstance(result, range) else result
            for result in results
        ]

    def _now(self) -> int:
        return round(self._clock.now() * _US)

    def _maybe_sweep(self, c: Tx, now: int) -> None:
        if now >= self._next_sweep_us:
            self._sweep(c, now)

    def _prefetch(
        self, c: Tx, plans: list[list[_Planned]], now: int, retained: dict[str, int]
    ) -> dict[_Key, int]:
        """Prune each key the batch counts by its running total, and return what it has left."""
        items = [item for plan in plans for item in plan if item.request.cost and item.request.max]
        for item in items:
            if retained.get(item.request.counter, 0) < item.window_us:
                retained[item.request.counter] = self._retention(c, item.request.counter, item.window_us)
        cutoffs: dict[_Key, int] = {}
        for item in items:
            retain_us = retained[item.request.counter]
            if item.window_us >= retain_us:
                cutoffs[item.key] = now - retain_us
        known: dict[_Key, int] = {}
        pending = list(cutoffs.items())
        for start in range(0, len(pending), _KEYS_PER_STATEMENT):
            chunk = pending[start : start + _KEYS_PER_STATEMENT]
            sql = _PRUNE_AND_TOTALS_SQL.format(values=", ".join([_KEY_VALUES] * len(chunk)))
            params = [value for key, cutoff in chunk for value in (*key, cutoff)]
            for counter, scope, value, used in c.execute(sql, params).fetchall():
                known[(counter, scope, value)] = int(used)
        return known

    def _reserve_one(
        self,
        c: Tx,
        plan: list[_Planned],
        retained: dict[str, int],
        batch: _Batch,
        now: int | None,
        known: dict[_Key, int],
    ) -> range | Exhausted:
        if now is None:
            # Read the clock under the write lock, so hits from processes that
            # queued for the lock are logged in the order they were counted.
            now = self._now()
            self._maybe_sweep(c, now)
        taken: dict[_Key, int] = {}
        for item in plan:
            full = self._check(c, item, now, taken.get(item.key, 0), retained, batch, known)
            if full is not None:
                return full
            if item.request.cost:
                taken[item.key] = taken.get(item.key, 0) + item.request.cost
        start = len(batch.rows)
        for item in plan:
            if item.request.cost:
                batch.add(item.key, now, item.request.cost)
        return range(start, len(batch.rows))

    def _check(
        self,
        c: Tx,
        item: _Planned,
        now: int,
        taken: int,
        retained: dict[str, int],
        batch: _Batch,
        known: dict[_Key, int],
    ) -> Exhausted | None:
        request = item.request
        if request.max == 0 or taken + request.cost > request.max:
            # Can never fit (see the module docstring).
            return Exhausted(request.rule_id, request.reason, item.window_us / _US)
        if request.cost == 0:
            return None
        retain_us = retained.get(request.counter, 0)
        if retain_us < item.window_us:
            retain_us = retained[request.counter] = self._retention(c, request.counter, item.window_us)
        cutoff = now - item.window_us
        if item.window_us >= retain_us:
            # Every row left after pruning is inside this window: the running total is the answer.
            if item.key in known:  # pruned and read at the start of the batch
                used = known[item.key]
            else:
                c.execute(_PRUNE_SQL, (*item.key, now - retain_us))
                row = c.execute(_TOTAL_SQL, item.key).fetchone()
                used = row[0] if row else 0
        else:
            c.execute(_PRUNE_SQL, (*item.key, now - retain_us))
            (used,) = c.execute(_SUM_SQL, (*item.key, cutoff)).fetchone()
        pending = [hit for hit in batch.hits.get(item.key, ()) if hit[0] > cutoff]
        used += sum(cost for _, cost in pending)
        excess = used + taken + request.cost - request.max
        if excess <= 0:
            return None
        # Walk the oldest hits until enough units have left the window; hits
        # sharing a timestamp leave together, so the walk simply continues.
        hits = [(int(at_us), int(cost)) for at_us, cost in c.execute(_OLDEST_SQL, (*item.key, cutoff)).fetchall()]
        freed = 0
        for at_us, cost in sorted(hits + pending, key=lambda hit: hit[0]):
            freed += cost
            if freed >= excess:
                return Exhausted(request.rule_id, request.reason, (at_us + item.window_us - now) / _US)
        raise AssertionError("limit log changed inside its own transaction")  # pragma: no cover

    @staticmethod
    def _retention(c: Tx, counter: str, window_us: int) -> int:
        # Read per transaction, not cached: another process may have stored a longer window.
        row = c.execute(_RETAINED_SQL, (counter,)).fetchone()
        if row is not None and row[0] >= window_us:
            return int(row[0])
        (stored,) = c.execute(_RETAIN_SQL, (counter, window_us)).fetchone()
        return int(stored)

    def _sweep(self, c: Tx, now: int) -> None:
        deleted = 0
        for counter, retain_us in c.execute(
            "SELECT counter, retain_us FROM guard_limit_counters"
        ).fetchall():
            deleted += c.execute(
                "DELETE FROM guard_limit_hits WHERE counter = ? AND at_us <= ?",
                (counter, now - retain_us),
            ).rowcount
        c.execute("DELETE FROM guard_limit_totals WHERE total <= 0")
        self._next_sweep_us = now + self._sweep_interval_us
        if deleted:
            logger.debug("swept %d expired rate-limit hits", deleted)


class _Batch:
    """The hits one transaction's reservations take, counted as they are taken, written at its end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, int, int]] = []
        self.hits: dict[_Key, list[tuple[int, int]]] = {}

    def add(self, key: _Key, at_us: int, cost: int) -> None:
        self.rows.append((*key, at_us, cost))
        self.hits.setdefault(key, []).append((at_us, cost))

    def write(self, c: Tx) -> list[int]:
        """Insert every row; their ids in the order the rows were added."""
        ids: list[int] = []
        for start in range(0, len(self.rows), _INSERT_ROWS):
            chunk = self.rows[start : start + _INSERT_ROWS]
            values = ", ".join(["(?, ?, ?, ?, ?)"] * len(chunk))
            params = [value for row in chunk for value in row]
            # Ids come from one sequence, assigned in VALUES order while we hold
            # the write lock: sorted, they line up with the rows.
            ids += sorted(
                row[0] for row in c.execute(
                    f"INSERT INTO guard_limit_hits (counter, scope, scope_value, at_us, cost) VALUES {values}"
                    " RETURNING id",
                    params,
                ).fetchall()
            )  # fmt: skip
        return ids


def _plan(request: LimitRequest, keys: ScopeKeys) -> _Planned:
    if request.scope not in _SCOPES:
        raise InvalidLimit(
            f"{request.rule_id}: scope must be one of {', '.join(_SCOPES)}, not {request.scope!r}"
        )
    if request.max < 0:
        raise InvalidLimit(f"{request.rule_id}: max must be >= 0, not {request.max}")
    if request.cost < 0:
        raise InvalidLimit(f"{request.rule_id}: cost must be >= 0, not {request.cost}")
    window_us = round(request.window_s * _US)
    if window_us <= 0:
        raise InvalidLimit(f"{request.rule_id}: window must be > 0 s, not {request.window_s}")
    if request.scope == "session":
        value = keys.session
    elif request.scope == "identity":
        value = keys.identity
    else:
        value = ""
    return _Planned(request, (request.counter, request.scope, value), window_us)
