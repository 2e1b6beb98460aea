"""One decision per tool call, made from the policy alone.

``decide`` is pure: it reads the policy, the call and, for Intercept-style
``state.<counter>`` conditions, the counters through the ``counters`` lookup
it is given (a rule that reads a counter denies when no lookup is given:
fail closed). It reserves nothing; ``Verdict.limits`` lists the rate limits
the caller must then find room in (``guard.limits``).

How a verdict is reached:

1. a hidden tool (``hide``, or ``"*"`` in it) → ``hidden``;
2. the tool's rules, then the ``"*"`` rules, in file order. A rule applies
   when the caller is one of its ``identities`` (if it names any) and its
   conditions hold (``match: all|any``). Conditions that fail skip the rule,
   or deny the call when the rule says ``on_fail: deny`` (Intercept). The
   first applicable deny wins;
3. an applicable allow or require_approval rule permits the call (taskwarden
   dialect); for Intercept and PolicyLayer JSON, being listed under ``tools``
   permits it. Otherwise the default decides;
4. any applicable require_approval rule → ``require_approval`` (the first
   one's settings); every applicable rule's rate limit is collected, its
   cost resolved from ``cost_from`` when it has one. A cost that is missing,
   negative, fractional or not a number denies the call: a negative cost
   would refund the budget.

In shadow mode the verdict still says what enforcement would do, with
``shadow=True``: the caller logs it and lets the call through.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from guard import conditions as cond
from guard.limits import LimitRequest
from guard.policy import Action, ApprovalSettings, Budget, Policy, RateLimit, Rule, Scope

# The ``max`` given to the limiter for a counter that only counts.
COUNT_ONLY_MAX = 2**53

#: What the policy does with a call: its action, or ``hidden`` for a hidden tool.
#: (Not ``guard.audit.Outcome``, which is how a call ended.)
Effect = Literal["allow", "deny", "require_approval", "hidden"]


class CounterLookup(Protocol):
    """The current units in a named counter's window, for the calling scope."""

    def __call__(self, counter: str, window_s: float, scope: Scope) -> int | float: ...


def fresh_counters(counter: str, window_s: float, scope: Scope) -> int:
    """A ``CounterLookup`` for which every counter is empty (``policy explain``)."""
    return 0


class _NoCounters(Exception):
    def __init__(self, counter: str) -> None:
        super().__init__(counter)
        self.counter = counter


@dataclass(frozen=True)
class Verdict:
    """What the policy says about one call."""

    hidden: bool  # the tool is hidden: answer as for a tool that does not exist
    action: Action  # "deny" for hidden tools
    rule_id: str | None  # the deciding rule; "default", "hide"; None: listed, no rule
    reason: str  # the rule's reason, or a generated sentence
    approval: ApprovalSettings | None = None  # set when action is require_approval
    limits: tuple[LimitRequest, ...] = ()  # room to reserve before the call runs
    # (rule id, budget) of every applicable rule with a budget: the call is
    # refused while one is spent, and the turns it starts are charged to them.
    budgets: tuple[tuple[str, Budget], ...] = ()
    shadow: bool = False  # the policy's mode is shadow: log, do not enforce
    trace: tuple[str, ...] = ()  # how the verdict was reached, for `policy explain`

    @property
    def effect(self) -> Effect:
        """``hidden`` for a hidden tool, else the action."""
        return "hidden" if self.hidden else self.action


def describe_limit(limit: RateLimit, cost: int | None = None) -> str:
    """``30 calls per 60 s per session`` (units when a call may cost more than 1)."""
    per_call = limit.cost if cost is None else cost
    unit = "calls" if limit.cost_from is None and per_call == 1 else "units"
    scope = {
        "session": "per session",
        "identity": "per identity",
        "global": "across all callers",
    }[limit.scope]
    if limit.max is None:
        return f"counts {unit} per {limit.window_s:g} s {scope} (no limit)"
    return f"{limit.max} {unit} per {limit.window_s:g} s {scope}"


def describe_budget(budget: Budget) -> str:
    """``tokens 2,000,000, cost $5 per day per identity``."""
    parts = []
    if budget.tokens is not None:
        parts.append(f"tokens {budget.tokens:,}")
    if budget.cost_usd is not None:
        parts.append(f"cost ${budget.cost_usd:g}")
    if budget.worker_s is not None:
        parts.append(f"worker seconds {budget.worker_s:g}")
    named = {1: "second", 60: "minute", 3600: "hour", 86400: "day", 604800: "week"}
    window = f"per {named[budget.window_s]}" if budget.window_s in named else f"per {budget.window_s:g} s"
    who = {"session": "per session", "identity": "per identity", "global": "across all callers"}[budget.scope]
    return f"{', '.join(parts)} {window} {who}"


def resolve_cost(limit: RateLimit, args: Mapping[str, Any]) -> int | str:
    """The units this call takes, or why its ``cost_from`` argument cannot be used."""
    if limit.cost_from is None:
        return limit.cost
    path = limit.cost_from
    name = path.removeprefix(cond.ARGS_PREFIX)
    value = cond.resolve_args(path, args)
    counted = (
        f"it is counted against {limit.counter}" if limit.counter else "it sets the call's cost"
    )
    if value is cond.MISSING or value is None:
        return f"argument {name!r} is required ({counted})"
    if not cond.is_number(value) or not math.isfinite(value):
        return f"argument {name!r} must be a number ({counted}), got {cond.show(value)}"
    if value < 0:
        return f"argument {name!r} must not be negative ({counted}), got {cond.show(value)}"
    if isinstance(value, float) and not value.is_integer():
        return f"argument {name!r} must be a whole number ({counted}), got {cond.show(value)}"
    return int(value)


def decide(
    policy: Policy,
    tool: str,
    args: Mapping[str, Any],
    identity: str | None = None,
    counters: CounterLookup | None = None,
) -> Verdict:
    """The verdict of ``policy`` on calling ``tool`` with ``args`` as ``identity``.

    ``counters`` supplies counter values for ``state.<name>`` conditions
    (Intercept policies). Without it, a rule that reads a counter denies the
    call rather than guess; pass ``fresh_counters`` to read every counter as
    0, as ``policy explain`` does. Errors raised by ``counters`` propagate.
    """
    return _Decider(policy, tool, args, identity, counters).run()


class _Decider:
    def __init__(
        self,
        policy: Policy,
        tool: str,
        args: Mapping[str, Any],
        identity: str | None,
        counters: CounterLookup | None,
    ) -> None:
        self.policy = policy
        self.tool = tool
        self.args = args
        self.identity = identity
        self.counters = counters
        self.trace: list[str] = []
        self.noted_fresh_counters = False
        self.budgets: list[tuple[str, Budget]] = []

    def verdict(self, action: Action, rule_id: str | None, reason: str, **more: Any) -> Verdict:
        self.trace.append(f"decision: {action} ({rule_id or 'no rule'}): {reason}")
        return Verdict(
            hidden=more.pop("hidden", False),
            action=action,
            rule_id=rule_id,
            reason=reason,
            shadow=self.policy.mode == "shadow",
            trace=tuple(self.trace),
            budgets=tuple(self.budgets) if action != "deny" else (),
            **more,
        )

    def run(self) -> Verdict:
        policy, tool = self.policy, self.tool
        if policy.mode == "shadow":
            self.trace.append("mode: shadow — this verdict is logged, not enforced")
        if tool in policy.hide or "*" in policy.hide:
            which = tool if tool in policy.hide else "every tool (*)"
            self.trace.append(f"hide: {which} is hidden")
            return self.verdict("deny", "hide", f"{tool} is hidden by this policy", hidden=True)

        listed = tool != "*" and tool in policy.tools
        if policy.listing_permits and not listed and policy.default == "deny":
            self.trace.append(f"{tool} is not listed under tools; default deny refuses it first")
            return self.verdict("deny", "default", self.default_deny_reason())

        rules = list(policy.tools[tool]) if listed else []
        if tool != "*":
            rules += policy.tools.get("*", ())
        if not rules:
            self.trace.append(f"no rules for {tool} or *")
        applied = self.apply_rules(rules)
        if isinstance(applied, Verdict):
            return applied
        return self.conclude(listed, *applied)

    def default_deny_reason(self) -> str:
        return f"{self.tool} is not allowed by this policy (default: deny)"

    def apply_rules(
        self, rules: list[Rule]
    ) -> Verdict | tuple[Rule | None, Rule | None, tuple[LimitRequest, ...]]:
        """A deny verdict, or (first applicable rule, first approval rule, limits)."""
        tool = self.tool
        first: Rule | None = None
        approval_rule: Rule | None = None
        limits: list[LimitRequest] = []
        for rule in rules:
            label = _label(rule)
            skip = self.identity_mismatch(rule)
            if skip:
                self.trace.append(f"{label}: skipped — {skip}")
                continue
            try:
                holds = self.conditions_hold(rule, label)
            except _NoCounters as missing:
                # Fail closed: guessing a counter's value could let a call through.
                self.trace.append(f"{label}: reads counter {missing.counter}, none given")
                return self.verdict(
                    "deny",
                    rule.id,
                    f"{tool}: rule {rule.id} reads counter {missing.counter!r}, "
                    "but the guard was given no counter values",
                )
            if not holds:
                if rule.on_fail == "deny":
                    self.trace.append(f"{label}: conditions failed — denies")
                    return self.verdict(
                        "deny", rule.id, rule.reason or f"{tool} was refused by rule {rule.id}"
                    )
                self.trace.append(f"{label}: skipped — conditions do not hold")
                continue
            if rule.action == "deny":
                self.trace.append(f"{label}: applies — deny")
                return self.verdict(
                    "deny", rule.id, rule.reason or f"{tool} is denied by rule {rule.id}"
                )
            # Intercept/PolicyLayer rules only constrain: passing one permits nothing.
            constrains = self.policy.listing_permits and rule.action == "allow"
            line = f"{label}: {'passes' if constrains else 'applies — ' + rule.action}"
            if rule.rate_limit is not None:
                request = self.limit_request(rule, rule.rate_limit)
                if isinstance(request, str):
                    self.trace.append(f"{line}; the cost of its rate limit cannot be read")
                    return self.verdict("deny", rule.id, f"{tool}: {request}")
                line += (
                    f"; rate limit {describe_limit(rule.rate_limit, request.cost)}"
                    f" (counter {request.counter}, cost {request.cost})"
                )
                limits.append(request)
            if rule.budget is not None:
                line += f"; budget {describe_budget(rule.budget)} (name {rule.budget.name or rule.id})"
                self.budgets.append((rule.id, rule.budget))
            self.trace.append(line)
            if rule.action == "require_approval" and approval_rule is None:
                approval_rule = rule
            first = first or rule
        return first, approval_rule, tuple(limits)

    def conclude(
        self,
        listed: bool,
        first: Rule | None,
        approval_rule: Rule | None,
        limits: tuple[LimitRequest, ...],
    ) -> Verdict:
        """No rule denied: whether the call is permitted, and how."""
        policy, tool = self.policy, self.tool
        if policy.listing_permits:
            permitted_by = "listing" if listed else "default"
        elif first is not None:
            permitted_by = "rule"
        elif listed and not policy.tools[tool]:
            permitted_by = "listing"  # listed with no rules at all
        else:
            permitted_by = "default"

        if permitted_by == "default" and policy.default == "deny":
            self.trace.append("no rule permits the call; default deny")
            return self.verdict("deny", "default", self.default_deny_reason())
        if approval_rule is not None:
            reason = approval_rule.reason or (
                f"{tool} needs a human's approval (rule {approval_rule.id})"
            )
            approval = approval_rule.approval or ApprovalSettings()
            return self.verdict(
                "require_approval", approval_rule.id, reason, approval=approval, limits=limits
            )
        if permitted_by == "rule" and first is not None:
            rule_id = first.id
            reason = first.reason or f"{tool} is allowed by rule {first.id}"
        elif permitted_by == "listing":
            rule_id, reason = None, f"{tool} is listed in this policy"
        else:
            rule_id, reason = "default", f"{tool} is allowed by this policy (default: allow)"
        return self.verdict("allow", rule_id, reason, limits=limits)

    def identity_mismatch(self, rule: Rule) -> str | None:
        if rule.identities is None or self.identity in rule.identities:
            return None
        who = "no identity" if self.identity is None else f"identity {self.identity!r}"
        return f"{who} is not one of {', '.join(rule.identities)}"

    def read_state(self, name: str) -> int | float | cond._Missing:
        spec = self.policy.counters.get(name)
        if spec is None:
            return cond.MISSING
        if self.counters is None:
            raise _NoCounters(name)
        if self.counters is fresh_counters and not self.noted_fresh_counters:
            self.trace.append("counters read as 0 (fresh): no counter values were given")
            self.noted_fresh_counters = True
        return self.counters(name, spec.window_s, spec.scope)

    def conditions_hold(self, rule: Rule, label: str) -> bool:
        if not rule.conditions:
            return True
        results = []
        for condition in rule.conditions:
            actual = cond.resolve(condition.path, self.args, self.read_state)
            ok = cond.test(condition.op, actual, condition.value)
            results.append(ok)
            self.trace.append(
                f"{label}: {cond.describe(condition)} is {'true' if ok else 'false'}"
                f" (value {cond.show(actual)})"
            )
        return all(results) if rule.match == "all" else any(results)

    def limit_request(self, rule: Rule, limit: RateLimit) -> LimitRequest | str:
        cost = resolve_cost(limit, self.args)
        if isinstance(cost, str):
            return cost
        return LimitRequest(
            rule_id=rule.id,
            counter=limit.counter or rule.id,
            max=COUNT_ONLY_MAX if limit.max is None else limit.max,
            window_s=limit.window_s,
            scope=limit.scope,
            cost=cost,
            reason=limit.reason or describe_limit(limit, cost),
        )


def _label(rule: Rule) -> str:
    return f"{rule.id} (line {rule.line})" if rule.line is not None else rule.id
