"""The server's resident memory: idle, with 10,000 tasks and 50 running, while a worker prints 1 GB."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
from mcp import Client

from bench.core import Metric, Section, Sizes, fmt, median, progress, rounded
from bench.workspace import SHELL, Workspace, structured
from guard.storage import open_database
from worker_server.store import Store
from worker_server.task import TaskStatus

TITLE = "Memory"
MiB = 1 << 20
METHOD = """\
Resident set size (RSS, `psutil`, MiB) of a real `taskwarden serve` process
over stdio, read from the bench process.

* **Idle**: a fresh server after `initialize`, `tools/list` and one call of
  each read tool, left alone for 1 s.
* **10,000 tasks, 50 running**: before the server starts, the store is
  filled through the `Store` API (not through the tools, which would take
  minutes of calls for nothing this measurement needs) with N − 50 finished
  agent tasks, each with a 200-character prompt, a 500-character result and a
  1 KB tail. Then the server starts and 50 `spawn-task` calls start `sleep`
  workers (`max_concurrent = 64`); once all 50 are `working` the client calls
  `list-tasks` (200 per page) through the whole store and `get-task` on a
  sample, and RSS is read.
* **Flood**: on the idle server, one worker prints 1 GiB (`yes` lines of 1000
  bytes through `head -c`); RSS is sampled every 20 ms while it runs. The
  headline is the peak; the reading after the task ends is shown beside it.
  The target is the idle reading + 20 MiB.

For scale, a Python process that only imports the server's modules (no
database, no event loop) is measured too: the floor under any reading."""

# A line of 999 zeros and a newline, forever; head cuts it to size.
FLOOD = "yes \"$(printf '%0999d' 0)\" | head -c {bytes}"


async def run(sizes: Sizes, scratch: Path) -> Section:
    section = Section("memory", TITLE, METHOD)
    workers = {"shell": SHELL, "sleeper": {**SHELL, "max_concurrent": 64}}
    imports = _import_floor()

    ws = Workspace(scratch / "idle", workers=workers)
    async with ws.client() as (client, proc):
        idle = await _idle(client, proc, ws)
        progress(f"memory: idle {idle:.1f} MiB; flooding {sizes.flood_mb} MiB")
        flood_peak, flood_after, flood_s = await _flood(client, proc, ws, sizes.flood_mb)
        progress(f"memory: flood peak {flood_peak:.1f} MiB, after {flood_after:.1f} MiB ({flood_s:.1f} s)")

    big = Workspace(scratch / "big", workers=workers)
    started = time.perf_counter()
    await _populate(big, sizes.rss_tasks - sizes.rss_running)
    populate_s = time.perf_counter() - started
    async with big.client() as (client, proc):
        loaded, pages = await _many(client, proc, big, sizes.rss_running)
    progress(f"memory: {sizes.rss_tasks} tasks, {sizes.rss_running} running: {loaded:.1f} MiB")

    flood_key = "rss_mb_flood"
    section.metrics = [
        Metric("rss_mb_idle", rounded(idle), "MiB", "server RSS, idle", 80, "lower"),
        Metric(
            "rss_mb_10k_tasks",
            rounded(loaded),
            "MiB",
            f"server RSS, {sizes.rss_tasks:,} tasks in the store, {sizes.rss_running} running",
            150,
            "lower",
        ),
        Metric(flood_key, rounded(flood_peak), "MiB", f"server RSS peak while a worker prints {sizes.flood_mb:,} MiB",
               rounded(idle + 20), "lower", note="target: idle + 20 MiB"),
    ]
    section.details = [
        f"- Importing the server's modules alone: {fmt(imports)} MiB.",
        f"- Idle: {fmt(idle)} MiB.",
        f"- Flood of {sizes.flood_mb:,} MiB ({flood_s:.1f} s, {sizes.flood_mb / flood_s:.0f} MiB/s through the "
        f"server): peak {fmt(flood_peak)} MiB, {fmt(flood_after)} MiB after the task ended.",
        f"- {sizes.rss_tasks:,} tasks ({sizes.rss_tasks - sizes.rss_running:,} written through the Store API in "
        f"{populate_s:.1f} s, {sizes.rss_running} spawned and running), after paging through all of them with "
        f"`list-tasks` ({pages} pages): {fmt(loaded)} MiB.",
    ]
    return section


def _rss(proc: psutil.Process) -> float:
    return float(proc.memory_info().rss) / MiB


def _import_floor() -> float:
    code = "import worker_server.server, worker_server.cli, psutil; print(psutil.Process().memory_info().rss)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout) / MiB


async def _idle(client: Client, proc: psutil.Process, ws: Workspace) -> float:
    await client.list_tools()
    task = structured(await client.call_tool("spawn-task", {"prompt": "echo hi", "cwd": str(ws.work)}), "spawn-task")
    structured(await client.call_tool("wait-task", {"task_ids": task["task_id"], "timeout_s": 30}), "wait-task")
    structured(await client.call_tool("get-task", {"task_id": task["task_id"]}), "get-task")
    structured(await client.call_tool("list-tasks", {}), "list-tasks")
    await anyio.sleep(1.0)
    return median([_rss(proc) for _ in range(5)])


async def _flood(client: Client, proc: psutil.Process, ws: Workspace, megabytes: int) -> tuple[float, float, float]:
    prompt = FLOOD.format(bytes=megabytes * MiB)
    task = structured(await client.call_tool("spawn-task", {"prompt": prompt, "cwd": str(ws.work)}), "spawn-task")
    peak = 0.0
    done = anyio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss(proc))
            await anyio.sleep(0.02)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        while True:
            result = structured(
                await client.call_tool("wait-task", {"task_ids": task["task_id"], "timeout_s": 50}), "wait-task"
            )
            if not result["timed_out"]:
                break
        elapsed = time.perf_counter() - started
        done.set()
    status = result["tasks"][0]
    if status["status"] != "completed":
        raise RuntimeError(f"the flood worker did not complete: {status['status']} {status['status_message']}")
    log = ws.db.parent / "logs" / f"{task['task_id']}.log"
    size = log.stat().st_size
    log.unlink()  # a gigabyte of zeros has served its purpose
    if size < megabytes * MiB:
        raise RuntimeError(f"the flood log holds {size} bytes, not {megabytes} MiB")
    await anyio.sleep(0.5)
    after = _rss(proc)
    return max(peak, after), after, elapsed


async def _populate(ws: Workspace, n: int) -> None:
    """N finished agent tasks, written through the Store API before the server starts."""
    db = await open_database(ws.db)
    feed = db.change_feed()  # not started: nobody listens yet
    try:
        store = await Store.open(db, feed)
        prompt = "Refactor the parser so that it " + "handles every edge case " * 7
        final = "Done. " + "Changed the parser and added tests. " * 14
        tail = "\n".join(f"step {i}: ran the tests, all green" for i in range(30))
        for i in range(n):
            row, _ = await store.create_session(
                kind="agent",
                worker="shell",
                title=f"bench task {i}",
                prompt=prompt[:200],
                cwd=str(ws.work),
                labels=["bench"],
                created_by="bench",
                idempotency_key=None,
                timeout_s=600,
                deadline=None,
                owner=None,
            )
            await store.finish(row.id, TaskStatus.COMPLETED, final=final[:500], exit_code=0, tail=tail)
    finally:
        await db.close()


async def _many(client: Client, proc: psutil.Process, ws: Workspace, running: int) -> tuple[float, int]:
    ids = []
    spawn = {"prompt": "sleep 120", "cwd": str(ws.work), "worker": "sleeper"}
    for _ in range(running):
        ids.append(structured(await client.call_tool("spawn-task", spawn), "spawn-task")["task_id"])
    deadline = time.monotonic() + 60
    while True:  # the client polls here; the server never does
        page = structured(await client.call_tool("list-tasks", {"status": "working", "limit": 200}), "list-tasks")
        if len(page["tasks"]) >= running:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(page['tasks'])} of {running} tasks started")
        await anyio.sleep(0.1)
    pages = 0
    cursor = None
    while True:
        args: dict[str, object] = {"limit": 200}
        if cursor:
            args["cursor"] = cursor
        page = structured(await client.call_tool("list-tasks", args), "list-tasks")
        pages += 1
        cursor = page["next_cursor"]
        if pages % 10 == 1:
            structured(await client.call_tool("get-task", {"task_id": page["tasks"][0]["task_id"]}), "get-task")
        if not cursor:
            break
    for task_id in ids[:5]:
        structured(await client.call_tool("get-task", {"task_id": task_id}), "get-task")
    await anyio.sleep(1.0)
    return median([_rss(proc) for _ in range(5)]), pages
