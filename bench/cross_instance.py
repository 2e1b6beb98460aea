"""Two daemons on one PostgreSQL database: a change committed by one, seen by a call waiting on the other."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
from mcp import Client

from bench import postgres
from bench.approval import pending_approval
from bench.core import Metric, Section, Sizes, fmt, percentile, progress, rounded
from bench.wake import SLEEP_S, STAMP
from bench.workspace import SHELL, Workspace, structured
from guard.approvals import Approvals
from guard.storage import open_database
from guard.storage.clock import SystemClock

TITLE = "Cross-instance latency (two daemons, PostgreSQL)"
METHOD = """\
Two daemons, A and B, each a real `taskwarden serve --http` with its own
`state_dir` (as on two hosts), share one fresh PostgreSQL database
(`$TASKWARDEN_TEST_PG` names the server; the bench makes and drops its own
database there). The bench holds an MCP client to each over HTTP.
**Wake:** the task is spawned through A and runs there (the stamp worker of
the wake-up measurement: it sleeps 0.25 s, then writes `time.time()` and
exits); `wait-task` on it is blocked on B. The interval runs from the
worker's timestamp to the result's arrival at B's client: A reaps the
worker and commits the end, its NOTIFY reaches B's listener, B's waiting
call reads the task and answers. **Approval:** `cancel-task` of a running
task is held on B (its policy asks a human; nothing is rate-limited); the bench decides it
in A's inbox (an approver signed in there presses Approve, a plain HTTP
form post). The interval runs from the decision's commit (`decided_at`,
written inside the deciding transaction) to the held call's result at B's
client. Samples run one at a time, after one warm-up each. Skipped when
`$TASKWARDEN_TEST_PG` is unset (an error under `CI=true`)."""

ENV = postgres.ENV
# Everything allowed and unlimited, except that cancel-task waits (up to 20 s) for a human's approval.
POLICY = """\
version: "1"
default: allow
tools:
  cancel-task:
    rules:
      - action: require_approval
        reason: "Cancelling work needs a human's approval"
        approval: {expires_s: 900, wait_s: 20}
"""


async def run(sizes: Sizes, scratch: Path) -> Section:
    section = Section("cross_instance", TITLE, METHOD)
    if not postgres.available():
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"${ENV} is not set; under CI=true PostgreSQL is required")
        progress(f"cross_instance: skipped (${ENV} names no PostgreSQL server)")
        section.metrics = [
            Metric("cross_instance_wake_ms_p50", None, "ms", "skipped: no PostgreSQL", 100, "lower"),
            Metric("cross_instance_approval_ms_p50", None, "ms", "skipped: no PostgreSQL", 300, "lower"),
        ]
        section.details = [f"Skipped: `${ENV}` names no PostgreSQL server."]
        return section
    # POLICY limits nothing, so the samples are not bounded by a spawn rate limit
    # (under the built-in policy the 31st spawn in a minute was refused).
    samples = max(3, sizes.wake_samples // 2)
    with postgres.fresh_database() as url:
        stamp = {"command": [sys.executable, "-S", "-c", STAMP, "{prompt}"], "prompt": "arg", "events": "text"}
        workers = {"shell": SHELL, "stamp": stamp}
        a, b = (
            Workspace(scratch / name, policy=POLICY, workers=workers, default_worker="shell", server_db=url)
            for name in ("a", "b")
        )
        async with AsyncExitStack() as stack:
            base_a = await stack.enter_async_context(http_daemon(a))
            base_b = await stack.enter_async_context(http_daemon(b))
            on_a = await stack.enter_async_context(Client(f"{base_a}/mcp"))
            on_b = await stack.enter_async_context(Client(f"{base_b}/mcp"))
            wake = await _wake(on_a, on_b, a, samples)
            approval = await _approval(on_b, a, b, base_a, url, samples)

    wake_p50, approval_p50 = percentile(wake, 50), percentile(approval, 50)
    progress(f"cross_instance: wake p50 {wake_p50:.1f} ms, approval p50 {approval_p50:.1f} ms")
    section.metrics = [
        Metric("cross_instance_wake_ms_p50", rounded(wake_p50), "ms",
               "worker exit on daemon A → wait-task result on daemon B, p50", 100, "lower"),
        Metric("cross_instance_approval_ms_p50", rounded(approval_p50), "ms",
               "decision committed in A's inbox → call held on B returns, p50", 300, "lower"),
    ]  # fmt: skip
    section.details = [
        "| measured | samples | p50 | max |",
        "|---|---|---|---|",
        f"| wake: worker exit on A → result on B | {len(wake)} | {fmt(wake_p50)} ms | {fmt(max(wake))} ms |",
        (
            f"| approval: commit in A → held call on B | {len(approval)} | {fmt(approval_p50)} ms "
            f"| {fmt(max(approval))} ms |"
        ),
    ]
    return section


async def _wake(on_a: Client, on_b: Client, a: Workspace, samples: int) -> list[float]:
    out: list[float] = []
    for i in range(samples + 1):
        spawn = {"prompt": str(SLEEP_S), "worker": "stamp", "cwd": str(a.work)}
        task = structured(await on_a.call_tool("spawn-task", spawn), "spawn-task")
        done = structured(await on_b.call_tool("wait-task", {"task_ids": task["task_id"], "timeout_s": 30}), "wait-task")
        arrived = time.time()
        result = done["tasks"][0]
        if done["timed_out"] or result["status"] != "completed":
            raise RuntimeError(f"the stamp worker did not complete: {result}")
        if i:
            out.append((arrived - float(result["output"]["final"])) * 1000)
    return out


async def _approval(on_b: Client, a: Workspace, b: Workspace, base_a: str, url: str, samples: int) -> list[float]:
    out: list[float] = []
    db = await open_database(url)
    try:
        approvals = Approvals(db, SystemClock())
        async with inbox_approver(a, base_a) as approve:
            for i in range(samples + 1):
                # A cancel of finished work is not held: each sample cancels a running task.
                spawn = {"prompt": "sleep 60", "worker": "shell", "cwd": str(b.work)}
                task = structured(await on_b.call_tool("spawn-task", spawn), "spawn-task")
                reason = f"bench {i}"
                arrived: list[float] = []

                async def held_call(args: dict[str, str], arrived: list[float] = arrived) -> None:
                    result = await on_b.call_tool("cancel-task", args)
                    arrived.append(time.time())
                    structured(result, "cancel-task")

                async with anyio.create_task_group() as tg:
                    tg.start_soon(held_call, {"task_id": task["task_id"], "reason": reason})
                    pending = await pending_approval(approvals, reason)
                    await approve(pending.id)
                decided = await approvals.get(pending.id)
                assert decided is not None and decided.decided_at is not None
                if i:
                    out.append((arrived[0] - decided.decided_at) * 1000)
    finally:
        await db.close()
    return out


@asynccontextmanager
async def inbox_approver(ws: Workspace, base: str) -> AsyncIterator[Any]:
    """An approver signed in to ``base``'s inbox; yields ``approve(approval_id)``."""
    added = subprocess.run(
        ws.cli_argv("humans", "add", "ann", "--role", "approver", "--url", f"{base}/inbox"),
        env=ws.env(), cwd=ws.work, capture_output=True, text=True, check=True,
    )  # fmt: skip
    link = re.findall(r"https?://\S+/inbox/signin/\S+", added.stdout)[0]
    async with httpx.AsyncClient(base_url=base, follow_redirects=False, timeout=30) as http:
        await http.get(link)
        signed = await http.post(link)
        if signed.status_code != 303:
            raise RuntimeError(f"signing in to the inbox failed: {signed.status_code}")
        page = (await http.get("/inbox/")).text
        csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
        if csrf is None:
            raise RuntimeError("the inbox page has no CSRF field")

        async def approve(approval_id: str) -> None:
            done = await http.post(f"/inbox/approvals/{approval_id}/approve", data={"csrf": csrf.group(1)})
            if done.status_code != 303:
                raise RuntimeError(f"approving {approval_id} in the inbox failed: {done.status_code} {done.text[:200]}")

        yield approve


@asynccontextmanager
async def http_daemon(ws: Workspace) -> AsyncIterator[str]:
    """``taskwarden serve --http`` (anonymous, loopback) for ``ws``; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (ws.root / "server.log").open("a")
    proc = subprocess.Popen(
        [*ws.serve_argv(), "--http", f"127.0.0.1:{port}", "--allow-anonymous"],
        env=ws.env(), cwd=ws.work, stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode}; see {ws.root / 'server.log'}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not listen within 60 s") from None
                await anyio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
