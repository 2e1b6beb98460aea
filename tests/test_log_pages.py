"""Log pages: exact bytes, bounded encoded size, never a split character."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from worker_server.log_pages import PAGE_BYTES, as_content, read_page

# What one page may weigh on the wire, JSON-escaped or base64-encoded: well under the 1 MB an SSE event may be.
WIRE_LIMIT = 600 * 1024


def wire_size(content: str | bytes) -> int:
    if isinstance(content, bytes):
        return len(base64.b64encode(content)) + 2
    return len(json.dumps(content, ensure_ascii=False).encode())


def read_all(path: Path, limit: int) -> bytes:
    out, offset = b"", 0
    while True:
        page = read_page(path, offset, limit)
        assert page.length <= limit
        assert wire_size(page.content) <= WIRE_LIMIT
        out += page.content.encode() if isinstance(page.content, str) else page.content
        assert page.next_offset == len(out)
        if page.eof:
            return out
        assert page.length > 0, "a page before the end is never empty"
        offset = page.next_offset


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=5000) | st.text(max_size=2000).map(str.encode), limit=st.integers(1, 700))
def test_pages_are_the_log_byte_for_byte(tmp_path_factory: object, data: bytes, limit: int) -> None:
    path = Path(tmp_path_factory.mktemp("log")) / "t.log"  # type: ignore[attr-defined]
    path.write_bytes(data)
    assert read_all(path, limit) == data


def test_worst_case_pages_stay_small_on_the_wire() -> None:
    for data in (b"\0" * PAGE_BYTES, b'"' * PAGE_BYTES, b"\x01\n" * (PAGE_BYTES // 2), b"\xff" * PAGE_BYTES,
                 ("\U0001f600" * (PAGE_BYTES // 4)).encode()):
        content = as_content(data)
        assert wire_size(content) <= WIRE_LIMIT, data[:8]
    assert isinstance(as_content(b"\0" * 1000), bytes)
    assert isinstance(as_content("plain text, caf\u00e9\n".encode()), str)


def test_a_page_stops_before_a_split_character(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    path.write_bytes("ab\u20ac".encode())  # the euro sign is 3 bytes
    first = read_page(path, 0, 3)
    assert first.content == "ab" and first.next_offset == 2
    assert read_page(path, 2, 3).content == "\u20ac"


def test_no_log_yet_is_an_empty_last_page(tmp_path: Path) -> None:
    for page in (read_page(None), read_page(tmp_path / "missing.log")):
        assert page.content == "" and page.eof and page.size == 0
