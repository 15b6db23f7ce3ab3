"""Wiring: builds the McpGatewayService servicer from config."""

from __future__ import annotations

from cabincrew.runtime.context import ServiceContext, ServiceHandle
from cabincrew.runtime.handle import GrpcServiceHandle
from cabincrew.v1 import mcp_gateway_pb2_grpc
from mcp_gateway.service import McpGatewayServiceServicer

GRPC_SERVICE_NAME = "cabincrew.v1.McpGatewayService"


async def build(context: ServiceContext) -> ServiceHandle:
    """Create the service handle for the runtime."""
    return GrpcServiceHandle(
        "mcp_gateway",
        GRPC_SERVICE_NAME,
        McpGatewayServiceServicer(),  # type: ignore[abstract]
        mcp_gateway_pb2_grpc.add_McpGatewayServiceServicer_to_server,
    )
