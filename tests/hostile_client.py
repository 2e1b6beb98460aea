"""A hostile MCP client in its own process: oversize arguments and a catastrophic regex, in a loop.

``python -m tests.hostile_client URL STOP_FILE [--benign]`` calls the server
at URL until STOP_FILE exists, then prints how each call was refused, as
JSON, on stdout. ``--benign`` makes the same calls at the same pace with
ordinary arguments: the baseline a hostile run is compared with. Run as a
separate process so that its own encoding work never lands on the measuring
client's event loop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
from mcp import Client
from mcp.shared.exceptions import MCPError

HUGE = "sk-" * 70_000  # 210,000 characters; quadratic for the old redaction
BAD_TITLE = "a" * 26 + "!"  # 27 characters against ^(\w+\s?)+$
PAUSE_S = 0.05


async def main(url: str, stop: Path, benign: bool = False) -> None:
    refused: dict[str, int] = {}
    huge = "say hi" if benign else HUGE
    bad_title = "plain words" if benign else BAD_TITLE

    def note(what: str) -> None:
        refused[what] = refused.get(what, 0) + 1

    async with Client(url) as client:
        print("ready", file=sys.stderr, flush=True)
        while not stop.exists():
            big = await client.call_tool("spawn-task", {"prompt": "say hi", "title": huge, "labels": ["x"] * 17})
            note(f"huge title: {(big.structured_content or {}).get('error')}")
            try:
                await client.call_tool("no-such-tool", {"note": huge, "token": huge})
                note("unknown tool: answered")
            except MCPError as exc:
                note(f"unknown tool: {str(exc)[:40]}")
            slow = await client.call_tool("spawn-task", {"prompt": "say hi", "title": bad_title, "worker": "nope"})
            note(f"catastrophic regex: {(slow.structured_content or {}).get('error')}")
            # A short pause: this process shares the machine's two cores with
            # the server and the measuring client, and its own JSON encoding
            # must not be what is measured. One call that stalls the server
            # (seconds, before the fix) shows whatever the pace.
            await anyio.sleep(PAUSE_S)
    print(json.dumps(refused))


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], Path(sys.argv[2]), "--benign" in sys.argv[3:])
