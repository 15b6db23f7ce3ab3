"""The service runtime through a real server on an ephemeral loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cabincrew.clients import ChannelOptions, RPCError, open_channel
from cabincrew.runtime.context import current_principal, current_request_id
from cabincrew.runtime.handle import GrpcServiceHandle
from cabincrew.runtime.server import CabinCrewServer, create_server
from cabincrew.v1 import audit_pb2, audit_pb2_grpc
from tests.conftest import make_config, token_for

SERVICES = [
    "cabincrew.v1.AuditService",
    "cabincrew.v1.PreflightService",
    "cabincrew.v1.ApprovalService",
    "cabincrew.v1.OrchestratorService",
    "cabincrew.v1.McpGatewayService",
    "cabincrew.v1.LlmGatewayService",
]


class _EchoAudit(audit_pb2_grpc.AuditServiceServicer):
    """A fake servicer that reports who called, to test the interceptor."""

    async def VerifyLog(
        self, request: audit_pb2.VerifyLogRequest, context: object
    ) -> audit_pb2.VerifyLogResponse:
        return audit_pb2.VerifyLogResponse(
            reason=f"{current_principal().name}|{current_request_id()}"
        )


@pytest.fixture
async def server(data_dir: Path) -> AsyncIterator[CabinCrewServer]:
    app, _port = await create_server(make_config(data_dir))
    await app.start()
    try:
        yield app
    finally:
        await app.stop(0)


async def test_every_service_reports_serving(server: CabinCrewServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in [*SERVICES, ""]:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_all_six_services(server: CabinCrewServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for response in stub.ServerReflectionInfo(requests(), timeout=5):
            names = {s.name for s in response.list_services_response.service}
            break
    assert set(SERVICES) <= names


async def test_calls_without_a_token_are_unauthenticated(server: CabinCrewServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.VerifyLog(audit_pb2.VerifyLogRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_token_from_an_unknown_key_is_unauthenticated(
    server: CabinCrewServer, tmp_path: Path
) -> None:
    stranger = make_config(tmp_path / "elsewhere")
    token = token_for(stranger, "mallory", ["admin"])
    channel = open_channel(ChannelOptions(address=f"127.0.0.1:{server.port}", token=token))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await audit_pb2_grpc.AuditServiceStub(channel).VerifyLog(
                audit_pb2.VerifyLogRequest(), timeout=5
            )
    finally:
        await channel.close()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_interceptor_passes_principal_and_request_id_to_handlers(data_dir: Path) -> None:
    config = make_config(data_dir, services=("audit",))

    async def build(context: object) -> GrpcServiceHandle:
        return GrpcServiceHandle(
            "audit",
            "cabincrew.v1.AuditService",
            _EchoAudit(),
            audit_pb2_grpc.add_AuditServiceServicer_to_server,
        )

    app, port = await create_server(config, {"audit": build})  # type: ignore[dict-item]
    await app.start()
    try:
        token = token_for(config, "alice", ["auditor"])
        channel = open_channel(ChannelOptions(address=f"127.0.0.1:{port}", token=token))
        try:
            response = await audit_pb2_grpc.AuditServiceStub(channel).VerifyLog(
                audit_pb2.VerifyLogRequest(), metadata=(("x-request-id", "req-42"),), timeout=5
            )
        finally:
            await channel.close()
    finally:
        await app.stop(0)
    assert response.reason == "alice|req-42"


async def test_shutdown_reports_not_serving_and_closes_services(data_dir: Path) -> None:
    closed: list[str] = []

    async def on_close() -> None:
        closed.append("audit")

    async def build(context: object) -> GrpcServiceHandle:
        return GrpcServiceHandle(
            "audit",
            "cabincrew.v1.AuditService",
            _EchoAudit(),
            audit_pb2_grpc.add_AuditServiceServicer_to_server,
            on_close=on_close,
        )

    app, _ = await create_server(make_config(data_dir, services=("audit",)), {"audit": build})  # type: ignore[dict-item]
    await app.start()
    await app.stop(0)
    await app.stop(0)  # idempotent
    assert closed == ["audit"]
    response = await app.health.Check(health_pb2.HealthCheckRequest(service=""), None)
    assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_busy_port_is_a_clear_error(server: CabinCrewServer, data_dir: Path) -> None:
    from cabincrew.errors import Unavailable

    with pytest.raises(Unavailable):
        await create_server(
            make_config(data_dir / "x", **{"server.addr": f"127.0.0.1:{server.port}"})
        )


class _RefusingAudit(audit_pb2_grpc.AuditServiceServicer):
    """A fake servicer that refuses with field violations, as real services do."""

    async def VerifyLog(self, request: object, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        from cabincrew.errors import InvalidArgument, Violation, to_status

        await context.abort_with_status(
            to_status(InvalidArgument("bad", [Violation("x.y", "required")]))
        )


async def test_the_typed_client_wraps_wire_errors_once(data_dir: Path) -> None:
    from cabincrew.clients import AuditClient

    config = make_config(data_dir, services=("audit",))

    async def build(context: object) -> GrpcServiceHandle:
        return GrpcServiceHandle(
            "audit",
            "cabincrew.v1.AuditService",
            _RefusingAudit(),
            audit_pb2_grpc.add_AuditServiceServicer_to_server,
        )

    app, port = await create_server(config, {"audit": build})  # type: ignore[dict-item]
    await app.start()
    token = token_for(config, "alice", ["auditor"])
    client = AuditClient(open_channel(ChannelOptions(address=f"127.0.0.1:{port}", token=token)))
    try:
        with pytest.raises(RPCError) as info:
            await client.verify_log()
    finally:
        await client.aclose()
        await app.stop(0)
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert [(v.field, v.description) for v in info.value.violations] == [("x.y", "required")]


async def test_a_flood_of_unauthenticated_calls_is_audited_up_to_a_bound() -> None:
    from cabincrew.runtime.server import _RefusalRecorder

    recorded: list[tuple[str, str]] = []

    async def hook(operation: str, detail: str) -> None:
        recorded.append((operation, detail))

    refusals = _RefusalRecorder(rate_per_second=0.0, burst=2)
    refusals.hooks["/cabincrew.v1.ApprovalService/"] = hook
    for _ in range(5):
        await refusals.record("/cabincrew.v1.ApprovalService/GetApproval", "no token")
    await refusals.record("/cabincrew.v1.AuditService/Append", "no token")  # no hook there

    assert recorded == [("GetApproval", "no token")] * 2
    assert refusals.dropped == 3
