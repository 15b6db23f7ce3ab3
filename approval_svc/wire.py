"""Translation between the ``cabincrew.v1`` approval messages and the domain values.

Used by the service layer, and by clients that verify records offline (the CLI, the
orchestrator): ``approval_from_proto`` reads back what ``approval_to_proto`` wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import timestamp_pb2

from approval_svc.model import (
    Approval,
    ArtifactSummary,
    DecisionRecord,
    NewApproval,
    State,
    SubjectKind,
)
from cabincrew.auth import Principal
from cabincrew.convert import from_protocol, to_protocol
from cabincrew.errors import InvalidArgument, Violation
from cabincrew.v1 import approval_pb2, common_pb2

SUBJECT_KINDS: Mapping[int, SubjectKind] = {
    approval_pb2.SUBJECT_KIND_PLAN_TOKEN: SubjectKind.PLAN_TOKEN,
    approval_pb2.SUBJECT_KIND_MCP_REQUEST: SubjectKind.MCP_REQUEST,
    approval_pb2.SUBJECT_KIND_LLM_REQUEST: SubjectKind.LLM_REQUEST,
    approval_pb2.SUBJECT_KIND_LLM_RESPONSE: SubjectKind.LLM_RESPONSE,
}
_SUBJECT_KIND_VALUES: Mapping[SubjectKind, approval_pb2.SubjectKind.ValueType] = {
    kind: approval_pb2.SubjectKind.ValueType(value) for value, kind in SUBJECT_KINDS.items()
}

STATES: Mapping[int, State] = {
    approval_pb2.APPROVAL_STATE_PENDING: State.PENDING,
    approval_pb2.APPROVAL_STATE_APPROVED: State.APPROVED,
    approval_pb2.APPROVAL_STATE_REJECTED: State.REJECTED,
    approval_pb2.APPROVAL_STATE_EXPIRED: State.EXPIRED,
    approval_pb2.APPROVAL_STATE_CANCELLED: State.CANCELLED,
    approval_pb2.APPROVAL_STATE_CONSUMED: State.CONSUMED,
}
_STATE_VALUES: Mapping[State, approval_pb2.ApprovalState.ValueType] = {
    state: approval_pb2.ApprovalState.ValueType(value) for value, state in STATES.items()
}


def state_value(state: State) -> approval_pb2.ApprovalState.ValueType:
    """The ``ApprovalState`` enum value of ``state``."""
    return _STATE_VALUES[state]


def state_from_value(value: int) -> State | None:
    """The domain state of an ``ApprovalState`` value (None for UNSPECIFIED)."""
    if value == approval_pb2.APPROVAL_STATE_UNSPECIFIED:
        return None
    if value not in STATES:
        raise InvalidArgument("unknown approval state", [Violation("state", "unknown value")])
    return STATES[value]


def new_approval(request: approval_pb2.CreateApprovalRequest, caller: Principal) -> NewApproval:
    """The domain request of a ``CreateApprovalRequest`` made by ``caller``."""
    kind = SUBJECT_KINDS.get(request.subject_kind)
    if kind is None:
        raise InvalidArgument(
            "subject_kind is required",
            [Violation("subject_kind", "plan_token, mcp_request, llm_request or llm_response")],
        )
    if request.quorum < 0:
        raise InvalidArgument("quorum must not be negative", [Violation("quorum", "0 means 1")])
    ttl = None
    if request.HasField("ttl"):
        ttl = request.ttl.ToTimedelta()
        if ttl <= timedelta(0):
            raise InvalidArgument("ttl must be positive", [Violation("ttl", "must be positive")])
    return NewApproval(
        request_id=request.request_id,
        subject_kind=kind,
        subject_hash=request.subject_hash,
        reason=request.reason,
        required_role=request.required_role,
        requester=request.on_behalf_of or caller.name,
        created_by=caller.name,
        quorum=request.quorum or 1,
        workflow_id=request.workflow_id,
        step_id=request.step_id,
        gateway_request_id=request.gateway_request_id,
        triggered_policies=tuple(to_protocol(p) for p in request.triggered_policies),
        artifacts=tuple(_artifact(a) for a in request.artifacts),
        ttl=ttl,
    )


def approval_to_proto(approval: Approval) -> approval_pb2.Approval:
    """The wire form of an approval."""
    message = approval_pb2.Approval(
        approval_id=approval.approval_id,
        request_id=approval.request_id,
        workflow_id=approval.workflow_id,
        step_id=approval.step_id,
        gateway_request_id=approval.gateway_request_id,
        subject_kind=_SUBJECT_KIND_VALUES[approval.subject_kind],
        subject_hash=approval.subject_hash,
        reason=approval.reason,
        required_role=approval.required_role,
        quorum=approval.quorum,
        triggered_policies=[_policy(p) for p in approval.triggered_policies],
        artifacts=[
            approval_pb2.ArtifactSummary(
                name=a.name,
                role=a.role,
                hash=a.hash,
                size=a.size,
                preview=a.preview,
                target=a.target,
                action=a.action,
            )
            for a in approval.artifacts
        ],
        requester=approval.requester,
        state=_STATE_VALUES[approval.state],
        created_at=_timestamp(approval.created_at),
        expires_at=_timestamp(approval.expires_at),
        decisions=[record_to_proto(d) for d in approval.decisions],
        cancel_reason=approval.cancel_reason,
        created_by=approval.created_by,
        consumed_by=approval.consumed_by,
        cancelled_by=approval.cancelled_by,
    )
    if approval.decided_at is not None:
        message.decided_at.CopyFrom(_timestamp(approval.decided_at))
    if approval.consumed_at is not None:
        message.consumed_at.CopyFrom(_timestamp(approval.consumed_at))
    return message


def approval_from_proto(message: approval_pb2.Approval) -> Approval:
    """The domain approval of a wire message (for offline verification)."""
    kind = SUBJECT_KINDS.get(message.subject_kind)
    state = STATES.get(message.state)
    if kind is None or state is None:
        raise InvalidArgument(
            "not an approval record: subject_kind and state are required",
            [Violation("state", "required"), Violation("subject_kind", "required")],
        )
    return Approval(
        approval_id=message.approval_id,
        request_id=message.request_id,
        subject_kind=kind,
        subject_hash=message.subject_hash,
        reason=message.reason,
        required_role=message.required_role,
        quorum=message.quorum,
        requester=message.requester,
        created_by=message.created_by,
        state=state,
        created_at=_datetime(message.created_at),
        expires_at=_datetime(message.expires_at),
        workflow_id=message.workflow_id,
        step_id=message.step_id,
        gateway_request_id=message.gateway_request_id,
        triggered_policies=tuple(to_protocol(p) for p in message.triggered_policies),
        artifacts=tuple(_artifact(a) for a in message.artifacts),
        decided_at=_datetime(message.decided_at) if message.HasField("decided_at") else None,
        consumed_at=_datetime(message.consumed_at) if message.HasField("consumed_at") else None,
        consumed_by=message.consumed_by,
        cancelled_by=message.cancelled_by,
        cancel_reason=message.cancel_reason,
        decisions=tuple(record_from_proto(d) for d in message.decisions),
    )


def record_to_proto(record: DecisionRecord) -> approval_pb2.ApprovalDecisionRecord:
    """The wire form of a signed decision."""
    return approval_pb2.ApprovalDecisionRecord(
        approval_id=record.approval_id,
        approved=record.approved,
        reason=record.reason,
        approver=record.approver,
        approver_roles=list(record.approver_roles),
        decided_at=_timestamp(record.decided_at),
        subject_hash=record.subject_hash,
        signature=record.signature,
        key_id=record.key_id,
    )


def record_from_proto(message: approval_pb2.ApprovalDecisionRecord) -> DecisionRecord:
    """The domain form of a signed decision, exactly as received."""
    if message.decided_at.nanos % 1000:
        # We sign whole microseconds; finer digits would be dropped unseen by the check.
        raise InvalidArgument(
            "decided_at has sub-microsecond digits: not a record this service signed",
            [Violation("decisions.decided_at", "whole microseconds only")],
        )
    return DecisionRecord(
        approval_id=message.approval_id,
        approved=message.approved,
        reason=message.reason,
        approver=message.approver,
        approver_roles=tuple(message.approver_roles),
        decided_at=_datetime(message.decided_at),
        subject_hash=message.subject_hash,
        signature=bytes(message.signature),
        key_id=message.key_id,
    )


def _artifact(message: approval_pb2.ArtifactSummary) -> ArtifactSummary:
    return ArtifactSummary(
        name=message.name,
        role=message.role,
        hash=message.hash,
        size=message.size,
        preview=message.preview,
        target=message.target,
        action=message.action,
    )


def _policy(document: Mapping[str, Any]) -> common_pb2.PolicyEvaluation:
    return from_protocol(document, common_pb2.PolicyEvaluation)


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


def _datetime(stamp: timestamp_pb2.Timestamp) -> datetime:
    # Our timestamps carry whole microseconds, so this is exact for records we signed.
    return stamp.ToDatetime(tzinfo=UTC)
