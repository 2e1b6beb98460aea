"""From ``taskwarden approvals approve`` in another process to the held call returning."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import anyio
from mcp import Client

from bench.core import Metric, Section, Sizes, fmt, median, percentile, progress, rounded
from bench.workspace import Workspace, structured
from guard.approvals import Approval, Approvals, ApprovalStatus
from guard.storage.clock import SystemClock
from guard.storage import open_database

TITLE = "Approval latency"
METHOD = """\
A real `taskwarden serve` process over stdio with the built-in policy, under
which `cancel-task` needs a human's approval and a held call waits up to 20 s
for one. The client (no elicitation support, so only a human can decide)
calls `cancel-task` on a finished task, each time with a different `reason`,
so every call is a new approval. The bench watches the database until the
pending approval appears, then runs `taskwarden approvals approve ID` as a
separate process and waits for it to exit. Three instants, all `time.time()`
on one machine: the approve process started; its decision committed (the
`decided_at` the approve process writes inside the transaction that records
the decision, just before its commit); the held call's result arrived at
the client. The headline is measured **from the commit**: the server's
part, the wake-up across processes (a datagram on the change feed) and the
call's completion. From the process start adds the CLI's own start-up
(interpreter, imports, opening the database) and is shown beside it."""


async def run(sizes: Sizes, scratch: Path) -> Section:
    section = Section("approval", TITLE, METHOD)
    ws = Workspace(scratch, policy=None)  # the built-in policy: cancel-task needs approval
    from_commit: list[float] = []
    from_start: list[float] = []
    cli_s: list[float] = []
    async with ws.client() as (client, _):
        db = await open_database(ws.db)
        try:
            approvals = Approvals(db, SystemClock())
            for i in range(sizes.approval_samples + 1):
                # A cancel of finished work changes nothing and is not held: each
                # sample cancels a task that is still running.
                task = structured(
                    await client.call_tool("spawn-task", {"prompt": "sleep 60", "worker": "shell", "cwd": str(ws.work)}),
                    "spawn",
                )
                arrived, started, exited, decided = await _one(client, approvals, ws, task["task_id"], i)
                if i == 0:
                    continue  # warm-up: bytecode caches of the CLI, first approval
                from_commit.append((arrived - decided) * 1000)
                from_start.append((arrived - started) * 1000)
                cli_s.append(exited - started)
        finally:
            await db.close()

    p50 = percentile(from_commit, 50)
    progress(f"approval: p50 {p50:.1f} ms from the commit, {percentile(from_start, 50):.0f} ms from process start")
    section.metrics = [
        Metric("approval_ms_p50", rounded(p50), "ms", "decision committed → held call returns, p50", 300, "lower"),
        Metric(
            "approval_from_start_ms_p50",
            rounded(percentile(from_start, 50)),
            "ms",
            "`approvals approve` process started → held call returns, p50",
            300,
            "lower",
            note="includes the CLI's start-up",
        ),
    ]
    section.details = [
        f"{len(from_commit)} approvals, one at a time.",
        "",
        "| measured from | p50 | max |",
        "|---|---|---|",
        f"| the decision's commit | {fmt(p50)} ms | {fmt(max(from_commit))} ms |",
        f"| the approve process's start | {fmt(percentile(from_start, 50))} ms | {fmt(max(from_start))} ms |",
        "",
        f"The approve process itself runs {fmt(median(cli_s) * 1000)} ms from start to exit (median); the held "
        "call usually returns before it has exited.",
    ]
    return section


async def _one(
    client: Client, approvals: Approvals, ws: Workspace, task_id: str, i: int
) -> tuple[float, float, float, float]:
    reason = f"bench {i}"
    arrived = 0.0

    async def held_call() -> None:
        nonlocal arrived
        result = await client.call_tool("cancel-task", {"task_id": task_id, "reason": reason})
        arrived = time.time()
        outcome = structured(result, "cancel-task")
        if task_id not in outcome["cancelled"] + outcome["already_terminal"]:
            raise RuntimeError(f"unexpected cancel-task result: {outcome}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(held_call)
        pending = await pending_approval(approvals, reason)
        started = time.time()
        proc = await anyio.run_process(
            ws.cli_argv("approvals", "approve", pending.id), env=ws.env(), cwd=ws.work, check=False,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        exited = time.time()
        if proc.returncode != 0:
            raise RuntimeError(f"approvals approve failed: {proc.stderr.decode()}")
    decided = await approvals.get(pending.id)
    assert decided is not None and decided.decided_at is not None
    return arrived, started, exited, decided.decided_at


async def pending_approval(approvals: Approvals, reason: str) -> Approval:
    """The approval the held call opened (the bench polls; the server never does)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for approval in await approvals.list(ApprovalStatus.PENDING):
            if approval.args.get("reason") == reason:
                return approval
        await anyio.sleep(0.01)
    raise RuntimeError("the held call opened no approval")
