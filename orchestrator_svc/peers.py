"""gRPC adapters of the engine's ports: PreflightService and ApprovalService.

The orchestrator calls them as ``service:orchestrator`` with the role ``service`` (a token
from ``auth.service_token_file``, or issued from the data dir's auth key and renewed before
it expires), over channels that carry a fresh token on every call. Every call has a deadline
except ``WatchApproval``, which reconnects until the approval is decided.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from cabincrew.auth import issue_token
from cabincrew.clients import ApprovalClient, PreflightClient, RPCError
from cabincrew.config import Config
from cabincrew.convert import from_protocol, to_protocol
from cabincrew.errors import CabinCrewError
from cabincrew.signing import Ed25519Signer
from cabincrew.v1 import approval_pb2, common_pb2, preflight_pb2
from orchestrator_svc.model import thaw
from orchestrator_svc.ports import (
    ApprovalOutcome,
    ApprovalRequest,
    ApprovalState,
    Digests,
    Evaluation,
    PeerRefused,
    PeerUnavailable,
    Verdict,
)

log = logging.getLogger("orchestrator_svc.peers")

SERVICE_PRINCIPAL = "service:orchestrator"
_TOKEN_TTL = 3600.0
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}

_DECISIONS = {
    common_pb2.DECISION_ALLOW: "allow",
    common_pb2.DECISION_WARN: "warn",
    common_pb2.DECISION_REQUIRE_APPROVAL: "require_approval",
    common_pb2.DECISION_DENY: "deny",
}
_AGGREGATIONS = {
    "most_restrictive": common_pb2.AGGREGATION_METHOD_MOST_RESTRICTIVE,
    "unanimous": common_pb2.AGGREGATION_METHOD_UNANIMOUS,
    "majority": common_pb2.AGGREGATION_METHOD_MAJORITY,
    "any_deny": common_pb2.AGGREGATION_METHOD_ANY_DENY,
    "all_allow": common_pb2.AGGREGATION_METHOD_ALL_ALLOW,
    "custom": common_pb2.AGGREGATION_METHOD_CUSTOM,
}
_AGGREGATION_NAMES = {value: name for name, value in _AGGREGATIONS.items()}
_APPROVAL_STATES = {
    approval_pb2.APPROVAL_STATE_PENDING: ApprovalState.PENDING,
    approval_pb2.APPROVAL_STATE_APPROVED: ApprovalState.APPROVED,
    approval_pb2.APPROVAL_STATE_REJECTED: ApprovalState.REJECTED,
    approval_pb2.APPROVAL_STATE_EXPIRED: ApprovalState.EXPIRED,
    approval_pb2.APPROVAL_STATE_CANCELLED: ApprovalState.CANCELLED,
    approval_pb2.APPROVAL_STATE_CONSUMED: ApprovalState.CONSUMED,
}


class ServiceToken:
    """This process's bearer token for calls to the other services, renewed before expiry."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._token = ""
        self._expires = 0.0
        self._signer: Ed25519Signer | None = None

    def __call__(self) -> str:
        """A valid token."""
        if self._config.auth.service_token_file:
            return Path(self._config.auth.service_token_file).read_text(encoding="utf-8").strip()
        now = time.time()
        if now > self._expires - 300:
            if self._signer is None:
                self._signer = Ed25519Signer.load_or_create(self._config.auth_key_path())
            self._token = issue_token(
                self._signer,
                SERVICE_PRINCIPAL,
                ["service"],
                ttl_seconds=_TOKEN_TTL,
                audience=self._config.auth.audience,
            )
            self._expires = now + _TOKEN_TTL
        return self._token


class _Bearer(grpc.AuthMetadataPlugin):
    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    def __call__(self, context: Any, callback: Any) -> None:
        callback((("authorization", f"Bearer {self._token()}"),), None)


class _DynamicAuth:
    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or [])
        metadata.append(("authorization", f"Bearer {self._token()}"))
        return details._replace(metadata=metadata)


class _UnaryUnary(_DynamicAuth, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_DynamicAuth, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def service_channel(
    address: str, token: Callable[[], str], tls_ca_file: str = ""
) -> grpc.aio.Channel:
    """A channel that sends a fresh service token with every call."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if tls_ca_file:
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(Path(tls_ca_file).read_bytes()),
            grpc.metadata_call_credentials(_Bearer(token)),
        )
        return grpc.aio.secure_channel(address, credentials, options=options)
    return grpc.aio.insecure_channel(
        address, interceptors=[_UnaryUnary(token), _UnaryStream(token)], options=options
    )


class PreflightPeer:
    """``Governance`` over PreflightService."""

    def __init__(self, channel: grpc.aio.Channel, deadline: float) -> None:
        self._client = PreflightClient(channel, deadline_seconds=deadline)
        self._last: Digests | None = None

    async def digests(self) -> Digests:
        """GetGovernance's digests."""
        try:
            response = await self._client.get_governance()
        except RPCError as exc:
            raise PeerUnavailable(f"preflight is unavailable ({exc.status.name})") from None
        found = Digests(response.policy_digest or None, response.governance_hash or None)
        self._last = found
        return found

    async def expected_digests(self) -> Digests:
        """The digests last seen, else GetGovernance's (a prediction: see ``Governance``)."""
        if self._last is not None:
            return self._last
        return await self.digests()

    async def evaluate(self, request: Evaluation) -> Verdict:
        """Evaluate."""
        message = preflight_pb2.EvaluateRequest(
            workflow_id=request.workflow_id,
            step_id=request.step_id,
            mode=common_pb2.MODE_FLIGHT_PLAN
            if request.mode == "flight-plan"
            else common_pb2.MODE_TAKE_OFF,
            receipt=from_protocol(thaw(request.receipt), common_pb2.EngineOutput),
            request_id=request.request_id,
            context=preflight_pb2.EvaluationContext(
                environment=request.environment,
                repository=request.repository,
                labels=dict(request.labels),
                requester=request.requester,
                workspace_root=request.workspace_root,
                extra=_struct(thaw(request.extra)),
            ),
            options=preflight_pb2.GovernanceOptions(
                aggregation_method=_AGGREGATIONS.get(
                    request.aggregation or "", common_pb2.AGGREGATION_METHOD_UNSPECIFIED
                ),
                models=list(request.models or ()),
                skip_models=request.models is not None and len(request.models) == 0,
            ),
        )
        if request.plan_token is not None:
            message.plan_token.CopyFrom(
                from_protocol(dict(request.plan_token), common_pb2.PlanToken)
            )
        for item in request.artifacts:
            artifact = message.artifacts.add()
            artifact.descriptor.CopyFrom(
                from_protocol(thaw(item.descriptor), common_pb2.EngineArtifact)
            )
            artifact.artifact.CopyFrom(from_protocol(thaw(item.document), common_pb2.Artifact))
            if item.body is not None:
                artifact.body = item.body
            elif item.body_path is not None:
                artifact.body_ref = item.body_path
            if item.artifact_json is not None:
                artifact.artifact_json = item.artifact_json
        try:
            response = await self._client.evaluate(message)
        except RPCError as exc:
            if exc.status in _TRANSIENT:
                raise PeerUnavailable(f"preflight is unavailable ({exc.status.name})") from None
            raise PeerUnavailable(f"preflight refused the evaluation: {exc}") from None
        result = response.result
        if result.policy_digest:
            self._last = Digests(result.policy_digest, result.governance_hash or None)
        return Verdict(
            decision=_DECISIONS.get(result.decision, "deny"),
            evaluations=tuple(_evaluation(e) for e in result.evaluations),
            aggregation_method=_AGGREGATION_NAMES.get(result.aggregation_method, ""),
            violations=tuple(result.violations),
            warnings=tuple(result.warnings),
            requires_role=result.requires.role,
            requires_reason=result.requires.reason,
            policy_digest=result.policy_digest or None,
            governance_hash=result.governance_hash or None,
            evaluation_id=result.evaluation_id,
        )

    async def aclose(self) -> None:
        """Close the channel."""
        await self._client.aclose()


class ApprovalPeer:
    """``Approvals`` over ApprovalService."""

    def __init__(self, channel: grpc.aio.Channel, deadline: float) -> None:
        self._client = ApprovalClient(channel, deadline_seconds=deadline)
        self._closed = asyncio.Event()
        # The records' verification key, fetched once and then pinned for this process.
        self._record_key: bytes | None = None

    async def create(self, request: ApprovalRequest) -> str:
        """CreateApproval (idempotent by request id)."""
        message = approval_pb2.CreateApprovalRequest(
            request_id=request.request_id[:128],
            workflow_id=request.workflow_id,
            step_id=request.step_id,
            subject_kind=approval_pb2.SUBJECT_KIND_PLAN_TOKEN,
            subject_hash=request.subject_hash,
            reason=request.reason,
            required_role=request.required_role,
            quorum=request.quorum,
            on_behalf_of=request.requester,
        )
        for evaluation in request.triggered:
            message.triggered_policies.append(
                from_protocol(thaw(evaluation), common_pb2.PolicyEvaluation)
            )
        for summary in request.artifacts:
            message.artifacts.append(approval_pb2.ArtifactSummary(**summary))
        try:
            approval = await self._client.create(message)
        except RPCError as exc:
            if exc.status in _TRANSIENT:
                raise PeerUnavailable(f"approval is unavailable ({exc.status.name})") from None
            raise PeerRefused(f"approval refused the request: {exc}", exc.status.name) from None
        return str(approval.approval_id)

    async def wait(self, approval_id: str) -> ApprovalOutcome:
        """WatchApproval until decided; reconnects while the service restarts."""
        backoff = 0.1
        while True:
            try:
                async for update in self._client.watch(approval_id):
                    approval = update.approval
                    state = _APPROVAL_STATES.get(approval.state, ApprovalState.PENDING)
                    if state is not ApprovalState.PENDING:
                        return _outcome(approval, state)
                    backoff = 0.1
            except RPCError as exc:
                if exc.status not in _TRANSIENT:
                    raise PeerRefused(
                        f"approval {approval_id} cannot be watched: {exc}", exc.status.name
                    ) from None
                log.info("watching approval %s: %s; reconnecting", approval_id, exc.status.name)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def consume(self, approval_id: str, subject_hash: str, request_id: str) -> None:
        """ConsumeApproval (idempotent by request id), then check the signed decision
        records it returns: a consume that succeeds without records that justify it (a
        forged or altered record, another subject) is refused like a failed consume."""
        try:
            approval = await self._client.consume(
                approval_id, subject_hash, request_id=request_id[:128]
            )
            if self._record_key is None:
                self._record_key = bytes((await self._client.signing_key()).public_key)
        except RPCError as exc:
            if exc.status in _TRANSIENT:
                raise PeerUnavailable(f"approval is unavailable ({exc.status.name})") from None
            raise PeerRefused(
                f"approval {approval_id} cannot be used: {exc}", exc.status.name
            ) from None
        problems = _record_problems(approval, subject_hash, self._record_key)
        if problems:
            raise PeerRefused(
                f"approval {approval_id} records do not verify: {'; '.join(problems[:3])}",
                "FAILED_PRECONDITION",
            )

    async def cancel(self, approval_id: str, reason: str) -> None:
        """CancelApproval, best effort."""
        try:
            await self._client.cancel(approval_id, reason[:1000] or "workflow ended")
        except RPCError as exc:
            log.info("cancelling approval %s: %s", approval_id, exc)

    async def aclose(self) -> None:
        """Close the channel."""
        await self._client.aclose()


def _outcome(approval: approval_pb2.Approval, state: ApprovalState) -> ApprovalOutcome:
    decided = approval.decided_at.ToDatetime() if approval.HasField("decided_at") else None
    approvers = tuple(d.approver for d in approval.decisions if d.approved)
    reasons = [d.reason for d in approval.decisions if d.reason]
    return ApprovalOutcome(
        approval_id=approval.approval_id,
        state=state,
        subject_hash=approval.subject_hash,
        required_role=approval.required_role,
        approvers=approvers or tuple(d.approver for d in approval.decisions),
        reason="; ".join(reasons) or approval.cancel_reason,
        decided_at=(decided.isoformat(timespec="microseconds") + "Z") if decided else _now(),
    )


def _evaluation(message: common_pb2.PolicyEvaluation) -> dict[str, Any]:
    # The protocol requires evaluated_at; a preflight that leaves it out gets "now", so that
    # the audit events carrying the evaluation still validate.
    document = to_protocol(message)
    document.setdefault("evaluated_at", _now())
    document.setdefault("reason", "")
    return document


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _struct(value: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(dict(value))
    return message


__all__ = ["SERVICE_PRINCIPAL", "ApprovalPeer", "PreflightPeer", "ServiceToken", "service_channel"]


def _record_problems(approval: approval_pb2.Approval, subject_hash: str, key: bytes) -> list[str]:
    """Why the consumed approval's signed records do not justify acting on ``subject_hash``."""
    from approval_svc.records import verify_approval
    from approval_svc.wire import approval_from_proto

    if approval.subject_hash != subject_hash:
        return ["the approval is bound to another subject hash"]
    if approval.state != approval_pb2.APPROVAL_STATE_CONSUMED:
        return ["the approval is not consumed after a successful consume"]
    try:
        domain = approval_from_proto(approval)
    except CabinCrewError as exc:
        return [exc.message]
    return verify_approval(domain, key)
