"""Protocol JSON <-> protobuf conversion, checked against the upstream protocol schema."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from cabincrew.convert import (
    ConversionError,
    from_protocol,
    protocol_definition,
    to_protocol,
    validate_protocol,
)
from cabincrew.errors import InvalidArgument
from cabincrew.v1 import common_pb2 as pb

UPSTREAM = Path(__file__).resolve().parents[2].parent / "shared" / "protocol" / "schema.json"
VENDORED = Path(__file__).resolve().parents[2] / "cabincrew" / "schemas" / "protocol.schema.json"
MISSING = f"upstream protocol schema not found at {UPSTREAM}"

MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z


# --- helpers -----------------------------------------------------------------------------


def _ts(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return stamp


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _value(value: Any) -> struct_pb2.Value:
    holder = _struct({"v": value})
    out = struct_pb2.Value()
    out.CopyFrom(holder.fields["v"])
    return out


def _upstream_schema() -> dict[str, Any]:
    if not UPSTREAM.is_file():
        pytest.skip(MISSING)
    schema: dict[str, Any] = json.loads(UPSTREAM.read_text("utf-8"))
    return schema


def _upstream_errors(document: Any, definition: str) -> list[str]:
    """Validate with a validator built here, independent of the one under test."""
    checker = jsonschema.FormatChecker(formats=())

    def _is_date_time(instance: object) -> bool:
        if not isinstance(instance, str):
            return True
        return "T" in instance and datetime.fromisoformat(instance).tzinfo is not None

    checker.checks("date-time", raises=ValueError)(_is_date_time)

    root = {**_upstream_schema(), "$ref": f"#/definitions/{definition}"}
    validator = jsonschema.Draft7Validator(root, format_checker=checker)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


# --- fully populated examples ------------------------------------------------------------

EVIDENCE = {"rule": "no_prod_writes", "score": 0.97, "hits": [1, 2], "nested": {"ok": True}}


def _policy_evaluation() -> pb.PolicyEvaluation:
    return pb.PolicyEvaluation(
        source=pb.POLICY_SOURCE_OPA,
        policy_id="deny-prod",
        decision=pb.DECISION_DENY,
        severity=3,
        reason="touches production",
        evidence=_struct(EVIDENCE),
        evaluated_at=_ts("2024-05-06T07:08:09.123456789Z"),
    )


def _plan_token() -> pb.PlanToken:
    return pb.PlanToken(
        token="sha256:plan",
        version="1",
        artifacts=[
            pb.PlanArtifactHash(name="plan.json", hash="sha256:aa", size=2**40),
            pb.PlanArtifactHash(name="diff.patch", hash="sha256:bb", size=17),
        ],
        model="claude-3",
        engine_id="terraform",
        protocol_version="1",
        workspace_hash="sha256:ws",
        created_at=_ts("1969-07-20T20:17:40Z"),
        policy_digest="sha256:policies",
        governance_hash="sha256:gov",
    )


def _audit_policy() -> pb.AuditPolicy:
    return pb.AuditPolicy(
        decision=pb.DECISION_REQUIRE_APPROVAL,
        policy_evaluations=[_policy_evaluation(), _policy_evaluation()],
        aggregation_method=pb.AGGREGATION_METHOD_MOST_RESTRICTIVE,
        workflow_state="PRE_FLIGHT_RUNNING",
        violations=["writes to prod"],
        warnings=["large diff", "no tests"],
        engine="terraform",
    )


def _audit_approval() -> pb.AuditApproval:
    return pb.AuditApproval(
        approval_id="ap-1",
        required_role="sre",
        approved=True,
        approver="alice",
        plan_token_hash="sha256:plan",
        timestamp=_ts("2024-05-06T07:09:00.500Z"),
        reason="reviewed",
    )


def _audit_event() -> pb.AuditEvent:
    return pb.AuditEvent(
        event_id="ev-1",
        timestamp=_ts("2024-05-06T07:08:09.123456Z"),
        event_type="orchestrator.engine_started",
        workflow=pb.AuditWorkflow(workflow_id="wf-1", step_id="st-1", mode="take-off"),
        workflow_state="TAKEOFF_RUNNING",
        engine=pb.AuditEngine(engine_id="terraform", receipt_id="r-1", status="failure", error="x"),
        plan_token=_plan_token(),
        artifacts=[
            pb.AuditArtifact(name="a", role="evidence", path="out/a", hash="sha256:a", size=1),
            pb.AuditArtifact(name="b", role="log", path="out/b", hash="sha256:b", size=2**50),
        ],
        policy=_audit_policy(),
        approval=_audit_approval(),
        integrity_check=pb.AuditIntegrity(
            expected_plan_token="sha256:plan",
            actual_plan_token="sha256:plan",
            plan_token_match=True,
            artifacts_match=True,
            differences=["none really"],
        ),
        gateway=pb.AuditGateway(
            gateway_type="mcp",
            request_id="rq-1",
            model="claude-3",
            tool="fs.write",
            policy_decision=pb.DECISION_WARN,
        ),
        signature="sig",
        signature_key_ref="orchestrator-key-prod",
        chain_hash="sha256:prev",
        message="engine started",
        severity=pb.EVENT_SEVERITY_CRITICAL,
    )


def _engine_input() -> pb.EngineInput:
    return pb.EngineInput(
        protocol_version="1",
        mode=pb.MODE_FLIGHT_PLAN,
        meta=pb.EngineMeta(workflow_id="wf-1", step_id="st-1"),
        config=_struct({"region": "eu-west-1", "replicas": 3}),
        secrets=_struct({"AWS_KEY": None}),
        allowed_secrets=["AWS_KEY", "GITHUB_TOKEN"],
        context=_struct({"branch": "main"}),
        identity_token="jwt",
        orchestrator=pb.EngineOrchestrator(
            run_index=2**45, workspace_hash="sha256:ws", artifacts_salt="salt"
        ),
        expected_plan_token="sha256:plan",
    )


def _engine_output() -> pb.EngineOutput:
    return pb.EngineOutput(
        protocol_version="1",
        engine_id="terraform",
        mode=pb.MODE_TAKE_OFF,
        receipt_id="r-1",
        status="success",
        error="none",
        warnings=["slow"],
        diagnostics=_value({"duration_ms": 1234, "phases": ["init", "apply"]}),
        artifacts=[
            pb.EngineArtifact(name="a", role="state", path="out/a", hash="sha256:a", size=9)
        ],
        metrics=[pb.EngineMetric(name="latency", value=12.5, tags=_struct({"unit": "ms"}))],
        plan_token="sha256:plan",
    )


def _approval_record() -> pb.ApprovalRecord:
    return pb.ApprovalRecord(
        approval_id="ap-1",
        step_id="st-1",
        plan_token_hash="sha256:plan",
        approved=True,
        approver="alice",
        approved_at=_ts("2024-05-06T07:09:00Z"),
        reason="ok",
        evidence_hashes=["sha256:e1", "sha256:e2"],
    )


def _artifact_record() -> pb.ArtifactRecord:
    return pb.ArtifactRecord(
        artifact_id="art-1",
        step_id="st-1",
        artifact_hash="sha256:a",
        artifact_type="diff",
        created_at=_ts("2024-05-06T07:08:10Z"),
        metadata=_struct({"lines": 42}),
    )


def _policy_evaluation_record() -> pb.PolicyEvaluationRecord:
    return pb.PolicyEvaluationRecord(
        evaluation_id="pe-1",
        step_id="st-1",
        policy_name="deny-prod",
        decision=pb.DECISION_ALLOW,
        evaluated_at=_ts("2024-05-06T07:08:11.000001Z"),
        reason="fine",
        evidence_hashes=["sha256:e"],
    )


def _gateway_approval() -> pb.GatewayApproval:
    return pb.GatewayApproval(approval_id="ap-2", required_role="security", reason="tool")


EXAMPLES: dict[type[Message], Callable[[], Message]] = {
    pb.AuditEvent: _audit_event,
    pb.AuditWorkflow: lambda: pb.AuditWorkflow(workflow_id="wf", step_id="st", mode="flight-plan"),
    pb.AuditEngine: lambda: pb.AuditEngine(engine_id="e", receipt_id="r", status="s", error="x"),
    pb.AuditArtifact: lambda: pb.AuditArtifact(name="n", role="r", path="p", hash="h", size=5),
    pb.AuditPolicy: _audit_policy,
    pb.AuditApproval: _audit_approval,
    pb.AuditIntegrity: lambda: pb.AuditIntegrity(
        expected_plan_token="a",
        actual_plan_token="b",
        plan_token_match=True,
        artifacts_match=True,
        differences=["d"],
    ),
    pb.AuditGateway: lambda: pb.AuditGateway(
        gateway_type="llm", request_id="r", model="m", tool="t", policy_decision=pb.DECISION_DENY
    ),
    pb.PolicyEvaluation: _policy_evaluation,
    pb.PreflightRequires: lambda: pb.PreflightRequires(role="sre", reason="prod"),
    pb.PlanArtifactHash: lambda: pb.PlanArtifactHash(name="n", hash="h", size=2**62),
    pb.PlanToken: _plan_token,
    pb.EngineArtifact: lambda: pb.EngineArtifact(name="n", role="r", path="p", hash="h", size=1),
    pb.EngineMetric: lambda: pb.EngineMetric(name="m", value=-0.25, tags=_struct({"k": "v"})),
    pb.EngineMeta: lambda: pb.EngineMeta(workflow_id="wf", step_id="st"),
    pb.EngineOrchestrator: lambda: pb.EngineOrchestrator(
        run_index=7, workspace_hash="w", artifacts_salt="s"
    ),
    pb.EngineInput: _engine_input,
    pb.EngineOutput: _engine_output,
    pb.Artifact: lambda: pb.Artifact(
        artifact_type="diff",
        action="apply",
        target="main.tf",
        mime="text/x-diff",
        body=_value({"hunks": [{"at": 3, "text": "+x"}]}),
        body_file="body.bin",
        metadata=_struct({"generator": "engine"}),
    ),
    pb.PreflightEvidence: lambda: pb.PreflightEvidence(name="n", path="p", hash="h"),
    pb.ProtocolApprovalRequest: lambda: pb.ProtocolApprovalRequest(
        approval_id="ap-1",
        workflow_id="wf",
        step_id="st",
        reason="prod write",
        required_role="sre",
        engine_output=_struct({"status": "success", "warnings": []}),
        evidence=[pb.PreflightEvidence(name="n", path="p", hash="h")],
        plan_token_hash="sha256:plan",
    ),
    pb.ProtocolApprovalResponse: lambda: pb.ProtocolApprovalResponse(
        approval_id="ap-1",
        approved=True,
        approver="alice",
        reason="ok",
        timestamp=_ts("2024-05-06T07:09:00.250Z"),
    ),
    pb.ApprovalRecord: _approval_record,
    pb.ArtifactRecord: _artifact_record,
    pb.PolicyEvaluationRecord: _policy_evaluation_record,
    pb.WorkflowStateRecord: lambda: pb.WorkflowStateRecord(
        workflow_id="wf",
        current_state=pb.WORKFLOW_STATE_READY_FOR_TAKEOFF,
        plan_token_hash="sha256:plan",
        created_at=_ts("2024-05-06T07:00:00Z"),
        updated_at=_ts("2024-05-06T07:10:00.1Z"),
        steps_completed=["st-0"],
        steps_pending=["st-1", "st-2"],
        approvals=[_approval_record()],
        artifacts=[_artifact_record()],
        policy_evaluations=[_policy_evaluation_record()],
        metadata=_struct({"owner": "team-a"}),
    ),
    pb.WalEntry: lambda: pb.WalEntry(
        sequence=2**33,
        timestamp=_ts("2024-05-06T07:00:00Z"),
        workflow_id="wf",
        entry_type=pb.WAL_ENTRY_TYPE_STEP_STARTED,
        data=_struct({"step_id": "st-1", "step_type": "terraform"}),
        checksum="sha256:c",
    ),
    pb.GatewayApproval: _gateway_approval,
    pb.McpGatewayRequest: lambda: pb.McpGatewayRequest(
        request_id="rq",
        timestamp=_ts("2024-05-06T07:00:00Z"),
        source="agent",
        server_id="fs",
        method="tools/call",
        params=_struct({"name": "write", "arguments": {"path": "/etc/x"}}),
        context=_struct({"user": "bob"}),
    ),
    pb.McpGatewayResponse: lambda: pb.McpGatewayResponse(
        request_id="rq",
        timestamp=_ts("2024-05-06T07:00:01Z"),
        decision=pb.DECISION_REQUIRE_APPROVAL,
        warnings=["w"],
        violations=["v"],
        approval=_gateway_approval(),
        rewritten_request=_struct({"method": "tools/call"}),
    ),
    pb.LlmGatewayRequest: lambda: pb.LlmGatewayRequest(
        request_id="rq",
        timestamp=_ts("2024-05-06T07:00:00Z"),
        source="agent",
        model="claude-3",
        provider="anthropic",
        input=_struct({"messages": [{"role": "user", "content": "hi"}]}),
        context=_struct({"tenant": "t"}),
    ),
    pb.LlmGatewayResponse: lambda: pb.LlmGatewayResponse(
        request_id="rq",
        timestamp=_ts("2024-05-06T07:00:01Z"),
        decision=pb.DECISION_ALLOW,
        warnings=["w"],
        violations=["v"],
        approval=_gateway_approval(),
        routed_model="claude-3-haiku",
        rewritten_input=_struct({"messages": []}),
        gateway_payload=_struct({"cost": 0.01}),
    ),
}
MESSAGE_TYPES = list(EXAMPLES)
IDS = [t.__name__ for t in MESSAGE_TYPES]


def _unpopulated(message: Message, path: str = "") -> list[str]:
    """Fields of a mirrored message (recursively) left at their default."""
    missing = []
    for field in message.DESCRIPTOR.fields:
        where = f"{path}{field.name}"
        value = getattr(message, field.name)
        if field.is_repeated:
            if not value:
                missing.append(where)
            elif field.message_type is not None and field.message_type.file is pb.DESCRIPTOR:
                for index, item in enumerate(value):
                    missing += _unpopulated(item, f"{where}[{index}].")
        elif field.message_type is not None:
            if not message.HasField(field.name):
                missing.append(where)
            elif field.message_type.file is pb.DESCRIPTOR:
                missing += _unpopulated(value, f"{where}.")
        elif value == field.default_value:
            missing.append(where)
    return missing


# --- the mapping ---------------------------------------------------------------------------


def test_every_mirrored_message_has_exactly_the_fields_of_its_protocol_definition() -> None:
    definitions = _upstream_schema()["definitions"]
    for message_type in MESSAGE_TYPES:
        properties = definitions[protocol_definition(message_type)]["properties"]
        fields = {f.name for f in message_type.DESCRIPTOR.fields}
        assert fields == set(properties), message_type.__name__


def test_the_vendored_schema_is_the_upstream_schema() -> None:
    assert json.loads(VENDORED.read_text("utf-8")) == _upstream_schema()


def test_a_message_that_mirrors_no_protocol_type_is_refused() -> None:
    with pytest.raises(TypeError):
        to_protocol(pb.GovernanceResult())
    with pytest.raises(TypeError):
        from_protocol({}, pb.GovernanceResult)
    with pytest.raises(TypeError):
        protocol_definition(pb.SignedPlanToken)


def test_an_unknown_definition_name_is_refused() -> None:
    with pytest.raises(KeyError):
        validate_protocol({}, "NoSuchType")


# (message type, enum field, where the schema lists that field's wire values)
ENUM_FIELDS = [
    (pb.PolicyEvaluationRecord, "decision", ("Decision",)),
    (pb.EngineOutput, "mode", ("Mode",)),
    (pb.WorkflowStateRecord, "current_state", ("State",)),
    (pb.AuditEvent, "severity", ("AuditEvent", "properties", "severity")),
    (pb.AuditPolicy, "aggregation_method", ("AggregationMethod",)),
    (pb.PolicyEvaluation, "source", ("PolicyEvaluation", "properties", "source")),
    (pb.WalEntry, "entry_type", ("WALEntryType",)),
]


@pytest.mark.parametrize(("message_type", "field", "where"), ENUM_FIELDS)
def test_every_enum_value_has_the_protocol_wire_string(
    message_type: type[Message], field: str, where: tuple[str, ...]
) -> None:
    node: Any = _upstream_schema()["definitions"]
    for key in where:
        node = node[key]
    enum = message_type.DESCRIPTOR.fields_by_name[field].enum_type
    assert enum is not None
    wires = set()
    for value in enum.values:
        document = to_protocol(message_type(**{field: value.number}))
        if value.number == 0:
            assert field not in document
            continue
        wire = document[field]
        assert from_protocol({field: wire}, message_type) == message_type(**{field: value.number})
        wires.add(wire)
    ours = {"CANCELLED", "TAKEOFF_INTERRUPTED"} if where == ("State",) else set()
    assert wires == set(node["enum"]) | ours


def test_our_extra_workflow_states_convert_but_do_not_validate() -> None:
    record = EXAMPLES[pb.WorkflowStateRecord]()
    assert isinstance(record, pb.WorkflowStateRecord)
    for state, wire in (
        (pb.WORKFLOW_STATE_CANCELLED, "CANCELLED"),
        (pb.WORKFLOW_STATE_TAKEOFF_INTERRUPTED, "TAKEOFF_INTERRUPTED"),
    ):
        record.current_state = state
        document = to_protocol(record)
        assert document["current_state"] == wire
        assert from_protocol(document, pb.WorkflowStateRecord) == record
        assert [field for field, _ in validate_protocol(document, "WorkflowStateRecord")] == [
            "current_state"
        ]


# --- fully populated messages --------------------------------------------------------------


@pytest.mark.parametrize("message_type", MESSAGE_TYPES, ids=IDS)
def test_every_example_is_fully_populated(message_type: type[Message]) -> None:
    assert _unpopulated(EXAMPLES[message_type]()) == []


@pytest.mark.parametrize("message_type", MESSAGE_TYPES, ids=IDS)
def test_a_full_message_validates_against_the_upstream_schema(message_type: type[Message]) -> None:
    document = to_protocol(EXAMPLES[message_type]())
    assert _upstream_errors(document, protocol_definition(message_type)) == []
    assert validate_protocol(document, protocol_definition(message_type)) == []


@pytest.mark.parametrize("message_type", MESSAGE_TYPES, ids=IDS)
def test_a_full_message_round_trips(message_type: type[Message]) -> None:
    message = EXAMPLES[message_type]()
    document = to_protocol(message)
    assert from_protocol(document, message_type) == message
    # Through text too, as documents travel.
    assert from_protocol(json.loads(json.dumps(document)), message_type) == message


@pytest.mark.parametrize("message_type", MESSAGE_TYPES, ids=IDS)
def test_a_document_round_trips_through_its_message(message_type: type[Message]) -> None:
    document = to_protocol(EXAMPLES[message_type]())
    assert to_protocol(from_protocol(document, message_type)) == document


def test_the_protocol_form_uses_plain_json_types() -> None:
    document = to_protocol(_audit_event())
    assert document["timestamp"] == "2024-05-06T07:08:09.123456Z"
    assert document["severity"] == "critical"
    assert document["plan_token"]["created_at"] == "1969-07-20T20:17:40Z"
    assert document["plan_token"]["artifacts"][0]["size"] == 2**40
    assert document["artifacts"][1]["size"] == 2**50
    evaluation = document["policy"]["policy_evaluations"][0]
    assert evaluation["severity"] == 3
    assert evaluation["decision"] == "deny"
    assert evaluation["source"] == "opa"
    assert evaluation["evaluated_at"] == "2024-05-06T07:08:09.123456789Z"
    assert evaluation["evidence"] == EVIDENCE
    assert document["policy"]["aggregation_method"] == "most_restrictive"
    assert document["gateway"]["policy_decision"] == "warn"
    # int64 stays an integer in the text (MessageToDict would quote it).
    assert '"size": 1125899906842624' in json.dumps(document)


def test_struct_integers_come_back_as_integers() -> None:
    document = to_protocol(_engine_output())
    assert document["diagnostics"] == {"duration_ms": 1234, "phases": ["init", "apply"]}
    assert isinstance(document["diagnostics"]["duration_ms"], int)


@pytest.mark.parametrize(
    ("seconds", "nanos", "text"),
    [
        (0, 0, "1970-01-01T00:00:00Z"),
        (1, 120_000_000, "1970-01-01T00:00:01.120Z"),
        (1, 123_456_000, "1970-01-01T00:00:01.123456Z"),
        (1, 1, "1970-01-01T00:00:01.000000001Z"),
        (-1, 0, "1969-12-31T23:59:59Z"),
        (MIN_SECONDS, 0, "0001-01-01T00:00:00Z"),
        (MAX_SECONDS, 999_999_999, "9999-12-31T23:59:59.999999999Z"),
    ],
)
def test_timestamps_are_rfc3339_utc_strings(seconds: int, nanos: int, text: str) -> None:
    response = pb.ProtocolApprovalResponse(
        approval_id="a", timestamp=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    )
    assert to_protocol(response)["timestamp"] == text
    assert from_protocol(to_protocol(response), pb.ProtocolApprovalResponse) == response


# --- defaults and minimal forms ------------------------------------------------------------


@pytest.mark.parametrize("message_type", MESSAGE_TYPES, ids=IDS)
def test_an_empty_message_has_only_required_defaults_and_round_trips(
    message_type: type[Message],
) -> None:
    document = to_protocol(message_type())
    required = set(
        _upstream_schema()["definitions"][protocol_definition(message_type)].get("required", [])
    )
    assert set(document) <= required
    assert from_protocol(document, message_type) == message_type()


@pytest.mark.parametrize(
    ("message", "document"),
    [
        (pb.ProtocolApprovalResponse(), {"approval_id": "", "approved": False}),
        (pb.ProtocolApprovalResponse(approval_id="a"), {"approval_id": "a", "approved": False}),
        (pb.PolicyEvaluation(), {"policy_id": "", "severity": 0}),
        (pb.EngineMetric(), {"name": "", "value": 0.0}),
        (
            pb.PlanToken(),
            {
                "token": "",
                "version": "",
                "artifacts": [],
                "model": "",
                "engine_id": "",
                "protocol_version": "",
                "workspace_hash": "",
            },
        ),
        (
            pb.WorkflowStateRecord(),
            {
                "workflow_id": "",
                "plan_token_hash": "",
                "steps_completed": [],
                "steps_pending": [],
                "approvals": [],
                "artifacts": [],
                "policy_evaluations": [],
            },
        ),
        (pb.AuditIntegrity(plan_token_match=False, differences=[]), {}),
        (
            pb.AuditEvent(workflow=pb.AuditWorkflow()),
            {
                "event_id": "",
                "event_type": "",
                "workflow": {},
                "workflow_state": "",
            },
        ),
    ],
)
def test_required_fields_are_written_with_their_defaults(
    message: Message, document: dict[str, Any]
) -> None:
    assert to_protocol(message) == document


def test_a_required_approved_false_validates() -> None:
    document = to_protocol(pb.ProtocolApprovalResponse(approval_id="ap-1", approved=False))
    assert document["approved"] is False
    assert _upstream_errors(document, "ApprovalResponse") == []


def test_unset_required_messages_and_enums_stay_absent_and_fail_validation() -> None:
    document = to_protocol(pb.EngineInput(protocol_version="1"))
    assert document == {"protocol_version": "1"}
    assert {field for field, _ in validate_protocol(document, "EngineInput")} == {"meta", "mode"}


# --- strict reading ----------------------------------------------------------------------


def _violations(document: Any, message_type: type[Message]) -> dict[str, str]:
    with pytest.raises(ConversionError) as caught:
        from_protocol(document, message_type)
    return dict(caught.value.field_violations)


def test_a_bad_document_reports_every_violation_with_its_field_path() -> None:
    document = {
        "event_id": 7,
        "timestamp": "yesterday",
        "event_type": "t",
        "workflow": {"workflow_id": "wf", "colour": "red"},
        "workflow_state": None,
        "artifacts": [{"size": 1}, {"size": 2}, {"size": "big"}],
        "policy": {
            "decision": "maybe",
            "policy_evaluations": [{}, {"severity": 1.5, "evidence": {"n": float("nan")}}],
            "violations": "all of them",
        },
        "approval": {"approved": "yes", "timestamp": 0},
        "integrity_check": [],
        "severity": "loud",
        "source": "orchestrator",
    }
    violations = _violations(document, pb.AuditEvent)
    assert set(violations) == {
        "event_id",
        "timestamp",
        "workflow.colour",
        "workflow_state",
        "artifacts[2].size",
        "policy.decision",
        "policy.policy_evaluations[1].severity",
        "policy.policy_evaluations[1].evidence.n",
        "policy.violations",
        "approval.approved",
        "approval.timestamp",
        "integrity_check",
        "severity",
        "source",
    }
    assert all(violations.values())


def test_a_conversion_error_is_a_bad_request_with_field_violations() -> None:
    with pytest.raises(ConversionError) as caught:
        from_protocol({"artifacts": [{}, {}, {"size": "big"}]}, pb.PlanToken)
    error = caught.value
    assert isinstance(error, ValueError)
    assert isinstance(error, InvalidArgument)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = error_details_pb2.BadRequest()
    assert error.details()[0].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == ["artifacts[2].size"]


def test_a_document_that_is_not_an_object_is_refused() -> None:
    assert set(_violations(["not", "an", "object"], pb.AuditEvent)) == {""}


@pytest.mark.parametrize(
    ("size", "expected"),
    [(3, 3), (3.0, 3), (-(2**63), -(2**63)), (2**63 - 1, 2**63 - 1)],
)
def test_integral_numbers_are_accepted_for_int64_fields(size: float, expected: int) -> None:
    document = {"name": "n", "hash": "h", "size": size}
    assert from_protocol(document, pb.PlanArtifactHash).size == expected


@pytest.mark.parametrize("size", [3.5, "3", True, None, 2**63, float("inf"), [3]])
def test_anything_but_an_integer_is_refused_for_int64_fields(size: Any) -> None:
    assert set(_violations({"size": size}, pb.PlanArtifactHash)) == {"size"}


def test_non_integral_severity_is_refused() -> None:
    assert set(_violations({"severity": 2.5}, pb.PolicyEvaluation)) == {"severity"}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1", True, 10**400])
def test_non_finite_or_non_numbers_are_refused_for_double_fields(value: Any) -> None:
    assert set(_violations({"name": "m", "value": value}, pb.EngineMetric)) == {"value"}


def test_a_non_finite_double_cannot_be_written() -> None:
    with pytest.raises(ConversionError) as caught:
        to_protocol(pb.EngineMetric(name="m", value=float("nan")))
    assert caught.value.field_violations[0][0] == "value"


def test_an_enum_number_without_a_protocol_name_cannot_be_written() -> None:
    with pytest.raises(ConversionError) as caught:
        to_protocol(pb.AuditPolicy(decision=pb.Decision.ValueType(99), workflow_state="INIT"))
    assert [field for field, _ in caught.value.field_violations] == ["decision"]


@pytest.mark.parametrize("wire", ["ALLOW", "DECISION_ALLOW", "", "Allow", 1])
def test_unknown_enum_strings_are_refused(wire: Any) -> None:
    assert set(_violations({"decision": wire}, pb.McpGatewayResponse)) == {"decision"}


def test_unpaired_surrogates_are_refused() -> None:
    document = json.loads('{"role": "\\ud800", "reason": {"x": 1}}')
    assert set(_violations(document, pb.PreflightRequires)) == {"role", "reason"}
    assert set(_violations({"evidence": {"\ud800": 1}}, pb.PolicyEvaluation)) == {"evidence.\ud800"}


def test_struct_integers_beyond_two_to_the_53_are_refused() -> None:
    assert from_protocol({"tags": {"n": 2**53}}, pb.EngineMetric).tags["n"] == 2**53
    assert set(_violations({"tags": {"n": [2**53 + 1]}}, pb.EngineMetric)) == {"tags.n[0]"}


def test_struct_values_must_be_json() -> None:
    violations = _violations(
        {"tags": {"a": {1, 2}, "b": (1,), "c": float("-inf")}}, pb.EngineMetric
    )
    assert set(violations) == {"tags.a", "tags.b", "tags.c"}


def test_absurdly_deep_structs_are_refused() -> None:
    nested: dict[str, Any] = {}
    for _ in range(200):
        nested = {"a": nested}
    with pytest.raises(ConversionError):
        from_protocol({"tags": nested}, pb.EngineMetric)


def test_a_value_field_takes_any_json_value_including_null() -> None:
    for body in (None, "text", [1, "two", None], {"k": {"v": [True]}}, 2.5):
        artifact = from_protocol({"body": body}, pb.Artifact)
        assert artifact.HasField("body")
        assert to_protocol(artifact)["body"] == body


# --- timestamps ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds", "nanos"),
    [
        ("2024-03-01T01:30:00+02:00", 1_709_249_400, 0),
        ("2024-02-29T23:30:00Z", 1_709_249_400, 0),
        ("2024-02-29t23:30:00z", 1_709_249_400, 0),
        ("2024-02-29T18:30:00.5-05:00", 1_709_249_400, 500_000_000),
        ("2024-02-29T23:30:00.000000001-00:00", 1_709_249_400, 1),
        ("0001-01-01T01:00:00+01:00", MIN_SECONDS, 0),
    ],
)
def test_timestamps_with_any_offset_are_normalised_to_utc(
    text: str, seconds: int, nanos: int
) -> None:
    response = from_protocol({"timestamp": text}, pb.McpGatewayResponse)
    assert (response.timestamp.seconds, response.timestamp.nanos) == (seconds, nanos)


@pytest.mark.parametrize(
    "text",
    [
        "2024-01-01 00:00:00Z",
        "2024-01-01T00:00:00",
        "2024-01-01",
        "2024-02-30T00:00:00Z",
        "2024-01-01T24:00:00Z",
        "2016-12-31T23:59:60Z",
        "2024-01-01T00:00:00.1234567891Z",
        "2024-01-01T00:00:00+24:00",
        "0001-01-01T00:00:00+00:01",
        "9999-12-31T23:59:59-00:01",
        "\uff12024-01-01T00:00:00Z",
        " 2024-01-01T00:00:00Z",
    ],
)
def test_malformed_or_out_of_range_timestamps_are_refused(text: str) -> None:
    assert set(_violations({"timestamp": text}, pb.McpGatewayResponse)) == {"timestamp"}


def test_validation_checks_the_date_time_format() -> None:
    document = {"event_id": "e", "event_type": "t", "workflow_state": "s", "timestamp": "now"}
    assert [field for field, _ in validate_protocol(document, "AuditEvent")] == ["timestamp"]


# --- validate_protocol ---------------------------------------------------------------------


def test_validation_reports_field_paths() -> None:
    document = {
        "event_id": 1,
        "timestamp": "2024-01-01T00:00:00Z",
        "artifacts": [{}, {}, {"size": "big", "colour": "red"}],
        "policy": {"decision": "maybe"},
        "extra": True,
    }
    fields = {field for field, _ in validate_protocol(document, "AuditEvent")}
    assert fields == {
        "event_id",
        "event_type",
        "workflow_state",
        "artifacts[2].size",
        "artifacts[2].colour",
        "policy.decision",
        "policy.workflow_state",
        "extra",
    }


def test_validation_of_a_non_object_reports_the_document() -> None:
    assert [field for field, _ in validate_protocol("text", "AuditEvent")] == [""]


# --- properties ----------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=12)
_timestamps = st.builds(
    timestamp_pb2.Timestamp,
    seconds=st.integers(MIN_SECONDS, MAX_SECONDS),
    nanos=st.integers(0, 999_999_999),
)
_decisions = st.sampled_from([v for v in pb.Decision.values() if v])
_any_decision = st.sampled_from(pb.Decision.values())
_severities = st.sampled_from(pb.EventSeverity.values())
_aggregations = st.sampled_from(pb.AggregationMethod.values())
_sources = st.sampled_from([v for v in pb.PolicySource.values() if v])


@st.composite
def _audit_events(draw: st.DrawFn) -> pb.AuditEvent:
    event = pb.AuditEvent(
        event_id=draw(_text),
        timestamp=draw(_timestamps),
        event_type=draw(_text),
        workflow_state=draw(_text),
        signature=draw(_text),
        chain_hash=draw(_text),
        message=draw(_text),
        severity=draw(_severities),
    )
    if draw(st.booleans()):
        event.workflow.CopyFrom(pb.AuditWorkflow(workflow_id=draw(_text), mode=draw(_text)))
    for _ in range(draw(st.integers(0, 2))):
        event.artifacts.add(name=draw(_text), size=draw(st.integers(-(2**63), 2**63 - 1)))
    if draw(st.booleans()):
        policy = event.policy
        policy.SetInParent()
        policy.decision = draw(_decisions)
        policy.workflow_state = draw(_text)
        policy.aggregation_method = draw(_aggregations)
        policy.violations.extend(draw(st.lists(_text, max_size=2)))
        for _ in range(draw(st.integers(0, 2))):
            policy.policy_evaluations.add(
                source=draw(_sources),
                policy_id=draw(_text),
                decision=draw(_decisions),
                severity=draw(st.integers(0, 3)),
                evaluated_at=draw(_timestamps),
                evidence=_struct({draw(_text): draw(_text)}),
            )
    if draw(st.booleans()):
        event.approval.CopyFrom(
            pb.AuditApproval(
                approval_id=draw(_text),
                approved=draw(st.booleans()),
                timestamp=draw(_timestamps),
            )
        )
    if draw(st.booleans()):
        event.gateway.CopyFrom(
            pb.AuditGateway(tool=draw(_text), policy_decision=draw(_any_decision))
        )
    return event


@settings(deadline=None)
@given(_audit_events())
def test_audit_events_round_trip(event: pb.AuditEvent) -> None:
    document = to_protocol(event)
    assert from_protocol(document, pb.AuditEvent) == event
    assert from_protocol(json.loads(json.dumps(document)), pb.AuditEvent) == event
    assert validate_protocol(document, "AuditEvent") == []


@settings(deadline=None)
@given(
    local=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    offset_minutes=st.integers(-(23 * 60 + 59), 23 * 60 + 59),
    lower_case=st.booleans(),
)
def test_any_offset_names_the_same_instant(
    local: datetime, offset_minutes: int, lower_case: bool
) -> None:
    sign = "+" if offset_minutes >= 0 else "-"
    hours, minutes = divmod(abs(offset_minutes), 60)
    text = f"{local.isoformat(timespec='microseconds')}{sign}{hours:02d}:{minutes:02d}"
    if lower_case:
        text = text.replace("T", "t")
    response = from_protocol({"timestamp": text}, pb.McpGatewayResponse)
    instant = local - timedelta(minutes=offset_minutes)
    expected = (instant - datetime(1970, 1, 1)) // timedelta(microseconds=1)
    got = response.timestamp.seconds * 1_000_000 + response.timestamp.nanos // 1000
    assert got == expected
    written = to_protocol(response)["timestamp"]
    assert written.endswith("Z")
    assert from_protocol({"timestamp": written}, pb.McpGatewayResponse) == response
