"""Conversions between protobuf messages and the protocol's JSON documents.

Every message that mirrors a protocol type (see ``_PROTOCOL_TYPES``) converts generically by
walking its descriptor; the only hand-written knowledge is that name mapping and the enum
wire tables.

Rules of the JSON form (``to_protocol``):

- field names are the proto names, which equal the protocol's;
- enums become the protocol's wire strings; ``*_UNSPECIFIED`` is omitted;
- ``WorkflowState`` also has ``CANCELLED`` and ``TAKEOFF_INTERRUPTED``, which are ours and
  not in the protocol's ``State`` enum: they convert both ways, but a document holding them
  does not validate against the protocol schema;
- timestamps are RFC 3339 UTC strings with 0, 3, 6 or 9 fractional digits (protobuf's own
  JSON form, so the same instant always gives the same string);
- 64-bit integers are JSON integers, Struct and Value plain JSON;
- a field at its default (scalar at zero, empty list, unset message) is omitted, unless the
  protocol definition lists it as required and proto3 cannot tell "unset" from "default"
  (scalars and lists): then the default is written. Required message fields and enums have
  presence (unset, ``*_UNSPECIFIED``), so when unset they stay omitted and the document
  fails ``validate_protocol`` rather than carry an invented value.

``from_protocol`` is the strict inverse: unknown fields, wrong JSON types, unknown enum
strings, malformed date-times, non-integral numbers for integer fields and non-finite
numbers are all reported together in one ``ConversionError``. It checks shape, not the
schema's constraints (required fields, value ranges): callers that accept documents run
``validate_protocol`` first. ``from_protocol(to_protocol(m)) == m`` for every mirrored
message, except that a present ``google.protobuf.Value`` with no kind set reads back as null.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import cache
from typing import Any, TypeVar, cast

import jsonschema
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from cabincrew import protocol_schema
from cabincrew.errors import InvalidArgument, Violation
from cabincrew.schema_check import fast_check
from cabincrew.v1 import common_pb2

__all__ = [
    "ConversionError",
    "from_protocol",
    "protocol_definition",
    "to_protocol",
    "validate_protocol",
]

M = TypeVar("M", bound=Message)

# Message full name -> protocol definition name.
_PROTOCOL_TYPES: Mapping[str, str] = {
    message.DESCRIPTOR.full_name: definition
    for message, definition in (
        (common_pb2.AuditEvent, "AuditEvent"),
        (common_pb2.AuditWorkflow, "AuditWorkflow"),
        (common_pb2.AuditEngine, "AuditEngine"),
        (common_pb2.AuditArtifact, "AuditArtifact"),
        (common_pb2.AuditPolicy, "AuditPolicy"),
        (common_pb2.AuditApproval, "AuditApproval"),
        (common_pb2.AuditIntegrity, "AuditIntegrity"),
        (common_pb2.AuditGateway, "AuditGateway"),
        (common_pb2.PolicyEvaluation, "PolicyEvaluation"),
        (common_pb2.PreflightRequires, "PreflightRequires"),
        (common_pb2.PlanArtifactHash, "PlanArtifactHash"),
        (common_pb2.PlanToken, "PlanToken"),
        (common_pb2.EngineArtifact, "EngineArtifact"),
        (common_pb2.EngineMetric, "EngineMetric"),
        (common_pb2.EngineMeta, "EngineMeta"),
        (common_pb2.EngineOrchestrator, "EngineOrchestrator"),
        (common_pb2.EngineInput, "EngineInput"),
        (common_pb2.EngineOutput, "EngineOutput"),
        (common_pb2.Artifact, "Artifact"),
        (common_pb2.PreflightEvidence, "PreflightEvidence"),
        (common_pb2.ProtocolApprovalRequest, "ApprovalRequest"),
        (common_pb2.ProtocolApprovalResponse, "ApprovalResponse"),
        (common_pb2.ApprovalRecord, "ApprovalRecord"),
        (common_pb2.ArtifactRecord, "ArtifactRecord"),
        (common_pb2.PolicyEvaluationRecord, "PolicyEvaluationRecord"),
        (common_pb2.WorkflowStateRecord, "WorkflowStateRecord"),
        (common_pb2.WalEntry, "WALEntry"),
        (common_pb2.GatewayApproval, "GatewayApproval"),
        (common_pb2.McpGatewayRequest, "MCPGatewayRequest"),
        (common_pb2.McpGatewayResponse, "MCPGatewayResponse"),
        (common_pb2.LlmGatewayRequest, "LLMGatewayRequest"),
        (common_pb2.LlmGatewayResponse, "LLMGatewayResponse"),
    )
}

# Enum full name -> {number: protocol wire string}. Explicit rather than derived from the
# value names, because the protocol's spellings differ per enum (flight-plan, INIT, allow).
_ENUM_WIRE: Mapping[str, Mapping[int, str]] = {
    common_pb2.Decision.DESCRIPTOR.full_name: {
        common_pb2.DECISION_ALLOW: "allow",
        common_pb2.DECISION_WARN: "warn",
        common_pb2.DECISION_REQUIRE_APPROVAL: "require_approval",
        common_pb2.DECISION_DENY: "deny",
    },
    common_pb2.Mode.DESCRIPTOR.full_name: {
        common_pb2.MODE_FLIGHT_PLAN: "flight-plan",
        common_pb2.MODE_TAKE_OFF: "take-off",
    },
    common_pb2.WorkflowState.DESCRIPTOR.full_name: {
        common_pb2.WORKFLOW_STATE_INIT: "INIT",
        common_pb2.WORKFLOW_STATE_PLAN_RUNNING: "PLAN_RUNNING",
        common_pb2.WORKFLOW_STATE_PLAN_GENERATED: "PLAN_GENERATED",
        common_pb2.WORKFLOW_STATE_ARTIFACTS_VALIDATED: "ARTIFACTS_VALIDATED",
        common_pb2.WORKFLOW_STATE_TOKEN_CREATED: "TOKEN_CREATED",
        common_pb2.WORKFLOW_STATE_PRE_FLIGHT_RUNNING: "PRE_FLIGHT_RUNNING",
        common_pb2.WORKFLOW_STATE_PREFLIGHT_COMPLETE: "PREFLIGHT_COMPLETE",
        common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL: "AWAITING_APPROVAL",
        common_pb2.WORKFLOW_STATE_APPROVED: "APPROVED",
        common_pb2.WORKFLOW_STATE_READY_FOR_TAKEOFF: "READY_FOR_TAKEOFF",
        common_pb2.WORKFLOW_STATE_TAKEOFF_RUNNING: "TAKEOFF_RUNNING",
        common_pb2.WORKFLOW_STATE_EXECUTION_COMPLETE: "EXECUTION_COMPLETE",
        common_pb2.WORKFLOW_STATE_COMPLETED: "COMPLETED",
        common_pb2.WORKFLOW_STATE_FAILED: "FAILED",
        # Ours, not the protocol's State: documents holding these fail schema validation.
        common_pb2.WORKFLOW_STATE_CANCELLED: "CANCELLED",
        common_pb2.WORKFLOW_STATE_TAKEOFF_INTERRUPTED: "TAKEOFF_INTERRUPTED",
    },
    common_pb2.EventSeverity.DESCRIPTOR.full_name: {
        common_pb2.EVENT_SEVERITY_DEBUG: "debug",
        common_pb2.EVENT_SEVERITY_INFO: "info",
        common_pb2.EVENT_SEVERITY_WARNING: "warning",
        common_pb2.EVENT_SEVERITY_ERROR: "error",
        common_pb2.EVENT_SEVERITY_CRITICAL: "critical",
    },
    common_pb2.AggregationMethod.DESCRIPTOR.full_name: {
        common_pb2.AGGREGATION_METHOD_MOST_RESTRICTIVE: "most_restrictive",
        common_pb2.AGGREGATION_METHOD_UNANIMOUS: "unanimous",
        common_pb2.AGGREGATION_METHOD_MAJORITY: "majority",
        common_pb2.AGGREGATION_METHOD_ANY_DENY: "any_deny",
        common_pb2.AGGREGATION_METHOD_ALL_ALLOW: "all_allow",
        common_pb2.AGGREGATION_METHOD_CUSTOM: "custom",
    },
    common_pb2.PolicySource.DESCRIPTOR.full_name: {
        common_pb2.POLICY_SOURCE_OPA: "opa",
        common_pb2.POLICY_SOURCE_ONNX: "onnx",
        common_pb2.POLICY_SOURCE_MCP_GATEWAY: "mcp_gateway",
        common_pb2.POLICY_SOURCE_LLM_GATEWAY: "llm_gateway",
        common_pb2.POLICY_SOURCE_CUSTOM: "custom",
    },
    common_pb2.WalEntryType.DESCRIPTOR.full_name: {
        common_pb2.WAL_ENTRY_TYPE_WORKFLOW_STARTED: "workflow_started",
        common_pb2.WAL_ENTRY_TYPE_STEP_STARTED: "step_started",
        common_pb2.WAL_ENTRY_TYPE_STEP_COMPLETED: "step_completed",
        common_pb2.WAL_ENTRY_TYPE_APPROVAL_REQUESTED: "approval_requested",
        common_pb2.WAL_ENTRY_TYPE_APPROVAL_RECEIVED: "approval_received",
        common_pb2.WAL_ENTRY_TYPE_ARTIFACT_CREATED: "artifact_created",
        common_pb2.WAL_ENTRY_TYPE_POLICY_EVALUATED: "policy_evaluated",
        common_pb2.WAL_ENTRY_TYPE_WORKFLOW_COMPLETED: "workflow_completed",
        common_pb2.WAL_ENTRY_TYPE_WORKFLOW_FAILED: "workflow_failed",
    },
}
_ENUM_NUMBERS: Mapping[str, Mapping[str, int]] = {
    name: {wire: number for number, wire in table.items()} for name, table in _ENUM_WIRE.items()
}

_TIMESTAMP = timestamp_pb2.Timestamp.DESCRIPTOR.full_name
_STRUCT = struct_pb2.Struct.DESCRIPTOR.full_name
_VALUE = struct_pb2.Value.DESCRIPTOR.full_name
_LIST_VALUE = struct_pb2.ListValue.DESCRIPTOR.full_name

_INTEGER_RANGES: Mapping[int, tuple[int, int]] = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
# Struct numbers are doubles; a larger integer would be silently rounded, changing the hash
# of a document that is converted and re-serialised.
_EXACT_DOUBLE_INTEGER = 2**53
# Struct and Value nest without bound; protobuf itself refuses to parse past depth 100.
_MAX_JSON_DEPTH = 64

# The range protobuf's Timestamp can hold: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_EPOCH = datetime(1970, 1, 1)
# RFC 3339 date-time; [0-9] rather than \d, which would also match non-ASCII digits.
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)

_JSON_TYPE_NAMES: Mapping[str, str] = {
    "string": "a string",
    "number": "a number",
    "integer": "an integer",
    "boolean": "a boolean",
    "object": "an object",
    "array": "an array",
    "null": "null",
}


class ConversionError(InvalidArgument, ValueError):
    """A document or message that does not convert; carries every violation by field path."""

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        shown = "; ".join(f"{field or '<document>'}: {text}" for field, text in violations[:3])
        more = f" (and {len(violations) - 3} more)" if len(violations) > 3 else ""
        super().__init__(
            f"invalid protocol document: {shown}{more}",
            [Violation(field, text) for field, text in violations],
        )

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """The violations as (field path, description) pairs."""
        return [(v.field, v.description) for v in self.violations]

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return "Correct the listed fields; each type is defined in the protocol's schema.json."


def protocol_definition(message_type: type[Message]) -> str:
    """Return the name of the protocol definition a message type mirrors."""
    return _definition(_descriptor(message_type))


def to_protocol(message: Message) -> dict[str, Any]:
    """Return the protocol JSON document of a message that mirrors a protocol type."""
    violations: list[tuple[str, str]] = []
    document = _message_to_json(message, "", violations)
    if violations:
        raise ConversionError(violations)
    return document


def from_protocol(document: Mapping[str, Any], message_type: type[M]) -> M:
    """Build a message from its protocol JSON document, rejecting anything that does not fit."""
    message = message_type()
    violations: list[tuple[str, str]] = []
    _json_to_message(document, message, "", violations)
    if violations:
        raise ConversionError(violations)
    return message


def validate_protocol(document: Any, definition_name: str) -> list[tuple[str, str]]:
    """Return the (field path, description) violations of a document against a definition."""
    if _check(definition_name)(document):
        return []
    found: dict[tuple[str, str], None] = {}
    for error in _validator(definition_name).iter_errors(document):
        for violation in _describe(error):
            found.setdefault(violation)
    return list(found)


# --- message -> JSON ---------------------------------------------------------------------


def _message_to_json(
    message: Message, path: str, violations: list[tuple[str, str]]
) -> dict[str, Any]:
    descriptor = _descriptor(message)
    required = _required_fields(_definition(descriptor))
    document: dict[str, Any] = {}
    for field in descriptor.fields:
        name = field.name
        where = _join(path, name)
        if field.is_repeated:
            items = getattr(message, name)
            if items or name in required:
                document[name] = [
                    _single_to_json(field, item, f"{where}[{index}]", violations)
                    for index, item in enumerate(items)
                ]
        elif field.has_presence:
            if message.HasField(name):
                document[name] = _single_to_json(field, getattr(message, name), where, violations)
        elif field.enum_type is not None:
            if getattr(message, name) != 0:
                document[name] = _single_to_json(field, getattr(message, name), where, violations)
        else:
            value = getattr(message, name)
            if value != field.default_value or name in required:
                document[name] = _single_to_json(field, value, where, violations)
    return document


def _single_to_json(
    field: FieldDescriptor, value: Any, path: str, violations: list[tuple[str, str]]
) -> Any:
    if field.message_type is not None:
        kind = field.message_type.full_name
        if kind == _TIMESTAMP:
            try:
                return value.ToJsonString()
            except ValueError:
                violations.append((path, "timestamp out of range"))
                return None
        if kind == _STRUCT:
            return _struct_to_json(value, path, violations)
        if kind == _VALUE:
            return _value_to_json(value, path, violations)
        if kind == _LIST_VALUE:
            return [
                _value_to_json(item, f"{path}[{i}]", violations)
                for i, item in enumerate(value.values)
            ]
        return _message_to_json(value, path, violations)
    if field.enum_type is not None:
        wire = _enum_table(field)[0].get(value)
        if wire is None:
            violations.append((path, f"enum value {value} has no protocol name"))
        return wire
    if field.cpp_type in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        if not math.isfinite(value):
            violations.append((path, "JSON cannot hold a non-finite number"))
        return value
    if (
        field.cpp_type == FieldDescriptor.CPPTYPE_STRING
        and field.type == FieldDescriptor.TYPE_BYTES
    ):
        raise TypeError(f"{field.full_name}: bytes fields have no protocol form")
    return value


def _struct_to_json(
    struct: struct_pb2.Struct, path: str, violations: list[tuple[str, str]]
) -> dict[str, Any]:
    # Sorted so that the same Struct always gives the same document, whatever the map order.
    return {
        key: _value_to_json(struct.fields[key], _join(path, key), violations)
        for key in sorted(struct.fields)
    }


def _value_to_json(value: struct_pb2.Value, path: str, violations: list[tuple[str, str]]) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            violations.append((path, "JSON cannot hold a non-finite number"))
            return None
        # Integers written by engines (counts, sizes) read back as integers, not 3.0.
        if number.is_integer() and abs(number) <= _EXACT_DOUBLE_INTEGER:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _struct_to_json(value.struct_value, path, violations)
    if kind == "list_value":
        return [
            _value_to_json(item, f"{path}[{index}]", violations)
            for index, item in enumerate(value.list_value.values)
        ]
    return None  # null_value, or no kind set


# --- JSON -> message ---------------------------------------------------------------------


def _json_to_message(
    document: Any, message: Message, path: str, violations: list[tuple[str, str]]
) -> None:
    descriptor = _descriptor(message)
    _definition(descriptor)  # refuses types that mirror no protocol definition
    if not isinstance(document, Mapping):
        violations.append((path, "expected an object"))
        return
    fields = descriptor.fields_by_name
    for key, value in document.items():
        field = fields.get(key) if isinstance(key, str) else None
        where = _join(path, str(key))
        if field is None:
            violations.append((where, "unknown field"))
        elif field.is_repeated:
            _json_to_repeated(field, value, message, where, violations)
        elif field.message_type is not None:
            target = getattr(message, field.name)
            target.SetInParent()
            _json_to_submessage(value, target, where, violations)
        else:
            parsed = _json_to_scalar(field, value, where, violations)
            if parsed is not None:
                setattr(message, field.name, parsed)


def _json_to_repeated(
    field: FieldDescriptor,
    value: Any,
    message: Message,
    path: str,
    violations: list[tuple[str, str]],
) -> None:
    if not isinstance(value, list):
        violations.append((path, "expected an array"))
        return
    container = getattr(message, field.name)
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        if field.message_type is not None:
            _json_to_submessage(item, container.add(), where, violations)
        else:
            parsed = _json_to_scalar(field, item, where, violations)
            if parsed is not None:
                container.append(parsed)


def _json_to_submessage(
    value: Any, target: Message, path: str, violations: list[tuple[str, str]]
) -> None:
    kind = target.DESCRIPTOR.full_name
    if kind == _TIMESTAMP:
        if not isinstance(value, str):
            violations.append((path, "expected an RFC 3339 date-time string"))
            return
        try:
            seconds, nanos = _parse_timestamp(value)
        except ValueError as error:
            violations.append((path, str(error)))
            return
        assert isinstance(target, timestamp_pb2.Timestamp)
        target.seconds, target.nanos = seconds, nanos
    elif kind == _STRUCT:
        assert isinstance(target, struct_pb2.Struct)
        _json_to_struct(value, target, path, violations, 0)
    elif kind == _VALUE:
        assert isinstance(target, struct_pb2.Value)
        _json_to_value(value, target, path, violations, 0)
    elif kind == _LIST_VALUE:
        assert isinstance(target, struct_pb2.ListValue)
        _json_to_list(value, target, path, violations, 0)
    else:
        _json_to_message(value, target, path, violations)


def _json_to_scalar(
    field: FieldDescriptor, value: Any, path: str, violations: list[tuple[str, str]]
) -> Any:
    """Return the proto value of a JSON scalar, or None after recording why it does not fit."""
    if field.enum_type is not None:
        numbers = _enum_table(field)[1]
        if isinstance(value, str) and value in numbers:
            return numbers[value]
        violations.append((path, "expected one of: " + ", ".join(numbers)))
        return None
    cpp_type = field.cpp_type
    if cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        if isinstance(value, bool):
            return value
        violations.append((path, "expected a boolean"))
        return None
    if cpp_type == FieldDescriptor.CPPTYPE_STRING:
        if field.type == FieldDescriptor.TYPE_BYTES:
            raise TypeError(f"{field.full_name}: bytes fields have no protocol form")
        return _checked_string(value, path, violations)
    if cpp_type in _INTEGER_RANGES:
        return _checked_integer(value, _INTEGER_RANGES[cpp_type], path, violations)
    # double or float
    if isinstance(value, bool) or not isinstance(value, int | float):
        violations.append((path, "expected a number"))
        return None
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        violations.append((path, "expected a finite number"))
        return None
    return number


def _checked_string(value: Any, path: str, violations: list[tuple[str, str]]) -> str | None:
    if not isinstance(value, str):
        violations.append((path, "expected a string"))
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # json.loads turns a lone "\ud800" escape into a surrogate that protobuf refuses.
        violations.append((path, "string is not valid Unicode (unpaired surrogate)"))
        return None
    return value


def _checked_integer(
    value: Any, bounds: tuple[int, int], path: str, violations: list[tuple[str, str]]
) -> int | None:
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)  # JSON has one number type: 3.0 is the integer 3
    else:
        number = None
    if number is None:
        violations.append((path, "expected an integer"))
        return None
    low, high = bounds
    if not low <= number <= high:
        violations.append((path, f"integer out of range [{low}, {high}]"))
        return None
    return number


def _json_to_struct(
    value: Any,
    target: struct_pb2.Struct,
    path: str,
    violations: list[tuple[str, str]],
    depth: int,
) -> None:
    if not isinstance(value, Mapping):
        violations.append((path, "expected an object"))
        return
    for key, item in value.items():
        where = _join(path, str(key))
        if _checked_string(key, where, violations) is None:
            continue
        _json_to_value(item, target.fields[key], where, violations, depth + 1)


def _json_to_list(
    value: Any,
    target: struct_pb2.ListValue,
    path: str,
    violations: list[tuple[str, str]],
    depth: int,
) -> None:
    if not isinstance(value, list):
        violations.append((path, "expected an array"))
        return
    for index, item in enumerate(value):
        _json_to_value(item, target.values.add(), f"{path}[{index}]", violations, depth + 1)


def _json_to_value(
    value: Any,
    target: struct_pb2.Value,
    path: str,
    violations: list[tuple[str, str]],
    depth: int,
) -> None:
    if depth > _MAX_JSON_DEPTH:
        violations.append((path, f"nested deeper than {_MAX_JSON_DEPTH} levels"))
    elif value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        if abs(value) > _EXACT_DOUBLE_INTEGER:
            violations.append((path, "integer too large to hold exactly (beyond 2**53)"))
        else:
            target.number_value = float(value)
    elif isinstance(value, float):
        if math.isfinite(value):
            target.number_value = value
        else:
            violations.append((path, "expected a finite number"))
    elif isinstance(value, str):
        text = _checked_string(value, path, violations)
        if text is not None:
            target.string_value = text
    elif isinstance(value, Mapping):
        target.struct_value.SetInParent()
        _json_to_struct(value, target.struct_value, path, violations, depth)
    elif isinstance(value, list):
        target.list_value.SetInParent()
        _json_to_list(value, target.list_value, path, violations, depth)
    else:
        violations.append((path, "expected a JSON value"))


def _parse_timestamp(text: str) -> tuple[int, int]:
    """Return UTC (seconds, nanos) since the epoch of an RFC 3339 date-time, or raise ValueError."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError("expected an RFC 3339 date-time")
    year, month, day, hour, minute, second, fraction, sign, off_hour, off_minute = match.groups()
    if fraction is not None and len(fraction) > 9:
        raise ValueError("date-time more precise than nanoseconds")
    try:
        local = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    except ValueError:
        # Also refuses leap seconds (:60), which Timestamp cannot hold.
        raise ValueError("not a valid calendar date-time") from None
    offset = 0
    if sign is not None:
        if int(off_hour) > 23 or int(off_minute) > 59:
            raise ValueError("UTC offset out of range")
        offset = (int(off_hour) * 60 + int(off_minute)) * 60 * (1 if sign == "+" else -1)
    delta = local - _EPOCH
    seconds = delta.days * 86_400 + delta.seconds - offset
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise ValueError("date-time outside 0001-01-01 to 9999-12-31 UTC")
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    return seconds, nanos


# --- descriptors and schema --------------------------------------------------------------


def _descriptor(message: Message | type[Message]) -> Descriptor:
    # The runtime class is upb's, which the stubs type apart but which has the same interface.
    return cast(Descriptor, message.DESCRIPTOR)


def _definition(descriptor: Descriptor) -> str:
    try:
        return _PROTOCOL_TYPES[descriptor.full_name]
    except KeyError:
        raise TypeError(f"{descriptor.full_name} does not mirror a protocol type") from None


@cache
def _required_fields(definition_name: str) -> frozenset[str]:
    definition = protocol_schema.protocol_schema()["definitions"][definition_name]
    return frozenset(definition.get("required", ()))


def _enum_table(field: FieldDescriptor) -> tuple[Mapping[int, str], Mapping[str, int]]:
    assert field.enum_type is not None
    name = field.enum_type.full_name
    if name not in _ENUM_WIRE:
        raise TypeError(f"{field.full_name}: enum {name} has no protocol wire table")
    return _ENUM_WIRE[name], _ENUM_NUMBERS[name]


def _check_date_time(instance: object) -> bool:
    if isinstance(instance, str):
        _parse_timestamp(instance)
    return True


# Only the format the protocol uses; jsonschema's own date-time check silently does nothing
# without an extra package.
_FORMAT_CHECKER = jsonschema.FormatChecker(formats=())
_FORMAT_CHECKER.checks("date-time", raises=ValueError)(_check_date_time)


@cache
def _validator(definition_name: str) -> Any:
    # The shared loader's validators leave "format" unchecked; the protocol's date-times
    # matter (they order audit events), so assert them with the parser from_protocol uses.
    return protocol_schema.validator(definition_name).evolve(format_checker=_FORMAT_CHECKER)


@cache
def _check(definition_name: str) -> Callable[[Any], bool]:
    # The validator's verdict, compiled (a valid document, the usual case, costs a tenth); a
    # refused one still goes through the validator for its violations.
    return fast_check(_validator(definition_name))


def _describe(error: Any) -> list[tuple[str, str]]:
    """Turn one jsonschema error into field violations in our own words (no schema dumps)."""
    path = _format_path(error.absolute_path)
    keyword = error.validator
    if keyword == "required":
        present = error.instance if isinstance(error.instance, Mapping) else {}
        return [
            (_join(path, name), "required field is missing")
            for name in error.validator_value
            if name not in present
        ]
    if keyword == "additionalProperties":
        known = error.schema.get("properties", {})
        return [
            (_join(path, str(key)), "unknown field") for key in error.instance if key not in known
        ]
    if keyword == "type":
        expected = error.validator_value
        names = [expected] if isinstance(expected, str) else list(expected)
        return [(path, "expected " + " or ".join(_JSON_TYPE_NAMES.get(n, n) for n in names))]
    if keyword == "enum":
        return [(path, "expected one of: " + ", ".join(map(str, error.validator_value)))]
    if keyword == "format":
        return [(path, f"expected an RFC 3339 {error.validator_value}")]
    if keyword == "minimum":
        return [(path, f"must be at least {error.validator_value}")]
    if keyword in ("anyOf", "oneOf"):
        return [(path, "matches none of the allowed forms")]
    return [(path, f"violates the schema's {keyword!r} rule")]


def _format_path(parts: Iterable[str | int]) -> str:
    path = ""
    for part in parts:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, part)
    return path


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
