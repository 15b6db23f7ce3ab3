"""The noop engine, and through it the contract every engine shares (input, env, receipt)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from tests.engines.harness import (
    ENGINE_OUTPUT,
    ENGINE_TIMEOUT_SECONDS,
    Sandbox,
    engine_path,
    parse_single_json,
)

ENGINE = "noop"


def test_flight_plan_writes_one_inline_evidence_artifact_hashed_over_artifact_json(
    sandbox: Sandbox,
) -> None:
    artifacts = sandbox.fresh_artifacts_dir()

    result = sandbox.run(ENGINE, "flight-plan", {}, artifacts)

    assert result.returncode == 0
    assert result.receipt["engine_id"] == "cabincrew.noop"
    entry = result.artifact("noop")
    assert entry["role"] == "evidence"
    raw = (artifacts / "noop" / "artifact.json").read_bytes()
    assert entry["hash"] == hashlib.sha256(raw).hexdigest()
    assert json.loads(raw)["body"]["workflow_id"] == "wf-test"


def test_receipt_is_deterministic_for_the_same_invocation(sandbox: Sandbox) -> None:
    first = sandbox.run(ENGINE, "flight-plan", {}, sandbox.fresh_artifacts_dir())
    second = sandbox.run(ENGINE, "flight-plan", {}, sandbox.fresh_artifacts_dir())

    assert first.stdout == second.stdout


def test_take_off_echoes_the_expected_plan_token(sandbox: Sandbox) -> None:
    result = sandbox.run(ENGINE, "take-off", {}, sandbox.fresh_artifacts_dir())

    assert result.returncode == 0
    assert result.receipt["plan_token"] == sandbox.request("take-off", {})["expected_plan_token"]


def test_requested_failure_exits_1(sandbox: Sandbox) -> None:
    result = sandbox.run(ENGINE, "flight-plan", {"fail": True}, sandbox.fresh_artifacts_dir())

    assert result.returncode == 1
    assert result.error_code == "requested_failure"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[]",
        b'{"protocol_version": "1", "mode": "flight-plan"}',
        b'{"protocol_version": "999", "mode": "flight-plan", '
        b'"meta": {"workflow_id": "w", "step_id": "s"}}',
        b'{"protocol_version": "1", "mode": "take-off", '
        b'"meta": {"workflow_id": "w", "step_id": "s"}}',
        b'{"protocol_version": "1", "mode": "flight-plan", "surprise": 1, '
        b'"meta": {"workflow_id": "w", "step_id": "s"}}',
    ],
)
def test_invalid_input_gets_a_failure_receipt_and_exit_2(sandbox: Sandbox, payload: bytes) -> None:
    result = sandbox.run(
        ENGINE, "flight-plan", {}, sandbox.fresh_artifacts_dir(), raw_input=payload
    )

    assert result.returncode == 2
    assert result.error_code == "invalid_input"


def test_unknown_config_keys_exit_2(sandbox: Sandbox) -> None:
    result = sandbox.run(ENGINE, "flight-plan", {"bogus": 1}, sandbox.fresh_artifacts_dir())

    assert result.returncode == 2
    assert result.error_code == "invalid_config"


def test_flight_plan_refuses_an_artifacts_dir_that_is_not_empty(sandbox: Sandbox) -> None:
    artifacts = sandbox.fresh_artifacts_dir()
    (artifacts / "stale").mkdir()
    stale = {"artifact_type": "x", "action": "none", "mime": "application/json"}
    (artifacts / "stale" / "artifact.json").write_text(json.dumps(stale))

    result = sandbox.run(ENGINE, "flight-plan", {}, artifacts)

    assert result.returncode == 2
    assert result.error_code == "invalid_environment"


def test_an_artifacts_dir_inside_the_workspace_is_refused(sandbox: Sandbox) -> None:
    artifacts = sandbox.workspace / "artifacts"
    artifacts.mkdir()

    result = sandbox.run(ENGINE, "flight-plan", {}, artifacts)

    assert result.returncode == 2
    assert result.error_code == "invalid_environment"
    assert list(artifacts.iterdir()) == []


def test_a_mode_that_disagrees_with_cabincrew_mode_is_refused(sandbox: Sandbox) -> None:
    result = sandbox.run(
        ENGINE,
        "flight-plan",
        {},
        sandbox.fresh_artifacts_dir(),
        extra_env={"CABINCREW_MODE": "take-off"},
    )

    assert result.returncode == 2
    assert result.error_code == "invalid_environment"


@pytest.mark.parametrize("argv", [[], ["--mode"], ["--mode", "land"], ["--verbose"]])
def test_bad_arguments_still_produce_a_valid_receipt_and_exit_2(
    sandbox: Sandbox, argv: list[str]
) -> None:
    completed = subprocess.run(
        [sys.executable, str(engine_path(ENGINE)), *argv],
        input=b"{}",
        capture_output=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=ENGINE_TIMEOUT_SECONDS,
        check=False,
    )

    receipt = parse_single_json(completed.stdout.decode())
    ENGINE_OUTPUT.validate(receipt)
    assert completed.returncode == 2
    assert receipt["diagnostics"]["error_code"] == "invalid_arguments"
