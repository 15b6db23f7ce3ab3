"""The approval state machine as pure functions."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from approval_svc.errors import (
    AlreadyConsumed,
    AlreadyResponded,
    Expired,
    MissingRole,
    NotAllowed,
    NotApproved,
    SelfApproval,
    SubjectMismatch,
)
from approval_svc.model import (
    Approval,
    NewApproval,
    State,
    SubjectKind,
    apply_decision,
    cancel,
    check_respond,
    consume,
    decision_for,
    expire,
)
from cabincrew.auth import Principal
from cabincrew.errors import InvalidArgument
from tests.approval.conftest import subject

NOW = datetime(2030, 1, 1, tzinfo=UTC)
ALICE = Principal("alice", frozenset({"developer"}))
CAROL = Principal("carol", frozenset({"release-manager"}))
DAVE = Principal("dave", frozenset({"admin"}))
ORCHESTRATOR = Principal("orchestrator", frozenset({"service"}))


def new(**fields: object) -> NewApproval:
    values: dict[str, object] = {
        "request_id": "r1",
        "subject_kind": SubjectKind.PLAN_TOKEN,
        "subject_hash": subject(),
        "reason": "deploy",
        "required_role": "release-manager",
        "requester": "alice",
        "created_by": "alice",
        "workflow_id": "wf",
        "step_id": "s",
        **fields,
    }
    return NewApproval(**values)  # type: ignore[arg-type]


def pending(quorum: int = 1, **fields: object) -> Approval:
    return Approval.open("a1", new(quorum=quorum, **fields), NOW, timedelta(hours=1))


def answer(approval: Approval, who: Principal, approved: bool = True) -> Approval:
    check_respond(approval, who, approval.subject_hash, NOW)
    return apply_decision(approval, decision_for(approval, who, approved, "r", NOW))


def test_a_new_approval_is_checked_when_built() -> None:
    with pytest.raises(InvalidArgument) as info:
        new(subject_hash="ABC", reason=" ", required_role="Bad Role", quorum=0, step_id="")
    fields = {v.field for v in info.value.violations}
    assert fields == {"subject_hash", "reason", "required_role", "quorum", "step_id"}
    with pytest.raises(InvalidArgument):
        new(subject_kind=SubjectKind.LLM_REQUEST, workflow_id="", step_id="")
    with pytest.raises(InvalidArgument):
        new(ttl=timedelta(days=31))


def test_the_fingerprint_tells_a_retry_from_another_request() -> None:
    assert new().fingerprint() == new().fingerprint()
    assert new().fingerprint() != new(reason="other").fingerprint()
    assert new().fingerprint() != new(created_by="bob").fingerprint()


def test_refusals_of_a_response() -> None:
    approval = pending()
    with pytest.raises(SelfApproval):
        check_respond(approval, Principal("alice", frozenset({"admin"})), subject(), NOW)
    with pytest.raises(MissingRole):
        check_respond(approval, Principal("eve", frozenset({"developer"})), subject(), NOW)
    with pytest.raises(SubjectMismatch):
        check_respond(approval, CAROL, subject("other"), NOW)
    with pytest.raises(Expired):
        check_respond(approval, CAROL, subject(), NOW + timedelta(hours=1))


def test_admin_holds_every_role() -> None:
    assert answer(pending(), DAVE).state is State.APPROVED


def test_quorum_counts_distinct_approvers_and_one_rejection_rejects() -> None:
    approval = answer(pending(quorum=2), CAROL)
    assert approval.state is State.PENDING
    with pytest.raises(AlreadyResponded):
        check_respond(approval, CAROL, subject(), NOW)
    assert answer(approval, DAVE).state is State.APPROVED
    assert answer(approval, DAVE, approved=False).state is State.REJECTED
    with pytest.raises(NotApproved):
        answer(answer(approval, DAVE), Principal("erin", frozenset({"release-manager"})))


def test_consume_once_for_the_same_subject_before_expiry() -> None:
    approved = answer(pending(created_by="orchestrator"), CAROL)
    with pytest.raises(NotAllowed):
        consume(approved, CAROL, subject(), NOW)
    with pytest.raises(SubjectMismatch):
        consume(approved, ORCHESTRATOR, subject("x"), NOW)
    with pytest.raises(Expired):
        consume(approved, ORCHESTRATOR, subject(), NOW + timedelta(hours=2))
    used = consume(approved, ORCHESTRATOR, subject(), NOW)
    assert (used.state, used.consumed_by) == (State.CONSUMED, "orchestrator")
    with pytest.raises(AlreadyConsumed):
        consume(used, ORCHESTRATOR, subject(), NOW)
    with pytest.raises(NotApproved):
        consume(pending(), ORCHESTRATOR, subject(), NOW)


def test_the_creator_may_consume_its_own_approval() -> None:
    approved = answer(pending(), CAROL)
    assert consume(approved, ALICE, subject(), NOW).state is State.CONSUMED


def test_cancel_by_requester_creator_or_admin_only_while_unused() -> None:
    approval = pending(requester="bob", created_by="orchestrator")
    with pytest.raises(NotAllowed):
        cancel(approval, CAROL, "no", NOW)
    for who in (Principal("bob"), ORCHESTRATOR, DAVE):
        assert cancel(approval, who, "x", NOW).state is State.CANCELLED
    approved = answer(approval, CAROL)
    assert cancel(approved, DAVE, "withdrawn", NOW).state is State.CANCELLED
    used = consume(approved, ORCHESTRATOR, subject(), NOW)
    with pytest.raises(AlreadyConsumed):
        cancel(used, DAVE, "too late", NOW)
    with pytest.raises(Expired):
        cancel(approval, DAVE, "late", NOW + timedelta(hours=1))


def test_expiry_applies_to_pending_and_unused_approved_approvals() -> None:
    later = NOW + timedelta(hours=1)
    assert pending().with_expiry(later).state is State.EXPIRED
    assert answer(pending(), CAROL).with_expiry(later).state is State.EXPIRED
    rejected = answer(pending(), CAROL, approved=False)
    assert rejected.with_expiry(later).state is State.REJECTED
    assert expire(pending(), later).state is State.EXPIRED
    with pytest.raises(ValueError):
        expire(pending(), NOW)
    assert dataclasses.replace(pending(), state=State.CONSUMED).state.terminal
