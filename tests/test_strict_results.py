"""Every tool result, refusals included, validates against the tool's declared output schema.

Strict clients (the TypeScript SDK v1, the MCP Inspector) validate an error
result's structured content too and show nothing when it does not fit. Here
every tool is made to refuse in every way the guard and the tools refuse,
over a real stdio server, through ``StrictClient`` (draft 2020-12 and
draft-07 validation of every result); the assertions check that each refusal
is the one provoked, so a refusal kind that never happened cannot pass.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
from jsonschema import Draft7Validator, Draft202012Validator

from guard.outcomes import ErrorKind, Refusal
from tests.support import ALLOW_ALL, StrictClient, Workspace, stdio_client, text_of

# Arguments each tool accepts by its schema; the ids name no task.
VALID_ARGS: dict[str, dict[str, Any]] = {
    "spawn-task": {"prompt": "say hi"},
    "wait-task": {"task_ids": "tsk_nope", "timeout_s": 0},
    "message-task": {"task_id": "tsk_nope", "message": "hi"},
    "cancel-task": {"task_id": "tsk_nope"},
    "list-tasks": {},
    "get-task": {"task_id": "tsk_nope"},
    "send-task-message": {"task_id": "tsk_nope", "body": "hi"},
    "list-task-messages": {"task_id": "tsk_nope"},
    "review-task": {"task_id": "tsk_nope", "decision": "accept"},
}
TOOLS = sorted(VALID_ARGS)

pytestmark = pytest.mark.anyio


def _ws(tmp_path: Path, policy: str | None) -> Workspace:
    """A workspace with this policy text, or with every tool allowed."""
    path = ALLOW_ALL
    if policy is not None:
        path = tmp_path / "policy.yaml"
        path.write_text(textwrap.dedent(policy))
    return Workspace(tmp_path / "ws", policy=path)


async def _refused(client: StrictClient, tool: str, args: dict[str, Any], kind: str) -> dict[str, Any]:
    # StrictClient has validated the result against the tool's output schema.
    result = await client.call_tool(tool, args)
    assert result.is_error, f"{tool} {args}: not refused: {text_of(result)[:300]}"
    data = result.structured_content
    assert data is not None and data["error"] == kind, f"{tool}: wanted {kind}, got {text_of(result)[:300]}"
    assert data["tool"] == tool
    assert text_of(result).startswith(f"{kind}:"), text_of(result)
    return data


async def test_published_output_schemas_admit_the_result_and_every_refusal_and_nothing_else(tmp_path: Path) -> None:
    ws = _ws(tmp_path, None)
    async with stdio_client(ws) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert sorted(tools) == TOOLS
    samples = [
        Refusal(kind, "x", "rule#1", "why", retry_after_s=1.5 if kind in ("rate_limited", "budget_exhausted") else None)
        for kind in ErrorKind.__args__
    ] + [
        Refusal("invalid_arguments", "x", None, "task_id: no task", extra={"field": "task_id"}),
        Refusal(
            "approval_required", "x", "r", "why",
            approval={"id": "apr_1", "status": "pending", "expires_at": "2026-01-01T00:00:00Z", "how_to_approve": "ask"},
        ),
    ]  # fmt: skip
    for name, tool in tools.items():
        schema = tool.output_schema
        assert schema is not None and schema["type"] == "object", name
        result_only = {**schema["anyOf"][0], "$defs": schema["$defs"]}
        for validator_cls in (Draft202012Validator, Draft7Validator):
            validator_cls.check_schema(schema)
            for refusal in samples:
                data = json.loads(json.dumps(refusal.structured()))
                assert validator_cls(schema).is_valid(data), (name, data)
                # The control: the tool's own result schema alone refuses it.
                assert not validator_cls(result_only).is_valid(data), (name, data)
            # Junk is still refused: the refusal branch is not "anything".
            assert not validator_cls(schema).is_valid({"error": "oops", "tool": name, "rule": None, "reason": "r"})
            assert not validator_cls(schema).is_valid({"hello": "world"})


async def test_invalid_arguments_from_the_guard_and_from_the_tools_fit_every_schema(tmp_path: Path) -> None:
    ws = _ws(tmp_path, None)
    async with stdio_client(ws) as client:
        for tool in TOOLS:
            data = await _refused(client, tool, {**VALID_ARGS[tool], "bogus": 1}, "invalid_arguments")
            assert data["field"] == "bogus"
            assert data["rule"] == "schema"
        # What only the tool can see: an unknown task, worker or cursor.
        own = {
            "spawn-task": ({"prompt": "x", "worker": "nobody"}, "worker"),
            "list-tasks": ({"cursor": "bogus"}, "cursor"),
            "wait-task": ({"task_ids": "tsk_nope"}, "task_ids"),
        }
        for tool in TOOLS:
            if tool == "cancel-task":
                continue  # an unknown id is reported in not_found, a success
            args, field = own.get(tool, (VALID_ARGS[tool], "task_id"))
            data = await _refused(client, tool, args, "invalid_arguments")
            assert data["field"] == field, data
            assert data["rule"] is None
        result = await client.call_tool("cancel-task", {"task_id": "tsk_nope"})
        assert not result.is_error and result.structured_content["not_found"] == ["tsk_nope"]


async def test_policy_denied_fits_every_schema(tmp_path: Path) -> None:
    ws = _ws(tmp_path, """\
        version: "1"
        tools:
          "*":
            rules:
              - action: deny
                reason: "closed for the test"
        """)
    async with stdio_client(ws) as client:
        for tool in TOOLS:
            data = await _refused(client, tool, VALID_ARGS[tool], "policy_denied")
            assert data["reason"] == "closed for the test"


async def test_rate_limited_fits_every_schema(tmp_path: Path) -> None:
    ws = _ws(tmp_path, """\
        version: "1"
        tools:
          "*":
            rules:
              - action: allow
                rate_limit: {max: 1, window: 3600, scope: session}
        """)
    async with stdio_client(ws) as client:
        for tool in TOOLS:
            await client.call_tool(tool, VALID_ARGS[tool])  # takes the one unit; validated too
            data = await _refused(client, tool, VALID_ARGS[tool], "rate_limited")
            assert data["retry_after_s"] > 0


@pytest.mark.parametrize("decision", ["deny", "expire"])
async def test_approval_required_denied_and_expired_fit_every_schema(tmp_path: Path, decision: str) -> None:
    expires_s = 2 if decision == "expire" else 900
    ws = _ws(tmp_path, f"""\
        version: "1"
        tools:
          "*":
            rules:
              - action: require_approval
                reason: "a human decides"
                approval: {{expires_s: {expires_s}, wait_s: 0, elicit: false}}
        """)
    async with stdio_client(ws) as client:
        held: dict[str, str] = {}
        for tool in TOOLS:
            data = await _refused(client, tool, VALID_ARGS[tool], "approval_required")
            assert data["approval"]["status"] == "pending"
            assert data["approval"]["id"] in data["approval"]["how_to_approve"]
            held[tool] = data["approval"]["id"]
        if decision == "deny":
            for approval_id in held.values():
                ws.cli("approvals", "deny", approval_id, "--reason", "not today")
        else:
            await anyio.sleep(expires_s + 0.5)
        kind = "approval_denied" if decision == "deny" else "approval_expired"
        for tool in TOOLS:
            data = await _refused(client, tool, VALID_ARGS[tool], kind)
            assert data["approval"]["id"] == held[tool]
            if decision == "deny":
                assert data["reason"] == "not today"


JUNK: list[Any] = [
    None, True, 1.5, -1, 0, 2**63, -(2**70), [], {}, {"a": [{}]}, [[["x"]]], "", " ", "\x00",
    "x" * 70_000, "tsk_" + "a" * 70, "\u202e\uffff\U0001f600", "${HOME}`id`$(id)",
]  # fmt: skip


async def test_junk_in_every_argument_is_refused_by_name_or_accepted_never_a_crash(tmp_path: Path) -> None:
    ws = _ws(tmp_path, None)
    async with stdio_client(ws) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        refused = 0
        for name, tool in sorted(tools.items()):
            for prop in tool.input_schema["properties"]:
                for junk in JUNK:
                    args = {**VALID_ARGS[name], prop: junk}
                    result = await client.call_tool(name, args)  # validated by StrictClient
                    if not result.is_error:
                        continue
                    refused += 1
                    data = result.structured_content
                    assert data is not None, (name, prop, junk, text_of(result)[:300])
                    assert data["error"] == "invalid_arguments", (name, prop, junk, data)
                    # The field at fault is the junk one, or the unknown task the valid arguments name.
                    assert data["field"].split(".")[0] in (prop, "task_id", "task_ids"), (name, prop, junk, data)
                    assert "Error executing tool" not in text_of(result)
        assert refused > 300
        spawned = (await client.call_tool("list-tasks", {"limit": 200})).structured_content["tasks"]
        assert spawned, "no junk was a valid prompt"
        ids = [t["task_id"] for t in spawned]
        done = (await client.call_tool("wait-task", {"task_ids": ids[:50], "mode": "all", "timeout_s": 50}))
        assert not done.structured_content["timed_out"]
        assert {t["status"] for t in done.structured_content["tasks"]} == {"completed"}
