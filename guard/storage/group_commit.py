"""One group-commit writer: many concurrent callers, one transaction per batch.

The limiter (each reservation) and the audit log (each record) both hand
items to a ``GroupCommit``; one writer task per instance commits whatever has
queued in one call of ``commit(items) -> results`` (one database write), then
the next batch. Items queued while a batch commits join the next batch, so a
burst of N concurrent callers costs a handful of transactions, not N.

Their differences are parameters:

- ``linger_s``: a batch of only non-urgent items waits up to this long for
  company (the audit log's records nobody awaits yet); an urgent item, a full
  batch or ``close()`` ends the wait. 0 (the limiter): commit at once.
- ``drop_abandoned``: items whose caller stopped waiting before the commit
  began are left out (a cancelled reservation takes no room); otherwise they
  are committed anyway (an audit record is written whether or not anyone
  still waits for its id).
- ``abandoned(results)``: awaited with the results of items whose caller gave
  up *while* their batch committed (the limiter gives that room back).
- ``failed(exc)`` / ``cancelled()``: the exception every waiting caller of a
  batch gets when its commit raises or the writer is cancelled (default:
  the exception itself, and cancelling the callers' futures).

Futures are asyncio futures; the writer is a task on the running loop
(anyio's asyncio backend, which is what taskwarden runs on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

I = TypeVar("I")  # an item
R = TypeVar("R")  # its result


class GroupCommit(Generic[I, R]):
    """Batches ``submit``-ted items into ``commit`` calls, one at a time, in order."""

    def __init__(
        self,
        commit: Callable[[list[I]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 256,
        linger_s: float = 0.0,
        drop_abandoned: bool = False,
        abandoned: Callable[[list[R]], Awaitable[None]] | None = None,
        failed: Callable[[Exception], BaseException] | None = None,
        cancelled: Callable[[], BaseException] | None = None,
        name: str = "group-commit",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        self._commit_fn = commit
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._drop_abandoned = drop_abandoned
        self._abandoned = abandoned
        self._failed = failed
        self._cancelled = cancelled
        self._name = name
        self._queue: list[tuple[I, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._urgent: asyncio.Event | None = (
            None  # made on first use, on the running loop
        )
        self._closing = False

    def submit(self, item: I, *, urgent: bool = True) -> asyncio.Future[R]:
        """Queue ``item``; the future resolves to its result once its batch committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        if urgent:
            self._event().set()
        if self._writer is None:
            self._writer = loop.create_task(self._drain(), name=self._name)
        return future

    def pending(self) -> int:
        """Items queued and not yet taken into a batch."""
        return len(self._queue)

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed (or has failed); no lingering."""
        self._event().set()
        while self._writer is not None:
            await asyncio.shield(self._writer)

    async def close(self) -> None:
        """Stop lingering for good, then flush. ``submit`` still works (the owner decides whether to refuse)."""
        self._closing = True
        await self.flush()

    def _event(self) -> asyncio.Event:
        if self._urgent is None:
            self._urgent = asyncio.Event()
        return self._urgent

    async def _drain(self) -> None:
        urgent = self._event()
        try:
            while self._queue:
                if (
                    self._linger_s > 0
                    and not urgent.is_set()
                    and len(self._queue) < self._max_batch
                    and not self._closing
                ):
                    # Nobody waits on these yet: let a few more join this commit.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(urgent.wait(), self._linger_s)
                urgent.clear()
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._commit(batch)
        finally:
            # No await between the empty check and this: a submit() after it
            # starts a new writer, one before it was drained.
            self._writer = None

    async def _commit(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        if self._drop_abandoned:
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                return
        try:
            results = await self._commit_fn([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                if not future.done():
                    if self._cancelled is None:
                        future.cancel()
                    else:
                        future.set_exception(self._cancelled())
            raise
        except Exception as exc:  # noqa: BLE001 - every waiting caller is given it
            for _, future in batch:
                if not future.done():
                    future.set_exception(
                        self._failed(exc) if self._failed is not None else exc
                    )
            return
        gave_up: list[R] = []
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
            else:  # its caller stopped waiting while the batch committed
                gave_up.append(result)
        if gave_up and self._abandoned is not None:
            await self._abandoned(gave_up)
