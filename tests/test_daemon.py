"""The daemon and its forwarder: tasks outlive the client that started them.

Real processes and real signals: ``taskwarden serve`` (the forwarder) is
started as an MCP client starts it, spoken to with newline-delimited
JSON-RPC, and stopped the way Claude Code and Codex stop their servers.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import Workspace, call, host_pid, pid_alive, server_process, stdio_client, stop_daemons, wait_until
from worker_server import forwarder

pytestmark = pytest.mark.anyio
LEGACY = "2025-11-25"


class Forwarder:
    """``taskwarden serve`` over stdio, driven line by line."""

    def __init__(self, ws: Workspace, cwd: Path | None = None, prefix: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "worker_server", "serve", "--config", str(ws.config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ws.server_env(),
            cwd=cwd or ws.work,
        )
        self._next = 0

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def message(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The whole answer to a request: its result or its JSON-RPC error."""
        self._next += 1
        self.send({"jsonrpc": "2.0", "id": self._next, "method": method, "params": params})
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, "the forwarder closed stdout"
            message = json.loads(line)
            if message.get("id") == self._next:
                return message

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._next += 1
        self.send({"jsonrpc": "2.0", "id": self._next, "method": method, "params": params})
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, f"the forwarder closed stdout: {self.proc.stderr.read() if self.proc.stderr else ''}"
            message = json.loads(line)
            if message.get("id") == self._next:
                assert "result" in message, message
                return message["result"]

    def initialize(self) -> dict[str, Any]:
        result = self.request(
            "initialize",
            {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "daemon-test", "version": "1"}},
        )
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return result

    def tool(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        result = self.request("tools/call", {"name": name, "arguments": arguments})
        assert not result.get("isError"), result
        return result["structuredContent"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _working_without_owner(db: Path) -> list[str]:
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT id, owner_pid FROM tasks WHERE status = 'working'").fetchall()
    return [task_id for task_id, pid in rows if pid is None or not pid_alive(pid)]


def _shutdown(proc: subprocess.Popen[bytes], how: str) -> None:
    """A client's way of stopping its MCP server, with its real timings."""
    assert proc.stdin is not None
    if how == "claude":  # SIGINT, SIGTERM 0.13 s later, SIGKILL 0.44 s after that
        proc.send_signal(signal.SIGINT)
        time.sleep(0.13)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        time.sleep(0.44)
        if proc.poll() is None:
            proc.kill()
    elif how == "codex":  # SIGTERM and stdin closed, SIGKILL 0.19 s later
        proc.send_signal(signal.SIGTERM)
        proc.stdin.close()
        time.sleep(0.19)
        if proc.poll() is None:
            proc.kill()
    elif how == "eof":
        proc.stdin.close()
    else:
        proc.kill()
    proc.wait(10)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.mark.parametrize("how", ["claude", "codex", "eof", "sigkill"])
async def test_a_running_turn_outlives_every_way_a_client_stops_its_server(ws: Workspace, how: str) -> None:
    worker_file, go = ws.work / "worker.pid", ws.work / "go"
    fwd = Forwarder(ws)
    try:
        fwd.initialize()
        task = fwd.tool("spawn-task", {"prompt": f"pid {worker_file}\nwait-for {go}\nsay survived"})
        await wait_until(lambda: worker_file.exists() and worker_file.read_text())
        # The worker writes its pid as its sandbox's PID namespace numbers it.
        worker = host_pid(task["task_id"], int(worker_file.read_text()))
        _shutdown(fwd.proc, how)
    finally:
        fwd.close()
    assert pid_alive(worker), "the turn's worker died with the client"
    daemon = server_process(ws)
    go.write_text("")
    async with stdio_client(ws) as client:
        done = await call(client, "wait-task", {"task_ids": task["task_id"], "timeout_s": 30})
    assert done["tasks"][0]["status"] == "completed"
    assert done["tasks"][0]["output"]["final"] == "survived"
    assert server_process(ws).pid == daemon.pid, "one daemon served both sessions"
    await wait_until(lambda: not pid_alive(worker), timeout=10)
    assert _working_without_owner(ws.db) == []


async def test_two_forwarders_from_different_directories_share_one_daemon(ws: Workspace) -> None:
    other = ws.root / "elsewhere"
    other.mkdir()
    first, second = Forwarder(ws, cwd=ws.work), Forwarder(ws, cwd=other)
    try:
        first.initialize()
        second.initialize()
        a = first.tool("spawn-task", {"prompt": "pwd", "worker": "shell"})
        b = second.tool("spawn-task", {"prompt": "pwd", "worker": "shell"})
        assert a["cwd"] == str(ws.work.resolve())
        assert b["cwd"] == str(other.resolve())
        status = json.loads(ws.cli("daemon", "status", "--json").stdout)
        assert status["running"] is True and status["sessions"] == 2
        assert status["database"] == str(ws.db)
        daemons = [p for p in psutil.process_iter(["cmdline"]) if str(ws.db.resolve()) in (p.info["cmdline"] or [])]
        assert len(daemons) == 1, [p.info["cmdline"] for p in daemons]
    finally:
        first.close()
        second.close()


async def test_another_user_cannot_connect(ws: Workspace) -> None:
    fwd = Forwarder(ws)
    try:
        fwd.initialize()  # the daemon runs
    finally:
        fwd.close()
    sock = forwarder.socket_path(forwarder.daemon_dir(ws.db))
    assert sock.stat().st_mode & 0o777 == 0o600
    assert sock.parent.stat().st_mode & 0o777 == 0o700
    probe = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except PermissionError:\n"
        "    print('refused by the file system'); sys.exit()\n"
        "try:\n"
        "    s.sendall(json.dumps({'op': 'status', 'protocol': 1}).encode() + b'\\n')\n"
        "    print(repr(s.recv(4096)))\n"
        "except (BrokenPipeError, ConnectionResetError):\n"
        "    print('closed')\n"
    )
    as_nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", sys.executable, "-c", probe]

    def probe_as_nobody(path: Path) -> str:
        out = subprocess.run([*as_nobody, str(path)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert probe_as_nobody(sock) == "refused by the file system"
    # Even through a path anyone may use, the daemon checks the peer's uid itself.
    exposed = Path(tempfile.mkdtemp(dir="/tmp"))  # the test directory is private to root
    try:
        os.chmod(exposed, 0o755)
        os.link(sock, exposed / "s")
        os.chmod(exposed / "s", 0o777)
        assert probe_as_nobody(exposed / "s") in ("b''", "closed"), "another uid got an answer from the daemon"
    finally:
        shutil.rmtree(exposed)
        os.chmod(sock, 0o600)
    mine = forwarder.request(sock.parent, "status")
    assert mine is not None and mine["ok"] is True


async def test_kill_9_of_the_daemon_under_load_then_a_new_one_loses_nothing(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, max_concurrent=2)
    async with stdio_client(ws) as client:
        ids = [
            (await call(client, "spawn-task", {"prompt": f"say {i}\nsleep {30 if i < 2 else 0.1}"}))["task_id"]
            for i in range(6)
        ]
        old = server_process(ws)
        workers = [p.pid for p in old.children(recursive=True)]
        old.kill()
        old.wait(10)
    async with stdio_client(ws) as client:
        assert server_process(ws).pid != old.pid
        done = await call(client, "wait-task", {"task_ids": ids, "mode": "all", "timeout_s": 50})
    statuses = [t["status"] for t in done["tasks"]]
    assert len(statuses) == 6 and "working" not in statuses and "queued" not in statuses, statuses
    assert statuses.count("completed") >= 4, statuses  # the two killed mid-turn end failed: interrupted
    await wait_until(lambda: not any(pid_alive(p) for p in workers), timeout=15)
    assert _working_without_owner(ws.db) == []
    with sqlite3.connect(ws.db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


ESCAPERS = {
    "setsid": "setsid sh -c 'echo $$ > {f}; exec sleep 300' &",
    "double_fork": "sh -c '(sh -c \"echo \\$\\$ > {f}; exec sleep 300\" &)' &",
    "env_i": "env -i /bin/sh -c 'echo $$ > {f}; exec sleep 300' &",
    "env_u": "env -u TASKWARDEN_TASK_ID setsid sh -c 'echo $$ > {f}; exec sleep 300' &",
    "all_at_once": "env -i setsid sh -c '(sh -c \"echo \\$\\$ > {f}; trap \\\"\\\" TERM; exec sleep 300\" &)' &",
}


@pytest.mark.parametrize("end", ["exit", "cancel"])
async def test_no_escaper_survives_its_turn(ws: Workspace, end: str) -> None:
    files = {name: ws.work / f"{name}-{end}.pid" for name in ESCAPERS}
    script = "\n".join(cmd.format(f=files[name]) for name, cmd in ESCAPERS.items())
    script += "\nsleep 0.5\n" + ("echo done" if end == "exit" else "sleep 300")
    async with stdio_client(ws) as client:
        task = await call(client, "spawn-task", {"prompt": script, "worker": "shell"})
        await wait_until(lambda: all(f.exists() and f.read_text().strip() for f in files.values()), timeout=20)
        pids = {name: host_pid(task["task_id"], int(f.read_text())) for name, f in files.items()}
        assert all(pid_alive(p) for p in pids.values())
        if end == "cancel":
            await call(client, "cancel-task", {"task_id": task["task_id"]})
        done = await call(client, "wait-task", {"task_ids": task["task_id"], "timeout_s": 30})
        assert done["tasks"][0]["status"] == ("completed" if end == "exit" else "cancelled")
        await wait_until(lambda: not any(pid_alive(p) for p in pids.values()), timeout=20)


async def test_an_idle_daemon_exits_and_a_newer_forwarder_takes_over(ws: Workspace) -> None:
    fwd = Forwarder(ws)
    try:
        fwd.initialize()
        daemon = server_process(ws)
        time.sleep(1.0)
        assert daemon.is_running(), "a daemon with a session is not idle"
    finally:
        fwd.close()
    daemon.wait(30)  # idle_exit_s = 5 in the test workspaces

    # An older daemon (a copy of this one under an older version's socket)
    # is asked to leave once idle when a newer forwarder starts.
    directory = forwarder.daemon_dir(ws.db)
    old = subprocess.Popen(
        [sys.executable, "-c", "import sys, anyio, worker_server, worker_server.daemon as d, worker_server.forwarder as f;"
         "worker_server.__version__ = d.__version__ = f.__version__ = '0.0.1';"
         "from worker_server.cli import _settings, build_parser;"
         "args = build_parser().parse_args(['daemon', 'run', '--config', sys.argv[1]]);"
         "sys.exit(anyio.run(d.run_daemon, _settings(args)))", str(ws.config)],
        env=ws.server_env() | {"TASKWARDEN_IDLE_EXIT_S": "600"}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_until(lambda: forwarder.request(directory, "status", "0.0.1") is not None, timeout=30)
        assert forwarder.request(directory, "status", "0.0.1")["version"] == "0.0.1"  # type: ignore[index]
        fwd = Forwarder(ws)
        try:
            info = fwd.initialize()
            assert info["serverInfo"]["version"] == worker_server_version()
        finally:
            fwd.close()
        assert old.wait(30) == 0, "the older daemon did not leave"
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()


def worker_server_version() -> str:
    from worker_server import __version__

    return __version__


async def test_daemon_status_and_stop(ws: Workspace) -> None:
    assert ws.cli("daemon", "status", check=False).returncode == 1
    fwd = Forwarder(ws)
    try:
        fwd.initialize()
        shown = ws.cli("daemon", "status").stdout
        assert "sessions: 1" in shown and str(ws.db) in shown
        daemon = server_process(ws)
        assert "stopping" in ws.cli("daemon", "stop", "--now").stdout
        daemon.wait(20)
    finally:
        fwd.close()
    assert ws.cli("daemon", "status", check=False).returncode == 1


async def test_a_draining_daemon_refuses_new_turns_and_finishes_the_running_one(ws: Workspace) -> None:
    go = ws.work / "go"
    fwd = Forwarder(ws)
    try:
        fwd.initialize()
        running = fwd.tool("spawn-task", {"prompt": f"wait-for {go}\nsay drained"})
        done_before = fwd.tool("spawn-task", {"prompt": "say earlier", "worker": "shell"})
        daemon = server_process(ws)
        assert "once its turns finish" in ws.cli("daemon", "stop").stdout
        # The open session is still served, but takes no new turn.
        for name, arguments in (
            ("spawn-task", {"prompt": "say too late"}),
            ("message-task", {"task_id": done_before["task_id"], "message": "once more"}),
        ):
            refused = fwd.request("tools/call", {"name": name, "arguments": arguments})
            assert refused["isError"], refused
            assert refused["structuredContent"]["error"] == "unavailable"
            assert "draining" in refused["content"][0]["text"], refused
        assert fwd.tool("get-task", {"task_id": running["task_id"]})["status"] == "working"
        assert json.loads(ws.cli("daemon", "status", "--json", check=False).stdout or "{}").get("pid") != daemon.pid
        go.write_text("")
        finished = fwd.tool("wait-task", {"task_ids": running["task_id"], "timeout_s": 30})
        assert finished["tasks"][0]["status"] == "completed"
        assert finished["tasks"][0]["output"]["final"] == "drained"
        daemon.wait(20)  # drained: it exits on its own
    finally:
        fwd.close()
    with sqlite3.connect(ws.db) as c:
        titles = {row[0] for row in c.execute("SELECT title FROM tasks")}
    assert "say too late" not in titles and _working_without_owner(ws.db) == []


async def test_the_forwarder_imports_only_the_standard_library(ws: Workspace) -> None:
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "worker_server", "serve", "--config", str(ws.config)],
        input=json.dumps(init) + "\n", capture_output=True, text=True, timeout=60, env=ws.server_env(), cwd=ws.work,
    )  # fmt: skip
    assert json.loads(out.stdout.splitlines()[0])["id"] == 1
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    heavy = {name for name in imported if name.split(".")[0] in ("mcp", "mcp_types", "pydantic", "anyio", "guard")}
    assert not heavy, sorted(heavy)
    assert "worker_server.forwarder" in imported


async def test_serve_http_is_the_daemon_stdio_clients_share(ws: Workspace) -> None:
    from tests.support import http_server

    async with http_server(ws, "--allow-anonymous"):
        status = json.loads(ws.cli("daemon", "status", "--json").stdout)
        assert "--http" in psutil.Process(status["pid"]).cmdline()
        async with stdio_client(ws) as client:
            done = await call(client, "spawn-task", {"prompt": "say via the http daemon"})
            assert done["status"] in ("queued", "working")
        assert json.loads(ws.cli("daemon", "status", "--json").stdout)["pid"] == status["pid"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs (the tests run as root, as CI does)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        stop_daemons(tmp_path)
        subprocess.run(["umount", "-l", str(disk)], check=True)


async def test_a_full_log_disk_fails_the_turn_and_the_daemon_serves_on(tmp_path: Path, small_disk: Path) -> None:
    ws = Workspace(tmp_path)
    line = f"log_dir = {json.dumps(str(small_disk))}"
    ws.config.write_text(ws.config.read_text().replace('identity = "tester"', f'identity = "tester"\n{line}'))
    async with stdio_client(ws) as client:
        full = await call(client, "spawn-task", {"prompt": "flood 8\nsay never"})
        done = await call(client, "wait-task", {"task_ids": full["task_id"], "timeout_s": 30})
        task = done["tasks"][0]
        assert task["status"] == "failed"
        assert "No space left on device" in task["status_message"], task["status_message"]
        assert (await call(client, "list-tasks", {}))["tasks"], "the daemon still answers"
        for log in small_disk.glob("*.log"):
            log.unlink()
        ok = await call(client, "spawn-task", {"prompt": "say room again"})
        after = await call(client, "wait-task", {"task_ids": ok["task_id"], "timeout_s": 30})
        assert after["tasks"][0]["status"] == "completed"


def test_a_daemon_directory_of_ours_left_open_is_narrowed_and_a_writable_one_refused(tmp_path: Path) -> None:
    from worker_server.daemon import DaemonDirectoryError, private_dir

    # The shared /tmp parent an older taskwarden (or the wake-up bus) made 0755.
    parent = tmp_path / "taskwarden-open"
    parent.mkdir()
    parent.chmod(0o755)
    private_dir(parent / "db.daemon")
    assert parent.stat().st_mode & 0o777 == 0o700
    assert (parent / "db.daemon").stat().st_mode & 0o777 == 0o700
    # One that others could have written into is never trusted.
    writable = tmp_path / "taskwarden-writable"
    writable.mkdir()
    writable.chmod(0o777)
    with pytest.raises(DaemonDirectoryError):
        private_dir(writable / "db.daemon")


def test_the_daemon_log_is_rotated_by_size_and_stderr_follows_it(tmp_path: Path) -> None:
    import logging

    from worker_server.daemon_log import DaemonLog

    path = tmp_path / "daemon.log"
    stray = os.open(os.devnull, os.O_WRONLY)  # stands in for fd 2
    handler = DaemonLog(path, max_bytes=2000, backups=2, stderr_fd=stray)
    log = logging.getLogger("rotation-test")
    log.addHandler(handler)
    log.propagate = False
    try:
        for i in range(200):
            log.warning("line %d %s", i, "x" * 40)
        os.write(stray, b"a stray write\n")
    finally:
        log.removeHandler(handler)
        handler.close()
        os.close(stray)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daemon.log", "daemon.log.1", "daemon.log.2"]
    assert all(p.stat().st_size <= 2100 for p in tmp_path.iterdir())
    current = path.read_text()
    assert "line 199" in current and current.endswith("a stray write\n")


async def test_a_daemon_started_by_serve_logs_to_its_rotated_log(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        await call(client, "list-tasks", {})
    daemon = server_process(ws)
    assert "--log-file" in daemon.cmdline()
    log = ws.root / "logs" / "daemon.log"
    assert f"daemon (pid {daemon.pid})" in log.read_text()


def _fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; the filler file is returned for freeing it again."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):  # down to the last partial block
            try:
                while f.write(b"\0" * size):
                    pass
            except OSError:
                pass
    return filler


async def test_a_full_database_disk_fails_the_turn_and_the_daemon_serves_on(tmp_path: Path, small_disk: Path) -> None:
    ws = Workspace(tmp_path)
    db = small_disk / "taskwarden.db"
    logs = tmp_path / "logs"
    ws.config.write_text(
        ws.config.read_text()
        .replace(f"db = {json.dumps(str(ws.db))}", f"db = {json.dumps(str(db))}\nlog_dir = {json.dumps(str(logs))}")
    )
    go = ws.work / "go"
    fwd = Forwarder(ws)
    try:
        fwd.initialize()
        kept = fwd.tool("spawn-task", {"prompt": "say committed before"})
        assert fwd.tool("wait-task", {"task_ids": kept["task_id"], "timeout_s": 30})["tasks"][0]["status"] == "completed"
        started = ws.work / "started"
        running = fwd.tool("spawn-task", {"prompt": f"pid {started}\nwait-for {go}\nsay too late to record"})
        await wait_until(lambda: started.exists() and started.read_text())
        await wait_until(lambda: fwd.tool("get-task", {"task_id": running["task_id"]})["status"] == "working")
        filler = _fill(small_disk)
        # New work cannot be recorded: a clear error, and the session goes on.
        refused = None
        for _ in range(20):
            answer = fwd.message("tools/call", {"name": "spawn-task", "arguments": {"prompt": "say " + "x" * 90_000}})
            if "error" in answer or answer["result"].get("isError"):
                refused = answer
                break
        assert refused is not None, "twenty large spawns fitted on a full disk"
        assert "full" in json.dumps(refused), refused
        assert fwd.tool("list-tasks", {})["tasks"], "the daemon still answers"
        assert json.loads(ws.cli("daemon", "status", "--json").stdout)["running"] is True
        # The running turn ends while nothing can be written.
        go.write_text("")
        time.sleep(2)
        assert fwd.tool("list-tasks", {})["tasks"]
        filler.unlink()
        ended = fwd.tool("wait-task", {"task_ids": running["task_id"], "timeout_s": 30})["tasks"][0]
        assert ended["status"] == "failed", ended
        assert "database or disk is full" in ended["status_message"], ended["status_message"]
        again = fwd.tool("spawn-task", {"prompt": "say room again"})
        done = fwd.tool("wait-task", {"task_ids": again["task_id"], "timeout_s": 30})["tasks"][0]
        assert done["status"] == "completed" and done["output"]["final"] == "room again"
        assert fwd.tool("get-task", {"task_id": kept["task_id"]})["output"]["final"] == "committed before"
    finally:
        fwd.close()
        stop_daemons(tmp_path)
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

