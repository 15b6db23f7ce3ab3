"""The journal on a real SQLite store: deferred transitions are logged with the next one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cabincrew.emitter import OutboxEmitter
from orchestrator_svc import model
from orchestrator_svc.journal import AuditTrail, Journal
from orchestrator_svc.manager import AsyncStore
from orchestrator_svc.model import State, WorkflowRecord
from orchestrator_svc.store import WorkflowStore
from orchestrator_svc.wal import verify_chain
from tests.orchestrator.test_store import create


class Opened:
    """A store, a journal over one new workflow, and what watchers were told."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = WorkflowStore(f"sqlite:///{tmp_path / 'orchestrator.db'}")
        self.store.migrate()
        self.emitter = OutboxEmitter(
            "orchestrator", tmp_path / "outbox.db", address=lambda: "127.0.0.1:1", token=lambda: "t"
        )
        self.trail = AuditTrail(self.emitter, linger=3600)
        self.told: list[WorkflowRecord] = []
        record = create(self.store)
        self.journal = Journal(record, AsyncStore(self.store), self.trail, "me", self.told.append)

    def logged(self) -> list[str]:
        return [entry.entry_type for entry in self.store.entries(self.journal.workflow_id)]


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[Opened]:
    value = Opened(tmp_path)
    yield value
    await value.trail.aclose()
    await value.emitter.aclose()
    value.store.close()


def step(state: State, **extra: object) -> dict[str, object]:
    return {"step_id": "a", "state": state.value, **extra}


async def test_deferred_transitions_wait_for_the_next_one_and_share_its_append(
    opened: Opened,
) -> None:
    journal = opened.journal
    await journal.write(model.STEP_STARTED, step(State.PLAN_RUNNING, attempt=1))
    await journal.write(model.STEP_STATE, step(State.PLAN_GENERATED), defer=True)
    await journal.write(
        model.ARTIFACT_CREATED, step(State.ARTIFACTS_VALIDATED, records=[]), defer=True
    )
    # The runner sees them; the log, readers and watchers do not yet.
    assert journal.record.steps["a"].state is State.ARTIFACTS_VALIDATED
    assert journal.published.steps["a"].state is State.PLAN_RUNNING
    assert opened.logged() == [model.WORKFLOW_STARTED, model.STEP_STARTED]
    assert len(opened.told) == 1
    row = opened.store.load(journal.workflow_id)
    assert row is not None and row.position == 2

    await journal.write(model.STEP_STATE, step(State.PRE_FLIGHT_RUNNING))
    assert opened.logged() == [
        model.WORKFLOW_STARTED,
        model.STEP_STARTED,
        model.STEP_STATE,
        model.ARTIFACT_CREATED,
        model.STEP_STATE,
    ]
    entries = opened.store.entries(journal.workflow_id)
    assert [entry.position for entry in entries] == [1, 2, 3, 4, 5]
    assert verify_chain(entries) == []
    assert journal.published is journal.record
    assert len(opened.told) == 2  # one change for the whole append
    row = opened.store.load(journal.workflow_id)
    assert row is not None and row.position == 5
    assert [item["state"] for item in row.steps] == [State.PRE_FLIGHT_RUNNING.value]
    # Replaying the log gives the record the journal holds.
    assert model.replay(entries) == journal.record

    # Their audit events go out in log order, as for transitions logged one by one.
    await opened.trail.flush(journal.workflow_id)
    assert opened.trail.audited(journal.workflow_id) == 5


async def test_flush_logs_what_was_deferred(opened: Opened) -> None:
    journal = opened.journal
    await journal.write(model.STEP_STARTED, step(State.PLAN_RUNNING, attempt=1))
    await journal.write(model.STEP_STATE, step(State.PLAN_GENERATED), defer=True)
    await journal.flush()
    await journal.flush()  # nothing left: no second append
    assert opened.logged()[-1] == model.STEP_STATE
    assert len(opened.store.entries(journal.workflow_id)) == 3
    assert journal.published.steps["a"].state is State.PLAN_GENERATED


async def test_only_plain_transitions_can_be_deferred(opened: Opened) -> None:
    journal = opened.journal
    for options in ({"durable": True}, {"release": True}, {"plan_token": ("t", {})}):
        with pytest.raises(ValueError, match="only a plain transition"):
            await journal.write(
                model.STEP_STARTED, step(State.PLAN_RUNNING, attempt=1), defer=True, **options
            )
    assert journal.record.position == 1
