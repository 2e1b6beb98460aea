"""The real Codex and Claude Code CLIs as taskwarden's MCP clients, configured as the README says.

The fake model scripts what a model would do: Claude Code finds the deferred
MCP tools with its ToolSearch tool, Codex sees them as the ``mcp__taskwarden``
namespace; both then call spawn-task and wait-task. The calls go through a
real ``taskwarden serve`` that each CLI starts itself, and land in the audit
trail. The configurations are read out of README.md, so the README shows
exactly what was tested.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.fake_model import FakeModel
from tests.real_cli import cli_env, codex_config
from tests.support import ROOT, Workspace

PLACEHOLDER = "/absolute/path/to/taskwarden/.venv/bin/taskwarden"
README = ROOT / "README.md"
# `claude -p` cannot ask a person before a tool call; the README says to allow taskwarden's.
CLAUDE_PRINT_FLAGS = ["--allowedTools", "mcp__taskwarden"]


def readme_block(heading: str, lang: str) -> str:
    """The first ``lang`` code block after the heading that starts with ``heading``."""
    text = README.read_text()
    start = text.index(heading)
    found = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert found, f"no {lang} block after {heading!r} in README.md"
    return found.group(1)


def taskwarden_bin() -> str:
    path = Path(sys.executable).parent / "taskwarden"
    assert path.exists(), f"{path} is missing: pip install -e . in this virtual environment"
    return str(path)


@pytest.fixture
def model() -> FakeModel:
    with FakeModel() as fake:
        yield fake


def client_env(tmp_path: Path, model: FakeModel) -> tuple[Workspace, dict[str, str]]:
    """A workspace whose config is the user's own (``~/.config/taskwarden/config.toml``),
    so the README's ``args = ["serve"]`` finds it; the shell worker runs the tasks."""
    ws = Workspace(tmp_path, policy=None)  # the built-in default policy
    env = {**ws.server_env(), **cli_env(tmp_path, model)}
    env.pop("XDG_CONFIG_HOME", None)
    config_dir = Path(env["HOME"]) / ".config" / "taskwarden"
    config_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ws.config, config_dir / "config.toml")
    return ws, env


def run_cli(argv: list[str], prompt: str, env: dict[str, str], cwd: Path) -> list[dict]:
    proc = subprocess.run(argv, input=prompt, capture_output=True, text=True, env=env, cwd=cwd, timeout=180)
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def audited(ws: Workspace) -> list[dict]:
    out = ws.cli("audit", "--json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_codex_exec_calls_taskwarden_as_the_readme_configures_it(tmp_path: Path, model: FakeModel) -> None:
    ws, env = client_env(tmp_path, model)
    snippet = readme_block("### Codex", "toml")
    config = Path(env["CODEX_HOME"]) / "config.toml"
    config.write_text(codex_config(model) + "\n" + snippet.replace(PLACEHOLDER, taskwarden_bin()))
    ns = "mcp__taskwarden"  # Codex offers an MCP server's tools as one namespace, '-' spelt '_'
    mark = model.script("codex-client", [
        {"codex_tool": "spawn_task", "namespace": ns, "arguments": {"prompt": "echo built by shell", "worker": "shell"}},
        {"codex_tool": "wait_task", "namespace": ns, "arguments": {"task_ids": "{task_id}", "timeout_s": 30}},
        {"reply": "finished {task_id}"},
    ])  # fmt: skip
    events = run_cli(
        ["codex", "exec", "--json", "--skip-git-repo-check", "-C", str(ws.work), "-"],
        f"{mark} hand this to a worker",
        env,
        ws.work,
    )
    calls = [e["item"] for e in events if e.get("type") == "item.completed" and e["item"]["type"] == "mcp_tool_call"]
    assert [(c["tool"], c["status"], c["error"]) for c in calls] == [
        ("spawn-task", "completed", None),
        ("wait-task", "completed", None),
    ], calls
    waited = json.loads(calls[1]["result"]["content"][0]["text"])
    assert waited["tasks"][0]["status"] == "completed"
    assert waited["tasks"][0]["output"]["final"] == "built by shell"
    final = [e["item"]["text"] for e in events if e.get("type") == "item.completed" and e["item"]["type"] == "agent_message"]
    task_id = waited["tasks"][0]["task_id"]
    assert final[-1] == f"finished {task_id}"

    records = audited(ws)
    tools = [(r["tool"], r["decision"]) for r in records]
    assert ("spawn-task", "allow") in tools and ("wait-task", "allow") in tools, records


def test_claude_print_mode_calls_taskwarden_as_the_readme_configures_it(tmp_path: Path, model: FakeModel) -> None:
    ws, env = client_env(tmp_path, model)
    mcp_json = readme_block("### Claude Code", "json").replace(PLACEHOLDER, taskwarden_bin())
    mcp_file = ws.work / ".mcp.json"
    mcp_file.write_text(mcp_json)
    assert "--allowedTools mcp__taskwarden" in README.read_text()
    mark = model.script("claude-client", [
        # Claude Code defers MCP tools: a model first loads their schemas with ToolSearch.
        {"claude_tool": "ToolSearch",
         "input": {"query": "select:mcp__taskwarden__spawn-task,mcp__taskwarden__wait-task", "max_results": 5}},
        {"claude_tool": "mcp__taskwarden__spawn-task", "input": {"prompt": "echo built by shell", "worker": "shell"}},
        {"claude_tool": "mcp__taskwarden__wait-task", "input": {"task_ids": "{task_id}", "timeout_s": 30}},
        {"reply": "finished {task_id}"},
    ])  # fmt: skip
    events = run_cli(
        ["claude", "-p", "--output-format", "stream-json", "--verbose", "--mcp-config", str(mcp_file),
         *CLAUDE_PRINT_FLAGS],
        f"{mark} hand this to a worker",
        env,
        ws.work,
    )  # fmt: skip
    init = next(e for e in events if e.get("type") == "system" and e.get("subtype") == "init")
    assert {"name": "taskwarden", "status": "connected"} in [
        {"name": s.get("name"), "status": s.get("status")} for s in init["mcp_servers"]
    ]
    results = [
        part
        for e in events
        if e.get("type") == "user"
        for part in e["message"]["content"]
        if isinstance(part, dict) and part.get("type") == "tool_result"
    ]
    assert len(results) == 3 and not any(r.get("is_error") for r in results), results
    waited = json.loads(results[2]["content"][0]["text"] if isinstance(results[2]["content"], list) else results[2]["content"])
    task_id = waited["tasks"][0]["task_id"]
    assert waited["tasks"][0]["output"]["final"] == "built by shell"
    result = next(e for e in events if e.get("type") == "result")
    assert result["result"] == f"finished {task_id}" and result["is_error"] is False

    tools = [(r["tool"], r["decision"]) for r in audited(ws)]
    assert ("spawn-task", "allow") in tools and ("wait-task", "allow") in tools, tools
