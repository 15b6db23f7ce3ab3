"""Conversions between OrchestratorService messages and the orchestrator's domain values."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from cabincrew.errors import InvalidArgument, Violation
from cabincrew.v1 import common_pb2, orchestrator_pb2
from orchestrator_svc.manager import Submission, Timeline
from orchestrator_svc.model import Definition, State, StepRecord, WorkflowRecord
from orchestrator_svc.store import WorkflowRow

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DECISIONS = {
    "allow": common_pb2.DECISION_ALLOW,
    "warn": common_pb2.DECISION_WARN,
    "require_approval": common_pb2.DECISION_REQUIRE_APPROVAL,
    "deny": common_pb2.DECISION_DENY,
}
_KINDS = {
    "engine": orchestrator_pb2.STEP_KIND_ENGINE,
    "approval": orchestrator_pb2.STEP_KIND_APPROVAL,
    "tool": orchestrator_pb2.STEP_KIND_TOOL,
    "llm": orchestrator_pb2.STEP_KIND_LLM,
}
POLICIES = {
    orchestrator_pb2.FAILURE_POLICY_QUARANTINE: "quarantine",
    orchestrator_pb2.FAILURE_POLICY_STRICT: "strict",
    orchestrator_pb2.FAILURE_POLICY_CONTINUE: "continue",
}
_POLICY_VALUES = {name: value for value, name in POLICIES.items()}


def state_value(state: State | str) -> common_pb2.WorkflowState.ValueType:
    """A ``WorkflowState`` enum value."""
    name = state.value if isinstance(state, State) else state
    return common_pb2.WorkflowState.Value(f"WORKFLOW_STATE_{name}")


def state_name(value: common_pb2.WorkflowState.ValueType) -> str:
    """The domain name of a ``WorkflowState`` enum value ('' for unspecified)."""
    if value == common_pb2.WORKFLOW_STATE_UNSPECIFIED:
        return ""
    name = common_pb2.WorkflowState.Name(value)
    return name.removeprefix("WORKFLOW_STATE_")


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    """A Timestamp from epoch microseconds."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(_EPOCH + timedelta(microseconds=us))
    return stamp


def duration(us: int) -> duration_pb2.Duration:
    """A Duration from microseconds."""
    value = duration_pb2.Duration()
    value.FromMicroseconds(us)
    return value


def submission(
    request: orchestrator_pb2.SubmitWorkflowRequest | orchestrator_pb2.BatchItem,
    request_id: str = "",
) -> Submission:
    """A domain submission from a request (or a batch item)."""
    definition = request.definition
    which = definition.WhichOneof("source")
    if which is None:
        raise InvalidArgument(
            "a workflow definition is required",
            [Violation("definition", "set text or document")],
        )
    document = json_format.MessageToDict(definition.document) if which == "document" else None
    labels = (
        dict(request.labels) if isinstance(request, orchestrator_pb2.SubmitWorkflowRequest) else {}
    )
    environment = (
        request.environment if isinstance(request, orchestrator_pb2.SubmitWorkflowRequest) else ""
    )
    return Submission(
        request_id=request_id,
        definition=Definition(
            definition.text if which == "text" else None,
            document,
            definition.filename or "workflow.yaml",
            definition.base_dir or None,
        ),
        inputs=dict(request.inputs),
        workspace_source=request.workspace_source,
        labels=labels,
        environment=environment,
    )


def _output_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def step_status(
    step: StepRecord, envelope: Mapping[str, Any] | None = None
) -> orchestrator_pb2.StepStatus:
    """A StepStatus."""
    status = orchestrator_pb2.StepStatus(
        step_id=step.step_id,
        kind=_KINDS.get(step.kind, orchestrator_pb2.STEP_KIND_UNSPECIFIED),
        state=state_value(step.state),
        decision=_DECISIONS.get(step.decision or "", common_pb2.DECISION_UNSPECIFIED),
        plan_token_hash=step.plan_token or "",
        approval_id=step.approval_id or "",
        error=step.error or "",
        outputs={key: _output_text(value) for key, value in step.outputs.items()},
        attempts=step.attempt,
        warnings=list(step.warnings),
        skipped=step.skipped,
        failure_kind=step.failure_kind or "",
        approval_role=step.required_role or "",
        plan_token_envelope=json.dumps(dict(envelope), sort_keys=True) if envelope else "",
    )
    if step.started_us is not None:
        status.started_at.CopyFrom(timestamp(step.started_us))
    if step.finished_us is not None:
        status.finished_at.CopyFrom(timestamp(step.finished_us))
    return status


def workflow(
    row: WorkflowRow, envelopes: Mapping[str, Mapping[str, Any]] | None = None
) -> orchestrator_pb2.Workflow:
    """A Workflow message from a stored workflow (with signed plan-tokens when given)."""
    envelopes = envelopes or {}
    record = row.record or WorkflowRecord.from_dicts(row.summary, row.steps)
    message = orchestrator_pb2.Workflow(
        workflow_id=record.workflow_id,
        name=record.name,
        state=state_value(record.state),
        steps=[step_status(step, envelopes.get(step.step_id)) for step in record.steps.values()],
        error=record.error,
        batch_id=record.batch_id,
        inputs={key: _output_text(value) for key, value in record.inputs.items()},
        workspace=record.workspace or "",
        requester=record.requester,
        labels=dict(record.labels),
        environment=record.environment,
    )
    message.created_at.CopyFrom(timestamp(record.created_us))
    message.updated_at.CopyFrom(timestamp(record.updated_us))
    message.record.CopyFrom(state_record(record))
    return message


def state_record(record: WorkflowRecord) -> common_pb2.WorkflowStateRecord:
    """The protocol's WorkflowStateRecord of a workflow."""
    tokens = [step.plan_token for step in record.steps.values() if step.plan_token]
    message = common_pb2.WorkflowStateRecord(
        workflow_id=record.workflow_id,
        current_state=state_value(record.state),
        plan_token_hash=tokens[-1] if tokens else "",
        steps_completed=[s.step_id for s in record.steps.values() if s.state is State.COMPLETED],
        steps_pending=[s.step_id for s in record.steps.values() if not s.state.terminal],
    )
    message.created_at.CopyFrom(timestamp(record.created_us))
    message.updated_at.CopyFrom(timestamp(record.updated_us))
    for step in record.steps.values():
        if step.approval:
            approval = step.approval
            item = message.approvals.add(
                approval_id=str(approval.get("approval_id", "")),
                step_id=step.step_id,
                plan_token_hash=str(approval.get("subject_hash", "")),
                approved=bool(approval.get("approved")),
                approver=", ".join(approval.get("approvers", ())),
                reason=str(approval.get("reason", "")),
            )
            decided = approval.get("decided_at")
            if isinstance(decided, str) and decided:
                item.approved_at.FromJsonString(decided)
        for stored in (*step.records, *step.takeoff_records):
            digest = stored.get("body_sha256") or stored.get("artifact_json_sha256") or ""
            artifact = message.artifacts.add(
                artifact_id=f"{step.step_id}/{stored.get('name')}",
                step_id=step.step_id,
                artifact_hash=str(digest),
                artifact_type=str(stored.get("role", "")),
            )
            artifact.created_at.CopyFrom(timestamp(step.updated_us))
        if step.governance:
            governance = step.governance
            evaluation = message.policy_evaluations.add(
                evaluation_id=str(governance.get("evaluation_id") or f"{step.step_id}/preflight"),
                step_id=step.step_id,
                policy_name="preflight",
                decision=_DECISIONS.get(str(governance.get("decision")), 0),
                reason="; ".join(
                    str(v)
                    for v in (*governance.get("violations", ()), *governance.get("warnings", ()))
                ),
            )
            evaluation.evaluated_at.CopyFrom(timestamp(step.updated_us))
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "name": record.name,
            "digest": record.digest,
            "workspace": record.workspace or "",
            "batch_id": record.batch_id,
        }
    )
    message.metadata.CopyFrom(metadata)
    return message


def timeline(result: Timeline) -> orchestrator_pb2.GetTimelineResponse:
    """A GetTimelineResponse."""
    response = orchestrator_pb2.GetTimelineResponse(workflow_id=result.workflow_id)
    for item in result.items:
        entry = item.entry
        data = struct_pb2.Struct()
        data.update(_timeline_data(entry.data))
        message = response.entries.add(
            sequence=entry.sequence,
            entry_type=entry.entry_type,
            step_id=entry.step_id,
            state=state_value(entry.state)
            if entry.state is not None
            else common_pb2.WORKFLOW_STATE_UNSPECIFIED,
        )
        message.timestamp.CopyFrom(timestamp(entry.timestamp_us))
        message.since_previous.CopyFrom(duration(item.since_previous_us))
        message.data.CopyFrom(data)
    stats = response.stats
    stats.total_duration.CopyFrom(duration(result.total_us))
    for step_id, took, final in result.steps:
        stats.steps.add(step_id=step_id, duration=duration(took), final_state=state_value(final))
    for name, count in result.counts.items():
        stats.counts_by_type[name] = count
    return response


def _timeline_data(data: Mapping[str, Any]) -> dict[str, Any]:
    # Definitions and full receipts are large; the timeline shows what happened, briefly.
    skip = {"definition", "receipt", "takeoff_receipt", "token", "records", "takeoff_records"}
    kept: dict[str, Any] = json.loads(
        json.dumps({k: v for k, v in data.items() if k not in skip}, default=str)
    )
    return kept


def batch(document: Mapping[str, Any], done: bool, created_us: int) -> orchestrator_pb2.Batch:
    """A Batch message."""
    message = orchestrator_pb2.Batch(
        batch_id=str(document["batch_id"]),
        max_concurrent=int(document["max_concurrent"]),
        failure_policy=_POLICY_VALUES[str(document["policy"])],
        done=done,
        stopped=bool(document.get("stopped")),
        stop_reason=str(document.get("stop_reason", "")),
    )
    for item in document["items"]:
        message.items.add(
            index=int(item["index"]),
            workflow_id=str(item["workflow_id"]),
            state=state_value(str(item.get("state", "INIT"))),
            quarantined=bool(item.get("quarantined")),
            reason=str(item.get("reason", "")),
        )
    message.created_at.CopyFrom(timestamp(created_us))
    return message


__all__ = [
    "POLICIES",
    "batch",
    "state_name",
    "state_record",
    "state_value",
    "step_status",
    "submission",
    "timeline",
    "timestamp",
    "workflow",
]
