"""What one rate-limit reservation costs while 10 callers reserve at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.core import Metric, Section, Sizes, fmt, percentile, progress, rounded
from guard.decision import decide
from guard.dialects import load_default_policy
from guard.limits import Limiter, LimitRequest, Reservation, ScopeKeys
from guard.schema import open_guard_db
from guard.storage.clock import SystemClock

TITLE = "Rate-limit check under concurrency"
METHOD = """\
`Limiter.reserve` as the server calls it: the limit is the one the built-in
policy puts on `spawn-task` (30 calls per 60 s per session), taken from
`decide()`, on one database file (WAL) opened the way the server opens it.
N coroutines (10) on one event loop and one connection each reserve in a
loop, every one in its own MCP session, moving to a fresh session every 30
calls — the steady state of a server whose callers stay under the limit, so
every reservation is admitted and written. One sample is one `await
limiter.reserve(...)` as its caller sees it: planning, queueing behind the
batch in flight (concurrent reservations share one `BEGIN IMMEDIATE`
transaction), the transaction itself (prune, read the running total, insert
the hit) and the wake-up. Also shown: the amortised cost (wall time ÷
reservations), a single caller, and 10 callers hammering a full limit
(every call refused with its exact `retry_after_s`).

With `TASKWARDEN_TEST_PG` naming a PostgreSQL server, the same runs again on
a fresh database there (created for the run, dropped after), the way several
daemons share one: each write transaction takes the database-wide write lock
(a transaction-scoped advisory lock) instead of `BEGIN IMMEDIATE`."""

PG_ENV = "TASKWARDEN_TEST_PG"


async def run(sizes: Sizes, scratch: Path) -> Section:
    section = Section("limits", TITLE, METHOD)
    verdict = decide(load_default_policy(), "spawn-task", {"prompt": "x"}, "bench")
    requests = verdict.limits
    assert requests, "the built-in policy limits spawn-task"
    sqlite = await _measure(scratch / "limits.db", requests, sizes)
    backends = [("SQLite", "", sqlite)]
    pg_server = os.environ.get(PG_ENV)
    if pg_server:
        with _fresh_pg_database(pg_server) as url:
            backends.append(("PostgreSQL", "_pg", await _measure(url, requests, sizes)))

    section.details = [
        "| backend | scenario | callers | reservations | admitted | p50 | p99 | amortised | reservations/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, suffix, (admitted, single, full) in backends:
        p50 = percentile(admitted.latencies, 50) * 1e6
        progress(f"limits: {name} p50 {p50:.0f} µs per reservation with {sizes.limit_clients} callers")
        where = f" ({name})" if suffix else ""
        section.metrics += [
            Metric(
                f"limit_check_us_p50{suffix}",
                rounded(p50),
                "µs",
                f"one reservation, {sizes.limit_clients} concurrent callers, p50{where}",
                300 if not suffix else 1000,
                "lower",
            ),
            Metric(
                f"limit_check_us_p99{suffix}",
                rounded(percentile(admitted.latencies, 99) * 1e6), "µs", f"the same, p99{where}",
            ),
        ]  # fmt: skip
        section.details += [
            _row(name, "admitted (headline)", sizes.limit_clients, admitted),
            _row(name, "single caller", 1, single),
            _row(name, "limit full, refused", sizes.limit_clients, full),
        ]
    if not pg_server:
        section.details.append(f"\nPostgreSQL not measured: set `{PG_ENV}` to a server URL whose role may CREATE DATABASE.")
    return section


async def _measure(
    target: str | Path, requests: Sequence[LimitRequest], sizes: Sizes
) -> tuple[_Outcome, _Outcome, _Outcome]:
    db = await open_guard_db(target)
    try:
        limiter = Limiter(db, SystemClock())
        n = sizes.limit_per_client
        # Warm up: statement caches, the counters table.
        await _scenario(limiter, _renamed(requests, "warm"), 2, n // 4, rotate=True)
        admitted = await _scenario(limiter, _renamed(requests, "admit"), sizes.limit_clients, n, rotate=True)
        single = await _scenario(limiter, _renamed(requests, "single"), 1, n, rotate=True)
        full = await _scenario(limiter, _renamed(requests, "full"), sizes.limit_clients, n // 2, rotate=False)
    finally:
        await db.close()
    return admitted, single, full


@contextlib.contextmanager
def _fresh_pg_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server ``server_url`` names, dropped afterwards."""
    from urllib.parse import quote

    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    name = f"tw_bench_{secrets.token_hex(6)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        parts = conninfo_to_dict(server_url)
        parts["dbname"] = name
        # taskwarden tells a server database by its scheme: a URL with the conninfo as its query.
        query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in parts.items() if k != "dbname")
        yield f"postgresql:///{name}" + (f"?{query}" if query else "")
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class _Outcome:
    def __init__(self, latencies: list[float], admitted: int, wall: float) -> None:
        self.latencies = latencies
        self.admitted = admitted
        self.wall = wall


async def _scenario(
    limiter: Limiter, requests: Sequence[LimitRequest], clients: int, per_client: int, *, rotate: bool
) -> _Outcome:
    latencies: list[float] = []
    admitted = 0

    async def client(i: int) -> None:
        nonlocal admitted
        for k in range(per_client):
            # 30 calls per session keeps each under the 30/60 s limit.
            session = f"s{i}-{k // 30}" if rotate else f"s{i}"
            keys = ScopeKeys(session=session, identity="bench")
            start = time.perf_counter()
            result = await limiter.reserve(requests, keys)
            latencies.append(time.perf_counter() - start)
            admitted += isinstance(result, Reservation)

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return _Outcome(latencies, admitted, time.perf_counter() - start)


def _renamed(requests: Sequence[LimitRequest], tag: str) -> list[LimitRequest]:
    # A counter of its own per scenario, so one scenario's hits never fill another's window.
    return [
        LimitRequest(r.rule_id, f"{r.counter}@{tag}", r.max, r.window_s, r.scope, r.cost, r.reason) for r in requests
    ]


def _row(backend: str, name: str, clients: int, o: _Outcome) -> str:
    n = len(o.latencies)
    return (
        f"| {backend} | {name} | {clients} | {n} | {o.admitted} | {fmt(percentile(o.latencies, 50) * 1e6)} µs "
        f"| {fmt(percentile(o.latencies, 99) * 1e6)} µs | {fmt(o.wall / n * 1e6)} µs | {fmt(n / o.wall)} |"
    )
