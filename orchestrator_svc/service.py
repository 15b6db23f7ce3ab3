"""gRPC handlers of OrchestratorService: protobuf in, a manager call, protobuf out.

The caller is always ``current_principal()``. Domain errors become gRPC status through
``cabincrew.errors.to_status`` (the one mapping); anything unexpected becomes INTERNAL
without internal text. A failed workflow is a successful RPC whose workflow says FAILED.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Never

import grpc

from cabincrew.errors import CabinCrewError, to_status
from cabincrew.runtime.context import current_principal
from cabincrew.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator_svc import wire
from orchestrator_svc.manager import OrchestratorManager
from orchestrator_svc.store import ListFilter

log = logging.getLogger("orchestrator_svc.service")

Context = grpc.aio.ServicerContext[Any, Any]


async def _fail(context: Context, method: str, exc: Exception) -> Never:
    """End the call with the status of ``exc``: domain errors mapped, the rest INTERNAL."""
    if isinstance(exc, CabinCrewError):
        await context.abort_with_status(to_status(exc))
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    log.error("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


class OrchestratorServiceServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Thin handlers over ``OrchestratorManager``."""

    def __init__(self, manager: OrchestratorManager) -> None:
        self.manager = manager

    async def SubmitWorkflow(
        self, request: orchestrator_pb2.SubmitWorkflowRequest, context: Context
    ) -> orchestrator_pb2.SubmitWorkflowResponse:
        try:
            row = await self.manager.submit(
                current_principal(), wire.submission(request, request.request_id)
            )
        except Exception as exc:
            await _fail(context, "SubmitWorkflow", exc)
        return orchestrator_pb2.SubmitWorkflowResponse(workflow=wire.workflow(row))

    async def GetWorkflow(
        self, request: orchestrator_pb2.GetWorkflowRequest, context: Context
    ) -> orchestrator_pb2.GetWorkflowResponse:
        try:
            row = await self.manager.get(current_principal(), request.workflow_id)
            envelopes = await self.manager.envelopes(row)
        except Exception as exc:
            await _fail(context, "GetWorkflow", exc)
        return orchestrator_pb2.GetWorkflowResponse(workflow=wire.workflow(row, envelopes))

    async def ListWorkflows(
        self, request: orchestrator_pb2.ListWorkflowsRequest, context: Context
    ) -> orchestrator_pb2.ListWorkflowsResponse:
        try:
            where = ListFilter(state=wire.state_name(request.state), batch_id=request.batch_id)
            rows, token = await self.manager.list_workflows(
                current_principal(), where, request.page_size, request.page_token
            )
        except Exception as exc:
            await _fail(context, "ListWorkflows", exc)
        return orchestrator_pb2.ListWorkflowsResponse(
            workflows=[wire.workflow(row) for row in rows], next_page_token=token
        )

    async def WatchWorkflow(
        self, request: orchestrator_pb2.WatchWorkflowRequest, context: Context
    ) -> AsyncIterator[orchestrator_pb2.WatchWorkflowResponse]:
        try:
            async for row in self.manager.watch(current_principal(), request.workflow_id):
                yield orchestrator_pb2.WatchWorkflowResponse(workflow=wire.workflow(row))
        except Exception as exc:
            await _fail(context, "WatchWorkflow", exc)

    async def ResumeWorkflow(
        self, request: orchestrator_pb2.ResumeWorkflowRequest, context: Context
    ) -> orchestrator_pb2.ResumeWorkflowResponse:
        try:
            row = await self.manager.resume(
                current_principal(), request.workflow_id, request.retry_takeoff, request.request_id
            )
        except Exception as exc:
            await _fail(context, "ResumeWorkflow", exc)
        return orchestrator_pb2.ResumeWorkflowResponse(workflow=wire.workflow(row))

    async def CancelWorkflow(
        self, request: orchestrator_pb2.CancelWorkflowRequest, context: Context
    ) -> orchestrator_pb2.CancelWorkflowResponse:
        try:
            row = await self.manager.cancel(
                current_principal(), request.workflow_id, request.reason, request.request_id
            )
        except Exception as exc:
            await _fail(context, "CancelWorkflow", exc)
        return orchestrator_pb2.CancelWorkflowResponse(workflow=wire.workflow(row))

    async def SubmitBatch(
        self, request: orchestrator_pb2.SubmitBatchRequest, context: Context
    ) -> orchestrator_pb2.SubmitBatchResponse:
        try:
            items = [wire.submission(item) for item in request.items]
            document, done, created = await self.manager.submit_batch(
                current_principal(),
                request.request_id,
                items,
                request.max_concurrent,
                wire.POLICIES.get(request.failure_policy, ""),
            )
        except Exception as exc:
            await _fail(context, "SubmitBatch", exc)
        return orchestrator_pb2.SubmitBatchResponse(batch=wire.batch(document, done, created))

    async def GetBatch(
        self, request: orchestrator_pb2.GetBatchRequest, context: Context
    ) -> orchestrator_pb2.GetBatchResponse:
        try:
            document, done, created = await self.manager.get_batch(
                current_principal(), request.batch_id
            )
        except Exception as exc:
            await _fail(context, "GetBatch", exc)
        return orchestrator_pb2.GetBatchResponse(batch=wire.batch(document, done, created))

    async def GetTimeline(
        self, request: orchestrator_pb2.GetTimelineRequest, context: Context
    ) -> orchestrator_pb2.GetTimelineResponse:
        try:
            result = await self.manager.timeline(current_principal(), request.workflow_id)
        except Exception as exc:
            await _fail(context, "GetTimeline", exc)
        return wire.timeline(result)
