"""What the workflow engine needs from other services, as plain values and ``Protocol`` ports.

The gRPC adapters live in ``peers.py``; the engine only sees these types, so it holds no
protobuf and no channel.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator_svc.errors import OrchestratorError


class PeerUnavailable(OrchestratorError):
    """A service the orchestrator depends on did not answer (governance fails closed)."""


class PeerRefused(OrchestratorError):
    """A service refused a call (for example an approval that cannot be used)."""

    def __init__(self, message: str, status: str = "") -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Digests:
    """The governance in force: what plan-tokens bind."""

    policy_digest: str | None
    governance_hash: str | None


@dataclass(frozen=True)
class ArtifactForReview:
    """One artifact sent to preflight: its receipt entry, artifact.json and body."""

    descriptor: Mapping[str, Any]
    document: Mapping[str, Any]
    body: bytes | None = None
    body_path: str | None = None
    # The exact bytes of artifact.json, so preflight can verify the descriptor's hash.
    artifact_json: bytes | None = None


@dataclass(frozen=True)
class Evaluation:
    """A request to judge one step's flight-plan or take-off."""

    workflow_id: str
    step_id: str
    mode: str  # flight-plan | take-off
    receipt: Mapping[str, Any]
    artifacts: Sequence[ArtifactForReview]
    plan_token: Mapping[str, Any] | None
    environment: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    requester: str = ""
    workspace_root: str = ""
    repository: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    aggregation: str | None = None
    models: Sequence[str] | None = None
    request_id: str = ""


@dataclass(frozen=True)
class Verdict:
    """Preflight's answer, in the protocol's JSON words."""

    decision: str  # allow | warn | require_approval | deny
    evaluations: tuple[Mapping[str, Any], ...] = ()
    aggregation_method: str = ""
    violations: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    requires_role: str = ""
    requires_reason: str = ""
    policy_digest: str | None = None
    governance_hash: str | None = None
    evaluation_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form, for the log."""
        return {
            "decision": self.decision,
            "evaluations": [dict(e) for e in self.evaluations],
            "aggregation_method": self.aggregation_method,
            "violations": list(self.violations),
            "warnings": list(self.warnings),
            "requires_role": self.requires_role,
            "requires_reason": self.requires_reason,
            "policy_digest": self.policy_digest,
            "governance_hash": self.governance_hash,
            "evaluation_id": self.evaluation_id,
        }


class ApprovalState(enum.Enum):
    """Where an approval stands, as the engine cares."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    CONSUMED = "consumed"


@dataclass(frozen=True)
class ApprovalRequest:
    """An approval to create, bound to ``subject_hash``."""

    request_id: str
    workflow_id: str
    step_id: str
    subject_hash: str
    reason: str
    required_role: str
    quorum: int
    requester: str
    triggered: tuple[Mapping[str, Any], ...] = ()
    artifacts: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class ApprovalOutcome:
    """A decided approval."""

    approval_id: str
    state: ApprovalState
    subject_hash: str
    required_role: str
    approvers: tuple[str, ...] = ()
    reason: str = ""
    decided_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form, for the log."""
        return {
            "approval_id": self.approval_id,
            "approved": self.state in (ApprovalState.APPROVED, ApprovalState.CONSUMED),
            "state": self.state.value,
            "subject_hash": self.subject_hash,
            "required_role": self.required_role,
            "approvers": list(self.approvers),
            "reason": self.reason,
            "decided_at": self.decided_at,
        }


class Governance(Protocol):
    """PreflightService as the engine uses it."""

    async def digests(self) -> Digests:
        """The digests of the governance in force (``PeerUnavailable`` if unreachable)."""
        ...

    async def expected_digests(self) -> Digests:
        """The digests last seen (by ``digests`` or in a verdict), fetched when none were.

        A prediction only, for binding a new plan-token that preflight's verdict then
        confirms or rebinds; never for a check (the integrity check uses ``digests``).
        """
        ...

    async def evaluate(self, request: Evaluation) -> Verdict:
        """Judge a step (``PeerUnavailable`` if unreachable)."""
        ...


class Approvals(Protocol):
    """ApprovalService as the engine uses it."""

    async def create(self, request: ApprovalRequest) -> str:
        """Create (idempotent by request id); returns the approval id."""
        ...

    async def wait(self, approval_id: str) -> ApprovalOutcome:
        """Block until the approval is decided (approved, rejected, expired, cancelled)."""
        ...

    async def consume(self, approval_id: str, subject_hash: str, request_id: str) -> None:
        """Use an approved approval once (idempotent by request id); ``PeerRefused`` if not."""
        ...

    async def cancel(self, approval_id: str, reason: str) -> None:
        """Withdraw a pending approval (best effort)."""
        ...


__all__ = [
    "ApprovalOutcome",
    "ApprovalRequest",
    "ApprovalState",
    "Approvals",
    "ArtifactForReview",
    "Digests",
    "Evaluation",
    "Governance",
    "PeerRefused",
    "PeerUnavailable",
    "Verdict",
]
