"""The distributed deployment as `deploy/` describes it: one process per service.

The services are started with the environment that `deploy/compose.yaml` gives each
container (host names and paths mapped to loopback ports and temporary folders), so that
what the deployment files say is what runs here. The Kubernetes manifests are checked to
give every container a configuration that loads.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from cabincrew.config import load_config
from tests.conftest import BIN, ROOT, free_port

DEPLOY = ROOT / "deploy"
CABINCREW = str(BIN / "cabincrew")
SERVICES = ("audit", "preflight", "approval", "orchestrator")
MODULES = {name: f"{name}_svc" for name in SERVICES}
START_SECONDS = 60


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return document


def _manifests() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        documents.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return documents


def _local_env(
    environment: Mapping[str, str], ports: Mapping[str, int], root: Path, name: str
) -> dict[str, str]:
    """A container's environment with its host names, paths and database made local."""
    local: dict[str, str] = {}
    for key, value in environment.items():
        value = str(value)
        if key == "CABINCREW_DATABASE_URL":
            continue  # SQLite in each service's data dir; the PostgreSQL path has its own tests
        if key == "CABINCREW_ADDR":
            value = f"127.0.0.1:{ports[name]}"
        elif key == "CABINCREW_DATA_DIR":
            value = str(root / name)
        elif key == "CABINCREW__AUTH__KEY_FILE":
            value = str(root / "keys" / "auth.key")
        value = re.sub(r"\b([a-z]+):7070\b", lambda m: f"127.0.0.1:{ports[m.group(1)]}", value)
        local[key] = value
    return local


@dataclass
class Cluster:
    """The four services, each its own process, and a user's environment for the CLI."""

    root: Path
    ports: dict[str, int]
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    logs: dict[str, list[str]] = field(default_factory=dict)
    drains: list[asyncio.Task[None]] = field(default_factory=list)

    def cli(self, *args: str, addr: str, token: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CABINCREW")}
        env.update(CABINCREW_ADDR=addr, CABINCREW_TOKEN=token, NO_COLOR="1", COLUMNS="200")
        return subprocess.run(
            [CABINCREW, *args], env=env, cwd=self.root, capture_output=True, text=True, timeout=120
        )

    def addr(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def issue(self, principal: str, roles: str) -> str:
        key = str(self.root / "keys" / "auth.key")
        result = subprocess.run(
            [
                CABINCREW,
                "auth",
                "issue",
                "--principal",
                principal,
                "--roles",
                roles,
                "--key-file",
                key,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    async def start(self, name: str, env: dict[str, str]) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CABINCREW")}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            MODULES[name],
            cwd=ROOT,
            env={**base, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self.processes[name] = process
        lines = self.logs.setdefault(name, [])
        listening = asyncio.Event()

        async def drain() -> None:
            assert process.stdout is not None
            async for raw in process.stdout:
                line = raw.decode("utf-8", "replace")
                lines.append(line)
                if "listening on" in line:
                    listening.set()

        self.drains.append(asyncio.create_task(drain()))
        try:
            async with asyncio.timeout(START_SECONDS):
                await listening.wait()
        except TimeoutError:
            raise AssertionError(f"{name} did not start:\n" + "".join(lines)) from None

    async def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for name, process in reversed(list(self.processes.items())):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(30):
                        await process.wait()
                except TimeoutError:
                    process.kill()
                    await process.wait()
            codes[name] = process.returncode
        for task in self.drains:
            task.cancel()
        return codes


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    compose = _compose()["services"]
    ports = {name: free_port() for name in SERVICES}
    result = Cluster(tmp_path, ports)
    # What the compose file's keygen container does: one shared token-signing key.
    result.issue("bootstrap", "")
    try:
        for name in SERVICES:  # dependencies first, as compose's depends_on orders them
            await result.start(
                name, _local_env(compose[name]["environment"], ports, tmp_path, name)
            )
        yield result
    finally:
        await result.stop()


async def test_a_governed_workflow_runs_across_four_service_processes(cluster: Cluster) -> None:
    operator = cluster.issue("operator", "admin")
    for name in SERVICES:
        health = cluster.cli(
            "status", "--service", name, "--json", addr=cluster.addr(name), token=operator
        )
        assert health.returncode == 0, health.stdout + health.stderr
        assert json.loads(health.stdout)["services"][0]["status"] == "SERVING"

    ran = cluster.cli(
        "run",
        str(ROOT / "examples" / "allow.yaml"),
        "--wait",
        "--json",
        addr=cluster.addr("orchestrator"),
        token=operator,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    workflow = json.loads(ran.stdout)["workflow"]
    assert workflow["state"] == "WORKFLOW_STATE_COMPLETED"
    assert "Owned by platform." in (Path(workflow["workspace"]) / "README.md").read_text()

    # The orchestrator's and preflight's events reached the audit process, and verify.
    queried = cluster.cli(
        "audit",
        "query",
        "--workflow-id",
        workflow["workflow_id"],
        "--json",
        addr=cluster.addr("audit"),
        token=operator,
    )
    assert queried.returncode == 0, queried.stderr
    types = {json.loads(line)["event"]["event_type"] for line in queried.stdout.splitlines()}
    assert "orchestrator.plan_token_created" in types
    assert any(t.startswith("preflight.") for t in types)
    verified = cluster.cli("audit", "verify", addr=cluster.addr("audit"), token=operator)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    codes = await cluster.stop()
    assert codes == {name: 0 for name in SERVICES}


def _container_envs() -> list[tuple[str, dict[str, str]]]:
    found: list[tuple[str, dict[str, str]]] = []
    for name, service in _compose()["services"].items():
        if "environment" in service and name in SERVICES:
            found.append(
                (f"compose:{name}", {k: str(v) for k, v in service["environment"].items()})
            )
    for document in _manifests():
        if document.get("kind") != "Deployment":
            continue
        for container in document["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: str(e.get("value", "secret")) for e in container.get("env", [])}
            found.append((f"k8s:{container['name']}", env))
    return found


def test_every_deployment_file_gives_each_service_a_configuration_that_loads() -> None:
    envs = _container_envs()
    assert {label for label, _ in envs} >= {
        f"{k}:{n}" for k in ("compose", "k8s") for n in SERVICES
    }
    for label, env in envs:
        name = label.split(":", 1)[1]
        config = load_config(None, environ=env, overrides={"services": [name]})
        assert config.server.addr == "0.0.0.0:7070", label
        assert config.auth.key_file == "/keys/auth.key", label
        for peer in ("audit", "preflight", "approval"):
            if name == "orchestrator" or (peer == "audit" and name != "audit"):
                assert config.address_of(peer) == f"{peer}:7070", (label, peer)
