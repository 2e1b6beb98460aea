"""A bare MCP server with one no-op tool: the SDK's own cost per call, without taskwarden.

Run as ``python -m bench.bare_server`` (stdio). The spawn measurement uses it
to show how many calls per second the SDK alone can answer on this machine,
the ceiling under any server built on it.
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel


class Echo(BaseModel):
    text: str


def build() -> MCPServer:
    server: MCPServer = MCPServer("bare")

    @server.tool(name="echo")
    async def echo(text: str) -> Echo:
        """Return the text: a tool with an input and an output schema, like taskwarden's."""
        return Echo(text=text)

    return server


if __name__ == "__main__":
    build().run("stdio")
