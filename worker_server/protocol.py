"""Protocol edges the SDK leaves to the server, made to read alike in both eras.

- Capabilities: ``initialize`` (2025-11-25) and ``server/discover``
  (2026-07-28) are built by different SDK paths; the first says no list or
  resource change is ever announced, the second says every one is (because
  ``subscriptions/listen`` is served). taskwarden sends neither
  ``list_changed`` nor ``resources/updated`` notifications in either era (a
  policy reload that hides a tool shows on the next ``tools/list``), so both
  answers say false.
- ``prompts/get`` of a prompt the server does not have is the JSON-RPC
  error -32602 (invalid params), as the specification asks, not code 0
  (2025-11-25) or -32603 with "Internal server error" (2026-07-28).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

# Capability flags whose "true" promises notifications taskwarden never sends.
_ANNOUNCED = {"tools": ("listChanged",), "prompts": ("listChanged",), "resources": ("listChanged", "subscribe")}


class ProtocolEdges:
    """Server middleware; ``prompts`` lists the prompts the server has."""

    def __init__(self, prompts: Callable[[], Awaitable[Sequence[Any]]]) -> None:
        self._prompts = prompts

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method == "prompts/get":
            name = (ctx.params or {}).get("name")
            if isinstance(name, str) and name not in {p.name for p in await self._prompts()}:
                raise MCPError(code=INVALID_PARAMS, message=f"Unknown prompt: {name}")
            return await call_next(ctx)
        result = await call_next(ctx)
        if ctx.method in ("initialize", "server/discover") and isinstance(result, dict):
            _no_announcements(result.get("capabilities"))
        return result


def _no_announcements(capabilities: Any) -> None:
    if not isinstance(capabilities, dict):
        return
    for kind, flags in _ANNOUNCED.items():
        section = capabilities.get(kind)
        if isinstance(section, dict):
            for flag in flags:
                section[flag] = False
