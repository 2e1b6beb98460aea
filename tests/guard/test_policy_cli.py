"""`taskwarden policy check|explain|test`, called as the CLI calls them."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest

from guard import policy_cli

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "policies"


def run(function, *args: object) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    code = function(*args, out=out)
    return code, out.getvalue()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


# -- check -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "summary"),
    [
        ("catalogue_seed.yaml", "(taskwarden, 2 rules, default allow, mode enforce)"),
        ("policylayer_seed.json", "(policylayer-json, 1 rule, default deny, mode enforce)"),
        ("intercept_taskwarden.yaml", "(intercept, 5 rules, default deny, mode enforce)"),
        ("taskwarden_full.yaml", "(taskwarden, 5 rules, default deny, mode enforce)"),
    ],
)
def test_check_accepts_the_fixtures(fixture: str, summary: str) -> None:
    code, output = run(policy_cli.check, FIXTURES / fixture)
    assert code == 0
    assert output == f"OK: {FIXTURES / fixture} {summary}\n"


def test_check_reports_file_line_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "policy.yaml",
        """
        version: "1"
        default: deny
        tools:
          spawn-task:
            rules:
              - action: allow
                rate_limit:
                  max: ten
                  window: 60
        """,
    )
    code, output = run(policy_cli.check, path)
    assert code == 1
    assert output == (
        f'error: {path}:8: tools.spawn-task.rules[0].rate_limit.max: '
        'must be an integer >= 0, got "ten"\n'
    )


def test_check_missing_file(tmp_path: Path) -> None:
    code, output = run(policy_cli.check, tmp_path / "nope.yaml")
    assert code == 1
    assert "nope.yaml: cannot read the file" in output


# -- explain ---------------------------------------------------------------------------


def test_explain_prints_decision_limits_and_trace() -> None:
    code, output = run(
        policy_cli.explain,
        FIXTURES / "taskwarden_full.yaml",
        "spawn-task",
        '{"prompt": "hi", "cwd": "/home/alice"}',
        "alice",
    )
    assert code == 0
    lines = output.splitlines()
    assert lines[:4] == [
        "decision: allow",
        "rule: spawn-task#2",
        "reason: spawn-task is allowed by rule spawn-task#2",
        "rate limits reserved:",
    ]
    assert "  spawn-task#2: 30 calls per 60 s per identity (counter spawn-task#2, this call takes 1)" in lines
    assert "  *#1: 600 calls per 60 s across all callers (counter everything, this call takes 1)" in lines
    assert "trace:" in lines
    assert any(line.startswith("  spawn-task#1 (line 10): skipped") for line in lines)
    assert lines[-1] == "  decision: allow (spawn-task#2): spawn-task is allowed by rule spawn-task#2"


def test_explain_deny_and_approval() -> None:
    code, output = run(
        policy_cli.explain, FIXTURES / "taskwarden_full.yaml", "spawn-task", '{"cwd": "/etc"}', "alice"
    )
    assert code == 0
    assert output.startswith("decision: deny\nrule: spawn-task#1\nreason: cwd must stay under /home\n")
    assert "rate limits reserved" not in output

    code, output = run(
        policy_cli.explain, FIXTURES / "taskwarden_full.yaml", "spawn-task", "{}", "carol"
    )
    assert code == 0
    assert "decision: require_approval\n" in output
    assert "approval: a human must approve; the call waits 5 s, an approval expires after 600 s" in output


def test_explain_hidden_and_shadow(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "mode: shadow\ndefault: deny\nhide: [cancel-task]\n")
    code, output = run(policy_cli.explain, path, "cancel-task", "{}", None)
    assert code == 0
    assert output.startswith("decision: hidden\nrule: hide\n")
    assert "mode: shadow" in output


@pytest.mark.parametrize(
    ("args_json", "message"),
    [
        ("{not json", "error: --args is not valid JSON: Expecting property name"),
        ("[1, 2]", "error: --args must be a JSON object, got list"),
    ],
)
def test_explain_bad_args_exit_2(args_json: str, message: str) -> None:
    code, output = run(policy_cli.explain, FIXTURES / "catalogue_seed.yaml", "spawn-task", args_json, None)
    assert code == 2
    assert output.startswith(message)


def test_explain_invalid_policy_exits_1(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "defualt: deny\n")
    code, output = run(policy_cli.explain, path, "spawn-task", "{}", None)
    assert code == 1
    assert f"{path}:1: defualt: unknown key" in output


# -- test ------------------------------------------------------------------------------


def test_cases_all_pass() -> None:
    code, output = run(
        policy_cli.test, FIXTURES / "taskwarden_full.yaml", FIXTURES / "taskwarden_full_cases.yaml"
    )
    assert code == 0, output
    assert output.splitlines() == [
        "PASS  alice spawns under /home",
        "PASS  spawning outside /home is denied",
        "PASS  carol needs approval",
        "PASS  hidden tool",
        "PASS  unlisted tool is allowed by the star rule",
        "5 passed, 0 failed",
    ]


def test_failing_case_says_why(tmp_path: Path) -> None:
    cases = write(
        tmp_path,
        "cases.yaml",
        """
        - name: cancel is allowed
          tool: cancel-task
          args: {task_id: t1}
          expect: allow
        - name: message is limited by the first rule
          tool: message-task
          expect: allow
          rule: message-task#2
        - name: message is allowed
          tool: message-task
          expect: allow
        """,
    )
    code, output = run(policy_cli.test, FIXTURES / "catalogue_seed.yaml", cases)
    assert code == 1
    assert output.splitlines() == [
        "FAIL  cancel is allowed: expected allow, got deny by cancel-task#1: "
        "Blocked by default — enable with approval",
        "FAIL  message is limited by the first rule: expected rule message-task#2, "
        "got allow by message-task#1: message-task is allowed by rule message-task#1",
        "PASS  message is allowed",
        "1 passed, 2 failed",
    ]


def test_cases_can_set_counters_for_state_conditions(tmp_path: Path) -> None:
    policy = write(
        tmp_path,
        "intercept.yaml",
        """
        version: "1"
        tools:
          create_issue:
            rules:
              - name: "hourly issues"
                rate_limit: 5/hour
          close_issue:
            rules:
              - name: "after two issues"
                conditions: [{path: state.create_issue._rate_hour, op: gte, value: 2}]
                on_deny: "Create two issues first"
        """,
    )
    cases = write(
        tmp_path,
        "cases.yaml",
        """
        cases:
          - name: too early
            tool: close_issue
            expect: deny
            rule: after two issues
          - name: after two
            tool: close_issue
            counters: {create_issue._rate_hour: 2}
            expect: allow
        """,
    )
    code, output = run(policy_cli.test, policy, cases)
    assert (code, output.splitlines()[-1]) == (0, "2 passed, 0 failed")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("- name: a\n  tool: t\n  expect: maybe\n", 3, '[0].expect: must be one of "allow"'),
        ("- name: a\n  tool: t\n", 1, "[0]: missing required key 'expect'"),
        ("cases:\n  - name: a\n    tool: t\n    expect: allow\n    arg: {}\n", 5, "cases[0].arg: unknown key"),
        ("- name: a\n  tool: t\n  expect: allow\n- name: a\n  tool: t\n  expect: deny\n", 4, "duplicate case name"),
        ("cases: [\n", 2, "not valid YAML"),
    ],
)
def test_malformed_cases_file_is_reported_with_its_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(text, encoding="utf-8")
    code, output = run(policy_cli.test, FIXTURES / "catalogue_seed.yaml", cases)
    assert code == 2
    assert output.startswith(f"error: {cases}:{line}: ")
    assert message in output
