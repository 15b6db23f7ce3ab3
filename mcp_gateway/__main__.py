"""Run the mcp_gateway service alone: `python -m mcp_gateway`."""

from cabincrew.cli.main import run_single_service

if __name__ == "__main__":
    run_single_service("mcp_gateway")
