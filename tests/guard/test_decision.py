"""decide(): the verdict a policy gives one call, and the conditions it rests on."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guard import conditions
from guard.decision import COUNT_ONLY_MAX, Verdict, decide, fresh_counters
from guard.dialects import parse_policy
from guard.policy import OPS, ApprovalSettings, Condition, Policy, Scope


def policy(text: str) -> Policy:
    return parse_policy(textwrap.dedent(text).lstrip("\n"), "test.yaml")


# -- every operator ---------------------------------------------------------------------

OP_CASES = [
    # op, operand, argument value, holds
    ("eq", "main", "main", True),
    ("eq", "main", "dev", False),
    ("eq", 5, 5.0, True),
    ("eq", 5, "5", False),  # no string/number coercion
    ("eq", 1, True, False),  # booleans are not numbers
    ("eq", True, True, True),
    ("eq", [1, "a"], [1, "a"], True),
    ("eq", {"k": 1}, {"k": 1}, True),
    ("neq", "draft", "final", True),
    ("neq", "draft", "draft", False),
    ("in", ["usd", "eur"], "eur", True),
    ("in", ["usd", "eur"], "gbp", False),
    ("not_in", ["admin"], "alice", True),
    ("not_in", ["admin"], "admin", False),
    ("lt", 100, 99, True),
    ("lt", 100, 100, False),
    ("lte", 100, 100, True),
    ("lte", 100, 100.5, False),
    ("gt", 0, 1, True),
    ("gt", 0, 0, False),
    ("gte", 1, 1, True),
    ("gte", 1, 0.5, False),
    ("lt", 100, "5", False),  # a string is not less than anything
    ("gt", 0, True, False),  # nor is a boolean
    ("regex", "^feat/", "feat/login", True),
    ("regex", "^feat/", "fix/feat/x", False),
    ("regex", "login", "feat/login-page", True),  # search, not full match
    ("regex", "^1", 123, False),  # numbers are not strings
    ("not_regex", "^/home/", "/etc/passwd", True),
    ("not_regex", "^/home/", "/home/alice", False),
    ("not_regex", "^/home/", 7, False),
    ("contains", "test", "a test run", True),
    ("contains", "test", "a run", False),
    ("contains", "b", ["a", "b"], True),
    ("contains", 2, [1, 2.0], True),
    ("contains", "x", {"x": 1}, False),
    ("exists", True, "anything", True),
    ("exists", True, None, False),  # null counts as absent
    ("exists", False, None, True),
    ("exists", False, 0, False),
    ("max_length", 3, "abc", True),
    ("max_length", 3, "abcd", False),
    ("max_length", 2, [1, 2], True),
    ("max_length", 1, {"a": 1, "b": 2}, False),
    ("max_length", 3, 12345, False),
]


@pytest.mark.parametrize(("op", "operand", "actual", "expected"), OP_CASES)
def test_operator(op: str, operand: Any, actual: Any, expected: bool) -> None:
    assert conditions.holds(Condition(path="args.x", op=op, value=operand), {"x": actual}) is expected


def test_every_operator_is_covered() -> None:
    assert {case[0] for case in OP_CASES} == set(OPS)


@pytest.mark.parametrize("op", [op for op in OPS if op != "exists"])
def test_missing_value_satisfies_no_operator_but_exists(op: str) -> None:
    operand = {"in": ["a"], "not_in": ["a"], "max_length": 3}.get(op, "a")
    if op in ("lt", "lte", "gt", "gte"):
        operand = 1
    assert not conditions.holds(Condition(path="args.x", op=op, value=operand), {})


def test_exists_false_holds_for_missing_value() -> None:
    assert conditions.holds(Condition(path="args.x", op="exists", value=False), {})
    assert not conditions.holds(Condition(path="args.x", op="exists", value=True), {})


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("args.a.b", 1),
        ("args.items.1.name", "second"),
        ("args.items.5.name", conditions.MISSING),
        ("args.a.b.c", conditions.MISSING),
        ("args.items.x", conditions.MISSING),
        ("args.nope", conditions.MISSING),
        ("args.0", conditions.MISSING),
    ],
)
def test_paths_descend_objects_and_lists(path: str, value: Any) -> None:
    args = {"a": {"b": 1}, "items": [{"name": "first"}, {"name": "second"}]}
    assert conditions.resolve_args(path, args) == value


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


@given(op=st.sampled_from(OPS), operand=JSON, actual=JSON | st.just(conditions.MISSING))
def test_operators_never_raise(op: str, operand: Any, actual: Any) -> None:
    if op in conditions.REGEX_OPS and isinstance(operand, str):
        operand = "a.c"  # arbitrary text need not be a valid pattern; load time rejects those
    assert isinstance(conditions.test(op, actual, operand), bool)


# -- rules, identities, defaults ------------------------------------------------------

OWN = """
version: "1"
default: deny
tools:
  spawn-task:
    rules:
      - action: deny
        reason: "stay under /home"
        conditions:
          - {path: args.cwd, op: not_regex, value: "^/home/"}
      - action: allow
        identities: [alice]
        rate_limit: {max: 30, window: 60}
      - action: require_approval
        identities: [bob]
        reason: "bob's spawns need approval"
  list-tasks:
    rules: []
  cancel-task:
    rules:
      - action: require_approval
  "*":
    rules:
      - action: allow
        identities: [ops]
        rate_limit: {max: 100, window: minute, scope: global}
"""


def test_identities_select_rules() -> None:
    p = policy(OWN)

    alice = decide(p, "spawn-task", {"cwd": "/home/alice"}, "alice")
    assert (alice.action, alice.rule_id) == ("allow", "spawn-task#2")
    assert [(l.rule_id, l.max, l.window_s, l.scope) for l in alice.limits] == [
        ("spawn-task#2", 30, 60, "session")
    ]
    bob = decide(p, "spawn-task", {"cwd": "/home/bob"}, "bob")
    assert (bob.action, bob.rule_id, bob.reason) == (
        "require_approval", "spawn-task#3", "bob's spawns need approval",
    )  # fmt: skip
    assert bob.approval == ApprovalSettings()
    carol = decide(p, "spawn-task", {"cwd": "/home/carol"}, "carol")
    assert (carol.action, carol.rule_id) == ("deny", "default")
    assert carol.reason == "spawn-task is not allowed by this policy (default: deny)"
    nobody = decide(p, "spawn-task", {"cwd": "/home/x"})
    assert nobody.action == "deny"


def test_a_deny_wins_over_allow() -> None:
    verdict = decide(policy(OWN), "spawn-task", {"cwd": "/etc"}, "alice")
    assert (verdict.action, verdict.rule_id, verdict.reason) == ("deny", "spawn-task#1", "stay under /home")
    assert verdict.limits == ()


def test_star_rules_apply_to_every_tool() -> None:
    p = policy(OWN)

    ops = decide(p, "get-task", {}, "ops")
    assert (ops.action, ops.rule_id) == ("allow", "*#1")
    both = decide(p, "spawn-task", {"cwd": "/home/a"}, "ops")
    assert [l.rule_id for l in both.limits] == ["*#1"]
    assert decide(p, "get-task", {}, "alice").action == "deny"


def test_a_tool_listed_without_rules_is_allowed() -> None:
    verdict = decide(policy(OWN), "list-tasks", {})
    assert (verdict.action, verdict.rule_id) == ("allow", None)


def test_require_approval_collects_limits_and_settings() -> None:
    p = policy(
        """
        tools:
          cancel-task:
            rules:
              - action: require_approval
                approval: {expires_s: 60, wait_s: 0}
              - action: allow
                rate_limit: {max: 5, window: hour, scope: identity}
        """
    )
    verdict = decide(p, "cancel-task", {"task_id": "t"}, "alice")
    assert verdict.action == "require_approval"
    assert verdict.approval == ApprovalSettings(expires_s=60, wait_s=0)
    assert [l.reason for l in verdict.limits] == ["5 calls per 3600 s per identity"]


def test_default_allow_and_default_deny() -> None:
    allow = decide(policy("default: allow\n"), "anything", {})
    assert (allow.action, allow.rule_id) == ("allow", "default")
    deny = decide(policy("default: deny\n"), "anything", {})
    assert (deny.action, deny.rule_id) == ("deny", "default")


def test_match_any() -> None:
    p = policy(
        """
        default: deny
        tools:
          t:
            rules:
              - action: allow
                match: any
                conditions:
                  - {path: args.a, op: eq, value: 1}
                  - {path: args.b, op: eq, value: 2}
        """
    )
    assert decide(p, "t", {"b": 2}).action == "allow"
    assert decide(p, "t", {"a": 3, "b": 3}).action == "deny"


def test_hide() -> None:
    hidden = decide(policy("hide: [cancel-task]\n"), "cancel-task", {})
    assert (hidden.hidden, hidden.effect, hidden.rule_id) == (True, "hidden", "hide")
    assert decide(policy("hide: [cancel-task]\n"), "get-task", {}).hidden is False
    assert decide(policy("hide: ['*']\n"), "get-task", {}).hidden is True


def test_shadow_mode_reports_what_enforcement_would_do() -> None:
    verdict = decide(policy("mode: shadow\ndefault: deny\n"), "spawn-task", {})
    assert (verdict.action, verdict.shadow) == ("deny", True)
    assert decide(policy("default: deny\n"), "spawn-task", {}).shadow is False


def test_verdict_is_frozen_and_traced() -> None:
    verdict = decide(policy(OWN), "spawn-task", {"cwd": "/home/a"}, "alice")
    assert isinstance(verdict, Verdict)
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.action = "deny"  # type: ignore[misc]
    assert any("spawn-task#1" in line and "skipped" in line for line in verdict.trace)
    assert verdict.trace[-1].startswith("decision: allow (spawn-task#2)")


# -- costs (cost_from / Intercept's increment_from) -------------------------------------------

COSTED = """
tools:
  charge:
    rules:
      - action: allow
        rate_limit: {max: 1000, window: day, counter: spend, cost_from: args.amount}
"""


@pytest.mark.parametrize(("amount", "cost"), [(5, 5), (0, 0), (7.0, 7)])
def test_cost_comes_from_the_argument(amount: Any, cost: int) -> None:
    verdict = decide(policy(COSTED), "charge", {"amount": amount})
    assert verdict.action == "allow"
    (limit,) = verdict.limits
    assert (limit.counter, limit.cost, limit.max) == ("spend", cost, 1000)
    assert limit.reason == "1000 units per 86400 s per session"


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ({}, "argument 'amount' is required"),
        ({"amount": None}, "argument 'amount' is required"),
        ({"amount": -5}, "argument 'amount' must not be negative"),
        ({"amount": -0.5}, "argument 'amount' must not be negative"),
        ({"amount": "5"}, "argument 'amount' must be a number"),
        ({"amount": True}, "argument 'amount' must be a number"),
        ({"amount": math.nan}, "argument 'amount' must be a number"),
        ({"amount": math.inf}, "argument 'amount' must be a number"),
        ({"amount": 2.5}, "argument 'amount' must be a whole number"),
        ({"amount": [5]}, "argument 'amount' must be a number"),
    ],
)
def test_unusable_cost_is_refused(args: dict[str, Any], problem: str) -> None:
    verdict = decide(policy(COSTED), "charge", args)
    assert (verdict.action, verdict.rule_id, verdict.limits) == ("deny", "charge#1", ())
    assert problem in verdict.reason
    assert "spend" in verdict.reason


INTERCEPT_SPEND = """
version: "1"
tools:
  create_charge:
    rules:
      - name: "daily spend cap"
        conditions:
          - path: "state.create_charge.daily_spend"
            op: "lte"
            value: 1000000
        on_deny: "Daily spending cap reached"
        state:
          counter: "daily_spend"
          window: "day"
          increment_from: "args.amount"
  refund:
    rules:
      - name: "refunds only while spend is low"
        conditions:
          - path: "state.create_charge.daily_spend"
            op: "lt"
            value: 500
        on_deny: "Too much spent today to refund"
"""


@pytest.mark.parametrize("amount", [-100, "100", 12.5, None])
def test_intercept_increment_from_refuses_what_intercept_accepts(amount: Any) -> None:
    verdict = decide(policy(INTERCEPT_SPEND), "create_charge", {"amount": amount})
    assert (verdict.action, verdict.rule_id) == ("deny", "daily spend cap")
    assert "amount" in verdict.reason


def test_intercept_increment_from_reserves_the_amount() -> None:
    verdict = decide(policy(INTERCEPT_SPEND), "create_charge", {"amount": 2500})
    assert verdict.action == "allow"
    (limit,) = verdict.limits
    assert (limit.counter, limit.max, limit.cost, limit.scope, limit.reason) == (
        "create_charge.daily_spend", 1000000, 2500, "global", "Daily spending cap reached",
    )  # fmt: skip


def test_intercept_state_conditions_read_the_counter_before_this_call() -> None:
    p = policy(INTERCEPT_SPEND)
    seen: list[tuple[str, float, Scope]] = []

    def counters(spent: int):  # type: ignore[no-untyped-def]
        def lookup(counter: str, window_s: float, scope: Scope) -> int:
            seen.append((counter, window_s, scope))
            return spent

        return lookup

    low = decide(p, "refund", {}, counters=counters(499))
    assert low.action == "allow"
    assert seen == [("create_charge.daily_spend", 86400, "global")]
    high = decide(p, "refund", {}, counters=counters(500))
    assert (high.action, high.rule_id, high.reason) == (
        "deny", "refunds only while spend is low", "Too much spent today to refund",
    )  # fmt: skip
    # policy explain reads every counter as 0
    fresh = decide(p, "refund", {}, counters=fresh_counters)
    assert fresh.action == "allow"
    assert any("counters read as 0" in line for line in fresh.trace)


def test_state_conditions_without_counter_values_fail_closed() -> None:
    verdict = decide(policy(INTERCEPT_SPEND), "refund", {})
    assert (verdict.action, verdict.rule_id) == ("deny", "refunds only while spend is low")
    assert "reads counter 'create_charge.daily_spend'" in verdict.reason
    # rules that only reserve (no state condition) need no counter values
    assert decide(policy(INTERCEPT_SPEND), "create_charge", {"amount": 1}).action == "allow"


def test_intercept_state_block_without_a_limit_only_counts() -> None:
    p = policy(
        """
        version: "1"
        tools:
          send:
            rules:
              - name: "count sends"
                conditions: [{path: args.to, op: exists, value: true}]
                state: {counter: sent, window: hour}
        """
    )
    (limit,) = decide(p, "send", {"to": "x"}).limits
    assert (limit.counter, limit.max, limit.cost) == ("send.sent", COUNT_ONLY_MAX, 1)


def test_intercept_default_deny_is_not_rescued_by_star_rules() -> None:
    p = policy(
        """
        version: "1"
        default: deny
        tools:
          read_file:
            rules: []
          "*":
            rules:
              - name: "global"
                rate_limit: 60/minute
        """
    )
    listed = decide(p, "read_file", {})
    assert listed.action == "allow"
    assert [l.counter for l in listed.limits] == ["_global._rate_minute"]
    unlisted = decide(p, "write_file", {})
    assert (unlisted.action, unlisted.rule_id, unlisted.limits) == ("deny", "default", ())


def test_intercept_evaluate_rule_denies_when_any_condition_fails() -> None:
    p = policy(
        """
        version: "1"
        tools:
          create_charge:
            rules:
              - name: "safe charge"
                conditions:
                  - {path: "args.amount", op: "lte", value: 50000}
                  - {path: "args.currency", op: "in", value: ["usd", "eur"]}
                on_deny: "Charges up to 500 in USD or EUR only"
        """
    )
    assert decide(p, "create_charge", {"amount": 100, "currency": "usd"}).action == "allow"
    for args in ({"amount": 100, "currency": "gbp"}, {"amount": 60000, "currency": "usd"}, {}):
        verdict = decide(p, "create_charge", args)
        assert (verdict.action, verdict.reason) == ("deny", "Charges up to 500 in USD or EUR only")
    # default allow: tools the file does not name pass
    assert decide(p, "list_charges", {}).action == "allow"
