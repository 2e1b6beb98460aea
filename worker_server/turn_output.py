"""Where a turn's output goes: the whole of it to a log file, a bounded tail in memory.

Memory stays flat however much a worker prints: bytes go straight to the log
file, lines longer than ``MAX_LINE`` are cut before they are parsed, and the
tail keeps a fixed number of lines.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.lowlevel
from anyio.abc import ByteReceiveStream

# Longer lines are cut before parsing (the log keeps them whole).
MAX_LINE = 1024 * 1024
READ_SIZE = 64 * 1024
#: The longest a pump parses lines before letting other work run.
YIELD_AFTER_S = 0.005
TAIL_LINES = 500
TAIL_LINE_CHARS = 2000

logger = logging.getLogger(__name__)


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


async def pump_lines(stream: ByteReceiveStream, log: LogFile, on_line: Callable[[str], None]) -> None:
    """Copy ``stream`` into ``log`` and hand each line (cut to MAX_LINE) to ``on_line``."""
    pending = bytearray()
    overlong = False  # inside a line already cut and reported
    lines = 0
    slice_start = time.monotonic()
    while True:
        try:
            chunk = await stream.receive(READ_SIZE)
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            break
        log.write(chunk)
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                break
            if overlong:
                overlong = False
            else:
                pending += chunk[start:end]
                on_line(pending.decode("utf-8", errors="replace"))
            pending.clear()
            start = end + 1
            lines += 1
            # A worker printing tiny lines flat out must not hold the event
            # loop: other clients' calls get a turn every few milliseconds.
            if lines % 256 == 0 and time.monotonic() - slice_start > YIELD_AFTER_S:
                await anyio.lowlevel.checkpoint()
                slice_start = time.monotonic()
        if not overlong:
            pending += chunk[start:]
            if len(pending) > MAX_LINE:
                on_line(pending[:MAX_LINE].decode("utf-8", errors="replace") + "…")
                pending.clear()
                overlong = True
    if pending and not overlong:
        on_line(pending.decode("utf-8", errors="replace"))


def append_note(path: Path, text: str) -> None:
    """``LogFile.note`` for a log no turn holds open (one left by a stopped server)."""
    try:
        with path.open("ab") as f:
            f.write(_note_line(text))
    except OSError:
        pass


def _note_line(text: str) -> bytes:
    return f"\n[taskwarden] {text}\n".encode()

