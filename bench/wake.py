"""From a worker's exit to the wait-task result at the client, over stdio."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.core import Metric, Section, Sizes, fmt, median, percentile, progress, rounded
from bench import postgres
from bench.workspace import Workspace, structured

TITLE = "Wake-up latency of wait-task"
METHOD = """\
A real `taskwarden serve` process over stdio, the SDK client in the bench
process. The worker profile runs `python -S -c …`: the worker sleeps 0.25 s
(so `wait-task` is certainly already blocked on it), then its very last act
is to write `time.time()` to stdout and `os._exit(0)`. That line is the
task's final output. The client calls `spawn-task`, then `wait-task` on the
task; when the result arrives the client takes `time.time()` and subtracts
the worker's timestamp (same machine, same clock). The interval covers the
worker's exit, the server reaping it and draining its pipes, the store write
that finishes the task, the change-feed wake-up of the waiting call, reading
the task, the result's trip over stdio and the client's parsing of it.
Samples run one at a time. For contrast: the most-used peer server polls its
workers once a second, so its wake-up averages ~500 ms."""

# The worker's whole program: sleep, then stamp the time and leave at once.
STAMP = "import os, sys, time; time.sleep(float(sys.argv[1])); os.write(1, b'%r\\n' % time.time()); os._exit(0)"
SLEEP_S = 0.25


async def run(sizes: Sizes, scratch: Path) -> Section:
    section = Section("wake", TITLE, METHOD + POSTGRES)
    sqlite = await _samples(sizes, scratch / "sqlite", None)
    p50, p99 = percentile(sqlite, 50), percentile(sqlite, 99)
    progress(f"wake: p50 {p50:.2f} ms, p99 {p99:.2f} ms over {len(sqlite)} samples")
    section.metrics = [
        Metric("wake_ms_p50", rounded(p50), "ms", "worker exit → wait-task result at the client, p50", 10, "lower"),
        Metric("wake_ms_p99", rounded(p99), "ms", "the same, p99", 50, "lower"),
    ]
    section.details = [_summary("SQLite", sqlite)]
    if not postgres.available():
        section.details.append(f"PostgreSQL: not measured (${postgres.ENV} is not set).")
        return section
    with postgres.fresh_database() as url:
        pg = await _samples(sizes, scratch / "postgresql", url)
    pg_p50 = percentile(pg, 50)
    progress(f"wake on PostgreSQL: p50 {pg_p50:.2f} ms over {len(pg)} samples")
    section.metrics.append(
        Metric("wake_ms_p50_postgresql", rounded(pg_p50), "ms", "the same on PostgreSQL, p50", 100, "lower")
    )
    section.details.append(_summary("PostgreSQL", pg))
    return section


POSTGRES = """

The same, with the daemon on a fresh PostgreSQL database (local server,
Unix socket) when `$TASKWARDEN_TEST_PG` names one; the two runs are one after
the other in one bench run."""


def _summary(backend: str, samples: list[float]) -> str:
    return (
        f"{backend}, {len(samples)} samples: min {fmt(min(samples))} ms, median {fmt(median(samples))} ms, "
        f"p99 {fmt(percentile(samples, 99))} ms, max {fmt(max(samples))} ms."
    )


async def _samples(sizes: Sizes, root: Path, server_db: str | None) -> list[float]:
    profile = {"command": [sys.executable, "-S", "-c", STAMP, "{prompt}"], "prompt": "arg", "events": "text"}
    ws = Workspace(root, workers={"stamp": profile}, default_worker="stamp", server_db=server_db)
    samples: list[float] = []
    async with ws.client() as (client, _):
        for i in range(sizes.wake_samples + 1):
            task = structured(await client.call_tool("spawn-task", {"prompt": str(SLEEP_S), "cwd": str(ws.work)}), "spawn")
            done = structured(
                await client.call_tool("wait-task", {"task_ids": task["task_id"], "timeout_s": 30}), "wait-task"
            )
            arrived = time.time()
            result = done["tasks"][0]
            if done["timed_out"] or result["status"] != "completed":
                raise RuntimeError(f"the stamp worker did not complete: {result}")
            if i == 0:
                continue  # warm-up: first spawn, first log file, caches
            samples.append((arrived - float(result["output"]["final"])) * 1000)
    return samples
