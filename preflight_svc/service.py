"""gRPC handlers of PreflightService: protobuf in, domain calls, protobuf out.

A decision is always a result (deny included); statuses are for bad input
(INVALID_ARGUMENT with field violations), unknown or unavailable models in ``Classify``
(NOT_FOUND, FAILED_PRECONDITION), back-pressure (RESOURCE_EXHAUSTED), a refused reload
(FAILED_PRECONDITION), a reload by a caller without the ``operator`` role
(PERMISSION_DENIED) and an audit outbox that cannot be written (UNAVAILABLE: the caller
must not act on a decision that left no trace). ``_status`` is the one mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from cabincrew.emitter import EmitError
from cabincrew.errors import (
    CabinCrewError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    to_status,
)
from cabincrew.runtime.context import current_principal
from cabincrew.v1 import preflight_pb2, preflight_pb2_grpc
from preflight_svc import wire
from preflight_svc.errors import PreflightError
from preflight_svc.governance import Governance, GovernanceLoadError
from preflight_svc.onnx_errors import (
    BatcherClosed,
    ModelOverloaded,
    ModelUnavailable,
    UnknownModel,
)
from preflight_svc.pipeline import InvalidRequest, Preflight

log = logging.getLogger("cabincrew.preflight")

Context = grpc.aio.ServicerContext[Any, Any]

# Changing the rules every decision is made by is an operator's act (admin holds every role).
RELOAD_ROLE = "operator"


class PreflightServiceServicer(preflight_pb2_grpc.PreflightServiceServicer):
    """PreflightService over one ``Preflight``."""

    def __init__(self, preflight: Preflight, loader: Callable[[], Governance]) -> None:
        self._preflight = preflight
        self._loader = loader

    async def Evaluate(
        self, request: preflight_pb2.EvaluateRequest, context: Context
    ) -> preflight_pb2.EvaluateResponse:
        try:
            verdict = await self._preflight.evaluate_step(wire.step_request(request))
        except Exception as exc:
            await _abort(context, exc)
        return preflight_pb2.EvaluateResponse(result=wire.result_message(verdict))

    async def EvaluateContent(
        self, request: preflight_pb2.EvaluateContentRequest, context: Context
    ) -> preflight_pb2.EvaluateContentResponse:
        try:
            verdict = await self._preflight.evaluate_content(wire.content_request(request))
        except Exception as exc:
            await _abort(context, exc)
        return preflight_pb2.EvaluateContentResponse(result=wire.result_message(verdict))

    async def Classify(
        self, request: preflight_pb2.ClassifyRequest, context: Context
    ) -> preflight_pb2.ClassifyResponse:
        try:
            model, texts = wire.classify_request(request)
            result = await self._preflight.classify(model, texts)
        except Exception as exc:
            await _abort(context, exc)
        return wire.classify_message(result)

    async def GetGovernance(
        self, request: preflight_pb2.GetGovernanceRequest, context: Context
    ) -> preflight_pb2.GetGovernanceResponse:
        return wire.governance_message(self._preflight.governance)

    async def Reload(
        self, request: preflight_pb2.ReloadRequest, context: Context
    ) -> preflight_pb2.ReloadResponse:
        try:
            principal = current_principal()
            if not principal.has_role(RELOAD_ROLE):
                raise PermissionDenied(
                    f"{principal.name} may not reload governance; it needs role {RELOAD_ROLE!r}"
                )
            governance, changed = await self._preflight.reload(self._loader)
        except Exception as exc:
            await _abort(context, exc)
        return preflight_pb2.ReloadResponse(
            governance=wire.governance_message(governance), changed=changed
        )


async def _abort(context: Context, exc: Exception) -> NoReturn:
    await context.abort_with_status(to_status(_status(exc)))
    raise AssertionError("unreachable")


def _status(exc: Exception) -> CabinCrewError:
    """The one mapping from what the domain raises to a wire status."""
    if isinstance(exc, InvalidRequest):
        return InvalidArgument(exc.message, exc.violations)
    if isinstance(exc, UnknownModel):
        return NotFound(exc.message)
    if isinstance(exc, ModelUnavailable):
        return FailedPrecondition(exc.message, "MODEL_UNAVAILABLE", exc.name)
    if isinstance(exc, ModelOverloaded):
        return ResourceExhausted(exc.message, retry_after=0.05)
    if isinstance(exc, BatcherClosed):
        return Unavailable("preflight is shutting down")
    if isinstance(exc, GovernanceLoadError):
        return FailedPrecondition(str(exc), "GOVERNANCE", "reload")
    if isinstance(exc, EmitError):
        # No decision without its audit trail.
        return Unavailable("the audit outbox cannot be written; no decision was given")
    if isinstance(exc, CabinCrewError):
        return exc
    if isinstance(exc, PreflightError):
        log.error("preflight error: %s (%s)", exc, exc.remedy())
    else:
        log.exception("unexpected failure in preflight", exc_info=exc)
    return CabinCrewError("internal error in preflight (see its logs); no decision was given")
