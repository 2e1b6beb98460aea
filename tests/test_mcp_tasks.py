"""Native MCP Tasks, driven with raw JSON-RPC over stdio and streamable HTTP (the SDK has no tasks client).

2026-07-28: the ``io.modelcontextprotocol/tasks`` extension (SEP-2663).
2025-11-25: the core ``tasks/*`` methods. Both on taskwarden's own task rows,
with the fake agent and the human-task CLI as the workers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.raw_jsonrpc import LEGACY, RpcError, envelope, http_peer, stdio_peer
from tests.support import Workspace, http_server, wait_until

pytestmark = pytest.mark.anyio

TERMINAL = ("completed", "failed", "cancelled")


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def call_params(tool: str, args: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"name": tool, "arguments": args, "_meta": envelope(**meta)}


async def poll(peer: Any, task_id: str, *, until: tuple[str, ...] = TERMINAL, **meta: Any) -> dict[str, Any]:
    """Poll tasks/get (2026-07-28) as Claude Code does, until the status is one of ``until``."""
    with anyio.fail_after(60):
        while True:
            task = await peer.request("tasks/get", {"taskId": task_id, "_meta": envelope(**meta)})
            assert task["resultType"] == "complete"
            if task["status"] in until:
                return task
            await anyio.sleep(0.2)


async def cli(ws: Workspace, *args: str) -> str:
    return (await anyio.to_thread.run_sync(lambda: ws.cli(*args))).stdout


async def audit(ws: Workspace) -> list[dict[str, Any]]:
    out = await cli(ws, "audit", "--json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# -- 2026-07-28 -----------------------------------------------------------------


async def test_modern_task_lifecycle_over_stdio(ws: Workspace) -> None:
    async with stdio_peer(ws) as peer:
        discovered = await peer.request("server/discover", {"_meta": envelope()})
        assert "io.modelcontextprotocol/tasks" in discovered["capabilities"]["extensions"]
        assert "tasks" not in discovered["capabilities"]  # the 2025 slot is not used on 2026-07-28

        created = await peer.request(
            "tools/call", call_params("spawn-task", {"prompt": "say looking\nsleep 0.5\nsay all done: 42"})
        )
        # A flat CreateTaskResult: the taskwarden task id, no nested `task`.
        assert created["resultType"] == "task"
        assert created["taskId"].startswith("tsk_")
        assert created["status"] == "working"
        assert "task" not in created and "content" not in created
        assert created["ttlMs"] is None  # kept until `taskwarden tasks prune`
        assert created["pollIntervalMs"] == 5000
        task_id = created["taskId"]

        done = await poll(peer, task_id)
        assert done["status"] == "completed"
        result = done["result"]
        assert result["isError"] is False
        assert result["structuredContent"]["task_id"] == task_id
        assert result["structuredContent"]["output"]["final"] == "all done: 42"
        assert json.loads(result["content"][0]["text"])["output"]["final"] == "all done: 42"

        # The same task is an ordinary taskwarden task.
        listed = await peer.request("tools/call", call_params("list-tasks", {}, tasks=False))
        assert [t["task_id"] for t in listed["structuredContent"]["tasks"]] == [task_id]

        # A worker that fails is a tool that reported an error: completed with isError.
        failed = await peer.request("tools/call", call_params("spawn-task", {"prompt": "say trying\nexit 3"}))
        failed_done = await poll(peer, failed["taskId"])
        assert failed_done["status"] == "completed"
        assert failed_done["result"]["isError"] is True
        assert failed_done["result"]["structuredContent"]["status"] == "failed"
        assert failed_done["result"]["structuredContent"]["status_message"].startswith("exit 3")

        # tasks/result and tasks/list are gone in the extension.
        for method in ("tasks/result", "tasks/list"):
            with pytest.raises(RpcError) as err:
                await peer.request(method, {"taskId": task_id, "_meta": envelope()})
            assert err.value.code == -32601
        with pytest.raises(RpcError) as err:
            await peer.request("tasks/get", {"taskId": "tsk_nosuchtask00", "_meta": envelope()})
        assert err.value.code == -32602

        # Without the extension on the request: no task, and no tasks/* methods.
        plain = await peer.request("tools/call", call_params("spawn-task", {"prompt": "say hi"}, tasks=False))
        assert plain["resultType"] == "complete" and "taskId" not in plain
        assert plain["structuredContent"]["task_id"].startswith("tsk_")
        for method, extra in (("tasks/get", {}), ("tasks/cancel", {}), ("tasks/update", {"inputResponses": {}})):
            with pytest.raises(RpcError) as err:
                await peer.request(method, {"taskId": task_id, **extra, "_meta": envelope(tasks=False)})
            assert err.value.code == -32021
            assert err.value.data["requiredCapabilities"]["extensions"] == {"io.modelcontextprotocol/tasks": {}}

    rows = await audit(ws)
    gets = [r for r in rows if r["tool"] == "tasks/get"]
    assert gets and all(r["identity"] == "tester" for r in gets)
    assert {r["outcome"] for r in gets} >= {"ok", "protocol_error"}
    assert any(r["tool"] == "tasks/result" for r in rows) is False  # -32601 never reached taskwarden


async def test_modern_human_question_answered_with_tasks_update_over_http(ws: Workspace) -> None:
    async with http_server(ws, "--allow-anonymous") as url, http_peer(url) as peer:
        created = await peer.request(
            "tools/call",
            call_params("spawn-task", {"prompt": "Pick the release branch", "worker": "human", "title": "Release"}),
        )
        task_id = created["taskId"]
        assert created["status"] == "working" and created["statusMessage"].startswith("queued")

        # notifications/tasks on a subscriptions/listen stream for this task.
        listener = http_peer(url)
        stream_done = anyio.Event()
        stream: dict[str, Any] = {}

        async def listen() -> None:
            async with listener as other:
                stream["final"] = await other.exchange(
                    "subscriptions/listen", {"notifications": {"taskIds": [task_id]}, "_meta": envelope()},
                    name=None, timeout=120,
                )
                stream["notifications"] = other.notifications
            stream_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            await cli(ws, "tasks", "claim", task_id, "--as", "maria")
            await cli(ws, "tasks", "ask", task_id, "Which branch, main or release/2.0?", "--as", "maria")
            asked = await poll(peer, task_id, until=("input_required",))
            (key, request), = asked["inputRequests"].items()
            assert request["method"] == "elicitation/create"
            assert "Which branch, main or release/2.0?" in request["params"]["message"]
            assert request["params"]["requestedSchema"]["required"] == ["answer"]

            # A wrong Mcp-Name is refused (SEP-2663 routing header).
            wrong = await peer.exchange("tasks/get", {"taskId": task_id, "_meta": envelope()}, name="tsk_other")
            assert wrong["error"]["code"] == -32020

            ack = await peer.request(
                "tasks/update",
                {"taskId": task_id, "inputResponses": {key: {"action": "accept", "content": {"answer": "release/2.0"}}},
                 "_meta": envelope()},
            )
            assert ack["resultType"] == "complete" and set(ack) <= {"resultType", "_meta"}
            working = await poll(peer, task_id, until=("working",))
            assert "inputRequests" not in working
            # The answer went to the thread, as send-task-message would have put it.
            shown = json.loads(await cli(ws, "tasks", "show", task_id, "--json"))
            assert shown["thread"][-1]["author"] == "agent" and shown["thread"][-1]["body"] == "release/2.0"
            # Answering the same key again is ignored (it is no longer outstanding).
            again = await peer.request(
                "tasks/update",
                {"taskId": task_id, "inputResponses": {key: {"action": "accept", "content": {"answer": "main"}}},
                 "_meta": envelope()},
            )
            assert again["resultType"] == "complete"

            await cli(ws, "tasks", "handin", task_id, "Tagged v2.0.0 on release/2.0", "--as", "maria")
            review = await poll(peer, task_id, until=("input_required",))
            (review_key, review_request), = review["inputRequests"].items()
            assert review_key != key
            assert review_request["params"]["requestedSchema"]["properties"]["decision"]["enum"] == [
                "accept", "request_changes"
            ]
            await peer.request(
                "tasks/update",
                {"taskId": task_id, "inputResponses": {review_key: {"action": "accept", "content": {"decision": "accept"}}},
                 "_meta": envelope()},
            )
            done = await poll(peer, task_id)
            assert done["status"] == "completed"
            assert done["result"]["structuredContent"]["output"]["final"] == "Tagged v2.0.0 on release/2.0"
            with anyio.fail_after(30):
                await stream_done.wait()

    assert stream["final"]["result"]["resultType"] == "complete"
    notes = stream["notifications"]
    assert notes[0]["method"] == "notifications/subscriptions/acknowledged"
    assert notes[0]["params"]["notifications"]["taskIds"] == [task_id]
    pushed = [n["params"] for n in notes if n["method"] == "notifications/tasks"]
    assert all(p["taskId"] == task_id and "_meta" in p for p in pushed)
    statuses = [p["status"] for p in pushed]
    assert statuses[-1] == "completed" and "input_required" in statuses
    assert pushed[-1]["result"]["structuredContent"]["output"]["final"] == "Tagged v2.0.0 on release/2.0"
    assert any("inputRequests" in p for p in pushed if p["status"] == "input_required")


async def test_guarded_tasks_cancel_held_then_approved_with_the_cli(tmp_path: Path) -> None:
    """The built-in policy: tasks/cancel needs a human's approval, exactly as cancel-task does."""
    ws = Workspace(tmp_path, policy=None)
    async with stdio_peer(ws) as peer:
        created = await peer.request("tools/call", call_params("spawn-task", {"prompt": "say started\nsleep 60"}))
        task_id = created["taskId"]
        await poll(peer, task_id, until=("working",))
        answer: dict[str, Any] = {}

        async def cancel() -> None:
            answer["response"] = await peer.exchange(
                "tasks/cancel", {"taskId": task_id, "_meta": envelope()}, timeout=60
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel)

            async def pending() -> list[dict[str, Any]]:
                return [a for a in json.loads(await cli(ws, "approvals", "list", "--json")) if a["status"] == "pending"]

            with anyio.fail_after(15):
                while not (held := await pending()):
                    await anyio.sleep(0.2)
            assert held[0]["tool"] == "cancel-task" and held[0]["args"] == {"task_id": task_id}
            assert "response" not in answer  # held while a human decides
            still = await peer.request("tasks/get", {"taskId": task_id, "_meta": envelope()})
            assert still["status"] == "working"
            await cli(ws, "approvals", "approve", held[0]["id"], "--as", "lead")
        assert answer["response"]["result"]["resultType"] == "complete"
        assert (await poll(peer, task_id))["status"] == "cancelled"

    rows = [r for r in await audit(ws) if r["tool"] == "tasks/cancel"]
    assert rows[-1]["decision"] == "allow" and rows[-1]["outcome"] == "ok"
    assert rows[-1]["approval_id"] == held[0]["id"] and rows[-1]["rule"].startswith("cancel-task")


CANCEL_QUICKLY = """\
version: "1"
default: allow
tools:
  spawn-task:
    rules:
      - action: allow
        rate_limit: {max: 2, window: 60, scope: session}
  cancel-task:
    rules:
      - action: require_approval
        reason: "Cancelling work needs a human's approval"
        approval: {expires_s: 900, wait_s: 1}
"""


async def test_tasks_cancel_refusal_is_a_readable_error_and_limits_apply_over_http(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(CANCEL_QUICKLY)
    ws = Workspace(tmp_path / "ws", policy=policy)
    async with http_server(ws, "--allow-anonymous") as url, http_peer(url) as peer:
        created = await peer.request("tools/call", call_params("spawn-task", {"prompt": "say started\nsleep 60"}))
        task_id = created["taskId"]
        refused = await peer.exchange("tasks/cancel", {"taskId": task_id, "_meta": envelope()})
        error = refused["error"]
        assert error["code"] == -32030
        approval = error["data"]["approval"]
        assert error["data"]["error"] == "approval_required" and error["data"]["tool"] == "cancel-task"
        assert error["message"].startswith("approval_required: cancel-task needs a human's approval")
        assert approval["id"] in error["message"] and "taskwarden approvals approve" in error["message"]
        assert error["message"].endswith("(Here: send tasks/cancel again.)")

        await cli(ws, "approvals", "approve", approval["id"])
        ack = await peer.request("tasks/cancel", {"taskId": task_id, "_meta": envelope()})
        assert ack["resultType"] == "complete"
        assert (await poll(peer, task_id))["status"] == "cancelled"

        # Task-augmented calls pass the same rate limits as plain ones (2 per 60 s here).
        second = await peer.request("tools/call", call_params("spawn-task", {"prompt": "say two"}))
        assert second["resultType"] == "task"
        third = await peer.request("tools/call", call_params("spawn-task", {"prompt": "say three"}))
        assert third["resultType"] == "complete" and third["isError"] is True
        assert third["structuredContent"]["error"] == "rate_limited"

    decisions = [(r["tool"], r["decision"]) for r in await audit(ws)]
    assert ("tasks/cancel", "approval_required") in decisions and ("tasks/cancel", "allow") in decisions
    assert ("spawn-task", "rate_limited") in decisions


# -- 2025-11-25 -------------------------------------------------------------------

LEGACY_CAPS = {"tasks": {"list": {}, "cancel": {}}}


async def _legacy_flow(peer: Any, init: dict[str, Any], notifications: list[dict[str, Any]]) -> None:
    assert init["protocolVersion"] == LEGACY
    assert init["capabilities"]["tasks"] == {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
    tools = {t["name"]: t for t in (await peer.request("tools/list", {}))["tools"]}
    assert tools["spawn-task"]["execution"] == {"taskSupport": "optional"}
    assert tools["message-task"]["execution"] == {"taskSupport": "optional"}
    assert "execution" not in tools["wait-task"]

    created = await peer.request(
        "tools/call",
        {"name": "spawn-task", "arguments": {"prompt": "say step one\nsleep 0.5\nsay finished"}, "task": {"ttl": 60000}},
    )
    task = created["task"]
    assert task["taskId"].startswith("tsk_") and task["status"] == "working"
    assert task["ttl"] is None and task["pollInterval"] == 5000
    task_id = task["taskId"]

    got = await peer.request("tasks/get", {"taskId": task_id})
    assert got["taskId"] == task_id and got["status"] in ("working", "completed")
    # tasks/result blocks until the task is terminal, then returns the tool result.
    result = await peer.request("tasks/result", {"taskId": task_id})
    assert result["isError"] is False
    assert result["structuredContent"]["output"]["final"] == "finished"
    assert result["_meta"]["io.modelcontextprotocol/related-task"] == {"taskId": task_id}

    listed = await peer.request("tasks/list", {})
    assert task_id in [t["taskId"] for t in listed["tasks"]]

    running = (await peer.request(
        "tools/call", {"name": "spawn-task", "arguments": {"prompt": "say waiting\nsleep 60"}, "task": {}}
    ))["task"]["taskId"]
    with anyio.fail_after(20):
        while (await peer.request("tasks/get", {"taskId": running}))["status"] != "working":
            await anyio.sleep(0.2)
    cancelled = await peer.request("tasks/cancel", {"taskId": running})
    assert cancelled["taskId"] == running and cancelled["status"] == "cancelled"
    with pytest.raises(RpcError) as err:
        await peer.request("tasks/cancel", {"taskId": running})
    assert err.value.code == -32602  # already terminal
    failing = (await peer.request(
        "tools/call", {"name": "spawn-task", "arguments": {"prompt": "exit 4"}, "task": {}}
    ))["task"]["taskId"]
    failed = await peer.request("tasks/result", {"taskId": failing})
    assert failed["isError"] is True
    assert (await peer.request("tasks/get", {"taskId": failing}))["status"] == "failed"

    # Status changes were pushed on the session's stream.
    def pushed() -> list[tuple[str, str]]:
        return [(n["params"]["taskId"], n["params"]["status"]) for n in notifications
                if n["method"] == "notifications/tasks/status"]

    await wait_until(lambda: (task_id, "completed") in pushed() and (running, "cancelled") in pushed())
    assert all(n["params"]["ttl"] is None for n in notifications if n["method"] == "notifications/tasks/status")


async def test_legacy_client_uses_tasks_methods_over_stdio(ws: Workspace) -> None:
    async with stdio_peer(ws) as peer:
        await _legacy_flow(peer, await peer.initialize(LEGACY_CAPS), peer.notifications)


async def test_legacy_client_uses_tasks_methods_over_http(ws: Workspace) -> None:
    async with http_server(ws, "--allow-anonymous") as url, http_peer(url) as peer:
        # Notifications for a handshake-era HTTP session arrive on its GET stream.
        notifications: list[dict[str, Any]] = []
        init = await peer.initialize(LEGACY_CAPS)

        async def standalone() -> None:
            from tests.raw_jsonrpc import _sse_messages

            headers = {"Accept": "text/event-stream", "Mcp-Session-Id": peer.session_id or "",
                       "MCP-Protocol-Version": LEGACY}
            async with peer.client.stream("GET", peer.url, headers=headers, timeout=None) as response:
                async for message in _sse_messages(response):
                    notifications.append(message)

        async with anyio.create_task_group() as tg:
            tg.start_soon(standalone)
            await _legacy_flow(peer, init, notifications)
            tg.cancel_scope.cancel()

