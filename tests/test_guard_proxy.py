"""`taskwarden guard`: the policy guard in front of other, real MCP servers.

The upstreams are third-party servers installed from the registries and run
offline: `@modelcontextprotocol/server-everything` (npm, TypeScript SDK) and
`mcp-server-time` (PyPI, Python SDK); and taskwarden itself. Our client is the
SDK's `Client` over stdio to a real `taskwarden guard` process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.shared.exceptions import MCPError

from tests.npm_tools import node22, npm_bin
from tests.support import FIXTURES, Workspace, free_port, http_server, text_of, wait_until

pytestmark = pytest.mark.anyio

TIME_SERVER = Path(sys.executable).with_name("mcp-server-time")


def everything() -> list[str]:
    """`mcp-server-everything` on Node 22 (its default transport is stdio)."""
    return [str(node22()), str(npm_bin("mcp-server-everything"))]


def time_server() -> list[str]:
    assert TIME_SERVER.exists(), f"{TIME_SERVER} is missing: pip install -e '.[test]'"
    return [str(TIME_SERVER), "--local-timezone", "Etc/UTC"]


class Guarded:
    """A directory with a guard database, its policy and config."""

    def __init__(self, root: Path, policy: str | Path | None, suffix: str = ".yaml") -> None:
        self.root = root
        self.db = root / "guard.db"
        if isinstance(policy, str):
            self.policy: Path | None = root / f"policy{suffix}"
            self.policy.write_text(textwrap.dedent(policy))
        else:
            self.policy = policy
        self.config = root / "guard.toml"
        self.config.write_text(f'db = {json.dumps(str(self.db))}\nidentity = "tester"\n')

    def args(self) -> list[str]:
        args = ["--config", str(self.config)]
        if self.policy is not None:
            args += ["--policy", str(self.policy)]
        return args

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKWARDEN_")}
        env["GUARDED_SERVER_SETTING"] = "passed-through"  # the upstream must see the guard's environment
        return env

    def params(self, upstream: list[str], *extra: str) -> StdioServerParameters:
        return StdioServerParameters(
            command=sys.executable,
            args=["-m", "worker_server", "guard", *self.args(), *extra, "--", *upstream],
            env=self.env(),
            cwd=str(self.root),
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "worker_server", *args, "--config", str(self.config)],
            capture_output=True, text=True, env=self.env(), timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc

    def audit(self, *args: str) -> list[dict[str, Any]]:
        out = self.cli("audit", "--json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def approvals(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("approvals", "list", "--json").stdout)


@asynccontextmanager
async def guarded(g: Guarded, upstream: list[str], *extra: str, **client: Any) -> AsyncIterator[Client]:
    async with Client(g.params(upstream, *extra), **client) as c:
        yield c


# -- hiding, limits, redaction ---------------------------------------------------


async def test_a_hidden_tool_is_absent_and_calling_it_is_unknown_tool(tmp_path: Path) -> None:
    g = Guarded(tmp_path, """\
        version: "1"
        default: allow
        hide: [get-env, convert_time]
        """)
    async with guarded(g, everything()) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "echo" in names and "get-sum" in names
        assert "get-env" not in names
        with pytest.raises(MCPError) as hidden:
            await client.call_tool("get-env", {})
        with pytest.raises(MCPError) as absent:
            await client.call_tool("no-such-tool", {})
        assert str(hidden.value) == "Unknown tool: get-env"
        assert str(absent.value) == "Unknown tool: no-such-tool"
        assert hidden.value.error.code == absent.value.error.code

        bad = await client.call_tool("get-sum", {"a": "one", "b": 2})  # checked against the upstream's schema
        assert bad.is_error and bad.structured_content["error"] == "invalid_arguments"
        assert bad.structured_content["field"] == "a"

        echoed = await client.call_tool("echo", {"message": "through the guard"})
        assert not echoed.is_error
        assert text_of(echoed) == "Echo: through the guard"

    async with guarded(g, time_server()) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert names == {"get_current_time"}
        with pytest.raises(MCPError, match="Unknown tool: convert_time"):
            await client.call_tool(
                "convert_time", {"source_timezone": "Etc/UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}
            )
        now = await client.call_tool("get_current_time", {"timezone": "Asia/Tokyo"})
        assert not now.is_error and "Asia/Tokyo" in text_of(now)


async def test_a_limit_of_3_per_60_s_admits_exactly_3_of_10_concurrent_calls(tmp_path: Path) -> None:
    g = Guarded(tmp_path, """\
        version: "1"
        default: deny
        tools:
          get-sum:
            rules:
              - action: allow
                rate_limit: {max: 3, window: 60, scope: session}
        """)
    results: list[Any] = []
    async with guarded(g, everything()) as client:

        async def one(i: int) -> None:
            results.append(await client.call_tool("get-sum", {"a": i, "b": 100}))

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, i)
    ok = [r for r in results if not r.is_error]
    limited = [r for r in results if r.is_error]
    assert len(ok) == 3 and len(limited) == 7
    assert all("The sum of" in text_of(r) for r in ok)
    for r in limited:
        assert r.structured_content["error"] == "rate_limited"
        assert r.structured_content["rule"] == "get-sum#1"
        assert 0 < r.structured_content["retry_after_s"] <= 60
    decisions = [e["decision"] for e in g.audit("--tool", "get-sum")]
    assert sorted(decisions) == sorted(["allow"] * 3 + ["rate_limited"] * 7)


async def test_secrets_in_arguments_are_redacted_in_the_audit(tmp_path: Path) -> None:
    g = Guarded(tmp_path, 'version: "1"\ndefault: allow\n')
    secret = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0" * 2
    async with guarded(g, everything()) as client:
        r = await client.call_tool("echo", {"message": f"deploy with {secret} now"})
        assert not r.is_error and secret in text_of(r)  # the upstream got the real argument
    entries = g.audit("--tool", "echo")
    assert len(entries) == 1
    assert entries[0]["args"] == {"message": "deploy with [REDACTED] now"}
    assert entries[0]["decision"] == "allow" and entries[0]["outcome"] == "ok"
    assert secret.encode() not in g.db.read_bytes()


# -- policy dialects ---------------------------------------------------------------


async def test_the_seed_policylayer_json_and_catalogue_yaml_apply_to_other_servers(tmp_path: Path) -> None:
    # The seeds, unchanged: PolicyLayer's default deny refuses every tool it does not name.
    (tmp_path / "seed").mkdir()
    seed = Guarded(tmp_path / "seed", FIXTURES / "policies" / "policylayer_seed.json")
    async with guarded(seed, time_server()) as client:
        r = await client.call_tool("get_current_time", {"timezone": "Etc/UTC"})
        assert r.is_error and r.structured_content["error"] == "policy_denied"

    # The same dialects written for these servers' tools.
    (tmp_path / "pl").mkdir()
    pl = Guarded(tmp_path / "pl", json.dumps({
        "version": "1", "default": "deny",
        "tools": {"get_current_time": {"limits": [
            {"counter": "time_rate", "window": "minute", "max": 2, "scope": "grant"}]}},
    }), suffix=".json")
    async with guarded(pl, time_server()) as client:
        outcomes = [await client.call_tool("get_current_time", {"timezone": "Etc/UTC"}) for _ in range(3)]
        assert [r.is_error for r in outcomes] == [False, False, True]
        assert outcomes[2].structured_content["error"] == "rate_limited"
        denied = await client.call_tool(
            "convert_time", {"source_timezone": "Etc/UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}
        )
        assert denied.structured_content["error"] == "policy_denied"

    (tmp_path / "cat").mkdir()
    cat = Guarded(tmp_path / "cat", """\
        tools:
          get-sum:
            rules:
              - action: allow
                rate_limit:
                  max: 2
                  window: 60
          toggle-simulated-logging:
            rules:
              - action: deny
                reason: "Blocked by default — enable with approval"
        """)
    async with guarded(cat, everything()) as client:
        sums = [await client.call_tool("get-sum", {"a": 1, "b": 2}) for _ in range(3)]
        assert [r.is_error for r in sums] == [False, False, True]
        denied = await client.call_tool("toggle-simulated-logging", {})
        assert denied.structured_content == {
            "error": "policy_denied",
            "tool": "toggle-simulated-logging",
            "rule": "toggle-simulated-logging#1",
            "reason": "Blocked by default — enable with approval",
        }
        # Not named: the catalogue dialect allows it.
        assert not (await client.call_tool("echo", {"message": "hi"})).is_error


# -- relaying --------------------------------------------------------------------------


async def test_the_upstreams_progress_notifications_reach_the_client(tmp_path: Path) -> None:
    g = Guarded(tmp_path, 'version: "1"\ndefault: allow\n')
    seen: list[tuple[float, float | None]] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        seen.append((value, total))

    async with guarded(g, everything()) as client:
        r = await client.call_tool(
            "trigger-long-running-operation", {"duration": 1, "steps": 3}, progress_callback=progress
        )
        assert not r.is_error
        env = await client.call_tool("get-env", {})
        assert '"GUARDED_SERVER_SETTING": "passed-through"' in text_of(env)
    assert seen == [(1, 3), (2, 3), (3, 3)]


async def test_elicitation_from_the_upstream_reaches_the_client_and_back(tmp_path: Path) -> None:
    from mcp_types import ElicitResult

    g = Guarded(tmp_path, 'version: "1"\ndefault: allow\n')
    asked: list[str] = []

    async def elicit(ctx: Any, params: Any) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="decline")

    async with guarded(g, everything(), mode="legacy", elicitation_callback=elicit) as client:
        r = await client.call_tool("trigger-elicitation-request", {})
        assert not r.is_error
        assert asked and "decline" in text_of(r).lower()


async def test_prompts_and_resources_are_relayed_and_hidden_where_the_policy_names_them(tmp_path: Path) -> None:
    hidden_doc = "demo://resource/static/document/architecture.md"
    g = Guarded(tmp_path, f"""\
        version: "1"
        default: allow
        hide: [args-prompt, "{hidden_doc}"]
        """)
    async with guarded(g, everything()) as client:
        prompts = {p.name for p in (await client.list_prompts()).prompts}
        assert "simple-prompt" in prompts and "args-prompt" not in prompts
        got = await client.get_prompt("simple-prompt")
        assert got.messages and got.messages[0].role == "user"
        with pytest.raises(MCPError, match="Unknown prompt: args-prompt"):
            await client.get_prompt("args-prompt", {"city": "Paris"})

        uris = {str(r.uri) for r in (await client.list_resources()).resources}
        visible = "demo://resource/static/document/features.md"
        assert visible in uris and hidden_doc not in uris
        read = await client.read_resource(visible)
        assert read.contents and "feature" in read.contents[0].text.lower()
        with pytest.raises(MCPError, match="Unknown resource"):
            await client.read_resource(hidden_doc)


# -- the upstream going away -----------------------------------------------------------------


def _upstream_of(marker: str) -> psutil.Process:
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(marker in part for part in proc.cmdline()) and "guard" not in proc.cmdline():
                return proc
        except psutil.Error:
            continue
    raise AssertionError(f"no upstream process matching {marker}")


async def test_a_killed_upstream_gives_a_clear_error_and_is_restarted(tmp_path: Path) -> None:
    g = Guarded(tmp_path, 'version: "1"\ndefault: allow\n')
    async with guarded(g, time_server()) as client:
        assert not (await client.call_tool("get_current_time", {"timezone": "Etc/UTC"})).is_error
        first = _upstream_of("mcp-server-time")
        first.kill()
        first.wait(10)
        with pytest.raises(MCPError) as down:
            await client.call_tool("get_current_time", {"timezone": "Etc/UTC"})
        message = str(down.value)
        assert "the upstream MCP server" in message and "mcp-server-time" in message
        assert "went away" in message and "not forwarded" in message

        async def answers() -> bool:
            try:
                return not (await client.call_tool("get_current_time", {"timezone": "Etc/UTC"})).is_error
            except MCPError:
                return False

        deadline = anyio.current_time() + 20
        while not await answers():
            assert anyio.current_time() < deadline, "the upstream was not restarted"
            await anyio.sleep(0.2)
        assert _upstream_of("mcp-server-time").pid != first.pid
    # The failed call was never decided as run: it is audited as a protocol error.
    outcomes = [e["outcome"] for e in g.audit("--tool", "get_current_time")]
    assert "protocol_error" in outcomes


async def test_with_exit_configured_the_guard_stops_when_its_upstream_dies(tmp_path: Path) -> None:
    g = Guarded(tmp_path, 'version: "1"\ndefault: allow\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker_server", "guard", *g.args(), "--on-upstream-exit", "exit", "--",
         *time_server()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=g.env(), cwd=tmp_path,
    )
    try:
        upstream = await wait_until(lambda: _find_child(proc.pid, "mcp-server-time"))
        upstream.kill()
        assert proc.wait(timeout=20) == 1
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "taskwarden guard: the upstream MCP server" in err and "went away" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _find_child(pid: int, marker: str) -> psutil.Process | None:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return None
    for child in children:
        try:
            if any(marker in part for part in child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


# -- taskwarden in front of taskwarden; scan ------------------------------------------------


def _scan(g: Guarded, upstream: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "worker_server", "policy", "scan", "--", *upstream],
        capture_output=True, text=True, env=g.env(), timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


async def test_scan_then_guard_taskwarden_holds_its_destructive_tool_until_approved_and_runs_it_once(
    tmp_path: Path,
) -> None:
    inner = Workspace(tmp_path / "inner")  # taskwarden serve, allowing everything itself
    upstream = [sys.executable, "-m", "worker_server", "serve", "--config", str(inner.config)]
    (tmp_path / "outer").mkdir()
    g = Guarded(tmp_path / "outer", None)

    starter = _scan(g, upstream)
    assert '"cancel-task":  # destructive\n    rules:\n      - action: require_approval' in starter
    # spawn-task runs arbitrary work, so taskwarden marks it destructive too.
    assert '"spawn-task":  # destructive\n    rules:\n      - action: require_approval' in starter
    assert '"message-task":  # write\n    rules:\n      - action: allow\n' \
        "        rate_limit: {max: 30, window: 60, scope: session}" in starter
    assert '"get-task":  # read-only\n    rules:\n      - action: allow\n' in starter
    # Wait 1 s (not the default 20) for a decision, so the test is quick.
    g.policy = g.root / "policy.yaml"
    g.policy.write_text(starter.replace(
        'a human approves each call"\n', 'a human approves each call"\n        approval: {wait_s: 1}\n'))
    assert subprocess.run([sys.executable, "-m", "worker_server", "policy", "check", str(g.policy)]).returncode == 0

    args = {"task_id": "tsk_none"}
    async with guarded(g, upstream) as client:
        held = await client.call_tool("cancel-task", args)
        assert held.is_error and held.structured_content["error"] == "approval_required"
        approval = held.structured_content["approval"]
        assert approval["status"] == "pending"
        pending = g.approvals()
        assert [(a["tool"], a["args"]) for a in pending] == [("cancel-task", args)]

        g.cli("approvals", "approve", approval["id"], "--as", "reviewer")
        ran = await client.call_tool("cancel-task", args)
        assert not ran.is_error, text_of(ran)
        assert ran.structured_content == {"cancelled": [], "already_terminal": [], "not_found": ["tsk_none"]}

        again = await client.call_tool("cancel-task", args)  # used once: held again
        assert again.structured_content["error"] == "approval_required"
        assert again.structured_content["approval"]["id"] != approval["id"]

        other = await client.call_tool("cancel-task", {"task_id": "tsk_other"})  # bound to the arguments
        assert other.structured_content["error"] == "approval_required"

    outer_calls = [e for e in g.audit("--tool", "cancel-task") if e["decision"] == "allow"]
    assert len(outer_calls) == 1 and outer_calls[0]["approval_id"] == approval["id"]
    # The upstream taskwarden saw the call exactly once.
    out = inner.cli("audit", "--json", "--tool", "cancel-task").stdout
    inner_calls = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(inner_calls) == 1


async def test_the_catalogue_seed_applies_unchanged_to_a_guarded_taskwarden(tmp_path: Path) -> None:
    inner = Workspace(tmp_path / "inner")
    (tmp_path / "outer").mkdir()
    g = Guarded(tmp_path / "outer", FIXTURES / "policies" / "catalogue_seed.yaml")
    upstream = [sys.executable, "-m", "worker_server", "serve", "--config", str(inner.config)]
    async with guarded(g, upstream) as client:
        denied = await client.call_tool("cancel-task", {"task_id": "tsk_x"})
        assert denied.structured_content == {
            "error": "policy_denied",
            "tool": "cancel-task",
            "rule": "cancel-task#1",
            "reason": "Blocked by default — enable with approval",
        }
        listed = await client.call_tool("list-tasks", {})  # not named: allowed
        assert not listed.is_error and listed.structured_content["tasks"] == []


# -- streamable HTTP on both sides --------------------------------------------------------------


async def test_guard_an_http_upstream_and_serve_http_with_bearer_identities(tmp_path: Path) -> None:
    import hashlib

    import httpx
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    from tests.support import wait_for_port

    inner = Workspace(tmp_path / "inner")
    (tmp_path / "outer").mkdir()
    g = Guarded(tmp_path / "outer", """\
        version: "1"
        default: allow
        hide: [review-task]
        tools:
          spawn-task:
            rules:
              - action: deny
                reason: "no new work through this door"
        """)
    token = "tw-guard-token-for-alice"
    g.config.write_text(g.config.read_text() + f'\n[identities.alice]\ntoken_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n')

    async with http_server(inner, "--allow-anonymous", "--no-inbox") as inner_base:
        port = free_port()
        log = open(g.root / "guard.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker_server", "guard", *g.args(), "--upstream", f"{inner_base}/mcp",
             "--http", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=log, env=g.env(), cwd=g.root,
        )
        try:
            await wait_for_port(port, proc)
            url = f"http://127.0.0.1:{port}/mcp"
            body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
            async with httpx.AsyncClient() as http:
                anon = await http.post(url, json=body, headers={"Accept": "application/json, text/event-stream"})
                assert anon.status_code == 401

            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
                async with Client(streamable_http_client(url, http_client=http)) as client:
                    names = {t.name for t in (await client.list_tools()).tools}
                    assert "list-tasks" in names and "review-task" not in names
                    denied = await client.call_tool("spawn-task", {"prompt": "hi"})
                    assert denied.structured_content["reason"] == "no new work through this door"
                    listed = await client.call_tool("list-tasks", {})
                    assert not listed.is_error and listed.structured_content["tasks"] == []
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        assert proc.stdout is not None and proc.stdout.read() == b""
    identities = {(e["tool"], e["identity"], e["decision"]) for e in g.audit()}
    assert identities == {("spawn-task", "alice", "deny"), ("list-tasks", "alice", "allow")}
