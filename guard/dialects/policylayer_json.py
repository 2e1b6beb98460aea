"""The PolicyLayer JSON dialect: the policy document PolicyLayer attaches to grants.

Shape (from PolicyLayer's "Writing policies" page)::

    {"version": "1", "default": "deny", "hide": ["delete_account"],
     "all_tools": {"limits": [...]},
     "tools": {"create_charge": {"require": [], "deny_if": [], "limits": []}}}

* ``version`` ("1") and ``default`` (allow|deny) are required; ``default``
  controls the tools not listed under ``tools``. Listing a tool, even as
  ``{}``, permits it; its entries only deny or limit. ``hide`` removes tools
  (``"*"``: all of them).
* ``limits``: ``{"counter", "window", "max", "scope"}`` — at most ``max``
  calls per ``window`` ("minute", "hour", "day"; we also take seconds) on the
  named counter, which every limit naming it shares. ``scope: "grant"`` (the
  default) counts per grant: per caller identity here. ``all_tools.limits``
  apply to every call.
* ``require`` and ``deny_if`` are lists of argument conditions. The page names
  them without showing their entries; we read each entry as Intercept's
  ``{path, op, value}`` condition (the same company's vocabulary): every
  ``require`` entry must hold, and a call is denied when any ``deny_if``
  entry holds.

Assumed where the sources are silent: ``scope: "server"`` counts across all
grants (our ``global``); other scope values are errors.
"""

from __future__ import annotations

from guard import conditions as cond
from guard.dialects.fields import (
    INTERCEPT_OPS,
    CounterRegistry,
    build,
    read_condition,
    read_window,
    version,
)
from guard.dialects.source import Node
from guard.policy import Policy, RateLimit, Rule, Scope

TOP_KEYS = ("version", "default", "hide", "all_tools", "tools")
ALL_TOOLS_KEYS = ("limits",)
TOOL_KEYS = ("require", "deny_if", "limits")
LIMIT_KEYS = ("counter", "window", "max", "scope")
SCOPES: dict[str, Scope] = {"grant": "identity", "server": "global"}


def looks_like(top: dict[str, Node]) -> bool:
    """Whether a document uses this dialect's keys (``all_tools``, ``limits``, …)."""
    if "all_tools" in top:
        return True
    tools = top.get("tools")
    if tools is None or not tools.is_mapping:
        return False
    return any(
        tool.is_mapping and any(key in tool.value for key in TOOL_KEYS)
        for tool in tools.value.values()
    )


def read(root: Node) -> Policy:
    top = root.mapping(TOP_KEYS, required=("version", "default"), what="a JSON object")
    registry = CounterRegistry()
    tools: dict[str, tuple[Rule, ...]] = {}
    if "tools" in top and top["tools"].value is not None:
        for tool, tool_node in top["tools"].mapping(what="an object of tool names").items():
            if tool == "*":
                raise tool_node.error('use "all_tools" for limits on every tool')
            tools[tool] = _read_tool(tool, tool_node, TOOL_KEYS, registry)
    if "all_tools" in top:
        wildcard = _read_tool("*", top["all_tools"], ALL_TOOLS_KEYS, registry)
        if wildcard:
            tools["*"] = wildcard
    registry.check_references()
    return Policy(
        version=version(top["version"]),
        dialect="policylayer-json",
        default=top["default"].choice(("allow", "deny")),
        mode="enforce",
        hide=top["hide"].strings() if "hide" in top else (),
        tools=tools,
        counters=registry.counters,
        listing_permits=True,
    )


def _read_tool(
    tool: str, node: Node, keys: tuple[str, ...], registry: CounterRegistry
) -> tuple[Rule, ...]:
    if node.value is None:
        return ()
    rules: list[Rule] = []
    # Rule ids follow the file's order: "<tool>#1", "<tool>#2", …
    for key, section in node.mapping(keys, what="an object").items():
        for item in section.sequence():
            rule_id = f"{tool}#{len(rules) + 1}"
            if key == "limits":
                rules.append(_read_limit(tool, rule_id, item, registry))
                continue
            condition, path_node = read_condition(item, ops=INTERCEPT_OPS)
            if condition.path.startswith(cond.STATE_PREFIX):
                raise path_node.error("this dialect's conditions read arguments (args.…) only")
            if key == "require":
                reason = f"{tool} requires {cond.describe(condition)}"
                rule = build(
                    item, Rule, id=rule_id, tool=tool, action="allow", reason=reason,
                    conditions=(condition,), on_fail="deny", line=item.line,
                )  # fmt: skip
            else:
                reason = f"{tool} is denied when {cond.describe(condition)}"
                rule = build(
                    item, Rule, id=rule_id, tool=tool, action="deny", reason=reason,
                    conditions=(condition,), on_fail="skip", line=item.line,
                )  # fmt: skip
            rules.append(rule)
    return tuple(rules)


def _read_limit(tool: str, rule_id: str, node: Node, registry: CounterRegistry) -> Rule:
    entries = node.mapping(LIMIT_KEYS, required=("window", "max"))
    window_s = read_window(entries["window"])
    scope: Scope = "identity"  # per grant
    if "scope" in entries:
        scope = SCOPES[entries["scope"].choice(tuple(SCOPES))]
    counter = entries["counter"].string() if "counter" in entries else None
    if counter is not None:
        registry.define(counter, window_s, scope, entries["counter"])
    limit = build(
        node,
        RateLimit,
        max=entries["max"].integer(minimum=0),
        window_s=window_s,
        scope=scope,
        counter=counter,
    )
    return build(
        node, Rule, id=rule_id, tool=tool, action="allow", rate_limit=limit, line=node.line
    )
