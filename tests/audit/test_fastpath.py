"""The append hot path equals the kernel's reference functions, and the leaf rule is unchanged.

``audit_svc.fastpath`` replaces ``to_protocol`` and ``redact_json`` on the append path for
speed; these properties hold it to exactly the reference's output, refusals included, and
check the stored bytes against the leaf rule computed with reference code only.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Any

import pytest
import rfc8785
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit_svc import fastpath
from audit_svc.errors import InvalidEvent
from audit_svc.events import _plain, prepare_event
from audit_svc.fastpath import (
    event_document,
    redact_document,
    redact_plain,
    redact_text_fast,
)
from cabincrew.convert import ConversionError, to_protocol, validate_protocol
from cabincrew.redaction import (
    RULE_IDS,
    RULES,
    SENSITIVE_KEYS,
    generate_example,
    redact_json,
    redact_text,
)
from cabincrew.v1 import common_pb2

LIMIT = 256 * 1024
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799

# --- strategies ------------------------------------------------------------------------------

_secrets = st.builds(generate_example, st.sampled_from(RULE_IDS), st.randoms(use_true_random=False))
_keywordish = st.sampled_from(
    [
        *sorted({k for rule in RULES for k in rule.keywords}),
        *("AKIA", "Token", "PASSWORD=", "\u0130", "https://u:p@h", "[REDACTED:github-pat]"),
    ]
)
_strings = st.one_of(
    st.text(max_size=20),
    _secrets,
    st.lists(st.one_of(st.text(max_size=6), _keywordish, _secrets), max_size=4).map(" ".join),
)
_keys = st.one_of(
    st.text(max_size=8),
    st.sampled_from(sorted(SENSITIVE_KEYS)),
    st.sampled_from(["GITHUB_TOKEN", "Password", "api-key", "DB_PASSWORD_FILE", "\U0001d518key"]),
)
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _strings
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=16,
)
# Struct values: what engines put in evidence, non-finite numbers included (refused).
_struct_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats()
    | _strings,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_enum = st.integers(0, 9)  # beyond every enum's values: refused by both
_seconds = st.one_of(
    st.integers(_MIN_SECONDS, _MAX_SECONDS),
    st.integers(1_600_000_000, 1_800_000_000),
    st.sampled_from([_MIN_SECONDS - 1, _MAX_SECONDS + 1, _MIN_SECONDS, _MAX_SECONDS]),
)
_nanos = st.one_of(
    st.just(0),
    st.integers(0, 999).map(lambda n: n * 1_000_000),
    st.integers(0, 999_999).map(lambda n: n * 1000),
    st.integers(0, 999_999_999),
)


def _stamp(draw: st.DrawFn, target: timestamp_pb2.Timestamp) -> None:
    target.seconds = draw(_seconds)
    target.nanos = draw(_nanos)


@st.composite
def _messages(draw: st.DrawFn) -> common_pb2.AuditEvent:
    """Any AuditEvent: every part, enums in and out of range, timestamps in and out of range."""
    message = common_pb2.AuditEvent(
        event_id=draw(_strings),
        event_type=draw(_strings),
        workflow_state=draw(_strings),
        message=draw(_strings),
        severity=draw(_enum),
        signature=draw(st.sampled_from(["", "c2ln"])),
        signature_key_ref=draw(st.sampled_from(["", "k1"])),
    )
    if draw(st.booleans()):
        _stamp(draw, message.timestamp)
    if draw(st.booleans()):
        message.workflow.workflow_id = draw(_strings)
        message.workflow.step_id = draw(_strings)
        message.workflow.mode = draw(_strings)
    if draw(st.booleans()):
        message.engine.engine_id = draw(_strings)
        message.engine.receipt_id = draw(_strings)
        message.engine.status = draw(_strings)
    for _ in range(draw(st.integers(0, 2))):
        message.artifacts.add(
            name=draw(_strings), hash=draw(_strings), size=draw(st.integers(0, 2**62))
        )
    if draw(st.booleans()):
        policy = message.policy
        policy.decision = draw(_enum)
        policy.aggregation_method = draw(_enum)
        policy.workflow_state = draw(_strings)
        policy.violations.extend(draw(st.lists(_strings, max_size=2)))
        for _ in range(draw(st.integers(0, 2))):
            evaluation = policy.policy_evaluations.add(
                source=draw(_enum),
                policy_id=draw(_strings),
                decision=draw(_enum),
                severity=draw(st.integers(-1, 5)),
                reason=draw(_strings),
            )
            if draw(st.booleans()):
                _stamp(draw, evaluation.evaluated_at)
            if draw(st.booleans()):
                evaluation.evidence.update(
                    draw(st.dictionaries(st.text(max_size=6), _struct_json, max_size=3))
                )
    if draw(st.booleans()):
        approval = message.approval
        approval.approval_id = draw(_strings)
        approval.approved = draw(st.booleans())
        if draw(st.booleans()):
            _stamp(draw, approval.timestamp)
    if draw(st.booleans()):
        token = message.plan_token
        token.token = draw(_strings)
        for _ in range(draw(st.integers(0, 2))):
            token.artifacts.add(name=draw(_strings), hash=draw(_strings))
        if draw(st.booleans()):
            _stamp(draw, token.created_at)
    if draw(st.booleans()):
        message.integrity_check.plan_token_match = draw(st.booleans())
        message.integrity_check.differences.extend(draw(st.lists(_strings, max_size=2)))
    if draw(st.booleans()):
        message.gateway.policy_decision = draw(_enum)
        message.gateway.tool = draw(_strings)
    return message


def _converted(convert: Any, message: common_pb2.AuditEvent) -> Any:
    try:
        # Sorted JSON text: equal documents with the same JSON types (1 and 1.0 differ).
        return json.dumps(convert(message), sort_keys=True)
    except ConversionError as exc:
        return ("refused", exc.field_violations)


# --- equal to the references -----------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages())
def test_event_document_equals_to_protocol_refusals_included(
    message: common_pb2.AuditEvent,
) -> None:
    assert _converted(event_document, message) == _converted(to_protocol, message)


@settings(max_examples=200, deadline=None)
@given(_seconds, _nanos)
def test_timestamps_are_written_as_protobuf_writes_them(seconds: int, nanos: int) -> None:
    message = common_pb2.AuditEvent()
    message.timestamp.seconds, message.timestamp.nanos = seconds, nanos
    try:
        expected = message.timestamp.ToJsonString()
    except ValueError:
        expected = None
    written = event_document(message).get("timestamp") if expected else None
    assert written == expected


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json)
def test_redact_document_equals_redact_json(value: Any) -> None:
    # repr is type-strict and keeps order: the same containers, strings and counts.
    assert repr(redact_document(value)) == repr(redact_json(value))


@settings(max_examples=300, deadline=None)
@given(_json)
def test_the_plain_flag_is_the_canonical_fast_path_test(value: Any) -> None:
    redacted, _count, plain = redact_plain(value)
    assert plain == _plain(redacted)


@settings(max_examples=500, deadline=None)
@given(_strings)
def test_the_keyword_screen_finds_exactly_what_the_rules_look_for(text: str) -> None:
    lowered = text.lower()
    keywords = {k for rule in RULES for k in rule.keywords}
    assert (fastpath._KEYWORDS.search(lowered) is not None) == any(k in lowered for k in keywords)
    assert redact_text_fast(text) == redact_text(text)


def test_strings_holding_a_secret_are_never_remembered() -> None:
    rng = random.Random(7)
    for rule in RULE_IDS:
        text = generate_example(rule, rng)
        redacted, count = redact_text_fast(text)
        assert count > 0 and (redacted, count) == redact_text(text)
        assert text not in fastpath._clean
        assert redact_text_fast(text) == (redacted, count)


def test_the_clean_cache_stays_bounded() -> None:
    for i in range(fastpath.CLEAN_CACHE_SIZE + 10):
        redact_text_fast(f"step build-{i}")
    assert len(fastpath._clean) <= fastpath.CLEAN_CACHE_SIZE


# --- the leaf rule, byte for byte ------------------------------------------------------------

_EVENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}")
_EVENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


def _reference_leaf_input(message: common_pb2.AuditEvent) -> bytes | None:
    """The leaf input by the rule, with reference code only; None when the event is refused."""
    document = to_protocol(message)
    if validate_protocol(document, "AuditEvent"):
        return None
    if not _EVENT_ID.fullmatch(document["event_id"]) or redact_text(document["event_id"])[1]:
        return None
    if not _EVENT_TYPE.fullmatch(document["event_type"]):
        return None
    state = document["workflow_state"]
    if not state or len(state) > 64 or re.search(r"[\x00-\x1f\x7f]", state):
        return None
    redacted, _count = redact_json(document)
    if validate_protocol(redacted, "AuditEvent"):
        return None
    leaf = {
        k: v
        for k, v in redacted.items()
        if k not in ("chain_hash", "signature", "signature_key_ref")
    }
    try:
        return bytes(rfc8785.dumps(leaf))
    except ValueError:
        return None


@st.composite
def _valid_messages(draw: st.DrawFn) -> common_pb2.AuditEvent:
    """Mostly valid events (ids, types, states, enums in range) with secrets in any string."""
    message = draw(_messages())
    message.event_id = draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,30}", fullmatch=True))
    message.event_type = draw(st.from_regex(r"[a-z]{1,12}\.[a-z_]{1,20}", fullmatch=True))
    message.workflow_state = draw(st.one_of(st.sampled_from(["INIT", "PLAN_RUNNING"]), _secrets))
    message.severity = draw(st.integers(0, 5))
    message.timestamp.FromSeconds(draw(st.integers(0, 2**33)))
    message.ClearField("chain_hash")
    if message.HasField("policy"):
        message.policy.decision = draw(st.integers(1, 4))
        message.policy.aggregation_method = draw(st.integers(0, 6))
        for evaluation in message.policy.policy_evaluations:
            evaluation.source = draw(st.integers(1, 5))
            evaluation.decision = draw(st.integers(1, 4))
            evaluation.severity = draw(st.integers(0, 3))
            evaluation.evaluated_at.FromSeconds(draw(st.integers(0, 2**33)))
    if message.HasField("gateway"):
        message.gateway.policy_decision = draw(st.integers(0, 4))
    return message


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(_valid_messages())
def test_prepared_events_are_byte_identical_to_the_leaf_rule(
    message: common_pb2.AuditEvent,
) -> None:
    try:
        expected = _reference_leaf_input(message)
    except ConversionError:
        expected = None
    if expected is None:
        with pytest.raises(InvalidEvent):
            prepare_event(message, LIMIT)
        return
    prepared = prepare_event(message, LIMIT)
    assert prepared.leaf_input == expected
    assert prepared.leaf_hash == hashlib.sha256(b"\x00" + expected).digest()
    assert prepared.redactions == expected.count(b"[REDACTED:")
    assert (prepared.signature, prepared.signature_key_ref) == (
        message.signature,
        message.signature_key_ref,
    )
