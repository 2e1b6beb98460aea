"""Reading a task's log in pages: ``task://{task_id}/log{?offset,limit}``.

A page is the log's bytes from ``offset`` (default 0), at most ``limit``
(default and maximum 256 KB). Memory per read is one page, however long the
log. Every page must stay readable over every transport (the SDK's HTTP
client refuses an SSE event over 1 MB, and JSON escapes a control byte as six
bytes), so a page goes out as text only when it is UTF-8 whose JSON-escaped
form is at most twice its size; anything else (NUL bytes, binary output) is a
base64 blob (4/3 of its size). A text page never ends inside a UTF-8
character: it stops before it, and the next page starts there. Read back in
order, the pages are the log, byte for byte.

Where the next page starts is in the content's ``_meta["taskwarden/log"]``:
``{offset, next_offset, size, eof}``; it is also ``offset`` plus the page's
length in bytes.
"""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp_types import ReadResourceResult

#: The largest page, and the default.
PAGE_BYTES = 256 * 1024
#: A text page's JSON-escaped form may be at most this many times its size.
TEXT_EXPANSION = 2
META_KEY = "taskwarden/log"


@dataclass(frozen=True)
class LogPage:
    offset: int
    content: str | bytes  # str: UTF-8 text; bytes: sent base64-encoded
    size: int  # the whole log's size when read

    @property
    def length(self) -> int:
        return len(self.content.encode()) if isinstance(self.content, str) else len(self.content)

    @property
    def next_offset(self) -> int:
        return self.offset + self.length

    @property
    def eof(self) -> bool:
        return self.next_offset >= self.size

    def meta(self) -> dict[str, int | bool]:
        return {"offset": self.offset, "next_offset": self.next_offset, "size": self.size, "eof": self.eof}


def read_page(path: Path | None, offset: int = 0, limit: int = PAGE_BYTES) -> LogPage:
    """The page of the log at ``path`` (None: no log yet) from ``offset``, at most ``limit`` bytes."""
    if path is None:
        return LogPage(offset, "", 0)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(min(offset, size))
            data = f.read(min(limit, PAGE_BYTES))
    except FileNotFoundError:
        return LogPage(offset, "", 0)
    return LogPage(offset, as_content(data), max(size, offset + len(data)))


def as_content(data: bytes) -> str | bytes:
    """Text if ``data`` is UTF-8 (maybe cut mid-character at the end) that JSON keeps compact; else bytes."""
    text = _utf8_prefix(data)
    if text is None:
        return data
    if len(json.dumps(text, ensure_ascii=False).encode()) > TEXT_EXPANSION * max(len(data), 1) + 2:
        return data
    return text


def _utf8_prefix(data: bytes) -> str | None:
    """``data`` decoded, less an incomplete character at its very end; None if not UTF-8."""
    for cut in range(4):  # a UTF-8 character is at most 4 bytes
        if cut > len(data):
            break
        try:
            text = data[: len(data) - cut].decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.end < len(data) - cut or exc.reason != "unexpected end of data":
                return None
            continue
        return text if (cut == 0 or text) else None
    return None


# The page a resources/read produced, for PagePosition to put into the result.
_read: ContextVar[list[LogPage] | None] = ContextVar("taskwarden_log_page", default=None)


def remember_page(page: LogPage) -> None:
    """Called by the log resource: the page this read returns."""
    pages = _read.get()
    if pages is not None:
        pages.append(page)


class PagePosition:
    """Server middleware: adds ``_meta["taskwarden/log"]`` (where the next page starts) to a
    log page's content. A resource function returns only the content; this is the SDK's
    public way to shape the rest of the result."""

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method != "resources/read":
            return await call_next(ctx)
        pages: list[LogPage] = []
        token = _read.set(pages)
        try:
            result = await call_next(ctx)
        finally:
            _read.reset(token)
        if not pages:
            return result
        meta = {META_KEY: pages[-1].meta()}
        if isinstance(result, ReadResourceResult) and result.contents:
            first = result.contents[0]
            result.contents[0] = first.model_copy(update={"meta": {**(first.meta or {}), **meta}})
        elif isinstance(result, dict) and result.get("contents"):
            result["contents"][0]["_meta"] = {**(result["contents"][0].get("_meta") or {}), **meta}
        return result
