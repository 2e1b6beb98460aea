"""Change notifications for one database file, within and across processes.

Waiters (``wait-task``, a call held for approval) must wake when another
process — the CLI, the inbox — commits a change, without a sleep loop. Each
process that listens binds a Unix datagram socket in a directory derived from
the database path; a writer sends one empty datagram to every socket there
after it commits. In-process waiters are woken directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import tempfile
from pathlib import Path

import anyio

logger = logging.getLogger(__name__)


def _bus_dir(db_path: Path) -> Path:
    # Socket paths are limited to ~100 bytes, so the directory is named by a
    # digest of the database path rather than by the path itself.
    digest = hashlib.sha256(str(db_path.resolve()).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    return base / f"taskwarden-{os.getuid()}" / digest


class ChangeFeed:
    """A broadcast "something changed" signal for one database."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)
        self.dir = _bus_dir(self.db_path)
        self._event = anyio.Event()
        self._generation = 0
        self._sock: socket.socket | None = None
        self._sock_path: Path | None = None

    # -- listening ---------------------------------------------------------

    def start(self) -> None:
        """Listen for changes made by other processes (needs a running asyncio loop)."""
        import asyncio

        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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

    @property
    def generation(self) -> int:
        """Bumped on every change; read it before checking state, then wait on it."""
        return self._generation

    def _fire(self) -> None:
        self._generation += 1
        event, self._event = self._event, anyio.Event()
        event.set()

    def notify(self) -> None:
        """Wake waiters here and in every other listening process."""
        self._fire()
        _wake_listeners(self.dir, exclude=self._sock_path)

    async def wait(self, since: int, timeout: float) -> bool:
        """Wait until the generation moves past ``since``; False on timeout."""
        if self._generation != since:
            return True
        with anyio.move_on_after(max(timeout, 0)):
            while self._generation == since:
                await self._event.wait()
            return True
        return False


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
