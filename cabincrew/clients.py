"""Typed async clients for every service, with deadlines, and retries only where safe.

Failures from the wire are wrapped once, here, into ``RPCError``. Retries (tenacity,
exponential backoff) apply only to idempotent calls — reads, and mutations that carry an
idempotency key — and only for UNAVAILABLE / RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from cabincrew.errors import CabinCrewError, Violation, field_violations
from cabincrew.v1 import (
    approval_pb2,
    approval_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    llm_gateway_pb2_grpc,
    mcp_gateway_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    preflight_pb2,
    preflight_pb2_grpc,
)

T = TypeVar("T")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


class RPCError(CabinCrewError):
    """A call that failed on the wire, with its status code and field violations."""

    def __init__(
        self, status: grpc.StatusCode, message: str, violations: Sequence[Violation] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = status
        self.violations = tuple(violations)

    def __str__(self) -> str:
        base = f"{self.status.name}: {self.message}"
        if self.violations:
            base += " (" + "; ".join(f"{v.field}: {v.description}" for v in self.violations) + ")"
        return base


def wrap_rpc_error(error: grpc.RpcError) -> RPCError:
    """Convert a received ``grpc.RpcError`` into ``RPCError`` (the one boundary)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    try:
        violations = field_violations(error)
    except Exception:
        violations = []
    return RPCError(code, details or code.name, violations)


@dataclass(frozen=True)
class ChannelOptions:
    """How to reach a server."""

    address: str
    token: str = ""
    tls_ca_file: str = ""
    client_cert_file: str = ""
    client_key_file: str = ""
    deadline_seconds: float = 30.0


class _BearerAuth(grpc.AuthMetadataPlugin):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, context: Any, callback: Any) -> None:
        callback((("authorization", f"Bearer {self._token}"),), None)


def open_channel(options: ChannelOptions) -> grpc.aio.Channel:
    """An async channel; TLS when a CA is given, the token sent as bearer metadata."""
    if options.tls_ca_file:
        ca = Path(options.tls_ca_file).read_bytes()
        cert = Path(options.client_cert_file).read_bytes() if options.client_cert_file else None
        key = Path(options.client_key_file).read_bytes() if options.client_key_file else None
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        if options.token:
            creds = grpc.composite_channel_credentials(
                creds, grpc.metadata_call_credentials(_BearerAuth(options.token))
            )
        return grpc.aio.secure_channel(options.address, creds)
    interceptors = _token_interceptors(options.token) if options.token else []
    return grpc.aio.insecure_channel(options.address, interceptors=interceptors)


class _MetadataInterceptor:
    """Adds the bearer token on insecure (loopback) channels."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or [])
        metadata.append(self._header)
        return details._replace(metadata=metadata)


# grpc.aio files each interceptor under the first of the four kinds it is an instance of, so
# one object implementing all four would only ever see unary-unary calls: one class per kind.
class _UnaryUnaryAuth(_MetadataInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamAuth(_MetadataInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnaryAuth(_MetadataInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStreamAuth(_MetadataInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def _token_interceptors(token: str) -> list[Any]:
    return [
        _UnaryUnaryAuth(token),
        _UnaryStreamAuth(token),
        _StreamUnaryAuth(token),
        _StreamStreamAuth(token),
    ]


class _BaseClient:
    """Shared call logic: deadlines, error wrapping and retries."""

    def __init__(
        self, channel: grpc.aio.Channel, deadline_seconds: float = 30.0, max_attempts: int = 5
    ) -> None:
        self.channel = channel
        self.deadline = deadline_seconds
        self.max_attempts = max_attempts

    async def _unary(
        self, method: Any, request: Any, *, idempotent: bool, timeout: float | None = None
    ) -> Any:
        deadline = timeout if timeout is not None else self.deadline
        if not idempotent:
            try:
                return await method(request, timeout=deadline)
            except grpc.RpcError as exc:
                raise wrap_rpc_error(exc) from None
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts) | stop_after_delay(deadline),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            retry=retry_if_exception(lambda e: isinstance(e, RPCError) and e.status in _RETRYABLE),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    return await method(request, timeout=deadline)
                except grpc.RpcError as exc:
                    raise wrap_rpc_error(exc) from None
        raise AssertionError("unreachable")

    async def _stream(
        self, method: Any, request: Any, timeout: float | None = None
    ) -> AsyncIterator[Any]:
        try:
            async for item in method(request, timeout=timeout):
                yield item
        except grpc.RpcError as exc:
            raise wrap_rpc_error(exc) from None

    async def aclose(self) -> None:
        """Close the channel."""
        await self.channel.close()


def new_request_id() -> str:
    """A fresh idempotency key."""
    return uuid.uuid4().hex


class HealthClient(_BaseClient):
    """The standard gRPC health service."""

    async def check(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = await self._unary(
            stub.Check, health_pb2.HealthCheckRequest(service=service), idempotent=True
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class AuditClient(_BaseClient):
    """AuditService."""

    @property
    def stub(self) -> audit_pb2_grpc.AuditServiceStub:
        return audit_pb2_grpc.AuditServiceStub(self.channel)

    async def append(self, event: Any) -> audit_pb2.AppendAck:
        """Append one event (idempotent by event_id)."""
        response = await self._unary(
            self.stub.Append, audit_pb2.AppendRequest(event=event), idempotent=True
        )
        return response.ack  # type: ignore[no-any-return]

    async def get_checkpoint(self, refresh: bool = False) -> audit_pb2.GetCheckpointResponse:
        """The signed checkpoint."""
        request = audit_pb2.GetCheckpointRequest(refresh=refresh)
        return await self._unary(self.stub.GetCheckpoint, request, idempotent=not refresh)  # type: ignore[no-any-return]

    async def inclusion_proof(
        self, sequence: int, tree_size: int = 0
    ) -> audit_pb2.GetInclusionProofResponse:
        """An inclusion proof."""
        request = audit_pb2.GetInclusionProofRequest(sequence=sequence, tree_size=tree_size)
        return await self._unary(self.stub.GetInclusionProof, request, idempotent=True)  # type: ignore[no-any-return]

    async def consistency_proof(
        self, from_size: int, to_size: int = 0
    ) -> audit_pb2.GetConsistencyProofResponse:
        """A consistency proof."""
        request = audit_pb2.GetConsistencyProofRequest(from_size=from_size, to_size=to_size)
        return await self._unary(self.stub.GetConsistencyProof, request, idempotent=True)  # type: ignore[no-any-return]

    async def verify_log(self, timeout: float = 600.0) -> audit_pb2.VerifyLogResponse:
        """Server-side verification of the whole log."""
        return await self._unary(  # type: ignore[no-any-return]
            self.stub.VerifyLog, audit_pb2.VerifyLogRequest(), idempotent=True, timeout=timeout
        )

    def query(
        self, request: audit_pb2.QueryEventsRequest
    ) -> AsyncIterator[audit_pb2.QueryEventsResponse]:
        """Pages of stored events."""
        return self._stream(self.stub.QueryEvents, request)

    def tail(
        self, request: audit_pb2.TailEventsRequest
    ) -> AsyncIterator[audit_pb2.TailEventsResponse]:
        """Live events."""
        return self._stream(self.stub.TailEvents, request)


class PreflightClient(_BaseClient):
    """PreflightService (every RPC but Reload is a pure function of its input)."""

    @property
    def stub(self) -> preflight_pb2_grpc.PreflightServiceStub:
        return preflight_pb2_grpc.PreflightServiceStub(self.channel)

    async def evaluate(
        self, request: preflight_pb2.EvaluateRequest
    ) -> preflight_pb2.EvaluateResponse:
        """Judge a step."""
        return await self._unary(self.stub.Evaluate, request, idempotent=True)  # type: ignore[no-any-return]

    async def evaluate_content(
        self, request: preflight_pb2.EvaluateContentRequest
    ) -> preflight_pb2.EvaluateContentResponse:
        """Judge gateway content."""
        return await self._unary(self.stub.EvaluateContent, request, idempotent=True)  # type: ignore[no-any-return]

    async def classify(self, model: str, texts: Sequence[str]) -> preflight_pb2.ClassifyResponse:
        """Raw model scores."""
        request = preflight_pb2.ClassifyRequest(model=model, texts=list(texts))
        return await self._unary(self.stub.Classify, request, idempotent=True)  # type: ignore[no-any-return]

    async def get_governance(self) -> preflight_pb2.GetGovernanceResponse:
        """Loaded governance."""
        return await self._unary(  # type: ignore[no-any-return]
            self.stub.GetGovernance, preflight_pb2.GetGovernanceRequest(), idempotent=True
        )

    async def reload(self) -> preflight_pb2.ReloadResponse:
        """Reload policies and models."""
        request = preflight_pb2.ReloadRequest(request_id=new_request_id())
        return await self._unary(self.stub.Reload, request, idempotent=False)  # type: ignore[no-any-return]


class ApprovalClient(_BaseClient):
    """ApprovalService; mutations carry request ids, so they are retried safely."""

    @property
    def stub(self) -> approval_pb2_grpc.ApprovalServiceStub:
        return approval_pb2_grpc.ApprovalServiceStub(self.channel)

    async def create(self, request: approval_pb2.CreateApprovalRequest) -> approval_pb2.Approval:
        """Create (idempotent by request_id)."""
        if not request.request_id:
            request.request_id = new_request_id()
        response = await self._unary(self.stub.CreateApproval, request, idempotent=True)
        return response.approval  # type: ignore[no-any-return]

    async def get(self, approval_id: str) -> approval_pb2.Approval:
        """One approval."""
        request = approval_pb2.GetApprovalRequest(approval_id=approval_id)
        response = await self._unary(self.stub.GetApproval, request, idempotent=True)
        return response.approval  # type: ignore[no-any-return]

    async def list(
        self, request: approval_pb2.ListApprovalsRequest
    ) -> approval_pb2.ListApprovalsResponse:
        """A page of approvals."""
        return await self._unary(self.stub.ListApprovals, request, idempotent=True)  # type: ignore[no-any-return]

    async def respond(
        self, approval_id: str, subject_hash: str, approved: bool, reason: str = ""
    ) -> approval_pb2.Approval:
        """Approve or reject as the authenticated caller."""
        request = approval_pb2.RespondApprovalRequest(
            approval_id=approval_id,
            subject_hash=subject_hash,
            approved=approved,
            reason=reason,
            request_id=new_request_id(),
        )
        response = await self._unary(self.stub.RespondApproval, request, idempotent=True)
        return response.approval  # type: ignore[no-any-return]

    async def cancel(self, approval_id: str, reason: str) -> approval_pb2.Approval:
        """Cancel a pending approval."""
        request = approval_pb2.CancelApprovalRequest(
            approval_id=approval_id, reason=reason, request_id=new_request_id()
        )
        response = await self._unary(self.stub.CancelApproval, request, idempotent=True)
        return response.approval  # type: ignore[no-any-return]

    async def consume(
        self, approval_id: str, subject_hash: str, request_id: str = ""
    ) -> approval_pb2.Approval:
        """Use an approved approval once."""
        request = approval_pb2.ConsumeApprovalRequest(
            approval_id=approval_id,
            subject_hash=subject_hash,
            request_id=request_id or new_request_id(),
        )
        response = await self._unary(self.stub.ConsumeApproval, request, idempotent=True)
        return response.approval  # type: ignore[no-any-return]

    def watch(self, approval_id: str) -> AsyncIterator[approval_pb2.WatchApprovalResponse]:
        """The current state, then every change."""
        return self._stream(
            self.stub.WatchApproval, approval_pb2.WatchApprovalRequest(approval_id=approval_id)
        )

    async def signing_key(self) -> approval_pb2.GetSigningKeyResponse:
        """The records' verification key."""
        return await self._unary(  # type: ignore[no-any-return]
            self.stub.GetSigningKey, approval_pb2.GetSigningKeyRequest(), idempotent=True
        )


class OrchestratorClient(_BaseClient):
    """OrchestratorService."""

    @property
    def stub(self) -> orchestrator_pb2_grpc.OrchestratorServiceStub:
        return orchestrator_pb2_grpc.OrchestratorServiceStub(self.channel)

    async def submit(
        self, request: orchestrator_pb2.SubmitWorkflowRequest
    ) -> orchestrator_pb2.Workflow:
        """Submit a workflow (idempotent by request_id)."""
        if not request.request_id:
            request.request_id = new_request_id()
        response = await self._unary(self.stub.SubmitWorkflow, request, idempotent=True)
        return response.workflow  # type: ignore[no-any-return]

    async def get(self, workflow_id: str) -> orchestrator_pb2.Workflow:
        """One workflow."""
        request = orchestrator_pb2.GetWorkflowRequest(workflow_id=workflow_id)
        response = await self._unary(self.stub.GetWorkflow, request, idempotent=True)
        return response.workflow  # type: ignore[no-any-return]

    async def list(
        self, request: orchestrator_pb2.ListWorkflowsRequest
    ) -> orchestrator_pb2.ListWorkflowsResponse:
        """A page of workflows."""
        return await self._unary(self.stub.ListWorkflows, request, idempotent=True)  # type: ignore[no-any-return]

    def watch(self, workflow_id: str) -> AsyncIterator[orchestrator_pb2.WatchWorkflowResponse]:
        """The current state, then every transition."""
        return self._stream(
            self.stub.WatchWorkflow, orchestrator_pb2.WatchWorkflowRequest(workflow_id=workflow_id)
        )

    async def resume(
        self, workflow_id: str, retry_takeoff: bool = False
    ) -> orchestrator_pb2.Workflow:
        """Resume a workflow waiting for an operator."""
        request = orchestrator_pb2.ResumeWorkflowRequest(
            workflow_id=workflow_id, retry_takeoff=retry_takeoff, request_id=new_request_id()
        )
        response = await self._unary(self.stub.ResumeWorkflow, request, idempotent=True)
        return response.workflow  # type: ignore[no-any-return]

    async def cancel(self, workflow_id: str, reason: str) -> orchestrator_pb2.Workflow:
        """Cancel a workflow."""
        request = orchestrator_pb2.CancelWorkflowRequest(
            workflow_id=workflow_id, reason=reason, request_id=new_request_id()
        )
        response = await self._unary(self.stub.CancelWorkflow, request, idempotent=True)
        return response.workflow  # type: ignore[no-any-return]

    async def submit_batch(
        self, request: orchestrator_pb2.SubmitBatchRequest
    ) -> orchestrator_pb2.Batch:
        """Submit a batch (idempotent by request_id)."""
        if not request.request_id:
            request.request_id = new_request_id()
        response = await self._unary(self.stub.SubmitBatch, request, idempotent=True)
        return response.batch  # type: ignore[no-any-return]

    async def get_batch(self, batch_id: str) -> orchestrator_pb2.Batch:
        """One batch."""
        response = await self._unary(
            self.stub.GetBatch, orchestrator_pb2.GetBatchRequest(batch_id=batch_id), idempotent=True
        )
        return response.batch  # type: ignore[no-any-return]

    async def timeline(self, workflow_id: str) -> orchestrator_pb2.GetTimelineResponse:
        """Recorded events with durations and stats."""
        request = orchestrator_pb2.GetTimelineRequest(workflow_id=workflow_id)
        return await self._unary(self.stub.GetTimeline, request, idempotent=True)  # type: ignore[no-any-return]


class McpGatewayClient(_BaseClient):
    """McpGatewayService."""

    @property
    def stub(self) -> mcp_gateway_pb2_grpc.McpGatewayServiceStub:
        return mcp_gateway_pb2_grpc.McpGatewayServiceStub(self.channel)


class LlmGatewayClient(_BaseClient):
    """LlmGatewayService."""

    @property
    def stub(self) -> llm_gateway_pb2_grpc.LlmGatewayServiceStub:
        return llm_gateway_pb2_grpc.LlmGatewayServiceStub(self.channel)
