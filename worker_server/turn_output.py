"""Where a turn's output goes: the whole of it to a log file, a bounded tail in memory.

Memory stays flat however much a worker prints: bytes go straight to the log
file, lines longer than ``MAX_LINE`` are cut before they are parsed, and the
tail keeps a fixed number of lines. Reading, logging and parsing happen in a
thread per pipe, so a flood of output does not hold the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread

# Longer lines are cut before parsing (the log keeps them whole).
MAX_LINE = 1024 * 1024
READ_SIZE = 1024 * 1024
PIPE_SIZE = 1024 * 1024
#: While output keeps coming, parsed lines reach the event loop this often.
DELIVER_EVERY_S = 0.02
#: How long a cancelled pump waits for its thread to stop.
STOP_WAIT_S = 2.0
TAIL_LINES = 500
TAIL_LINE_CHARS = 2000

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Tail:
    """The last lines of a turn's activity, bounded in lines and characters."""

    def __init__(self, max_lines: int = TAIL_LINES) -> None:
        self._lines: deque[str] = deque(maxlen=max_lines)

    def add(self, line: str) -> None:
        if len(line) > TAIL_LINE_CHARS:
            line = line[: TAIL_LINE_CHARS - 1] + "…"
        self._lines.append(line)

    def text(self, last: int | None = None) -> str:
        lines = list(self._lines)
        if last is not None:
            lines = lines[-last:] if last > 0 else []
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self._lines)


class LogFile:
    """Append-only log of everything a turn printed."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: BinaryIO = path.open("ab", buffering=256 * 1024)

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:  # name the file: "No space left on device" alone says not where
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc

    def note(self, text: str) -> None:
        """A line from taskwarden itself, set apart from the worker's output."""
        self.write(_note_line(text))

    def flush(self) -> None:
        """Make what was written readable by others (the log resource)."""
        self._file.flush()

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:  # a full disk: what was buffered is lost, the turn's end is not
            logger.warning("could not finish writing %s: %s", self.path, exc.strerror)


class LineSplitter:
    """Bytes in, complete lines out (each cut to MAX_LINE), across chunk boundaries.

    ``keep``: only the last ``keep`` lines of a chunk are wanted (plain text,
    where only the latest lines are ever shown); they are found from the end
    of the chunk in C, so a flood of tiny lines costs no Python per line.
    """

    def __init__(self, keep: int | None = None) -> None:
        self.keep = keep
        self._pending = bytearray()
        self._overlong = False  # inside a line already cut and reported

    def feed(self, chunk: bytes) -> list[str]:
        out: list[str] = []
        last = chunk.rfind(b"\n")
        if last >= 0:
            head, rest = chunk[:last], chunk[last + 1 :]
            parts = head.split(b"\n") if self.keep is None else head.rsplit(b"\n", self.keep)
            if self.keep is not None and len(parts) > self.keep:
                parts = parts[-self.keep :]  # the pending line ended among the dropped ones
            elif self._overlong:
                parts = parts[1:]  # the end of a line already cut
            else:
                parts[0] = bytes(self._pending) + parts[0]
            out = [_decode_line(part) for part in parts]
            self._pending.clear()
            self._overlong = False
        else:
            rest = chunk
        if not self._overlong:
            self._pending += rest
            if len(self._pending) > MAX_LINE:
                out.append(_decode_line(self._pending))
                self._pending.clear()
                self._overlong = True
        return out

    def end(self) -> list[str]:
        """The last line, when the stream ended without a newline."""
        line = [] if self._overlong or not self._pending else [_decode_line(self._pending)]
        self._pending.clear()
        return line


def _decode_line(raw: bytes | bytearray) -> str:
    if len(raw) > MAX_LINE:
        return raw[:MAX_LINE].decode("utf-8", errors="replace") + "…"
    return raw.decode("utf-8", errors="replace")


class OutputPump(Generic[T]):
    """Reads one pipe of a worker in a thread, off the event loop.

    The thread reads large chunks, writes them to the log, splits and parses
    lines (``parse`` runs in the thread) and hands the results to ``deliver``
    on the event loop in batches, at most every ``DELIVER_EVERY_S`` while
    output keeps coming; ``merge`` folds a new batch into undelivered ones
    (dropping what nobody will see). A worker printing tiny lines flat out
    thus costs the loop one short call per batch, not work per line.
    """

    def __init__(self, fd: int, log: LogFile, splitter: LineSplitter) -> None:
        self._fd = fd
        self._log = log
        self._splitter = splitter
        self._stop_r, self._stop_w = os.pipe()
        self._started = False
        self._finished = threading.Event()
        with contextlib.suppress(OSError):  # a bigger pipe: fewer, larger reads
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    async def run(self, parse: Callable[[list[str]], T], merge: Callable[[T, T], T], deliver: Callable[[T], None]) -> None:
        """Pump until EOF or ``stop``. Raises what the log write raised.

        Cancelled, it stops the thread and waits a moment for it: a worker's
        descendant holding the pipe open must not keep a thread reading.
        """
        self._started = True
        try:
            # Its own limiter: a thread per pump, never queued behind others.
            await anyio.to_thread.run_sync(
                self._pump, parse, merge, deliver, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1)
            )
        except BaseException:
            self.stop()
            with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_WAIT_S):
                while not self._finished.is_set():
                    await anyio.sleep(0.01)
            raise

    def stop(self) -> None:
        """Make the thread return soon, whether or not the pipe has ended (from the loop)."""
        if not self._finished.is_set():
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")

    def close(self) -> None:
        """Close the pipe of a pump that never ran (one that ran closes its own, in its thread)."""
        if not self._started:
            self._started = True
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._fd, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _pump(self, parse: Callable[[list[str]], T], merge: Callable[[T, T], T], deliver: Callable[[T], None]) -> None:
        try:
            self._read_until_end(parse, merge, deliver)
        finally:
            # Closed here, never under a poll still running in this thread.
            self._close_fds()
            self._finished.set()

    def _read_until_end(
        self, parse: Callable[[list[str]], T], merge: Callable[[T, T], T], deliver: Callable[[T], None]
    ) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        undelivered: T | None = None
        delivered_at = time.monotonic()
        ended = False
        while not ended:
            wait_ms = None if undelivered is None else max(0, int((delivered_at + DELIVER_EVERY_S - time.monotonic()) * 1000))
            ready = {fd for fd, _ in poller.poll(wait_ms)}
            if self._stop_r in ready:
                break
            if self._fd in ready:
                chunk = os.read(self._fd, READ_SIZE)
                if chunk:
                    self._log.write(chunk)
                    lines = self._splitter.feed(chunk)
                else:
                    ended = True
                    lines = self._splitter.end()
                if lines:
                    batch = parse(lines)
                    undelivered = batch if undelivered is None else merge(undelivered, batch)
            if undelivered is not None and (ended or time.monotonic() - delivered_at >= DELIVER_EVERY_S):
                anyio.from_thread.run_sync(deliver, undelivered)
                undelivered, delivered_at = None, time.monotonic()
        if undelivered is not None:
            anyio.from_thread.run_sync(deliver, undelivered)


def append_note(path: Path, text: str) -> None:
    """``LogFile.note`` for a log no turn holds open (one left by a stopped server)."""
    try:
        with path.open("ab") as f:
            f.write(_note_line(text))
    except OSError:
        pass


def _note_line(text: str) -> bytes:
    return f"\n[taskwarden] {text}\n".encode()

