"""The real Codex and Claude Code CLIs as taskwarden workers, against the fake model.

A test gets a ``Workspace`` whose server runs the built-in ``codex`` and
``claude`` profiles unchanged: only the environment differs from a user's
(PATH finds the npm-installed CLIs; each CLI's config and state live in the
test's directory and point at the fake model server).
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import psutil

from fixtures.fake_model import FakeModel
from tests.npm_tools import BIN, npm_bin
from tests.support import Workspace
from worker_server.process_group import MARKER_ENV

# The versions these tests were written against (tests/js/package.json pins them).
CODEX_VERSION = "0.171.0"
CLAUDE_VERSION = "2.1.332"
FAKE_KEY_ENV = "TASKWARDEN_TEST_FAKE_MODEL_KEY"


def codex_config(model: FakeModel) -> str:
    """``$CODEX_HOME/config.toml``: Codex's model is the fake, over the Responses API."""
    return textwrap.dedent(
        f"""\
        model = "fake-model"
        model_provider = "fake"
        check_for_update_on_startup = false

        [analytics]
        enabled = false

        [model_providers.fake]
        name = "fake"
        base_url = "{model.url}/v1"
        wire_api = "responses"
        env_key = "{FAKE_KEY_ENV}"
        # Reconnect at once: the fake cuts a stream only to see a retry.
        stream_max_retries = 3
        request_max_retries = 3
        """
    )


def cli_env(root: Path, model: FakeModel) -> dict[str, str]:
    """The environment for a server whose workers are the real CLIs."""
    # A missing CLI fails the test, saying how to install it.
    npm_bin("codex")
    npm_bin("claude")
    codex_home = root / "codex-home"
    codex_home.mkdir(exist_ok=True)
    (codex_home / "config.toml").write_text(codex_config(model))
    home = root / "home"
    home.mkdir(exist_ok=True)
    # Codex refuses to put its sandbox helper under the temporary directory;
    # a test's CODEX_HOME lies under /tmp, so TMPDIR is moved aside.
    tmp = root / "tmpdir"
    tmp.mkdir(exist_ok=True)
    return {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "CODEX_HOME": str(codex_home),
        FAKE_KEY_ENV: "fake-key",
        "CLAUDE_CONFIG_DIR": str(root / "claude-config"),
        "ANTHROPIC_BASE_URL": model.url,
        "ANTHROPIC_API_KEY": "sk-ant-fake",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
    }


def cli_workspace(root: Path, model: FakeModel, **kwargs: object) -> Workspace:
    ws = Workspace(root, **kwargs)  # type: ignore[arg-type]
    ws.env.update(cli_env(root, model))
    return ws


def processes_of(task_id: str) -> list[psutil.Process]:
    """Every live process started for a task (they carry its id in their environment)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(MARKER_ENV) == task_id:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def tool_outputs(model: FakeModel, script: str) -> list[str]:
    """What the CLI sent back to the model as tool results during a script."""
    out: list[str] = []
    for request in model.scripted(script):
        if request.api == "openai":
            for item in request.body.get("input") or []:
                if isinstance(item, dict) and item.get("type") == "function_call_output":
                    output = item.get("output")
                    out.append(output if isinstance(output, str) else json.dumps(output))
        else:
            for message in request.body.get("messages") or []:
                for part in message.get("content") or [] if isinstance(message.get("content"), list) else []:
                    if isinstance(part, dict) and part.get("type") == "tool_result":
                        out.append(json.dumps(part.get("content")))
    return out
