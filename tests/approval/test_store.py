"""The approval store on SQLite and (where configured) PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine

from approval_svc.errors import AlreadyConsumed
from approval_svc.model import (
    Approval,
    NewApproval,
    State,
    SubjectKind,
    apply_decision,
    consume,
    decision_for,
)
from approval_svc.records import sign_record
from approval_svc.store import ApprovalStore, Cursor, ListFilter, RequestKey, to_us
from cabincrew.auth import Principal
from cabincrew.clients import RPCError
from cabincrew.errors import AlreadyExists
from cabincrew.signing import Ed25519Signer
from cabincrew.v1 import approval_pb2
from tests.approval.conftest import StartServer, create_request, subject

NOW = datetime(2030, 1, 1, tzinfo=UTC)
SIGNER = Ed25519Signer.generate()
SERVICE = Principal("orchestrator", frozenset({"service"}))


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ApprovalStore]:
    """A migrated store; on PostgreSQL in a schema of its own, dropped afterwards."""
    if request.param == "sqlite":
        opened = ApprovalStore(f"sqlite:///{tmp_path / 'approval.db'}")
        opened.migrate()
        yield opened
        opened.close()
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"test_approval_{uuid.uuid4().hex[:12]}"
    opened = ApprovalStore(url, schema=schema)
    try:
        opened.migrate()
        yield opened
    finally:
        opened.close()
        _drop_schema(url, schema)


def _drop_schema(url: str, schema: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        engine.dispose()


def new(n: int = 0, quorum: int = 1, **fields: object) -> NewApproval:
    values: dict[str, object] = {
        "request_id": f"r{n}",
        "subject_kind": SubjectKind.PLAN_TOKEN,
        "subject_hash": subject(f"s{n}"),
        "reason": "deploy",
        "required_role": "release-manager",
        "requester": "alice",
        "created_by": "orchestrator",
        "quorum": quorum,
        "workflow_id": f"wf-{n % 2}",
        "step_id": "s",
        **fields,
    }
    return NewApproval(**values)  # type: ignore[arg-type]


def opened(n: int = 0, quorum: int = 1, at: datetime = NOW) -> tuple[Approval, RequestKey]:
    request = new(n, quorum)
    approval = Approval.open(f"a{n}", request, at, timedelta(hours=1))
    return approval, RequestKey("create", request.request_id, request.fingerprint())


def state_of(store: ApprovalStore, approval_id: str) -> State:
    approval = store.get(approval_id)
    assert approval is not None
    return approval.state


def respond(who: str) -> Callable[[Approval], Approval]:
    principal = Principal(who, frozenset({"release-manager"}))

    def transition(current: Approval) -> Approval:
        record = sign_record(decision_for(current, principal, True, "ok", NOW), SIGNER)
        return apply_decision(current, record)

    return transition


def test_migrating_twice_is_harmless(store: ApprovalStore) -> None:
    store.migrate()


def test_an_approval_and_its_records_read_back_unchanged(store: ApprovalStore) -> None:
    approval, key = opened(quorum=2)
    store.create(approval, key)
    updated, changed = store.update("a0", respond("carol"))
    assert changed
    assert store.get("a0") == updated
    assert updated is not None and updated.decisions[0].signature
    assert store.get("missing") is None
    assert store.update("missing", respond("carol")) == (None, False)


def test_create_is_idempotent_by_request_key(store: ApprovalStore) -> None:
    approval, key = opened()
    assert store.create(approval, key) == (approval, True)
    again = Approval.open("other-id", new(), NOW, timedelta(hours=1))
    assert store.create(again, key) == (approval, False)
    with pytest.raises(AlreadyExists):
        store.create(again, RequestKey("create", key.request_id, "f" * 64))


def test_a_refused_transition_changes_nothing(store: ApprovalStore) -> None:
    approval, key = opened()
    store.create(approval, key)

    def refuse(current: Approval) -> Approval:
        raise AlreadyConsumed("no", "CONSUMED", current.approval_id)

    request = RequestKey("consume", "c1", "f" * 64)
    with pytest.raises(AlreadyConsumed):
        store.update("a0", refuse, request)
    assert store.get("a0") == approval
    # The key was not remembered: the same request may be tried again.
    assert store.update("a0", lambda a: a, request) == (approval, True)


async def test_concurrent_answers_are_all_recorded(store: ApprovalStore) -> None:
    approval, key = opened(quorum=6)
    store.create(approval, key)
    names = [f"approver-{i}" for i in range(6)]
    await asyncio.gather(*(asyncio.to_thread(store.update, "a0", respond(name)) for name in names))
    final = store.get("a0")
    assert final is not None
    assert sorted(d.approver for d in final.decisions) == names
    assert final.state is State.APPROVED


async def test_concurrent_consumes_succeed_exactly_once(store: ApprovalStore) -> None:
    approval, key = opened()
    store.create(approval, key)
    store.update("a0", respond("carol"))

    def use(n: int) -> str:
        try:
            store.update("a0", lambda a: consume(a, SERVICE, a.subject_hash, NOW))
        except AlreadyConsumed:
            return "refused"
        return "used"

    results = await asyncio.gather(*(asyncio.to_thread(use, n) for n in range(6)))
    assert sorted(results) == ["refused"] * 5 + ["used"]


def test_expire_due_expires_overdue_approvals_once(store: ApprovalStore) -> None:
    for n in range(3):
        approval, key = opened(n, at=NOW + timedelta(minutes=n * 30))
        store.create(approval, key)
    store.update("a0", respond("carol"))

    expired = store.expire_due(NOW + timedelta(minutes=90))
    assert sorted(a.approval_id for a in expired) == ["a0", "a1"]
    assert store.expire_due(NOW + timedelta(minutes=90)) == []
    assert [state_of(store, f"a{n}") for n in range(3)] == [
        State.EXPIRED,
        State.EXPIRED,
        State.PENDING,
    ]


def test_list_pages_in_creation_order_with_filters(store: ApprovalStore) -> None:
    for n in range(5):
        approval, key = opened(n, at=NOW + timedelta(seconds=n))
        store.create(approval, key)
    first = store.list_approvals(ListFilter(), 2)
    assert [a.approval_id for a in first] == ["a0", "a1"]
    rest = store.list_approvals(ListFilter(), 10, Cursor(to_us(first[-1].created_at), "a1"))
    assert [a.approval_id for a in rest] == ["a2", "a3", "a4"]
    assert len(store.list_approvals(ListFilter(workflow_id="wf-1"), 10)) == 2
    assert store.list_approvals(ListFilter(state=State.APPROVED), 10) == []


async def test_the_service_runs_on_postgresql(start_server: StartServer, postgres_url: str) -> None:
    schema = f"test_approval_{uuid.uuid4().hex[:12]}"
    try:
        env = await start_server(schema=schema, **{"database.url": postgres_url})
        orchestrator = env.client("orchestrator", ["service"])
        approval = await orchestrator.create(create_request(on_behalf_of="alice"))
        carol = env.client("carol", ["release-manager"])
        await carol.respond(approval.approval_id, approval.subject_hash, True)
        used = await orchestrator.consume(approval.approval_id, approval.subject_hash)
        assert used.state == approval_pb2.APPROVAL_STATE_CONSUMED
        with pytest.raises(RPCError) as info:
            await orchestrator.consume(approval.approval_id, approval.subject_hash)
        assert info.value.status == grpc.StatusCode.FAILED_PRECONDITION
        await env.server.stop(0)
    finally:
        _drop_schema(postgres_url, schema)
