"""The Intercept dialect (PolicyLayer's open-source MCP proxy), read as Intercept means it.

Read from Intercept's own code and docs (``internal/config/config.go``,
``internal/config/validate.go``, ``internal/engine``, ``internal/proxy/handler.go``,
``internal/state/sqlite.go``, ``POLICY.md``):

* ``version: "1"`` is required; ``default`` is allow unless it says deny;
  ``description`` is free text; ``hide`` lists tools (``"*"`` hides all).
* With ``default: deny`` only the tools named under ``tools`` may be called
  (``rules: []`` permits a tool outright); an unlisted tool is refused before
  any rule, and ``"*"`` rules never rescue it. Rules only ever deny or limit.
* Every rule needs a ``name`` (its rule id here). ``action: deny`` (no
  conditions allowed) refuses the call with ``on_deny``. ``action: evaluate``
  (the default; at least one condition) requires *all* its conditions to
  hold, else the call is refused with ``on_deny``.
* ``state: {counter, window, increment, increment_from}`` keeps a counter
  named ``<tool>.<counter>`` (``_global.<counter>`` under ``"*"``) shared by
  every caller. A condition ``state.<tool>.<counter> lte N`` (or ``lt N``)
  on the rule's own counter is its limit: Intercept reserves ``increment``
  (or the value at ``increment_from``) and refuses the call when the counter
  would pass N. That becomes our ``RateLimit`` with scope global. Other
  ``state.`` conditions compare a counter's current value, before this
  call's increment, and are kept as conditions.
* ``rate_limit: "5/hour"`` is shorthand for an evaluate rule on counter
  ``<tool>._rate_hour`` with limit 5 and the default message "Rate limit of 5
  per hour reached. Try again later."; it cannot be combined with
  ``conditions``, ``state`` or ``action: deny``.

* ``state`` with ``increment_from: usage.tokens`` (or ``usage.cost_usd``,
  ``usage.worker_s``) is a spend budget (``guard.budgets``): not a number the
  caller passes, but what the turns the call starts report using; the
  ``lt``/``lte`` condition on it is the budget's limit. Such a counter is
  read by no other condition.

Where we differ on purpose: ``increment_from`` must be a whole number >= 0
on every call (Intercept truncates fractions and accepts negative values,
which would refund the budget); a negative static ``increment`` is refused
when the file is read. A ``state`` block without a limit condition still
counts (Intercept's docs say every allowed call increments it; its proxy
skips it). Windows slide (no more than N in any 60 s) where Intercept's are
calendar-aligned (it resets at each UTC minute, so up to 2N can pass across
a boundary). ``eq`` compares typed values (Intercept falls back to comparing
printed text, so ``"5"`` equals ``5`` there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from guard.dialects.fields import (
    INTERCEPT_OPS,
    CounterRegistry,
    build,
    read_condition,
    read_cost_from,
    version,
)
from guard.dialects.source import Node
from guard.policy import Budget, Condition, Policy, RateLimit, Rule

# ``increment_from: usage.<metric>`` makes a state counter a spend budget.
USAGE_METRICS = ("tokens", "cost_usd", "worker_s")

TOP_KEYS = ("version", "description", "default", "hide", "tools")
TOOL_KEYS = ("rules",)
RULE_KEYS = ("name", "action", "rate_limit", "conditions", "on_deny", "state")
STATE_KEYS = ("counter", "window", "increment", "increment_from")
WINDOWS = {"minute": 60.0, "hour": 3600.0, "day": 86400.0}
GLOBAL_SCOPE = "_global"  # the counter scope of "*" rules


def markers(top: dict[str, Node]) -> Node | None:
    """The first thing in a YAML document that only Intercept writes, if any."""
    if "description" in top:
        return top["description"]
    tools = top.get("tools")
    if tools is None or not tools.is_mapping:
        return None
    for tool_node in tools.value.values():
        rules = tool_node.value.get("rules") if tool_node.is_mapping else None
        if rules is None or not isinstance(rules.value, list):
            continue
        for rule in rules.value:
            if not rule.is_mapping:
                continue
            for key in ("name", "on_deny", "state"):
                if key in rule.value:
                    return rule.value[key]
            action = rule.value.get("action")
            if action is not None and action.value == "evaluate":
                return action
            rate = rule.value.get("rate_limit")
            if rate is not None and isinstance(rate.value, str):
                return rate
    return None


@dataclass
class _State:
    counter: str  # "<scope>.<counter>", the key conditions use after "state."
    window_s: float
    cost: int
    cost_from: str | None
    # ``increment_from: usage.<metric>``: the counter is a spend budget
    # charged with what the started turns use (guard.budgets), not a call counter.
    usage: str | None = None


def read(root: Node) -> Policy:
    top = root.mapping(TOP_KEYS, required=("version",), what="a mapping of policy keys")
    if "description" in top:
        top["description"].string(empty=True)
    registry = CounterRegistry()
    tools: dict[str, tuple[Rule, ...]] = {}
    tools_node = top.get("tools")
    if tools_node is not None and tools_node.value is not None:
        rule_nodes = {
            tool: _rule_nodes(tool_node)
            for tool, tool_node in tools_node.mapping(what="a mapping of tool names").items()
        }
        # Counters first: a condition may read a counter another tool defines.
        states = {
            tool: [_define_state(tool, node, registry) for node in nodes]
            for tool, nodes in rule_nodes.items()
        }
        for tool, nodes in rule_nodes.items():
            tools[tool] = tuple(
                _read_rule(tool, node, state, registry)
                for node, state in zip(nodes, states[tool], strict=True)
            )
    registry.check_references(" (a state block with that counter on that tool)")
    hide = top["hide"].strings() if "hide" in top else ()
    return Policy(
        version=version(top["version"]),
        dialect="intercept",
        default=top["default"].choice(("allow", "deny")) if "default" in top else "allow",
        mode="enforce",
        hide=hide,
        tools=tools,
        counters=registry.counters,
        listing_permits=True,
    )


def _rule_nodes(tool_node: Node) -> list[Node]:
    if tool_node.value is None:
        return []
    entries = tool_node.mapping(TOOL_KEYS, what="a mapping with 'rules'")
    return entries["rules"].sequence() if "rules" in entries else []


def _scope(tool: str) -> str:
    return GLOBAL_SCOPE if tool == "*" else tool


def _parse_shorthand(node: Node) -> tuple[int, str]:
    text = node.string()
    count_text, sep, window = text.partition("/")
    count_text = count_text.strip()
    if not sep:
        raise node.error(f'must be "N/window" (e.g. "5/hour"), got "{text}"')
    if not count_text.isdigit() or int(count_text) <= 0:
        raise node.error(f'count must be a positive integer, got "{count_text}"')
    window = window.strip()
    if window not in WINDOWS:
        raise node.error(f'window must be "minute", "hour" or "day", got "{window}"')
    return int(count_text), window


def _define_state(tool: str, node: Node, registry: CounterRegistry) -> _State | None:
    """Register the counter a rule keeps (its ``state`` or ``rate_limit``)."""
    entries = node.mapping(RULE_KEYS)
    if "rate_limit" in entries:
        _, window = _parse_shorthand(entries["rate_limit"])
        state = _State(f"{_scope(tool)}._rate_{window}", WINDOWS[window], 1, None)
        where = entries["rate_limit"]
    elif "state" in entries:
        where = entries["state"]
        values = where.mapping(STATE_KEYS, required=("counter", "window"))
        name = values["counter"].string()
        window_node = values["window"]
        window = window_node.choice(tuple(WINDOWS))
        cost = values["increment"].integer(minimum=0) if "increment" in values else 0
        source = values.get("increment_from")
        if source is not None and isinstance(source.value, str) and source.value.startswith("usage."):
            metric = source.value.removeprefix("usage.")
            if metric not in USAGE_METRICS:
                raise source.error(f"usage counters are usage.{', usage.'.join(USAGE_METRICS)}; got {source.value!r}")
            counter = f"{_scope(tool)}.{name}"
            if counter in registry.counters or counter in registry.usage:
                raise where.error(f"duplicate state counter {name!r} on tool {tool!r}")
            registry.usage.add(counter)
            return _State(counter, WINDOWS[window], 0, None, usage=metric)
        cost_from = (
            read_cost_from(values["increment_from"]) if "increment_from" in values else None
        )
        # Intercept: an omitted (or zero) increment means 1.
        state = _State(f"{_scope(tool)}.{name}", WINDOWS[window], cost or 1, cost_from)
    else:
        return None
    if state.counter in registry.counters:
        raise where.error(
            f"duplicate state counter {state.counter.partition('.')[2]!r} on tool {tool!r}"
            + (" (two rate_limit rules with the same window)" if "rate_limit" in entries else "")
        )
    registry.define(state.counter, state.window_s, "global", where)
    return state


def _read_rule(tool: str, node: Node, state: _State | None, registry: CounterRegistry) -> Rule:
    entries = node.mapping(RULE_KEYS, required=("name",))
    name = entries["name"].string()
    on_deny = entries["on_deny"].string() if "on_deny" in entries else None
    action = entries["action"].choice(("evaluate", "deny")) if "action" in entries else "evaluate"

    if "rate_limit" in entries:
        shorthand = entries["rate_limit"]
        if "conditions" in entries or "state" in entries:
            raise shorthand.error(
                "rate_limit cannot be combined with conditions or state; "
                "use separate rules or the full syntax"
            )
        if action == "deny":
            raise shorthand.error('rate_limit cannot be used with action "deny"')
        count, window = _parse_shorthand(shorthand)
        assert state is not None
        reason = on_deny or f"Rate limit of {count} per {window} reached. Try again later."
        limit = RateLimit(
            max=count, window_s=state.window_s, scope="global", counter=state.counter, reason=reason
        )
        return build(
            node, Rule, id=name, tool=tool, action="allow", reason=reason,
            on_fail="deny", rate_limit=limit, line=node.line,
        )  # fmt: skip

    condition_nodes = entries["conditions"].sequence() if "conditions" in entries else []
    if action == "deny":
        if condition_nodes:
            raise entries["conditions"].error("deny rules must not have conditions")
        return build(
            node, Rule, id=name, tool=tool, action="deny",
            reason=on_deny or f"Denied by rule {name!r}", line=node.line,
        )  # fmt: skip
    if not condition_nodes:
        where = entries.get("conditions", node)
        raise where.error("evaluate rules must have at least one condition")

    own_path = f"state.{state.counter}" if state else None
    limit_max: int | None = None
    budget_limit: float | None = None
    conditions: list[Condition] = []
    for cond_node in condition_nodes:
        condition, path_node = read_condition(cond_node, ops=INTERCEPT_OPS)
        if condition.path.removeprefix("state.") in registry.usage:
            if state is None or state.usage is None or condition.path != own_path or condition.op not in ("lt", "lte"):
                raise path_node.error(
                    "a usage counter (increment_from: usage.…) is a budget: only its own rule may limit it, "
                    "with lt or lte"
                )
            if budget_limit is None:
                budget_limit = float(condition.value)
            continue
        if condition.path.startswith("state."):
            # Intercept's state paths name the scope too: state.<tool>.<counter>.
            if condition.path.count(".") < 2:
                raise path_node.error(
                    f"state paths are state.<tool>.<counter> (or state._global.<counter>), "
                    f"got {condition.path!r}"
                )
            registry.refer(condition.path.removeprefix("state."), path_node)
        if (
            limit_max is None
            and condition.path == own_path
            and condition.op in ("lt", "lte")
        ):
            limit_max = _limit(condition, cond_node)
            continue  # enforced by the reservation, not as a condition
        conditions.append(condition)

    reason = on_deny or f"Denied by rule {name!r}"
    if state is not None and state.usage is not None:
        if budget_limit is None:
            raise entries["state"].error(
                f"a usage counter needs a limit: a condition {own_path} lte N on the same rule"
            )
        metric = state.usage
        budget = build(
            entries["state"], Budget, window_s=state.window_s, scope="global", name=state.counter,
            **{metric: int(budget_limit) if metric == "tokens" else budget_limit},
        )  # fmt: skip
        return build(
            node, Rule, id=name, tool=tool, action="allow", reason=reason, conditions=tuple(conditions),
            match="all", on_fail="deny", budget=budget, line=node.line,
        )  # fmt: skip
    rate_limit = None
    if state is not None:
        rate_limit = build(
            entries["state"],
            RateLimit,
            max=limit_max,
            window_s=state.window_s,
            scope="global",
            cost=state.cost,
            cost_from=state.cost_from,
            counter=state.counter,
            reason=on_deny or f"Rate limit exceeded for {name}",
        )
    return build(
        node,
        Rule,
        id=name,
        tool=tool,
        action="allow",
        reason=reason,
        conditions=tuple(conditions),
        match="all",
        on_fail="deny",
        rate_limit=rate_limit,
        line=node.line,
    )


def _limit(condition: Condition, node: Node) -> int:
    """The most units a counter may reach: ``lte N`` → N, ``lt N`` → N - 1 (whole units)."""
    value = float(condition.value)
    limit = math.floor(value) if condition.op == "lte" else math.ceil(value) - 1
    if limit < 0:
        raise node.error(
            f"a counter can never be {condition.op} {condition.value}; "
            "use action: deny to refuse every call"
        )
    return limit
