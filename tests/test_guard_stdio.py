"""The policy guard through a real MCP client over stdio, against a real server."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import anyio
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import ElicitResult

from tests.support import FIXTURES, StrictClient, Workspace, call, call_error, spawn_and_wait, stdio_client, text_of

pytestmark = pytest.mark.anyio


def policy_ws(tmp_path: Path, text: str, name: str = "policy.yaml") -> Workspace:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return Workspace(tmp_path, policy=path)


def approvals(ws: Workspace) -> list[dict]:
    return json.loads(ws.cli("approvals", "list", "--json").stdout)


def audit(ws: Workspace, *args: str) -> list[dict]:
    out = ws.cli("audit", "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# -- dialects -------------------------------------------------------------------


async def test_catalogue_seed_policy_limits_message_task_and_denies_cancel(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, policy=FIXTURES / "policies" / "catalogue_seed.yaml")
    async with stdio_client(ws) as client:
        task = await spawn_and_wait(client, "say hi")  # not in the file: allowed
        denied = await call_error(client, "cancel-task", {"task_id": task["task_id"]})
        assert denied.structured_content == {
            "error": "policy_denied",
            "tool": "cancel-task",
            "rule": "cancel-task#1",
            "reason": "Blocked by default — enable with approval",
        }
        assert text_of(denied).startswith("policy_denied: cancel-task is not allowed")

        outcomes = []
        for _ in range(31):
            r = await client.call_tool("message-task", {"task_id": task["task_id"], "message": "say again"})
            outcomes.append(r)
        assert sum(not r.is_error for r in outcomes) == 30
        limited = outcomes[-1].structured_content
        assert limited["error"] == "rate_limited"
        assert limited["rule"] == "message-task#1"
        assert limited["reason"] == "30 calls per 60 s per session"
        assert 0 < limited["retry_after_s"] <= 60


async def test_policylayer_json_seed_denies_everything_but_its_tool(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, policy=FIXTURES / "policies" / "policylayer_seed.json")
    async with stdio_client(ws) as client:
        denied = await call_error(client, "list-tasks", {})
        assert denied.structured_content["error"] == "policy_denied"
        assert denied.structured_content["rule"] == "default"
        assert "default: deny" in denied.structured_content["reason"]
    explained = ws.cli(
        "policy", "explain", str(FIXTURES / "policies" / "policylayer_seed.json"),
        "--tool", "agentwork_send_message", "--identity", "alice", "--policy-only",  # a policy for another server
    )
    assert "allow" in explained.stdout
    assert "30 calls per 60 s per identity" in explained.stdout


async def test_intercept_dialect_conditions_and_rate_limit_string(tmp_path: Path) -> None:
    ws = policy_ws(
        tmp_path,
        """\
        version: "1"
        description: "intercept-style policy for taskwarden"
        default: allow
        tools:
          spawn-task:
            rules:
              - name: "say only"
                conditions:
                  - path: "args.prompt"
                    op: "regex"
                    value: "^say "
                on_deny: "Only 'say' prompts are allowed here"
              - name: "spawn rate"
                rate_limit: "2/minute"
        """,
    )
    async with stdio_client(ws) as client:
        bad = await call_error(client, "spawn-task", {"prompt": "rm -rf / --no-preserve-root"})
        assert bad.structured_content["error"] == "policy_denied"
        assert bad.structured_content["rule"] == "say only"
        assert bad.structured_content["reason"] == "Only 'say' prompts are allowed here"
        await call(client, "spawn-task", {"prompt": "say one"})
        await call(client, "spawn-task", {"prompt": "say two"})
        third = await call_error(client, "spawn-task", {"prompt": "say three"})
        assert third.structured_content["error"] == "rate_limited"
        assert third.structured_content["rule"] == "spawn rate"
        assert third.structured_content["retry_after_s"] > 0


async def test_intercept_state_counters_budget_and_conditions_on_them(tmp_path: Path) -> None:
    ws = policy_ws(
        tmp_path,
        """\
        version: "1"
        default: allow
        tools:
          spawn-task:
            rules:
              - name: "worker-seconds budget"
                conditions:
                  - path: "state.spawn-task.seconds"
                    op: "lte"
                    value: 100
                on_deny: "The hourly budget of 100 worker-seconds is used up"
                state:
                  counter: "seconds"
                  window: "hour"
                  increment_from: "args.timeout_s"
          list-tasks:
            rules:
              - name: "quiet after big spends"
                conditions:
                  - path: "state.spawn-task.seconds"
                    op: "lt"
                    value: 60
                on_deny: "No listing after 60 worker-seconds were spent"
        """,
    )
    async with stdio_client(ws) as client:
        await call(client, "spawn-task", {"prompt": "say a", "timeout_s": 50})
        await call(client, "list-tasks", {})  # 50 < 60
        await call(client, "spawn-task", {"prompt": "say b", "timeout_s": 40})
        quiet = await call_error(client, "list-tasks", {})  # 90 is not < 60
        assert quiet.structured_content["rule"] == "quiet after big spends"
        assert quiet.structured_content["reason"] == "No listing after 60 worker-seconds were spent"
        over = await call_error(client, "spawn-task", {"prompt": "say c", "timeout_s": 20})  # 110 > 100
        assert over.structured_content["error"] == "rate_limited"
        assert over.structured_content["reason"] == "The hourly budget of 100 worker-seconds is used up"
        fits = await call(client, "spawn-task", {"prompt": "say d", "timeout_s": 10})  # exactly 100
        assert fits["status"] in ("queued", "working", "completed")


async def test_default_policy_limits_writes_and_holds_cancels(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, policy=None)
    async with stdio_client(ws) as client:
        task = await spawn_and_wait(client, "say under the default policy")
        assert task["status"] == "completed"
        sleeper = await call(client, "spawn-task", {"prompt": "sleep 60"})
        for i in range(28):  # 30 spawn-task calls per 60 s per session
            await call(client, "spawn-task", {"prompt": f"say {i}"})
        limited = await call_error(client, "spawn-task", {"prompt": "say one too many"})
        assert limited.structured_content["rule"] == "spawn-task#1"
        assert limited.structured_content["reason"] == "30 calls per 60 s per session"
        await call(client, "list-tasks", {})  # read-only tools are allowed, unlimited
        held = await call_error(client, "cancel-task", {"task_id": sleeper["task_id"]})
        assert held.structured_content["error"] == "approval_required"
        assert held.structured_content["reason"] == "Cancelling work needs a human's approval"
        # Cancelling a finished task changes nothing: nobody is asked.
        unchanged = await call(client, "cancel-task", {"task_id": task["task_id"]})
        assert unchanged["already_terminal"] == [task["task_id"]]


# -- limits -----------------------------------------------------------------------


async def test_100_concurrent_calls_against_a_limit_of_30_admit_exactly_30(tmp_path: Path) -> None:
    ws = policy_ws(
        tmp_path,
        """\
        default: allow
        tools:
          list-tasks:
            rules:
              - action: allow
                rate_limit: {max: 30, window: 60, scope: session}
        """,
    )
    async with stdio_client(ws) as client:
        results = []

        async def one() -> None:
            results.append(await client.call_tool("list-tasks", {"limit": 1}))

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(one)
    admitted = [r for r in results if not r.is_error]
    limited = [r.structured_content for r in results if r.is_error]
    assert len(admitted) == 30
    assert len(limited) == 70
    assert all(d["error"] == "rate_limited" and 0 < d["retry_after_s"] <= 60 for d in limited)


async def test_an_identity_scoped_counter_survives_a_restart(tmp_path: Path) -> None:
    ws = policy_ws(
        tmp_path,
        """\
        default: allow
        tools:
          list-tasks:
            rules:
              - action: allow
                rate_limit: {max: 3, window: hour, scope: identity}
        """,
    )
    async with stdio_client(ws) as client:
        for _ in range(2):
            await call(client, "list-tasks", {})
    async with stdio_client(ws) as client:  # a new process and a new MCP session
        await call(client, "list-tasks", {})
        limited = await call_error(client, "list-tasks", {})
        assert limited.structured_content["error"] == "rate_limited"
        assert limited.structured_content["reason"] == "3 calls per 3600 s per identity"


async def test_a_call_that_ends_in_a_protocol_error_gives_its_room_back(tmp_path: Path) -> None:
    ws = policy_ws(
        tmp_path,
        """\
        default: allow
        tools:
          "*":
            rules:
              - action: allow
                rate_limit: {max: 2, window: 60, scope: global}
        """,
    )
    async with stdio_client(ws) as client:
        for _ in range(3):
            with pytest.raises(MCPError):
                await client.read_resource("task://tsk_missing")  # not a tool call: never counted
        await call(client, "list-tasks", {})
        await call(client, "list-tasks", {})
        assert (await call_error(client, "list-tasks", {})).structured_content["error"] == "rate_limited"


# -- approvals ----------------------------------------------------------------------

FAST_APPROVALS = """\
default: allow
tools:
  cancel-task:
    rules:
      - action: require_approval
        reason: "Cancelling needs a human"
        approval: {wait_s: 1, expires_s: EXPIRES}
"""


async def test_approval_flow_denied_then_approved_used_once_and_bound_to_the_arguments(tmp_path: Path) -> None:
    ws = policy_ws(tmp_path, FAST_APPROVALS.replace("EXPIRES", "300"))
    async with stdio_client(ws) as client:
        a = await call(client, "spawn-task", {"prompt": "sleep 120"})
        b = await call(client, "spawn-task", {"prompt": "sleep 120"})
        args = {"task_id": a["task_id"], "reason": "obsolete"}

        first = (await call_error(client, "cancel-task", args)).structured_content
        assert first["error"] == "approval_required"
        assert first["reason"] == "Cancelling needs a human"
        apr1 = first["approval"]["id"]
        assert f"taskwarden approvals approve {apr1}" in first["approval"]["how_to_approve"]
        [pending] = approvals(ws)
        assert pending["id"] == apr1 and pending["status"] == "pending"
        assert pending["args"] == args

        assert ws.cli("approvals", "deny", apr1, "--reason", "keep it running, it is the release build").returncode == 0
        denied = await call_error(client, "cancel-task", args)
        assert denied.structured_content["error"] == "approval_denied"
        assert denied.structured_content["reason"] == "keep it running, it is the release build"
        assert "keep it running" in text_of(denied).splitlines()[0]

        again = (await call_error(client, "cancel-task", args)).structured_content
        assert again["error"] == "approval_required"
        apr2 = again["approval"]["id"]
        assert apr2 != apr1

        ws.cli("approvals", "approve", apr2, "--as", "maria", "--comment", "ok")
        ran = await call(client, "cancel-task", args)
        assert ran["cancelled"] == [a["task_id"]]

        # The same call again changes nothing now (the task has ended): it runs without asking anyone.
        unchanged = await call(client, "cancel-task", args)
        assert unchanged["already_terminal"] == [a["task_id"]]
        assert [x["id"] for x in approvals(ws)] == [apr2, apr1]
        assert approvals(ws)[0]["used_at"] is not None, "the approval was used by the call that ran"

        other = (await call_error(client, "cancel-task", {"task_id": b["task_id"]})).structured_content
        assert other["error"] == "approval_required"
        assert other["approval"]["id"] not in (apr1, apr2)

        decided = {x["id"]: x for x in approvals(ws)}
        assert decided[apr2]["decided_by"] == "maria"
        assert decided[apr1]["decision_note"] == "keep it running, it is the release build"
        assert decided[apr2]["used_at"] is not None
        denial_reason = ws.cli("approvals", "deny", other["approval"]["id"], "--reason", "  ", check=False)
        assert denial_reason.returncode == 2 and "reason is required" in (denial_reason.stdout + denial_reason.stderr)


async def test_a_waiting_call_runs_when_a_human_approves_from_another_process(tmp_path: Path) -> None:
    ws = policy_ws(tmp_path, FAST_APPROVALS.replace("wait_s: 1", "wait_s: 30").replace("EXPIRES", "300"))
    async with stdio_client(ws) as client:
        task = await call(client, "spawn-task", {"prompt": "sleep 120"})
        results = []

        async def cancel() -> None:
            results.append(await client.call_tool("cancel-task", {"task_id": task["task_id"]}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel)
            while not approvals(ws):
                await anyio.sleep(0.1)
            [pending] = approvals(ws)
            approved_at = time.monotonic()
            ws.cli("approvals", "approve", pending["id"])
        returned_after = time.monotonic() - approved_at
    assert not results[0].is_error, text_of(results[0])
    assert results[0].structured_content["cancelled"] == [task["task_id"]]
    # Woken by the CLI's commit, not by wait_s (30 s) running out; the
    # benchmarks measure how fast.
    assert returned_after < 15


async def test_an_unanswered_approval_expires(tmp_path: Path) -> None:
    ws = policy_ws(tmp_path, FAST_APPROVALS.replace("EXPIRES", "2"))
    async with stdio_client(ws) as client:
        task = await call(client, "spawn-task", {"prompt": "sleep 120"})
        first = (await call_error(client, "cancel-task", {"task_id": task["task_id"]})).structured_content
        assert first["error"] == "approval_required"
        await anyio.sleep(2.2)
        expired = (await call_error(client, "cancel-task", {"task_id": task["task_id"]})).structured_content
        assert expired["error"] == "approval_expired"
        assert expired["approval"]["id"] == first["approval"]["id"]
        late = ws.cli("approvals", "approve", first["approval"]["id"], check=False)
        assert late.returncode != 0 and "expired" in late.stdout + late.stderr
        fresh = (await call_error(client, "cancel-task", {"task_id": task["task_id"]})).structured_content
        assert fresh["error"] == "approval_required"
        assert fresh["approval"]["id"] != first["approval"]["id"]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
@pytest.mark.parametrize("answer", ["approve", "refuse", "decline"])
async def test_elicitation_asks_the_person_in_the_client_when_the_rule_opts_in(
    tmp_path: Path, mode: str, answer: str
) -> None:
    ws = policy_ws(
        tmp_path, FAST_APPROVALS.replace("wait_s: 1", "wait_s: 30, elicit: true").replace("EXPIRES", "300")
    )
    asked: list[str] = []

    async def elicit(ctx, params) -> ElicitResult:  # noqa: ANN001 - the SDK's callback shape
        asked.append(params.message)
        if answer == "approve":
            return ElicitResult(action="accept", content={"approve": True})
        if answer == "refuse":
            return ElicitResult(action="accept", content={"approve": False})
        return ElicitResult(action="decline")

    async with stdio_client(ws, mode=mode, elicitation_callback=elicit) as client:
        task = await call(client, "spawn-task", {"prompt": "sleep 120"})
        result = await client.call_tool("cancel-task", {"task_id": task["task_id"]})
    assert len(asked) == 1
    assert "cancel-task" in asked[0] and task["task_id"] in asked[0]
    [record] = approvals(ws)
    if answer == "approve":
        assert not result.is_error, text_of(result)
        assert result.structured_content["cancelled"] == [task["task_id"]]
        assert record["status"] == "approved" and "MCP client" in record["decided_by"]
    else:
        assert result.structured_content["error"] == "approval_denied"
        assert record["status"] == "denied"


async def accept_everything(ctx, params) -> ElicitResult:  # noqa: ANN001 - the SDK's callback shape
    ACCEPTED.append(params.message)
    return ElicitResult(action="accept", content={"approve": True})


ACCEPTED: list[str] = []


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_client_that_accepts_every_prompt_cannot_approve_under_the_built_in_policy(
    tmp_path: Path, mode: str
) -> None:
    ws = Workspace(tmp_path, policy=None)
    ACCEPTED.clear()
    async with stdio_client(ws, mode=mode, elicitation_callback=accept_everything) as client:
        task = await call(client, "spawn-task", {"prompt": "sleep 120"})
        results = []

        async def cancel() -> None:
            results.append(await client.call_tool("cancel-task", {"task_id": task["task_id"]}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel)
            deadline = time.monotonic() + 20
            while not approvals(ws):
                assert time.monotonic() < deadline, "no approval was opened"
                await anyio.sleep(0.1)
            await anyio.sleep(1.5)
            # The client was never asked, nothing decided it: the call still waits for a person.
            [pending] = approvals(ws)
            assert pending["status"] == "pending" and not results
            ws.cli("approvals", "approve", pending["id"], "--as", "maria")
    assert ACCEPTED == []
    assert not results[0].is_error, text_of(results[0])
    assert results[0].structured_content["cancelled"] == [task["task_id"]]
    [record] = approvals(ws)
    assert record["decided_by"] == "maria"


async def test_approval_required_tells_the_agent_what_to_ask_its_person(tmp_path: Path) -> None:
    ws = policy_ws(tmp_path, FAST_APPROVALS.replace("EXPIRES", "300"))
    ACCEPTED.clear()
    async with stdio_client(ws, elicitation_callback=accept_everything) as client:
        task = await call(client, "spawn-task", {"prompt": "sleep 120"})
        held = await call_error(client, "cancel-task", {"task_id": task["task_id"]})
    apr = held.structured_content["approval"]["id"]
    first_line = text_of(held).splitlines()[0]
    assert first_line.startswith("approval_required: cancel-task needs a human's approval (Cancelling needs a human).")
    assert f"`taskwarden approvals approve {apr}`" in first_line
    assert f"open http://127.0.0.1:8765/inbox/approvals/{apr}" in first_line
    assert "No tool you can call approves it" in first_line
    assert ACCEPTED == []
    [pending] = approvals(ws)
    assert pending["status"] == "pending", "an unanswered approval waits for a human; nothing denies it"


# -- hiding, shadow mode, reload ------------------------------------------------------


async def test_a_hidden_tool_reads_exactly_like_a_tool_that_does_not_exist(tmp_path: Path) -> None:
    ws = policy_ws(tmp_path, "default: allow\nhide: [cancel-task]\n")
    async with stdio_client(ws) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "cancel-task" not in names and "spawn-task" in names
        with pytest.raises(MCPError) as hidden:
            await client.call_tool("cancel-task", {"task_id": "tsk_x"})
        with pytest.raises(MCPError) as missing:
            await client.call_tool("no-such-tool", {"task_id": "tsk_x"})
    assert hidden.value.error.code == missing.value.error.code
    assert str(hidden.value).replace("cancel-task", "X") == str(missing.value).replace("no-such-tool", "X")
    assert str(hidden.value) == "Unknown tool: cancel-task"


async def test_shadow_mode_logs_what_it_would_deny_and_allows(tmp_path: Path) -> None:
    ws = policy_ws(
        tmp_path,
        """\
        default: deny
        mode: shadow
        tools:
          spawn-task:
            rules:
              - action: deny
                reason: "no new work on Fridays"
        """,
    )
    async with stdio_client(ws) as client:
        task = await spawn_and_wait(client, "say shadowed")
        assert task["status"] == "completed"
        listed = await call(client, "list-tasks", {})
        assert len(listed["tasks"]) == 1
    decisions = {(r["tool"], r["decision"]) for r in audit(ws)}
    assert ("spawn-task", "shadow_deny") in decisions
    assert ("list-tasks", "shadow_deny") in decisions
    assert ("spawn-task", "allow") in decisions


async def test_hot_reload_applies_a_changed_policy_and_keeps_it_on_a_bad_change(tmp_path: Path) -> None:
    from mcp.client.stdio import stdio_client as stdio_transport

    from tests.support import stdio_params

    ws = policy_ws(tmp_path, "default: allow\n")
    policy = tmp_path / "policy.yaml"
    stderr_path = tmp_path / "server-stderr.log"
    with stderr_path.open("w") as stderr:
        async with StrictClient(stdio_transport(stdio_params(ws), errlog=stderr)) as client:
            await call(client, "list-tasks", {})
            policy.write_text(
                "default: allow\ntools:\n  list-tasks:\n    rules:\n      - action: deny\n        reason: frozen\n"
            )

            async def denied() -> bool:
                r = await client.call_tool("list-tasks", {})
                return r.is_error and r.structured_content["reason"] == "frozen"

            deadline = time.monotonic() + 20
            while not await denied():
                assert time.monotonic() < deadline, "the changed policy was not applied"
                await anyio.sleep(0.1)

            policy.write_text("default: allow\ntools:\n  list-tasks:\n    rules:\n      - action: maybe\n")
            deadline = time.monotonic() + 20
            # The daemon's log, beside the database (serve only relays).
            daemon_log = ws.db.parent / "logs" / "daemon.log"
            while "policy reload failed" not in daemon_log.read_text():
                assert time.monotonic() < deadline, "the bad change was never read"
                await anyio.sleep(0.1)
            # Read and refused: the policy in force is still the last good one.
            assert await denied(), "a bad change must keep the policy in force"
    log = daemon_log.read_text()
    assert "keeping the previous policy" in log
    assert f"{policy}:5" in log and "action" in log


STRICT = """\
version: "1"
default: deny
tools:
  spawn-task:
    rules:
      - action: allow
  list-tasks:
    rules:
      - action: allow
  cancel-task:
    rules:
      - action: require_approval
        reason: "Cancelling needs a human"
        approval: {wait_s: 0.5, expires_s: 300}
"""


async def test_a_half_written_policy_never_takes_effect(tmp_path: Path) -> None:
    from mcp import Client
    from mcp.client.stdio import stdio_client as stdio_transport

    from tests.support import stdio_params

    ws = policy_ws(tmp_path, STRICT)
    policy = tmp_path / "policy.yaml"
    stderr_path = tmp_path / "server-stderr.log"

    async def still_strict(client: Client, task_id: str) -> None:
        held = await call_error(client, "cancel-task", {"task_id": task_id})
        assert held.structured_content["error"] == "approval_required"
        denied = await call_error(client, "get-task", {"task_id": task_id})
        assert denied.structured_content["error"] == "policy_denied"
        assert denied.structured_content["rule"] == "default"

    # The daemon that owns the policy logs to its own file (the relay's stderr is not its).
    daemon_log = ws.db.parent / "logs" / "daemon.log"

    async def refusals_logged() -> int:
        return daemon_log.read_text().count("policy reload failed") if daemon_log.exists() else 0

    with stderr_path.open("w") as stderr:
        async with Client(stdio_transport(stdio_params(ws), errlog=stderr)) as client:
            task = await call(client, "spawn-task", {"prompt": "sleep 120"})
            await still_strict(client, task["task_id"])

            # 1. An editor rewrites the same policy in place and stalls after
            # its first line, which alone is a valid allow-everything file.
            with policy.open("w") as f:
                f.write('version: "1"\n')
                f.flush()
                for _ in range(4):  # stalled well past the stability window
                    await anyio.sleep(0.5)
                    await still_strict(client, task["task_id"])
                deadline = time.monotonic() + 20
                while await refusals_logged() < 1:
                    assert time.monotonic() < deadline, "the stalled file was never read"
                    await anyio.sleep(0.1)
                await still_strict(client, task["task_id"])
                f.write(STRICT.split("\n", 1)[1])

            # 2. A different policy, written in place, stalls after its header:
            # parsed, it has no rules and allows everything.
            with policy.open("w") as f:
                f.write('version: "1"\ndefault: allow\nmode: enforce\n')
                f.flush()
                deadline = time.monotonic() + 20
                while await refusals_logged() < 2:
                    assert time.monotonic() < deadline, "the stalled file was never read"
                    await anyio.sleep(0.1)
                await still_strict(client, task["task_id"])
                f.write("tools:\n  get-task:\n    rules:\n      - action: deny\n        reason: finished\n")

            # Once the writer finishes, the change applies.
            deadline = time.monotonic() + 20
            while True:
                r = await client.call_tool("get-task", {"task_id": task["task_id"]})
                if r.structured_content.get("reason") == "finished":
                    break
                assert time.monotonic() < deadline, "the finished policy was never applied"
                await anyio.sleep(0.1)
            [pending] = approvals(ws)
            assert pending["status"] == "pending"  # the held cancel never ran
    log = daemon_log.read_text()
    assert "the beginning of the policy in force" in log
    assert "looks half-written" in log


# -- audit and redaction ------------------------------------------------------------


async def test_secrets_never_reach_the_database_files(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    secret = "sk-live-" + os.urandom(16).hex()
    bearer = "Bearer " + os.urandom(24).hex()
    async with stdio_client(ws) as client:
        await call_error(client, "spawn-task", {"prompt": "say hi", "api_key": secret})
        await call_error(client, "get-task", {"task_id": secret[:60]})
        await call_error(client, "list-tasks", {"authorization": bearer})
        await call(client, "list-tasks", {})
    records = audit(ws)
    assert any(r["tool"] == "spawn-task" and r["args"]["api_key"] == "[REDACTED]" for r in records)
    for suffix in ("", "-wal", "-shm"):
        path = Path(str(ws.db) + suffix)
        if path.exists():
            data = path.read_bytes()
            assert secret.encode() not in data, f"secret found in {path.name}"
            assert secret[8:40].encode() not in data
            assert bearer.split()[1].encode() not in data


async def test_the_audit_trail_records_every_decision(tmp_path: Path) -> None:
    ws = policy_ws(
        tmp_path,
        """\
        default: allow
        tools:
          cancel-task:
            rules:
              - action: deny
                reason: nope
        """,
    )
    async with stdio_client(ws) as client:
        task = await spawn_and_wait(client, "say audited")
        await call_error(client, "cancel-task", {"task_id": task["task_id"]})
        await call_error(client, "get-task", {"task_id": ""})
    records = audit(ws)
    spawn = next(r for r in records if r["tool"] == "spawn-task")
    assert spawn["decision"] == "allow" and spawn["outcome"] == "ok"
    assert spawn["identity"] == "tester" and spawn["session"].startswith("stdio_")
    assert spawn["args"] == {"prompt": "say audited"}
    assert len(spawn["args_digest"]) == 64 and spawn["duration_ms"] >= 0
    denied = next(r for r in records if r["tool"] == "cancel-task")
    assert (denied["decision"], denied["rule"], denied["reason"]) == ("deny", "cancel-task#1", "nope")
    invalid = next(r for r in records if r["tool"] == "get-task")
    assert invalid["decision"] == "invalid_arguments"
    only_denials = audit(ws, "--decision", "deny")
    assert {r["tool"] for r in only_denials} == {"cancel-task"}
    table = ws.cli("audit", "--tool", "spawn-task").stdout
    assert "spawn-task" in table and "allow" in table


# -- policy CLI -------------------------------------------------------------------------


def test_policy_check_reports_a_bad_file_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: allow\ntools:\n  spawn-task:\n    rules:\n      - action: allow\n        rate_limit:\n          max: ten\n          window: 60\n")
    ws = Workspace(tmp_path)
    out = ws.cli("policy", "check", str(bad), check=False)
    assert out.returncode == 1
    assert f"{bad}:7" in out.stdout + out.stderr
    assert "max" in out.stdout + out.stderr
    good = ws.cli("policy", "check", str(FIXTURES / "policies" / "catalogue_seed.yaml"))
    assert good.stdout.startswith("OK")


def test_policy_explain_and_test(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    policy = FIXTURES / "policies" / "taskwarden_full.yaml"
    explained = ws.cli("policy", "explain", str(policy), "--tool", "cancel-task", "--args", '{"task_id": "tsk_t1"}')
    assert explained.stdout.startswith("decision: allow")
    assert "rule: *#1" in explained.stdout
    assert "600 calls per 60 s across all callers" in explained.stdout
    tested = ws.cli("policy", "test", str(policy), str(FIXTURES / "policies" / "taskwarden_full_cases.yaml"))
    assert "0 failed" in tested.stdout
    bad_args = ws.cli("policy", "explain", str(policy), "--tool", "x", "--args", "{nope", check=False)
    assert bad_args.returncode == 2
