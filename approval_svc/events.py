"""The audit events of approvals, in the protocol's ``AuditEvent`` parts.

Each event carries the protocol's ``approval`` part (``approval_id, required_role, approved,
approver, plan_token_hash, timestamp, reason``): ``plan_token_hash`` is the subject hash
(the plan-token hash, or the hash of a gateway request or response) and ``approver`` the
principal whose act the event records (the approver of a response, the requester of a
creation, the caller refused). Events never carry secrets: no tokens, no webhook secret,
no artifact previews; hashes are fine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from approval_svc.model import Approval, DecisionRecord, State, format_instant
from cabincrew.emitter import AuditEmitter

# The workflow state each approval state implies (the approval service does not know the
# workflow, only where an approval leaves it).
_WORKFLOW_STATE = {
    State.PENDING: "AWAITING_APPROVAL",
    State.APPROVED: "APPROVED",
    State.CONSUMED: "APPROVED",
    State.REJECTED: "FAILED",
    State.EXPIRED: "FAILED",
    State.CANCELLED: "CANCELLED",
}


class ApprovalAudit:
    """Builds and emits the approval events through an ``AuditEmitter``."""

    def __init__(self, emitter: AuditEmitter, clock: Callable[[], datetime]) -> None:
        self._emitter = emitter
        self._clock = clock

    async def created(self, approval: Approval) -> str:
        """A new pending approval."""
        return await self._emit(
            "approval.created",
            approval,
            actor=approval.requester,
            approved=False,
            reason=approval.reason,
            message=(
                f"{approval.requester} asked for approval by {approval.quorum} holder(s) of "
                f"role {approval.required_role!r}"
                + (
                    f" (created by {approval.created_by})"
                    if approval.created_by != approval.requester
                    else ""
                )
            ),
        )

    async def responded(self, approval: Approval, record: DecisionRecord) -> str:
        """One approver's signed answer."""
        progress = (
            f"approved ({approval.approvals_given} of {approval.quorum} approvals)"
            if record.approved
            else "rejected (one rejection rejects)"
        )
        return await self._emit(
            "approval.responded",
            approval,
            actor=record.approver,
            approved=record.approved,
            reason=record.reason,
            at=record.decided_at,
            message=f"{record.approver} {progress}; record signed by key {record.key_id}",
        )

    async def decided(self, approval: Approval, record: DecisionRecord) -> str:
        """The approval reached approved or rejected."""
        return await self._emit(
            f"approval.{approval.state.value}",
            approval,
            actor=record.approver,
            approved=approval.state is State.APPROVED,
            reason=record.reason,
            at=record.decided_at,
            message=f"approval {approval.state.value} by {', '.join(_approvers(approval))}",
        )

    async def consumed(self, approval: Approval) -> str:
        """An approved approval was used."""
        return await self._emit(
            "approval.consumed",
            approval,
            actor=approval.consumed_by,
            approved=True,
            reason=approval.reason,
            at=approval.consumed_at,
            message=(
                f"used by {approval.consumed_by}; approved by {', '.join(_approvers(approval))}"
            ),
        )

    async def expired(self, approval: Approval) -> str:
        """An approval expired before it was decided or used."""
        return await self._emit(
            "approval.expired",
            approval,
            actor="",
            approved=False,
            reason=f"expired at {format_instant(approval.expires_at)}",
            severity="warning",
            message="the approval expired before it was decided or used",
        )

    async def cancelled(self, approval: Approval) -> str:
        """An approval was withdrawn."""
        return await self._emit(
            "approval.cancelled",
            approval,
            actor=approval.cancelled_by,
            approved=False,
            reason=approval.cancel_reason,
            message=f"cancelled by {approval.cancelled_by}",
        )

    async def refused(
        self,
        operation: str,
        approval_id: str,
        approval: Approval | None,
        actor: str,
        refusal: str,
        detail: str,
        offered_hash: str = "",
    ) -> str:
        """A refused call, with the refusal code first in the reason."""
        message = f"{operation} by {actor or 'anonymous'} refused: {refusal}"
        if offered_hash and approval is not None and offered_hash != approval.subject_hash:
            message += f" (offered subject hash {offered_hash})"
        return await self._emit(
            "approval.refused",
            approval,
            approval_id=approval_id,
            actor=actor,
            approved=False,
            reason=f"{refusal}: {detail}",
            severity="warning",
            message=message,
            plan_token_hash="" if approval is not None else offered_hash,
        )

    async def webhook_failed(self, approval: Approval, detail: str) -> str:
        """The pending notification could not be delivered."""
        return await self._emit(
            "approval.webhook_failed",
            approval,
            actor="",
            approved=False,
            reason=approval.reason,
            severity="error",
            message=f"webhook notification failed: {detail}",
        )

    async def _emit(
        self,
        event_type: str,
        approval: Approval | None,
        *,
        actor: str,
        approved: bool,
        reason: str,
        message: str,
        severity: str = "info",
        at: datetime | None = None,
        approval_id: str = "",
        plan_token_hash: str = "",
    ) -> str:
        part: dict[str, Any] = {
            "approval_id": approval.approval_id if approval is not None else approval_id,
            "required_role": approval.required_role if approval is not None else "",
            "approved": approved,
            "approver": actor,
            "plan_token_hash": approval.subject_hash if approval is not None else plan_token_hash,
            "timestamp": format_instant(at or self._clock()),
        }
        if reason:
            part["reason"] = reason
        return await self._emitter.emit(
            event_type,
            workflow_state=_WORKFLOW_STATE[approval.state] if approval else "AWAITING_APPROVAL",
            severity=severity,
            message=message,
            workflow=_workflow(approval),
            gateway=_gateway(approval),
            approval=part,
        )


def _approvers(approval: Approval) -> list[str]:
    return [
        d.approver
        for d in approval.decisions
        if d.approved == (approval.state is not State.REJECTED)
    ]


def _workflow(approval: Approval | None) -> Mapping[str, Any] | None:
    if approval is None or not approval.workflow_id:
        return None
    part = {"workflow_id": approval.workflow_id}
    if approval.step_id:
        part["step_id"] = approval.step_id
    return part


def _gateway(approval: Approval | None) -> Mapping[str, Any] | None:
    if approval is None or not approval.subject_kind.gateway:
        return None
    return {
        "gateway_type": approval.subject_kind.gateway,
        "request_id": approval.gateway_request_id,
        "policy_decision": "require_approval",
    }
