"""The command line as a newcomer meets it: one-line errors, validated arguments,
no database made by reading, the verbs that work on tasks and workers."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from tests.support import (
    FIXTURES,
    Workspace,
    call,
    http_server,
    spawn_and_wait,
    stdio_client,
    stop_daemons,
    text_of,
)
from worker_server.cli import build_parser

pytestmark = pytest.mark.anyio


@pytest.fixture
def ws(tmp_path: Path):
    workspace = Workspace(tmp_path)
    yield workspace
    stop_daemons(tmp_path)


def taskwarden(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
    base = {k: v for k, v in os.environ.items() if not k.startswith("TASKWARDEN_")}
    return subprocess.run(
        [sys.executable, "-m", "worker_server", *args], capture_output=True, text=True, timeout=timeout,
        cwd=cwd, env={**base, **(env or {})},
    )  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- databases ---------------------------------------------------------------------


def test_reading_commands_never_create_a_database_and_say_why_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "dir" / "x.db"
    for verb in (["tasks", "list"], ["tasks", "show", "tsk_abc"], ["approvals", "list"], ["audit"],
                 ["budgets"], ["humans", "list"], ["tasks", "logs", "tsk_abc"]):  # fmt: skip
        line = one_line_error(taskwarden(*verb, "--db", str(missing), cwd=tmp_path))
        assert line == (
            f"taskwarden: no database at {missing}: nothing has run with it yet "
            "(check --db, $TASKWARDEN_DB or db in the config)"
        ), verb
    assert not (tmp_path / "nonexistent").exists()

    line = one_line_error(taskwarden("tasks", "list", "--db", str(tmp_path), cwd=tmp_path))
    assert line == f"taskwarden: --db {tmp_path} is a directory; name the database file (e.g. {tmp_path}/taskwarden.db)"
    not_db = tmp_path / "notes.txt"
    not_db.write_text("hello\n" * 100)
    line = one_line_error(taskwarden("tasks", "list", "--db", str(not_db), cwd=tmp_path))
    assert line == f"taskwarden: {not_db} is not a taskwarden database (not an SQLite file)"
    assert not_db.read_text() == "hello\n" * 100


def test_cli_arguments_get_the_tools_bounds(ws: Workspace) -> None:
    cases = {
        ("tasks", "list", "--status", "bogus"): "argument --status: invalid choice: 'bogus'",
        ("tasks", "list", "--limit", "0"): "argument --limit: must be in 1..200, got 0",
        ("tasks", "list", "--limit", "201"): "argument --limit: must be in 1..200, got 201",
        ("tasks", "list", "--limit", "ten"): "argument --limit: must be an integer in 1..200, got 'ten'",
        ("tasks", "show", "tsk_a", "--tail", "501"): "argument --tail: must be in 0..500, got 501",
        ("tasks", "prune", "--older-than", "soon"): "argument --older-than: expected an age such as 30d",
    }
    for args, expected in cases.items():
        line = one_line_error(ws.cli(*args, check=False))
        assert line.startswith(f"taskwarden {args[0]} {args[1]}: {expected}"), line
        assert line.endswith(f"(see taskwarden {args[0]} {args[1]} --help)"), line


def test_plain_commands_print_no_log_lines_and_the_table_has_a_header(ws: Workspace) -> None:
    async def make() -> str:
        async with stdio_client(ws) as client:
            return (await spawn_and_wait(client, "say header test"))["task_id"]

    task_id = anyio.run(make)
    listing = ws.cli("tasks", "list")
    assert listing.stderr == ""
    header, row = listing.stdout.splitlines()[:2]
    assert header.split() == ["TASK", "STATUS", "WORKER", "CREATED", "USAGE", "TITLE"]
    assert row.startswith(task_id)
    shown = ws.cli("tasks", "show", task_id)
    assert shown.stderr == ""
    log_line = next(line for line in shown.stdout.splitlines() if line.strip().startswith("log:"))
    log_file = Path(log_line.split()[1])
    assert log_file.is_file() and "header test" in log_file.read_text()
    assert f"task://{task_id}/log" in log_line


def _actions(parser: argparse.ArgumentParser, prefix: str = "taskwarden"):
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for choice in action._choices_actions:  # noqa: SLF001
                yield f"{prefix} {choice.dest}", choice
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{prefix} {name}")
        elif not isinstance(action, argparse._HelpAction):  # noqa: SLF001
            yield f"{prefix} {'/'.join(action.option_strings) or action.dest}", action


def test_every_help_entry_has_text() -> None:
    empty = [name for name, action in _actions(build_parser()) if not (action.help or "").strip()]
    assert empty == []


# -- serve --http, humans add ---------------------------------------------------------


def test_serve_http_on_a_busy_port_says_so_in_one_line(ws: Workspace) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        extras = {
            "serve": ["--allow-anonymous"],
            "inbox": [],
            # Refused before the guarded server starts.
            "guard": ["--allow-anonymous", "--", sys.executable, "-c", "pass"],
        }
        for command, extra in extras.items():
            proc = ws.cli(command, "--http", f"127.0.0.1:{port}", *extra, check=False, timeout=30)
            line = one_line_error(proc)
            assert proc.returncode == 2, command
            assert line == (
                f"taskwarden: port {port} on 127.0.0.1 is taken: another program listens there; "
                "pick another with --http HOST:PORT"
            )


async def test_humans_add_links_to_the_running_inbox_else_to_inbox_url(ws: Workspace) -> None:
    out = ws.cli("humans", "add", "maria").stdout
    assert "inbox_url from the config: no daemon runs for this database" in out
    assert "http://127.0.0.1:8765/inbox/signin/" in out
    async with http_server(ws, "--allow-anonymous") as base:
        out = ws.cli("humans", "add", "ana").stdout
        assert "the inbox of the running daemon" in out
        assert f"{base}/inbox/signin/" in out
        out = ws.cli("humans", "add", "bo", "--url", "https://inbox.example/inbox").stdout
        assert "address from --url" in out and "https://inbox.example/inbox/signin/" in out


# -- tasks cancel / logs / prune --------------------------------------------------------


def approval_policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent("""\
        default: allow
        tools:
          cancel-task:
            rules:
              - action: require_approval
                reason: "Cancelling needs a human"
                approval: {wait_s: 20, expires_s: 300}
        """))
    return path


async def test_tasks_cancel_goes_through_the_guard_as_the_operator(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, policy=approval_policy(tmp_path))
    try:
        async with stdio_client(ws) as client:
            task = await call(client, "spawn-task", {"prompt": "sleep 120"})
            # The operator is the person the rule wants: nobody else is waited for.
            out = ws.cli("tasks", "cancel", task["task_id"], "--reason", "wrong branch", "--as", "maria")
            assert out.stdout.strip() == f"{task['task_id']}: cancelled"
            after = await call(client, "get-task", {"task_id": task["task_id"]})
            assert after["status"] == "cancelled" and "wrong branch" in after["status_message"]
        [approval] = json.loads(ws.cli("approvals", "list", "--json").stdout)
        assert approval["decided_by"] == "maria" and approval["used_at"] is not None
        records = [json.loads(line) for line in ws.cli("audit", "--json", "--tool", "cancel-task").stdout.splitlines()]
        assert [(r["identity"], r["decision"], r["outcome"]) for r in records] == [("maria", "allow", "ok")]

        again = ws.cli("tasks", "cancel", task["task_id"], "tsk_nosuchtask", check=False)
        assert again.returncode == 1
        assert again.stdout.splitlines() == [f"{task['task_id']}: already finished", "tsk_nosuchtask: not found"]
        bad = ws.cli("tasks", "cancel", "not-an-id", check=False)
        assert one_line_error(bad).startswith("taskwarden: invalid_arguments: task_id")
    finally:
        stop_daemons(tmp_path)


async def test_cancelling_a_finished_task_changes_nothing_so_needs_no_approval(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, policy=approval_policy(tmp_path))
    try:
        async with stdio_client(ws) as client:
            done = await spawn_and_wait(client, "say finished")
            result = await client.call_tool("cancel-task", {"task_id": done["task_id"]})
            assert not result.is_error, text_of(result)
            assert result.structured_content["already_terminal"] == [done["task_id"]]
        assert json.loads(ws.cli("approvals", "list", "--json").stdout) == []
        [record] = [json.loads(x) for x in ws.cli("audit", "--json", "--tool", "cancel-task").stdout.splitlines()]
        assert record["decision"] == "allow" and "changes nothing" in record["reason"]
    finally:
        stop_daemons(tmp_path)


async def test_a_denied_approval_does_not_tell_the_agent_to_approve_it(tmp_path: Path) -> None:
    policy = approval_policy(tmp_path)
    policy.write_text(policy.read_text().replace("wait_s: 20", "wait_s: 1"))
    ws = Workspace(tmp_path, policy=policy)
    try:
        async with stdio_client(ws) as client:
            task = await call(client, "spawn-task", {"prompt": "sleep 120"})
            held = await client.call_tool("cancel-task", {"task_id": task["task_id"]})
            apr = held.structured_content["approval"]["id"]
            ws.cli("approvals", "deny", apr, "--reason", "keep it running")
            denied = await client.call_tool("cancel-task", {"task_id": task["task_id"]})
            assert denied.structured_content["error"] == "approval_denied"
            text = text_of(denied)
            assert "keep it running" in text
            assert "approvals approve" not in text and "approve it" not in text
            assert "can no longer be approved" in denied.structured_content["approval"]["how_to_approve"]
    finally:
        stop_daemons(tmp_path)


async def test_tasks_logs_prints_and_follows_a_log(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        done = await spawn_and_wait(client, "say first words")
        out = ws.cli("tasks", "logs", done["task_id"])
        assert "first words" in out.stdout
        running = await call(client, "spawn-task", {"prompt": "say early line\nsleep 2\nsay late line"})
        follow = ws.cli("tasks", "logs", running["task_id"], "--follow", timeout=60)
        # --follow returns once the task has ended, with everything it printed.
        assert "early line" in follow.stdout and "late line" in follow.stdout
        after = await call(client, "get-task", {"task_id": running["task_id"]})
        assert after["status"] == "completed"


async def test_tasks_prune_deletes_old_finished_sessions_their_logs_and_worktrees(ws: Workspace) -> None:
    subprocess.run(["git", "init", "-q", str(ws.work)], check=True)
    subprocess.run(["git", "-C", str(ws.work), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "root"], check=True)  # fmt: skip
    async with stdio_client(ws) as client:
        old = await spawn_and_wait(client, "say old", isolation="worktree")
        running = await call(client, "spawn-task", {"prompt": "sleep 60"})
        log = Path(json.loads(ws.cli("tasks", "show", old["task_id"], "--json").stdout)["worktree"])
        assert log.is_dir()
        old_log = Path(ws.cli("tasks", "show", old["task_id"]).stdout.split("log: ")[1].split()[0])
        assert old_log.is_file()
        await anyio.sleep(1.2)
        dry = ws.cli("tasks", "prune", "--older-than", "1s", "--dry-run")
        assert f"would delete session {old['session_id']}: 1 task(s), 1 log(s), worktree {log}" in dry.stdout
        assert old_log.is_file()
        out = ws.cli("tasks", "prune", "--older-than", "1s")
        assert f"deleted session {old['session_id']}" in out.stdout
        assert running["session_id"] not in out.stdout, "a running session is never pruned"
        assert not old_log.exists() and not log.exists()
        gone = ws.cli("tasks", "show", old["task_id"], check=False)
        assert gone.returncode == 1 and "no task" in gone.stderr
        assert (await call(client, "get-task", {"task_id": running["task_id"]}))["status"] == "working"
        branches = subprocess.run(["git", "-C", str(ws.work), "branch"], capture_output=True, text=True).stdout
        assert f"taskwarden/{old['session_id']}" in branches, "the branch keeps the session's commits"
        assert "Nothing to prune" in ws.cli("tasks", "prune", "--older-than", "30d").stdout


# -- workers ------------------------------------------------------------------------------


def test_workers_lists_profiles_with_install_state_version_and_limits(ws: Workspace) -> None:
    out = ws.cli("workers").stdout
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line and not line.startswith("*")}
    assert "yes" in lines["fake"] and str(sys.executable) in lines["fake"]
    assert "NO" in lines["missing"] and "no-such-agent-binary-xyz (not found on PATH)" in lines["missing"]
    data = {w["name"]: w for w in json.loads(ws.cli("workers", "--json").stdout)}
    assert data["fake"]["max_concurrent"] == 4 and data["fake"]["timeout_s"] == 600 and data["fake"]["default"]
    # The version of the program the profile starts (the fake agent's is Python's).
    assert data["fake"]["version"].startswith("Python 3.")
    assert data["missing"]["path"] is None


def test_the_default_worker_is_what_is_installed(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    config = tmp_path / "taskwarden.toml"
    config.write_text(f'db = "{tmp_path / "t.db"}"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    out = taskwarden("workers", "--config", str(config), env=env, cwd=tmp_path).stdout
    assert "shell *" in out and "codex and claude are not installed" in out
    fake_claude = bin_dir / "claude"
    fake_claude.write_text(f"#!/bin/sh\nexec {sys.executable} {FIXTURES / 'fake_agent.py'} \"$@\"\n")
    fake_claude.chmod(0o755)
    # (Asked for its version, the stand-in records a prompt in its working directory.)
    out = taskwarden("workers", "--config", str(config), env=env, cwd=tmp_path).stdout
    assert "claude *" in out and f"default worker: claude (found {fake_claude})" in out


async def test_agents_see_the_workers_and_a_missing_cli_is_refused_at_spawn(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        description = tools["spawn-task"].description
        assert "On this server: fake, shell, human (not installed: claude, codex, missing)." in description
        assert "(not installed:" in description and "missing" in description
        assert "Default: fake." in description
        refused = await client.call_tool("spawn-task", {"prompt": "hi", "worker": "missing"})
        assert refused.is_error
        assert "the missing worker is not installed on this server" in text_of(refused)


def test_a_client_outside_the_allowed_roots_is_warned_at_start(ws: Workspace, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere")
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    proc = subprocess.run(
        [sys.executable, "-m", "worker_server", "serve", "--config", str(ws.config)],
        input=json.dumps(init) + "\n", capture_output=True, text=True, timeout=60, env=ws.server_env(), cwd=outside,
    )  # fmt: skip
    assert json.loads(proc.stdout.splitlines()[0])["id"] == 1
    assert f"taskwarden: warning: this directory ({outside}) is outside allowed_roots" in proc.stderr
    inside = subprocess.run(
        [sys.executable, "-m", "worker_server", "serve", "--config", str(ws.config)],
        input=json.dumps(init) + "\n", capture_output=True, text=True, timeout=60, env=ws.server_env(), cwd=ws.work,
    )  # fmt: skip
    assert "outside allowed_roots" not in inside.stderr


# -- policy explain / check -----------------------------------------------------------------


def test_policy_explain_runs_the_servers_own_checks(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("default: allow\ntools:\n  spawn-task:\n    rules:\n      - action: allow\n")
    out = taskwarden("policy", "explain", str(policy), "--tool", "spawn-task",
                     "--args", '{"prompt": "x", "timeout_s": 999999}').stdout  # fmt: skip
    assert out.splitlines()[:3] == [
        "decision: deny", "rule: schema", "reason: invalid_arguments: timeout_s: must be <= 86400 (got 999999)"
    ]
    out = taskwarden("policy", "explain", str(policy), "--tool", "spwan-task", "--args", '{"prompt": "x"}').stdout
    assert out.splitlines()[:3] == [
        "decision: hidden", "rule: (none)", "reason: the server has no tool 'spwan-task' (did you mean 'spawn-task'?)"
    ]
    # Conditions see the defaults the tool fills in, as in the server.
    policy.write_text(textwrap.dedent("""\
        tools:
          spawn-task:
            rules:
              - action: deny
                reason: writing needs a person
                conditions: [{path: args.sandbox, op: eq, value: workspace-write}]
        """))
    out = taskwarden("policy", "explain", str(policy), "--tool", "spawn-task", "--args", '{"prompt": "x"}').stdout
    assert out.splitlines()[0] == "decision: deny" and "writing needs a person" in out
    # A policy for another server: its tools and bounds, or the rules alone.
    time_server = str(Path(sys.executable).with_name("mcp-server-time"))
    out = taskwarden("policy", "explain", str(policy), "--tool", "get_current_time", "--args", '{"timezone": 3}',
                     "--tools-from", "--", time_server).stdout  # fmt: skip
    assert out.splitlines()[:2] == ["decision: deny", "rule: schema"]
    out = taskwarden("policy", "explain", str(policy), "--tool", "get_current_time", "--policy-only").stdout
    assert out.splitlines()[0] == "decision: allow"


def test_policy_check_warns_about_names_that_are_not_tools_and_fails(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("tools:\n  cancel-tsk:\n    rules:\n      - action: deny\nhide: [spawn-task, lst-tasks]\n")
    out = taskwarden("policy", "check", str(policy))
    # A typo'd tool name fails a CI check: exit 1, not 0.
    assert out.returncode == 1
    assert out.stdout.splitlines()[0] == (
        f"WARNING: {policy} (taskwarden, 1 rule, default allow, mode enforce): 2 warnings"
    )
    assert out.stdout.splitlines()[1:] == [
        "warning: the policy has rules for 'cancel-tsk', which is not a tool of taskwarden "
        "(did you mean 'cancel-task'? it falls to default allow instead)",
        "warning: the policy hides 'lst-tasks', which is not a tool of taskwarden "
        "(did you mean 'list-tasks'? it falls to default allow instead)",
    ]
    time_server = str(Path(sys.executable).with_name("mcp-server-time"))
    other = taskwarden("policy", "check", str(policy), "--tools-from", "--", time_server)
    assert other.returncode == 1, other.stderr
    warned = other.stdout.splitlines()[1:]
    assert f"warning: the policy hides 'spawn-task', which is not a tool of {time_server}" in warned
    assert len(warned) == 3
    # Without warnings the check passes.
    policy.write_text("tools:\n  cancel-task:\n    rules:\n      - action: deny\n")
    clean = taskwarden("policy", "check", str(policy))
    assert clean.returncode == 0 and clean.stdout.startswith("OK: ")
