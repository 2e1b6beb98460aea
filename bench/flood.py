"""Another client's latency while a worker floods its output with tiny lines."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
from mcp import Client

from bench.core import Metric, Section, Sizes, fmt, median, percentile, progress, rounded
from bench.workspace import Workspace, structured

TITLE = "Output flood"
METHOD = """\
Two stdio clients of one daemon (through `taskwarden serve`, as users run
it). Client B spawns a `shell` task that prints 2-byte lines as fast as it
can (`yes | head -c SIZE`: `y` and a newline, over and over); client A calls
`list-tasks` (the default page, 20 tasks) one call after another and times
each call. Rounds alternate: a batch of calls with the server idle, then a
batch while the flood runs (the worker is cancelled right after the batch, so
every flooded call ran against a printing worker; a round whose worker ended
before its batch did is counted and reported). `flood_p99_ratio` = p99 of
the flooded calls ÷ p99 of the idle calls, over every call of every round.
"""

MiB = 1024 * 1024
FLOOD = "yes | head -c {bytes}"


async def run(sizes: Sizes, scratch: Path) -> Section:
    section = Section("flood", TITLE, METHOD)
    ws = Workspace(scratch)
    calls = sizes.flood_calls
    idle: list[float] = []
    flooded: list[float] = []
    ended_early = 0
    logged = 0
    async with ws.client() as (a, server), ws.client() as (b, _):
        for _ in range(3):  # warm-up: imports, caches, the first page
            structured(await a.call_tool("list-tasks", {}), "list-tasks")
        for r in range(sizes.flood_rounds):
            idle.extend(await _batch(a, calls))
            prompt = FLOOD.format(bytes=sizes.flood_round_mb * MiB)
            task = structured(await b.call_tool("spawn-task", {"prompt": prompt, "cwd": str(ws.work)}), "spawn-task")
            log = ws.db.parent / "logs" / f"{task['task_id']}.log"
            # The flood has begun once its log grows.
            with anyio.fail_after(30):
                while not log.exists() or log.stat().st_size < 64 * 1024:
                    await anyio.sleep(0.005)
            flooded.extend(await _batch(a, calls))
            state = structured(await b.call_tool("get-task", {"task_id": task["task_id"]}), "get-task")
            if state["status"] != "working":
                ended_early += 1
            await b.call_tool("cancel-task", {"task_id": task["task_id"]})
            logged += log.stat().st_size
            log.unlink()  # megabytes of "y" have served their purpose
            progress(
                f"flood: round {r + 1}: idle p99 {percentile(idle, 99) * 1000:.2f} ms, "
                f"flooded p99 {percentile(flooded, 99) * 1000:.2f} ms; worker still printing: {state['status'] == 'working'}"
            )
    ratio = percentile(flooded, 99) / percentile(idle, 99)
    section.metrics = [
        Metric(
            "flood_p99_ratio", rounded(ratio), "×",
            "another client's `list-tasks` p99 while a worker prints 2-byte lines flat out ÷ idle p99", 3.0, "lower",
        ),  # fmt: skip
        Metric("flood_list_ms_p99", rounded(percentile(flooded, 99) * 1000), "ms", "`list-tasks` p99 during the flood"),
        Metric("idle_list_ms_p99", rounded(percentile(idle, 99) * 1000), "ms", "`list-tasks` p99, idle"),
    ]
    section.details = [
        f"{sizes.flood_rounds} rounds × {calls} calls per side; the workers printed {logged / MiB:,.0f} MiB in all"
        + (f"; in {ended_early} round(s) the worker ended before the batch did." if ended_early else "."),
        "",
        "| `list-tasks` | p50 | p99 | max |",
        "|---|---|---|---|",
        *(
            f"| {name} | {fmt(median(xs) * 1000)} ms | {fmt(percentile(xs, 99) * 1000)} ms | {fmt(max(xs) * 1000)} ms |"
            for name, xs in (("idle", idle), ("during the flood", flooded))
        ),
    ]
    return section


async def _batch(client: Client, n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        t = time.perf_counter()
        structured(await client.call_tool("list-tasks", {}), "list-tasks")
        latencies.append(time.perf_counter() - t)
    return latencies
