"""Spend budgets: tokens, dollars and worker seconds, charged as workers report them.

A rule's ``budget`` (``guard.policy.Budget``) caps what the turns started by
the calls it matches may use in a sliding window, per session, identity or
globally. The guard owns the ledger; whoever runs the turns (taskwarden's
runner) reports usage with ``BudgetLedger.charge`` for the ``BudgetTarget``s
recorded when the call was admitted, and stops a turn ``charge`` reports over.

The ledger is an append-only log in the guard's database
(``guard_budget_usage``), one row per charge per budget key, in integer
units (tokens, nano-dollars, microseconds) so sums are exact. Charging and
checking happen inside one write transaction (serialised across processes
and hosts on either backend): several processes charging one budget see
each other's rows in order, so exactly one
charge is the one that crosses.

``tokens`` counts input (cached included) plus output tokens.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from guard.storage.clock import Clock
from guard.storage.database import Database, Tx
from guard.policy import Budget, Scope

_US = 1_000_000
_NANO = 1_000_000_000
METRICS: tuple[str, ...] = ("tokens", "cost_usd", "worker_s")
# Ledger column per metric, and its scale from the reported unit.
_COLUMNS = {"tokens": ("tokens", 1), "cost_usd": ("cost_nusd", _NANO), "worker_s": ("worker_us", _US)}


@dataclass(frozen=True)
class BudgetTarget:
    """One budget key a turn charges: the budget's limits plus the caller's scope value."""

    name: str  # the budget's name (its rule id unless the policy names it)
    rule_id: str
    scope: Scope
    scope_value: str  # session id, identity, or "" (global)
    window_s: float
    tokens: int | None = None
    cost_usd: float | None = None
    worker_s: float | None = None
    shadow: bool = False  # record what it would stop, stop nothing

    def limit(self, metric: str) -> float | None:
        return getattr(self, metric)

    def describe(self, metric: str, used: float | None = None) -> str:
        """``tokens 2,000,412 of 2,000,000 per day per identity``."""
        limit = self.limit(metric)
        shown = f"{_show(metric, used)} of {_show(metric, limit)}" if used is not None else _show(metric, limit)
        return f"{_LABELS[metric]} {shown} {describe_window(self.window_s, self.scope)}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BudgetTarget:
        return cls(**data)


def describe_window(window_s: float, scope: str) -> str:
    named = {1: "second", 60: "minute", 3600: "hour", 86400: "day", 604800: "week"}
    window = f"per {named[window_s]}" if window_s in named else f"per {window_s:g} s"
    who = {"session": "per session", "identity": "per identity", "global": "across all callers"}[scope]
    return f"{window} {who}"


def _units(metric: str, value: float) -> int:
    """``value`` in the ledger's integer unit, so comparisons are exact."""
    return round(value * _COLUMNS[metric][1])


_LABELS = {"tokens": "tokens", "cost_usd": "cost", "worker_s": "worker time"}


def _show(metric: str, value: float | None) -> str:
    if value is None:
        return "?"
    if metric == "tokens":
        return f"{int(value):,}"
    if metric == "cost_usd":
        return f"${value:,.6f}".rstrip("0").rstrip(".")
    return f"{value:,.1f} s"


def targets_for(budgets: Iterable[tuple[str, Budget]], session: str, identity: str, shadow: bool) -> tuple[BudgetTarget, ...]:
    """The keys a call charges: each (rule id, budget) under the caller's scope value."""
    out = []
    for rule_id, budget in budgets:
        value = session if budget.scope == "session" else identity if budget.scope == "identity" else ""
        out.append(
            BudgetTarget(
                name=budget.name or rule_id, rule_id=rule_id, scope=budget.scope, scope_value=value,
                window_s=budget.window_s, tokens=budget.tokens, cost_usd=budget.cost_usd,
                worker_s=budget.worker_s, shadow=shadow,
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class Spent:
    """A budget with no room: which metric, how much was used, when room frees up."""

    target: BudgetTarget
    metric: str
    used: float
    retry_after_s: float | None

    @property
    def message(self) -> str:
        return self.target.describe(self.metric, self.used)


@dataclass(frozen=True)
class BudgetUse:
    target: BudgetTarget
    used: dict[str, float]


# The budgets the guard admitted the current call under: set by the guard
# around the handler, read by the handler that starts turns (it records them
# on the task so the runner charges them).
_admitted: contextvars.ContextVar[tuple[BudgetTarget, ...]] = contextvars.ContextVar("taskwarden_budgets", default=())


def admitted_budgets() -> tuple[BudgetTarget, ...]:
    """The budget keys the call being handled charges (empty outside a guarded call)."""
    return _admitted.get()


def set_admitted(targets: tuple[BudgetTarget, ...]) -> contextvars.Token[tuple[BudgetTarget, ...]]:
    return _admitted.set(targets)


def reset_admitted(token: contextvars.Token[tuple[BudgetTarget, ...]]) -> None:
    _admitted.reset(token)


_SUM_SQL = (
    # CAST: PostgreSQL sums BIGINT as NUMERIC (a Decimal in Python).
    "SELECT CAST(COALESCE(SUM(tokens), 0) AS BIGINT), CAST(COALESCE(SUM(cost_nusd), 0) AS BIGINT),"
    " CAST(COALESCE(SUM(worker_us), 0) AS BIGINT)"
    " FROM guard_budget_usage WHERE budget = ? AND scope = ? AND scope_value = ? AND at_us > ?"
)


class BudgetLedger:
    """Charges usage to budget keys and says which are spent; exact across processes."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def charge(
        self, targets: Sequence[BudgetTarget], usage: Mapping[str, float | None], *, task: str | None = None
    ) -> list[Spent]:
        """Add ``usage`` (``tokens``, ``cost_usd``, ``worker_s`` deltas) to every target;
        return the targets now over a limit (used > limit), shadow ones included."""
        amounts = {m: round((usage.get(m) or 0) * _COLUMNS[m][1]) for m in METRICS}
        if not targets:
            return []

        def write(c: Tx) -> list[Spent]:
            now = round(self._clock.now() * _US)
            over: list[Spent] = []
            seen: set[tuple[str, str, str]] = set()
            for target in targets:
                key = (target.name, target.scope, target.scope_value)
                if key not in seen and any(amounts.values()):
                    seen.add(key)
                    c.execute(
                        "INSERT INTO guard_budget_usage (budget, scope, scope_value, at_us, tokens, cost_nusd,"
                        " worker_us, task) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (*key, now, amounts["tokens"], amounts["cost_usd"], amounts["worker_s"], task),
                    )
                self._remember(c, target)
                used = self._used(c, target, now)
                for metric in METRICS:
                    limit = target.limit(metric)
                    if limit is not None and any(amounts.values()) and _units(metric, used[metric]) > _units(metric, limit):
                        over.append(Spent(target, metric, used[metric], None))
                        before = used[metric] - amounts[metric] / _COLUMNS[metric][1]
                        crossed = _units(metric, before) <= _units(metric, limit)
                        if not crossed and (task is None or c.execute(
                            "SELECT 1 FROM guard_budget_overruns WHERE task = ? AND budget = ?", (task, target.name)
                        ).fetchone()):
                            continue  # recorded once per task (and at the crossing itself)
                        c.execute(
                            "INSERT INTO guard_budget_overruns (budget, scope_value, task, at_us, message, shadow)"
                            " VALUES (?, ?, ?, ?, ?, ?)",
                            (target.name, target.scope_value, task, now, target.describe(metric, used[metric]),
                             int(target.shadow)),
                        )
            return over

        return await self._db.write(write)

    async def check(self, targets: Sequence[BudgetTarget]) -> Spent | None:
        """The first target with no room left (used >= limit), with ``retry_after_s``."""
        if not targets:
            return None

        def read(c: Tx) -> Spent | None:
            now = round(self._clock.now() * _US)
            for target in targets:
                used = self._used(c, target, now)
                for metric in METRICS:
                    limit = target.limit(metric)
                    if limit is not None and _units(metric, used[metric]) >= _units(metric, limit):
                        return Spent(target, metric, used[metric], self._retry_after(c, target, metric, limit, used[metric], now))
            return None

        return await self._db.read(read)

    async def uses(self, targets: Sequence[BudgetTarget]) -> list[BudgetUse]:
        """What each target has used in its window now."""

        def read(c: Tx) -> list[BudgetUse]:
            now = round(self._clock.now() * _US)
            return [BudgetUse(t, self._used(c, t, now)) for t in targets]

        return await self._db.read(read)

    async def report(self) -> list[BudgetUse]:
        """Every budget key with usage in the ledger, with its use in its (last known) window."""

        def read(c: Tx) -> list[BudgetUse]:
            now = round(self._clock.now() * _US)
            out = []
            for name, spec in c.execute("SELECT name, spec FROM guard_budgets ORDER BY name").fetchall():
                base = BudgetTarget.from_json(json.loads(spec))
                for (value,) in c.execute(
                    "SELECT DISTINCT scope_value FROM guard_budget_usage WHERE budget = ? AND scope = ? ORDER BY 1",
                    (name, base.scope),
                ).fetchall():
                    target = BudgetTarget(**{**base.to_json(), "scope_value": value})
                    out.append(BudgetUse(target, self._used(c, target, now)))
            return out

        return await self._db.read(read)

    async def overruns(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest budget crossings: what was stopped, and (shadow) what would have been."""

        def read(c: Tx) -> list[dict[str, Any]]:
            rows = c.execute(
                "SELECT budget, scope_value, task, at_us, message, shadow FROM guard_budget_overruns"
                " ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [
                {"budget": b, "scope_value": v, "task": t, "at": at / _US, "message": m, "shadow": bool(s)}
                for b, v, t, at, m, s in rows
            ]

        return await self._db.read(read)

    # -- inside transactions -------------------------------------------------

    @staticmethod
    def _remember(c: Tx, target: BudgetTarget) -> None:
        spec = json.dumps({**target.to_json(), "scope_value": ""})
        c.execute(
            "INSERT INTO guard_budgets (name, spec) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
            (target.name, spec),
        )

    @staticmethod
    def _used(c: Tx, target: BudgetTarget, now: int) -> dict[str, float]:
        cutoff = now - round(target.window_s * _US)
        tokens, nusd, us = c.execute(_SUM_SQL, (target.name, target.scope, target.scope_value, cutoff)).fetchone()
        return {"tokens": tokens, "cost_usd": nusd / _NANO, "worker_s": us / _US}

    @staticmethod
    def _retry_after(
        c: Tx, target: BudgetTarget, metric: str, limit: float, used: float, now: int
    ) -> float:
        # Room frees as the oldest charges leave the window: walk them until
        # what is left is under the limit.
        column, scale = _COLUMNS[metric]
        window_us = round(target.window_s * _US)
        excess = round(used * scale) - round(limit * scale)  # >= 0: must drop below the limit
        freed = 0
        for at_us, amount in c.execute(
            f"SELECT at_us, {column} FROM guard_budget_usage WHERE budget = ? AND scope = ? AND scope_value = ?"
            " AND at_us > ? AND {column} > 0 ORDER BY at_us".replace("{column}", column),
            (target.name, target.scope, target.scope_value, now - window_us),
        ):
            freed += amount
            if freed > excess:
                return max(0.0, (at_us + window_us - now) / _US)
        return target.window_s  # a zero limit: no time will make room
