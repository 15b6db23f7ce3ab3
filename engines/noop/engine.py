#!/usr/bin/env python3
"""CabinCrew noop engine: changes nothing and reports one small evidence artifact."""

from __future__ import annotations

import os
import sys

# The shared helper ships beside the engines; no bytecode is written next to it.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), os.pardir, "_lib"))

import enginekit as kit  # noqa: E402

ENGINE_ID = "cabincrew.noop"


def _check_config(run: kit.Run) -> bool:
    """Validate the config and return whether the run should fail on purpose."""
    config = run.config
    unknown = sorted(set(config) - {"fail"})
    if unknown:
        raise kit.ValidationError("invalid_config", f"unknown config keys: {', '.join(unknown)}")
    fail = config.get("fail", False)
    if not isinstance(fail, bool):
        raise kit.ValidationError("invalid_config", "fail must be a boolean")
    return fail


def handle(run: kit.Run) -> None:
    """Write the single evidence artifact, then fail if the config asks for it."""
    fail = _check_config(run)
    meta = run.request["meta"]
    # A distinct name at take-off keeps it apart from anything restored from the plan.
    name = "noop" if run.mode == "flight-plan" else "noop-take-off"
    run.write_artifact(
        name,
        "evidence",
        artifact_type="noop",
        action="none",
        mime="application/json",
        body={
            "engine_id": ENGINE_ID,
            "mode": run.mode,
            "workflow_id": meta["workflow_id"],
            "step_id": meta["step_id"],
        },
    )
    if fail:
        raise kit.EngineError("requested_failure", "failure requested by config")


if __name__ == "__main__":
    sys.exit(kit.main(ENGINE_ID, {"flight-plan": handle, "take-off": handle}))
