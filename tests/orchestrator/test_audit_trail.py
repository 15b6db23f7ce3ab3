"""The journal's audit trail: events of consecutive transitions go out together, in log order.

A real ``OutboxEmitter`` whose audit service is unreachable: what ``emit`` made durable is in
its outbox (read back with sqlite3), whatever the stream does.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cabincrew.emitter import EmitError, OutboxEmitter
from orchestrator_svc import model
from orchestrator_svc.journal import AuditTrail
from orchestrator_svc.model import Entry
from tests.orchestrator.test_store import started

LONG = 3600.0  # a linger no test waits for


@pytest.fixture
async def emitter(tmp_path: Path) -> AsyncIterator[OutboxEmitter]:
    opened = OutboxEmitter(
        "orchestrator", tmp_path / "outbox.db", address=lambda: "127.0.0.1:1", token=lambda: "t"
    )
    yield opened
    await opened.aclose()


def outboxed(path: Path) -> list[str]:
    """The event ids in the outbox, in its order."""
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        try:
            return [row[0] for row in conn.execute("SELECT event_id FROM outbox ORDER BY position")]
        except sqlite3.OperationalError:  # the table is not created yet
            return []


async def settled(emitter: OutboxEmitter) -> int:
    """Events in the outbox once every emit already started has written.

    Emits started earlier reach the outbox's single thread within a few turns of the loop;
    the count runs on that thread after them.
    """
    for _ in range(20):
        await asyncio.sleep(0)
    return await emitter.pending_count()


def steps(workflow_id: str, count: int) -> list[Entry]:
    """``workflow_started`` and then ``count - 1`` step transitions."""
    entries = [started(workflow_id)]
    for position in range(2, count + 1):
        data = {"step_id": "a", "state": "PLAN_RUNNING", "attempt": position - 1}
        entries.append(Entry(workflow_id, position, position, model.STEP_STARTED, data))
    return entries


async def test_queued_events_wait_for_the_flush_and_go_out_in_log_order(
    emitter: OutboxEmitter, tmp_path: Path
) -> None:
    trail = AuditTrail(emitter, linger=LONG)
    for entry in steps("wf1", 3):
        trail.submit(entry, "RUNNING")
    assert await settled(emitter) == 0
    assert trail.audited("wf1") is None
    await trail.flush("wf1")
    assert outboxed(tmp_path / "outbox.db") == ["orch-wf1-1", "orch-wf1-2", "orch-wf1-3"]
    assert trail.audited("wf1") == 3
    await trail.aclose()


async def test_a_durable_entry_takes_the_queued_events_out_with_it(
    emitter: OutboxEmitter, tmp_path: Path
) -> None:
    trail = AuditTrail(emitter, linger=LONG)
    first, second, third = steps("wf1", 3)
    trail.submit(first, "RUNNING")
    trail.submit(second, "RUNNING")
    trail.submit(third, "RUNNING", now=True)
    assert await settled(emitter) == 3
    assert outboxed(tmp_path / "outbox.db") == ["orch-wf1-1", "orch-wf1-2", "orch-wf1-3"]
    await trail.aclose()


async def test_the_linger_timer_sends_events_nobody_flushes(
    emitter: OutboxEmitter, tmp_path: Path
) -> None:
    trail = AuditTrail(emitter, linger=0.01)
    for workflow_id in ("wf1", "wf2"):
        trail.submit(steps(workflow_id, 1)[0], "RUNNING")
    async with asyncio.timeout(10):
        # Real time has to pass here; the outbox is another thread's file, with no event.
        while await emitter.pending_count() < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert sorted(outboxed(tmp_path / "outbox.db")) == ["orch-wf1-1", "orch-wf2-1"]
    await trail.aclose()


async def test_forgetting_or_closing_sends_what_is_queued_instead_of_dropping_it(
    emitter: OutboxEmitter, tmp_path: Path
) -> None:
    trail = AuditTrail(emitter, linger=LONG)
    trail.submit(steps("wf1", 1)[0], "RUNNING")
    trail.forget("wf1")
    assert await settled(emitter) == 1
    assert outboxed(tmp_path / "outbox.db") == ["orch-wf1-1"]
    trail.submit(steps("wf2", 1)[0], "RUNNING")
    await trail.aclose()
    assert outboxed(tmp_path / "outbox.db") == ["orch-wf1-1", "orch-wf2-1"]


async def test_a_group_that_cannot_be_recorded_fails_the_flush_closed(
    emitter: OutboxEmitter,
) -> None:
    trail = AuditTrail(emitter, linger=LONG)
    await emitter.aclose()  # every emit now raises EmitError
    for entry in steps("wf1", 2):
        trail.submit(entry, "RUNNING")
    with pytest.raises(EmitError):
        await trail.flush("wf1")
    assert trail.audited("wf1") is None
    await trail.aclose()
