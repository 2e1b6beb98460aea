"""The README stays true: its policy examples load, its commands exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from guard.dialects import parse_policy

README = Path(__file__).resolve().parent.parent / "README.md"


def _policy_examples() -> list[tuple[str, str]]:
    text = README.read_text()
    blocks = re.findall(r"```(yaml|json)\n(.*?)```", text, re.S)
    return [(kind, body) for kind, body in blocks if '"version"' in body or "version:" in body]


@pytest.mark.parametrize(("kind", "body"), _policy_examples())
def test_readme_policy_examples_load(kind: str, body: str) -> None:
    policy = parse_policy(body, f"README.md ({kind})")
    assert policy.rule_count >= 1


def test_readme_names_one_example_per_dialect() -> None:
    dialects = {parse_policy(body, "README").dialect for _, body in _policy_examples()}
    assert dialects == {"taskwarden", "intercept", "policylayer-json"}


def test_readme_commands_exist() -> None:
    code = "\n".join(re.findall(r"```(?:sh|text)\n(.*?)```", README.read_text(), re.S))
    verbs = set(re.findall(r"^(?:\.venv/bin/)?taskwarden (\w+)", code, re.M))
    assert {"serve", "inbox", "tasks", "humans", "approvals", "policy", "audit"} <= verbs
    for verb in verbs:
        out = subprocess.run([sys.executable, "-m", "worker_server", verb, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, f"taskwarden {verb}: {out.stderr}"
