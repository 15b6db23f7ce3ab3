"""Wiring: builds the AuditService servicer from config."""

from __future__ import annotations

import asyncio

from audit_svc.log import AuditLog, LogOptions
from audit_svc.service import AuditServiceServicer
from audit_svc.store import SqlAuditStore
from cabincrew.config import ConfigError
from cabincrew.runtime.context import ServiceContext, ServiceHandle
from cabincrew.runtime.handle import GrpcServiceHandle
from cabincrew.v1 import audit_pb2_grpc

GRPC_SERVICE_NAME = "cabincrew.v1.AuditService"
CHECKPOINT_KEY_PURPOSE = "audit-checkpoint"


async def build(context: ServiceContext) -> ServiceHandle:
    """Create the service handle for the runtime: options first, then storage."""
    settings = context.config.audit
    try:
        options = LogOptions(
            origin=settings.origin,
            max_queue=settings.max_queue,
            max_batch=settings.max_batch,
            checkpoint_interval_seconds=settings.checkpoint_interval_seconds,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if settings.max_event_bytes < 1024:
        raise ConfigError("audit.max_event_bytes must be at least 1024")
    signer = context.signer(CHECKPOINT_KEY_PURPOSE)
    context.service_dir("audit")
    store = await asyncio.to_thread(SqlAuditStore.open, context.config.database_url("audit"))
    log = AuditLog(store, signer, options)
    return GrpcServiceHandle(
        "audit",
        GRPC_SERVICE_NAME,
        AuditServiceServicer(log, settings.max_event_bytes),
        audit_pb2_grpc.add_AuditServiceServicer_to_server,
        on_start=log.start,
        on_close=log.aclose,
        serving=log.healthy,
    )
