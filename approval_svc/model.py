"""Approvals as domain values, and the state machine that moves them.

No gRPC and no SQL here: the service layer translates protobuf to these values, the store
persists them, and every transition is a pure function that either returns the next value
or raises the refusal (an ``ApprovalError``) that the caller audits.

Lifecycle::

    pending ──▶ approved ──▶ consumed
       │           │
       ├──▶ rejected
       ├──▶ expired ◀┘   (an approval is only good until ``expires_at``, used or not)
       └──▶ cancelled ◀┘ (an unused approval can be withdrawn)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

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
from cabincrew.auth import Principal
from cabincrew.canonical import canonical_hash
from cabincrew.errors import InvalidArgument, Violation

SERVICE_ROLE = "service"
ADMIN_ROLE = "admin"

MAX_QUORUM = 16
MAX_TTL = timedelta(days=30)
MAX_REASON = 4_000
MAX_PREVIEW = 16_384
MAX_ITEMS = 1_000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ROLE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


class State(StrEnum):
    """Where an approval is in its life."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    CONSUMED = "consumed"

    @property
    def terminal(self) -> bool:
        """No transition leaves a terminal state."""
        return self in _TERMINAL


_TERMINAL = frozenset({State.REJECTED, State.EXPIRED, State.CANCELLED, State.CONSUMED})


class SubjectKind(StrEnum):
    """What the subject hash is the hash of."""

    PLAN_TOKEN = "plan_token"
    MCP_REQUEST = "mcp_request"
    LLM_REQUEST = "llm_request"
    LLM_RESPONSE = "llm_response"

    @property
    def gateway(self) -> str:
        """The gateway that asks for this kind ("" for plan-tokens)."""
        return {"mcp_request": "mcp", "llm_request": "llm", "llm_response": "llm"}.get(
            self.value, ""
        )


def utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime; naive datetimes are refused."""
    if moment.tzinfo is None:
        raise ValueError("naive datetimes are ambiguous; use an aware UTC datetime")
    return moment.astimezone(UTC)


def format_instant(moment: datetime) -> str:
    """RFC 3339 UTC with exactly six fractional digits: one spelling per instant (signed)."""
    return utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_instant(text: str) -> datetime:
    """Inverse of ``format_instant`` (accepts any RFC 3339 form ``fromisoformat`` reads)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return utc(moment)


@dataclass(frozen=True)
class ArtifactSummary:
    """What an approver sees of one artifact."""

    name: str
    role: str = ""
    hash: str = ""
    size: int = 0
    preview: str = ""
    target: str = ""
    action: str = ""


@dataclass(frozen=True)
class DecisionRecord:
    """One approver's decision; ``signature`` covers ``signed_payload()``."""

    approval_id: str
    approved: bool
    reason: str
    approver: str
    approver_roles: tuple[str, ...]
    decided_at: datetime
    subject_hash: str
    signature: bytes = b""
    key_id: str = ""

    def signed_payload(self) -> dict[str, Any]:
        """The document whose canonical JSON is signed (everything but signature and key)."""
        return {
            "approval_id": self.approval_id,
            "approved": self.approved,
            "reason": self.reason,
            "approver": self.approver,
            "approver_roles": sorted(self.approver_roles),
            "decided_at": format_instant(self.decided_at),
            "subject_hash": self.subject_hash,
        }


@dataclass(frozen=True)
class NewApproval:
    """A request for approval, checked when built."""

    request_id: str
    subject_kind: SubjectKind
    subject_hash: str
    reason: str
    required_role: str
    requester: str
    created_by: str
    quorum: int = 1
    workflow_id: str = ""
    step_id: str = ""
    gateway_request_id: str = ""
    # Protocol JSON form of each PolicyEvaluation.
    triggered_policies: tuple[Mapping[str, Any], ...] = ()
    artifacts: tuple[ArtifactSummary, ...] = ()
    # None means the configured default.
    ttl: timedelta | None = None

    def __post_init__(self) -> None:
        violations = _new_approval_violations(self)
        if violations:
            raise InvalidArgument(
                f"invalid approval request: {violations[0].field}: {violations[0].description}",
                violations,
            )

    def fingerprint(self) -> str:
        """Hash of everything the caller sent, to tell a retry from a reused request id."""
        return canonical_hash(
            {
                "subject_kind": self.subject_kind.value,
                "subject_hash": self.subject_hash,
                "reason": self.reason,
                "required_role": self.required_role,
                "requester": self.requester,
                "created_by": self.created_by,
                "quorum": self.quorum,
                "workflow_id": self.workflow_id,
                "step_id": self.step_id,
                "gateway_request_id": self.gateway_request_id,
                "triggered_policies": [dict(p) for p in self.triggered_policies],
                "artifacts": [dataclasses.asdict(a) for a in self.artifacts],
                "ttl_us": None if self.ttl is None else _micros(self.ttl),
            }
        )


def _micros(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _new_approval_violations(new: NewApproval) -> list[Violation]:
    found: list[Violation] = []

    def bad(name: str, description: str) -> None:
        found.append(Violation(name, description))

    if not _ID.match(new.request_id):
        bad("request_id", "required: 1-128 letters, digits and ._:/@+-")
    if not _HEX64.match(new.subject_hash):
        bad("subject_hash", "must be a SHA-256 digest in 64 lowercase hex characters")
    if not new.reason.strip():
        bad("reason", "required: say why a person must look at this")
    elif len(new.reason) > MAX_REASON:
        bad("reason", f"at most {MAX_REASON} characters")
    if not _ROLE.match(new.required_role):
        bad("required_role", "required: a role name (lowercase letters, digits, ._-)")
    if not _NAME.match(new.requester):
        bad("on_behalf_of", "not a valid principal name")
    if not 1 <= new.quorum <= MAX_QUORUM:
        bad("quorum", f"between 1 and {MAX_QUORUM} distinct approvers")
    if new.subject_kind is SubjectKind.PLAN_TOKEN:
        if not new.workflow_id:
            bad("workflow_id", "required for a plan-token approval")
        if not new.step_id:
            bad("step_id", "required for a plan-token approval")
    elif not new.gateway_request_id:
        bad("gateway_request_id", "required for a gateway approval")
    for name in ("workflow_id", "step_id", "gateway_request_id"):
        value = getattr(new, name)
        if value and not _ID.match(value):
            bad(name, "1-128 letters, digits and ._:/@+-")
    if new.ttl is not None and not timedelta(0) < new.ttl <= MAX_TTL:
        bad("ttl", f"must be positive and at most {MAX_TTL.days} days")
    if len(new.triggered_policies) > MAX_ITEMS:
        bad("triggered_policies", f"at most {MAX_ITEMS}")
    if len(new.artifacts) > MAX_ITEMS:
        bad("artifacts", f"at most {MAX_ITEMS}")
    names: set[str] = set()
    for index, artifact in enumerate(new.artifacts):
        where = f"artifacts[{index}]"
        if not artifact.name:
            bad(f"{where}.name", "required")
        elif artifact.name in names:
            bad(f"{where}.name", "artifact names must be unique")
        names.add(artifact.name)
        if artifact.size < 0:
            bad(f"{where}.size", "must not be negative")
        if len(artifact.preview) > MAX_PREVIEW:
            bad(f"{where}.preview", f"at most {MAX_PREVIEW} characters")
    return found


@dataclass(frozen=True)
class Approval:
    """One approval as stored."""

    approval_id: str
    request_id: str
    subject_kind: SubjectKind
    subject_hash: str
    reason: str
    required_role: str
    quorum: int
    requester: str
    created_by: str
    state: State
    created_at: datetime
    expires_at: datetime
    workflow_id: str = ""
    step_id: str = ""
    gateway_request_id: str = ""
    triggered_policies: tuple[Mapping[str, Any], ...] = ()
    artifacts: tuple[ArtifactSummary, ...] = ()
    decided_at: datetime | None = None
    consumed_at: datetime | None = None
    consumed_by: str = ""
    cancelled_by: str = ""
    cancel_reason: str = ""
    decisions: tuple[DecisionRecord, ...] = field(default=())

    @classmethod
    def open(cls, approval_id: str, new: NewApproval, now: datetime, ttl: timedelta) -> Approval:
        """A fresh pending approval for ``new``."""
        return cls(
            approval_id=approval_id,
            request_id=new.request_id,
            subject_kind=new.subject_kind,
            subject_hash=new.subject_hash,
            reason=new.reason,
            required_role=new.required_role,
            quorum=new.quorum,
            requester=new.requester,
            created_by=new.created_by,
            state=State.PENDING,
            created_at=now,
            expires_at=now + (new.ttl if new.ttl is not None else ttl),
            workflow_id=new.workflow_id,
            step_id=new.step_id,
            gateway_request_id=new.gateway_request_id,
            triggered_policies=new.triggered_policies,
            artifacts=new.artifacts,
        )

    @property
    def approvals_given(self) -> int:
        """Distinct approvers who approved so far."""
        return len({d.approver for d in self.decisions if d.approved})

    def overdue(self, now: datetime) -> bool:
        """Whether the approval should be expired at ``now``."""
        return self.state in (State.PENDING, State.APPROVED) and now >= self.expires_at

    def with_expiry(self, now: datetime) -> Approval:
        """Expired if overdue at ``now``, else unchanged (expiry is enforced on every read)."""
        if self.overdue(now):
            return dataclasses.replace(self, state=State.EXPIRED)
        return self


def is_party(approval: Approval, principal: Principal) -> bool:
    """Whether ``principal`` asked for this approval, itself or through a service."""
    return principal.name in (approval.requester, approval.created_by)


def check_respond(
    approval: Approval, principal: Principal, subject_hash: str, now: datetime
) -> None:
    """Raise the refusal of ``principal`` answering ``approval`` at ``now``, if any."""
    _check_open(approval, now, State.PENDING)
    if is_party(approval, principal):
        raise SelfApproval(f"{principal.name} asked for approval {approval.approval_id}")
    if not principal.has_role(approval.required_role):
        raise MissingRole(
            f"approval {approval.approval_id} needs the role {approval.required_role!r}"
        )
    if subject_hash != approval.subject_hash:
        raise SubjectMismatch(
            "the subject hash does not match the approval's",
            "SUBJECT_MISMATCH",
            approval.approval_id,
        )
    if any(d.approver == principal.name for d in approval.decisions):
        raise AlreadyResponded(
            f"{principal.name} already answered approval {approval.approval_id}",
            "ALREADY_RESPONDED",
            approval.approval_id,
        )


def decision_for(
    approval: Approval, principal: Principal, approved: bool, reason: str, now: datetime
) -> DecisionRecord:
    """The (unsigned) record of ``principal``'s answer."""
    return DecisionRecord(
        approval_id=approval.approval_id,
        approved=approved,
        reason=reason,
        approver=principal.name,
        approver_roles=tuple(sorted(principal.roles)),
        decided_at=now,
        subject_hash=approval.subject_hash,
    )


def apply_decision(approval: Approval, record: DecisionRecord) -> Approval:
    """Add a signed record: one rejection rejects, ``quorum`` distinct approvals approve."""
    updated = dataclasses.replace(approval, decisions=(*approval.decisions, record))
    if not record.approved:
        return dataclasses.replace(updated, state=State.REJECTED, decided_at=record.decided_at)
    if updated.approvals_given >= updated.quorum:
        return dataclasses.replace(updated, state=State.APPROVED, decided_at=record.decided_at)
    return updated


def may_consume(approval: Approval, principal: Principal) -> bool:
    """The services that act (orchestrator, gateways: role ``service``) or whoever created
    the approval may use it."""
    return principal.has_role(SERVICE_ROLE) or principal.name == approval.created_by


def consume(approval: Approval, principal: Principal, subject_hash: str, now: datetime) -> Approval:
    """Use an approved approval once, for its own subject."""
    if not may_consume(approval, principal):
        raise NotAllowed(
            f"{principal.name} may not use approval {approval.approval_id}; "
            "only its creator or a principal with the role 'service' may"
        )
    _check_open(approval, now, State.APPROVED)
    if subject_hash != approval.subject_hash:
        raise SubjectMismatch(
            "the subject hash does not match the approval's",
            "SUBJECT_MISMATCH",
            approval.approval_id,
        )
    return dataclasses.replace(
        approval, state=State.CONSUMED, consumed_at=now, consumed_by=principal.name
    )


def cancel(approval: Approval, principal: Principal, reason: str, now: datetime) -> Approval:
    """Withdraw an approval that was not used: by its requester, its creator or an admin."""
    if not (is_party(approval, principal) or principal.has_role(ADMIN_ROLE)):
        raise NotAllowed(
            f"only the requester or an admin may cancel approval {approval.approval_id}"
        )
    if approval.overdue(now):
        _raise_for_state(approval.with_expiry(now))
    if approval.state not in (State.PENDING, State.APPROVED):
        _raise_for_state(approval)
    return dataclasses.replace(
        approval,
        state=State.CANCELLED,
        decided_at=approval.decided_at or now,
        cancelled_by=principal.name,
        cancel_reason=reason,
    )


def expire(approval: Approval, now: datetime) -> Approval:
    """The expired form of an overdue approval."""
    if not approval.overdue(now):
        raise ValueError("only an overdue pending or approved approval expires")
    return dataclasses.replace(approval, state=State.EXPIRED)


def _check_open(approval: Approval, now: datetime, wanted: State) -> None:
    current = approval.with_expiry(now)
    if current.state is not wanted:
        _raise_for_state(current)


def _raise_for_state(approval: Approval) -> None:
    aid = approval.approval_id
    if approval.state is State.EXPIRED:
        raise Expired(f"approval {aid} expired", "EXPIRED", aid)
    if approval.state is State.CONSUMED:
        raise AlreadyConsumed(f"approval {aid} was already used", "CONSUMED", aid)
    raise NotApproved(f"approval {aid} is {approval.state.value}", approval.state.name, aid)
