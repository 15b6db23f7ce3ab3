"""cabincrew.aio.wait_event, and the guard that keeps asyncio.wait_for out of the services."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from cabincrew.aio import wait_event

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [
    "cabincrew",
    "orchestrator_svc",
    "preflight_svc",
    "approval_svc",
    "audit_svc",
    "mcp_gateway",
    "llm_gateway",
]


async def test_wait_event_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5.0) is True
    assert await wait_event(event, 0.0) is True  # already set: no wait at all


async def test_a_cancellation_that_arrives_with_the_event_still_stops_the_loop() -> None:
    # The shutdown race: the event is set and the task cancelled in the same turn of the
    # loop. asyncio.wait_for on Python 3.11 returns the event's result and the loop runs on
    # (so "await task" during shutdown never returns); wait_event lets the cancel through.
    event = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while rounds < 1000:
            await wait_event(event, 0.05)
            event.clear()
            rounds += 1

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    event.set()
    await asyncio.sleep(0)  # the inner wait completes in this turn
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5.0)
    assert rounds < 5


def test_the_services_do_not_use_asyncio_wait_for() -> None:
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "/v1/" in path.as_posix():
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr == "wait_for"
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "asyncio"
                ):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], (
        "asyncio.wait_for can swallow a cancellation on Python 3.11 (see cabincrew/aio.py); "
        f"use cabincrew.aio.wait_event or asyncio.timeout: {offenders}"
    )
