"""The audit emitter: a durable local outbox streamed to a real AuditService."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import grpc
import pytest

from cabincrew.emitter import MAX_BATCH_EVENTS, EmitError, OutboxEmitter, _Outbox, emitter_for
from cabincrew.errors import InvalidArgument
from cabincrew.runtime.server import create_server
from cabincrew.v1 import audit_pb2
from tests.audit.conftest import (
    WAIT,
    AuditServer,
    FakeAudit,
    event,
    serve_fake,
    start_audit,
    stop_audit,
)
from tests.conftest import free_port, make_config, token_for

pytestmark = pytest.mark.timeout(60)


def _emitter(
    path: Path, port: int, config_dir: Path, component: str = "orchestrator", idle: float = 1.0
) -> OutboxEmitter:
    config = make_config(config_dir)
    return OutboxEmitter(
        component,
        path,
        address=lambda: f"127.0.0.1:{port}",
        token=lambda: token_for(config, f"service:{component}", ["service"]),
        min_backoff=0.01,
        max_backoff=0.2,
        idle_seconds=idle,
    )


async def _stored(server: AuditServer) -> list[audit_pb2.LogEntry]:
    request = audit_pb2.QueryEventsRequest(page_size=1000)
    return [e async for page in server.client.query(request) for e in page.entries]


async def _emit(emitter: OutboxEmitter, count: int, start: int = 0) -> list[str]:
    return [
        await emitter.emit(
            "orchestrator.step_started",
            workflow_state="PLAN_RUNNING",
            message=f"step {i}",
            workflow={"workflow_id": "wf-1", "step_id": f"s{i}"},
        )
        for i in range(start, start + count)
    ]


@pytest.fixture
async def server(data_dir: Path) -> AsyncIterator[AuditServer]:
    audit = await start_audit(data_dir)
    try:
        yield audit
    finally:
        await stop_audit(audit)


async def test_events_emitted_while_audit_is_down_arrive_in_order_once_it_starts(
    data_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    emitter = _emitter(tmp_path / "svc" / "outbox.db", port, data_dir)
    try:
        ids = await _emit(emitter, 30)
        assert await emitter.pending_count() == 30
        audit = await start_audit(data_dir, **{"server.addr": f"127.0.0.1:{port}"})
        try:
            assert await emitter.wait_drained(WAIT)
            stored = await _stored(audit)
        finally:
            await stop_audit(audit)
    finally:
        await emitter.aclose()
    assert [e.event.event_id for e in stored] == ids
    assert [e.sequence for e in stored] == list(range(30))
    assert all(e.event.workflow_state == "PLAN_RUNNING" for e in stored)


async def test_a_restarted_audit_service_gets_the_rest_in_order_and_none_twice(
    data_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    overrides = {"server.addr": f"127.0.0.1:{port}"}
    emitter = _emitter(tmp_path / "outbox.db", port, data_dir)
    try:
        audit = await start_audit(data_dir, **overrides)
        ids = await _emit(emitter, 10)
        assert await emitter.wait_drained(WAIT)
        await stop_audit(audit)
        ids += await _emit(emitter, 10, start=10)
        audit = await start_audit(data_dir, **overrides)
        try:
            assert await emitter.wait_drained(WAIT)
            stored = await _stored(audit)
        finally:
            await stop_audit(audit)
    finally:
        await emitter.aclose()
    assert [e.event.event_id for e in stored] == ids


async def test_a_stream_ended_for_idleness_is_reopened_by_the_next_event(
    server: AuditServer, tmp_path: Path, data_dir: Path
) -> None:
    emitter = _emitter(tmp_path / "outbox.db", server.port, data_dir, idle=0.01)
    try:
        ids = []
        for round_ in range(3):
            ids += await _emit(emitter, 5, start=round_ * 5)
            assert await emitter.wait_drained(WAIT)
    finally:
        await emitter.aclose()
    assert [e.event.event_id for e in await _stored(server)] == ids


async def test_events_sent_again_are_deduplicated_by_event_id(
    server: AuditServer, tmp_path: Path, data_dir: Path
) -> None:
    outbox = tmp_path / "a" / "outbox.db"
    offline = _emitter(outbox, free_port(), data_dir)
    ids = await _emit(offline, 10)
    await offline.aclose()
    # A copy of the outbox as it was before any ack: as if acks were lost in a crash.
    copy = tmp_path / "b" / "outbox.db"
    copy.parent.mkdir()
    shutil.copy(outbox, copy)
    for path in (outbox, copy):
        emitter = _emitter(path, server.port, data_dir)
        try:
            assert await emitter.wait_drained(WAIT)
        finally:
            await emitter.aclose()
    assert [e.event.event_id for e in await _stored(server)] == ids


async def _drain_into(fake: FakeAudit, tmp_path: Path, data_dir: Path, count: int) -> list[str]:
    """Emit ``count`` events while nothing listens, then serve ``fake`` until all are acked."""
    port = free_port()
    emitter = _emitter(tmp_path / "outbox.db", port, data_dir)
    try:
        ids = await _emit(emitter, count)
        app = await serve_fake(fake, data_dir, **{"server.addr": f"127.0.0.1:{port}"})
        try:
            assert await emitter.wait_drained(WAIT)
        finally:
            await app.stop(0)
        assert await emitter.dead_letters() == []
    finally:
        await emitter.aclose()
    return ids


def test_removing_acknowledged_events_leaves_the_outbox_fsyncing_every_insert(
    tmp_path: Path,
) -> None:
    # Deletes skip their own fsync (a lost one only re-sends a de-duplicated event);
    # inserts, which make emit durable, must still be synchronous=FULL afterwards.
    outbox = _Outbox(tmp_path / "outbox.db")
    try:
        outbox.put([("e1", b"x", 1), ("e2", b"y", 2)])
        (first, _, _), _ = outbox.after(0, 10)
        assert outbox.remove([first]) == 1
        conn = outbox._db()
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        outbox.close()


async def test_waiting_events_are_sent_in_bounded_batches_in_order(
    tmp_path: Path, data_dir: Path
) -> None:
    fake = FakeAudit(batches=True)
    ids = await _drain_into(fake, tmp_path, data_dir, 600)
    assert fake.acked == ids
    assert max(fake.request_sizes) == MAX_BATCH_EVENTS
    assert sum(size or 1 for size in fake.request_sizes) == 600


async def test_a_service_without_batches_gets_every_event_once_in_order_one_per_message(
    tmp_path: Path, data_dir: Path
) -> None:
    fake = FakeAudit(batches=False)
    # 257: a full batch and a lone event, which must not overtake the refused batch.
    ids = await _drain_into(fake, tmp_path, data_dir, 257)
    assert fake.acked == ids
    assert fake.request_sizes[0] > 1
    assert fake.singly_after_the_first_refused_batch()


async def test_batches_through_a_real_service_store_every_event_once_in_order(
    data_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    emitter = _emitter(tmp_path / "outbox.db", port, data_dir)
    try:
        ids = await _emit(emitter, 700)
        audit = await start_audit(data_dir, **{"server.addr": f"127.0.0.1:{port}"})
        try:
            assert await emitter.wait_drained(WAIT)
            stored = await _stored(audit)
        finally:
            await stop_audit(audit)
    finally:
        await emitter.aclose()
    assert [e.event.event_id for e in stored] == ids
    assert [e.sequence for e in stored] == list(range(700))


async def test_a_refused_event_is_dead_lettered_reported_and_does_not_block_the_rest(
    server: AuditServer, tmp_path: Path, data_dir: Path
) -> None:
    taken = event("taken", event_type="orchestrator.other")
    taken.event_id = "taken-id"
    await server.client.append(taken)
    emitter = _emitter(tmp_path / "outbox.db", server.port, data_dir)
    try:
        await emitter.emit("orchestrator.step_started", workflow_state="INIT", event_id="taken-id")
        after = await _emit(emitter, 3)
        assert await emitter.wait_drained(WAIT)
        dead = await emitter.dead_letters()
    finally:
        await emitter.aclose()
    assert [(event_id, code) for event_id, code, _ in dead] == [
        ("taken-id", grpc.StatusCode.ALREADY_EXISTS.value[0])
    ]
    stored = await _stored(server)
    assert [e.event.event_id for e in stored[1:4]] == after
    report = stored[4].event
    assert report.event_type == "orchestrator.audit_event_refused"
    assert "taken-id" in report.message


async def test_emit_fails_closed_when_the_outbox_cannot_be_created(
    tmp_path: Path, data_dir: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data dir should be")
    emitter = _emitter(blocker / "outbox.db", free_port(), data_dir)
    try:
        with pytest.raises(EmitError):
            await _emit(emitter, 1)
    finally:
        await emitter.aclose()


async def test_emit_fails_closed_when_the_outbox_stops_being_writable(
    tmp_path: Path, data_dir: Path
) -> None:
    path = tmp_path / "outbox.db"
    emitter = _emitter(path, free_port(), data_dir)
    try:
        await _emit(emitter, 1)
        with sqlite3.connect(path) as other:
            other.execute("DROP TABLE outbox")
        with pytest.raises(EmitError):
            await _emit(emitter, 1)
    finally:
        await emitter.aclose()


async def test_secrets_are_redacted_before_the_outbox(tmp_path: Path, data_dir: Path) -> None:
    secret = "ghp_" + "Zy9Xw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe9Dc8"
    path = tmp_path / "outbox.db"
    emitter = _emitter(path, free_port(), data_dir)
    try:
        await emitter.emit(
            "orchestrator.engine_failed",
            workflow_state="FAILED",
            message=f"git push with {secret} failed",
        )
    finally:
        await emitter.aclose()
    stored = _outbox_bytes(tmp_path)
    assert secret.encode() not in stored
    assert b"[REDACTED:github-pat]" in stored


async def test_an_event_without_component_prefix_or_valid_parts_is_refused_at_emit(
    tmp_path: Path, data_dir: Path
) -> None:
    emitter = _emitter(tmp_path / "outbox.db", free_port(), data_dir)
    try:
        with pytest.raises(InvalidArgument):
            await emitter.emit("approval.created", workflow_state="INIT")
        with pytest.raises(InvalidArgument):
            await emitter.emit("orchestrator.x", workflow_state="INIT", severity="loud")
        with pytest.raises(InvalidArgument):
            await emitter.emit("orchestrator.x", workflow_state="")
        assert await emitter.pending_count() == 0
    finally:
        await emitter.aclose()


async def test_emitter_for_gives_one_emitter_per_component_that_closes_with_the_server(
    data_dir: Path,
) -> None:
    config = make_config(data_dir, services=("audit",))
    app, port = await create_server(config)
    await app.start()
    try:
        emitter = emitter_for(app.context, "approval")
        assert emitter_for(app.context, "approval") is emitter
        assert emitter_for(app.context, "orchestrator") is not emitter
        event_id = await emitter.emit(
            "approval.created", workflow_state="AWAITING_APPROVAL", approval=None
        )
        assert await cast(OutboxEmitter, emitter).wait_drained(WAIT)
        assert (data_dir / "approval" / "outbox.db").exists()
        token = token_for(config, "alice", ["auditor"])
        audit = AuditServer(app, config, _client(port, token))
        try:
            stored = await _stored(audit)
        finally:
            await audit.client.aclose()
        assert [e.event.event_id for e in stored] == [event_id]
    finally:
        await app.stop(0)
    with pytest.raises(EmitError):
        await emitter.emit("approval.created", workflow_state="INIT")


def _outbox_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.glob("outbox.db*"))


def _client(port: int, token: str) -> object:
    from cabincrew.clients import AuditClient, ChannelOptions, open_channel

    return AuditClient(open_channel(ChannelOptions(address=f"127.0.0.1:{port}", token=token)))
