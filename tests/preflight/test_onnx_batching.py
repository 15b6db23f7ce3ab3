"""MicroBatcher: batches form from concurrent callers, stay bounded, and route results back."""

from __future__ import annotations

import asyncio
import threading

import pytest

from preflight_svc.onnx_batching import MicroBatcher
from preflight_svc.onnx_errors import BatcherClosed, ModelInferenceError, ModelOverloaded

WAIT = 5.0


class GatedRunner:
    """A batch function that records batches and blocks the first one until released."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()

    def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.first_started.set()
            assert self.release.wait(WAIT)
        return [f"{item}:done" for item in items]


async def _hold_first_batch(
    batcher: MicroBatcher[str, str], runner: GatedRunner
) -> asyncio.Future[list[str]]:
    first = batcher.submit_nowait(["a0"])
    assert await asyncio.to_thread(runner.first_started.wait, WAIT)
    return first


async def test_items_arriving_while_a_batch_runs_form_the_next_batch() -> None:
    runner = GatedRunner()
    batcher: MicroBatcher[str, str] = MicroBatcher(runner, max_batch_size=8, max_wait_s=0.0)
    first = await _hold_first_batch(batcher, runner)
    callers = [batcher.submit_nowait([f"c{i}-x", f"c{i}-y"]) for i in range(3)]
    runner.release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *callers), WAIT)
    assert results[0] == ["a0:done"]
    for i, result in enumerate(results[1:]):
        assert result == [f"c{i}-x:done", f"c{i}-y:done"]
    assert runner.batches[1] == ["c0-x", "c0-y", "c1-x", "c1-y", "c2-x", "c2-y"]
    assert batcher.stats.batches == 2
    await batcher.aclose()


async def test_batches_never_exceed_the_maximum_size() -> None:
    runner = GatedRunner()
    batcher: MicroBatcher[str, str] = MicroBatcher(runner, max_batch_size=4, max_wait_s=0.0)
    first = await _hold_first_batch(batcher, runner)
    many = batcher.submit_nowait([f"i{n}" for n in range(10)])
    runner.release.set()
    await asyncio.wait_for(first, WAIT)
    assert await asyncio.wait_for(many, WAIT) == [f"i{n}:done" for n in range(10)]
    assert [len(b) for b in runner.batches] == [1, 4, 4, 2]
    assert batcher.stats.largest_batch == 4
    await batcher.aclose()


async def test_a_failing_batch_fails_every_caller_in_it_and_the_batcher_keeps_going() -> None:
    calls: list[list[int]] = []

    def flaky(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [i * 2 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(flaky, max_batch_size=8, max_wait_s=0.0)
    first, second = batcher.submit_nowait([1]), batcher.submit_nowait([2])
    with pytest.raises(ModelInferenceError):
        await asyncio.wait_for(first, WAIT)
    with pytest.raises(ModelInferenceError):
        await asyncio.wait_for(second, WAIT)
    assert await asyncio.wait_for(batcher.submit([3, 4]), WAIT) == [6, 8]
    await batcher.aclose()


async def test_a_batch_function_returning_the_wrong_count_is_an_inference_error() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(
        lambda items: [0], max_batch_size=8, max_wait_s=0.0
    )
    with pytest.raises(ModelInferenceError):
        await asyncio.wait_for(batcher.submit([1, 2]), WAIT)
    await batcher.aclose()


async def test_a_full_queue_refuses_work_with_overloaded() -> None:
    runner = GatedRunner()
    batcher: MicroBatcher[str, str] = MicroBatcher(
        runner, max_batch_size=2, max_wait_s=0.0, max_queue=3
    )
    first = await _hold_first_batch(batcher, runner)
    queued = batcher.submit_nowait(["b", "c", "d"])
    with pytest.raises(ModelOverloaded):
        batcher.submit_nowait(["e"])
    runner.release.set()
    await asyncio.wait_for(asyncio.gather(first, queued), WAIT)
    await batcher.aclose()


async def test_close_drains_accepted_work_and_refuses_new_work() -> None:
    runner = GatedRunner()
    batcher: MicroBatcher[str, str] = MicroBatcher(runner, max_batch_size=8, max_wait_s=0.0)
    first = await _hold_first_batch(batcher, runner)
    accepted = batcher.submit_nowait(["late"])
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit_nowait(["refused"])
    runner.release.set()
    await asyncio.wait_for(batcher.aclose(), WAIT)
    assert first.result() == ["a0:done"]
    assert accepted.result() == ["late:done"]
    await batcher.aclose()  # idempotent


async def test_cancelled_callers_items_are_not_run() -> None:
    runner = GatedRunner()
    batcher: MicroBatcher[str, str] = MicroBatcher(runner, max_batch_size=8, max_wait_s=0.0)
    first = await _hold_first_batch(batcher, runner)
    abandoned = batcher.submit_nowait(["gone"])
    kept = batcher.submit_nowait(["kept"])
    abandoned.cancel()
    runner.release.set()
    assert await asyncio.wait_for(kept, WAIT) == ["kept:done"]
    await asyncio.wait_for(first, WAIT)
    assert ["gone"] not in runner.batches and runner.batches[1] == ["kept"]
    await batcher.aclose()


def test_invalid_batcher_bounds_are_rejected() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_batch_size=0, max_wait_s=0.0)
