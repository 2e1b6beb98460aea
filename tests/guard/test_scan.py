"""`taskwarden policy scan`'s starter policy, from tool annotations (no processes)."""

from __future__ import annotations

import mcp_types as types

from guard.decision import decide
from guard.dialects import parse_policy
from guard.scan import Kind, kind_of, starter_policy


def tool(name: str, annotations: types.ToolAnnotations | None) -> types.Tool:
    return types.Tool(name=name, input_schema={"type": "object"}, annotations=annotations)


READ = tool("read-it", types.ToolAnnotations(read_only_hint=True))
WRITE = tool("write-it", types.ToolAnnotations(read_only_hint=False, destructive_hint=False))
BARE = tool("bare", None)
DEFAULTED = tool("defaulted", types.ToolAnnotations(read_only_hint=False))  # destructiveHint left at true
DESTROY = tool("drop table", types.ToolAnnotations(destructive_hint=True))


def test_kinds_follow_the_annotations_and_the_specs_defaults() -> None:
    assert kind_of(READ) is Kind.READ_ONLY
    assert kind_of(WRITE) is Kind.WRITE
    assert kind_of(BARE) is Kind.WRITE  # no annotations: it may change something
    assert kind_of(DEFAULTED) is Kind.DESTRUCTIVE
    assert kind_of(DESTROY) is Kind.DESTRUCTIVE


def test_the_starter_policy_loads_and_decides_as_the_catalogue_pages_advise() -> None:
    text = starter_policy([WRITE, READ, BARE, DEFAULTED, DESTROY], "my-server --stdio")
    assert text.startswith("# Starter policy for my-server --stdio")
    policy = parse_policy(text, "scan output")
    assert policy.dialect == "taskwarden" and policy.default == "deny"

    assert decide(policy, "read-it", {}).action == "allow"
    assert decide(policy, "read-it", {}).limits == ()
    for name in ("write-it", "bare"):
        verdict = decide(policy, name, {})
        assert verdict.action == "allow"
        [limit] = verdict.limits
        assert (limit.max, limit.window_s, limit.scope) == (30, 60, "session")
    for name in ("defaulted", "drop table"):
        verdict = decide(policy, name, {})
        assert verdict.action == "require_approval"
        assert verdict.reason == f"{name} is destructive: a human approves each call"
    assert decide(policy, "not-listed", {}).action == "deny"


def test_a_server_without_tools_gets_a_policy_that_refuses_everything() -> None:
    policy = parse_policy(starter_policy([], "empty"), "scan output")
    assert decide(policy, "anything", {}).action == "deny"
