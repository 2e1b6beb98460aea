"""taskwarden's own dialect: PolicyLayer's catalogue format, extended.

The catalogue format (what PolicyLayer's catalogue pages print)::

    tools:
      message-task:
        rules:
          - action: allow
            rate_limit: {max: 30, window: 60}
      cancel-task:
        rules:
          - action: deny
            reason: "Blocked by default — enable with approval"

Extended with top-level ``version`` ("1"), ``default`` (allow|deny),
``mode`` (enforce|shadow), ``hide`` and ``share`` (identities that see every
identity's sessions; ``"*"`` for all); per rule ``action``
(allow|deny|require_approval, required), ``reason``, ``conditions``
(``[{path, op, value}]``; ``value`` may be left out for ``exists``),
``match`` (all|any), ``identities``, ``rate_limit`` and ``approval``
(``{expires_s, wait_s, elicit, approvers, quorum, escalate_after_s,
escalate_to}``, require_approval rules only), ``budget``
(``{tokens, cost_usd, worker_s, window, scope, name}``: see guard.budgets);
and the tool key
``"*"`` for rules on every tool.

``rate_limit`` is ``{max, window, scope, cost}``: ``window`` in seconds or
"second"/"minute"/"hour"/"day"; ``scope`` session (default), identity or
global. Two optional keys reach the rest of the model: ``counter`` (a name
shared by every limit that uses it, readable by conditions as
``state.<name>``) and ``cost_from`` (an ``args.…`` path whose value is the
call's cost).

Meaning: a rule applies when the caller is in ``identities`` (if given) and
its conditions hold; an applicable deny denies, an applicable allow or
require_approval permits, every applicable rate limit is reserved. With no
applicable rule the default decides. **Without a ``default`` key the default
is allow**: a catalogue file speaks only of the tools it lists, so the tools
it does not mention keep working. A tool listed with no rules is permitted.
"""

from __future__ import annotations

from guard.dialects.fields import (
    CounterRegistry,
    build,
    read_condition,
    read_cost_from,
    read_window,
    version,
)
from guard.dialects.source import Node
from guard.approvers import is_role
from guard.policy import ApprovalSettings, Budget, Condition, Policy, RateLimit, Rule

TOP_KEYS = ("version", "default", "mode", "hide", "share", "tools")
TOOL_KEYS = ("rules",)
RULE_KEYS = (
    "action", "reason", "conditions", "match", "identities", "rate_limit", "approval", "budget",
)  # fmt: skip
RATE_LIMIT_KEYS = ("max", "window", "scope", "cost", "counter", "cost_from")
APPROVAL_KEYS = ("expires_s", "wait_s", "elicit", "approvers", "quorum", "escalate_after_s", "escalate_to")
BUDGET_KEYS = ("tokens", "cost_usd", "worker_s", "window", "scope", "name")


def read(root: Node) -> Policy:
    top = root.mapping(TOP_KEYS, what="a mapping of policy keys")
    registry = CounterRegistry()
    tools: dict[str, tuple[Rule, ...]] = {}
    tools_node = top.get("tools")
    if tools_node is not None and tools_node.value is not None:
        for tool, tool_node in tools_node.mapping(what="a mapping of tool names").items():
            tools[tool] = _read_tool(tool, tool_node, registry)
    registry.check_references()
    return Policy(
        version=version(top["version"]) if "version" in top else "1",
        dialect="taskwarden",
        default=top["default"].choice(("allow", "deny")) if "default" in top else "allow",
        mode=top["mode"].choice(("enforce", "shadow")) if "mode" in top else "enforce",
        hide=top["hide"].strings() if "hide" in top else (),
        tools=tools,
        counters=registry.counters,
        listing_permits=False,
        share=top["share"].strings() if "share" in top else (),
    )


def _read_tool(tool: str, node: Node, registry: CounterRegistry) -> tuple[Rule, ...]:
    if node.value is None:
        return ()
    entries = node.mapping(TOOL_KEYS, what="a mapping with 'rules'")
    if "rules" not in entries:
        return ()
    return tuple(
        _read_rule(tool, index, rule_node, registry)
        for index, rule_node in enumerate(entries["rules"].sequence())
    )


def _read_rule(tool: str, index: int, node: Node, registry: CounterRegistry) -> Rule:
    entries = node.mapping(RULE_KEYS, required=("action",))
    action = entries["action"].choice(("allow", "deny", "require_approval"))
    rule_id = f"{tool}#{index + 1}"

    conditions: list[Condition] = []
    if "conditions" in entries:
        for cond_node in entries["conditions"].sequence():
            condition, path_node = read_condition(cond_node, exists_default=True)
            if condition.path.startswith("state."):
                registry.refer(condition.path.removeprefix("state."), path_node)
            conditions.append(condition)

    identities = None
    if "identities" in entries:
        identities = entries["identities"].strings()
        if not identities:
            raise entries["identities"].error(
                "an empty list matches no caller; remove the key to match every caller"
            )

    rate_limit = None
    if "rate_limit" in entries:
        if action == "deny":
            raise entries["rate_limit"].error(
                "a deny rule refuses every call; a rate limit here has no effect"
            )
        rate_limit = _read_rate_limit(entries["rate_limit"], registry)

    approval = None
    if "approval" in entries:
        if action != "require_approval":
            raise entries["approval"].error("only a require_approval rule takes approval settings")
        approval_node = entries["approval"]
        values = approval_node.mapping(APPROVAL_KEYS)
        approval = build(
            approval_node,
            ApprovalSettings,
            **{
                name: values[name].number(minimum=0, exclusive=name in ("expires_s", "escalate_after_s"))
                for name in ("expires_s", "wait_s", "escalate_after_s")
                if name in values
            },
            **({"elicit": values["elicit"].boolean()} if "elicit" in values else {}),
            **_approvers(values),
        )

    budget = None
    if "budget" in entries:
        if action == "deny":
            raise entries["budget"].error("a deny rule refuses every call; a budget here has no effect")
        budget = _read_budget(entries["budget"])

    return build(
        node,
        Rule,
        id=rule_id,
        tool=tool,
        action=action,
        reason=entries["reason"].string() if "reason" in entries else None,
        conditions=tuple(conditions),
        match=entries["match"].choice(("all", "any")) if "match" in entries else "all",
        on_fail="skip",
        identities=identities,
        rate_limit=rate_limit,
        approval=approval,
        budget=budget,
        line=node.line,
    )


def _approvers(values: dict[str, Node]) -> dict[str, object]:
    """``approvers``, ``quorum`` and ``escalate_to``, checked against each other."""
    out: dict[str, object] = {}
    approvers: tuple[str, ...] | None = None
    if "approvers" in values:
        approvers = values["approvers"].strings()
        if not approvers:
            raise values["approvers"].error("an empty list lets nobody approve; remove the key for any approver")
        for name in approvers:
            if not name.strip():
                raise values["approvers"].error("an approver must be a person's name or a role, not empty")
        out["approvers"] = approvers
    if "quorum" in values:
        quorum = values["quorum"].integer(minimum=1)
        if quorum > 100:
            raise values["quorum"].error(f"must be at most 100, got {quorum}")
        # Only names can be counted: a role may hold any number of people.
        if approvers and not any(is_role(a) for a in approvers) and quorum > len(approvers):
            raise values["quorum"].error(
                f"needs {quorum} approvals but only {len(approvers)} approver(s) are named"
            )
        out["quorum"] = quorum
    if "escalate_to" in values:
        escalate_to = values["escalate_to"].strings()
        if not escalate_to:
            raise values["escalate_to"].error("an empty list notifies nobody; remove the key")
        if "escalate_after_s" not in values:
            raise values["escalate_to"].error("escalate_to needs escalate_after_s (seconds without a decision)")
        out["escalate_to"] = escalate_to
    elif "escalate_after_s" in values:
        raise values["escalate_after_s"].error("escalate_after_s needs escalate_to (names or roles to notify)")
    return out


def _read_rate_limit(node: Node, registry: CounterRegistry) -> RateLimit:
    entries = node.mapping(RATE_LIMIT_KEYS, required=("max", "window"))
    window_s = read_window(entries["window"])
    scope = "session"
    if "scope" in entries:
        scope = entries["scope"].choice(("session", "identity", "global"))
    counter = entries["counter"].string() if "counter" in entries else None
    if counter is not None:
        registry.define(counter, window_s, scope, entries["counter"])  # type: ignore[arg-type]
    return build(
        node,
        RateLimit,
        max=entries["max"].integer(minimum=0),
        window_s=window_s,
        scope=scope,
        cost=entries["cost"].integer(minimum=0) if "cost" in entries else 1,
        cost_from=read_cost_from(entries["cost_from"]) if "cost_from" in entries else None,
        counter=counter,
    )


def _read_budget(node: Node) -> Budget:
    entries = node.mapping(BUDGET_KEYS, required=("window",))
    limits = [m for m in ("tokens", "cost_usd", "worker_s") if m in entries]
    if not limits:
        raise node.error("a budget needs at least one of tokens, cost_usd, worker_s")
    return build(
        node,
        Budget,
        tokens=entries["tokens"].integer(minimum=0) if "tokens" in entries else None,
        cost_usd=entries["cost_usd"].number(minimum=0) if "cost_usd" in entries else None,
        worker_s=entries["worker_s"].number(minimum=0) if "worker_s" in entries else None,
        window_s=read_window(entries["window"]),
        scope=entries["scope"].choice(("session", "identity", "global")) if "scope" in entries else "session",
        name=entries["name"].string() if "name" in entries else None,
    )
