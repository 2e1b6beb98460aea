"""``taskwarden policy check|explain|test``: the functions behind the verbs.

Each writes its report to ``out`` (default ``sys.stdout``) and returns the
exit code: 0 success; 1 an invalid policy or a failing test; 2 bad input to
the command itself (arguments that are not JSON, a malformed cases file).

A cases file (``policy test``), in the spirit of ``opa test``::

    cases:                       # or a bare list of cases
      - name: spawning is rate limited
        tool: spawn-task
        args: {prompt: "hi"}     # optional, default {}
        identity: alice          # optional
        expect: allow            # allow | deny | require_approval | hidden
        rule: spawn-task#1       # optional: the deciding rule id
        counters: {c: 3}         # optional: values state.<counter> reads (default 0)
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from guard.approvers import describe as describe_approvers
from guard.decision import Verdict, decide, describe_budget, fresh_counters
from guard.dialects import PolicyError, load_policy, parse_document
from guard.dialects.source import Node
from guard.policy import Policy, Scope
from guard.validation import ArgumentChecker
from guard.storage.database import is_server_url

EXPECTATIONS = ("allow", "deny", "require_approval", "hidden")
CASE_KEYS = ("name", "tool", "args", "identity", "expect", "rule", "counters")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _print(out: TextIO | None, text: str = "") -> None:
    # These are CLI verbs: their report is their output (never the MCP server's stdout).
    (out if out is not None else sys.stdout).write(text + "\n")


def _load(path: str | Path, out: TextIO | None) -> Policy | None:
    try:
        return load_policy(path)
    except PolicyError as exc:
        _print(out, f"error: {exc}")
        return None


def check(
    path: str | Path, out: TextIO | None = None, tools: Collection[str] | None = None, server: str = "the server"
) -> int:
    """Validate a policy file: ``OK: <file> (<dialect>, N rules, default D, mode M)``.

    With ``tools`` (the server's tool names), also warn about every name the
    policy gives that is not one of them: a typo'd name guards nothing, and
    the tool meant falls to the default. A warning fails the check (exit 1),
    so a CI step that runs it stops there.
    """
    policy = _load(path, out)
    if policy is None:
        return EXIT_FAILED
    rules = policy.rule_count
    shape = f"{policy.dialect}, {rules} rule{'s' if rules != 1 else ''}, default {policy.default}, mode {policy.mode}"
    warnings = unknown_tools(policy, tools, server) if tools is not None else []
    if not warnings:
        _print(out, f"OK: {path} ({shape})")
        return EXIT_OK
    _print(out, f"WARNING: {path} ({shape}): {len(warnings)} warning{'s' if len(warnings) != 1 else ''}")
    for line in warnings:
        _print(out, f"warning: {line}")
    return EXIT_FAILED


def unknown_tools(policy: Policy, tools: Collection[str], server: str = "the server") -> list[str]:
    """A sentence for each tool name in ``policy`` (rules and ``hide``) that ``tools`` lacks."""
    named = [(name, "has rules for") for name in policy.tools] + [(name, "hides") for name in policy.hide]
    lines = []
    for name, where in named:
        if name == "*" or name in tools:
            continue
        close = difflib.get_close_matches(name, list(tools), n=1)
        meant = f" (did you mean {close[0]!r}? it falls to default {policy.default} instead)" if close else ""
        lines.append(f"the policy {where} {name!r}, which is not a tool of {server}{meant}")
    return lines


def explain(
    path: str | Path,
    tool: str,
    args_json: str,
    identity: str | None = None,
    out: TextIO | None = None,
    db_path: str | Path | None = None,
    schemas: Mapping[str, Mapping[str, Any]] | None = None,
) -> int:
    """Print the decision on one call, the rate limits it would reserve, its
    budgets (with their use now, for the identity, when ``db_path`` exists), and why.

    ``schemas`` (the server's tools and their input schemas) makes the decision
    the server's: an unknown tool is hidden, arguments out of bounds refused."""
    try:
        args = json.loads(args_json)
    except json.JSONDecodeError as exc:
        _print(out, f"error: --args is not valid JSON: {exc}")
        return EXIT_USAGE
    if not isinstance(args, dict):
        _print(out, f"error: --args must be a JSON object, got {type(args).__name__}")
        return EXIT_USAGE
    policy = _load(path, out)
    if policy is None:
        return EXIT_FAILED
    if schemas is not None:
        # The guard's own first steps (guard.gate.Guard.admit): an unknown tool, then the
        # arguments against the tool's schema, then the rules on the arguments with defaults.
        checker = ArgumentChecker(schemas)
        if tool not in checker:
            close = difflib.get_close_matches(tool, list(schemas), n=1)
            _print(out, "decision: hidden")
            _print(out, "rule: (none)")
            _print(out, f"reason: the server has no tool {tool!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            _print(out, "the client gets the JSON-RPC error \"Unknown tool\"")
            return EXIT_OK
        hidden = tool in policy.hide or "*" in policy.hide  # decided as absent before its arguments
        problem = None if hidden else checker.check(tool, args)
        if problem is not None:
            field_name, message = problem
            _print(out, "decision: deny")
            _print(out, "rule: schema")
            _print(out, f"reason: invalid_arguments: {field_name}: {message}")
            _print(out, "the arguments are refused before any rule is looked at")
            return EXIT_OK
        args = checker.with_defaults(tool, args)
    verdict = decide(policy, tool, args, identity, fresh_counters)
    _print(out, f"decision: {verdict.effect}")
    _print(out, f"rule: {verdict.rule_id or '(none: the tool is listed)'}")
    _print(out, f"reason: {verdict.reason}")
    if verdict.shadow:
        _print(out, "mode: shadow (the call would be let through and this verdict logged)")
    if verdict.approval is not None:
        _print(
            out,
            f"approval: a human must approve; the call waits {verdict.approval.wait_s:g} s, "
            f"an approval expires after {verdict.approval.expires_s:g} s",
        )
        settings = verdict.approval
        _print(out, f"approvers: {describe_approvers(settings.approvers, settings.quorum)}; one denial denies")
        if settings.escalate_to:
            _print(out, f"escalation: after {settings.escalate_after_s:g} s, notify {', '.join(settings.escalate_to)}")
    if verdict.limits:
        _print(out, "rate limits reserved:")
        for limit in verdict.limits:
            _print(
                out,
                f"  {limit.rule_id}: {limit.reason} "
                f"(counter {limit.counter}, this call takes {limit.cost})",
            )
    elif verdict.action != "deny":
        _print(out, "rate limits reserved: none")
    if verdict.budgets:
        _print(out, "budgets charged by the turns it starts:")
        for rule_id, budget in verdict.budgets:
            _print(out, f"  {budget.name or rule_id} ({rule_id}): {describe_budget(budget)}")
        if db_path is not None and (is_server_url(db_path) or Path(db_path).exists()):
            import anyio

            from guard.budgets import targets_for
            from guard.commands import budget_state

            # A session is not known here: session budgets are shown for no session.
            targets = targets_for(verdict.budgets, "", identity or "", False)
            for line in anyio.run(budget_state, db_path, targets):
                _print(out, f"  now: {line}")
    _print(out, "trace:")
    for line in verdict.trace:
        _print(out, f"  {line}")
    return EXIT_OK


@dataclass(frozen=True)
class Case:
    name: str
    tool: str
    expect: str
    args: dict[str, Any] = field(default_factory=dict)
    identity: str | None = None
    rule: str | None = None
    counters: dict[str, int | float] = field(default_factory=dict)


def read_cases(path: str | Path) -> list[Case]:
    """The cases in a cases file; a malformed one raises ``PolicyError`` with its line."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        raise PolicyError(f"cannot read the file: {exc}", source=source) from exc
    root = parse_document(text, source)
    items_node = root
    if root.is_mapping:
        items_node = root.mapping(("cases",), required=("cases",))["cases"]
    items = items_node.sequence(allow_null=False) if root.value is not None else []
    if not items:
        raise root.error("no cases: expected a list of cases (or 'cases:' with one)")
    cases: list[Case] = []
    names: set[str] = set()
    for item in items:
        cases.append(_read_case(item, names))
    return cases


def _read_case(node: Node, names: set[str]) -> Case:
    entries = node.mapping(CASE_KEYS, required=("name", "tool", "expect"))
    name = entries["name"].string()
    if name in names:
        raise entries["name"].error(f"duplicate case name {name!r}")
    names.add(name)
    args: dict[str, Any] = {}
    if "args" in entries:
        entries["args"].mapping(what="a mapping of arguments")
        args = entries["args"].plain()
    counters: dict[str, int | float] = {}
    if "counters" in entries:
        values = entries["counters"].mapping(what="a mapping of counter values")
        for counter, value in values.items():
            counters[counter] = value.number(minimum=0)
    return Case(
        name=name,
        tool=entries["tool"].string(),
        expect=entries["expect"].choice(EXPECTATIONS),
        args=args,
        identity=entries["identity"].string() if "identity" in entries else None,
        rule=entries["rule"].string() if "rule" in entries else None,
        counters=counters,
    )


def _failure(case: Case, verdict: Verdict) -> str | None:
    got = f"{verdict.effect} by {verdict.rule_id or '(listed)'}: {verdict.reason}"
    if verdict.effect != case.expect:
        return f"expected {case.expect}, got {got}"
    if case.rule is not None and verdict.rule_id != case.rule:
        return f"expected rule {case.rule}, got {got}"
    return None


def test(path: str | Path, cases_path: str | Path, out: TextIO | None = None) -> int:
    """Run expected decisions as tests: ``PASS``/``FAIL`` per case and a summary."""
    policy = _load(path, out)
    if policy is None:
        return EXIT_FAILED
    try:
        cases = read_cases(cases_path)
    except PolicyError as exc:
        _print(out, f"error: {exc}")
        return EXIT_USAGE
    failed = 0
    for case in cases:

        def lookup(counter: str, window_s: float, scope: Scope, case: Case = case) -> int | float:
            return case.counters.get(counter, 0)

        verdict = decide(policy, case.tool, case.args, case.identity, lookup)
        problem = _failure(case, verdict)
        if problem is None:
            _print(out, f"PASS  {case.name}")
        else:
            failed += 1
            _print(out, f"FAIL  {case.name}: {problem}")
    _print(out, f"{len(cases) - failed} passed, {failed} failed")
    return EXIT_FAILED if failed else EXIT_OK
