"""The one group-commit writer the limiter and the audit log share."""

from __future__ import annotations

import asyncio

import pytest

from guard.storage.group_commit import GroupCommit

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail = fail

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return [item * 10 for item in items]


async def test_items_queued_while_a_batch_commits_share_the_next_one() -> None:
    commit = Recorder(delay=0.01)
    writer = GroupCommit(commit, max_batch=4)
    first = writer.submit(0)
    await asyncio.sleep(0)  # the writer takes [0] and commits it
    rest = [writer.submit(n) for n in range(1, 10)]
    assert await asyncio.gather(first, *rest) == [n * 10 for n in range(10)]
    assert commit.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]


async def test_non_urgent_items_linger_until_an_urgent_one_arrives() -> None:
    commit = Recorder()
    writer = GroupCommit(commit, linger_s=5.0)
    lazy = [writer.submit(n, urgent=False) for n in range(3)]
    await asyncio.sleep(0.05)
    assert commit.batches == [] and not any(f.done() for f in lazy)
    assert await writer.submit(3) == 30
    assert await asyncio.gather(*lazy) == [0, 10, 20]
    assert commit.batches == [[0, 1, 2, 3]]


async def test_close_ends_the_lingering_and_flush_waits_for_the_writer() -> None:
    commit = Recorder()
    writer = GroupCommit(commit, linger_s=5.0)
    lazy = writer.submit(1, urgent=False)
    await asyncio.wait_for(writer.close(), 1.0)
    assert lazy.result() == 10
    writer.submit(2, urgent=False)
    await asyncio.wait_for(writer.flush(), 1.0)  # closed: no lingering any more
    assert commit.batches == [[1], [2]]


async def test_abandoned_items_are_dropped_or_committed_as_asked() -> None:
    for drop in (True, False):
        commit = Recorder()
        writer = GroupCommit(commit, drop_abandoned=drop)
        gone = writer.submit(1)
        gone.cancel()
        kept = writer.submit(2)
        assert await kept == 20
        assert commit.batches == ([[2]] if drop else [[1, 2]])


async def test_results_of_callers_who_left_during_the_commit_are_handed_back() -> None:
    handed: list[list[int]] = []

    async def abandoned(results: list[int]) -> None:
        handed.append(results)

    writer = GroupCommit(Recorder(delay=0.05), drop_abandoned=True, abandoned=abandoned)
    leaving = writer.submit(1)
    staying = writer.submit(2)
    await asyncio.sleep(0.01)  # the batch is committing
    leaving.cancel()
    assert await staying == 20
    await writer.flush()
    assert handed == [[10]]


async def test_a_failed_commit_fails_its_batch_with_the_mapped_error() -> None:
    writer = GroupCommit(
        Recorder(fail=OSError("disk")),
        failed=lambda exc: RuntimeError(f"not written: {exc}"),
    )
    futures = [writer.submit(n) for n in range(3)]
    for future in futures:
        with pytest.raises(RuntimeError, match="not written: disk"):
            await future
    plain = GroupCommit(Recorder(fail=OSError("disk")))
    with pytest.raises(OSError, match="disk"):
        await plain.submit(1)
