"""McpGatewayService: governance in front of agents' MCP tool calls."""
