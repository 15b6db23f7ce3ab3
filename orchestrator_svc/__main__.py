"""Run the orchestrator service alone: `python -m orchestrator_svc`."""

from cabincrew.cli.main import run_single_service

if __name__ == "__main__":
    run_single_service("orchestrator")
