"""Splitting a worker's output into lines, as the output pump's thread does."""

from __future__ import annotations

from worker_server.turn_output import MAX_LINE, LineSplitter


def test_lines_cross_chunk_boundaries_and_the_last_one_ends_the_stream() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"one\ntw") == ["one"]
    assert splitter.feed(b"o\nthr") == ["two"]
    assert splitter.feed(b"ee") == []
    assert splitter.end() == ["three"]


def test_keeping_the_last_lines_of_a_flood_of_tiny_ones() -> None:
    splitter = LineSplitter(keep=3)
    assert splitter.feed(b"start-") == []
    # The pending "start-" line ends among the dropped lines: it is dropped with them.
    assert splitter.feed(b"a\n" + b"y\n" * 100_000 + b"x\ny\nz\npart") == ["x", "y", "z"]
    # Fewer lines than kept: the pending part joins the first.
    assert splitter.feed(b"ial\nnext\n") == ["partial", "next"]


def test_an_overlong_line_is_cut_once_and_its_rest_skipped() -> None:
    splitter = LineSplitter()
    first = splitter.feed(b"x" * (MAX_LINE + 10))
    assert len(first) == 1 and first[0].endswith("…") and len(first[0]) == MAX_LINE + 1
    assert splitter.feed(b"x" * 100) == []
    assert splitter.feed(b"xx\nafter\n") == ["after"]
    assert splitter.end() == []
