"""Wiring: builds the LlmGatewayService servicer from config."""

from __future__ import annotations

from cabincrew.runtime.context import ServiceContext, ServiceHandle
from cabincrew.runtime.handle import GrpcServiceHandle
from cabincrew.v1 import llm_gateway_pb2_grpc
from llm_gateway.service import LlmGatewayServiceServicer

GRPC_SERVICE_NAME = "cabincrew.v1.LlmGatewayService"


async def build(context: ServiceContext) -> ServiceHandle:
    """Create the service handle for the runtime."""
    return GrpcServiceHandle(
        "llm_gateway",
        GRPC_SERVICE_NAME,
        LlmGatewayServiceServicer(),  # type: ignore[abstract]
        llm_gateway_pb2_grpc.add_LlmGatewayServiceServicer_to_server,
    )
