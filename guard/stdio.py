"""stdin/stdout for the guard's own client, read and written on the event loop.

The SDK's ``stdio_server`` reads and writes through worker threads (three
thread hops per message); a relay pays that twice per call. Here the wire is
a private duplicate of fd 0 and fd 1 served by asyncio's pipe transports,
and handed to ``stdio_server`` as its explicit streams. As the SDK does, fd 0
then points at the null device and fd 1 at stderr while serving, so a child
or a stray print cannot corrupt the wire. A stdin that is not a pipe or a
socket (a regular file) falls back to the SDK's own streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from mcp.server.stdio import stdio_server

# One JSON-RPC message a line; a line may be large (a tool result with a file in it).
_LINE_LIMIT = 256 * 1024 * 1024


class _Lines:
    """What ``stdio_server`` iterates: text lines from a pipe."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> str:
        line = await self._reader.readline()
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")


class _Out:
    """What ``stdio_server`` writes to: a pipe transport (it buffers; flush waits for room)."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport

    async def write(self, text: str) -> None:
        self._transport.write(text.encode("utf-8"))

    async def flush(self) -> None:
        # Back-pressure: let the pipe drain when a slow client leaves a lot buffered.
        while self._transport.get_write_buffer_size() > 4 * 1024 * 1024 and not self._transport.is_closing():
            await asyncio.sleep(0.005)


def _pipe_like(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)


@asynccontextmanager
async def serve_stdio_streams() -> AsyncIterator[tuple[Any, Any]]:
    """The (read, write) stream pair for ``Server.run``, over this process's stdin/stdout."""
    if not (_pipe_like(0) and _pipe_like(1)) or sys.stdin is None or sys.stdout is None:
        async with stdio_server() as streams:
            yield streams
        return
    sys.stdout.flush()
    wire_in = os.dup(0)
    wire_out = os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    saved_in, saved_out = os.dup(0), os.dup(1)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_LINE_LIMIT)
    in_file = os.fdopen(wire_in, "rb", buffering=0)
    out_file = os.fdopen(wire_out, "wb", buffering=0)
    read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), in_file)
    write_transport, _ = await loop.connect_write_pipe(asyncio.Protocol, out_file)
    try:
        async with stdio_server(stdin=_Lines(reader), stdout=_Out(write_transport)) as streams:  # type: ignore[arg-type]
            yield streams
    finally:
        read_transport.close()
        write_transport.close()
        with contextlib.suppress(OSError):
            os.dup2(saved_in, 0)
            os.dup2(saved_out, 1)
        os.close(saved_in)
        os.close(saved_out)
