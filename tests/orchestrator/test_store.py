"""The orchestrator's persistence: the write-ahead log chain, the fold, leases and keys.

Runs on SQLite always, and on PostgreSQL too when CABINCREW_TEST_POSTGRES_URL is set (each
run in a schema of its own, dropped afterwards).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

from cabincrew.errors import AlreadyExists
from orchestrator_svc import model
from orchestrator_svc.events import events_for
from orchestrator_svc.journal import materialise
from orchestrator_svc.model import Definition, Entry, State
from orchestrator_svc.store import LeaseLost, ListFilter, NewEntry, RequestKey, WorkflowStore
from orchestrator_svc.wal import verify_chain

SECOND = 1_000_000


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkflowStore]:
    """A migrated store on each database."""
    if request.param == "sqlite":
        opened = WorkflowStore(f"sqlite:///{tmp_path / 'orchestrator.db'}")
        opened.migrate()
        yield opened
        opened.close()
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"test_orch_{uuid.uuid4().hex[:12]}"
    opened = WorkflowStore(url, schema=schema)
    try:
        opened.migrate()
        yield opened
    finally:
        opened.close()
        engine = sqlalchemy.create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        engine.dispose()


def started(
    workflow_id: str, stamp: int = 1_000 * SECOND, steps: tuple[str, ...] = ("a",)
) -> Entry:
    """A workflow_started entry."""
    data = {
        "name": "demo",
        "definition": Definition("id: demo\n", None, "demo.yaml", None).to_dict(),
        "digest": "0" * 64,
        "steps": [{"step_id": step, "kind": "engine"} for step in steps],
        "requester": "alice",
        "inputs": {},
        "labels": {},
        "environment": "",
        "workspace_source": None,
        "batch_id": "",
        "held": False,
    }
    return Entry(workflow_id, 1, stamp, model.WORKFLOW_STARTED, data)


def create(
    store: WorkflowStore, owner: str | None = "me", lease_until: int = 0
) -> model.WorkflowRecord:
    """Insert a new workflow and return its record."""
    workflow_id = uuid.uuid4().hex
    first = started(workflow_id)
    record = model.new_record(first)
    store.create_workflow(
        workflow_id,
        NewEntry(first.entry_type, first.data, first.timestamp_us),
        materialise(record),
        name="demo",
        batch_id="",
        requester="alice",
        owner=owner,
        lease_expires_us=lease_until,
    )
    return record


def write(
    store: WorkflowStore,
    record: model.WorkflowRecord,
    entry_type: str,
    data: dict[str, Any],
    owner: str | None = "me",
    now: int | None = None,
) -> model.WorkflowRecord:
    """Append one entry the way the journal does, and return the new record."""
    stamp = record.updated_us + SECOND
    entry = Entry(record.workflow_id, record.position + 1, stamp, entry_type, data)
    updated = model.apply(record, entry)
    store.append(
        record.workflow_id,
        owner,
        record.position,
        [NewEntry(entry_type, data, stamp)],
        materialise(updated),
        durable=False,
        now_us=now if now is not None else stamp,
    )
    return updated


def test_a_replayed_log_rebuilds_exactly_the_materialised_workflow(store: WorkflowStore) -> None:
    record = create(store)
    record = write(
        store, record, model.STEP_STARTED, {"step_id": "a", "state": "PLAN_RUNNING", "attempt": 1}
    )
    record = write(
        store,
        record,
        model.ARTIFACT_CREATED,
        {"step_id": "a", "state": "ARTIFACTS_VALIDATED", "outputs": {"n": 1.0, "list": [1, 2]}},
    )
    entries = store.entries(record.workflow_id)
    assert verify_chain(entries) == []
    replayed = model.replay(entries)
    row = store.load(record.workflow_id)
    assert row is not None
    stored = model.WorkflowRecord.from_dicts(row.summary, row.steps)
    assert replayed.summary_dict() == stored.summary_dict()
    assert [s.to_dict() for s in replayed.steps.values()] == [
        s.to_dict() for s in stored.steps.values()
    ]
    assert replayed.state is State.ARTIFACTS_VALIDATED
    assert [e.position for e in entries] == [1, 2, 3]
    assert entries[0].sequence < entries[1].sequence < entries[2].sequence


def test_the_checksum_chain_finds_a_changed_removed_or_reordered_entry(
    store: WorkflowStore,
) -> None:
    record = create(store)
    for attempt in (1, 2, 3):
        record = write(
            store,
            record,
            model.STEP_STARTED,
            {"step_id": "a", "state": "PLAN_RUNNING", "attempt": attempt},
        )
    entries = store.entries(record.workflow_id)
    changed = [*entries]
    changed[2] = Entry(**{**changed[2].__dict__, "data": {**changed[2].data, "attempt": 9}})
    assert verify_chain(changed)
    assert verify_chain([entries[0], entries[1], entries[3]])
    assert verify_chain([entries[0], entries[2], entries[1], entries[3]])
    assert verify_chain(entries) == []


def test_the_log_refuses_update_and_delete(store: WorkflowStore) -> None:
    record = create(store)
    engine = store._engine  # the test reaches past the API on purpose: there is no update path
    with pytest.raises(sqlalchemy.exc.DBAPIError), engine.begin() as conn:
        conn.execute(sqlalchemy.text("UPDATE orchestrator_wal SET entry_type = 'x'"))
    with pytest.raises(sqlalchemy.exc.DBAPIError), engine.begin() as conn:
        conn.execute(sqlalchemy.text("DELETE FROM orchestrator_wal"))
    assert len(store.entries(record.workflow_id)) == 1


def test_a_stale_writer_is_fenced_out(store: WorkflowStore) -> None:
    record = create(store, owner="me", lease_until=2_000 * SECOND)
    # Another owner while the lease is live:
    with pytest.raises(LeaseLost):
        write(
            store,
            record,
            model.STEP_STARTED,
            {"step_id": "a", "state": "PLAN_RUNNING"},
            owner="other",
        )
    updated = write(store, record, model.STEP_STARTED, {"step_id": "a", "state": "PLAN_RUNNING"})
    # A writer that missed an entry (its memory is behind the database):
    with pytest.raises(LeaseLost):
        write(store, record, model.STEP_STARTED, {"step_id": "a", "state": "PLAN_RUNNING"})
    assert store.entries(record.workflow_id)[-1].position == updated.position


def test_leases_are_claimed_once_renewed_and_taken_over_when_expired(store: WorkflowStore) -> None:
    now = 5_000 * SECOND
    first = create(store, owner=None)
    second = create(store, owner=None)
    mine = store.claim("p1", now, 10 * SECOND, limit=10)
    assert sorted(mine) == sorted([first.workflow_id, second.workflow_id])
    assert store.claim("p2", now + SECOND, 10 * SECOND, limit=10) == []
    renewed = store.renew("p1", mine, now + 5 * SECOND, 10 * SECOND)
    assert renewed.owned == frozenset(mine)
    # p1 stops renewing; after expiry p2 takes both, and p1's renewal no longer owns them.
    taken = store.claim("p2", now + 16 * SECOND, 10 * SECOND, limit=1)
    assert len(taken) == 1
    assert store.renew("p1", mine, now + 16 * SECOND, 10 * SECOND).owned == frozenset(
        set(mine) - set(taken)
    )
    assert store.claim("p3", now, 10 * SECOND, limit=10, steal=True) != []


def test_a_command_left_for_the_owner_comes_back_with_its_renewal(store: WorkflowStore) -> None:
    record = create(store, owner="p1", lease_until=10 * SECOND)
    assert store.leave_command(record.workflow_id, {"cancel": "enough", "by": "bob"})
    claim = store.renew("p1", [record.workflow_id], SECOND, 10 * SECOND)
    assert claim.commands[record.workflow_id] == {"cancel": "enough", "by": "bob"}


def test_an_idempotency_key_returns_the_first_result_or_refuses_another_payload(
    store: WorkflowStore,
) -> None:
    key = RequestKey("submit", "r-1", "f" * 64)
    assert store.put_request(key, "wf-1", 1) == "wf-1"
    assert store.put_request(key, "wf-2", 2) == "wf-1"
    assert store.request(key) == "wf-1"
    with pytest.raises(AlreadyExists):
        store.request(RequestKey("submit", "r-1", "e" * 64))


def test_listing_pages_and_filters_by_state(store: WorkflowStore) -> None:
    records = [create(store) for _ in range(5)]
    write(store, records[0], model.STEP_STARTED, {"step_id": "a", "state": "PLAN_RUNNING"})
    page = store.list_workflows(ListFilter(), 3)
    rest = store.list_workflows(
        ListFilter(), 3, (page[-1].summary["created_us"], page[-1].workflow_id)
    )
    assert len(page) == 3 and len(rest) == 2
    assert {r.workflow_id for r in page + rest} == {r.workflow_id for r in records}
    running = store.list_workflows(ListFilter(state="PLAN_RUNNING"), 10)
    assert [r.workflow_id for r in running] == [records[0].workflow_id]


def test_every_entry_yields_valid_audit_events_with_ids_derived_from_the_log() -> None:
    from cabincrew.convert import validate_protocol

    first = started("wf1")
    record = model.new_record(first)
    entries = [
        first,
        Entry(
            "wf1", 2, 2, model.STEP_STARTED, {"step_id": "a", "state": "PLAN_RUNNING", "attempt": 1}
        ),
        Entry(
            "wf1",
            3,
            3,
            model.STEP_FAILED,
            {
                "step_id": "a",
                "state": "FAILED",
                "error": "plan-token mismatch",
                "failure_kind": "integrity",
                "integrity_check": {
                    "expected_plan_token": "a" * 64,
                    "actual_plan_token": "b" * 64,
                    "plan_token_match": False,
                    "artifacts_match": False,
                    "differences": ["workspace hash changed"],
                },
            },
        ),
    ]
    types = []
    for entry in entries[1:]:
        record = model.apply(record, entry)
        for spec in events_for(entry, record.state.value):
            document = {
                "event_id": spec.event_id,
                "timestamp": "2025-01-01T00:00:00Z",
                "event_type": spec.event_type,
                "workflow_state": spec.workflow_state,
                **{k: v for k, v in spec.parts.items()},
            }
            assert validate_protocol(document, "AuditEvent") == [], spec
            types.append((spec.event_id, spec.event_type, spec.severity))
    assert ("orch-wf1-3.1", "orchestrator.integrity_failed", "critical") in types
    assert types[0][0] == "orch-wf1-2"


def test_an_entry_out_of_place_does_not_apply() -> None:
    record = model.new_record(started("wf1"))
    with pytest.raises(model.ReplayError):
        model.apply(
            record,
            Entry("wf1", 3, 3, model.STEP_STARTED, {"step_id": "a", "state": "PLAN_RUNNING"}),
        )
    with pytest.raises(model.ReplayError):
        model.apply(
            record,
            Entry("wf1", 2, 3, model.STEP_STARTED, {"step_id": "zz", "state": "PLAN_RUNNING"}),
        )
