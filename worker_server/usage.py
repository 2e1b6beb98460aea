"""Token usage and cost: read from the agent CLIs' events, summed per session.

One shape for every worker (``task.Usage``): ``input_tokens`` counts every
input token, cached ones included (OpenAI's meaning; Anthropic reports the
cached ones apart, so they are added back), ``cached_input_tokens`` those
read from the prompt cache, ``output_tokens``, ``reasoning_tokens`` (part of
the output), ``cost_usd`` where the CLI computes it, ``worker_s`` the wall
time of the worker process. ``None`` is "not reported", never zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

FIELDS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "cost_usd", "worker_s")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def empty() -> dict[str, Any]:
    return dict.fromkeys(FIELDS)


def from_codex(usage: dict[str, Any]) -> dict[str, Any]:
    """``turn.completed.usage`` of ``codex exec --json``."""
    return {
        **empty(),
        "input_tokens": _int(usage.get("input_tokens")),
        "cached_input_tokens": _int(usage.get("cached_input_tokens")),
        "output_tokens": _int(usage.get("output_tokens")),
        "reasoning_tokens": _int(usage.get("reasoning_output_tokens")),
    }


def from_anthropic(usage: dict[str, Any], cost_usd: Any = None) -> dict[str, Any]:
    """An Anthropic ``usage`` object (a message's, or Claude Code's ``result.usage``)."""
    fresh = _int(usage.get("input_tokens"))
    read = _int(usage.get("cache_read_input_tokens"))
    written = _int(usage.get("cache_creation_input_tokens"))
    details = usage.get("output_tokens_details")
    thinking = _int(details.get("thinking_tokens")) if isinstance(details, dict) else None
    return {
        **empty(),
        "input_tokens": None if fresh is None else fresh + (read or 0) + (written or 0),
        "cached_input_tokens": read,
        "output_tokens": _int(usage.get("output_tokens")),
        "reasoning_tokens": thinking,
        "cost_usd": _num(cost_usd),
    }


def add(parts: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Field-wise sum; a field stays None only if no part reported it."""
    total: dict[str, Any] | None = None
    for part in parts:
        if not part:
            continue
        total = total or empty()
        for key in FIELDS:
            value = part.get(key)
            if value is not None:
                total[key] = (total[key] or 0) + value
    if total is not None:
        for key in ("cost_usd", "worker_s"):
            if total[key] is not None:
                total[key] = round(total[key], 6 if key == "cost_usd" else 3)
    return total
