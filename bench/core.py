"""What every measurement shares: sizes, results, statistics and progress output.

A measurement module exposes ``TITLE``, ``METHOD`` (Markdown for the report)
and ``async def run(sizes, scratch) -> Section``. Results are medians and
ratios taken side by side within one run, because the machines this runs on
are shared and noisy: absolute numbers drift between runs, ratios measured
in interleaved batches much less.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does; ``--quick`` shrinks everything."""

    quick: bool
    guard_rounds: int  # A/B pairs of batches, guard on vs off
    guard_batch: int  # get-task calls per batch
    limit_clients: int  # concurrent coroutines reserving room
    limit_per_client: int
    wake_samples: int
    spawn_tasks: int
    spawn_rounds: int  # A/B pairs: direct, then through the server
    rss_tasks: int  # tasks in the store for the "10k tasks" reading
    rss_running: int  # of which running
    flood_mb: int
    flood_rounds: int  # idle / flooded pairs of list-tasks batches
    flood_calls: int  # list-tasks calls per batch
    flood_round_mb: int  # the most a flood worker may print in one round
    cold_samples: int
    approval_samples: int

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            quick=False,
            guard_rounds=30,
            guard_batch=200,
            limit_clients=10,
            limit_per_client=1000,
            wake_samples=60,
            spawn_tasks=200,
            spawn_rounds=3,
            rss_tasks=10_000,
            rss_running=50,
            flood_mb=1024,
            flood_rounds=6,
            flood_calls=100,
            flood_round_mb=1024,
            cold_samples=10,
            approval_samples=20,
        )

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            quick=True,
            guard_rounds=6,
            guard_batch=50,
            limit_clients=10,
            limit_per_client=200,
            wake_samples=10,
            spawn_tasks=60,
            spawn_rounds=1,
            rss_tasks=1_000,
            rss_running=10,
            flood_mb=64,
            flood_rounds=2,
            flood_calls=20,
            flood_round_mb=64,
            cold_samples=3,
            approval_samples=3,
        )


Better = Literal["higher", "lower"]


@dataclass
class Metric:
    """One number in the final JSON line, with its target if it has one."""

    key: str
    value: float | None
    unit: str
    label: str
    target: float | None = None
    better: Better | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None or self.better is None or self.value is None:
            return None
        return self.value >= self.target if self.better == "higher" else self.value <= self.target

    def target_text(self) -> str:
        if self.target is None or self.better is None:
            return ""
        return f"{'≥' if self.better == 'higher' else '≤'} {fmt(self.target)}"


@dataclass
class Section:
    """The outcome of one measurement module."""

    key: str
    title: str
    method: str
    metrics: list[Metric] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # Markdown lines for the report
    error: str | None = None
    seconds: float = 0.0


# -- statistics ---------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100): an observed value, never interpolated."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for people: three significant digits, no exponent for usual sizes."""
    if value is None:
        return "—"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:,.{decimals}f}"


def rounded(value: float, digits: int = 4) -> float:
    """For the JSON line: enough significant digits, no float noise."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, max(0, digits - 1 - math.floor(math.log10(abs(value)))))


# -- progress -----------------------------------------------------------------

_T0 = time.monotonic()


def progress(message: str) -> None:
    """Progress goes to stderr: stdout ends with the one JSON line."""
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)
