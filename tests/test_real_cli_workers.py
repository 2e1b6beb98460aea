"""The built-in codex and claude workers, running the real CLIs against the fake model.

Each test drives a real ``taskwarden serve`` over stdio; the workers are
``codex exec`` (@openai/codex 0.171.0) and ``claude -p``
(@anthropic-ai/claude-code 2.1.332) exactly as the built-in profiles run
them. The only stand-in is the model server (fixtures/fake_model.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fixtures.fake_model import FakeModel
from tests.real_cli import cli_workspace, processes_of, tool_outputs
from tests.support import Workspace, call, call_error, spawn_and_wait, stdio_client, text_of, wait_until

pytestmark = pytest.mark.anyio

CLIS = ["codex", "claude"]


@pytest.fixture
def model() -> Iterator[FakeModel]:
    with FakeModel() as fake:
        yield fake


@pytest.fixture
def ws(tmp_path: Path, model: FakeModel) -> Workspace:
    return cli_workspace(tmp_path, model)


def git_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for args in (
        ["init", "-q", "-b", "main"],
        ["config", "user.email", "t@example.com"],
        ["config", "user.name", "T"],
    ):
        subprocess.run(["git", *args], cwd=path, check=True)
    (path / "README.md").write_text("one\ntwo\n")
    subprocess.run(["git", "add", "."], cwd=path, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "start"], cwd=path, check=True)
    return path


@pytest.mark.parametrize("cli", CLIS)
async def test_a_turn_answers_with_usage(cli: str, ws: Workspace, model: FakeModel) -> None:
    mark = model.script("hello", [{"reply": "turn {turn}: {prompts}", "usage": {"input_tokens": 1000,
                                                                               "cached_input_tokens": 100}}])
    async with stdio_client(ws) as client:
        done = await spawn_and_wait(client, f"{mark} say hello", worker=cli, cwd=str(ws.work))
        assert done["status"] == "completed", done
        assert done["output"]["final"] == "turn 1: say hello"
        assert done["exit_code"] == 0
        usage = done["usage"]
        # Codex counts cached input inside input_tokens; Claude apart (taskwarden adds it back).
        assert usage["input_tokens"] == (1000 if cli == "codex" else 1100)
        assert usage["cached_input_tokens"] == 100
        assert usage["output_tokens"] == 30
        assert usage["worker_s"] > 0
        if cli == "claude":
            assert usage["cost_usd"] > 0  # Claude Code computes a cost; Codex does not
        else:
            assert usage["cost_usd"] is None and usage["reasoning_tokens"] == 5
        listed = await call(client, "list-tasks", {})
        assert listed["tasks"][0]["usage"] == usage
        # The work comes first in the tail, not Codex's start-up warnings.
        assert done["output"]["tail"].splitlines()[0] == "turn 1: say hello"
    shown = ws.cli("tasks", "show", done["task_id"]).stdout
    assert f"input_tokens {usage['input_tokens']}" in shown and "worker_s" in shown
    table = ws.cli("tasks", "list").stdout
    assert "tok" in table and done["task_id"] in table
    assert len(model.scripted("hello")) == 1


@pytest.mark.parametrize("cli", CLIS)
async def test_message_task_resumes_the_same_cli_session(cli: str, ws: Workspace, model: FakeModel) -> None:
    mark = model.script("memory", [{"reply": "turn {turn}: {prompts}"}])
    async with stdio_client(ws) as client:
        first = await spawn_and_wait(client, f"{mark} remember heron", worker=cli, cwd=str(ws.work))
        assert first["output"]["final"] == "turn 1: remember heron"
        second = await call(client, "message-task", {"task_id": first["task_id"], "message": f"{mark} which bird?"})
        assert second["session_id"] == first["session_id"]
        done = (await call(client, "wait-task", {"task_ids": second["task_id"], "timeout_s": 40}))["tasks"][0]
        assert done["status"] == "completed", done
        # The model saw turn 1 in the history the CLI resumed.
        assert done["output"]["final"] == "turn 2: remember heron | which bird?"
        detail = await call(client, "get-task", {"task_id": second["task_id"]})
        per_turn = [t["usage"]["output_tokens"] for t in detail["turns"]]
        assert detail["session_usage"]["output_tokens"] == sum(per_turn) > 0


@pytest.mark.parametrize("cli", CLIS)
async def test_a_turn_writes_inside_cwd_and_reports_the_change(
    cli: str, tmp_path: Path, ws: Workspace, model: FakeModel
) -> None:
    repo = git_repo(ws.work / "repo")
    steps = [{"shell": "printf 'hello\\n' > notes.txt && printf 'one\\n' > README.md"}, {"reply": "wrote notes"}]
    if cli == "claude":  # Claude edits files with its Write tool
        steps = [{"claude_tool": "Write", "input": {"file_path": str(repo / "notes.txt"), "content": "hello\n"}},
                 {"claude_tool": "Write", "input": {"file_path": str(repo / "README.md"), "content": "one\n"}},
                 {"reply": "wrote notes"}]  # fmt: skip
    mark = model.script("write", steps)
    async with stdio_client(ws) as client:
        done = await spawn_and_wait(client, f"{mark} write notes", worker=cli, cwd=str(repo))
        assert done["status"] == "completed", done
        assert (repo / "notes.txt").read_text() == "hello\n", tool_outputs(model, "write")
        assert done["changes"] == {
            "files": [
                {"path": "README.md", "status": "modified", "insertions": 0, "deletions": 1},
                {"path": "notes.txt", "status": "added", "insertions": 1, "deletions": 0},
            ],
            "insertions": 1,
            "deletions": 1,
            "truncated": False,
        }
        assert done["options"] == {"sandbox": "workspace-write"}  # the default

        # sandbox=read-only: the same turn cannot write.
        (repo / "notes.txt").unlink()
        model.script("write", steps)
        again = await spawn_and_wait(client, f"{mark} write notes", worker=cli, cwd=str(repo), sandbox="read-only")
        assert again["status"] == "completed", again
        assert not (repo / "notes.txt").exists()
        assert again["options"] == {"sandbox": "read-only"}


@pytest.mark.parametrize("cli", CLIS)
async def test_a_cut_stream_the_cli_recovers_from_completes(cli: str, ws: Workspace, model: FakeModel) -> None:
    mark = model.script("cut", [{"reply": "answer after a reconnect", "cut_first": 1}])
    async with stdio_client(ws) as client:
        done = await spawn_and_wait(client, f"{mark} go", worker=cli, cwd=str(ws.work))
        assert done["status"] == "completed", done
        assert done["output"]["final"] == "answer after a reconnect"
        if cli == "codex":  # Codex says so as a top-level error event: activity, not failure
            assert "error: Reconnecting... 1/3" in done["output"]["tail"]
    assert len(model.scripted("cut")) == 2  # the cut attempt and the retry


@pytest.mark.parametrize("cli", CLIS)
async def test_a_server_error_is_retried_by_the_cli(cli: str, ws: Workspace, model: FakeModel) -> None:
    mark = model.script("flaky", [{"reply": "fine now", "fail_first": [500]}])
    async with stdio_client(ws) as client:
        done = await spawn_and_wait(client, f"{mark} go", worker=cli, cwd=str(ws.work))
        assert done["status"] == "completed", done
        assert done["output"]["final"] == "fine now"


@pytest.mark.parametrize("cli", CLIS)
async def test_a_permanent_api_error_fails_with_the_apis_message(cli: str, ws: Workspace, model: FakeModel) -> None:
    mark = model.script("bad", [{"error": 400, "message": "model 'nope-1' does not exist"}])
    async with stdio_client(ws) as client:
        done = await spawn_and_wait(client, f"{mark} go", worker=cli, cwd=str(ws.work), model="nope-1")
        assert done["status"] == "failed", done
        assert "model 'nope-1' does not exist" in done["status_message"]
        assert done["exit_code"] == 1
    # The model name went through to the API as given.
    assert {r.body.get("model") for r in model.scripted("bad")} == {"nope-1"}


@pytest.mark.parametrize("cli", CLIS)
async def test_cancel_during_a_model_stall_leaves_no_process(cli: str, ws: Workspace, model: FakeModel) -> None:
    mark = model.script("stall", [{"stall": 120}])
    async with stdio_client(ws) as client:
        task = await call(client, "spawn-task", {"prompt": f"{mark} go", "worker": cli, "cwd": str(ws.work)})
        await wait_until(lambda: model.scripted("stall"), timeout=30)
        assert processes_of(task["task_id"])
        result = await call(client, "cancel-task", {"task_id": task["task_id"], "reason": "enough"})
        assert result["cancelled"] == [task["task_id"]]
        done = await call(client, "get-task", {"task_id": task["task_id"]})
        assert done["status"] == "cancelled"
        assert done["status_message"] == "cancelled: enough"
        assert processes_of(task["task_id"]) == []


def sleepers(cwd: Path) -> list[psutil.Process]:
    """The test's ``sleep 97.5`` commands running in ``cwd`` (Codex runs tools in a pid namespace,
    so the command cannot report its own pid)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.cmdline() == ["sleep", "97.5"] and proc.cwd() == str(cwd) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("cli", CLIS)
async def test_cancel_during_a_tool_command_leaves_no_process(cli: str, ws: Workspace, model: FakeModel) -> None:
    # Claude Code refuses a bare `sleep N`; a command that also does something runs.
    mark = model.script("tool", [{"shell": "echo waiting && sleep 97.5"}, {"reply": "slept"}])
    async with stdio_client(ws) as client:
        task = await call(client, "spawn-task", {"prompt": f"{mark} go", "worker": cli, "cwd": str(ws.work)})
        await wait_until(lambda: sleepers(ws.work), timeout=30)
        result = await call(client, "cancel-task", {"task_id": task["task_id"]})
        assert result["cancelled"] == [task["task_id"]]
        assert processes_of(task["task_id"]) == []
        assert sleepers(ws.work) == [], "the tool command outlived its cancelled turn"


@pytest.mark.parametrize("cli", CLIS)
async def test_model_and_effort_reach_the_model(cli: str, ws: Workspace, model: FakeModel) -> None:
    mark = model.script("opts", [{"reply": "ok"}])
    async with stdio_client(ws) as client:
        done = await spawn_and_wait(
            client, f"{mark} go", worker=cli, cwd=str(ws.work), model="my-model-7", effort="high"
        )
        assert done["status"] == "completed", done
        assert done["options"] == {"model": "my-model-7", "effort": "high", "sandbox": "workspace-write"}
    body = model.scripted("opts")[0].body
    assert body["model"] == "my-model-7"
    if cli == "codex":
        assert body["reasoning"]["effort"] == "high"
    else:
        assert "high" in str(body.get("output_config")) + str(body.get("thinking"))


async def test_worker_options_are_checked_against_the_profile(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        refused = await call_error(client, "spawn-task", {"prompt": "ls", "worker": "shell", "model": "x"})
        assert refused.structured_content["error"] == "invalid_arguments"
        assert refused.structured_content["field"] == "model"
        assert "the shell worker does not take model" in text_of(refused)
        refused = await call_error(client, "spawn-task", {"prompt": "go", "worker": "codex", "model": "--yolo"})
        assert refused.structured_content["field"] == "model"
        refused = await call_error(client, "spawn-task", {"prompt": "go", "worker": "codex", "effort": "extreme"})
        assert "effort" in text_of(refused)
        refused = await call_error(client, "spawn-task", {"prompt": "go", "worker": "claude", "sandbox": "anything"})
        assert "sandbox" in text_of(refused)


async def test_a_worker_whose_cli_is_missing_is_refused_at_spawn(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    ws.env["PATH"] = "/usr/bin:/bin"  # no npm CLIs here
    async with stdio_client(ws) as client:
        refused = await call_error(client, "spawn-task", {"prompt": "go", "worker": "codex"})
        assert text_of(refused).startswith("invalid_arguments: worker: codex CLI not found on PATH")
        listed = await call(client, "list-tasks", {})
        assert listed["tasks"] == []


@pytest.mark.parametrize("cli", CLIS)
async def test_worktree_isolation_runs_every_turn_in_its_own_worktree(
    cli: str, ws: Workspace, model: FakeModel
) -> None:
    repo = git_repo(ws.work / "repo")
    name = "wt.txt"
    mark = model.script("wt", [{"shell": f"pwd > {name}"}, {"reply": "done"}])
    async with stdio_client(ws) as client:
        first = await spawn_and_wait(client, f"{mark} go", worker=cli, cwd=str(repo), isolation="worktree")
        assert first["status"] == "completed", first
        branch, worktree = first["branch"], Path(first["worktree"])
        assert branch == f"taskwarden/{first['session_id']}"
        assert worktree != repo and (worktree / name).read_text().strip() == str(worktree)
        assert not (repo / name).exists()  # the user's checkout is untouched
        assert first["changes"]["files"] == [{"path": name, "status": "added", "insertions": 1, "deletions": 0}]
        branches = subprocess.run(["git", "branch", "--list", branch], cwd=repo, capture_output=True, text=True)
        assert branch in branches.stdout

        second = await call(client, "message-task", {"task_id": first["task_id"], "message": f"{mark} again"})
        done = (await call(client, "wait-task", {"task_ids": second["task_id"], "timeout_s": 40}))["tasks"][0]
        assert done["worktree"] == str(worktree) and done["status"] == "completed"

        plain = ws.work / "plain"
        plain.mkdir()
        refused = await call_error(
            client, "spawn-task", {"prompt": "go", "worker": cli, "cwd": str(plain), "isolation": "worktree"}
        )
        assert refused.structured_content["field"] == "isolation"
        assert "git work tree" in text_of(refused)



async def test_a_policy_can_narrow_the_worker_options(tmp_path: Path, model: FakeModel) -> None:
    policy = tmp_path / "read-only.yaml"
    policy.write_text(
        'version: "1"\n'
        "default: allow\n"
        "tools:\n"
        "  spawn-task:\n"
        "    rules:\n"
        "      - action: deny\n"
        "        reason: workers here may only read\n"
        "        conditions:\n"
        "          - {path: args.sandbox, op: neq, value: read-only}\n"
    )
    ws = cli_workspace(tmp_path, model, policy=policy)
    mark = model.script("narrow", [{"reply": "looked"}])
    async with stdio_client(ws) as client:
        denied = await call_error(client, "spawn-task", {"prompt": f"{mark} go", "worker": "codex"})
        assert denied.structured_content["error"] == "policy_denied"
        assert "workers here may only read" in text_of(denied)
        done = await spawn_and_wait(client, f"{mark} go", worker="codex", sandbox="read-only")
        assert done["status"] == "completed" and done["options"] == {"sandbox": "read-only"}
