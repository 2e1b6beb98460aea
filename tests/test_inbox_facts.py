"""The task page's facts: usage, changes, worktree and budget use, when a task has them."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
from mcp import Client

from tests.support import Workspace
from worker_server.config import load_settings
from worker_server.inbox import views
from worker_server.app import open_app
from worker_server.server import build_mcp

pytestmark = pytest.mark.anyio

BUDGET = """\
    default: allow
    tools:
      spawn-task:
        rules:
          - action: allow
            budget: {tokens: 1000, window: day, scope: identity}
    """


async def test_the_task_page_shows_usage_changes_worktree_and_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(BUDGET))
    ws = Workspace(tmp_path, policy=policy)
    subprocess.run(["git", "init", "-q", str(ws.work)], check=True)
    subprocess.run(["git", "-C", str(ws.work), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "root"], check=True)  # fmt: skip
    monkeypatch.chdir(ws.work)
    async with open_app(load_settings(ws.config)) as app, Client(build_mcp(app)) as client:
        facts = {}
        for args in ({"prompt": "say done", "isolation": "worktree"},
                     {"prompt": "echo hello > notes.txt", "worker": "shell"}):  # fmt: skip
            task = (await client.call_tool("spawn-task", args)).structured_content
            await client.call_tool("wait-task", {"task_ids": task["task_id"], "timeout_s": 30})
            row = await app.store.get(task["task_id"])
            assert row.status.value == "completed", row.status_message
            facts[args["prompt"]] = dict((await views.task_page(app, "me", row)).facts)
    agent, shell = facts["say done"], facts["echo hello > notes.txt"]
    assert agent["Usage"].startswith("input tokens 1, output tokens 1")
    assert " (branch taskwarden/ses_" in agent["Worktree"] and Path(agent["Worktree"].split(" (")[0]).is_dir()
    assert agent["Budget"].startswith("spawn-task#1: used tokens 2 of 1,000 per day per identity")
    assert shell["Changes"] == "+1 -0: notes.txt (added)"
    assert "Worktree" not in shell and "Usage" in shell  # the shell worker reports only its run time
