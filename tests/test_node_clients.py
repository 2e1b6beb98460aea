"""Independent, strict MCP clients read taskwarden's refusals: the TypeScript SDK v1 and the Inspector CLI.

Both validate a tool result's structured content against the tool's output
schema, errors included (the TypeScript SDK v1 throws, the Inspector CLI
prints the validation error instead of the result). Before the output
schemas admitted the refusal shape, every refused call failed in both.
Pinned in tests/js/package.json: @modelcontextprotocol/sdk 1.32.2 and
@modelcontextprotocol/inspector 2.12.0, run on Node 22.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.npm_tools import JS, node22, npm_bin
from tests.support import FIXTURES, Workspace, http_server

pytestmark = pytest.mark.anyio

# The built-in policy, except that a held call waits 1 s (not 20) for a human.
HELD_FAST = FIXTURES / "policies" / "approvals-fast.yaml"
REFUSED_SPAWN = {"name": "spawn-task", "arguments": {"prompt": "say hi", "timeout_s": 100000}}
HELD_CANCEL = {"name": "cancel-task", "arguments": {"task_id": "tsk_aaaaaaaaaaaa"}}


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path, policy=HELD_FAST)


@asynccontextmanager
async def server_target(ws: Workspace, transport: str) -> AsyncIterator[list[str] | str]:
    """The stdio command line, or the streamable HTTP URL, of a taskwarden server."""
    if transport == "stdio":
        yield [sys.executable, "-m", "worker_server", "serve", "--config", str(ws.config)]
    else:
        async with http_server(ws, "--allow-anonymous") as base:
            yield f"{base}/mcp"


async def run(argv: list[str], ws: Workspace) -> subprocess.CompletedProcess[str]:
    proc = await anyio.run_process(argv, cwd=ws.work, env=ws.server_env(), check=False)
    return subprocess.CompletedProcess(argv, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def audited(ws: Workspace) -> set[tuple[str, str]]:
    with closing(sqlite3.connect(ws.db)) as db:
        return set(db.execute("SELECT tool, decision FROM guard_audit"))


async def ts_sdk_calls(ws: Workspace, target: list[str] | str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    where = ["--stdio", *target] if isinstance(target, list) else ["--http", target]
    proc = await run([str(node22()), str(JS / "ts_sdk_client.mjs"), json.dumps(calls), *where], ws)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


async def inspector_call(ws: Workspace, target: list[str] | str, call: dict[str, Any]) -> dict[str, Any]:
    args = [f"{k}={v}" for k, v in call["arguments"].items()]
    if isinstance(target, list):
        # The Inspector owns --config, and hands a stdio server only the
        # variables it is given with -e: the config path goes there.
        where = ["-e", f"TASKWARDEN_CONFIG={ws.config}", *target[: target.index("--config")]]
    else:
        where = [target, "--transport", "http"]
    argv = [
        str(node22()), str(npm_bin("mcp-inspector")), "--cli", *where,
        "--method", "tools/call", "--tool-name", call["name"], "--tool-arg", *args,
    ]  # fmt: skip
    proc = await run(argv, ws)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"the Inspector printed no result (exit {proc.returncode}):\n{proc.stdout}{proc.stderr[-2000:]}")


def assert_refused_spawn_shown(text: str, structured: dict[str, Any]) -> None:
    assert text.startswith("invalid_arguments: timeout_s: must be <= 86400 (got 100000)"), text
    assert structured["error"] == "invalid_arguments" and structured["field"] == "timeout_s"


def assert_held_cancel_shown(text: str, structured: dict[str, Any]) -> None:
    approval = structured["approval"]
    assert structured["error"] == "approval_required" and approval["status"] == "pending"
    assert approval["id"].startswith("apr_")
    assert text.startswith("approval_required: cancel-task needs a human's approval"), text
    assert f"taskwarden approvals approve {approval['id']}" in text.splitlines()[0]
    assert f"taskwarden approvals approve {approval['id']}" in approval["how_to_approve"]


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_typescript_sdk_v1_client_shows_refusals(ws: Workspace, transport: str) -> None:
    async with server_target(ws, transport) as target:
        spawn, cancel, listed = await ts_sdk_calls(
            ws, target, [REFUSED_SPAWN, HELD_CANCEL, {"name": "list-tasks", "arguments": {}}]
        )
    assert spawn["ok"], spawn["error"]  # before the fix: "Structured content does not match the tool's output schema"
    assert spawn["isError"]
    assert_refused_spawn_shown(spawn["text"], spawn["structuredContent"])
    assert cancel["ok"], cancel["error"]
    assert cancel["isError"]
    assert_held_cancel_shown(cancel["text"], cancel["structuredContent"])
    # A success still validates, and nothing was spawned.
    assert listed["ok"] and not listed["isError"] and listed["structuredContent"]["tasks"] == []


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_inspector_cli_shows_refusals(ws: Workspace, transport: str) -> None:
    results: dict[str, dict[str, Any]] = {}

    async def one(call: dict[str, Any]) -> None:
        results[call["name"]] = await inspector_call(ws, target, call)

    async with server_target(ws, transport) as target, anyio.create_task_group() as tg:
        # One call per Inspector run (and, over stdio, per server): run both at once.
        tg.start_soon(one, REFUSED_SPAWN)
        tg.start_soon(one, HELD_CANCEL)
    spawn, cancel = results["spawn-task"], results["cancel-task"]
    # The server the Inspector started is this workspace's (not a default database).
    assert audited(ws) >= {("spawn-task", "invalid_arguments"), ("cancel-task", "approval_required")}
    # Before the fix the Inspector printed {"error": {"message": "data must have required property 'task_id', ..."}}.
    assert "content" in spawn, spawn
    assert spawn["isError"] is True
    assert_refused_spawn_shown(spawn["content"][0]["text"], spawn["structuredContent"])
    assert "content" in cancel, cancel
    assert cancel["isError"] is True
    assert_held_cancel_shown(cancel["content"][0]["text"], cancel["structuredContent"])


async def test_inspector_finds_the_tool_schemas_portable(ws: Workspace) -> None:
    """``--strict`` lints every input and output schema and exits 6 on an error-severity problem."""
    target = ["-e", f"TASKWARDEN_CONFIG={ws.config}", sys.executable, "-m", "worker_server", "serve"]
    argv = [str(node22()), str(npm_bin("mcp-inspector")), "--cli", *target, "--method", "tools/list", "--strict"]
    proc = await run(argv, ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tools = json.loads(proc.stdout)["tools"]
    assert len(tools) == 9
    assert all(t["outputSchema"]["type"] == "object" and "anyOf" in t["outputSchema"] for t in tools)
