"""Fixtures of the audit tests: a real AuditService on port 0, SQLite or a fresh PostgreSQL
database, events and subprocess helpers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from cabincrew.clients import AuditClient, ChannelOptions, open_channel
from cabincrew.config import Config
from cabincrew.runtime.handle import GrpcServiceHandle
from cabincrew.runtime.server import CabinCrewServer, create_server
from cabincrew.v1 import audit_pb2, audit_pb2_grpc, common_pb2
from tests.conftest import BIN, ROOT, make_config, token_for

WAIT = 20.0


def event(
    index: int | str, *, event_type: str = "test.appended", prefix: str = "ev", **fields: Any
) -> common_pb2.AuditEvent:
    """A valid event with a deterministic id and timestamp."""
    values: dict[str, Any] = {
        "event_id": f"{prefix}-{index}",
        "event_type": event_type,
        "workflow_state": "PLAN_RUNNING",
        "message": f"event {index}",
        "severity": common_pb2.EVENT_SEVERITY_INFO,
        **fields,
    }
    message = common_pb2.AuditEvent(**values)
    if not message.HasField("timestamp"):
        message.timestamp.FromSeconds(1_700_000_000 + (index if isinstance(index, int) else 0))
    return message


def _admin_conninfo(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def pg_database(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards); its SQLAlchemy URL."""
    import psycopg

    name = f"cc_audit_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_conninfo(postgres_url), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_admin_conninfo(postgres_url), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Empty for SQLite under the data dir, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return ""
    url: str = request.getfixturevalue("pg_database")
    return url


@dataclass
class AuditServer:
    """A started server hosting AuditService, and a client as an ordinary principal."""

    app: CabinCrewServer
    config: Config
    client: AuditClient

    @property
    def port(self) -> int:
        return self.app.port

    def token(self, principal: str = "alice") -> str:
        return token_for(self.config, principal, ["auditor"])

    def store_url(self) -> str:
        return self.config.database_url("audit")


async def start_audit(data_dir: Path, database_url: str = "", **overrides: object) -> AuditServer:
    """Start an audit-only server with state in ``data_dir``."""
    if database_url:
        overrides["database.url"] = database_url
    config = make_config(data_dir, services=("audit",), **overrides)
    app, port = await create_server(config)
    await app.start()
    token = token_for(config, "alice", ["auditor"])
    client = AuditClient(open_channel(ChannelOptions(address=f"127.0.0.1:{port}", token=token)))
    return AuditServer(app, config, client)


async def stop_audit(server: AuditServer) -> None:
    await server.client.aclose()
    await server.app.stop(0)


@pytest.fixture
async def audit(data_dir: Path, database_url: str) -> AsyncIterator[AuditServer]:
    """An audit server on SQLite and on PostgreSQL (where configured)."""
    server = await start_audit(data_dir, database_url)
    try:
        yield server
    finally:
        await stop_audit(server)


@pytest.fixture
async def sqlite_audit(data_dir: Path) -> AsyncIterator[AuditServer]:
    """An audit server on SQLite only."""
    server = await start_audit(data_dir)
    try:
        yield server
    finally:
        await stop_audit(server)


# --- a fake AuditService ----------------------------------------------------------------


class FakeAudit(audit_pb2_grpc.AuditServiceServicer):
    """A fake AuditService that acks every event and records the shape of each request.

    With ``batches=False`` it answers as a service from before batches did: to it ``events``
    is an unknown field, so a batch reads as one empty ``event``, which it refuses.
    """

    def __init__(self, batches: bool) -> None:
        self.batches = batches
        self.request_sizes: list[int] = []  # events per request; 0 for a single `event`
        self.acked: list[str] = []

    def singly_after_the_first_refused_batch(self) -> bool:
        """Whether, once a batch was refused, only single events followed (a sender may
        have had more batches on the wire before it read the refusal)."""
        sizes = self.request_sizes
        start = next((i for i in range(1, len(sizes)) if sizes[i] == 0 and sizes[i - 1] > 0), None)
        return start is not None and not any(sizes[start:])

    def _ack(self, item: common_pb2.AuditEvent) -> audit_pb2.AppendAck:
        self.acked.append(item.event_id)
        return audit_pb2.AppendAck(event_id=item.event_id, sequence=len(self.acked) - 1)

    async def AppendStream(  # type: ignore[override]
        self, request_iterator: AsyncIterator[audit_pb2.AppendStreamRequest], context: object
    ) -> AsyncIterator[audit_pb2.AppendStreamResponse]:
        async for request in request_iterator:
            self.request_sizes.append(len(request.events))
            if not request.events:
                yield audit_pb2.AppendStreamResponse(
                    ack=self._ack(request.event), event_id=request.event.event_id
                )
            elif self.batches:
                response = audit_pb2.AppendStreamResponse()
                for item in request.events:
                    response.results.add(event_id=item.event_id, ack=self._ack(item))
                yield response
            else:
                refused = common_pb2.ItemError(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="event_id: required"
                )
                yield audit_pb2.AppendStreamResponse(error=refused)


async def serve_fake(fake: FakeAudit, data_dir: Path, **overrides: object) -> CabinCrewServer:
    """A started server on port 0 (or ``server.addr``) hosting ``fake`` as AuditService."""
    config = make_config(data_dir, services=("audit",), **overrides)

    async def build(context: object) -> GrpcServiceHandle:
        return GrpcServiceHandle(
            "audit",
            "cabincrew.v1.AuditService",
            fake,
            audit_pb2_grpc.add_AuditServiceServicer_to_server,
        )

    app, _ = await create_server(config, {"audit": build})  # type: ignore[dict-item]
    await app.start()
    return app


# --- subprocesses ------------------------------------------------------------------------


class ServiceProcess:
    """``python -m audit_svc`` in a subprocess, with its bound port read from its banner."""

    def __init__(self, data_dir: Path, database_url: str = "", **env: str) -> None:
        environ = {
            **os.environ,
            "CABINCREW_ADDR": "127.0.0.1:0",
            "CABINCREW_DATA_DIR": str(data_dir),
            "CABINCREW__LOG_LEVEL": "warning",
            **env,
        }
        if database_url:
            environ["CABINCREW_DATABASE_URL"] = database_url
        self.process = subprocess.Popen(
            [sys.executable, "-m", "audit_svc"],
            cwd=ROOT,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.port = 0

    async def ready(self) -> int:
        """Wait (bounded) for the listening banner; returns the port."""
        assert self.process.stdout is not None
        stdout = self.process.stdout

        def read_banner() -> int:
            text = ""
            for line in stdout:
                text += line
                found = re.search(r"127\.0\.0\.1:(\d+)", text)
                if found:
                    return int(found.group(1))
            raise RuntimeError("the audit service exited before listening")

        self.port = await asyncio.wait_for(asyncio.to_thread(read_banner), WAIT)
        return self.port

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=WAIT)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=WAIT)
        finally:
            self.kill()


def cli_env(port: int, data_dir: Path) -> dict[str, str]:
    """Environment for the ``cabincrew`` CLI against a server on ``port``."""
    environ = {k: v for k, v in os.environ.items() if k != "CABINCREW_TOKEN"}
    environ.update({"CABINCREW_ADDR": f"127.0.0.1:{port}", "CABINCREW_DATA_DIR": str(data_dir)})
    return environ


async def run_cli(
    *args: str, port: int, data_dir: Path, timeout: float = 60.0
) -> tuple[int, str, str]:
    """Run ``cabincrew ARGS`` without blocking the event loop (the server may be in-process)."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / "cabincrew"),
        *args,
        cwd=ROOT,
        env=cli_env(port, data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
