"""Run the preflight service alone: `python -m preflight_svc`."""

from cabincrew.cli.main import run_single_service

if __name__ == "__main__":
    run_single_service("preflight")
