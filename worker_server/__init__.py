"""taskwarden's MCP server: task tools, the task store, agent and human workers."""

__version__ = "0.1.0"
