"""Task throughput through the tools, against spawning the same command straight from Python."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from bench.core import Metric, Section, Sizes, fmt, median, progress, rounded
from bench.workspace import SHELL, Workspace, structured

TITLE = "Spawn throughput"
METHOD = """\
The worker is the built-in `shell` profile (`/bin/sh -c PROMPT`) with
`max_concurrent = 8`, and the prompt `echo done`: a command that costs almost
nothing, so the comparison measures taskwarden's own work per task (the
Python fake agent's interpreter start-up, ~20 ms, would dominate both sides
alike and hide it).

*Through the server*: one stdio client spawns N tasks (at most 8 `spawn-task`
calls in flight, like a few agents fanning out), then waits for all of them
with `wait-task` (`mode: all`, 50 ids per call, the calls in parallel). The
clock runs from the first `spawn-task` to the last `wait-task` result, so the
rate includes the guard (an allow-all policy: nothing limited, every call
still decided and audited), the store, the scheduler, the runner and both
ends of stdio.

*Direct*: the same argv started with `anyio.open_process` exactly as the
runner starts it (own session, stdout and stderr piped and read to the end,
stdin closed), 8 at a time, from the bench process. That is the most this
machine can do from Python, the limit for the server.

Rounds alternate direct / server; the ratio is (median server rate) ÷
(median direct rate)."""

PROMPT = "echo done"
CONCURRENCY = 8
# The python-worker comparison (full runs only).
PYTHON_ROUNDS = 3
PYTHON_TASKS = 64


async def run(sizes: Sizes, scratch: Path) -> Section:
    section = Section("spawn", TITLE, METHOD)
    python_worker = [sys.executable, "-c", "pass"]
    ws = Workspace(
        scratch,
        workers={
            "shell": {**SHELL, "max_concurrent": CONCURRENCY},
            "python": {"command": python_worker, "events": "text", "max_concurrent": CONCURRENCY},
        },
    )
    argv = ["/bin/sh", "-c", PROMPT]
    direct: list[float] = []
    served: list[float] = []
    # CPU seconds spent per task: the server process, and this process (the
    # client, or the direct spawner), over all rounds.
    cpu = {"server": 0.0, "client": 0.0, "direct": 0.0}
    me = psutil.Process()
    async with ws.client() as (client, server):
        await _through_server(client, ws, 16)  # warm-up of both paths
        await _direct(argv, 16, ws.work)
        for _ in range(sizes.spawn_rounds):
            before = _cpu(me)
            direct.append(await _direct(argv, sizes.spawn_tasks, ws.work))
            cpu["direct"] += _cpu(me) - before
            before, before_server = _cpu(me), _cpu(server)
            served.append(await _through_server(client, ws, sizes.spawn_tasks))
            cpu["client"] += _cpu(me) - before
            cpu["server"] += _cpu(server) - before_server
            progress(f"spawn: direct {direct[-1]:.0f}/s, server {served[-1]:.0f}/s")
        per_task = {k: v / (sizes.spawn_rounds * sizes.spawn_tasks) * 1000 for k, v in cpu.items()}

        # What bounds the rate: the calls alone, without worker processes.
        calls = max(100, sizes.spawn_tasks)
        before_server = _cpu(server)
        human = await _calls(client, "spawn-task", {"prompt": "x", "worker": "human"}, calls)
        human_cpu = (_cpu(server) - before_server) / calls * 1000
        some_id = structured(await client.call_tool("list-tasks", {"limit": 1}), "list-tasks")["tasks"][0]["task_id"]
        before_server = _cpu(server)
        get = await _calls(client, "get-task", {"task_id": some_id}, calls)
        get_cpu = (_cpu(server) - before_server) / calls * 1000
        python = None
        if not sizes.quick:
            # The same comparison with a worker that costs an interpreter start-up.
            py_direct, py_served = [], []
            for _ in range(PYTHON_ROUNDS):
                py_direct.append(await _direct(python_worker, PYTHON_TASKS, ws.work))
                py_served.append(await _through_server(client, ws, PYTHON_TASKS, worker="python", prompt="x"))
            python = median(py_served) / median(py_direct)
    bare, bare_cpu = await _bare_sdk(scratch, calls)

    ratio = median(served) / median(direct)
    section.metrics = [
        Metric("spawn_ratio", rounded(ratio), "×", "tasks/s through the server ÷ direct", 0.7, "higher"),
        Metric(
            "server_cpu_ms_per_task", rounded(per_task["server"]), "ms",
            "daemon CPU time per completed `shell` task (user + system, its threads included)", 2.0, "lower",
        ),  # fmt: skip
        Metric("spawn_tasks_per_s", rounded(median(served)), "tasks/s", "through spawn-task → wait-task"),
        Metric("spawn_direct_per_s", rounded(median(direct)), "tasks/s", "spawned and reaped directly"),
    ]
    if python is not None:
        section.metrics.append(
            Metric("spawn_ratio_python_worker", rounded(python), "×", "the same ratio with `python -c pass` as the worker")
        )
    section.details = [
        f"{sizes.spawn_rounds} round(s) of {sizes.spawn_tasks} tasks per side.",
        "",
        "| round | direct tasks/s | server tasks/s |",
        "|---|---|---|",
        *(f"| {i + 1} | {fmt(d)} | {fmt(s)} |" for i, (d, s) in enumerate(zip(direct, served))),
        "",
        f"What bounds it, measured in the same run ({calls} calls each, {CONCURRENCY} in flight, stdio):",
        "",
        "| calls | calls/s | server CPU per call |",
        "|---|---|---|",
        f"| a bare SDK server (`bench/bare_server.py`), a no-op tool with input and output schema | {fmt(bare)} "
        f"| {fmt(bare_cpu)} ms |",
        f"| taskwarden `get-task` (guard, audit, two reads) | {fmt(get)} | {fmt(get_cpu)} ms |",
        f"| taskwarden `spawn-task` to a human worker (guard, audit, the insert; no process) | {fmt(human)} "
        f"| {fmt(human_cpu)} ms |",
        "",
        f"CPU time per task (user + system, the workers themselves not included): the server process "
        f"{fmt(per_task['server'])} ms, the client {fmt(per_task['client'])} ms; spawning directly "
        f"{fmt(per_task['direct'])} ms. On {os.cpu_count()} cores shared by the client, the server, the "
        "database thread and the workers, that CPU is what bounds the rate.",
    ]
    if python is not None:
        section.details.append(
            f"\nWith `python -c pass` as the worker ({PYTHON_ROUNDS} interleaved rounds of {PYTHON_TASKS} tasks; an "
            f"interpreter start-up is still far cheaper than any agent CLI's) the ratio is {fmt(python)}."
        )
    return section


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def _calls(client: Client, tool: str, args: dict[str, object], n: int) -> float:
    """Calls/s of one tool with CONCURRENCY calls in flight."""
    limiter = anyio.Semaphore(CONCURRENCY)

    async def one() -> None:
        async with limiter:
            structured(await client.call_tool(tool, args), tool)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return n / (time.perf_counter() - start)


async def _bare_sdk(scratch: Path, n: int) -> tuple[float, float]:
    """Calls/s of the bare SDK server, and its CPU ms per call."""
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "bench.bare_server"], cwd=str(Path(__file__).resolve().parent.parent)
    )
    with (scratch / "bare.log").open("a") as log:
        async with Client(stdio_client(params, errlog=log)) as client:
            server = next(p for p in psutil.Process().children() if "bench.bare_server" in p.cmdline())
            await _calls(client, "echo", {"text": "x"}, 20)
            before = _cpu(server)
            rate = await _calls(client, "echo", {"text": "x"}, n)
            return rate, (_cpu(server) - before) / n * 1000


async def _direct(argv: list[str], n: int, cwd: Path) -> float:
    limiter = anyio.Semaphore(CONCURRENCY)

    async def one() -> None:
        async with limiter:
            proc = await anyio.open_process(
                argv,
                cwd=cwd,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            async with proc:
                assert proc.stdout is not None and proc.stderr is not None
                async for _ in proc.stdout:
                    pass
                async for _ in proc.stderr:
                    pass
                await proc.wait()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return n / (time.perf_counter() - start)


async def _through_server(
    client: Client, ws: Workspace, n: int, *, worker: str = "shell", prompt: str = PROMPT
) -> float:
    ids: list[str] = []
    limiter = anyio.Semaphore(CONCURRENCY)
    args = {"prompt": prompt, "cwd": str(ws.work), "worker": worker}

    async def spawn() -> None:
        async with limiter:
            result = await client.call_tool("spawn-task", args)
            ids.append(structured(result, "spawn-task")["task_id"])

    async def wait_all(chunk: list[str]) -> None:
        while True:
            result = await client.call_tool("wait-task", {"task_ids": chunk, "mode": "all", "timeout_s": 50})
            done = structured(result, "wait-task")
            if not done["timed_out"]:
                bad = [t for t in done["tasks"] if t["status"] != "completed"]
                if bad:
                    raise RuntimeError(f"{len(bad)} task(s) did not complete: {bad[0]}")
                return

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(spawn)
    async with anyio.create_task_group() as tg:
        for i in range(0, n, 50):
            tg.start_soon(wait_all, ids[i : i + 50])
    return n / (time.perf_counter() - start)
