"""Sessions belong to the identity that created them; resources pass the guard; logs come in pages.

Real servers over streamable HTTP, each identity a bearer token.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.support import Workspace, call, call_error, http_server, server_process

pytestmark = pytest.mark.anyio

TOKENS = {name: f"tw-test-token-{name}" for name in ("alice", "bob", "carol")}
IDENTITIES = "".join(
    f'\n[identities.{name}]\ntoken_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
    for name, token in TOKENS.items()
)

POLICY = """\
default: allow
SHARE
tools:
  get-task:
    rules:
      - action: deny
        identities: [carol]
        reason: "carol may not read tasks"
      - action: allow
"""


def workspace(tmp_path: Path, share: str = "") -> Workspace:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace("SHARE", share))
    return Workspace(tmp_path, policy=policy, extra=IDENTITIES)


@asynccontextmanager
async def as_identity(base: str, name: str, mode: str = "auto") -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKENS[name]}"}, timeout=60) as http:
        async with Client(streamable_http_client(f"{base}/mcp", http_client=http), mode=mode) as client:
            yield client


async def alices_work(alice: Client, ws: Workspace) -> tuple[dict, dict]:
    agent = await call(alice, "spawn-task", {"prompt": "say secret plans", "cwd": str(ws.work)})
    done = (await call(alice, "wait-task", {"task_ids": agent["task_id"], "timeout_s": 30}))["tasks"][0]
    assert done["status"] == "completed" and done["owner"] == "alice"
    human = await call(alice, "spawn-task", {"prompt": "review the plans", "worker": "human"})
    await call(alice, "send-task-message", {"task_id": human["task_id"], "body": "the thread is private"})
    return done, human


async def test_another_identity_finds_nothing_by_tool_or_resource_and_is_audited(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    async with http_server(ws, "--no-inbox") as base:
        async with as_identity(base, "alice") as alice:
            agent, human = await alices_work(alice, ws)
            # Alice sees her own, by tool and by resource.
            assert (await call(alice, "get-task", {"task_id": human["task_id"]}))["owner"] == "alice"
            assert "secret plans" in (await alice.read_resource(f"task://{agent['task_id']}/log")).contents[0].text

        async with as_identity(base, "bob") as bob:
            nobody = "tsk_doesnotexist"

            async def not_found(tool: str, args: dict) -> None:
                mine = (await call_error(bob, tool, args)).structured_content
                made_up = (await call_error(bob, tool, {**args, "task_id": nobody})).structured_content
                assert json.dumps(mine).replace(args["task_id"], nobody) == json.dumps(made_up), tool
                assert mine["error"] == "invalid_arguments" and mine["field"] == "task_id"

            for task in (agent, human):
                tid = task["task_id"]
                await not_found("get-task", {"task_id": tid})
                await not_found("message-task", {"task_id": tid, "message": "hi"})
                await not_found("send-task-message", {"task_id": tid, "body": "hi"})
                await not_found("list-task-messages", {"task_id": tid})
                await not_found("review-task", {"task_id": tid, "decision": "accept"})
                waited = (await call_error(bob, "wait-task", {"task_ids": [tid], "timeout_s": 0})).structured_content
                assert waited["reason"] == f"task_ids: no task {tid!r}"
                assert (await call(bob, "cancel-task", {"task_id": tid}))["not_found"] == [tid]
                for uri in (f"task://{tid}", f"task://{tid}/log", f"task://{tid}/log?offset=0&limit=10"):
                    with pytest.raises(MCPError) as refused:
                        await bob.read_resource(uri)
                    assert "no task" in str(refused.value)
            assert (await call(bob, "list-tasks"))["tasks"] == []
            mine = await call(bob, "spawn-task", {"prompt": "say bob's own", "cwd": str(ws.work)})
            listed = (await call(bob, "list-tasks"))["tasks"]
            assert [t["task_id"] for t in listed] == [mine["task_id"]] and listed[0]["owner"] == "bob"

        # A denied identity is refused a resource just as get-task.
        async with as_identity(base, "carol") as carol:
            with pytest.raises(MCPError) as denied:
                await carol.read_resource(f"task://{agent['task_id']}/log")
            assert "carol may not read tasks" in str(denied.value)
            assert denied.value.error.data["error"] == "policy_denied"

        async with as_identity(base, "alice") as alice:
            after = await call(alice, "get-task", {"task_id": human["task_id"]})
            assert after["status"] == "queued", "bob's cancel did not touch it"
            assert [m["body"] for m in (await call(alice, "list-task-messages", {"task_id": human["task_id"]}))[
                "messages"
            ]] == ["the thread is private"]

    rows = [json.loads(line) for line in ws.cli("audit", "--json", "--limit", "1000").stdout.splitlines() if line]
    bobs = [r for r in rows if r["identity"] == "bob"]
    assert {r["tool"] for r in bobs} >= {"get-task", "message-task", "cancel-task", "list-task-messages"}
    reads = [r for r in bobs if "resource" in (r.get("args") or {})]
    assert {r["args"]["resource"] for r in reads} >= {f"task://{agent['task_id']}", f"task://{agent['task_id']}/log"}
    assert all(r["outcome"] != "ok" for r in reads), "bob's reads found nothing"
    carols = [r for r in rows if r["identity"] == "carol"]
    assert carols and carols[0]["decision"] == "deny" and "resource" in carols[0]["args"]


async def test_share_lets_named_identities_see_every_session(tmp_path: Path) -> None:
    ws = workspace(tmp_path, share='share: ["bob"]')
    async with http_server(ws, "--no-inbox") as base:
        async with as_identity(base, "alice") as alice:
            agent, human = await alices_work(alice, ws)
        async with as_identity(base, "bob") as bob:
            assert (await call(bob, "get-task", {"task_id": agent["task_id"]}))["owner"] == "alice"
            log = await bob.read_resource(f"task://{agent['task_id']}/log")
            assert "secret plans" in log.contents[0].text
            listed = {t["task_id"] for t in (await call(bob, "list-tasks"))["tasks"]}
            assert {agent["task_id"], human["task_id"]} <= listed
            thread = await call(bob, "list-task-messages", {"task_id": human["task_id"]})
            assert [m["body"] for m in thread["messages"]] == ["the thread is private"]
        async with as_identity(base, "carol") as carol:
            assert (await call(carol, "list-tasks"))["tasks"] == []
    # The operator's CLI on the machine sees everything.
    shown = json.loads(ws.cli("tasks", "show", agent["task_id"], "--json").stdout)
    assert shown["owner"] == "alice"


async def test_a_64_mb_log_of_nul_bytes_reads_in_pages_with_flat_memory(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    size = 64 * 1024 * 1024
    async with http_server(ws, "--no-inbox") as base:
        async with as_identity(base, "alice") as alice:
            task = await call(alice, "spawn-task", {
                "prompt": f"head -c {size} /dev/zero", "worker": "shell", "cwd": str(ws.work),
            })  # fmt: skip
            done = (await call(alice, "wait-task", {"task_ids": task["task_id"], "timeout_s": 50}))["tasks"][0]
            assert done["status"] == "completed"
            server = server_process(ws)
            uri = f"task://{task['task_id']}/log"
            first = (await alice.read_resource(uri)).contents[0]
            baseline = server.memory_info().rss
            peak, offset, total, pages = baseline, 0, 0, 0
            while True:
                page = (await alice.read_resource(f"{uri}?offset={offset}")).contents[0]
                position = page.meta["taskwarden/log"]
                data = base64.b64decode(page.blob)
                assert data == b"\0" * len(data) and 0 < len(data) <= 256 * 1024
                assert position["offset"] == offset and position["next_offset"] == offset + len(data)
                total += len(data)
                pages += 1
                offset = position["next_offset"]
                peak = max(peak, server.memory_info().rss)
                if position["eof"]:
                    break
            assert first.blob and total == size and pages == size // (256 * 1024)
            assert position["size"] == size
            growth = peak - baseline
            assert growth <= 20 * 1024 * 1024, f"the server grew {growth >> 20} MB reading the log"
        # A handshake-era client (its SDK refuses an SSE event over 1 MB) reads the same pages.
        async with as_identity(base, "alice", mode="legacy") as legacy:
            for offset in (0, size - 256 * 1024):
                page = (await legacy.read_resource(f"{uri}?offset={offset}")).contents[0]
                assert base64.b64decode(page.blob) == b"\0" * (256 * 1024)


async def test_text_logs_read_back_exactly_across_page_and_character_boundaries(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    text = "".join(f"line {i}: caf\u00e9 \u20ac \U0001f600 \x1b[1mbold\x1b[0m \"quoted\" \\ back\n" for i in range(8000))
    source = ws.work / "story.txt"
    source.write_text(text)
    async with http_server(ws, "--no-inbox") as base:
        async with as_identity(base, "alice") as alice:
            task = await call(alice, "spawn-task", {"prompt": f"cat {source}", "worker": "shell", "cwd": str(ws.work)})
            done = (await call(alice, "wait-task", {"task_ids": task["task_id"], "timeout_s": 30}))["tasks"][0]
            assert done["status"] == "completed"
            uri = f"task://{task['task_id']}/log"
            read, offset = b"", 0
            while True:
                # An odd page size lands inside multi-byte characters.
                page = (await alice.read_resource(f"{uri}?offset={offset}&limit=99999")).contents[0]
                assert isinstance(page.text, str), "a text log comes back as text"
                read += page.text.encode()
                offset = page.meta["taskwarden/log"]["next_offset"]
                if page.meta["taskwarden/log"]["eof"]:
                    break
            assert read == text.encode()
            for bad, field in ((f"{uri}?limit=0", "limit"), (f"{uri}?limit=262145", "limit"), (f"{uri}?offset=-1", "offset")):
                with pytest.raises(MCPError) as refused:
                    await alice.read_resource(bad)
                assert f"{field}: must be an integer in" in str(refused.value)


async def test_native_mcp_tasks_of_another_identity_are_unknown(tmp_path: Path) -> None:
    import httpx

    from tests.raw_jsonrpc import HttpPeer, RpcError, envelope

    ws = workspace(tmp_path)
    async with http_server(ws, "--no-inbox") as base:
        async with as_identity(base, "alice") as alice:
            agent, _ = await alices_work(alice, ws)
        for name, visible in (("alice", True), ("bob", False)):
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKENS[name]}"}, timeout=60) as http:
                peer = HttpPeer(http, f"{base}/mcp")
                for method in ("tasks/get", "tasks/cancel"):
                    if visible and method == "tasks/cancel":
                        continue
                    params = {"taskId": agent["task_id"], "_meta": envelope()}
                    if visible:
                        assert (await peer.request(method, params))["status"] == "completed"
                        continue
                    with pytest.raises(RpcError) as unknown:
                        await peer.request(method, params)
                    assert f"no task {agent['task_id']!r}" in str(unknown.value)
