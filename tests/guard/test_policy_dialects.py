"""Reading the three policy dialects: what each file means, and how errors read."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from guard.decision import decide
from guard.dialects import PolicyError, load_default_policy, load_policy, parse_policy
from guard.policy import ApprovalSettings, Condition, Counter, RateLimit

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "policies"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load_error(tmp_path: Path, name: str, text: str) -> PolicyError:
    path = write(tmp_path, name, text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return caught.value


# -- the catalogue dialect (taskwarden's own) ----------------------------------


def test_catalogue_seed_from_the_design_means_what_it_says() -> None:
    policy = load_policy(FIXTURES / "catalogue_seed.yaml")

    assert policy.dialect == "taskwarden"
    assert policy.source == str(FIXTURES / "catalogue_seed.yaml")
    (message_rule,) = policy.tools["message-task"]
    assert message_rule.id == "message-task#1"
    assert message_rule.action == "allow"
    assert message_rule.rate_limit == RateLimit(max=30, window_s=60, scope="session")
    (cancel_rule,) = policy.tools["cancel-task"]
    assert cancel_rule.action == "deny"
    assert cancel_rule.reason == "Blocked by default — enable with approval"

    message = decide(policy, "message-task", {"task_id": "t1", "message": "hi"})
    assert (message.action, message.rule_id) == ("allow", "message-task#1")
    assert [limit.reason for limit in message.limits] == ["30 calls per 60 s per session"]
    cancel = decide(policy, "cancel-task", {"task_id": "t1"})
    assert (cancel.action, cancel.reason) == ("deny", "Blocked by default — enable with approval")


def test_catalogue_file_without_default_leaves_other_tools_allowed() -> None:
    policy = load_policy(FIXTURES / "catalogue_seed.yaml")

    assert policy.default == "allow"
    verdict = decide(policy, "list-tasks", {})
    assert (verdict.action, verdict.rule_id) == ("allow", "default")


def test_own_dialect_reads_every_key(tmp_path: Path) -> None:
    policy = load_policy(FIXTURES / "taskwarden_full.yaml")

    assert (policy.default, policy.mode, policy.hide) == ("deny", "enforce", ("list-task-messages",))
    deny, allow, approve = policy.tools["spawn-task"]
    assert deny.conditions == (
        Condition(path="args.cwd", op="exists", value=True),
        Condition(path="args.cwd", op="not_regex", value="^/home/"),
    )
    assert allow.identities == ("alice", "bob")
    assert allow.rate_limit == RateLimit(max=30, window_s=60, scope="identity")
    assert approve.approval == ApprovalSettings(expires_s=600, wait_s=5)
    (message,) = policy.tools["message-task"]
    assert message.match == "any"
    assert message.rate_limit == RateLimit(
        max=100, window_s=3600, counter="messages", cost_from="args.weight"
    )
    assert policy.counters == {
        "messages": Counter(window_s=3600, scope="session"),
        "everything": Counter(window_s=60, scope="global"),
    }
    assert policy.tools["get-task"] == ()
    assert [rule.id for rule in policy.tools["*"]] == ["*#1"]
    assert deny.line == 10


@pytest.mark.parametrize(
    ("window", "seconds"),
    [("60", 60), ("1.5", 1.5), ("second", 1), ("minute", 60), ("hour", 3600), ("day", 86400)],
)
def test_windows_are_seconds_or_names(tmp_path: Path, window: str, seconds: float) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        f"""
        tools:
          spawn-task:
            rules:
              - action: allow
                rate_limit: {{max: 3, window: {window}}}
        """,
    )
    (rule,) = load_policy(path).tools["spawn-task"]
    assert rule.rate_limit is not None and rule.rate_limit.window_s == seconds


def test_shadow_mode_and_hide_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "mode: shadow\nhide: [cancel-task]\n")
    policy = load_policy(path)
    assert (policy.mode, policy.hide) == ("shadow", ("cancel-task",))


def test_yaml_is_read_with_the_core_schema(tmp_path: Path) -> None:
    # YAML 1.1 would turn "no" into false and 12:30 into 750.
    path = write(
        tmp_path,
        "p.yaml",
        """
        tools:
          spawn-task:
            rules:
              - action: deny
                conditions:
                  - {path: args.answer, op: eq, value: no}
                  - {path: args.time, op: eq, value: 12:30}
        """,
    )
    (rule,) = load_policy(path).tools["spawn-task"]
    assert [c.value for c in rule.conditions] == ["no", "12:30"]


# -- the built-in default ----------------------------------------------------------


def test_default_policy_matches_the_design() -> None:
    policy = load_default_policy()

    assert (policy.dialect, policy.default, policy.mode) == ("taskwarden", "deny", "enforce")
    for tool in ("spawn-task", "message-task", "send-task-message", "review-task"):
        verdict = decide(policy, tool, {})
        assert verdict.action == "allow", tool
        assert [(l.max, l.window_s, l.scope, l.reason) for l in verdict.limits] == [
            (30, 60, "session", "30 calls per 60 s per session")
        ]
    cancel = decide(policy, "cancel-task", {"task_id": "t1"})
    assert cancel.action == "require_approval"
    assert cancel.approval == ApprovalSettings(expires_s=900, wait_s=20)
    for tool in ("wait-task", "list-tasks", "get-task", "list-task-messages"):
        verdict = decide(policy, tool, {})
        assert (verdict.action, verdict.limits) == ("allow", ()), tool
    other = decide(policy, "delete-everything", {})
    assert (other.action, other.rule_id) == ("deny", "default")
    assert other.reason == "delete-everything is not allowed by this policy (default: deny)"


def test_default_policy_ships_inside_the_package() -> None:
    import guard

    assert (Path(guard.__file__).parent / "default_policy.yaml").is_file()


# -- the PolicyLayer JSON dialect ----------------------------------------------------


def test_policylayer_seed_limits_per_grant_and_denies_the_rest() -> None:
    policy = load_policy(FIXTURES / "policylayer_seed.json")

    assert (policy.dialect, policy.default) == ("policylayer-json", "deny")
    (rule,) = policy.tools["agentwork_send_message"]
    assert rule.id == "agentwork_send_message#1"
    assert rule.rate_limit == RateLimit(
        max=30, window_s=60, scope="identity", counter="agentwork_send_message_rate"
    )
    verdict = decide(policy, "agentwork_send_message", {"text": "hi"}, "alice")
    assert verdict.action == "allow"
    (limit,) = verdict.limits
    assert (limit.counter, limit.max, limit.window_s, limit.scope) == (
        "agentwork_send_message_rate", 30, 60, "identity",
    )  # fmt: skip
    assert limit.reason == "30 calls per 60 s per identity"
    assert decide(policy, "agentwork_delete", {}).action == "deny"


def test_policylayer_listing_with_empty_object_allows(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.json",
        """
        {"version": "1", "default": "deny",
         "all_tools": {"limits": [{"counter": "all", "window": "hour", "max": 100, "scope": "server"}]},
         "tools": {
           "list_customers": {},
           "create_refund": {
             "require": [{"path": "args.reason", "op": "exists", "value": true}],
             "deny_if": [{"path": "args.amount", "op": "gt", "value": 10000}]
           }
         }}
        """,
    )
    policy = load_policy(path)

    listed = decide(policy, "list_customers", {})
    assert listed.action == "allow"
    assert [(l.counter, l.scope) for l in listed.limits] == [("all", "global")]
    assert decide(policy, "delete_customer", {}).action == "deny"
    no_reason = decide(policy, "create_refund", {"amount": 5})
    assert (no_reason.action, no_reason.rule_id) == ("deny", "create_refund#1")
    assert no_reason.reason == "create_refund requires args.reason exists"
    too_big = decide(policy, "create_refund", {"amount": 20000, "reason": "x"})
    assert (too_big.action, too_big.rule_id) == ("deny", "create_refund#2")
    assert decide(policy, "create_refund", {"amount": 20, "reason": "x"}).action == "allow"


def test_policylayer_requires_version_and_default(tmp_path: Path) -> None:
    error = load_error(tmp_path, "p.json", '{"version": "1", "tools": {"a": {"limits": []}}}')
    assert "p.json:1" in str(error)
    assert "missing required key 'default'" in str(error)


def test_policylayer_unknown_scope_is_an_error(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        "p.json",
        """
        {"version": "1", "default": "deny",
         "tools": {"a": {"limits": [
            {"counter": "c", "window": "minute", "max": 3, "scope": "planet"}
         ]}}}
        """,
    )
    assert str(error).startswith(f"{tmp_path / 'p.json'}:3: tools.a.limits[0].scope:")
    assert '"grant"' in str(error)


# -- the Intercept dialect -------------------------------------------------------------


def test_intercept_file_is_read_as_intercept_means_it() -> None:
    policy = load_policy(FIXTURES / "intercept_taskwarden.yaml")

    assert (policy.dialect, policy.default, policy.hide) == ("intercept", "deny", ("review-task",))
    assert policy.listing_permits
    hourly, cwd = policy.tools["spawn-task"]
    assert hourly.id == "spawn hourly limit"
    assert hourly.rate_limit == RateLimit(
        max=5, window_s=3600, scope="global", counter="spawn-task._rate_hour",
        reason="Only 5 tasks an hour",
    )  # fmt: skip
    assert cwd.on_fail == "deny"
    assert cwd.conditions == (Condition(path="args.cwd", op="regex", value="^/"),)
    (budget,) = policy.tools["message-task"]
    # "lt 1000" on the rule's own counter: the counter may reach 999.
    assert budget.conditions == ()
    assert budget.rate_limit == RateLimit(
        max=999, window_s=86400, scope="global", cost_from="args.chars",
        counter="message-task.daily_chars", reason="Daily message budget used up",
    )  # fmt: skip
    (star,) = policy.tools["*"]
    assert star.rate_limit is not None
    assert star.rate_limit.counter == "_global._rate_minute"
    assert star.rate_limit.reason == "Rate limit of 60 per minute reached. Try again later."
    assert policy.tools["get-task"] == ()


def test_intercept_decisions() -> None:
    policy = load_policy(FIXTURES / "intercept_taskwarden.yaml")

    listed = decide(policy, "get-task", {"task_id": "t"})
    assert listed.action == "allow"
    assert [l.rule_id for l in listed.limits] == ["global rate limit"]
    # default deny: unlisted tools are refused before the "*" rules are looked at
    unlisted = decide(policy, "list-tasks", {})
    assert (unlisted.action, unlisted.rule_id) == ("deny", "default")
    relative = decide(policy, "spawn-task", {"cwd": "src"})
    assert (relative.action, relative.reason) == ("deny", "cwd must be an absolute path")
    cancel = decide(policy, "cancel-task", {})
    assert (cancel.rule_id, cancel.reason) == ("no cancelling", "Cancelling is not permitted via agents")
    assert decide(policy, "review-task", {}).hidden


def test_intercept_state_conditions_on_other_counters_read_them(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        """
        version: "1"
        tools:
          create_issue:
            rules:
              - name: "hourly issues"
                rate_limit: 5/hour
          close_issue:
            rules:
              - name: "only after some issues"
                conditions:
                  - path: "state.create_issue._rate_hour"
                    op: "gte"
                    value: 2
                on_deny: "Create two issues first"
        """,
    )
    policy = load_policy(path)
    (rule,) = policy.tools["close_issue"]
    assert rule.conditions == (Condition(path="state.create_issue._rate_hour", op="gte", value=2),)
    assert policy.counters["create_issue._rate_hour"] == Counter(window_s=3600, scope="global")


def test_intercept_yes_and_no_stay_strings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        """
        version: "1"
        tools:
          vote:
            rules:
              - name: "only yes"
                conditions: [{path: args.answer, op: eq, value: yes}]
        """,
    )
    policy = load_policy(path)
    assert decide(policy, "vote", {"answer": "yes"}).action == "allow"
    assert decide(policy, "vote", {"answer": True}).action == "deny"


# -- errors name the file, the line and the key ---------------------------------------------

ERROR_CASES = [
    pytest.param(
        "p.yaml",
        """
        version: "1"
        tools:
          spawn-task:
            rules:
              - action: allow
                rate_limit:
                  max: ten
                  window: 60
        """,
        7,
        'tools.spawn-task.rules[0].rate_limit.max: must be an integer >= 0, got "ten"',
        id="catalogue-max-not-integer",
    ),
    pytest.param(
        "p.yaml",
        """
        tools:
          spawn-task:
            rules:
              - acton: deny
        """,
        4,
        "tools.spawn-task.rules[0].acton: unknown key",
        id="typo-in-rule-key",
    ),
    pytest.param(
        "p.yaml",
        "verison: 1\n",
        1,
        "verison: unknown key",
        id="typo-in-top-key",
    ),
    pytest.param(
        "p.yaml",
        """
        tools:
          spawn-task:
            rules:
              - action: allow
                rate_limit: {max: 3, window: 60, scop: identity}
        """,
        5,
        "tools.spawn-task.rules[0].rate_limit.scop: unknown key",
        id="typo-in-rate-limit",
    ),
    pytest.param(
        "p.yaml",
        """
        tools:
          spawn-task:
            rules:
              - action: deny
                conditions:
                  - path: args.x
                    op: regex
                    value: "(unclosed"
        """,
        8,
        "tools.spawn-task.rules[0].conditions[0].value: invalid regular expression",
        id="bad-regex",
    ),
    pytest.param(
        "p.yaml",
        """
        tools:
          spawn-task:
            rules:
              - action: deny
                conditions: [{path: args.n, op: gt, value: "5"}]
        """,
        5,
        "tools.spawn-task.rules[0].conditions[0].value: operator 'gt' needs a number",
        id="numeric-op-needs-number",
    ),
    pytest.param(
        "p.yaml",
        """
        tools:
          spawn-task:
            rules:
              - action: deny
                conditions: [{path: cwd, op: eq, value: "/"}]
        """,
        5,
        "tools.spawn-task.rules[0].conditions[0].path: path must start with 'args.' or 'state.'",
        id="path-without-args",
    ),
    pytest.param(
        "p.yaml",
        """
        tools:
          spawn-task:
            rules:
              - action: allow
                rate_limit: {max: 3, window: 0}
        """,
        5,
        "tools.spawn-task.rules[0].rate_limit.window: must be a number > 0, got 0",
        id="zero-window",
    ),
    pytest.param(
        "p.yaml",
        """
        tools:
          spawn-task:
            rules:
              - action: allow
                approval: {expires_s: 60}
        """,
        5,
        "tools.spawn-task.rules[0].approval: only a require_approval rule takes approval settings",
        id="approval-on-allow",
    ),
    pytest.param(
        "p.yaml",
        """
        tools:
          a:
            rules: []
          a:
            rules: []
        """,
        4,
        "tools.a: duplicate key",
        id="duplicate-tool",
    ),
    pytest.param(
        "p.yaml",
        """
        tools:
          a:
            rules:
              - action: deny
                conditions: [{path: state.nope, op: gt, value: 1}]
        """,
        5,
        "tools.a.rules[0].conditions[0].path: condition reads counter 'nope', which no rule defines",
        id="unknown-counter",
    ),
    pytest.param(
        "p.json",
        '{"version": "1", "default": "deny",\n "tools": {"a": {"limits": [{"max": 3,}]}}}\n',
        2,
        "not valid JSON",
        id="json-syntax",
    ),
    pytest.param(
        "p.json",
        '{"version": "1", "default": "deny",\n "default": "allow", "tools": {}}\n',
        2,
        "default: duplicate key",
        id="json-duplicate-key",
    ),
    pytest.param(
        "p.json",
        '{"version": "1",\n "default": "deny",\n "tools": {"a": {"limits": [\n  {"window": "minute", "max": -1}]}}}\n',
        4,
        "tools.a.limits[0].max: must be an integer >= 0, got -1",
        id="json-negative-max",
    ),
    pytest.param(
        "p.yaml",
        'version: "1"\ntools:\n  create:\n    rules:\n      - action: evaluate\n        conditions: [{path: args.a, op: eq, value: 1}]\n',
        5,
        "tools.create.rules[0]: missing required key 'name'",
        id="intercept-rule-without-name",
    ),
    pytest.param(
        "p.yaml",
        """
        version: "1"
        tools:
          create:
            rules:
              - name: "x"
                on_deny: "no"
        """,
        5,
        "tools.create.rules[0]: evaluate rules must have at least one condition",
        id="intercept-evaluate-without-conditions",
    ),
    pytest.param(
        "p.yaml",
        """
        version: "1"
        tools:
          create:
            rules:
              - name: "x"
                action: deny
                conditions: [{path: args.a, op: eq, value: 1}]
        """,
        7,
        "tools.create.rules[0].conditions: deny rules must not have conditions",
        id="intercept-deny-with-conditions",
    ),
    pytest.param(
        "p.yaml",
        """
        version: "1"
        tools:
          create:
            rules:
              - name: "x"
                rate_limit: 5/hour
                conditions: [{path: args.a, op: eq, value: 1}]
        """,
        6,
        "tools.create.rules[0].rate_limit: rate_limit cannot be combined with conditions or state",
        id="intercept-shorthand-with-conditions",
    ),
    pytest.param(
        "p.yaml",
        """
        version: "1"
        tools:
          create:
            rules:
              - name: "x"
                rate_limit: 5/week
        """,
        6,
        'tools.create.rules[0].rate_limit: window must be "minute", "hour" or "day", got "week"',
        id="intercept-shorthand-window",
    ),
    pytest.param(
        "p.yaml",
        """
        version: "1"
        tools:
          create:
            rules:
              - name: "a"
                rate_limit: 5/hour
              - name: "b"
                rate_limit: 50/hour
        """,
        8,
        "tools.create.rules[1].rate_limit: duplicate state counter '_rate_hour' on tool 'create'",
        id="intercept-duplicate-counter",
    ),
    pytest.param(
        "p.yaml",
        """
        version: "1"
        tools:
          charge:
            rules:
              - name: "spend"
                conditions: [{path: state.charge.spent, op: lte, value: 100}]
                state: {counter: spend, window: day, increment: -5}
        """,
        7,
        "tools.charge.rules[0].state.increment: must be an integer >= 0, got -5",
        id="intercept-negative-increment",
    ),
    pytest.param(
        "p.yaml",
        """
        version: "1"
        tools:
          charge:
            rules:
              - name: "spend"
                conditions: [{path: state.charge.spent, op: lte, value: 100}]
                state: {counter: spend, window: day}
        """,
        6,
        "tools.charge.rules[0].conditions[0].path: condition reads counter 'charge.spent', "
        "which no rule defines",
        id="intercept-state-reference",
    ),
    pytest.param(
        "p.yaml",
        """
        version: "1"
        tools:
          charge:
            rules:
              - name: "spend"
                conditions: [{path: args.to, op: not_regex, value: "^x"}]
        """,
        6,
        "tools.charge.rules[0].conditions[0].op: must be one of",
        id="intercept-has-no-not-regex",
    ),
    pytest.param(
        "p.yaml",
        """
        description: "missing version"
        tools: {}
        """,
        1,
        "missing required key 'version'",
        id="intercept-version-required",
    ),
    pytest.param(
        "p.yaml",
        """
        version: "1"
        tools:
          spawn-task:
            rules:
              - name: "mixed up"
                action: allow
        """,
        6,
        'tools.spawn-task.rules[0].action: must be one of "evaluate", "deny", got "allow"',
        id="own-rule-with-intercept-name",
    ),
]


@pytest.mark.parametrize(("name", "text", "line", "message"), ERROR_CASES)
def test_errors_name_file_line_and_key(
    tmp_path: Path, name: str, text: str, line: int, message: str
) -> None:
    error = load_error(tmp_path, name, text)

    assert str(error).startswith(f"{tmp_path / name}:{line}: "), str(error)
    assert message in str(error)
    assert error.line == line


def test_parse_policy_names_its_source_in_errors() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy("tools:\n  a:\n    rules:\n      - action: maybe\n", "inline.yaml")
    assert str(caught.value) == (
        'inline.yaml:4: tools.a.rules[0].action: must be one of "allow", "deny", '
        '"require_approval", got "maybe"'
    )


def test_missing_file_and_empty_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the file"):
        load_policy(tmp_path / "absent.yaml")
    with pytest.raises(PolicyError, match="the policy is empty"):
        load_policy(write(tmp_path, "empty.yaml", "# nothing\n"))


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, "p.yaml", "tools:\n  a: [\n")
    assert error.line == 3
    assert "not valid YAML" in str(error)
