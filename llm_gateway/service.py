"""gRPC handlers of LlmGatewayService; every RPC answers UNIMPLEMENTED until its issue lands."""

from __future__ import annotations

from cabincrew.v1 import llm_gateway_pb2_grpc


class LlmGatewayServiceServicer(llm_gateway_pb2_grpc.LlmGatewayServiceServicer):
    """The generated base answers UNIMPLEMENTED for every RPC."""
