"""A scratch taskwarden installation: config, policy, database, and ways to run it.

Each measurement gets its own directory, so no run sees another's tasks,
rate-limit counters or change-feed sockets. Servers run exactly as users run
them (``python -m worker_server serve --config FILE`` over stdio); the bench
process is the MCP client.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp_types import CallToolResult

# Every tool allowed, nothing limited or held: for measurements of the task
# server itself (the guard still decides and audits every call).
ALLOW_ALL = 'version: "1"\ndefault: allow\n'

# The shell profile as built in (the prompt is a /bin/sh script), allowed to run
# as many turns at once as a measurement needs.
SHELL = {"command": ["/bin/sh", "-c", "{prompt}"], "prompt": "arg", "events": "text", "max_concurrent": 8}


@dataclass
class Workspace:
    """A directory holding ``taskwarden.toml``, the database and a work root."""

    root: Path
    policy: str | None = ALLOW_ALL  # policy file text; None = the built-in policy
    workers: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"shell": SHELL})
    default_worker: str = "shell"
    # A postgresql:// URL to run on instead of the SQLite file (bench.postgres).
    server_db: str | None = None

    def __post_init__(self) -> None:
        self.work = self.root / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.write_config()

    @property
    def config(self) -> Path:
        return self.root / "taskwarden.toml"

    @property
    def db(self) -> Path:
        return self.root / "state" / "taskwarden.db"

    @property
    def db_arg(self) -> str:
        """What the daemon is started with as ``--db``."""
        return self.server_db or str(self.db.resolve())

    def write_config(self) -> None:
        lines = [
            f"default_worker = {json.dumps(self.default_worker)}",
            f"allowed_roots = [{json.dumps(str(self.root))}]",
            f"db = {json.dumps(self.server_db or str(self.db))}",
            # A server database's per-host state (daemon socket, logs) stays in the workspace.
            f"state_dir = {json.dumps(str(self.root / 'state'))}",
            'identity = "bench"',
            # INFO would put a line per turn on our stderr.
            'log_level = "WARNING"',
            # Each workspace's database has its daemon; none outlives the bench for long.
            "idle_exit_s = 10",
        ]
        if self.policy is not None:
            # The policy gets a directory of its own, as an operator's would.
            policy_file = self.root / "policy" / "policy.yaml"
            policy_file.parent.mkdir(exist_ok=True)
            policy_file.write_text(self.policy)
            lines.append(f"policy = {json.dumps(str(policy_file))}")
        for name, profile in self.workers.items():
            lines.append(f"\n[workers.{name}]")
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in profile.items())
        self.config.write_text("\n".join(lines) + "\n")

    def env(self) -> dict[str, str]:
        # A TASKWARDEN_* variable in the caller's environment would override the
        # config. PYTHONDONTWRITEBYTECODE (set on some CI machines) would make
        # every process start compile its sources again, which no installed
        # taskwarden does: the first start writes the caches, as on any machine.
        return {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("TASKWARDEN_") and k != "PYTHONDONTWRITEBYTECODE"
        }

    def serve_argv(self) -> list[str]:
        return [sys.executable, "-m", "worker_server", "serve", "--config", str(self.config)]

    def cli_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "worker_server", *args, "--config", str(self.config)]

    def stdio_params(self) -> StdioServerParameters:
        argv = self.serve_argv()
        return StdioServerParameters(command=argv[0], args=argv[1:], env=self.env(), cwd=str(self.work))

    @asynccontextmanager
    async def client(self) -> AsyncIterator[tuple[Client, psutil.Process]]:
        """A real stdio server process and an SDK client connected to it."""
        log = (self.root / "server.log").open("a")
        try:
            # The server's stderr goes to a file, not between our progress lines.
            async with Client(stdio_client(self.stdio_params(), errlog=log)) as client:
                yield client, self.server_process()
        finally:
            log.close()

    def server_process(self) -> psutil.Process:
        """The daemon of this workspace's database: it does the work ``serve`` relays."""
        db = self.db_arg
        for proc in psutil.process_iter():
            try:
                cmd = proc.cmdline()
            except psutil.Error:
                continue
            if "daemon" in cmd and "run" in cmd and db in cmd:
                return proc
        raise RuntimeError(f"no taskwarden daemon running for {self.db}")


def structured(result: CallToolResult, tool: str) -> dict[str, Any]:
    """The structured content of a successful call (anything else is a bench bug)."""
    if result.is_error or result.structured_content is None:
        text = "\n".join(getattr(c, "text", "") for c in result.content)
        raise RuntimeError(f"{tool} failed: {text}")
    return dict(result.structured_content)

