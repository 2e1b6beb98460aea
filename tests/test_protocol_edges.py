"""Protocol edges found by clients nobody here wrote, over raw JSON-RPC on stdio, in both protocol eras.

2025-11-25 opens with ``initialize``; 2026-07-28 has no handshake: every
request carries its protocol version, client info and capabilities in
``_meta``, and ``server/discover`` says what the server offers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import Workspace, stdio_client

MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientInfo": {"name": "raw-tests", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


class RawStdio:
    """One taskwarden server on stdio, spoken to line by line."""

    def __init__(self, proc: subprocess.Popen[bytes], era: str) -> None:
        self.proc = proc
        self.era = era
        self.next_id = 0

    def send_line(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the server closed stdout"
        return json.loads(reply)

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        params = dict(params or {})
        if self.era == "2026-07-28":
            params["_meta"] = {**MODERN_META, **params.get("_meta", {})}
        reply = self.send_line(json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}))
        assert reply["id"] == self.next_id, reply
        return reply

    def call_raw(self, tool: str, arguments_json: str) -> dict[str, Any]:
        """tools/call with arguments written as text (NaN and Infinity are not JSON, but parsers take them)."""
        self.next_id += 1
        meta = f', "_meta": {json.dumps(MODERN_META)}' if self.era == "2026-07-28" else ""
        line = (
            f'{{"jsonrpc": "2.0", "id": {self.next_id}, "method": "tools/call", '
            f'"params": {{"name": "{tool}", "arguments": {arguments_json}{meta}}}}}'
        )
        return self.send_line(line)


@contextmanager
def raw_server(ws: Workspace, era: str) -> Iterator[RawStdio]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker_server", "serve", "--config", str(ws.config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ws.work,
        env=ws.server_env(),
    )
    raw = RawStdio(proc, era)
    try:
        if era == "2025-11-25":
            raw.opening = raw.request(
                "initialize",
                {"protocolVersion": era, "capabilities": {}, "clientInfo": {"name": "raw-tests", "version": "1"}},
            )
            assert "result" in raw.opening, raw.opening
            proc.stdin.write(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        else:
            raw.opening = raw.request("server/discover")
            assert "result" in raw.opening, raw.opening
        yield raw
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


ERAS = ["2025-11-25", "2026-07-28"]


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.mark.parametrize("era", ERAS)
def test_an_unknown_prompt_is_invalid_params(ws: Workspace, era: str) -> None:
    with raw_server(ws, era) as raw:
        assert raw.request("prompts/list")["result"]["prompts"] == []
        reply = raw.request("prompts/get", {"name": "no-such-prompt"})
        assert reply["error"]["code"] == -32602, reply
        assert reply["error"]["message"] == "Unknown prompt: no-such-prompt"


def test_discover_and_initialize_advertise_the_same_capabilities(ws: Workspace) -> None:
    with raw_server(ws, "2025-11-25") as old:
        initialized = old.opening["result"]["capabilities"]
    with raw_server(ws, "2026-07-28") as new:
        discovered = new.opening["result"]["capabilities"]
        # The modern era still serves subscriptions/listen (for extensions such as tasks).
        assert "2026-07-28" in new.opening["result"]["supportedVersions"]
    # MCP Tasks is the one capability each era spells its own way: the
    # 2026-07-28 extension, the 2025-11-25 `tasks` capability.
    assert discovered.pop("extensions") == {"io.modelcontextprotocol/tasks": {}}
    assert initialized.pop("tasks")["requests"] == {"tools": {"call": {}}}
    assert discovered == initialized
    # taskwarden sends no list_changed or resources/updated notifications in either era.
    assert initialized["tools"] == {"listChanged": False}
    assert initialized["resources"] == {"listChanged": False, "subscribe": False}


NON_FINITE = [
    ("spawn-task", '{"prompt": "say hi", "timeout_s": NaN}', "timeout_s"),
    ("spawn-task", '{"prompt": "say hi", "timeout_s": Infinity}', "timeout_s"),
    ("wait-task", '{"task_ids": "tsk_x", "timeout_s": NaN}', "timeout_s"),
    ("wait-task", '{"task_ids": "tsk_x", "timeout_s": -Infinity}', "timeout_s"),
    ("get-task", '{"task_id": "tsk_x", "tail_lines": NaN}', "tail_lines"),
    ("list-tasks", '{"limit": 1e400}', "limit"),
    ("cancel-task", '{"task_id": "tsk_x", "reason": "r", "x": [1, {"y": NaN}]}', "x.1.y"),
]


@pytest.mark.parametrize("era", ERAS)
def test_non_finite_numbers_are_invalid_arguments(ws: Workspace, era: str) -> None:
    with raw_server(ws, era) as raw:
        for tool, arguments, field in NON_FINITE:
            result = raw.call_raw(tool, arguments)["result"]
            assert result["isError"] is True, (tool, result)
            assert result["structuredContent"]["error"] == "invalid_arguments"
            assert result["structuredContent"]["field"] == field
            assert result["content"][0]["text"].startswith(f"invalid_arguments: {field}: must be a finite number")
        # Nothing was started.
        listed = raw.request("tools/call", {"name": "list-tasks", "arguments": {}})["result"]
        assert listed["structuredContent"]["tasks"] == []


@pytest.mark.anyio
async def test_tools_publish_what_the_server_enforces(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    for name, tool in tools.items():
        # Descriptions read as written: no docstring indentation after a newline.
        assert tool.description and "\n " not in tool.description, (name, tool.description)
        assert tool.description == tool.description.strip()
        # Unknown argument names are refused, and the schema says so.
        assert tool.input_schema.get("additionalProperties") is False, name
        task_id = tool.input_schema["properties"].get("task_id") or tool.input_schema["properties"].get("task_ids")
        if task_id is not None:
            assert "tsk_" in json.dumps(task_id), (name, task_id)
            assert '"pattern"' in json.dumps(task_id), (name, task_id)
    read_only = {n for n, t in tools.items() if t.annotations and t.annotations.read_only_hint}
    assert read_only == {"wait-task", "list-tasks", "get-task"}  # list-task-messages marks messages read
    destructive = {n for n, t in tools.items() if t.annotations and t.annotations.destructive_hint}
    assert destructive == {"spawn-task", "cancel-task"}


def test_the_built_in_policy_still_allows_list_task_messages(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, policy=None)
    with raw_server(ws, "2025-11-25") as raw:
        result = raw.request("tools/call", {"name": "list-task-messages", "arguments": {"task_id": "tsk_nope"}})
        # Past the guard: the tool itself answers that there is no such task.
        assert result["result"]["structuredContent"]["error"] == "invalid_arguments", result
        assert result["result"]["structuredContent"]["rule"] is None
        assert "no task 'tsk_nope'" in result["result"]["content"][0]["text"]
