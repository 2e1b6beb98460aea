"""The server's own CPU per turn with the real agent CLIs as workers, beside the shell worker's."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.core import Metric, Section, Sizes, fmt, progress, rounded
from bench.spawn import _cpu
from bench.workspace import SHELL, Workspace, structured
from fixtures.fake_model import FakeModel
from tests.npm_tools import BIN
from tests.real_cli import cli_env

TITLE = "Agent CLI turns"
METHOD = """\
The built-in `codex` and `claude` profiles run the real CLIs (`@openai/codex`
0.171.0, `@anthropic-ai/claude-code` 2.1.332, from `tests/js`) against the
tests' fake model server (`fixtures/fake_model.py`, in the bench process),
which answers every request at once with a short text reply: one model
request per turn. The `shell` profile runs `echo done`. Each worker gets the
same number of turns, one at a time (spawn-task, then wait-task), in a git
work tree (so every turn also takes the before/after snapshots for
`changes`).

Measured: CPU seconds (user + system) of the taskwarden server process
only — not the CLIs, not the model — divided by the number of turns; and the
wall time per turn, which is the CLI's own start-up and run. What an agent
CLI turn costs taskwarden is reading its JSON event stream, the store
writes, the git snapshots and the MCP calls."""

WORKERS = ("shell", "codex", "claude")


async def run(sizes: Sizes, scratch: Path) -> Section:
    section = Section("agent_cli", TITLE, METHOD)
    turns = 3 if sizes.quick else 20
    missing = [name for name in ("codex", "claude") if not (BIN / name).exists()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not installed: npm ci --prefix tests/js")
    with FakeModel() as model:
        mark = model.script("bench", [{"reply": "done"}])
        ws = Workspace(scratch, workers={"shell": SHELL})
        env = cli_env(scratch, model)
        _git_init(ws.work)
        ws_env = ws.env
        ws.env = lambda: {**ws_env(), **env}  # type: ignore[method-assign]
        cpu: dict[str, float] = {}
        wall: dict[str, float] = {}
        async with ws.client() as (client, server):
            for worker in WORKERS:  # one warm-up turn each (first start-up, caches)
                await _turn(client, ws, worker, mark)
            for worker in WORKERS:
                before, started = _cpu(server), time.perf_counter()
                for _ in range(turns):
                    await _turn(client, ws, worker, mark)
                wall[worker] = (time.perf_counter() - started) / turns * 1000
                cpu[worker] = (_cpu(server) - before) / turns * 1000
                progress(f"agent_cli: {worker} {cpu[worker]:.1f} ms server CPU per turn, {wall[worker]:.0f} ms a turn")
    section.metrics = [
        Metric(f"turn_server_cpu_ms_{w}", rounded(cpu[w]), "ms", f"server CPU per `{w}` turn") for w in WORKERS
    ] + [Metric(f"turn_wall_ms_{w}", rounded(wall[w]), "ms", f"wall time per `{w}` turn") for w in WORKERS]
    section.details = [
        f"{turns} turns per worker, one at a time, after one warm-up turn each.",
        "",
        "| worker | server CPU per turn | wall time per turn |",
        "|---|---|---|",
        *(f"| `{w}` | {fmt(cpu[w])} ms | {fmt(wall[w])} ms |" for w in WORKERS),
    ]
    return section


def _git_init(path: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    (path / "README").write_text("bench\n")
    subprocess.run(["git", "add", "."], cwd=path, check=True)
    subprocess.run(
        ["git", "-c", "user.name=b", "-c", "user.email=b@example.com", "commit", "-qm", "start"], cwd=path, check=True
    )


async def _turn(client: object, ws: Workspace, worker: str, mark: str) -> None:
    prompt = "echo done" if worker == "shell" else f"{mark} say done"
    spawned = structured(
        await client.call_tool("spawn-task", {"prompt": prompt, "worker": worker, "cwd": str(ws.work)}),  # type: ignore[attr-defined]
        "spawn-task",
    )
    while True:
        result = structured(
            await client.call_tool("wait-task", {"task_ids": spawned["task_id"], "timeout_s": 50}),  # type: ignore[attr-defined]
            "wait-task",
        )
        if not result["timed_out"]:
            task = result["tasks"][0]
            if task["status"] != "completed":
                raise RuntimeError(f"{worker} turn ended {task['status']}: {task['status_message']}")
            return
