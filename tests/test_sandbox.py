"""taskwarden's sandbox around worker turns (bubblewrap), seen from a real server.

Every test here runs real turns of the built-in ``shell`` profile (the prompt is
a shell script) inside the sandbox and looks at what they could and could not do.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.npm_tools import npm_bin
from tests.support import (
    Workspace,
    call,
    call_error,
    host_pid,
    marked_processes,
    pid_alive,
    stdio_client,
    wait_until,
)
from worker_server.config import ConfigError, Settings
from worker_server.sandbox import Sandbox, SandboxError, state_paths
from worker_server.app import worker_sandbox

pytestmark = pytest.mark.anyio

HELD_CANCEL = """\
default: allow
tools:
  cancel-task:
    rules:
      - action: require_approval
        reason: "Cancelling needs a human"
        approval: {wait_s: 0, expires_s: 600}
"""


def python_on_path() -> dict[str, str]:
    """Server environment with this interpreter's directory on ``$PATH``: a turn reaches
    the programs on its PATH even when they live under /tmp (a clone there, as in CI),
    which the turn's scratch otherwise covers."""
    return {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def cli_in_turn(ws: Workspace, *args: str) -> str:
    """A shell command that runs the taskwarden CLI against the workspace, as a worker would."""
    cmd = [sys.executable, "-m", "worker_server", *args, "--config", str(ws.config)]
    return shlex.join(cmd)


async def shell(client: object, ws: Workspace, script: str, timeout_s: float = 40) -> dict:
    task = await call(client, "spawn-task", {"prompt": script, "worker": "shell", "cwd": str(ws.work)})
    done = await call(client, "wait-task", {"task_ids": task["task_id"], "timeout_s": timeout_s})
    assert not done["timed_out"], done
    return done["tasks"][0]


async def log_of(client: object, task_id: str) -> str:
    result = await client.read_resource(f"task://{task_id}/log")  # type: ignore[attr-defined]
    return "".join(getattr(c, "text", "") for c in result.contents)


async def test_a_turn_cannot_read_or_write_the_database_but_writes_its_cwd(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    async with stdio_client(ws) as client:
        await call(client, "list-tasks")  # the database exists and is in use
        before = ws.db.read_bytes()
        db = shlex.quote(str(ws.db))
        script = textwrap.dedent(f"""\
            cat {db} > /dev/null && echo READ-DB
            echo junk >> {db} && echo WROTE-DB
            ls {shlex.quote(str(ws.db.parent))}
            echo made > inside.txt && echo WROTE-CWD
            touch /usr/taskwarden-probe && echo WROTE-ROOT
            touch /tmp/scratch-file && echo WROTE-TMP
            exit 0
            """)
        task = await shell(client, ws, script)
        assert task["status"] == "completed", task
        log = await log_of(client, task["task_id"])
        assert "WROTE-CWD" in log and "WROTE-TMP" in log
        assert "READ-DB" not in log and "WROTE-DB" not in log and "WROTE-ROOT" not in log
        assert "taskwarden.db" not in log.splitlines(), "the database's directory shows only mount points"
        assert (ws.work / "inside.txt").read_text() == "made\n"
        assert not Path("/usr/taskwarden-probe").exists()
        assert ws.db.read_bytes()[:100] == before[:100]
        assert b"junk" not in ws.db.read_bytes()


async def test_a_turn_cannot_approve_its_own_held_call_and_the_approval_stays_pending(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(HELD_CANCEL)
    ws = Workspace(tmp_path, policy=policy, env=python_on_path())
    async with stdio_client(ws) as client:
        victim = await call(client, "spawn-task", {"prompt": "sleep 120"})
        held = (await call_error(client, "cancel-task", {"task_id": victim["task_id"]})).structured_content
        assert held["error"] == "approval_required"
        approval_id = held["approval"]["id"]

        script = cli_in_turn(ws, "approvals", "approve", approval_id) + "; echo EXIT=$?"
        task = await shell(client, ws, script)
        log = await log_of(client, task["task_id"])
        assert "EXIT=0" not in log
        assert "refused: this request comes from inside the worker turn" in log, task

        [approval] = json.loads(ws.cli("approvals", "list", "--json").stdout)
        assert approval["id"] == approval_id and approval["status"] == "pending"
        still = (await call_error(client, "cancel-task", {"task_id": victim["task_id"]})).structured_content
        assert still["error"] == "approval_required"
        assert (await call(client, "get-task", {"task_id": victim["task_id"]}))["status"] == "working"


async def test_without_the_sandbox_a_decision_from_inside_a_turn_is_still_refused(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(HELD_CANCEL)
    ws = Workspace(tmp_path, policy=policy)
    ws.config.write_text(ws.config.read_text().replace('identity = "tester"', 'identity = "tester"\nsandbox_backend = "none"'))
    async with stdio_client(ws) as client:
        victim = await call(client, "spawn-task", {"prompt": "sleep 120"})
        held = (await call_error(client, "cancel-task", {"task_id": victim["task_id"]})).structured_content
        approval_id = held["approval"]["id"]
        # The database is in reach here: only the process-tree check stands
        # in the way, even for a CLI started with an empty environment.
        script = (
            "env -i " + cli_in_turn(ws, "approvals", "approve", approval_id) + "; echo EXIT=$?; "
            + cli_in_turn(ws, "humans", "add", "mallory") + "; echo ADD-EXIT=$?"
        )
        task = await shell(client, ws, script)
        log = await log_of(client, task["task_id"])
        assert "EXIT=3" in log and "ADD-EXIT=3" in log, log
        assert f"inside the worker turn of task {task['task_id']}" in log
        assert "/inbox/signin/" not in log, "no sign-in link was minted"
        [approval] = json.loads(ws.cli("approvals", "list", "--json").stdout)
        assert approval["status"] == "pending"
        # Outside any turn, a person decides as before.
        assert ws.cli("approvals", "approve", approval_id).returncode == 0


async def test_cancel_gives_the_sandboxed_worker_its_grace_and_leaves_no_process(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    escapee_file, child_file = ws.work / "escapee.pid", ws.work / "child.pid"
    script = textwrap.dedent(f"""\
        trap 'echo graceful > {ws.work}/term; exit 0' TERM
        setsid env -i /bin/sh -c 'trap "" TERM; exec sleep 300' &
        echo $! > {escapee_file}
        sleep 300 &
        echo $! > {child_file}
        wait
        """)
    async with stdio_client(ws) as client:
        task = await call(client, "spawn-task", {"prompt": script, "worker": "shell", "cwd": str(ws.work)})
        await wait_until(lambda: child_file.exists() and child_file.read_text() and escapee_file.read_text())
        pids = [host_pid(task["task_id"], int(f.read_text())) for f in (escapee_file, child_file)]
        assert all(pid_alive(p) for p in pids)
        result = await call(client, "cancel-task", {"task_id": task["task_id"]})
        assert result["cancelled"] == [task["task_id"]]
        assert (ws.work / "term").read_text() == "graceful\n", "the worker got SIGTERM and time to finish"
        assert not any(pid_alive(p) for p in pids)
        assert not marked_processes(task["task_id"])
        assert (await call(client, "get-task", {"task_id": task["task_id"]}))["status"] == "cancelled"


async def test_codex_own_sandbox_works_inside_taskwardens(tmp_path: Path) -> None:
    codex = npm_bin("codex")
    # Codex will not put its helper binaries under the temporary directory.
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="taskwarden-codex-home-") as home:
        ws = Workspace(
            tmp_path,
            extra=textwrap.dedent(f"""
                [workers.codex-sandbox]
                command = [{json.dumps(str(codex))}, "sandbox", "-P", ":workspace", "-C", "{{cwd}}", "--",
                           "/bin/sh", "-c", "{{prompt}}"]
                prompt = "arg"
                events = "text"
                state_dirs = [{json.dumps(home)}]
                env = {{ CODEX_HOME = {json.dumps(home)} }}
                """),
        )
        outside = Path(home) / "outside-the-workspace"
        async with stdio_client(ws) as client:
            task = await call(client, "spawn-task", {
                "prompt": f"touch made-in-codex && echo CWD-OK; touch {outside} && echo WROTE-OUTSIDE; exit 0",
                "worker": "codex-sandbox",
                "cwd": str(ws.work),
            })
            done = (await call(client, "wait-task", {"task_ids": task["task_id"], "timeout_s": 50}))["tasks"][0]
            log = await log_of(client, task["task_id"])
            assert done["status"] == "completed", log
            assert "CWD-OK" in log and "WROTE-OUTSIDE" not in log, log
            assert (ws.work / "made-in-codex").exists()
            assert not outside.exists(), "codex's own sandbox kept its write policy"


def test_sandbox_none_must_be_chosen_and_is_a_warning_at_every_start(caplog: pytest.LogCaptureFixture) -> None:
    assert Settings().sandbox_backend == "bwrap"
    with caplog.at_level(logging.WARNING, logger="worker_server.app"):
        sandbox = worker_sandbox(Settings(sandbox_backend="none"))
    assert not sandbox.enabled
    assert any('sandbox_backend = "none"' in r.getMessage() for r in caplog.records)


def test_a_server_without_bwrap_refuses_to_start_and_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxError, match="apt install bubblewrap"):
        Sandbox.create("bwrap")
    with pytest.raises(ConfigError, match='sandbox_backend = "none"'):
        worker_sandbox(Settings(sandbox_backend="bwrap"))
    ws = Workspace(tmp_path / "ws")
    env = {**ws.server_env(), "PATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "worker_server", "serve", "--config", str(ws.config)],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "bwrap is not installed" in proc.stderr
    assert proc.stdout == ""


def test_mounts_nest_by_depth_and_hidden_paths_win(tmp_path: Path) -> None:
    data = tmp_path / "state"
    work = data / "work"
    work.mkdir(parents=True)
    secret = tmp_path / "netrc"
    secret.write_text("machine example login me password hunter2\n")
    sandbox = Sandbox(
        backend="bwrap", executable="/usr/bin/bwrap", hidden=(data, secret, tmp_path / "absent"), uid=1000
    )
    argv = sandbox.wrap(["true"], cwd=work, scratch=tmp_path / "scratch", state_paths=())
    # The hidden directory is mounted before the cwd inside it, so the cwd shows through.
    assert argv.index("--tmpfs") < argv.index(str(work))
    assert argv[argv.index("--remount-ro") + 1] == str(data)
    # A hidden file reads as empty; a hidden path that does not exist is left alone.
    assert argv[argv.index("/dev/null") + 1] == str(secret)
    assert str(tmp_path / "absent") not in argv
    assert "--uid" not in argv
    with pytest.raises(SandboxError, match="taskwarden's own data directory"):
        sandbox.wrap(["true"], cwd=data, scratch=None)
    as_root = Sandbox(backend="bwrap", executable="/usr/bin/bwrap", uid=0).wrap(["true"], cwd=work, scratch=None)
    assert as_root[as_root.index("--uid") + 1] == "65534"


async def test_a_hidden_file_reads_empty_inside(tmp_path: Path) -> None:
    secret = tmp_path / "netrc"
    secret.write_text("machine example login me password hunter2\n")
    ws = Workspace(tmp_path)
    ws.config.write_text(
        ws.config.read_text().replace('identity = "tester"', f'identity = "tester"\nsandbox_hide = ["{secret}"]')
    )
    async with stdio_client(ws) as client:
        task = await shell(client, ws, f"cat {secret}; echo END")
        log = await log_of(client, task["task_id"])
        assert "END" in log and "hunter2" not in log


async def test_an_inbox_decision_sent_from_inside_a_turn_is_refused(tmp_path: Path) -> None:
    from mcp import Client

    from tests.inbox_support import csrf_of, signed_in_client
    from tests.support import http_server

    policy = tmp_path / "policy.yaml"
    policy.write_text(HELD_CANCEL)
    ws = Workspace(tmp_path, policy=policy, env=python_on_path())
    async with http_server(ws, "--allow-anonymous") as base:
        async with Client(f"{base}/mcp") as client, signed_in_client(ws, base) as http:
            victim = await call(client, "spawn-task", {"prompt": "sleep 120"})
            held = (await call_error(client, "cancel-task", {"task_id": victim["task_id"]})).structured_content
            approval_id = held["approval"]["id"]
            csrf = csrf_of((await http.get(f"/inbox/approvals/{approval_id}")).text)
            # A worker that got hold of a person's signed-in cookie (say, from a
            # browser profile it can read) posts the decision itself.
            cookie = "; ".join(f"{name}={value}" for name, value in http.cookies.items())
            post = textwrap.dedent(f"""\
                import urllib.error, urllib.parse, urllib.request
                body = urllib.parse.urlencode({{"csrf": {csrf!r}}}).encode()
                request = urllib.request.Request({base + "/inbox/approvals/" + approval_id + "/approve"!r},
                                                 data=body, headers={{"Cookie": {cookie!r}}})
                try:
                    print("STATUS", urllib.request.urlopen(request).status)
                except urllib.error.HTTPError as exc:
                    print("STATUS", exc.code, exc.read().decode()[:2000])
                """)
            task = await shell(client, ws, f"{shlex.quote(sys.executable)} -c {shlex.quote(post)}")
            log = await log_of(client, task["task_id"])
            assert "STATUS 403" in log, log
            assert "inside the worker turn of task" in log
            [approval] = json.loads(ws.cli("approvals", "list", "--json").stdout)
            assert approval["status"] == "pending"
            # The same form from the person's own client (outside any turn) decides.
            decided = await http.post(f"/inbox/approvals/{approval_id}/approve", data={"csrf": csrf})
            assert decided.status_code == 303
            [approval] = json.loads(ws.cli("approvals", "list", "--json").stdout)
            assert approval["status"] == "approved"


async def test_a_turn_commits_in_its_repository_and_linked_worktree_but_cannot_plant_hooks(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    repo, linked = ws.work / "repo", ws.work / "linked"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "root"], check=True)
    subprocess.run([*git, "-C", str(repo), "worktree", "add", "-q", str(linked)], check=True)
    # Each commit says where it was made: two identical commits in one second would be one.
    commit = shlex.join([*git, "commit", "-q", "--allow-empty", "-m"]) + ' "from the turn in $PWD"'

    plant = "echo 'touch /tmp/pwned' > {d}/hooks/post-checkout && echo PLANTED; echo '[core] fsmonitor = evil' >> {d}/config && echo CONFIGURED"
    async with stdio_client(ws) as client:
        for cwd, git_dir in ((repo, repo / ".git"), (linked, repo / ".git")):
            script = f"{commit} && echo COMMITTED; {plant.format(d=shlex.quote(str(git_dir)))}; exit 0"
            task = await call(client, "spawn-task", {"prompt": script, "worker": "shell", "cwd": str(cwd)})
            done = (await call(client, "wait-task", {"task_ids": task["task_id"], "timeout_s": 40}))["tasks"][0]
            log = await log_of(client, task["task_id"])
            assert done["status"] == "completed", log
            assert "COMMITTED" in log, log
            assert "PLANTED" not in log and "CONFIGURED" not in log, log
    subjects = subprocess.run(["git", "-C", str(repo), "log", "--all", "--format=%s"], capture_output=True, text=True)
    assert sorted(subjects.stdout.split("\n")[:2]) == [f"from the turn in {linked}", f"from the turn in {repo}"]
    assert not (repo / ".git" / "hooks" / "post-checkout").exists()
    assert "evil" not in (repo / ".git" / "config").read_text()


def test_state_dirs_expand_home_and_the_turns_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    found = state_paths(
        ["~/.codex", "$CODEX_HOME", "${UNSET_FOR_SURE}/x", "~/.claude.json"], {"CODEX_HOME": str(tmp_path / "ch")}
    )
    assert found == [tmp_path / "home" / ".codex", tmp_path / "ch", tmp_path / "home" / ".claude.json"]
    assert (tmp_path / "home" / ".codex").is_dir() and (tmp_path / "ch").is_dir()
    assert not (tmp_path / "home" / ".claude.json").exists(), "a missing file is not invented"


async def test_a_worker_installed_under_tmp_still_runs_and_its_files_stay_read_only(tmp_path: Path) -> None:
    """The scratch /tmp must not shadow the program a turn runs: a checkout, a venv or
    node_modules under /tmp (as in a CI clone) stays visible inside, read-only."""
    install = Path(tempfile.mkdtemp(dir="/tmp", prefix="taskwarden-worker-install-"))
    try:
        agent = install / "bin" / "agent.sh"
        agent.parent.mkdir()
        agent.write_text("#!/bin/sh\necho \"agent ran: $1\"\ntouch \"$0.written\" 2>/dev/null && echo WROTE-INSTALL\nexit 0\n")
        agent.chmod(0o755)
        ws = Workspace(
            tmp_path / "ws",
            extra=textwrap.dedent(f"""
                [workers.tmp-agent]
                command = [{json.dumps(str(agent))}, "{{prompt}}"]
                prompt = "arg"
                events = "text"
                """),
        )
        async with stdio_client(ws) as client:
            task = await call(client, "spawn-task", {"prompt": "hello", "worker": "tmp-agent", "cwd": str(ws.work)})
            done = (await call(client, "wait-task", {"task_ids": task["task_id"], "timeout_s": 40}))["tasks"][0]
            log = await log_of(client, task["task_id"])
        assert done["status"] == "completed", log
        assert "agent ran: hello" in log and "WROTE-INSTALL" not in log, log
        assert not Path(f"{agent}.written").exists()
    finally:
        subprocess.run(["rm", "-rf", str(install)], check=False)


def test_only_the_program_and_the_files_it_names_stay_visible_behind_the_scratch(tmp_path: Path) -> None:
    # tmp_path lies under /tmp, which the scratch covers inside the sandbox.
    install = tmp_path / "clone" / "fixtures"
    install.mkdir(parents=True)
    script = install / "worker.py"
    script.write_text("print('hi')\n")
    work = tmp_path / "work"
    work.mkdir()
    sandbox = Sandbox(backend="bwrap", executable="/usr/bin/bwrap", uid=1000)
    top = Path("/tmp") / tmp_path.relative_to("/tmp").parts[0]
    argv = sandbox.wrap(["python3", str(script)], cwd=work, scratch=tmp_path / "scratch", search_path="/usr/bin")
    assert argv[argv.index(str(top)) - 1] == "--ro-bind", "the script's top stays visible, read-only"
    # A directory argument (here the cwd, as Codex's `-C` names it) exposes nothing: the
    # host's view of /tmp would show other turns' scratch and confuse Codex's own sandbox.
    argv = sandbox.wrap(["codex", "-C", str(work)], cwd=work, scratch=tmp_path / "scratch", search_path="/usr/bin")
    assert str(top) not in argv
    assert argv[argv.index(str(work)) - 1] == "--bind"


async def test_a_signed_decision_link_posted_from_inside_a_turn_is_refused_and_stays_unused(tmp_path: Path) -> None:
    from mcp import Client

    from tests.support import http_server
    from worker_server.notify.links import LinkSigner

    policy = tmp_path / "policy.yaml"
    policy.write_text(HELD_CANCEL)
    ws = Workspace(tmp_path, policy=policy, env=python_on_path())
    async with http_server(ws, "--allow-anonymous") as base:
        ws.cli("humans", "add", "ann", "--role", "approver")
        async with Client(f"{base}/mcp") as client:
            victim = await call(client, "spawn-task", {"prompt": "sleep 120"})
            held = (await call_error(client, "cancel-task", {"task_id": victim["task_id"]})).structured_content
            approval_id = held["approval"]["id"]
            # A worker that read a notification (say, a mailbox it can reach) posts its link.
            link = LinkSigner.for_file(ws.db).url(f"{base}/inbox", approval_id, "ann", 4_000_000_000)
            post = textwrap.dedent(f"""\
                import urllib.error, urllib.parse, urllib.request
                body = urllib.parse.urlencode({{"decision": "approve"}}).encode()
                try:
                    print("STATUS", urllib.request.urlopen(urllib.request.Request({link!r}, data=body)).status)
                except urllib.error.HTTPError as exc:
                    print("STATUS", exc.code, exc.read().decode()[:2000])
                """)
            script = f"{shlex.quote(sys.executable)} -c {shlex.quote(post)}; " + cli_in_turn(
                ws, "notify", "list") + "; echo NOTIFY-EXIT=$?"  # fmt: skip
            task = await shell(client, ws, script)
            log = await log_of(client, task["task_id"])
            assert "STATUS 403" in log and "inside the worker turn of task" in log, log
            assert "NOTIFY-EXIT=3" in log
            [approval] = json.loads(ws.cli("approvals", "list", "--json").stdout)
            assert approval["status"] == "pending"
            # The link was not spent: the person it was made for still decides with it.
            import httpx

            async with httpx.AsyncClient() as http:
                decided = await http.post(link, data={"decision": "approve"})
            assert decided.status_code == 200 and "Approved" in decided.text
            [approval] = json.loads(ws.cli("approvals", "list", "--json").stdout)
            assert approval["status"] == "approved" and approval["decided_by"] == "ann"
