"""Running real taskwarden servers for tests: config files, stdio and HTTP clients.

Every test talks to a real server process through the SDK's ``Client`` (as
``StrictClient``, which validates every tool result against the tool's output
schema), with the fake agent from ``fixtures/`` as its worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psutil
from jsonschema import Draft7Validator, Draft202012Validator
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp_types import CallToolResult

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
FAKE_AGENT = FIXTURES / "fake_agent.py"
ALLOW_ALL = FIXTURES / "policies" / "allow-all.yaml"


@dataclass
class Workspace:
    """A directory with a config file, a database and a work root."""

    root: Path
    max_concurrent: int = 4
    policy: Path | None = ALLOW_ALL
    extra: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.work = self.root / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.write_config()

    @property
    def config(self) -> Path:
        return self.root / "taskwarden.toml"

    @property
    def db(self) -> Path:
        return self.root / "taskwarden.db"

    def write_config(self) -> None:
        py = json.dumps(sys.executable)
        agent = json.dumps(str(FAKE_AGENT))
        policy = f"policy = {json.dumps(str(self.policy))}\n" if self.policy else ""
        self.config.write_text(
            textwrap.dedent(
                f"""\
                default_worker = "fake"
                allowed_roots = [{json.dumps(str(self.root))}]
                db = {json.dumps(str(self.db))}
                identity = "tester"
                idle_exit_s = 5
                {policy}
                [workers.fake]
                command = [{py}, {agent}, "exec", "--json", "-C", "{{cwd}}", "-"]
                resume = [{py}, {agent}, "exec", "--json", "-C", "{{cwd}}", "resume", "{{session}}", "-"]
                events = "codex-jsonl"
                max_concurrent = {self.max_concurrent}
                timeout_s = 600
                state_dirs = [{json.dumps(str(self.root / "agent-state"))}]

                [workers.missing]
                command = ["no-such-agent-binary-xyz", "--json"]
                events = "codex-jsonl"
                """
            )
            + self.extra
        )

    def server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKWARDEN_")}
        env["FAKE_AGENT_STATE"] = str(self.root / "agent-state")
        env.update(self.env)
        return env

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the ``taskwarden`` command line against this workspace."""
        proc = subprocess.run(
            [sys.executable, "-m", "worker_server", *args, *self._config_args(args)],
            capture_output=True,
            text=True,
            env=self.server_env(),
            cwd=self.work,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"taskwarden {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def _config_args(self, args: tuple[str, ...]) -> list[str]:
        if args and args[0] == "policy":
            return []
        return ["--config", str(self.config)]


class StrictClient(Client):
    """The SDK's client, holding the server to its published schemas as strict clients do.

    Every tool result, errors included, must validate against the tool's
    declared output schema, read as draft 2020-12 (the Python SDK, jsonschema)
    and as draft-07 (Ajv in the TypeScript SDK v1 and the MCP Inspector).
    The SDK's own client checks successful results only.
    """

    _output_schemas: dict[str, dict[str, Any] | None] | None = None

    async def call_tool(self, name: str, arguments: dict[str, Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        result = await super().call_tool(name, arguments, *args, **kwargs)
        if isinstance(result, CallToolResult):
            await self.check_result(name, result)
        return result

    async def check_result(self, name: str, result: CallToolResult) -> None:
        if self._output_schemas is None:
            listed = await self.list_tools()
            self._output_schemas = {t.name: t.output_schema for t in listed.tools}
        assert name in self._output_schemas, f"{name} answered but is not in tools/list"
        schema = self._output_schemas[name]
        assert schema is not None, f"{name} declares no output schema"
        data = result.structured_content
        if data is None:
            assert result.is_error, f"{name} returned no structured content"
            return
        for validator in (Draft202012Validator(schema), Draft7Validator(schema)):
            errors = sorted(validator.iter_errors(data), key=str)
            assert not errors, (
                f"{name} result (isError={result.is_error}) does not validate against its output schema "
                f"({type(validator).__name__}): {errors[0].message}\n{json.dumps(data)[:500]}"
            )


def stdio_params(ws: Workspace, *extra: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "worker_server", "serve", "--config", str(ws.config), *extra],
        env=ws.server_env(),
        cwd=str(ws.work),
    )


@asynccontextmanager
async def stdio_client(ws: Workspace, *extra: str, **client_kwargs: Any) -> AsyncIterator[StrictClient]:
    async with StrictClient(stdio_params(ws, *extra), **client_kwargs) as client:
        yield client


def server_process(ws: Workspace) -> psutil.Process:
    """The daemon serving this workspace's database (``serve`` relays to it; ``serve --http``
    is the daemon itself)."""
    db, config = str(ws.db.resolve()), str(ws.config)
    for proc in psutil.process_iter():
        try:
            cmd = proc.cmdline()
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if "daemon" in cmd and "run" in cmd and db in cmd:
            return proc
        if "serve" in cmd and "--http" in cmd and config in cmd:
            return proc
    raise AssertionError("no daemon process found")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server we started, SIGKILL it after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_daemons(root: Path, timeout: float = 20) -> None:
    """Stop (now) every daemon of a database under ``root`` and wait until each has exited."""
    from worker_server import forwarder

    pids = []
    # os.walk, not rglob: a daemon still removing a turn's scratch directory must
    # not make the walk fail on a directory that vanished under it.
    daemon_dirs = [
        Path(top) / name for top, dirs, _ in os.walk(root) for name in dirs if name.endswith(".daemon")
    ]
    for directory in daemon_dirs:
        for version in {p.stem for p in directory.glob("*.sock")}:
            answer = forwarder.request(directory, "stop", version, now=True)
            if answer is not None:
                pids.append(int(answer["pid"]))  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    for pid in pids:
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def http_server(
    ws: Workspace, *extra: str, command: str = "serve", host: str = "127.0.0.1"
) -> AsyncIterator[str]:
    """Start ``taskwarden serve --http`` (or ``inbox --http``) and yield its base URL.

    On the way out it stops the server with SIGTERM and checks it wrote
    nothing to stdout (logs belong on stderr).
    """
    port = free_port()
    log = open(ws.root / f"{command}-{port}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker_server", command, "--config", str(ws.config),
         "--http", f"{host}:{port}", *extra],
        env=ws.server_env(),
        cwd=ws.work,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        await wait_for_port(port, proc, host=host)
        yield f"http://{host}:{port}"
    finally:
        stop_server(proc)
        log.close()
        out = proc.stdout.read() if proc.stdout else b""
        assert out == b"", f"taskwarden {command} wrote to stdout: {out[:200]!r}"


async def wait_for_port(
    port: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 20, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            await anyio.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


async def call(client: Client, tool: str, args: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Call a tool that must succeed; returns its structured content."""
    result = await client.call_tool(tool, args or {}, **kwargs)
    assert not result.is_error, f"{tool} failed: {_text(result)}"
    assert result.structured_content is not None
    return result.structured_content


async def call_error(client: Client, tool: str, args: dict[str, Any] | None = None) -> CallToolResult:
    """Call a tool that must answer with isError; returns the result."""
    result = await client.call_tool(tool, args or {})
    assert result.is_error, f"{tool} unexpectedly succeeded: {result.structured_content}"
    return result


def _text(result: CallToolResult) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


def text_of(result: CallToolResult) -> str:
    return _text(result)


async def spawn_and_wait(client: Client, prompt: str, timeout_s: float = 30, **args: Any) -> dict[str, Any]:
    task = await call(client, "spawn-task", {"prompt": prompt, **args})
    done = await call(client, "wait-task", {"task_ids": task["task_id"], "timeout_s": timeout_s})
    assert not done["timed_out"], done
    return done["tasks"][0]


async def wait_until(predicate: Any, timeout: float = 20, interval: float = 0.05) -> Any:
    """Poll a condition in the *test* (never in the server) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await anyio.sleep(interval)


def host_pid(task_id: str, pid: int) -> int:
    """The host pid of a process that a sandboxed turn knows as ``pid``.

    Each turn has its own PID namespace, so a pid a worker writes down is
    the namespace's; the turn's processes (found by their TASKWARDEN_TASK_ID)
    name that namespace, and /proc/*/status NSpid maps the number back.
    """
    ours = os.readlink("/proc/self/ns/pid")
    namespaces = set()
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("TASKWARDEN_TASK_ID") == task_id:
                namespaces.add(os.readlink(f"/proc/{proc.pid}/ns/pid"))
        except (psutil.Error, OSError):
            continue
    namespaces.discard(ours)
    if not namespaces:
        return pid  # not sandboxed: the numbers are the host's
    for proc in psutil.process_iter():
        try:
            if os.readlink(f"/proc/{proc.pid}/ns/pid") not in namespaces:
                continue
            with open(f"/proc/{proc.pid}/status") as status:
                nspid = next(line.split()[1:] for line in status if line.startswith("NSpid:"))
        except (OSError, StopIteration, psutil.Error):
            continue
        if int(nspid[-1]) == pid:
            return proc.pid
    raise AssertionError(f"no process {pid} in the sandbox of {task_id}")


def marked_processes(task_id: str) -> list[int]:
    """Live processes carrying the task's TASKWARDEN_TASK_ID (its worker, the sandbox around it)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("TASKWARDEN_TASK_ID") == task_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
