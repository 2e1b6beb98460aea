"""The guard in front of a small MCP server of its own: it knows nothing of tasks.

These use the SDK's in-memory client, so they can reach paths a real task
server does not offer (a tool that fails with a protocol error, a client
whose elicitation fails).
"""

from __future__ import annotations

import json
import random
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, ElicitResult, ErrorData

from guard.storage import open_database
from guard.gate import Guard
from guard.middleware import GuardMiddleware

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def guarded(tmp_path: Path, policy: str) -> AsyncIterator[tuple[MCPServer[Any], Guard]]:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(textwrap.dedent(policy))
    db = await open_database(tmp_path / "guard.db")
    feed = db.change_feed()
    feed.start()
    guard = await Guard.open(db, feed, policy_path=policy_file)
    server: MCPServer[Any] = MCPServer("guarded", middleware=[GuardMiddleware(guard)])

    @server.tool(name="echo")
    async def echo(text: str) -> str:
        """Say it back."""
        return text

    @server.tool(name="explode")
    async def explode() -> str:
        """Fail with a JSON-RPC error."""
        raise MCPError(code=INTERNAL_ERROR, message="boom")

    @server.tool(name="drop")
    async def drop(what: str) -> str:
        """Something destructive."""
        return f"dropped {what}"

    guard.set_tools(server)
    try:
        yield server, guard
    finally:
        await guard.audit.flush()
        feed.close()
        await db.close()


async def test_a_call_that_ends_in_a_protocol_error_gives_its_room_back(tmp_path: Path) -> None:
    policy = """\
        default: allow
        tools:
          "*":
            rules:
              - action: allow
                rate_limit: {max: 2, window: 60, scope: global}
        """
    async with guarded(tmp_path, policy) as (server, guard), Client(server) as client:
        for _ in range(5):
            with pytest.raises(MCPError, match="boom"):
                await client.call_tool("explode", {})
        assert (await client.call_tool("echo", {"text": "a"})).is_error is False
        assert (await client.call_tool("echo", {"text": "b"})).is_error is False
        third = await client.call_tool("echo", {"text": "c"})
        assert third.structured_content["error"] == "rate_limited"
        outcomes = [e.outcome for e in await guard.audit.query(tool="explode")]
        assert outcomes == ["protocol_error"] * 5


APPROVE_DROP = """\
    default: allow
    tools:
      drop:
        rules:
          - action: require_approval
            reason: "dropping needs a human"
            approval: {wait_s: 0, expires_s: 300 ELICIT}
            rate_limit: {max: 1, window: 60, scope: global}
    """


async def test_an_approved_call_that_is_rate_limited_keeps_its_approval(tmp_path: Path) -> None:
    async with guarded(tmp_path, APPROVE_DROP.replace(" ELICIT", "")) as (server, guard), Client(server) as client:
        # Fill the limit with an approved call for another table.
        first = await client.call_tool("drop", {"what": "t1"})
        await guard.approvals.decide(first.structured_content["approval"]["id"], True, "maria")
        assert (await client.call_tool("drop", {"what": "t1"})).is_error is False

        held = await client.call_tool("drop", {"what": "t2"})
        approval_id = held.structured_content["approval"]["id"]
        await guard.approvals.decide(approval_id, True, "maria")
        limited = await client.call_tool("drop", {"what": "t2"})
        assert limited.structured_content["error"] == "rate_limited"
        approval = await guard.approvals.get(approval_id)
        assert approval is not None and approval.used_at is None, "a refused call must not spend the approval"


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_client_whose_elicitation_fails_leaves_the_decision_to_a_human(tmp_path: Path, mode: str) -> None:
    asked = []

    async def broken(ctx: Any, params: Any) -> ErrorData:
        asked.append(params.message)
        return ErrorData(code=INTERNAL_ERROR, message="the client's dialog crashed")

    policy = APPROVE_DROP.replace(" ELICIT", ", elicit: true").replace("wait_s: 0", "wait_s: 0.2")
    async with guarded(tmp_path, policy) as (server, guard):
        async with Client(server, mode=mode, elicitation_callback=broken) as client:
            try:
                result = await client.call_tool("drop", {"what": "t1"})
            except MCPError as exc:  # the 2026 client gives up on an ErrorData answer itself
                assert mode == "auto" and "crashed" in str(exc)
            else:
                assert result.structured_content["error"] == "approval_required"
        [pending] = await guard.approvals.list()
        assert pending.status.value == "pending"
    assert asked


@pytest.mark.parametrize("setting", [", elicit: false", ""])
async def test_without_elicit_true_the_client_is_never_asked(tmp_path: Path, setting: str) -> None:
    asked = []

    async def yes(ctx: Any, params: Any) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"approve": True})

    policy = APPROVE_DROP.replace(" ELICIT", setting)
    async with guarded(tmp_path, policy) as (server, guard), Client(server, elicitation_callback=yes) as client:
        result = await client.call_tool("drop", {"what": "t1"})
        assert result.structured_content["error"] == "approval_required"
    assert asked == []


async def test_hidden_and_absent_tools_are_the_same_unknown_tool_error(tmp_path: Path) -> None:
    async with guarded(tmp_path, "default: allow\nhide: [drop]\n") as (server, guard), Client(server) as client:
        assert {t.name for t in (await client.list_tools()).tools} == {"echo", "explode"}
        with pytest.raises(MCPError) as hidden:
            await client.call_tool("drop", {"what": "x"})
        with pytest.raises(MCPError) as absent:
            await client.call_tool("nothing", {"what": "x"})
        assert (hidden.value.error.code, str(hidden.value)) == (absent.value.error.code, "Unknown tool: drop")
        assert str(absent.value) == "Unknown tool: nothing"
        decisions = [e.decision for e in await guard.audit.query()]
        assert decisions == ["hidden", "hidden"]


async def test_a_request_that_is_not_a_tool_call_is_decided_and_audited_as_the_tool_it_acts_as(
    tmp_path: Path,
) -> None:
    """The API a host uses for requests such as MCP ``tasks/cancel``: decide it as a tool
    (same rules, same approval digest), audit it under its own name."""
    from guard.audit import Outcome
    from guard.outcomes import Refusal
    from guard.gate import Admission, Call

    policy = """\
        version: "1"
        default: allow
        tools:
          drop:
            rules:
              - action: require_approval
                reason: "a human decides"
                approval: {wait_s: 0.1}
        """
    async with guarded(tmp_path, policy) as (_server, guard):
        held = await guard.admit(Call("drop", {"what": "t1"}, "alice", "s1", via="things/drop"))
        assert isinstance(held, Refusal) and held.error == "approval_required"
        approval = await guard.approvals.get(held.approval["id"])
        assert approval is not None and approval.tool == "drop"  # what the human sees
        await guard.approvals.decide(approval.id, True, "bob", None)
        # The approval serves the tool call itself too: it is the same call.
        admitted = await guard.admit(Call("drop", {"what": "t1"}, "alice", "s1"))
        assert isinstance(admitted, Admission) and admitted.approval_id == approval.id
        await guard.settle(admitted, Outcome.OK)

        await guard.record_request(Call("things/get", {"id": "t1"}, "alice", "s1", via="things/get"), Outcome.OK,
                                   0.0, read_only=True)
        await guard.audit.flush()
        rows = [(e.tool, e.decision, e.outcome) for e in await guard.audit.query()]
    assert rows == [
        ("things/drop", "approval_required", "refused"),
        ("drop", "allow", "ok"),
        ("things/get", "allow", "ok"),
    ]


def random_json(r: random.Random, depth: int = 0) -> Any:
    """Valid JSON of awkward shapes: deep nesting, odd keys, extreme numbers, long and odd strings."""
    kind = r.randrange(9 if depth < 120 else 5)
    if kind == 0:
        return r.choice([0, -1, 2**63, -(2**63) - 1, 10**300, 1e308, -0.0, 5e-324, True, False, None])
    if kind == 1:
        return "".join(chr(r.choice([r.randrange(32, 127), r.randrange(0x80, 0xD7FF), r.randrange(0xE000, 0x10FFFF)]))
                       for _ in range(r.randrange(0, 40)))
    if kind == 2:
        return r.choice(["", "\x00", "\n" * 500, "sk-" * 5000, "a" * 26 + "!", " " * 3000 + "x", "İ" * 100])
    if kind == 3:
        return "password=" + "=" * r.randrange(1, 2000)
    if kind == 4:
        return r.random() * 10 ** r.randrange(-300, 300)
    if kind in (5, 6):
        return [random_json(r, depth + 1) for _ in range(r.randrange(0, 4))]
    keys = ["", "a", "token", "é" * 50, "k" * 3000, "\x00", "max_tokens", "X-Api-Key", "__proto__"]
    return {r.choice(keys) + str(i): random_json(r, depth + 1) for i in range(r.randrange(0, 4))}


FUZZ_POLICY = """\
    default: allow
    tools:
      echo:
        rules:
          - action: deny
            reason: "not words"
            conditions:
              - {path: args.text, op: not_regex, value: '^(\\\\w+\\\\s?)+$'}
              - {path: args.text, op: max_length, value: 50}
            match: any
      drop:
        rules:
          - action: require_approval
            approval: {wait_s: 0, expires_s: 300}
    """


@pytest.mark.parametrize("seed", [20261202, 1, 2])
async def test_awkward_arguments_get_clear_answers_and_are_all_audited(tmp_path: Path, seed: int) -> None:
    r = random.Random(seed)
    calls = 0
    async with guarded(tmp_path, FUZZ_POLICY) as (server, guard), Client(server) as client:
        for i in range(150):
            tool = r.choice(["echo", "drop", "explode", "nothing", "x" * 5000, ""])
            args = random_json(r)
            if not isinstance(args, dict):
                args = {"text": args} if r.random() < 0.5 else {"what": args}
            calls += 1
            try:
                result = await client.call_tool(tool, args)
            except MCPError as exc:
                # Only the answers a client can act on: no such tool, or the tool's own failure.
                assert str(exc).startswith("Unknown tool: ") or str(exc) == "boom", (i, str(exc)[:200])
                assert len(str(exc)) < 400
                continue
            if result.is_error and result.structured_content:
                data = result.structured_content
                assert data["error"] in ("invalid_arguments", "policy_denied", "approval_required"), data
                assert len(data["reason"]) < 1000, data["reason"][:300]
        await guard.audit.flush()
        rows = await guard.audit.query(limit=10_000)
    assert len(rows) >= calls
    assert all(len(json.dumps(row.args)) < 40_000 for row in rows)
