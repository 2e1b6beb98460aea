"""Charges a running turn's usage to its budgets, and says when to stop it.

The runner makes one ``TurnMeter`` per turn that has budgets (recorded on
the task when the guard admitted the call that started it) or per-task caps
(``max_tokens``, ``max_cost_usd`` of its session). Usage is charged as the
worker reports it (``poke``), worker time every ``TICK_S`` while it runs,
and the rest when the turn ends (``settle``). Only the difference from what
was already charged is sent, so nothing is counted twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from guard.budgets import BudgetLedger, BudgetTarget

logger = logging.getLogger(__name__)

# How often worker time is charged while a turn runs.
TICK_S = 0.5


def metrics(usage: dict[str, Any] | None, worker_s: float) -> dict[str, float]:
    """A turn's usage as budget metrics: tokens (input + output), cost_usd, worker_s."""
    usage = usage or {}
    return {
        "tokens": (usage.get("input_tokens") or 0) + (usage.get("output_tokens") or 0),
        "cost_usd": usage.get("cost_usd") or 0.0,
        "worker_s": worker_s,
    }


class TurnMeter:
    def __init__(
        self,
        ledger: BudgetLedger | None,
        task_id: str,
        targets: list[BudgetTarget],
        caps: dict[str, float],
        usage_now: Callable[[], dict[str, Any] | None],
        stop: Callable[[str], None],
        note: Callable[[str], None],
    ) -> None:
        self.ledger = ledger
        self.task_id = task_id
        self.targets = targets
        self.caps = caps
        self.usage_now = usage_now
        self.stop = stop
        self.note = note
        self.started = time.monotonic()
        self.charged = {"tokens": 0.0, "cost_usd": 0.0, "worker_s": 0.0}
        self.stopped = False
        self._noted: set[str] = set()
        self._wake = anyio.Event()
        self._lock = anyio.Lock()

    def poke(self) -> None:
        """New usage arrived: charge it now rather than at the next tick."""
        self._wake.set()

    async def run(self) -> None:
        """Charge every tick (and on each poke) until cancelled."""
        while True:
            with anyio.move_on_after(TICK_S):
                await self._wake.wait()
            self._wake = anyio.Event()
            await self.charge()

    async def settle(self, usage: dict[str, Any] | None, worker_s: float) -> None:
        """Charge what the finished turn used beyond what was already charged."""
        await self.charge(metrics(usage, worker_s))

    async def charge(self, now: dict[str, float] | None = None) -> None:
        # Shielded: a charge cancelled half-way could be committed but not
        # remembered here, and be charged again.
        with anyio.CancelScope(shield=True):
            async with self._lock:
                await self._charge(now or metrics(self.usage_now(), time.monotonic() - self.started))

    async def _charge(self, now: dict[str, float]) -> None:
        # Usage reports can go down (Claude's result replaces the per-message
        # sums); only growth is charged.
        delta = {m: max(0.0, now[m] - self.charged[m]) for m in self.charged}
        for m in self.charged:
            self.charged[m] = max(self.charged[m], now[m])
        stop: str | None = None
        for cap, metric, label in (("max_tokens", "tokens", "max_tokens"), ("max_cost_usd", "cost_usd", "max_cost_usd")):
            limit = self.caps.get(cap)
            if limit is not None and self.charged[metric] > limit:
                shown = f"{int(self.charged[metric]):,} of {int(limit):,}" if metric == "tokens" else (
                    f"${self.charged[metric]:,.4f} of ${limit:g}")
                stop = stop or f"budget exhausted: {'tokens' if metric == 'tokens' else 'cost'} {shown} per task ({label})"
        if stop is not None and not self.stopped:
            # A cap is this turn's own: stop at once, then charge the budgets.
            self.stopped = True
            self.stop(stop)
        if self.ledger is not None and self.targets and any(delta.values()):
            try:
                over = await self.ledger.charge(self.targets, delta, task=self.task_id)
            except Exception:
                logger.exception("task %s: charging its budgets failed", self.task_id)
                over = []
            for spent in over:
                message = f"budget exhausted: {spent.message}"
                if spent.target.shadow:
                    if spent.target.name not in self._noted:
                        self._noted.add(spent.target.name)
                        self.note(f"shadow mode: would stop here: {message}")
                else:
                    stop = stop or message
        if stop is not None and not self.stopped:
            self.stopped = True
            self.stop(stop)
