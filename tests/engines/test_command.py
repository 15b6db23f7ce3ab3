"""The command engine, run as a subprocess: record the script, then run exactly that script."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.engines.harness import EngineRun, Sandbox, snapshot

ENGINE = "command"
SECRET = "s3cr3t-value-Zq81"


def plan(sandbox: Sandbox, config: dict[str, Any], **extra: Any) -> tuple[Path, EngineRun]:
    """Run flight-plan into a fresh artifacts dir."""
    artifacts = sandbox.fresh_artifacts_dir()
    return artifacts, sandbox.run(ENGINE, "flight-plan", config, artifacts, **extra)


def plan_and_run(
    sandbox: Sandbox, config: dict[str, Any], **extra: Any
) -> tuple[EngineRun, dict[str, Any]]:
    """Plan, then take off with the restored state; return the receipt and the output log."""
    plan_dir, planned = plan(sandbox, config, **extra)
    assert planned.returncode == 0
    artifacts = sandbox.carry_state(plan_dir, planned)
    result = sandbox.run(ENGINE, "take-off", config, artifacts, **extra)
    log = json.loads((artifacts / "output" / "body.data").read_text())
    return result, log


def test_flight_plan_records_the_script_without_running_it(sandbox: Sandbox) -> None:
    script = "echo ran > ran.txt\n"
    before = snapshot(sandbox.workspace)

    artifacts, result = plan(sandbox, {"script": script})

    assert result.returncode == 0
    assert snapshot(sandbox.workspace) == before
    roles = {entry["name"]: entry["role"] for entry in result.receipt["artifacts"]}
    assert roles == {"script": "state", "script-review": "evidence"}
    for name in roles:
        document = json.loads((artifacts / name / "artifact.json").read_text())
        assert (document["artifact_type"], document["action"]) == ("script", "execute")
        assert document["mime"] == "text/x-shellscript"
        assert document["metadata"]["shell"] == "/bin/sh"
        assert (artifacts / name / "body.data").read_text() == script


def test_take_off_runs_the_planned_script_not_the_config(sandbox: Sandbox) -> None:
    plan_dir, planned = plan(sandbox, {"script": "echo planned > which.txt\n"})
    artifacts = sandbox.carry_state(plan_dir, planned)

    result = sandbox.run(
        ENGINE, "take-off", {"script": "echo substituted > which.txt\n"}, artifacts
    )

    assert result.returncode == 0
    assert (sandbox.workspace / "which.txt").read_text() == "planned\n"


def test_take_off_runs_in_the_workspace_and_logs_its_output(sandbox: Sandbox) -> None:
    config = {"script": 'pwd; echo "to stderr" >&2; echo "$GREETING"', "env": {"GREETING": "hi"}}

    result, log = plan_and_run(sandbox, config)

    assert result.returncode == 0
    assert result.receipt["artifacts"][0]["role"] == "log"
    assert log["stdout"] == f"{sandbox.workspace}\nhi\n"
    assert log["stderr"] == "to stderr\n"
    assert (log["exit_code"], log["timed_out"]) == (0, False)


def test_failing_script_exits_1_and_still_logs_its_output(sandbox: Sandbox) -> None:
    result, log = plan_and_run(sandbox, {"script": "echo oops >&2\nexit 3\n"})

    assert result.returncode == 1
    assert result.error_code == "script_failed"
    assert result.receipt["diagnostics"]["exit_code"] == 3
    assert log["exit_code"] == 3
    assert log["stderr"] == "oops\n"


def test_script_that_outlives_its_timeout_is_killed_with_exit_1(sandbox: Sandbox) -> None:
    config = {"script": "echo started\nsleep 30 &\nsleep 30\n", "timeout_seconds": 0.2}

    result, log = plan_and_run(sandbox, config)

    assert result.returncode == 1
    assert result.error_code == "script_timeout"
    assert log["timed_out"] is True
    assert log["stdout"] == "started\n"


def test_secrets_are_exported_but_never_appear_in_receipt_log_or_stderr(sandbox: Sandbox) -> None:
    config = {
        "script": (
            'printf %s "$TOKEN" > token.txt\n'
            'printf %s "${UNMAPPED:-unset}" > unmapped.txt\n'
            'echo "token=$TOKEN"\necho "$TOKEN" >&2\nexit 4\n'
        )
    }
    extra = {
        "secrets": {"TOKEN": SECRET, "UNMAPPED": "other-secret-9"},
        "allowed_secrets": ["TOKEN"],
    }

    result, log = plan_and_run(sandbox, config, **extra)

    assert (sandbox.workspace / "token.txt").read_text() == SECRET
    assert (sandbox.workspace / "unmapped.txt").read_text() == "unset"
    assert result.returncode == 1
    assert SECRET not in result.stdout
    assert SECRET not in result.stderr
    assert "other-secret-9" not in result.stdout
    assert SECRET not in json.dumps(log)
    assert log["stdout"] == "token=[REDACTED]\n"
    assert log["redactions"] == 2


def test_secret_names_not_in_the_plan_are_not_exported(sandbox: Sandbox) -> None:
    config = {"script": 'printf %s "${LATE:-unset}" > late.txt\n'}
    plan_dir, planned = plan(sandbox, config)
    artifacts = sandbox.carry_state(plan_dir, planned)

    result = sandbox.run(
        ENGINE, "take-off", config, artifacts, secrets={"LATE": SECRET}, allowed_secrets=["LATE"]
    )

    assert result.returncode == 0
    assert (sandbox.workspace / "late.txt").read_text() == "unset"
    assert SECRET not in result.stdout


def test_engine_environment_does_not_leak_into_the_script(sandbox: Sandbox) -> None:
    config = {"script": 'printf %s "${ENGINE_ONLY:-absent}"\n'}
    plan_dir, planned = plan(sandbox, config)
    artifacts = sandbox.carry_state(plan_dir, planned)

    result = sandbox.run(ENGINE, "take-off", config, artifacts, extra_env={"ENGINE_ONLY": "leaked"})

    assert result.returncode == 0
    assert json.loads((artifacts / "output" / "body.data").read_text())["stdout"] == "absent"


def test_script_runs_under_the_recorded_resource_limits(sandbox: Sandbox) -> None:
    plan_dir, planned = plan(sandbox, {"script": "ulimit -n\nulimit -t\n", "timeout_seconds": 5})
    limits = json.loads((plan_dir / "script" / "artifact.json").read_text())["metadata"]["limits"]
    artifacts = sandbox.carry_state(plan_dir, planned)

    result = sandbox.run(ENGINE, "take-off", {}, artifacts)

    assert result.returncode == 0
    stdout = json.loads((artifacts / "output" / "body.data").read_text())["stdout"]
    assert stdout.split() == [str(limits["open_files"]), str(limits["cpu_seconds"])]


def test_output_beyond_the_cap_is_counted_and_dropped(sandbox: Sandbox) -> None:
    result, log = plan_and_run(sandbox, {"script": "head -c 3000000 /dev/zero | tr '\\0' a\n"})

    assert result.returncode == 0
    assert log["stdout_bytes"] == 3_000_000
    assert log["stdout_truncated"] is True
    assert len(log["stdout"]) == 1024 * 1024


def test_stdout_holds_exactly_one_json_document_even_when_the_script_is_chatty(
    sandbox: Sandbox,
) -> None:
    result, _ = plan_and_run(sandbox, {"script": 'echo "{\\"status\\": \\"success\\"}"\necho x'})

    assert result.returncode == 0
    assert result.stdout.count("\n") == 1


def test_a_tampered_state_script_is_refused(sandbox: Sandbox) -> None:
    plan_dir, planned = plan(sandbox, {"script": "echo fine\n"})
    artifacts = sandbox.carry_state(plan_dir, planned)
    (artifacts / "script" / "body.data").write_text("touch pwned\n")

    result = sandbox.run(ENGINE, "take-off", {}, artifacts)

    assert result.returncode == 2
    assert result.error_code == "state_invalid"
    assert not (sandbox.workspace / "pwned").exists()


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"script": ""},
        {"script": "true", "shell": "sh"},
        {"script": "true", "shell": "/bin/../bin/sh"},
        {"script": "true", "shell": "/nonexistent/shell"},
        {"script": "true", "timeout_seconds": 0},
        {"script": "true", "timeout_seconds": True},
        {"script": "true", "env": {"OK": 1}},
        {"script": "true", "env": {"BAD-NAME": "x"}},
        {"script": "true", "bogus": 1},
    ],
)
def test_invalid_config_is_refused_with_exit_2(sandbox: Sandbox, config: dict[str, Any]) -> None:
    _, result = plan(sandbox, config)

    assert result.returncode == 2
    assert result.error_code == "invalid_config"
    assert result.receipt["artifacts"] == []
