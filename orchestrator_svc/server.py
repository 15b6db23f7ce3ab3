"""Wiring: builds the OrchestratorService servicer from config."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from cabincrew.clients import AuditClient
from cabincrew.config import ConfigError
from cabincrew.emitter import AuditEmitter
from cabincrew.errors import Violation
from cabincrew.runtime.context import ServiceContext, ServiceHandle
from cabincrew.runtime.handle import GrpcServiceHandle
from cabincrew.v1 import audit_pb2, orchestrator_pb2_grpc
from orchestrator_svc.artifacts import ArtifactLimits, ArtifactStore
from orchestrator_svc.manager import ManagerSettings, OrchestratorManager, owner_id
from orchestrator_svc.model import State
from orchestrator_svc.peers import ApprovalPeer, PreflightPeer, ServiceToken, service_channel
from orchestrator_svc.scheduler import EngineContext, Settings
from orchestrator_svc.service import OrchestratorServiceServicer
from orchestrator_svc.store import WorkflowStore

GRPC_SERVICE_NAME = "cabincrew.v1.OrchestratorService"

log = logging.getLogger("orchestrator_svc.server")


def _environment_secret(name: str) -> str | None:
    # Secrets mapped to steps are read from this process's environment when a step runs,
    # so they can be rotated without a restart and are never stored.
    return os.environ.get(name)


def _unsafe_crash_after_state(name: str) -> State | None:
    """Validate the crash-test hook; when set, say so loudly: it kills this process."""
    if not name:
        return None
    try:
        state = State(name)
    except ValueError:
        where = "orchestrator.unsafe_crash_after_state"
        raise ConfigError(
            f"{where}: not a state name",
            [Violation(where, "one of " + ", ".join(s.value for s in State))],
        ) from None
    log.warning(
        "UNSAFE: orchestrator.unsafe_crash_after_state=%s: this process will SIGKILL itself "
        "once a workflow reaches that state. For crash tests only; never in production.",
        state.value,
    )
    return state


async def build(
    context: ServiceContext,
    *,
    schema: str | None = None,
    emitter: AuditEmitter | None = None,
    secrets: Callable[[str], str | None] | None = None,
    kill_grace_seconds: float = 5.0,
    artifact_limits: ArtifactLimits | None = None,
) -> ServiceHandle:
    """Create the service handle for the runtime.

    The keyword arguments exist for tests and embedders: the PostgreSQL schema (default
    ``orchestrator``), an emitter, where secrets come from, the engines' kill grace and the
    artifact limits.
    """
    config = context.config
    settings = config.orchestrator
    crash_after = _unsafe_crash_after_state(settings.unsafe_crash_after_state)
    service_dir = context.service_dir("orchestrator")
    store = WorkflowStore(config.database_url("orchestrator"), schema=schema)
    try:
        await asyncio.to_thread(store.migrate)
    except BaseException:
        store.close()
        raise
    if settings.workspaces_dir:
        # Shared storage in a scale-out deployment: workspaces and the artifact store must be
        # reachable by every replica that may take a workflow over.
        workspaces = Path(settings.workspaces_dir)
        artifacts_root = workspaces / ".artifacts"
    else:
        workspaces = service_dir / "workspaces"
        artifacts_root = service_dir / "artifacts"
    workspaces.mkdir(parents=True, exist_ok=True)
    token = ServiceToken(config)
    deadline = config.clients.deadline_seconds
    tls = config.clients.tls_ca_file
    preflight = PreflightPeer(
        service_channel(context.address_of("preflight"), token, tls), deadline
    )
    approvals = ApprovalPeer(service_channel(context.address_of("approval"), token, tls), deadline)
    audit_client = AuditClient(service_channel(context.address_of("audit"), token, tls), deadline)
    if emitter is None:
        from cabincrew.emitter import emitter_for

        emitter = emitter_for(context, "orchestrator")

    async def audit_ids(workflow_id: str) -> set[str]:
        request = audit_pb2.QueryEventsRequest(
            filter=audit_pb2.EventFilter(
                workflow_id=workflow_id, event_type_prefix="orchestrator."
            ),
            page_size=1000,
        )
        found: set[str] = set()
        async for page in audit_client.query(request):
            found.update(entry.event.event_id for entry in page.entries)
        return found

    sqlite = store.sqlite
    engine_context = EngineContext(
        governance=preflight,
        approvals=approvals,
        artifacts=ArtifactStore(artifacts_root),
        signer=context.signer("orchestrator"),
        secrets=secrets or _environment_secret,
        settings=Settings(
            workspaces_dir=workspaces,
            runs_dir=service_dir / "runs",
            logs_dir=service_dir / "logs",
            max_parallel_steps=settings.max_parallel_steps,
            kill_grace_seconds=kill_grace_seconds,
            artifact_limits=artifact_limits or ArtifactLimits(),
        ),
        plan_tokens=lambda workflow_id, step_id, token: manager.plan_token(
            workflow_id, step_id, token
        ),
    )
    manager = OrchestratorManager(
        store,
        engine_context,
        emitter,
        ManagerSettings(
            owner=owner_id(),
            lease_seconds=settings.lease_seconds,
            max_running=settings.max_running_workflows,
            exclusive=sqlite,
            lock_file=service_dir / "orchestrator.lock" if sqlite else None,
            unsafe_crash_after_state=crash_after,
        ),
        audit_ids=audit_ids,
    )

    async def close() -> None:
        await manager.aclose()
        for peer in (preflight, approvals, audit_client):
            await peer.aclose()

    return GrpcServiceHandle(
        "orchestrator",
        GRPC_SERVICE_NAME,
        OrchestratorServiceServicer(manager),
        orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server,
        on_start=manager.start,
        on_close=close,
        serving=manager.serving,
    )
