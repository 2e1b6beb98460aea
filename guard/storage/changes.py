"""Change notifications for one database, within and across processes.

Waiters (``wait-task``, a call held for approval) must wake when another
process — the CLI, the inbox, another daemon — commits a change, without a
sleep loop. ``ChangeFeed`` is the in-process half (a generation counter and
an event); each backend adds how other processes are told: for SQLite, every
listening process binds a Unix datagram socket in a directory derived from
the database path and a writer sends one empty datagram to each after it
commits (``SocketChangeFeed``); PostgreSQL uses LISTEN/NOTIFY
(``guard.storage.postgres``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from pathlib import Path

import anyio

logger = logging.getLogger(__name__)


# A socket's path must fit in sun_path (108 bytes with its terminator).
_SOCKET_PATH_MAX = 107
_SOCKET_NAME_MAX = 24  # "<pid>-<8 hex>.sock"


def _bus_dir(db_path: Path) -> Path:
    """Where the listeners of one database keep their sockets.

    Derived from the database's path alone — never from the environment,
    which differs between an MCP client's server, a terminal and the inbox —
    so every process on the same file finds the same directory: beside the
    database, or, when that path is too long for a socket, under /tmp by a
    digest of it.
    """
    db = db_path.resolve()
    beside = db.parent / f".{db.name}.wake"
    if len(str(beside)) + 1 + _SOCKET_NAME_MAX <= _SOCKET_PATH_MAX:
        return beside
    digest = hashlib.sha256(str(db).encode()).hexdigest()[:16]
    return Path("/tmp") / f"taskwarden-{os.getuid()}" / digest


class BusDirectoryError(RuntimeError):
    """The wake-up directory is not private to this user."""


def _private_dir(path: Path) -> None:
    # Another local user must not own (or be able to fill) the directory.
    for directory in (path.parent, path) if path.parent.name.startswith("taskwarden-") else (path,):
        directory.mkdir(exist_ok=True, mode=0o700)
        info = directory.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise BusDirectoryError(
                f"{directory} must belong to this user and not be writable by others "
                "(taskwarden uses it to wake waiting calls)"
            )


class ChangeFeed:
    """A broadcast "something changed" signal for one database, in this process."""

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._generation = 0

    def start(self) -> None:
        """Listen for changes made by other processes (needs a running asyncio loop)."""

    def close(self) -> None:
        """Stop listening."""

    @property
    def generation(self) -> int:
        """Bumped on every change; read it before checking state, then wait on it."""
        return self._generation

    def _fire(self) -> None:
        self._generation += 1
        event, self._event = self._event, anyio.Event()
        event.set()

    def notify(self) -> None:
        """Wake waiters here (and, in a backend's feed, in every other listening process)."""
        self._fire()

    async def wait(self, since: int, timeout: float) -> bool:
        """Wait until the generation moves past ``since``; False on timeout."""
        if self._generation != since:
            return True
        with anyio.move_on_after(max(timeout, 0)):
            while self._generation == since:
                await self._event.wait()
            return True
        return False


class SocketChangeFeed(ChangeFeed):
    """Other processes on one SQLite file are told through Unix datagram sockets."""

    def __init__(self, db_path: str | Path) -> None:
        super().__init__()
        self.db_path = Path(db_path)
        self.dir = _bus_dir(self.db_path)
        self._sock: socket.socket | None = None
        self._sock_path: Path | None = None

    # -- listening ---------------------------------------------------------

    def start(self) -> None:
        """Listen for changes made by other processes (needs a running asyncio loop)."""
        import asyncio

        self.dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _private_dir(self.dir)
        path = self.dir / f"{os.getpid()}-{os.urandom(4).hex()}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.setblocking(False)
        self._sock, self._sock_path = sock, path
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_datagram)

    def _on_datagram(self) -> None:
        assert self._sock is not None
        with contextlib.suppress(BlockingIOError, OSError):
            while True:
                self._sock.recv(16)
        self._fire()

    def close(self) -> None:
        if self._sock is None:
            return
        import asyncio

        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        if self._sock_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._sock_path.unlink()
        self._sock = None

    # -- signalling --------------------------------------------------------

    def notify(self) -> None:
        """Wake waiters here and in every other listening process."""
        self._fire()
        _wake_listeners(self.dir, exclude=self._sock_path)


def notify_others(db_path: str | Path, exclude: Path | None = None) -> None:
    """Send a wake-up to every process listening on ``db_path`` (from any process)."""
    _wake_listeners(_bus_dir(Path(db_path)), exclude)


def _wake_listeners(directory: Path, exclude: Path | None) -> None:
    # Runs after every committed write, so it stays cheap: the directory is
    # resolved once per feed (not per call), and entries stay plain strings.
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    skip = exclude.name if exclude is not None and exclude.parent == directory else None
    sock: socket.socket | None = None
    try:
        for name in names:
            if name == skip or not name.endswith(".sock"):
                continue
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
            entry = os.path.join(directory, name)
            try:
                sock.sendto(b"!", entry)
            except (ConnectionRefusedError, FileNotFoundError):
                # A listener that died without cleaning up.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry)
            except BlockingIOError:
                # Its queue is full of wake-ups it has not read yet: already awake.
                pass
            except OSError as exc:
                logger.debug("could not wake %s: %s", entry, exc)
    finally:
        if sock is not None:
            sock.close()
