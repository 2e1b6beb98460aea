"""The daemon: one per database, serving MCP sessions on a Unix socket.

It owns the guard, the tools, the runner and every running turn, so a turn
outlives the client that started it: ``taskwarden serve`` (see
worker_server.forwarder) only relays a client's stdio to one connection
here. Each connection is one MCP session with the stdio framing (a JSON
message per line), after one hello line that says what the connection is
for (``mcp``, ``status``, ``stop``, ``retire``) and, for ``mcp``, the
forwarder's working directory (the default ``cwd`` of its tasks) and
identity. Only processes of this user may connect (``SO_PEERCRED``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp.server import Server
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server

from worker_server import __version__
from worker_server.config import Settings
from worker_server.forwarder import daemon_dir, socket_path
from worker_server.identity import CONNECTION, Connection
from worker_server.process_group import become_subreaper, reap_adopted
from worker_server.app import App, open_app
from worker_server.server import build_mcp, watch_children_with_pidfds
from worker_server.store import new_id

logger = logging.getLogger(__name__)

#: Longest line (one JSON-RPC message) a connection may send.
MAX_LINE = 32 * 1024 * 1024
_HELLO_TIMEOUT_S = 10.0
DRAINING = (
    "the taskwarden daemon is draining (taskwarden daemon stop): it lets running turns finish and "
    "starts no new ones; try again once it has exited (the next client starts a new daemon)"
)


class DaemonDirectoryError(RuntimeError):
    """The daemon's directory is not private to this user."""


def private_dir(path: Path) -> None:
    """Create ``path`` 0700 (and its /tmp parent), refusing one another user could use."""
    dirs = (path.parent, path) if path.parent.name.startswith("taskwarden-") else (path,)
    for directory in dirs:
        directory.mkdir(exist_ok=True, mode=0o700)
        info = directory.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise DaemonDirectoryError(f"{directory} must belong to this user with mode 0700")
        if info.st_mode & 0o077:
            # Ours and nobody else could write in it (an older taskwarden made
            # the shared /tmp parent 0755): narrowing it is safe.
            directory.chmod(0o700)


def take_lock(directory: Path) -> int | None:
    """The daemon lock of this version for the database, or None when another daemon holds it."""
    fd = os.open(directory / f"{__version__}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def peer_uid(stream: anyio.abc.SocketStream) -> int:
    raw: socket.socket = stream.extra(SocketAttribute.raw_socket)
    creds = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class _LineReader:
    """A connection's incoming lines, as ``stdio_server`` reads a text file."""

    def __init__(self, buffered: BufferedByteReceiveStream) -> None:
        self._buffered = buffered

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        while True:
            try:
                line = await self._buffered.receive_until(b"\n", MAX_LINE)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            except anyio.DelimiterNotFound:
                logger.warning("a client sent a line over %d bytes; closing its session", MAX_LINE)
                return
            yield line.decode("utf-8", errors="replace") + "\n"


class _LineWriter:
    """A connection's outgoing side, as ``stdio_server`` writes a text file."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self._stream = stream

    async def write(self, text: str) -> None:
        await self._stream.send(text.encode())

    async def flush(self) -> None:
        return None


def lowlevel_server(mcp: MCPServer[Any]) -> Server[Any]:
    """The SDK low-level server behind ``mcp``, through its public surface.

    MCPServer runs a session only on the process's own stdio; its low-level
    ``Server.run`` runs one on any pair of streams. The public way to that
    server is the StreamableHTTP session manager's ``app`` (MCPServer exposes
    ``session_manager`` for such uses), which exists once an app is built;
    the app itself is never served here.
    """
    mcp.streamable_http_app()
    return mcp.session_manager.app


async def serve_session(server: Server[Any], reader: _LineReader, writer: _LineWriter) -> None:
    """One MCP session over a connection, framed as stdio frames it."""
    async with stdio_server(reader, writer) as (read_stream, write_stream):  # type: ignore[arg-type]
        await server.run(read_stream, write_stream, server.create_initialization_options())


class Daemon:
    def __init__(
        self, app: App, mcp: MCPServer[Any], directory: Path, lock_fd: int, inbox_url: str | None = None
    ) -> None:
        self.app = app
        # The inbox this daemon serves over HTTP (serve --http), for `humans add` links.
        self.inbox_url = inbox_url
        self.mcp = mcp
        self._server = lowlevel_server(mcp)
        self.directory = directory
        self.socket = socket_path(directory)
        self._lock_fd: int | None = lock_fd
        self.started = time.time()
        self.sessions = 0
        self.draining = False
        self.retiring = False
        self._done = anyio.Event()
        self._accepting = anyio.CancelScope()

    # -- life cycle ---------------------------------------------------------

    async def serve(self, extra: Callable[[], Awaitable[None]] | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)  # left by a daemon that was killed; the lock says it is gone
        listener = await anyio.create_unix_listener(self.socket, mode=0o600)
        # db.display: a server database's URL without its password.
        logger.info("taskwarden %s daemon (pid %d) on %s, db %s", __version__, os.getpid(), self.socket,
                    self.app.db.display)  # fmt: skip
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._accept, listener, tg)
                # With an HTTP listener the daemon serves until stopped, idle or not.
                tg.start_soon(self._watch_idle, extra is None)
                tg.start_soon(self._reap)
                if extra is not None:

                    async def run_extra() -> None:
                        await extra()
                        self._done.set()

                    tg.start_soon(run_extra)
                else:
                    tg.start_soon(self._watch_signals)
                await self._done.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            self._give_up_socket()

    def _give_up_socket(self) -> None:
        """Stop being the daemon others find: a new one may start while this one drains."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        os.close(self._lock_fd)
        self._lock_fd = None

    def stop(self, now: bool) -> None:
        logger.info("stop requested (%s)", "now" if now else "drain")
        self.draining = True
        # Sessions still open may go on reading and cancelling; new turns go to the next daemon.
        self.app.intake.close(DRAINING)
        self._accepting.cancel()
        self._give_up_socket()
        if now:
            self._done.set()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logger.info("received %s; stopping", signal.Signals(signum).name)
                self.stop(now=True)
                return

    async def _busy(self) -> tuple[int, int]:
        runner = self.app.runner
        assert runner is not None
        return runner.running_count, await self.app.store.queued_count(runner.owner)

    async def _watch_idle(self, may_idle_out: bool) -> None:
        idle_exit_s = self.app.settings.idle_exit_s
        idle_since: float | None = None
        while True:
            await anyio.sleep(min(0.5, idle_exit_s / 4))
            running, queued = await self._busy()
            work = running or queued
            if self.draining and not work:
                logger.info("drained; exiting")
                self._done.set()
                return
            if work or self.sessions or not may_idle_out:
                idle_since = None
                continue
            if self.retiring:
                logger.info("a newer version took over; exiting")
                self._done.set()
                return
            if idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= idle_exit_s:
                logger.info("idle for %.0f s; exiting", idle_exit_s)
                self._done.set()
                return

    async def _reap(self) -> None:
        # Descendants of turns that lost their parent are ours now (subreaper).
        while True:
            await anyio.sleep(1.0)
            reap_adopted()

    async def status(self) -> dict[str, Any]:
        running, queued = await self._busy()
        return {
            "ok": True,
            "pid": os.getpid(),
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "sessions": self.sessions,
            "running_turns": running,
            "queued_turns": queued,
            "database": self.app.db.display,
            "socket": str(self.socket),
            "draining": self.draining,
            "inbox_url": self.inbox_url,
            "host": self.app.lease.host if self.app.lease is not None else None,
            # Every daemon registered on this database (this one included, "this": true).
            "daemons": await daemons_seen(self.app),
        }

    # -- connections --------------------------------------------------------

    async def _accept(self, listener: anyio.abc.SocketListener, tg: anyio.abc.TaskGroup) -> None:
        with self._accepting:
            while True:
                stream = await listener.accept()
                tg.start_soon(self._handle, stream)

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                uid = peer_uid(stream)
            except OSError:
                return
            if uid != os.getuid():
                logger.warning("refused a connection from uid %d", uid)
                return
            buffered = BufferedByteReceiveStream(stream)
            try:
                with anyio.fail_after(_HELLO_TIMEOUT_S):
                    hello = json.loads(await buffered.receive_until(b"\n", 65536))
                if not isinstance(hello, dict):
                    raise ValueError("hello must be a JSON object")
            except (TimeoutError, ValueError, anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound,
                    anyio.BrokenResourceError) as exc:  # fmt: skip
                logger.info("dropped a connection without a valid hello: %s", exc)
                return

            async def reply(message: dict[str, Any]) -> None:
                await stream.send(json.dumps(message).encode() + b"\n")

            op = hello.get("op")
            try:
                if op == "status":
                    await reply(await self.status())
                elif op == "stop":
                    await reply({"ok": True, "pid": os.getpid()})
                    self.stop(now=bool(hello.get("now")))
                elif op == "retire":
                    self.retiring = True
                    await reply({"ok": True, "pid": os.getpid()})
                elif op == "mcp":
                    if self.draining:
                        await reply({"ok": False, "error": DRAINING})
                        return
                    warnings = session_warnings(self.app.settings, hello.get("cwd"))
                    await reply({"ok": True, "pid": os.getpid(), "version": __version__, "warnings": warnings})
                    await self._session(hello, buffered, stream)
                else:
                    await reply({"ok": False, "error": f"unknown op {op!r}"})
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # the client went away; its turns go on

    async def _session(
        self, hello: dict[str, Any], buffered: BufferedByteReceiveStream, stream: anyio.abc.SocketStream
    ) -> None:
        cwd = hello.get("cwd")
        identity = hello.get("identity")
        if not isinstance(identity, str) or not 0 < len(identity) <= 200:
            identity = self.app.settings.identity
        CONNECTION.set(
            Connection(identity=identity, session=new_id("stdio"), cwd=cwd if isinstance(cwd, str) else None)
        )
        self.sessions += 1
        try:
            await serve_session(self._server, _LineReader(buffered), _LineWriter(stream))
        finally:
            self.sessions -= 1


async def daemons_seen(app: App) -> list[dict[str, Any]]:
    """The registry as this daemon sees it (for status); empty when it cannot be read."""
    if app.registry is None:
        return []
    try:
        now, records = await app.registry.all()
    except Exception as exc:  # noqa: BLE001 - status must answer even when the database is away
        logger.warning("could not read the daemon registry: %s", exc)
        return []
    this = app.lease.record.id if app.lease is not None and app.lease.record is not None else None
    return [r.describe(now, this=this) for r in records]


def session_warnings(settings: Settings, cwd: Any) -> list[str]:
    """What a new client should be told at once (its forwarder prints it on stderr)."""
    if isinstance(cwd, str) and cwd and not settings.inside_roots(Path(cwd)):
        return [
            f"this directory ({cwd}) is outside allowed_roots ({', '.join(settings.allowed_roots)}): "
            "spawn-task without a cwd inside them will be refused; add it to allowed_roots in the config"
        ]
    return []


async def run_daemon(
    settings: Settings, extra: Callable[[App], Awaitable[None]] | None = None, *, http_url: str | None = None
) -> int:
    """Run the daemon of ``settings.db_path`` until stopped or idle; 3 if another one runs.
    ``http_url``: the inbox ``extra`` serves over HTTP, if any."""
    if settings.db_is_server:
        # This host's state for a server database (socket, logs, scratch) lives here.
        settings.db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory = daemon_dir(settings.db_path)
    private_dir(directory)
    lock_fd = take_lock(directory)
    if lock_fd is None:
        logger.info("a taskwarden %s daemon already serves %s on this host", __version__, settings.db_display)
        return 3
    try:
        become_subreaper()
        watch_children_with_pidfds()
        async with open_app(settings, url=http_url) as app:
            daemon = Daemon(app, build_mcp(app), directory, lock_fd, inbox_url=http_url)
            lock_fd = None  # the daemon gives it up
            await daemon.serve(None if extra is None else lambda: extra(app))
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    return 0
