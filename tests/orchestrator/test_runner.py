"""The engine runner against real subprocess engines."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from cabincrew import protocol_schema
from orchestrator_svc.errors import ArtifactIntegrityError, EngineLaunchError
from orchestrator_svc.runner import (
    SAFE_PATH,
    EngineRun,
    FailureKind,
    Masker,
    Mode,
    RunLimits,
    build_engine_input,
    parse_receipt,
    run_engine,
)
from orchestrator_svc.workflow import EngineSpec
from tests.orchestrator.conftest import Dirs, noop_engine, script_engine

FAST = RunLimits(timeout_seconds=60, kill_grace_seconds=5, drain_seconds=10)


def plan_input(**kwargs: object) -> dict[str, object]:
    return build_engine_input(mode=Mode.FLIGHT_PLAN, workflow_id="wf-1", step_id="plan", **kwargs)  # type: ignore[arg-type]


async def launch(spec: EngineSpec, dirs: Dirs, **kwargs: object) -> EngineRun:
    mode = kwargs.pop("mode", Mode.FLIGHT_PLAN)
    engine_input = kwargs.pop("engine_input", None) or plan_input()
    kwargs.setdefault("limits", FAST)
    return await run_engine(
        spec,
        mode,  # type: ignore[arg-type]
        engine_input,  # type: ignore[arg-type]
        workspace=dirs.workspace,
        artifacts_dir=dirs.artifacts,
        temp_dir=dirs.temp,
        log_path=dirs.log,
        **kwargs,  # type: ignore[arg-type]
    )


def file_exists(path: str) -> bool:
    return os.path.exists(path)


def process_is_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie awaiting its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


async def test_the_noop_engine_succeeds_with_a_schema_valid_receipt(dirs: Dirs) -> None:
    run = await launch(noop_engine(), dirs)
    assert run.ok, run.failure
    assert run.exit_code == 0
    assert run.receipt is not None
    assert protocol_schema.errors("EngineOutput", dict(run.receipt)) == []
    assert run.argv[-2:] == ("--mode", "flight-plan")
    assert (dirs.artifacts / "noop" / "artifact.json").is_file()


async def test_non_json_stdout_is_a_typed_failure(dirs: Dirs) -> None:
    run = await launch(script_engine(dirs.root, 'print("hello, I am not JSON")'), dirs)
    assert run.failure is not None and run.failure.kind is FailureKind.NOT_JSON
    assert run.receipt is None


async def test_two_json_documents_on_stdout_are_refused(dirs: Dirs) -> None:
    run = await launch(script_engine(dirs.root, "receipt()\nreceipt()\n"), dirs)
    assert run.failure is not None and run.failure.kind is FailureKind.MULTIPLE_DOCUMENTS


async def test_text_after_the_receipt_is_refused(dirs: Dirs) -> None:
    run = await launch(script_engine(dirs.root, 'receipt()\nprint("done")\n'), dirs)
    assert run.failure is not None and run.failure.kind is FailureKind.NOT_JSON


async def test_empty_stdout_means_no_receipt(dirs: Dirs) -> None:
    run = await launch(script_engine(dirs.root, "pass\n"), dirs)
    assert run.failure is not None and run.failure.kind is FailureKind.NO_RECEIPT


@pytest.mark.parametrize(
    "body",
    [
        'print(json.dumps({"status": "success"}))',  # required fields missing
        "receipt(extra_field=1)",  # additionalProperties
        'receipt(status="maybe")',  # enum
        'receipt(artifacts=[{"name": "x"}])',  # EngineArtifact through a $ref
        "print(json.dumps([1, 2]))",  # not an object
        'print(\'{"a": 1, "a": 2}\')',  # duplicate keys
        "print('{\"engine_id\": NaN}')",  # not JSON
    ],
)
async def test_malformed_receipts_are_refused(dirs: Dirs, body: str) -> None:
    run = await launch(script_engine(dirs.root, body), dirs)
    assert run.failure is not None
    assert run.failure.kind in (FailureKind.INVALID_RECEIPT, FailureKind.NOT_JSON)
    assert run.receipt is None


async def test_a_receipt_for_the_other_mode_is_a_mismatch(dirs: Dirs) -> None:
    run = await launch(script_engine(dirs.root, 'receipt(mode="take-off")'), dirs)
    assert run.failure is not None and run.failure.kind is FailureKind.RECEIPT_MISMATCH


async def test_a_receipt_with_status_failure_fails_the_step(dirs: Dirs) -> None:
    run = await launch(script_engine(dirs.root, 'receipt(status="failure", error="nope")'), dirs)
    assert run.exit_code == 0
    assert run.failure is not None and run.failure.kind is FailureKind.RECEIPT_FAILURE
    assert run.receipt is not None


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (1, FailureKind.ENGINE_FAILURE),
        (2, FailureKind.VALIDATION_FAILURE),
        (3, FailureKind.UNEXPECTED_EXIT),
    ],
)
async def test_exit_codes_map_to_failure_kinds_even_with_a_success_receipt(
    dirs: Dirs, code: int, kind: FailureKind
) -> None:
    run = await launch(script_engine(dirs.root, f"receipt()\nsys.exit({code})\n"), dirs)
    assert run.exit_code == code
    assert run.failure is not None and run.failure.kind is kind


async def test_a_failing_noop_engine_reports_engine_failure_with_its_receipt(dirs: Dirs) -> None:
    run = await launch(noop_engine(), dirs, engine_input=plan_input(config={"fail": True}))
    assert run.failure is not None and run.failure.kind is FailureKind.ENGINE_FAILURE
    assert run.receipt is not None and run.receipt["status"] == "failure"


async def test_a_missing_executable_is_a_launch_failure(dirs: Dirs) -> None:
    run = await launch(EngineSpec((str(dirs.root / "no-such-engine"),)), dirs)
    assert run.failure is not None and run.failure.kind is FailureKind.LAUNCH_FAILED
    assert run.exit_code is None


async def test_timeout_kills_the_whole_process_group_including_a_grandchild(dirs: Dirs) -> None:
    pid_file = dirs.root / "grandchild.pid"
    body = f"""
    import signal, subprocess
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-I", "-S", "-c",
        "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\ntime.sleep(1000)"])
    with open({str(pid_file)!r}, "w") as handle:
        handle.write(str(child.pid))
    sys.stdin.close()
    signal.pause()
    """
    limits = RunLimits(timeout_seconds=1, kill_grace_seconds=0.1, drain_seconds=10)
    run = await launch(script_engine(dirs.root, body), dirs, limits=limits)
    assert run.timed_out
    assert run.failure is not None and run.failure.kind is FailureKind.TIMED_OUT
    grandchild = int(pid_file.read_text())
    assert process_is_gone(grandchild)


async def test_a_background_child_left_behind_is_killed_after_a_normal_exit(dirs: Dirs) -> None:
    pid_file = dirs.root / "daemon.pid"
    body = f"""
    import subprocess
    child = subprocess.Popen([sys.executable, "-I", "-S", "-c", "import time; time.sleep(1000)"])
    with open({str(pid_file)!r}, "w") as handle:
        handle.write(str(child.pid))
    receipt()
    """
    run = await launch(script_engine(dirs.root, body), dirs)
    assert run.ok, run.failure
    assert process_is_gone(int(pid_file.read_text()))


async def test_a_descendant_that_escapes_the_process_group_fails_the_step(dirs: Dirs) -> None:
    pid_file = dirs.root / "escaped.pid"
    body = f"""
    import subprocess
    child = subprocess.Popen([sys.executable, "-I", "-S", "-c", "import time; time.sleep(1000)"],
                             start_new_session=True)
    with open({str(pid_file)!r}, "w") as handle:
        handle.write(str(child.pid))
    receipt()
    """
    limits = RunLimits(timeout_seconds=60, drain_seconds=0.5)
    try:
        run = await launch(script_engine(dirs.root, body), dirs, limits=limits)
        assert run.failure is not None and run.failure.kind is FailureKind.ESCAPED_PROCESS
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


async def test_a_failing_restore_stops_the_launch(dirs: Dirs) -> None:
    def restore(target: Path) -> None:
        raise ArtifactIntegrityError("stored object changed")

    with pytest.raises(ArtifactIntegrityError):
        await launch(noop_engine(), dirs, restore=restore)
    assert not dirs.log.exists()


async def test_the_engine_sees_a_scrubbed_environment(
    dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CANARY_SHOULD_NOT_LEAK", "tweet")
    body = 'receipt(diagnostics={"env": dict(os.environ), "input": REQUEST})\n'
    run = await launch(script_engine(dirs.root, body), dirs, secrets={"API_TOKEN": "s3cr3t-value"})
    assert run.ok, run.failure
    assert run.receipt is not None
    env = run.receipt["diagnostics"]["env"]
    assert "CANARY_SHOULD_NOT_LEAK" not in env
    assert set(env) == {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "CABINCREW_WORKSPACE",
        "CABINCREW_ARTIFACTS_DIR",
        "CABINCREW_TEMP_DIR",
        "CABINCREW_MODE",
        "API_TOKEN",
    }
    assert env["PATH"] == SAFE_PATH
    assert env["HOME"] == str(dirs.temp.resolve())
    assert env["CABINCREW_MODE"] == "flight-plan"
    assert env["CABINCREW_WORKSPACE"] == str(dirs.workspace.resolve())
    # Mapped secrets reach the engine; the receipt shows them masked.
    assert env["API_TOKEN"] == "***"
    assert run.receipt["diagnostics"]["input"]["allowed_secrets"] == ["API_TOKEN"]
    assert protocol_schema.errors("EngineInput", run.receipt["diagnostics"]["input"]) == []


async def test_secret_values_are_masked_in_the_log_and_in_failure_reasons(dirs: Dirs) -> None:
    secret = "correct-horse-battery-staple"
    body = f"""
    half = len({secret!r}) // 2
    sys.stderr.write("token=" + {secret!r}[:half]); sys.stderr.flush()
    sys.stderr.write({secret!r}[half:] + " end\\n"); sys.stderr.flush()
    sys.stderr.write(REQUEST["secrets"]["DEPLOY_KEY"] + "\\n")
    receipt(status="failure", error="could not use " + os.environ["DEPLOY_KEY"])
    sys.exit(1)
    """
    run = await launch(script_engine(dirs.root, body), dirs, secrets={"DEPLOY_KEY": secret})
    assert run.failure is not None and run.failure.kind is FailureKind.ENGINE_FAILURE
    log = dirs.log.read_text()
    assert secret not in log
    assert "token=*** end" in log
    assert secret not in run.stderr_tail
    assert secret not in run.failure.reason
    assert run.receipt is not None and secret not in json.dumps(run.receipt)


def test_the_masker_catches_a_secret_split_across_every_possible_chunk_boundary() -> None:
    secret = "abcdefgh"
    stream = b"xx" + secret.encode() + b"yy" + secret.encode()
    for cut in range(len(stream) + 1):
        masker = Masker([secret, "other"])
        out = masker.feed(stream[:cut]) + masker.feed(stream[cut:]) + masker.flush()
        assert out == b"xx***yy***"


async def test_stdout_beyond_the_limit_is_a_failure(dirs: Dirs) -> None:
    limits = RunLimits(timeout_seconds=60, max_stdout_bytes=1000, drain_seconds=10)
    run = await launch(
        script_engine(dirs.root, 'sys.stdout.write("x" * 100000)\n'), dirs, limits=limits
    )
    assert run.failure is not None and run.failure.kind is FailureKind.STDOUT_TOO_LARGE


async def test_stderr_is_kept_bounded_in_the_step_log(dirs: Dirs) -> None:
    limits = RunLimits(timeout_seconds=60, max_stderr_log_bytes=1000, stderr_tail_bytes=100)
    run = await launch(
        script_engine(dirs.root, 'sys.stderr.write("e" * 50000)\nreceipt()\n'), dirs, limits=limits
    )
    assert run.ok
    assert run.stderr_truncated
    assert dirs.log.stat().st_size < 1200
    assert len(run.stderr_tail) == 100


async def test_artifacts_and_temp_dirs_are_emptied_before_every_launch(dirs: Dirs) -> None:
    dirs.artifacts.mkdir()
    (dirs.artifacts / "stale").mkdir()
    (dirs.artifacts / "stale" / "artifact.json").write_text("{}")
    os.chmod(dirs.artifacts / "stale", 0o555)
    dirs.temp.mkdir()
    (dirs.temp / "leftover").write_text("x")
    body = """
    temp = os.environ["CABINCREW_TEMP_DIR"]
    seen = {"artifacts": os.listdir(ARTIFACTS), "temp": os.listdir(temp)}
    receipt(diagnostics=seen)
    """
    run = await launch(script_engine(dirs.root, body), dirs)
    assert run.receipt is not None
    assert run.receipt["diagnostics"] == {"artifacts": [], "temp": []}


async def test_resource_limits_are_applied_in_the_engine(dirs: Dirs) -> None:
    limits = RunLimits(
        timeout_seconds=60,
        cpu_seconds=30,
        memory_bytes=2 << 30,
        file_size_bytes=1 << 20,
        open_files=64,
    )
    body = """
    import resource
    names = ["RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE"]
    receipt(diagnostics={name: list(resource.getrlimit(getattr(resource, name))) for name in names})
    """
    run = await launch(script_engine(dirs.root, body), dirs, limits=limits)
    assert run.receipt is not None
    seen = run.receipt["diagnostics"]
    assert seen["RLIMIT_CPU"] == [29, 30]
    assert seen["RLIMIT_AS"] == [2 << 30, 2 << 30]
    assert seen["RLIMIT_FSIZE"] == [1 << 20, 1 << 20]
    assert seen["RLIMIT_NOFILE"][1] <= 64
    assert seen["RLIMIT_CORE"] == [0, 0]


async def test_writing_past_the_file_size_limit_kills_the_engine(dirs: Dirs) -> None:
    # Python ignores SIGXFSZ itself, so a small C tool plays the engine here.
    write_big = 'exec head -c 100000 /dev/zero > "$CABINCREW_TEMP_DIR/big"'
    limits = RunLimits(timeout_seconds=60, file_size_bytes=4096)
    run = await launch(EngineSpec(("/bin/sh", "-c", write_big)), dirs, limits=limits)
    assert run.failure is not None and run.failure.kind is FailureKind.KILLED
    assert run.exit_code == -signal.SIGXFSZ


async def test_input_can_be_given_as_a_file_that_does_not_outlive_the_run(dirs: Dirs) -> None:
    body = """
    path = os.environ["CABINCREW_INPUT_FILE"]
    with open(path) as handle:
        from_file = json.load(handle)
    mode = oct(os.stat(path).st_mode & 0o777)
    receipt(diagnostics={"same": from_file == REQUEST, "path": path, "mode": mode})
    """
    run = await launch(script_engine(dirs.root, body), dirs, input_file=True)
    assert run.receipt is not None
    assert run.receipt["diagnostics"]["same"] is True
    assert run.receipt["diagnostics"]["mode"] == "0o600"
    assert not file_exists(run.receipt["diagnostics"]["path"])


async def test_an_engine_that_never_reads_a_large_input_does_not_hang_the_runner(
    dirs: Dirs,
) -> None:
    minimal = {
        "protocol_version": "1",
        "engine_id": "e",
        "mode": "flight-plan",
        "receipt_id": "r",
        "status": "success",
    }
    body = f"import json\nprint(json.dumps({minimal!r}))\n"
    big = plan_input(config={"blob": "x" * (2 << 20)})
    run = await launch(script_engine(dirs.root, body, prelude=False), dirs, engine_input=big)
    assert run.ok, run.failure


async def test_take_off_restores_artifacts_and_checks_the_echoed_plan_token(dirs: Dirs) -> None:
    def restore(target: Path) -> None:
        (target / "state-1").mkdir()
        (target / "state-1" / "artifact.json").write_text("{}")

    body = """
    receipt(plan_token="f" * 64, diagnostics={"restored": os.listdir(ARTIFACTS)})
    """
    take_off = build_engine_input(
        mode=Mode.TAKE_OFF, workflow_id="wf-1", step_id="plan", expected_plan_token="e" * 64
    )
    run = await launch(
        script_engine(dirs.root, body),
        dirs,
        mode=Mode.TAKE_OFF,
        engine_input=take_off,
        restore=restore,
    )
    assert run.receipt is not None and run.receipt["diagnostics"]["restored"] == ["state-1"]
    assert run.failure is not None and run.failure.kind is FailureKind.RECEIPT_MISMATCH


@pytest.mark.parametrize("name", ["PATH", "HOME", "CABINCREW_WORKSPACE", "lower", "1ABC", ""])
async def test_secrets_may_not_use_reserved_or_malformed_names(dirs: Dirs, name: str) -> None:
    with pytest.raises(EngineLaunchError):
        await launch(noop_engine(), dirs, secrets={name: "x"})


async def test_the_caller_may_not_put_secrets_in_the_engine_input(dirs: Dirs) -> None:
    engine_input = {**plan_input(), "secrets": {"A": "b"}}
    with pytest.raises(EngineLaunchError):
        await launch(noop_engine(), dirs, engine_input=engine_input)


async def test_overlapping_directories_are_refused(dirs: Dirs) -> None:
    with pytest.raises(EngineLaunchError):
        await run_engine(
            noop_engine(),
            Mode.FLIGHT_PLAN,
            plan_input(),
            workspace=dirs.workspace,
            artifacts_dir=dirs.workspace / "artifacts",
            temp_dir=dirs.temp,
            log_path=dirs.log,
        )
    assert not (dirs.workspace / "artifacts").exists()


def test_parse_receipt_accepts_exactly_one_valid_document() -> None:
    good = {
        "protocol_version": "1",
        "engine_id": "e",
        "mode": "take-off",
        "receipt_id": "r",
        "status": "success",
    }
    receipt, problem = parse_receipt(json.dumps(good).encode() + b"\n", Mode.TAKE_OFF)
    assert problem is None and receipt == good
    _, problem = parse_receipt(b"\xff\xfe", Mode.TAKE_OFF)
    assert problem is not None and problem.kind is FailureKind.NOT_JSON
    _, problem = parse_receipt(
        json.dumps({**good, "protocol_version": "9"}).encode(), Mode.TAKE_OFF
    )
    assert problem is not None and problem.kind is FailureKind.RECEIPT_MISMATCH
