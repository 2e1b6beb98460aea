"""``taskwarden policy scan -- CMD``: a starter policy from a server's own tools.

Start the server, list its tools with their annotations, and print a policy
in taskwarden's dialect with the catalogue pages' advice: read-only tools
allowed, tools that may change something 30 calls per 60 s per session,
destructive tools held for a human's approval, anything else refused.
"""

from __future__ import annotations

import enum
import json

import anyio
import mcp_types as types
from mcp.shared.exceptions import MCPError

from guard.upstream import Downstream, RestartPolicy, Target, Upstream


class Kind(str, enum.Enum):
    #: ``readOnlyHint: true``: allowed
    READ_ONLY = "read-only"
    #: may change something (including a tool without annotations): rate-limited
    WRITE = "write"
    #: ``readOnlyHint: false`` and ``destructiveHint`` true or left at the spec's default (true)
    DESTRUCTIVE = "destructive"


def kind_of(tool: types.Tool) -> Kind:
    notes = tool.annotations
    if notes is None:
        return Kind.WRITE
    if notes.read_only_hint:
        return Kind.READ_ONLY
    # The spec's default for destructiveHint is true once a tool is not read-only.
    if notes.destructive_hint is None or notes.destructive_hint:
        return Kind.DESTRUCTIVE
    return Kind.WRITE


def starter_policy(tools: list[types.Tool], source: str) -> str:
    """The policy text (YAML, taskwarden's dialect) for these tools."""
    lines = [
        f"# Starter policy for {source}, written by `taskwarden policy scan`.",
        "# From the tools' own annotations: read-only tools allowed, tools that may",
        "# change something 30 calls per 60 s per session, destructive tools held for",
        "# a human's approval (`taskwarden approvals approve ID` or the inbox).",
        "# Review it, then: taskwarden guard --policy FILE -- COMMAND",
        'version: "1"',
        "default: deny",
        "mode: enforce",
        "",
        "tools:",
    ]
    if not tools:
        lines[-1] = "tools: {}"
    for tool in sorted(tools, key=lambda t: t.name):
        kind = kind_of(tool)
        note = kind.value if tool.annotations is not None else "write (no annotations: it may change something)"
        lines.append(f"  {json.dumps(tool.name)}:  # {note}")
        lines.append("    rules:")
        if kind is Kind.READ_ONLY:
            lines.append("      - action: allow")
        elif kind is Kind.WRITE:
            lines.append("      - action: allow")
            lines.append("        rate_limit: {max: 30, window: 60, scope: session}")
        else:
            lines.append("      - action: require_approval")
            lines.append(f"        reason: {json.dumps(f'{tool.name} is destructive: a human approves each call')}")
    return "\n".join(lines) + "\n"


class _NoClient:
    """scan has no client of its own: the server's questions are declined."""

    async def ask_client(self, request: types.ServerRequest, result_type: type) -> object:
        raise MCPError(code=types.INVALID_REQUEST, message="taskwarden policy scan cannot answer requests")

    async def notify_client(self, notification: types.ServerNotification) -> None:
        return None


async def scan(target: Target, *, timeout_s: float = 60.0) -> str:
    """Start ``target``, list its tools and return the starter policy."""
    return starter_policy(await list_tools(target, timeout_s=timeout_s), target.describe())


async def list_tools(target: Target, *, timeout_s: float = 60.0) -> list[types.Tool]:
    """Start ``target`` (or connect to it) and return its tools."""
    client: Downstream = _NoClient()
    upstream = Upstream(target, client, restart=RestartPolicy(restart=False))
    with anyio.fail_after(timeout_s):
        async with anyio.create_task_group() as tg:
            await tg.start(upstream.run)
            tools = await upstream.list_tools()
            tg.cancel_scope.cancel()
    return tools

