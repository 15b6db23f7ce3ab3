"""An asyncio micro-batcher: concurrent callers' items run together, off the event loop."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from cabincrew.aio import wait_event
from preflight_svc.onnx_errors import (
    BatcherClosed,
    ModelError,
    ModelInferenceError,
    ModelOverloaded,
)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatcherStats:
    """What a batcher has done, for tests and benches."""

    batches: int
    items: int
    largest_batch: int


class MicroBatcher(Generic[T, R]):
    """Collects items from concurrent callers into bounded batches run off the event loop.

    A batch is cut when it holds ``max_batch_size`` items or ``max_wait_s`` has passed since
    the batcher started collecting it; one batch runs at a time, so items that arrive while
    a batch runs form the next one. ``run_batch`` runs in ``executor`` and must return one
    result per item, in order. Shutdown drains what was accepted.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int = 65_536,
        executor: Executor | None = None,
    ) -> None:
        if max_batch_size < 1 or max_wait_s < 0 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_s >= 0")
        self._run_batch = run_batch
        self._max_batch = max_batch_size
        self._max_wait = max_wait_s
        self._max_queue = max_queue
        self._executor = executor
        self._pending: collections.deque[tuple[T, asyncio.Future[R]]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._batches = 0
        self._items = 0
        self._largest = 0

    @property
    def stats(self) -> BatcherStats:
        """Counts of batches and items run so far."""
        return BatcherStats(self._batches, self._items, self._largest)

    @property
    def queued(self) -> int:
        """Items accepted and not yet handed to a batch."""
        return len(self._pending)

    def submit_nowait(self, items: Sequence[T]) -> asyncio.Future[list[R]]:
        """Enqueue items now (on the loop thread) and return a future of their results."""
        if self._closed:
            raise BatcherClosed("the batcher is shut down")
        if len(self._pending) + len(items) > self._max_queue:
            raise ModelOverloaded(
                f"batch queue full ({len(self._pending)} queued, limit {self._max_queue})"
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = []
        for item in items:
            future: asyncio.Future[R] = loop.create_future()
            self._pending.append((item, future))
            futures.append(future)
        self._ensure_running(loop)
        assert self._wakeup is not None
        self._wakeup.set()
        return asyncio.gather(*futures)

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Run items in whatever batches form and return their results in order."""
        if not items:
            return []
        return await self.submit_nowait(items)

    def close(self) -> None:
        """Stop accepting work; what was accepted still runs (idempotent)."""
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def aclose(self) -> None:
        """Stop accepting work, finish what was accepted, and stop the runner (idempotent)."""
        self.close()
        task = self._task
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            await asyncio.shield(task)

    def _ensure_running(self, loop: asyncio.AbstractEventLoop) -> None:
        # A runner belongs to one loop; a caller on a new loop (asyncio.run per CLI command)
        # gets a new runner once the old loop's runner is gone.
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run(), name="onnx-micro-batcher")

    async def _run(self) -> None:
        assert self._wakeup is not None
        wakeup = self._wakeup
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._pending:
                    if self._closed:
                        return
                    wakeup.clear()
                    await wakeup.wait()
                    continue
                await self._collect(wakeup, loop)
                batch = self._take()
                if batch:
                    await self._execute(batch, loop)
        except BaseException as exc:
            # Whatever stops the runner must not leave callers waiting forever.
            failure = BatcherClosed(f"batch runner stopped: {type(exc).__name__}")
            while self._pending:
                _, future = self._pending.popleft()
                if not future.done():
                    future.set_exception(failure)
            raise

    async def _collect(self, wakeup: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
        if self._max_wait <= 0:
            return
        deadline = loop.time() + self._max_wait
        while len(self._pending) < self._max_batch and not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            wakeup.clear()
            if not await wait_event(wakeup, remaining):
                return

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        while self._pending and len(batch) < self._max_batch:
            item, future = self._pending.popleft()
            if not future.done():  # the caller went away; don't spend inference on it
                batch.append((item, future))
        return batch

    async def _execute(
        self, batch: list[tuple[T, asyncio.Future[R]]], loop: asyncio.AbstractEventLoop
    ) -> None:
        items = [item for item, _ in batch]
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, items)
            if len(results) != len(items):
                raise ModelInferenceError(
                    f"batch returned {len(results)} results for {len(items)} items"
                )
        except Exception as exc:
            error = exc if isinstance(exc, ModelError) else ModelInferenceError(str(exc))
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self._batches += 1
        self._items += len(items)
        self._largest = max(self._largest, len(items))
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
