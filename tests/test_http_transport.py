"""The same task flow over streamable HTTP, and the bearer-token identities."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import httpx2
import pytest
from mcp.client.streamable_http import streamable_http_client

from tests.support import StrictClient, Workspace, call, http_server, spawn_and_wait

pytestmark = pytest.mark.anyio


async def test_spawn_wait_message_over_http(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    async with http_server(ws, "--allow-anonymous", "--no-inbox") as base:
        async with StrictClient(f"{base}/mcp") as client:
            task = await spawn_and_wait(client, "say over http")
            assert task["status"] == "completed"
            assert task["output"]["final"] == "over http"
            nxt = await call(client, "message-task", {"task_id": task["task_id"], "message": "history"})
            done = (await call(client, "wait-task", {"task_ids": nxt["task_id"]}))["tasks"][0]
            assert done["output"]["final"] == "turn 1 prompt: say over http"
        async with StrictClient(f"{base}/mcp", mode="legacy") as client:
            task = await spawn_and_wait(client, "say legacy http")
            assert task["output"]["final"] == "legacy http"


async def test_http_requires_a_known_bearer_token(tmp_path: Path) -> None:
    token = "tw-test-token-for-alice"
    digest = hashlib.sha256(token.encode()).hexdigest()
    ws = Workspace(tmp_path, extra=f'\n[identities.alice]\ntoken_sha256 = "{digest}"\n')
    async with http_server(ws, "--no-inbox") as base:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        async with httpx.AsyncClient() as http:
            anon = await http.post(f"{base}/mcp", json=body, headers={"Accept": "application/json, text/event-stream"})
            assert anon.status_code == 401
            wrong = await http.post(
                f"{base}/mcp", json=body,
                headers={"Accept": "application/json, text/event-stream", "Authorization": "Bearer nope"},
            )
            assert wrong.status_code == 401

        headers = {"Authorization": f"Bearer {token}"}
        # The SDK's transport takes an httpx2 client (its fork of httpx).
        async with httpx2.AsyncClient(headers=headers) as http:
            async with StrictClient(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
                task = await spawn_and_wait(client, "say hello alice")
                assert task["output"]["final"] == "hello alice"
    audit = ws.cli("audit", "--json", "--tool", "spawn-task")
    identities = {json.loads(line)["identity"] for line in audit.stdout.splitlines() if line.strip()}
    assert identities == {"alice"}


def test_anonymous_http_is_refused_off_loopback(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    proc = ws.cli("serve", "--http", "0.0.0.0:1", "--allow-anonymous", check=False)
    assert proc.returncode == 2
    assert "--allow-anonymous is only allowed on a loopback address" in proc.stderr


def test_http_without_identities_or_anonymous_is_refused(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    proc = ws.cli("serve", "--http", "127.0.0.1:1", check=False)
    assert proc.returncode == 2
    assert "[identities.NAME]" in proc.stderr


async def test_any_loopback_address_refuses_a_foreign_host_header(tmp_path: Path) -> None:
    # DNS rebinding: a web page on evil.example whose name resolves to the
    # loopback address must not reach an anonymous MCP endpoint.
    ws = Workspace(tmp_path)
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    accept = {"Accept": "application/json, text/event-stream"}
    async with http_server(ws, "--allow-anonymous", "--no-inbox", host="127.0.0.2") as base:
        async with httpx.AsyncClient() as http:
            evil = await http.post(f"{base}/mcp", json=body, headers={**accept, "Host": "evil.example"})
            assert evil.status_code == 421
        async with StrictClient(f"{base}/mcp") as client:
            assert (await call(client, "list-tasks", {}))["tasks"] == []
