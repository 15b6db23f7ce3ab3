"""Two audit service processes on one PostgreSQL database: one gap-free, consistent log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cabincrew.clients import AuditClient, ChannelOptions, open_channel
from cabincrew.config import load_config
from cabincrew.v1 import audit_pb2, audit_pb2_grpc, common_pb2
from tests.audit.conftest import WAIT, ServiceProcess, event
from tests.conftest import token_for

pytestmark = pytest.mark.timeout(120)

PER_STREAM = 150
SHARED = 40


def _client(port: int, data_dir: Path) -> AuditClient:
    config = load_config(None, environ={}, overrides={"data_dir": str(data_dir)})
    token = token_for(config, "op", ["operator"])
    return AuditClient(open_channel(ChannelOptions(address=f"127.0.0.1:{port}", token=token)))


async def _stream(client: AuditClient, events: list[common_pb2.AuditEvent]) -> dict[str, int]:
    stub = audit_pb2_grpc.AuditServiceStub(client.channel)

    async def requests() -> AsyncIterator[audit_pb2.AppendStreamRequest]:
        for item in events:
            yield audit_pb2.AppendStreamRequest(event=item)

    acks = {}
    async for response in stub.AppendStream(requests(), timeout=60):
        assert response.HasField("ack"), response
        acks[response.ack.event_id] = response.ack.sequence
    return acks


async def test_two_processes_append_concurrently_into_one_gap_free_log(
    tmp_path: Path, pg_database: str
) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    servers = [ServiceProcess(d, pg_database) for d in dirs]
    clients: list[AuditClient] = []
    try:
        ports = await asyncio.gather(*(s.ready() for s in servers))
        clients = [_client(port, d) for port, d in zip(ports, dirs, strict=True)]
        shared = [event(i, prefix="shared") for i in range(SHARED)]
        batches = [
            [event(i, prefix=f"p{n}-s{k}") for i in range(PER_STREAM)] + shared
            for n in range(2)
            for k in range(2)
        ]
        results = await asyncio.wait_for(
            asyncio.gather(*(_stream(clients[i // 2], batch) for i, batch in enumerate(batches))),
            WAIT * 3,
        )
        # Every process acknowledged the shared events with the same sequence.
        for result in results[1:]:
            assert {k: result[k] for k in result if k.startswith("shared")} == {
                k: results[0][k] for k in results[0] if k.startswith("shared")
            }

        request = audit_pb2.QueryEventsRequest(page_size=1000)
        entries = [e async for page in clients[0].query(request) for e in page.entries]
        total = 4 * PER_STREAM + SHARED
        assert [e.sequence for e in entries] == list(range(total))
        assert len({e.event.event_id for e in entries}) == total
        for result in results:
            for event_id, sequence in result.items():
                assert entries[sequence].event.event_id == event_id

        checkpoints = [await c.get_checkpoint(refresh=True) for c in clients]
        assert checkpoints[0].tree_size == checkpoints[1].tree_size == total
        assert checkpoints[0].root_hash == checkpoints[1].root_hash
        for client in clients:
            verdict = await client.verify_log()
            assert (verdict.ok, verdict.tree_size) == (True, total)
        proof = await clients[1].inclusion_proof(3)
        assert proof.root_hash == checkpoints[0].root_hash
    finally:
        for client in clients:
            await client.aclose()
        for server in servers:
            server.terminate()
