"""gRPC handlers of McpGatewayService; every RPC answers UNIMPLEMENTED until its issue lands."""

from __future__ import annotations

from cabincrew.v1 import mcp_gateway_pb2_grpc


class McpGatewayServiceServicer(mcp_gateway_pb2_grpc.McpGatewayServiceServicer):
    """The generated base answers UNIMPLEMENTED for every RPC."""
