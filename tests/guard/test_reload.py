"""Policy reloads fail closed: half-written files in place are refused; renamed files are taken."""

from __future__ import annotations

import os
from pathlib import Path

from guard.reload import PolicySource

RULES = 'version: "1"\ndefault: deny\ntools:\n  list-tasks:\n    rules:\n      - action: allow\n'


def write_in_place(path: Path, text: str) -> None:
    with path.open("r+") as f:
        f.truncate(0)
        f.write(text)


def rename_into_place(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_a_prefix_written_in_place_is_refused_and_the_policy_kept(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(RULES)
    source = PolicySource(path)
    write_in_place(path, 'version: "1"\n')
    assert not source.reload()
    assert source.policy.default == "deny"
    assert "the beginning of the policy in force" in (source.last_error or "")
    write_in_place(path, 'version: "1"\ndefault: allow\n')  # not a prefix, but hollow
    assert not source.reload()
    assert "looks half-written" in (source.last_error or "")
    write_in_place(path, RULES + "  get-task:\n    rules:\n      - action: allow\n")
    assert source.reload()
    assert set(source.policy.tools) == {"list-tasks", "get-task"}


def test_a_renamed_file_is_complete_and_taken_as_written(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(RULES)
    source = PolicySource(path)
    rename_into_place(path, 'version: "1"\n')  # an operator who means "allow everything"
    assert source.reload()
    assert source.policy.rule_count == 0 and source.policy.default == "allow"


def test_allowing_everything_on_purpose_in_place_is_said_with_a_rule(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(RULES)
    source = PolicySource(path)
    write_in_place(path, 'version: "1"\ntools:\n  "*":\n    rules:\n      - action: allow\n')
    assert source.reload()
    assert source.policy.default == "allow" and source.policy.rule_count == 1
