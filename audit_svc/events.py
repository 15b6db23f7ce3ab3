"""Events as the log stores them: validation, redaction, canonical form and the leaf rule.

The leaf rule is exact, because independent verifiers depend on it:

    leaf_hash  = SHA-256(0x00 || JCS(event without chain_hash, signature, signature_key_ref))
    chain_hash = SHA-256(previous chain_hash || leaf_hash), the first one over 32 zero bytes

where ``event`` is the protocol's ``AuditEvent`` JSON (``cabincrew.convert``: timestamps
normalised to RFC 3339 UTC, enums as wire strings) after redaction, and JCS is RFC 8785.
On the append path ``audit_svc.fastpath`` builds that document and redacts it faster than the
kernel's functions, with the same result (tests/audit/test_fastpath.py holds it to them).
The log stores exactly those canonical bytes (the *leaf input*), so recomputing a leaf hash
is one SHA-256 over the stored text. ``signature`` and ``signature_key_ref`` are outside the
leaf by the rule; they are stored beside it and travel with the event.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

from audit_svc.errors import InvalidEvent
from audit_svc.fastpath import event_document, redact_plain, redact_text_fast
from cabincrew import protocol_schema
from cabincrew.canonical import canonical_json
from cabincrew.convert import ConversionError, from_protocol, validate_protocol
from cabincrew.errors import Violation
from cabincrew.v1 import common_pb2

GENESIS_CHAIN_HASH = bytes(32)
# Fields outside the leaf: the log's own chain hash and the emitter's signature over it.
UNHASHED_FIELDS = ("chain_hash", "signature", "signature_key_ref")
SEVERITY_RANK: Mapping[str, int] = {
    "debug": 1,
    "info": 2,
    "warning": 3,
    "error": 4,
    "critical": 5,
}
MAX_ID_CHARS = 128
_NOT_SCANNED = ("event_id", "timestamp", "severity")
MAX_STATE_CHARS = 64

_EVENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}")
_EVENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MARKER = re.compile(rb"\[REDACTED:[a-z0-9-]+\]")
# Integers JCS can write exactly (RFC 8785 numbers are IEEE 754 doubles).
_SAFE_INTEGER = 2**53


# Slots: one of these per event in flight, and an instance without a __dict__ is one object
# less for the garbage collector to scan while thousands wait for their commit.
@dataclass(frozen=True, slots=True)
class PreparedEvent:
    """A validated, redacted event in its stored form, with its leaf hash."""

    event_id: str
    event_type: str
    workflow_id: str
    step_id: str
    severity: int
    event_time_us: int
    # Canonical JSON of the event without the unhashed fields: what the leaf hash covers.
    leaf_input: bytes
    signature: str
    signature_key_ref: str
    leaf_hash: bytes
    redactions: int

    def same_content(self, leaf_input: bytes, signature: str, signature_key_ref: str) -> bool:
        """Whether a stored event with this id is this event (the idempotency rule)."""
        return (
            self.leaf_input == leaf_input
            and self.signature == signature
            and self.signature_key_ref == signature_key_ref
        )


def leaf_hash(leaf_input: bytes) -> bytes:
    """RFC 6962 leaf hash of a stored event."""
    return hashlib.sha256(b"\x00" + leaf_input).digest()


def next_chain_hash(previous: bytes, leaf: bytes) -> bytes:
    """The chain hash of an entry whose predecessor has chain hash ``previous``."""
    return hashlib.sha256(previous + leaf).digest()


def canonical_bytes(value: Any) -> bytes:
    """RFC 8785 canonical JSON; a fast path for documents without floats or astral keys.

    ``json.dumps`` with sorted keys and no whitespace writes the same bytes as RFC 8785 for
    strings (both escape only controls, quote and backslash, in lowercase ``\\u00xx``),
    booleans, null and safe integers; it differs for floats (number formatting), for keys
    outside the Basic Multilingual Plane (RFC 8785 sorts by UTF-16 code units) and for
    integers beyond 2**53 (RFC 8785 refuses them). Those go to the reference implementation.
    """
    if _plain(value):
        return _dumps(value)
    return canonical_json(value)


# json.dumps with these arguments, without building an encoder per call; no cycle check, as
# documents converted from messages are trees.
_ENCODER = json.JSONEncoder(
    ensure_ascii=False, sort_keys=True, separators=(",", ":"), check_circular=False
)


def _dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


def _plain(value: Any) -> bool:
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -_SAFE_INTEGER < value < _SAFE_INTEGER
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return False
            if not key.isascii() and any(ord(c) > 0xFFFF for c in key):
                return False
            if not _plain(item):
                return False
        return True
    if isinstance(value, list):
        return all(_plain(item) for item in value)
    return False


def leaf_document(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event without the fields the leaf hash does not cover."""
    return {k: v for k, v in event.items() if k not in UNHASHED_FIELDS}


def protocol_leaf_hash(event: Mapping[str, Any]) -> bytes:
    """Leaf hash of a protocol AuditEvent JSON document (what an independent verifier does)."""
    return leaf_hash(canonical_bytes(leaf_document(event)))


def prepare_event(event: common_pb2.AuditEvent, max_event_bytes: int) -> PreparedEvent:
    """Validate, redact and canonicalise an incoming event; raise ``InvalidEvent``."""
    if event.chain_hash:
        # The log assigns chain hashes; one sent in would be silently replaced otherwise.
        raise InvalidEvent(
            "chain_hash is assigned by the log",
            [Violation("chain_hash", "must be empty; the log assigns it")],
        )
    try:
        document = event_document(event)
    except ConversionError as exc:
        raise InvalidEvent(exc.message, exc.violations) from None
    violations = _quick_violations(document, "AuditEvent")
    violations.extend(_own_rules(document))
    if violations:
        raise InvalidEvent(_summary(violations), violations)
    event_id = document["event_id"]
    if redact_text_fast(event_id, remember=False)[1]:
        # Redacting the idempotency key would merge unrelated events; refuse instead.
        violation = Violation("event_id", "looks like a secret; use an opaque identifier")
        raise InvalidEvent("event_id looks like a secret", [violation])
    # The id is checked above; the timestamp and severity are machine-written by
    # to_protocol and cannot hold a secret. Every other string is scanned.
    kept = {name: document.pop(name) for name in _NOT_SCANNED if name in document}
    redacted, made, plain = redact_plain(document)
    redacted.update(kept)
    if made:
        _check_still_valid(redacted)
    signature = redacted.pop("signature", "")
    signature_key_ref = redacted.pop("signature_key_ref", "")
    try:
        # canonical_bytes, with the walk that decides its fast path done during redaction.
        leaf_input = _dumps(redacted) if plain else canonical_json(redacted)
    except ValueError:
        # rfc8785 refuses integers it cannot write exactly.
        violation = Violation("event", "holds a number JSON cannot carry exactly (beyond 2**53)")
        raise InvalidEvent("event holds an unsafe integer", [violation]) from None
    # Emitters redact before their outbox, so the count is of markers in the stored event,
    # whoever placed them, rather than of this scan's replacements alone.
    redactions = len(_MARKER.findall(leaf_input)) if made or b"[REDACTED:" in leaf_input else 0
    size = len(leaf_input) + len(signature) + len(signature_key_ref)
    if size > max_event_bytes:
        violation = Violation(
            "event", f"is {size} bytes in canonical form; at most {max_event_bytes}"
        )
        raise InvalidEvent("event too large", [violation])
    workflow = redacted.get("workflow") or {}
    return PreparedEvent(
        event_id=event_id,
        event_type=redacted["event_type"],
        workflow_id=str(workflow.get("workflow_id", "")),
        step_id=str(workflow.get("step_id", "")),
        severity=SEVERITY_RANK.get(redacted.get("severity", ""), 0),
        event_time_us=event.timestamp.seconds * 1_000_000 + event.timestamp.nanos // 1000,
        leaf_input=leaf_input,
        signature=signature,
        signature_key_ref=signature_key_ref,
        leaf_hash=leaf_hash(leaf_input),
        redactions=redactions,
    )


def stored_to_protocol(
    leaf_input: bytes | str, signature: str, signature_key_ref: str, chain_hash: bytes
) -> dict[str, Any]:
    """The exported protocol document of a stored event: chain_hash filled in."""
    document: dict[str, Any] = json.loads(leaf_input)
    if signature:
        document["signature"] = signature
    if signature_key_ref:
        document["signature_key_ref"] = signature_key_ref
    document["chain_hash"] = chain_hash.hex()
    return document


def stored_to_message(
    leaf_input: bytes | str, signature: str, signature_key_ref: str, chain_hash: bytes
) -> common_pb2.AuditEvent:
    """The exported event as a protobuf message."""
    document = stored_to_protocol(leaf_input, signature, signature_key_ref, chain_hash)
    return from_protocol(document, common_pb2.AuditEvent)


def micros_to_datetime(micros: int) -> datetime:
    """A UTC datetime from microseconds since the epoch."""
    return datetime.fromtimestamp(micros / 1_000_000, tz=UTC)


def _own_rules(document: Mapping[str, Any]) -> list[Violation]:
    found: list[Violation] = []
    event_id = document.get("event_id", "")
    if not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
        found.append(
            Violation("event_id", f"1-{MAX_ID_CHARS} of letters, digits and ._:@/+=- (not first)")
        )
    event_type = document.get("event_type", "")
    if not isinstance(event_type, str) or not _EVENT_TYPE.fullmatch(event_type):
        found.append(
            Violation(
                "event_type",
                f"1-{MAX_ID_CHARS} of letters, digits and ._:/-, e.g. 'audit.appended'",
            )
        )
    state = document.get("workflow_state", "")
    if not isinstance(state, str) or not state or len(state) > MAX_STATE_CHARS:
        found.append(Violation("workflow_state", f"required, 1-{MAX_STATE_CHARS} characters"))
    elif _CONTROL.search(state):
        found.append(Violation("workflow_state", "must not hold control characters"))
    return found


def _check_still_valid(redacted: dict[str, Any]) -> None:
    # Markers replace parts of strings only, so this holds unless a rule matched inside a
    # timestamp or an enum string; checked on this rare path rather than trusted.
    problems = validate_protocol(redacted, "AuditEvent")
    if not problems:
        try:
            from_protocol(redacted, common_pb2.AuditEvent)
        except ConversionError as exc:
            problems = exc.field_violations
    if problems:
        violations = [Violation(path, "redaction made this field invalid") for path, _ in problems]
        raise InvalidEvent("redaction made the event invalid", violations)


def _summary(violations: list[Violation]) -> str:
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    return f"invalid audit event: {first.field or '<event>'}: {first.description}{more}"


# --- schema checks on documents made by to_protocol ----------------------------------------
#
# to_protocol writes only known fields, with the schema's JSON types and valid date-times,
# so of the schema's keywords (type, properties, additionalProperties, format, items, enum,
# required, $ref) only ``required`` and ``enum`` can fail on its output. Checking those two
# costs about a microsecond with the schema compiled into the nodes below (a node per
# definition, and only properties that can fail are visited); the full jsonschema run costs
# ~100 and would cap ingestion. tests/audit/test_events.py checks that both agree.


def _quick_violations(document: Any, definition: str) -> list[Violation]:
    found: list[tuple[str, str]] = []
    _check(document, _definition_node(definition), "", found)
    return [Violation(path, text) for path, text in found]


@cache
def _definitions() -> Mapping[str, Any]:
    definitions: Mapping[str, Any] = protocol_schema.protocol_schema()["definitions"]
    return definitions


class _Node:
    """What can fail at one place of the schema: an enum, required names, and the
    properties and items below it that can fail in turn."""

    __slots__ = ("enum", "items", "live", "properties", "required")

    def __init__(self) -> None:
        self.enum: tuple[Any, ...] | None = None
        self.required: tuple[str, ...] = ()
        self.properties: dict[str, _Node] = {}
        self.items: _Node | None = None
        self.live = False


_NODES: dict[str, _Node] = {}


def _definition_node(name: str) -> _Node:
    node = _NODES.get(name)
    if node is None:
        # Registered before it is filled, so that recursive definitions terminate.
        node = _NODES[name] = _Node()
        _fill(node, _definitions()[name])
    return node


def _node(schema: Mapping[str, Any]) -> _Node:
    ref = schema.get("$ref")
    if ref is not None:
        # Like draft-07, a $ref replaces its siblings; the target is taken as it is.
        return _definition_node(ref.rsplit("/", 1)[-1])
    node = _Node()
    _fill(node, schema)
    return node


def _fill(node: _Node, schema: Mapping[str, Any]) -> None:
    # Live while being filled, so that a recursive reference to it is visited; settled below.
    node.live = True
    enum = schema.get("enum")
    node.enum = tuple(enum) if enum is not None else None
    node.required = tuple(schema.get("required", ()))
    for name, child in (schema.get("properties") or {}).items():
        node.properties[name] = _node(child)
    items = schema.get("items")
    node.items = _node(items) if isinstance(items, dict) else None
    # Whether anything here can fail; a node that cannot is not visited.
    node.live = bool(
        node.enum is not None
        or node.required
        or any(child.live for child in node.properties.values())
        or (node.items is not None and node.items.live)
    )


def _check(value: Any, node: _Node, path: str, found: list[tuple[str, str]]) -> None:
    enum = node.enum
    if enum is not None and value not in enum:
        found.append((path, "expected one of: " + ", ".join(map(str, enum))))
        return
    if isinstance(value, dict):
        for name in node.required:
            if name not in value:
                found.append((f"{path}.{name}" if path else name, "required field is missing"))
        properties = node.properties
        if properties:
            for name, item in value.items():
                child = properties.get(name)
                if child is not None and child.live:
                    _check(item, child, f"{path}.{name}" if path else name, found)
    elif isinstance(value, list):
        items = node.items
        if items is not None and items.live:
            for index, item in enumerate(value):
                _check(item, items, f"{path}[{index}]", found)
