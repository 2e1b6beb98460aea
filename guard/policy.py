"""The one policy model every dialect is read into.

A policy is a default, a mode, a list of hidden tools and, per tool name (or
``"*"`` for every tool), an ordered list of rules. The dialect readers in
``guard.dialects`` produce it; ``guard.decision`` evaluates it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Scope = Literal["session", "identity", "global"]
Action = Literal["allow", "deny", "require_approval"]
Dialect = Literal["taskwarden", "intercept", "policylayer-json"]
Op = Literal[
    "eq",
    "neq",
    "in",
    "not_in",
    "lt",
    "lte",
    "gt",
    "gte",
    "regex",
    "not_regex",
    "contains",
    "exists",
    "max_length",
]

OPS: tuple[str, ...] = Op.__args__  # type: ignore[attr-defined]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RateLimit(_Frozen):
    """At most ``max`` units in any ``window_s`` seconds, counted per ``scope``."""

    # ``None``: the counter only counts and is never full. Intercept's ``state``
    # blocks without a limit condition are such counters: other rules read
    # them through ``state.<counter>`` conditions.
    max: Annotated[int, Field(ge=0)] | None
    window_s: float = Field(gt=0)
    scope: Scope = "session"
    # Units one call takes (the Intercept dialect's ``increment``).
    cost: int = Field(default=1, ge=0)
    # Argument path whose value is the cost (Intercept's ``increment_from``);
    # must resolve to a non-negative number or the call is refused.
    cost_from: str | None = None
    # Counters with the same name are shared across rules and tools; unnamed
    # counters belong to their rule.
    counter: str | None = None
    # What a caller is told when the limit is full; ``None``: generated from
    # the numbers ("30 calls per 60 s per session"). Intercept's ``on_deny``.
    reason: str | None = None


class Budget(_Frozen):
    """What the turns started by matching calls may use in ``window_s``, per ``scope``.

    At least one of ``tokens`` (input + output), ``cost_usd`` and ``worker_s``.
    Rules sharing a ``name`` share one budget; unnamed budgets belong to their rule.
    """

    tokens: Annotated[int, Field(ge=0)] | None = None
    cost_usd: Annotated[float, Field(ge=0)] | None = None
    worker_s: Annotated[float, Field(ge=0)] | None = None
    window_s: float = Field(gt=0)
    scope: Scope = "session"
    name: str | None = None


class Counter(_Frozen):
    """A named counter, readable by conditions as ``state.<name>``."""

    window_s: float = Field(gt=0)
    scope: Scope


class Condition(_Frozen):
    """``path`` (``args.x.y`` or ``state.<counter>``) compared with ``value`` by ``op``."""

    path: str
    op: Op
    value: Any = None


class ApprovalSettings(_Frozen):
    expires_s: float = Field(default=900, gt=0)
    wait_s: float = Field(default=20, ge=0)
    # Ask the person at the MCP client too (elicitation). Off unless a rule
    # opts in: many clients answer elicitation on their own (codex exec and
    # claude -p decline at once; others may accept), so by default only a
    # human in the inbox or the CLI decides.
    elicit: bool = False
    # Who may decide (people's names or role names; None: any approver) and
    # how many approvals it takes; one denial denies (guard.approvers).
    approvers: tuple[str, ...] | None = None
    quorum: int = Field(default=1, ge=1, le=100)
    # Nobody decided within this long: notify ``escalate_to`` (who may decide too).
    escalate_after_s: float | None = Field(default=None, gt=0)
    escalate_to: tuple[str, ...] = ()


class Rule(_Frozen):
    id: str  # "<tool>#<n>" (1-based within the tool) unless the file names it
    tool: str
    action: Action = "allow"
    reason: str | None = None
    conditions: tuple[Condition, ...] = ()
    match: Literal["all", "any"] = "all"
    # What failing conditions mean: "skip" — the rule does not apply (our
    # dialect); "deny" — the call is denied with ``reason`` (Intercept).
    on_fail: Literal["skip", "deny"] = "skip"
    identities: tuple[str, ...] | None = None
    rate_limit: RateLimit | None = None
    approval: ApprovalSettings | None = None
    budget: Budget | None = None
    line: int | None = None  # where the rule starts in its file


class Policy(_Frozen):
    version: str = "1"
    dialect: Dialect = "taskwarden"
    default: Literal["allow", "deny"] = "allow"
    mode: Literal["enforce", "shadow"] = "enforce"
    hide: tuple[str, ...] = ()
    tools: dict[str, tuple[Rule, ...]] = Field(default_factory=dict)
    # Named counters (from rate limits and Intercept ``state`` blocks) that
    # ``state.<name>`` conditions may read.
    counters: dict[str, Counter] = Field(default_factory=dict)
    # False (taskwarden): an applicable allow or require_approval rule permits
    # a call; with none, the default decides (a tool listed with no rules at
    # all is permitted). True (Intercept, PolicyLayer JSON): naming a tool
    # under ``tools`` permits it, its rules only deny or limit, and with
    # ``default: deny`` an unlisted tool is refused before any ``*`` rule.
    listing_permits: bool = False
    # Identities that see every identity's sessions ("*": every identity).
    # The guard only states it (``Guard.sees_all``); the host app enforces it.
    share: tuple[str, ...] = ()
    source: str | None = None  # the file it came from, for messages

    @property
    def rule_count(self) -> int:
        return sum(len(rules) for rules in self.tools.values())
