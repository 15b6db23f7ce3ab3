"""The POSIX sh noop engine keeps the engine contract, and the Python noop's artifacts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.engines.harness import (
    ENGINE_OUTPUT,
    ENGINE_TIMEOUT_SECONDS,
    ENGINES,
    Sandbox,
    check_artifacts,
    parse_single_json,
)

ENGINE = ENGINES / "noop-sh" / "engine.sh"


def run_sh(
    sandbox: Sandbox, mode: str, artifacts: Path, payload: bytes | None = None, *args: str
) -> tuple[int, dict[str, Any]]:
    """Launch the sh engine as the runner does; check its receipt and artifacts."""
    if payload is None:
        payload = json.dumps(sandbox.request(mode, {})).encode()
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "CABINCREW_WORKSPACE": str(sandbox.workspace),
        "CABINCREW_ARTIFACTS_DIR": str(artifacts),
        "CABINCREW_TEMP_DIR": str(sandbox.temp),
        "CABINCREW_MODE": mode,
    }
    completed = subprocess.run(
        [str(ENGINE), *(args or ("--mode", mode))],
        input=payload,
        capture_output=True,
        env=env,
        timeout=ENGINE_TIMEOUT_SECONDS,
        check=False,
    )
    receipt = parse_single_json(completed.stdout.decode())
    ENGINE_OUTPUT.validate(receipt)
    assert (completed.returncode == 0) == (receipt["status"] == "success")
    check_artifacts(artifacts, receipt)
    return completed.returncode, receipt


def test_flight_plan_writes_the_same_evidence_artifact_as_the_python_noop(
    sandbox: Sandbox,
) -> None:
    artifacts = sandbox.fresh_artifacts_dir()
    python_artifacts = sandbox.fresh_artifacts_dir()

    code, receipt = run_sh(sandbox, "flight-plan", artifacts)
    sandbox.run("noop", "flight-plan", {}, python_artifacts)

    assert code == 0
    assert [entry["name"] for entry in receipt["artifacts"]] == ["noop"]
    assert receipt["artifacts"][0]["role"] == "evidence"
    ours = (artifacts / "noop" / "artifact.json").read_text()
    theirs = (python_artifacts / "noop" / "artifact.json").read_text()
    assert ours == theirs.replace('"cabincrew.noop"', '"cabincrew.noop-sh"')


def test_take_off_echoes_the_expected_plan_token(sandbox: Sandbox) -> None:
    code, receipt = run_sh(sandbox, "take-off", sandbox.fresh_artifacts_dir())

    assert code == 0
    assert receipt["plan_token"] == sandbox.request("take-off", {})["expected_plan_token"]
    assert [entry["name"] for entry in receipt["artifacts"]] == ["noop-take-off"]


def test_take_off_without_a_plan_token_is_invalid_input(sandbox: Sandbox) -> None:
    request = sandbox.request("flight-plan", {})
    request["mode"] = "take-off"
    code, receipt = run_sh(
        sandbox, "take-off", sandbox.fresh_artifacts_dir(), json.dumps(request).encode()
    )

    assert code == 2
    assert receipt["diagnostics"]["error_code"] == "invalid_input"


@pytest.mark.parametrize("payload", [b"", b"not json", b'{"protocol_version": "1"}'])
def test_unusable_input_gets_a_failure_receipt_and_exit_2(sandbox: Sandbox, payload: bytes) -> None:
    code, receipt = run_sh(sandbox, "flight-plan", sandbox.fresh_artifacts_dir(), payload)

    assert code == 2
    assert receipt["diagnostics"]["error_code"] == "invalid_input"


def test_bad_arguments_get_a_failure_receipt_and_exit_2(sandbox: Sandbox) -> None:
    code, receipt = run_sh(
        sandbox, "flight-plan", sandbox.fresh_artifacts_dir(), b"{}", "--mode", "land"
    )

    assert code == 2
    assert receipt["diagnostics"]["error_code"] == "invalid_arguments"


def test_an_existing_artifact_is_never_overwritten(sandbox: Sandbox) -> None:
    artifacts = sandbox.fresh_artifacts_dir()
    (artifacts / "noop").mkdir()
    (artifacts / "noop" / "artifact.json").write_text(
        '{"action": "x", "artifact_type": "y", "mime": "z"}'
    )

    code, receipt = run_sh(sandbox, "flight-plan", artifacts)

    assert code == 1
    assert receipt["diagnostics"]["error_code"] == "artifact_conflict"
