"""Times and durations as people type them: ``2h``, ``30d``, ``2024-05-01T12:00:00Z``.

Shared by the CLI verbs (``taskwarden audit --since``, ``tasks prune
--older-than``) and the inbox's audit filter; nothing here knows where the
text came from, so messages name no option.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float | None:
    """``30s``, ``10m``, ``2h``, ``1d``, ``1w`` in seconds; None when ``text`` is not one."""
    match = _DURATION_RE.match(text)
    if match is None:
        return None
    return float(match.group(1)) * _UNIT_S[match.group(2).lower()]


class InvalidSince(ValueError):
    def __init__(self, text: str) -> None:
        super().__init__(
            f"expected an ISO 8601 time (2024-05-01T12:00:00Z) or a duration such as 30s, 10m, 2h, 1d; got {text!r}"
        )


def parse_since(text: str, now: float) -> float:
    """``text`` as seconds since the epoch: ISO 8601 (UTC unless it names an offset)
    or ``now`` minus a duration."""
    ago = parse_duration(text)
    if ago is not None:
        return now - ago
    try:
        when = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise InvalidSince(text) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()
