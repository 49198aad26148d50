"""Micro-batching for the service: concurrent requests are gathered into one forward pass.

Each request submits one item and awaits its own result. A worker task takes up to `max_batch` pending items
and runs the batch function in a single worker thread, so the event loop keeps accepting requests while the
model runs. Requests that pile up during a forward pass form the next batch. A request still being uploaded or
decoded announces itself with `expect()`; a batch that is not full waits for announced items, at most
`max_wait_ms`, and never waits when nothing is on its way, so a lone request pays no batching delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatcherStats:
    """Counters for monitoring: how many batches ran, how many items they held, the largest one, and the seconds
    the batch function took in all."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    failures: int = 0
    seconds: float = 0.0

    @property
    def mean_batch(self) -> float:
        """Average number of items per batch (0 before the first batch)."""
        return self.items / self.batches if self.batches else 0.0

    @property
    def mean_seconds(self) -> float:
        """Average seconds per batch (0 before the first batch)."""
        return self.seconds / self.batches if self.batches else 0.0


class MicroBatcher(Generic[T, R]):
    """Gathers items submitted concurrently and runs `fn(items) -> results` (same length, same order) on them.

    Bound to the event loop of its first `submit`; a later loop (as in tests that start one per request)
    transparently gets a fresh worker. `fn` always runs in the same single thread, one batch at a time.
    `on_batch(size, seconds)` is called on the event loop after each batch that ran."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        name: str = "",
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {max_wait_ms}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.name = name
        self.on_batch = on_batch
        self.stats = BatcherStats()
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._pending: list[tuple[T, asyncio.Future]] = []
        self._expected = 0
        self._wakeup: asyncio.Event | None = None
        self._ready: asyncio.Event | None = None

    @property
    def pending(self) -> int:
        """Items submitted but not yet taken into a batch."""
        return len(self._pending)

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hierax-batch-{self.name}")
        self._loop = loop
        self._pending = []
        self._wakeup = asyncio.Event()
        self._ready = asyncio.Event()
        self._task = loop.create_task(self._work(), name=f"hierax-batcher-{self.name}")

    @contextmanager
    def expect(self) -> Iterator[None]:
        """Announce an item on its way (being uploaded or decoded): a forming batch waits for it, at most max_wait.

        Submit the item after leaving the block; leaving without submitting (a bad upload) is fine."""
        self._ensure_worker()
        self._expected += 1
        try:
            yield
        finally:
            self._expected = max(0, self._expected - 1)
            if self._expected == 0:
                self._ready.set()

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result; an exception raised by `fn` is raised here."""
        self._ensure_worker()
        future = self._loop.create_future()
        self._pending.append((item, future))
        self._wakeup.set()
        if len(self._pending) >= self.max_batch:
            self._ready.set()
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if len(self._pending) < self.max_batch and self._expected > 0 and self.max_wait > 0:
                self._ready.clear()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that lands as the
                # wait ends, and the worker then never stops (a hung shutdown)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.max_wait):
                        await self._ready.wait()
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            if not self._pending:
                self._wakeup.clear()
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            start = loop.time()
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:
                _fail(batch, RuntimeError("the batcher was closed"))
                raise
            except Exception as err:
                self.stats.failures += 1
                logger.exception("batch of %d failed", len(batch))
                _fail(batch, err)
                continue
            seconds = loop.time() - start
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            self.stats.seconds += seconds
            if self.on_batch is not None:
                self.on_batch(len(batch), seconds)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def aclose(self) -> None:
        """Stop the worker, fail anything pending or in flight, and wait for the worker thread to finish its batch.

        A later submit starts a fresh worker."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        _fail(self._pending, RuntimeError("the batcher was closed"))
        self._pending = []
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True)


def _fail(batch: list[tuple[object, asyncio.Future]], err: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(err)
