"""Sliding-window rate limits kept in SQLite.

(Interface fixed; implementation to follow.)
"""

from __future__ import annotations

from dataclasses import dataclass

from guard.policy import Scope


@dataclass(frozen=True)
class LimitRequest:
    """One matching rate limit a call must find room in."""

    rule_id: str  # e.g. "spawn-task#1", reported back when the limit is full
    counter: str  # counter name: the rule's named counter, else the rule id
    max: int
    window_s: float
    scope: Scope
    cost: int = 1
    reason: str = ""  # human text, e.g. "30 calls per 60 s per session"


@dataclass(frozen=True)
class ScopeKeys:
    """Who is calling: the values the three scopes key their counters by."""

    session: str
    identity: str


@dataclass(frozen=True)
class Reservation:
    """Room taken in every requested counter; give it back with ``Limiter.release``."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class Exhausted:
    """No room: the first full limit and when a retry can succeed."""

    rule_id: str
    reason: str
    retry_after_s: float
