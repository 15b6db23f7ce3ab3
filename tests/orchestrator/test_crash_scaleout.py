"""Scale-out on PostgreSQL: two orchestrator processes share work through leases.

The shared services (audit, preflight, approval) run in this process; two orchestrators run
as subprocesses with their own data dirs, the same signing keys and the same workspaces
folder (what a deployment mounts), in a PostgreSQL schema of their own. One is SIGKILLed in
the middle of a flight-plan; the other takes the workflow over when the lease expires, redoes
the flight-plan and completes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy

from cabincrew.clients import ChannelOptions, OrchestratorClient, open_channel
from cabincrew.signing import Ed25519Signer
from cabincrew.v1 import common_pb2, orchestrator_pb2
from tests.conftest import free_port, token_for
from tests.orchestrator.test_service_support import (
    TERMINAL,
    EngineSignals,
    Orchestra,
    definition,
    gate_engine,
    start_orchestra,
)

LAUNCHER = """
import asyncio, functools, json, sys
from cabincrew.config import load_config
from cabincrew.runtime.server import serve, service_factories
from orchestrator_svc.server import build
config = load_config(None, environ={}, overrides=json.loads(sys.argv[1]))
factories = service_factories()
factories["orchestrator"] = functools.partial(build, schema=sys.argv[2])
asyncio.run(serve(config, factories, ready=lambda s: print("listening on", s.port, flush=True)))
"""


class Replica:
    """An orchestrator-only process."""

    def __init__(self, root: Path, overrides: dict[str, object], schema: str) -> None:
        self.root = root
        self.port = free_port()
        self.overrides = {**overrides, "server.addr": f"127.0.0.1:{self.port}"}
        self.schema = schema
        self.process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            LAUNCHER,
            json.dumps(self.overrides),
            self.schema,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        ready = asyncio.Event()
        self._drain = asyncio.create_task(self._read(ready))
        async with asyncio.timeout(60):
            await ready.wait()

    async def _read(self, ready: asyncio.Event) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for line in self.process.stdout:
            if b"listening on" in line:
                ready.set()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()
        if self._drain is not None:
            await self._drain


@pytest.fixture
async def cluster(
    tmp_path: Path, postgres_url: str
) -> AsyncIterator[tuple[Orchestra, Replica, Replica]]:
    """Shared services here, two orchestrator replicas on one PostgreSQL schema."""
    shared = await start_orchestra(tmp_path / "shared", services=("audit", "preflight", "approval"))
    schema = f"test_orch_{uuid.uuid4().hex[:12]}"
    keys = tmp_path / "keys"
    keys.mkdir()
    # What a deployment mounts into every replica: the token key and the plan-token key.
    shutil.copy(shared.config.auth_key_path(), keys / "auth.key")
    Ed25519Signer.load_or_create(keys / "orchestrator.key")
    address = f"127.0.0.1:{shared.port}"
    replicas = []
    for name in ("one", "two"):
        data = tmp_path / name
        (data / "keys").mkdir(parents=True)
        for key in keys.iterdir():
            shutil.copy(key, data / "keys" / key.name)
        overrides: dict[str, object] = {
            "data_dir": str(data),
            "services": ["orchestrator"],
            "database.url": postgres_url,
            "orchestrator.lease_seconds": 2.0,
            "orchestrator.workspaces_dir": str(tmp_path / "workspaces"),
            "clients.addresses": {"audit": address, "preflight": address, "approval": address},
        }
        replicas.append(Replica(data, overrides, schema))
    try:
        for replica in replicas:
            await replica.start()
        yield shared, replicas[0], replicas[1]
    finally:
        for replica in replicas:
            await replica.kill()
        await shared.close()
        engine = sqlalchemy.create_engine(postgres_url)
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        engine.dispose()


def client(env: Orchestra, replica: Replica) -> OrchestratorClient:
    token = token_for(env.config, "olivia", ["operator"])
    return OrchestratorClient(
        open_channel(ChannelOptions(f"127.0.0.1:{replica.port}", token)), deadline_seconds=20
    )


async def test_a_replica_takes_over_the_workflow_of_one_that_died(
    cluster: tuple[Orchestra, Replica, Replica], tmp_path: Path
) -> None:
    shared, one, two = cluster
    gate = tmp_path / "gate"
    signals = EngineSignals(gate)
    first, second = client(shared, one), client(shared, two)
    try:
        step = {
            "id": "step",
            "kind": "engine",
            "engine": {"command": gate_engine(tmp_path / "engines")},
            "config": {"gate_dir": str(gate), "block": "flight-plan", "content": "done\n"},
        }
        workflow = await first.submit(
            orchestrator_pb2.SubmitWorkflowRequest(
                definition=orchestrator_pb2.WorkflowDefinition(text=definition([step])),
                workspace_source=str(shared.source),
            )
        )
        await signals.wait("flight-plan.1")
        await one.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int((gate / "flight-plan.1.pid").read_text()), signal.SIGKILL)
        await signals.wait("flight-plan.2")  # the survivor redoes the plan after the lease
        (gate / "flight-plan.release").touch()
        async with asyncio.timeout(60):
            async for update in second.watch(workflow.workflow_id):
                if update.workflow.state in TERMINAL:
                    done = update.workflow
                    break
        assert done.state == common_pb2.WORKFLOW_STATE_COMPLETED, done.error
        assert (Path(done.workspace) / "out.txt").read_text() == "done\n"
        timeline = await second.timeline(workflow.workflow_id)
        starts = [e for e in timeline.entries if e.entry_type == "step_started"]
        assert [e.data["recovered"] for e in starts] == [False, True]
    finally:
        await signals.close()
        await first.aclose()
        await second.aclose()


async def test_a_cancel_sent_to_the_other_replica_reaches_the_owner(
    cluster: tuple[Orchestra, Replica, Replica], tmp_path: Path
) -> None:
    shared, one, two = cluster
    gate = tmp_path / "gate"
    signals = EngineSignals(gate)
    first, second = client(shared, one), client(shared, two)
    try:
        step = {
            "id": "step",
            "kind": "engine",
            "engine": {"command": gate_engine(tmp_path / "engines")},
            "config": {"gate_dir": str(gate), "block": "flight-plan"},
        }
        workflow = await first.submit(
            orchestrator_pb2.SubmitWorkflowRequest(
                definition=orchestrator_pb2.WorkflowDefinition(text=definition([step])),
                workspace_source=str(shared.source),
            )
        )
        await signals.wait("flight-plan.1")
        await second.cancel(workflow.workflow_id, "from the other replica")
        async with asyncio.timeout(60):
            async for update in second.watch(workflow.workflow_id):
                if update.workflow.state in TERMINAL:
                    done = update.workflow
                    break
        assert done.state == common_pb2.WORKFLOW_STATE_CANCELLED
        assert "from the other replica" in done.error
    finally:
        await signals.close()
        await first.aclose()
        await second.aclose()
