"""Kill the approval service (SIGKILL) while a watcher waits; after a restart the watcher
reconnects, gets the current state first and then sees the decision made afterwards."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from approval_svc.follow import follow
from cabincrew.clients import ApprovalClient, AuditClient, ChannelOptions, open_channel
from cabincrew.v1 import approval_pb2, audit_pb2
from tests.approval.conftest import create_request
from tests.conftest import ROOT, free_port, make_config, token_for

PENDING = approval_pb2.APPROVAL_STATE_PENDING
APPROVED = approval_pb2.APPROVAL_STATE_APPROVED
CONSUMED = approval_pb2.APPROVAL_STATE_CONSUMED


class Service:
    """The approval service in its own process, on a fixed loopback port."""

    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        self.data_dir = data_dir
        self.port = port
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.approval.serve_pair",
                str(self.data_dir),
                f"127.0.0.1:{self.port}",
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 60)
        assert line.startswith(b"READY"), self.log.read_text(errors="replace")

    async def kill(self) -> None:
        """SIGKILL: no graceful shutdown, nothing flushed on the way out."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await asyncio.wait_for(self.process.wait(), 30)


@pytest.fixture
async def service(data_dir: Path, tmp_path: Path) -> AsyncIterator[Service]:
    running = Service(data_dir, free_port(), tmp_path / "service.log")
    try:
        yield running
    finally:
        await running.kill()


@pytest.fixture
async def clients(service: Service) -> AsyncIterator[Callable[[str, list[str]], ApprovalClient]]:
    made: list[ApprovalClient] = []

    def make(name: str, roles: list[str]) -> ApprovalClient:
        token = token_for(make_config(service.data_dir), name, roles)
        client = ApprovalClient(
            open_channel(ChannelOptions(address=f"127.0.0.1:{service.port}", token=token)),
            deadline_seconds=10,
            max_attempts=1,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


async def test_a_watcher_survives_a_killed_service_and_sees_the_later_decision(
    service: Service, clients: Callable[[str, list[str]], ApprovalClient]
) -> None:
    await service.start()
    orchestrator = clients("orchestrator", ["service"])
    approval = await orchestrator.create(create_request(on_behalf_of="alice"))

    seen: asyncio.Queue[int] = asyncio.Queue()

    async def watch() -> None:
        async for update in follow(orchestrator, approval.approval_id, max_failures=60):
            await seen.put(update.state)

    watcher = asyncio.create_task(watch())
    try:
        assert await asyncio.wait_for(seen.get(), 10) == PENDING

        await service.kill()
        await service.start()

        # Reconnected: the current state first, read from the database.
        assert await asyncio.wait_for(seen.get(), 60) == PENDING
        carol = clients("carol", ["release-manager"])
        await carol.respond(approval.approval_id, approval.subject_hash, True, "ship it")
        assert await asyncio.wait_for(seen.get(), 10) == APPROVED

        await orchestrator.consume(approval.approval_id, approval.subject_hash)
        assert await asyncio.wait_for(seen.get(), 10) == CONSUMED
        await asyncio.wait_for(watcher, 10)
    finally:
        watcher.cancel()

    # The audit events of both lives of the process are in the (real) audit log.
    auditor = AuditClient(
        open_channel(
            ChannelOptions(
                address=f"127.0.0.1:{service.port}",
                token=token_for(make_config(service.data_dir), "auditor", ["auditor"]),
            )
        )
    )
    expected = ["approval.created", "approval.responded", "approval.approved", "approval.consumed"]
    seen_types: list[str] = []

    async def collect() -> None:
        request = audit_pb2.TailEventsRequest(
            filter=audit_pb2.EventFilter(event_type_prefix="approval.")
        )
        async for response in auditor.tail(request):
            seen_types.append(response.entry.event.event_type)
            if len(seen_types) == len(expected):
                return

    try:
        await asyncio.wait_for(collect(), 30)
    finally:
        await auditor.aclose()
    assert seen_types == expected
