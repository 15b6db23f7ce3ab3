"""Signed decision records: what was signed verifies, anything changed or forged does not."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from approval_svc import wire
from approval_svc.model import (
    Approval,
    DecisionRecord,
    NewApproval,
    State,
    SubjectKind,
    apply_decision,
    format_instant,
)
from approval_svc.records import record_bytes, sign_record, verify_approval, verify_record
from cabincrew.canonical import canonical_json
from cabincrew.signing import Ed25519Signer
from tests.approval.conftest import subject

SIGNER = Ed25519Signer.generate()
OTHER = Ed25519Signer.generate()
NOW = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)


def record(**fields: object) -> DecisionRecord:
    values: dict[str, object] = {
        "approval_id": "a1",
        "approved": True,
        "reason": "looks right",
        "approver": "carol",
        "approver_roles": ("release-manager",),
        "decided_at": NOW,
        "subject_hash": subject(),
        **fields,
    }
    return sign_record(DecisionRecord(**values), SIGNER)  # type: ignore[arg-type]


def approval(*records: DecisionRecord, quorum: int = 1) -> Approval:
    new = NewApproval(
        request_id="r1",
        subject_kind=SubjectKind.PLAN_TOKEN,
        subject_hash=subject(),
        reason="deploy",
        required_role="release-manager",
        requester="alice",
        created_by="alice",
        quorum=quorum,
        workflow_id="wf",
        step_id="s",
    )
    current = Approval.open("a1", new, NOW - timedelta(minutes=1), timedelta(hours=1))
    for item in records:
        current = apply_decision(current, item)
    return current


def test_the_signed_bytes_are_the_canonical_json_of_the_seven_fields() -> None:
    signed = record(approver_roles=("sre", "release-manager"))
    assert record_bytes(signed) == canonical_json(
        {
            "approval_id": "a1",
            "approved": True,
            "reason": "looks right",
            "approver": "carol",
            "approver_roles": ["release-manager", "sre"],
            "decided_at": "2030-01-01T12:00:00.123456Z",
            "subject_hash": subject(),
        }
    )
    assert format_instant(NOW) == "2030-01-01T12:00:00.123456Z"


def test_a_signed_record_verifies_with_the_signing_key_only() -> None:
    signed = record()
    assert verify_record(signed, SIGNER.public_key_bytes())
    assert not verify_record(signed, OTHER.public_key_bytes())


_CHANGES = {
    "approval_id": "a2",
    "approved": False,
    "reason": "looks right!",
    "approver": "mallory",
    "approver_roles": ("admin",),
    "decided_at": NOW + timedelta(microseconds=1),
    "subject_hash": subject("other"),
    "key_id": "0" * 16,
}


@given(st.sampled_from(sorted(_CHANGES)))
def test_changing_any_field_breaks_the_signature(name: str) -> None:
    altered = dataclasses.replace(record(), **{name: _CHANGES[name]})  # type: ignore[arg-type]
    assert not verify_record(altered, SIGNER.public_key_bytes())


@given(st.binary(min_size=64, max_size=64))
def test_a_forged_signature_does_not_verify(signature: bytes) -> None:
    forged = dataclasses.replace(record(), signature=signature)
    assert not verify_record(forged, SIGNER.public_key_bytes())


def test_a_record_signed_by_another_key_does_not_verify_even_with_our_key_id() -> None:
    mine = record()
    theirs = sign_record(dataclasses.replace(mine, signature=b"", key_id=""), OTHER)
    assert not verify_record(
        dataclasses.replace(theirs, key_id=SIGNER.key_id), SIGNER.public_key_bytes()
    )


def test_verify_approval_accepts_what_the_records_justify() -> None:
    key = SIGNER.public_key_bytes()
    assert verify_approval(approval(record()), key) == []
    rejected = approval(record(approved=False, reason="no"))
    assert rejected.state is State.REJECTED
    assert verify_approval(rejected, key) == []


def test_verify_approval_finds_claims_the_records_do_not_justify() -> None:
    key = SIGNER.public_key_bytes()
    one = approval(record(), quorum=2)
    assert one.state is State.PENDING
    assert verify_approval(dataclasses.replace(one, state=State.APPROVED), key)
    assert verify_approval(dataclasses.replace(approval(), state=State.REJECTED), key)
    wrong_subject = approval(record(subject_hash=subject("elsewhere")))
    assert verify_approval(wrong_subject, key)
    self_approved = approval(record(approver="alice"))
    assert verify_approval(self_approved, key)
    no_role = approval(record(approver_roles=("developer",)))
    assert verify_approval(no_role, key)
    copied = approval(record(), record(), quorum=2)
    assert any("twice" in p for p in verify_approval(copied, key))


def test_records_survive_the_wire_form_exactly() -> None:
    signed = approval(record())
    assert wire.approval_from_proto(wire.approval_to_proto(signed)) == signed
    assert (
        verify_approval(
            wire.approval_from_proto(wire.approval_to_proto(signed)), SIGNER.public_key_bytes()
        )
        == []
    )
