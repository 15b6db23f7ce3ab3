"""Run the llm_gateway service alone: `python -m llm_gateway`."""

from cabincrew.cli.main import run_single_service

if __name__ == "__main__":
    run_single_service("llm_gateway")
