"""The leaf rule, validation and redaction of incoming events (pure domain code)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import rfc8785
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from audit_svc.errors import InvalidEvent
from audit_svc.events import (
    GENESIS_CHAIN_HASH,
    _quick_violations,
    canonical_bytes,
    next_chain_hash,
    prepare_event,
    protocol_leaf_hash,
    stored_to_protocol,
)
from cabincrew.convert import ConversionError, to_protocol, validate_protocol
from cabincrew.v1 import common_pb2
from tests.audit.conftest import event

LIMIT = 256 * 1024


def _fields(error: InvalidEvent) -> set[str]:
    return {v.field for v in error.violations}


def test_the_leaf_hash_is_sha256_of_0x00_and_the_rfc8785_event_without_unhashed_fields() -> None:
    incoming = event(1, signature="c2ln", signature_key_ref="engine-key-1")
    prepared = prepare_event(incoming, LIMIT)
    document = to_protocol(incoming)
    for name in ("chain_hash", "signature", "signature_key_ref"):
        document.pop(name, None)
    expected = hashlib.sha256(b"\x00" + rfc8785.dumps(document)).digest()
    assert prepared.leaf_hash == expected
    assert prepared.leaf_input == rfc8785.dumps(document)
    assert (prepared.signature, prepared.signature_key_ref) == ("c2ln", "engine-key-1")


def test_the_exported_event_carries_the_chain_hash_and_still_hashes_to_the_leaf() -> None:
    prepared = prepare_event(event(2, signature="c2ln", signature_key_ref="k"), LIMIT)
    chain = next_chain_hash(GENESIS_CHAIN_HASH, prepared.leaf_hash)
    exported = stored_to_protocol(prepared.leaf_input, "c2ln", "k", chain)
    assert exported["chain_hash"] == chain.hex()
    assert validate_protocol(exported, "AuditEvent") == []
    assert protocol_leaf_hash(exported) == prepared.leaf_hash


def test_timestamps_are_normalised_to_utc_so_one_instant_is_one_identity() -> None:
    first = event(3)
    second = event(3)
    second.timestamp.FromSeconds(first.timestamp.seconds)
    assert prepare_event(first, LIMIT).leaf_input == prepare_event(second, LIMIT).leaf_input
    assert b'"timestamp":"2023-11-14T22:13:23Z"' in prepare_event(first, LIMIT).leaf_input


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda e: e.ClearField("timestamp"), "timestamp"),
        (lambda e: setattr(e, "workflow_state", ""), "workflow_state"),
        (lambda e: setattr(e, "event_id", ""), "event_id"),
        (lambda e: setattr(e, "event_id", "has space"), "event_id"),
        (lambda e: setattr(e, "event_type", "bad type!"), "event_type"),
        (lambda e: setattr(e, "chain_hash", "ab" * 32), "chain_hash"),
        (lambda e: setattr(e, "severity", 99), "severity"),
        (
            lambda e: e.policy.policy_evaluations.add(
                source=common_pb2.POLICY_SOURCE_OPA, policy_id="p", severity=7
            ),
            "policy.decision",
        ),
    ],
)
def test_an_invalid_event_is_refused_with_the_field_named(change: Any, field: str) -> None:
    incoming = event(4)
    change(incoming)
    with pytest.raises(InvalidEvent) as info:
        prepare_event(incoming, LIMIT)
    assert field in _fields(info.value)


def test_an_event_larger_than_the_limit_is_refused() -> None:
    with pytest.raises(InvalidEvent) as info:
        prepare_event(event(5, message="x" * 5000), 4096)
    assert _fields(info.value) == {"event"}


def test_an_integer_json_cannot_carry_exactly_is_refused() -> None:
    incoming = event(6)
    incoming.artifacts.add(name="a", hash="h", size=2**60)
    with pytest.raises(InvalidEvent):
        prepare_event(incoming, LIMIT)


def test_secrets_are_replaced_by_markers_and_counted_before_storage() -> None:
    secret = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    incoming = event(7, message=f"pushed with {secret}")
    incoming.policy.decision = common_pb2.DECISION_DENY
    incoming.policy.workflow_state = "PRE_FLIGHT_RUNNING"
    evaluation = incoming.policy.policy_evaluations.add(
        source=common_pb2.POLICY_SOURCE_OPA,
        policy_id="secrets",
        decision=common_pb2.DECISION_DENY,
        severity=3,
        reason=f"found {secret}",
    )
    evaluation.evaluated_at.FromSeconds(1_700_000_000)
    evaluation.evidence.update({"matches": [{"value": secret}], "password": "hunter2"})
    prepared = prepare_event(incoming, LIMIT)
    assert secret.encode() not in prepared.leaf_input
    assert b"hunter2" not in prepared.leaf_input
    assert b"[REDACTED:" in prepared.leaf_input
    assert prepared.redactions == 4


def test_markers_placed_by_an_emitter_count_as_redactions() -> None:
    prepared = prepare_event(event(8, message="token [REDACTED:github-pat] used"), LIMIT)
    assert prepared.redactions == 1


def test_an_event_id_that_looks_like_a_secret_is_refused_rather_than_redacted() -> None:
    incoming = event(9)
    incoming.event_id = "AKIAIOSFODNN7EXAMPLE"
    with pytest.raises(InvalidEvent) as info:
        prepare_event(incoming, LIMIT)
    assert _fields(info.value) == {"event_id"}


# --- the fast paths agree with the reference implementations -----------------------------

_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_canonical_bytes_equal_rfc8785_or_both_refuse(value: Any) -> None:
    try:
        expected = rfc8785.dumps(value)
    except ValueError:
        with pytest.raises(ValueError):
            canonical_bytes(value)
        return
    assert canonical_bytes(value) == expected


_text = st.text(max_size=8)
_evaluations = st.builds(
    dict,
    source=st.integers(0, 5),
    policy_id=_text,
    decision=st.integers(0, 4),
    severity=st.integers(-1, 5),
    reason=_text,
    stamped=st.booleans(),
)


@st.composite
def _events(draw: st.DrawFn) -> common_pb2.AuditEvent:
    incoming = common_pb2.AuditEvent(
        event_id=draw(_text),
        event_type=draw(_text),
        workflow_state=draw(_text),
        message=draw(_text),
        severity=draw(st.integers(0, 5)),
    )
    if draw(st.booleans()):
        incoming.timestamp.FromSeconds(draw(st.integers(0, 2**33)))
    if draw(st.booleans()):
        incoming.workflow.workflow_id = draw(_text)
    if draw(st.booleans()):
        incoming.policy.decision = draw(st.integers(0, 4))
        incoming.policy.workflow_state = draw(_text)
        incoming.policy.aggregation_method = draw(st.integers(0, 6))
        for item in draw(st.lists(_evaluations, max_size=3)):
            stamped = item.pop("stamped")
            evaluation = incoming.policy.policy_evaluations.add(**item)
            if stamped:
                evaluation.evaluated_at.FromSeconds(1)
            evaluation.evidence.update({"score": 0.5})
    if draw(st.booleans()):
        incoming.approval.approval_id = draw(_text)
        if draw(st.booleans()):
            incoming.approval.timestamp.FromSeconds(2)
    if draw(st.booleans()):
        incoming.plan_token.token = draw(_text)
        incoming.plan_token.artifacts.add(name=draw(_text), hash="h")
        if draw(st.booleans()):
            incoming.plan_token.created_at.FromSeconds(3)
    if draw(st.booleans()):
        incoming.gateway.policy_decision = draw(st.integers(0, 4))
    return incoming


@settings(max_examples=300, deadline=None)
@given(_events())
def test_the_quick_schema_check_agrees_with_the_full_validator_on_converted_events(
    incoming: common_pb2.AuditEvent,
) -> None:
    try:
        document = to_protocol(incoming)
    except ConversionError:
        return
    full = {path for path, _ in validate_protocol(document, "AuditEvent")}
    quick = {v.field for v in _quick_violations(document, "AuditEvent")}
    assert quick == full


def test_struct_evidence_with_floats_takes_the_reference_canonicaliser() -> None:
    incoming = event(10)
    incoming.policy.decision = common_pb2.DECISION_ALLOW
    incoming.policy.workflow_state = "PRE_FLIGHT_RUNNING"
    evaluation = incoming.policy.policy_evaluations.add(
        source=common_pb2.POLICY_SOURCE_ONNX,
        policy_id="toxicity",
        decision=common_pb2.DECISION_ALLOW,
        severity=0,
    )
    evaluation.evaluated_at.FromSeconds(1_700_000_000)
    evaluation.evidence.update({"score": 1e-7, "big": 1e21})
    prepared = prepare_event(incoming, LIMIT)
    assert prepared.leaf_input == rfc8785.dumps(to_protocol(incoming))
    assert isinstance(struct_pb2.Value, type)
