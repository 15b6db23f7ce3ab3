"""Wiring: builds the ApprovalService servicer from config."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from approval_svc.manager import ApprovalManager, Clock, WebhookSettings, utc_now
from approval_svc.service import ApprovalServiceServicer
from approval_svc.store import ApprovalStore
from approval_svc.webhook import RetryPolicy, load_secret
from cabincrew.config import ConfigError
from cabincrew.emitter import AuditEmitter
from cabincrew.errors import Violation
from cabincrew.runtime.context import ServiceContext, ServiceHandle
from cabincrew.runtime.handle import GrpcServiceHandle
from cabincrew.v1 import approval_pb2_grpc

GRPC_SERVICE_NAME = "cabincrew.v1.ApprovalService"


async def build(
    context: ServiceContext,
    *,
    clock: Clock | None = None,
    emitter: AuditEmitter | None = None,
    schema: str | None = None,
    webhook_policy: RetryPolicy | None = None,
) -> ServiceHandle:
    """Create the service handle for the runtime.

    The keyword arguments exist for tests and embedders: a controlled clock, an emitter,
    the PostgreSQL schema (default ``approval``) and the webhook retry policy.
    """
    settings = context.config.approval
    if settings.default_ttl_seconds <= 0:
        raise ConfigError(
            "approval.default_ttl_seconds: must be positive",
            [Violation("approval.default_ttl_seconds", "must be positive")],
        )
    secret = load_secret(settings)
    context.service_dir("approval")
    store = ApprovalStore(context.config.database_url("approval"), schema=schema)
    try:
        await asyncio.to_thread(store.migrate)
    except BaseException:
        store.close()
        raise
    if emitter is None:
        from cabincrew.emitter import emitter_for  # type: ignore[attr-defined,unused-ignore]

        emitter = emitter_for(context, "approval")
    manager = ApprovalManager(
        store,
        context.signer("approval"),
        emitter,
        clock=clock or utc_now,
        default_ttl=timedelta(seconds=settings.default_ttl_seconds),
        sweep_seconds=settings.sweep_interval_seconds,
        poll_seconds=settings.sweep_interval_seconds
        if settings.sweep_interval_seconds > 0
        else 5.0,
        webhook=(
            WebhookSettings(settings.webhook_url, secret, webhook_policy or RetryPolicy())
            if secret is not None
            else None
        ),
    )
    return GrpcServiceHandle(
        "approval",
        GRPC_SERVICE_NAME,
        ApprovalServiceServicer(manager),
        approval_pb2_grpc.add_ApprovalServiceServicer_to_server,
        on_start=manager.start,
        on_close=manager.aclose,
        serving=manager.serving,
        on_unauthenticated=manager.unauthenticated,
    )
