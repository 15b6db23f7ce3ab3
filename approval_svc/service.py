"""gRPC handlers of ApprovalService: protobuf in, domain call, protobuf out.

The caller is always ``current_principal()`` (set by the runtime's auth interceptor), never
a request field. Domain errors become gRPC status through ``cabincrew.errors.to_status``
(the one mapping); anything unexpected becomes INTERNAL without internal text.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Never

import grpc

from approval_svc import wire
from approval_svc.manager import ApprovalManager
from approval_svc.store import ListFilter
from cabincrew.errors import CabinCrewError, to_status
from cabincrew.runtime.context import current_principal
from cabincrew.v1 import approval_pb2, approval_pb2_grpc

log = logging.getLogger("approval_svc.service")

Context = grpc.aio.ServicerContext[Any, Any]


async def _fail(context: Context, method: str, exc: Exception) -> Never:
    """End the call with the status of ``exc``: domain errors mapped, the rest INTERNAL."""
    if isinstance(exc, CabinCrewError):
        await context.abort_with_status(to_status(exc))
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    log.error("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


class ApprovalServiceServicer(approval_pb2_grpc.ApprovalServiceServicer):
    """Thin handlers over ``ApprovalManager``."""

    def __init__(self, manager: ApprovalManager) -> None:
        self.manager = manager

    async def CreateApproval(
        self, request: approval_pb2.CreateApprovalRequest, context: Context
    ) -> approval_pb2.CreateApprovalResponse:
        principal = current_principal()
        try:
            approval = await self.manager.create(
                principal, lambda: wire.new_approval(request, principal)
            )
        except Exception as exc:
            await _fail(context, "CreateApproval", exc)
        return approval_pb2.CreateApprovalResponse(approval=wire.approval_to_proto(approval))

    async def GetApproval(
        self, request: approval_pb2.GetApprovalRequest, context: Context
    ) -> approval_pb2.GetApprovalResponse:
        try:
            approval = await self.manager.get(current_principal(), request.approval_id)
        except Exception as exc:
            await _fail(context, "GetApproval", exc)
        return approval_pb2.GetApprovalResponse(approval=wire.approval_to_proto(approval))

    async def ListApprovals(
        self, request: approval_pb2.ListApprovalsRequest, context: Context
    ) -> approval_pb2.ListApprovalsResponse:
        try:
            where = ListFilter(
                state=wire.state_from_value(request.state),
                workflow_id=request.workflow_id,
                required_role=request.required_role,
                requester=request.requester,
            )
            page = await self.manager.list_approvals(
                current_principal(), where, request.page_size, request.page_token
            )
        except Exception as exc:
            await _fail(context, "ListApprovals", exc)
        return approval_pb2.ListApprovalsResponse(
            approvals=[wire.approval_to_proto(a) for a in page.approvals],
            next_page_token=page.next_page_token,
        )

    async def RespondApproval(
        self, request: approval_pb2.RespondApprovalRequest, context: Context
    ) -> approval_pb2.RespondApprovalResponse:
        try:
            approval = await self.manager.respond(
                current_principal(),
                request.approval_id,
                request.subject_hash,
                request.approved,
                request.reason,
                request.request_id,
            )
        except Exception as exc:
            await _fail(context, "RespondApproval", exc)
        return approval_pb2.RespondApprovalResponse(approval=wire.approval_to_proto(approval))

    async def WatchApproval(
        self, request: approval_pb2.WatchApprovalRequest, context: Context
    ) -> AsyncIterator[approval_pb2.WatchApprovalResponse]:
        try:
            async for approval in self.manager.watch(current_principal(), request.approval_id):
                yield approval_pb2.WatchApprovalResponse(approval=wire.approval_to_proto(approval))
        except Exception as exc:
            await _fail(context, "WatchApproval", exc)

    async def CancelApproval(
        self, request: approval_pb2.CancelApprovalRequest, context: Context
    ) -> approval_pb2.CancelApprovalResponse:
        try:
            approval = await self.manager.cancel(
                current_principal(), request.approval_id, request.reason, request.request_id
            )
        except Exception as exc:
            await _fail(context, "CancelApproval", exc)
        return approval_pb2.CancelApprovalResponse(approval=wire.approval_to_proto(approval))

    async def ConsumeApproval(
        self, request: approval_pb2.ConsumeApprovalRequest, context: Context
    ) -> approval_pb2.ConsumeApprovalResponse:
        try:
            approval = await self.manager.consume(
                current_principal(), request.approval_id, request.subject_hash, request.request_id
            )
        except Exception as exc:
            await _fail(context, "ConsumeApproval", exc)
        return approval_pb2.ConsumeApprovalResponse(approval=wire.approval_to_proto(approval))

    async def GetSigningKey(
        self, request: approval_pb2.GetSigningKeyRequest, context: Context
    ) -> approval_pb2.GetSigningKeyResponse:
        key_id, public_key = self.manager.signing_key()
        return approval_pb2.GetSigningKeyResponse(key_id=key_id, public_key=public_key)
