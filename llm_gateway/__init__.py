"""LlmGatewayService: governance in front of agents' LLM calls."""
