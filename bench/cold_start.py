"""From process start to the answer to ``initialize`` over stdio, and what bounds it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio

from bench.core import Metric, Section, Sizes, fmt, median, progress, rounded
from bench.workspace import Workspace
from worker_server import forwarder

TITLE = "Cold start"
METHOD = """\
`taskwarden serve` over stdio is a forwarder (standard library only) to the
daemon of its database. The bench starts `python -m worker_server serve
--config FILE` (an existing database, the built-in policy) three ways: with
the daemon already running (`cold_start_warm_s`, what a client sees from its
second server start on), with no daemon (`cold_start_s`: the forwarder starts
it), and `serve --in-process` (the single-process server); and in the same
rounds the bare SDK server of `bench/bare_server.py` (one tool), the
reference for `cold_start_ratio` = warm ÷ bare. Each writes one JSON-RPC `initialize` request
(protocol 2025-11-25) to its stdin at once, and stops the clock when the
response line arrives on its stdout; then it closes stdin and the server
exits. No SDK client is involved, so the client's own start-up is not
counted. One unmeasured start first writes Python's bytecode caches, as any
first run on a user's machine does (the bench clears
`PYTHONDONTWRITEBYTECODE` for every process it starts).

In the same rounds, interleaved with the server starts: an empty interpreter
(`python -c pass`, start to exit), and `import mcp, mcp.server.mcpserver` in a
fresh interpreter, timed inside it — the SDK's import alone, the floor under
any server built on it."""

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "taskwarden-bench", "version": "0"},
    },
}
IMPORT_MCP = (
    "import time; t = time.perf_counter(); import mcp, mcp.server.mcpserver; print(time.perf_counter() - t)"
)
IMPORT_OURS = (
    "import time; t = time.perf_counter(); import worker_server.cli, worker_server.server; "
    "print(time.perf_counter() - t)"
)


async def run(sizes: Sizes, scratch: Path) -> Section:
    section = Section("cold_start", TITLE, METHOD)
    ws = Workspace(scratch, policy=None)
    env = ws.env()

    daemons = forwarder.daemon_dir(ws.db)
    bare = [sys.executable, "-m", "bench.bare_server"]

    def one_round() -> tuple[float, ...]:
        _stop_daemon(daemons)
        no_daemon = _initialize(ws, env)  # starts the daemon
        return (
            no_daemon,
            _initialize(ws, env),
            _initialize(ws, env, [*ws.serve_argv(), "--in-process"]),
            _initialize(ws, env, bare),
            _python_pass(env, ws.work),
            _timed_inside(IMPORT_MCP, env, ws.work),
            _timed_inside(IMPORT_OURS, env, ws.work),
        )

    await anyio.to_thread.run_sync(one_round)  # warm-up: bytecode caches, the database file
    rounds = []
    for _ in range(sizes.cold_samples):
        rounds.append(await anyio.to_thread.run_sync(one_round))
    _stop_daemon(daemons)
    start, warm, in_process, bare_s, python, mcp_import, ours_import = (median(c) for c in zip(*rounds))
    ratio = warm / bare_s
    progress(f"cold start: warm {warm:.3f} s, no daemon {start:.3f} s, bare SDK {bare_s:.3f} s (ratio {ratio:.2f})")
    section.metrics = [
        Metric("cold_start_warm_s", rounded(warm), "s", "forwarder start → initialize answered, daemon running"),
        Metric("cold_start_ratio", rounded(ratio), "×", "warm start ÷ a bare SDK server's cold start", 0.1, "lower"),
        Metric("cold_start_s", rounded(start), "s", "no daemon: process start → initialize answered", 0.8, "lower"),
        Metric("cold_start_no_daemon_ratio", rounded(start / bare_s), "×", "no daemon ÷ bare SDK server", 1.2,
               "lower"),  # fmt: skip
        Metric("cold_start_in_process_s", rounded(in_process), "s", "`serve --in-process` → initialize answered"),
        Metric("bare_sdk_start_s", rounded(bare_s), "s", "bare SDK server (one tool) → initialize answered"),
        Metric("mcp_import_s", rounded(mcp_import), "s", "`import mcp, mcp.server.mcpserver` alone (the floor)"),
        Metric("python_start_s", rounded(python), "s", "an empty interpreter, start to exit"),
    ]
    section.details = [
        f"Medians of {sizes.cold_samples} interleaved rounds:",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| forwarder, daemon running → `initialize` answered | {fmt(warm)} |",
        f"| bare SDK server → `initialize` answered | {fmt(bare_s)} |",
        f"| `serve --in-process` → `initialize` answered | {fmt(in_process)} |",
        f"| `python -c pass`, start to exit | {fmt(python)} |",
        f"| `import mcp, mcp.server.mcpserver` (timed inside the process) | {fmt(mcp_import)} |",
        f"| `import worker_server.cli, worker_server.server` (all of the above and ours) | {fmt(ours_import)} |",
        f"| **no daemon: process start → `initialize` answered** | **{fmt(start)}** |",
        "",
        f"So of the {fmt(start)} s without a daemon: about {fmt(python)} s is the interpreter, {fmt(mcp_import)} s importing the "
        f"SDK, {fmt(max(0.0, ours_import - mcp_import))} s importing taskwarden and the rest of its dependencies, "
        f"and {fmt(max(0.0, start - python - ours_import))} s opening the database, building the server and "
        "answering.",
    ]
    return section


def _stop_daemon(directory: Path) -> None:
    answer = forwarder.request(directory, "stop", now=True)
    if answer is None:
        return
    pid = int(answer["pid"])  # type: ignore[arg-type]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def _initialize(ws: Workspace, env: dict[str, str], argv: list[str] | None = None) -> float:
    request = (json.dumps(INITIALIZE) + "\n").encode()
    log = (ws.root / "cold-start.log").open("ab")
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv or ws.serve_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=ws.work, env=env
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(request)
        proc.stdin.flush()
        line = proc.stdout.readline()
        elapsed = time.perf_counter() - start
        answer = json.loads(line)
        if answer.get("id") != 1 or "result" not in answer:
            raise RuntimeError(f"unexpected answer to initialize: {line[:300]!r}")
        proc.stdin.close()
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    return elapsed


def _python_pass(env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, cwd=cwd, check=True)
    return time.perf_counter() - start


def _timed_inside(code: str, env: dict[str, str], cwd: Path) -> float:
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, check=True, capture_output=True, text=True)
    return float(out.stdout.strip())
