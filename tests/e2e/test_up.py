"""`cabincrew up` as a user runs it: a real subprocess on a free port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import cabincrew
from tests.conftest import BIN, free_port

CABINCREW = str(BIN / "cabincrew")
SIX = {"audit", "preflight", "approval", "orchestrator", "mcp_gateway", "llm_gateway"}
GRPC_SERVICES = (
    "AuditService",
    "PreflightService",
    "ApprovalService",
    "OrchestratorService",
    "McpGatewayService",
    "LlmGatewayService",
)


def wait_serving(
    env: dict[str, str], proc: subprocess.Popen[bytes], limit: float = 30.0
) -> dict[str, object]:
    """Poll `cabincrew status --json` until all six serve (bounded)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, "cabincrew up exited early"
        result = subprocess.run(
            [CABINCREW, "status", "--json", "--timeout", "2"],
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            return json.loads(result.stdout)  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError("services did not reach SERVING")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], Path]]:
    data_dir = tmp_path / "data"
    addr = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "CABINCREW_ADDR": addr, "CABINCREW_DATA_DIR": str(data_dir)}
    env.pop("CABINCREW_TOKEN", None)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with open(tmp_path / "up.log", "wb") as log:
        proc = subprocess.Popen(
            [CABINCREW, "up", "--addr", addr, "--data-dir", str(data_dir)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
        try:
            yield proc, env, data_dir
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_up_serves_all_six_services(
    running: tuple[subprocess.Popen[bytes], dict[str, str], Path],
) -> None:
    proc, env, _ = running
    status = wait_serving(env, proc)
    rows = status["services"]
    assert isinstance(rows, list)
    assert {r["service"] for r in rows} == SIX
    assert all(r["status"] == "SERVING" for r in rows)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_stops_the_server_cleanly(
    running: tuple[subprocess.Popen[bytes], dict[str, str], Path], signum: signal.Signals
) -> None:
    proc, env, _ = running
    wait_serving(env, proc)
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == 0
    log = (Path(env["CABINCREW_DATA_DIR"]).parent / "up.log").read_text()
    assert "Traceback" not in log
    assert "stopped" in log


def test_reflection_of_a_running_up_lists_all_six_services(
    running: tuple[subprocess.Popen[bytes], dict[str, str], Path],
) -> None:
    proc, env, _ = running
    wait_serving(env, proc)

    async def listed() -> set[str]:
        async with grpc.aio.insecure_channel(env["CABINCREW_ADDR"]) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for response in stub.ServerReflectionInfo(iter([request]), timeout=10):
                return {s.name for s in response.list_services_response.service}
        return set()

    names = asyncio.run(listed())
    assert {f"cabincrew.v1.{n}" for n in GRPC_SERVICES} <= names


def test_version_names_the_product_and_the_protocol() -> None:
    result = subprocess.run([CABINCREW, "version", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["cabincrew"] == cabincrew.__version__
    assert shown["protocol"] == "1"


def test_up_writes_nothing_outside_its_data_dir(
    running: tuple[subprocess.Popen[bytes], dict[str, str], Path], tmp_path: Path
) -> None:
    proc, env, data_dir = running
    wait_serving(env, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert list((tmp_path / "cwd").iterdir()) == []
    assert (data_dir / "keys" / "auth.key").exists()


def test_status_against_nothing_is_one_clear_line_and_a_failure(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CABINCREW_ADDR": f"127.0.0.1:{free_port()}",
        "CABINCREW_DATA_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [CABINCREW, "status", "--timeout", "1"], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:")
    assert len(result.stderr.strip().splitlines()) <= 2


def test_serve_refuses_an_unknown_service_name(tmp_path: Path) -> None:
    result = subprocess.run(
        [CABINCREW, "serve", "nope", "--data-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_python_dash_m_runs_one_service(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "CABINCREW_ADDR": addr, "CABINCREW_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [str(BIN / "python"), "-m", "audit_svc"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            result = subprocess.run(
                [CABINCREW, "status", "--json", "--timeout", "2"],
                env=env,
                capture_output=True,
                text=True,
            )
            if result.stdout:
                rows = {r["service"]: r["status"] for r in json.loads(result.stdout)["services"]}
                if rows["audit"] == "SERVING":
                    break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        assert rows["preflight"] == "SERVICE_UNKNOWN"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_auth_issue_prints_a_token_the_server_accepts(
    running: tuple[subprocess.Popen[bytes], dict[str, str], Path],
) -> None:
    proc, env, data_dir = running
    wait_serving(env, proc)
    issued = subprocess.run(
        [
            CABINCREW,
            "auth",
            "issue",
            "--principal",
            "bob",
            "--roles",
            "approver",
            "--ttl",
            "5m",
            "--data-dir",
            str(data_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    token = issued.stdout.strip()
    assert token.startswith("cc1.")
    result = subprocess.run(
        [CABINCREW, "status", "--json"],
        env={**env, "CABINCREW_TOKEN": token},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
