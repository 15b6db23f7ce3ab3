"""AuditService through a real gRPC server on port 0, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from audit_svc.checkpoint import parse_and_verify
from audit_svc.merkle import verify_consistency, verify_inclusion
from audit_svc.service import MAX_REQUEST_EVENTS
from audit_svc.store import _APPEND_LOCK_KEY
from cabincrew.clients import ChannelOptions, RPCError, open_channel
from cabincrew.v1 import audit_pb2, audit_pb2_grpc, common_pb2
from tests.audit.conftest import WAIT, AuditServer, event, start_audit, stop_audit

pytestmark = pytest.mark.timeout(60)


async def _append_all(server: AuditServer, count: int, prefix: str = "ev") -> list[Any]:
    return [await server.client.append(event(i, prefix=prefix)) for i in range(count)]


async def _stream(
    server: AuditServer, events: list[common_pb2.AuditEvent]
) -> list[audit_pb2.AppendStreamResponse]:
    stub = audit_pb2_grpc.AuditServiceStub(server.client.channel)

    async def requests() -> AsyncIterator[audit_pb2.AppendStreamRequest]:
        for item in events:
            yield audit_pb2.AppendStreamRequest(event=item)

    return [response async for response in stub.AppendStream(requests(), timeout=WAIT)]


async def _entries(server: AuditServer, **filters: Any) -> list[audit_pb2.LogEntry]:
    request = audit_pb2.QueryEventsRequest(filter=audit_pb2.EventFilter(**filters), page_size=1000)
    return [entry async for page in server.client.query(request) for entry in page.entries]


# --- appending -------------------------------------------------------------------------------


async def test_appends_get_consecutive_sequences_and_acks_carry_leaf_hashes(
    audit: AuditServer,
) -> None:
    acks = await _append_all(audit, 5)
    assert [ack.sequence for ack in acks] == [0, 1, 2, 3, 4]
    assert not any(ack.duplicate for ack in acks)
    entries = await _entries(audit)
    assert [entry.leaf_hash for entry in entries] == [ack.leaf_hash for ack in acks]


async def test_the_same_event_again_is_a_duplicate_with_the_first_sequence(
    audit: AuditServer,
) -> None:
    await _append_all(audit, 3)
    again = await audit.client.append(event(1))
    assert (again.sequence, again.duplicate) == (1, True)
    assert len(await _entries(audit)) == 3


async def test_the_same_event_id_with_other_content_is_already_exists(audit: AuditServer) -> None:
    await audit.client.append(event(1))
    with pytest.raises(RPCError) as info:
        await audit.client.append(event(1, message="something else"))
    assert info.value.status == grpc.StatusCode.ALREADY_EXISTS


async def test_an_invalid_event_is_invalid_argument_with_field_violations(
    audit: AuditServer,
) -> None:
    invalid = event(1)
    invalid.ClearField("timestamp")
    with pytest.raises(RPCError) as info:
        await audit.client.append(invalid)
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert "timestamp" in {v.field for v in info.value.violations}


async def test_a_stream_acks_in_order_and_a_refused_event_does_not_end_it(
    audit: AuditServer,
) -> None:
    invalid = event(2)
    invalid.workflow_state = ""
    events = [event(0), event(1), invalid, event(3), event(1)]
    responses = await _stream(audit, events)
    assert [r.event_id for r in responses] == ["ev-0", "ev-1", "ev-2", "ev-3", "ev-1"]
    assert [r.ack.sequence for r in responses if r.HasField("ack")] == [0, 1, 2, 1]
    assert responses[4].ack.duplicate
    refused = responses[2].error
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "workflow_state" in {v.field for v in refused.field_violations}


async def test_a_conflicting_event_in_a_stream_is_an_item_error(audit: AuditServer) -> None:
    responses = await _stream(audit, [event(0), event(0, message="changed"), event(1)])
    assert responses[1].error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert responses[2].ack.sequence == 1


@contextlib.contextmanager
def _hold_write_lock(url: str) -> Iterator[None]:
    """Hold the log's write lock from outside, as a second writer would."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(sa.make_url(url).database or "", isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _APPEND_LOCK_KEY})
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _APPEND_LOCK_KEY})
            conn.commit()
    engine.dispose()


async def test_a_full_queue_is_resource_exhausted_with_a_retry_hint(
    data_dir: Path, database_url: str
) -> None:
    server = await start_audit(data_dir, database_url, **{"audit.max_queue": 1})
    stub = audit_pb2_grpc.AuditServiceStub(server.client.channel)
    try:
        with _hold_write_lock(server.store_url()):
            # The writer holds at most one batch while it waits for the lock and the queue
            # holds one event, so of three concurrent appends at least one is refused.
            calls = [
                asyncio.ensure_future(
                    stub.Append(audit_pb2.AppendRequest(event=event(i)), timeout=WAIT)
                )
                for i in range(3)
            ]
            done, _ = await asyncio.wait(calls, timeout=WAIT, return_when=asyncio.FIRST_EXCEPTION)
            refused = [c for c in done if c.exception() is not None]
            assert refused
        error = refused[0].exception()
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(error)
        assert status is not None
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
        await asyncio.wait(calls, timeout=WAIT)
        accepted = [c.result() for c in calls if c.exception() is None]
        assert all(not r.ack.duplicate for r in accepted)
    finally:
        await stop_audit(server)


# --- batches in AppendStream ------------------------------------------------------------------


def _batch(*events: common_pb2.AuditEvent) -> audit_pb2.AppendStreamRequest:
    return audit_pb2.AppendStreamRequest(events=list(events))


async def _send(
    server: AuditServer, requests: list[audit_pb2.AppendStreamRequest]
) -> list[audit_pb2.AppendStreamResponse]:
    stub = audit_pb2_grpc.AuditServiceStub(server.client.channel)

    async def each() -> AsyncIterator[audit_pb2.AppendStreamRequest]:
        for request in requests:
            yield request

    return [response async for response in stub.AppendStream(each(), timeout=WAIT)]


async def test_batches_are_answered_one_response_each_with_acks_in_order(
    audit: AuditServer,
) -> None:
    responses = await _send(
        audit,
        [
            _batch(*(event(i) for i in range(3))),
            audit_pb2.AppendStreamRequest(event=event(3)),
            _batch(*(event(i) for i in range(4, 9))),
        ],
    )
    assert [len(r.results) for r in responses] == [3, 0, 5]
    assert responses[1].ack.sequence == 3
    results = [*responses[0].results, *responses[2].results]
    assert [r.event_id for r in results] == [f"ev-{i}" for i in (0, 1, 2, 4, 5, 6, 7, 8)]
    assert [r.ack.sequence for r in results] == [0, 1, 2, 4, 5, 6, 7, 8]
    assert all(r.WhichOneof("outcome") == "ack" and not r.ack.duplicate for r in results)
    stored = await _entries(audit)
    assert [e.leaf_hash for e in stored] == [
        *(r.ack.leaf_hash for r in responses[0].results),
        responses[1].ack.leaf_hash,
        *(r.ack.leaf_hash for r in responses[2].results),
    ]


async def test_a_refused_event_in_a_batch_is_an_item_error_and_the_others_are_stored(
    audit: AuditServer,
) -> None:
    await audit.client.append(event("taken"))
    invalid = event(1)
    invalid.ClearField("timestamp")
    conflicting = event("taken", message="other content")
    (response,) = await _send(audit, [_batch(event(0), invalid, conflicting, event(3))])
    outcomes = [r.WhichOneof("outcome") for r in response.results]
    assert outcomes == ["ack", "error", "error", "ack"]
    assert [r.event_id for r in response.results] == ["ev-0", "ev-1", "ev-taken", "ev-3"]
    assert response.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "timestamp" in {v.field for v in response.results[1].error.field_violations}
    assert response.results[2].error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert [response.results[0].ack.sequence, response.results[3].ack.sequence] == [1, 2]
    assert [e.event.event_id for e in await _entries(audit)] == ["ev-taken", "ev-0", "ev-3"]


async def test_duplicates_inside_one_batch_get_the_first_sequence_or_a_conflict(
    audit: AuditServer,
) -> None:
    (response,) = await _send(
        audit, [_batch(event(0), event(1), event(0), event(1, message="changed"), event(2))]
    )
    results = response.results
    assert [r.ack.sequence for r in results if r.HasField("ack")] == [0, 1, 0, 2]
    assert [r.ack.duplicate for r in results if r.HasField("ack")] == [False, False, True, False]
    assert results[2].ack.leaf_hash == results[0].ack.leaf_hash
    assert results[3].error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert [e.event.event_id for e in await _entries(audit)] == ["ev-0", "ev-1", "ev-2"]


async def test_a_request_with_both_event_and_events_is_invalid_argument(
    sqlite_audit: AuditServer,
) -> None:
    both = _batch(event(1), event(2))
    both.event.CopyFrom(event(0))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _send(sqlite_audit, [both])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _entries(sqlite_audit) == []


async def test_a_batch_over_the_size_limit_is_invalid_argument(sqlite_audit: AuditServer) -> None:
    too_many = _batch(*(event(i) for i in range(MAX_REQUEST_EVENTS + 1)))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _send(sqlite_audit, [too_many])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_batch_that_does_not_fit_the_queue_is_refused_whole_with_a_retry_hint(
    data_dir: Path, database_url: str
) -> None:
    server = await start_audit(data_dir, database_url, **{"audit.max_queue": 1})
    stub = audit_pb2_grpc.AuditServiceStub(server.client.channel)
    batch = [event(i, prefix="batch") for i in range(3)]
    try:
        with _hold_write_lock(server.store_url()):
            # Fill the queue: the writer holds one event while it waits for the lock and the
            # queue holds one; the next unary append is refused, so the queue is full now.
            # One call at a time, each given a moment to be taken in before the next: sent
            # together under load, the first could still be queued when the second came,
            # and the writer would then empty the queue before the batch arrived.
            calls: list[asyncio.Future[Any]] = []
            for i in range(10):
                call = asyncio.ensure_future(
                    stub.Append(audit_pb2.AppendRequest(event=event(i)), timeout=WAIT)
                )
                calls.append(call)
                done, _ = await asyncio.wait([call], timeout=1.0)
                if done and call.exception() is not None:
                    break
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _send(server, [_batch(*batch)])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(info.value)
        assert status is not None
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
        await asyncio.wait(calls, timeout=WAIT)
        stored = {e.event.event_id for e in await _entries(server)}
        assert not stored & {e.event_id for e in batch}
        # Sent again once the writer is free, the whole batch goes in, in order.
        (response,) = await _send(server, [_batch(*batch)])
        sequences = [r.ack.sequence for r in response.results]
        assert sequences == list(range(len(stored), len(stored) + 3))
    finally:
        await stop_audit(server)


async def test_calls_without_credentials_are_unauthenticated(sqlite_audit: AuditServer) -> None:
    channel = open_channel(ChannelOptions(address=f"127.0.0.1:{sqlite_audit.port}"))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await audit_pb2_grpc.AuditServiceStub(channel).Append(
                audit_pb2.AppendRequest(event=event(0)), timeout=WAIT
            )
    finally:
        await channel.close()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_acknowledged_events_survive_a_restart(data_dir: Path, database_url: str) -> None:
    server = await start_audit(data_dir, database_url)
    acks = await _append_all(server, 4)
    await stop_audit(server)
    server = await start_audit(data_dir, database_url)
    try:
        entries = await _entries(server)
        assert [e.leaf_hash for e in entries] == [a.leaf_hash for a in acks]
        assert (await server.client.append(event(4))).sequence == 4
        assert (await server.client.verify_log()).ok
    finally:
        await stop_audit(server)


# --- reading ---------------------------------------------------------------------------------


async def test_query_filters_by_workflow_step_type_severity_time_and_sequence(
    audit: AuditServer,
) -> None:
    severities = [
        common_pb2.EVENT_SEVERITY_DEBUG,
        common_pb2.EVENT_SEVERITY_INFO,
        common_pb2.EVENT_SEVERITY_WARNING,
        common_pb2.EVENT_SEVERITY_ERROR,
        common_pb2.EVENT_SEVERITY_CRITICAL,
    ]
    for i in range(10):
        await audit.client.append(
            event(
                i,
                event_type="approval.created" if i % 2 else "orchestrator.step_started",
                severity=severities[i % 5],
                workflow=common_pb2.AuditWorkflow(workflow_id=f"wf-{i % 3}", step_id=f"s{i % 2}"),
            )
        )

    async def sequences(**filters: Any) -> list[int]:
        return [e.sequence for e in await _entries(audit, **filters)]

    assert await sequences(workflow_id="wf-1") == [1, 4, 7]
    assert await sequences(workflow_id="wf-1", step_id="s0") == [4]
    assert await sequences(event_type="approval.created") == [1, 3, 5, 7, 9]
    assert await sequences(event_type_prefix="orchestrator.") == [0, 2, 4, 6, 8]
    assert await sequences(min_severity=common_pb2.EVENT_SEVERITY_ERROR) == [3, 4, 8, 9]
    start, end = common_pb2.AuditEvent().timestamp, common_pb2.AuditEvent().timestamp
    start.FromSeconds(1_700_000_002)
    end.FromSeconds(1_700_000_005)
    assert await sequences(from_time=start, to_time=end) == [2, 3, 4]
    assert await sequences(from_sequence=7) == [7, 8, 9]
    assert await sequences(from_sequence=2, to_sequence=4) == [2, 3]


async def test_query_pages_and_resumes_from_a_page_token(audit: AuditServer) -> None:
    await _append_all(audit, 7)
    request = audit_pb2.QueryEventsRequest(page_size=3)
    pages = [page async for page in audit.client.query(request)]
    assert [[e.sequence for e in p.entries] for p in pages] == [[0, 1, 2], [3, 4, 5], [6]]
    assert pages[-1].next_page_token == ""
    resumed = audit_pb2.QueryEventsRequest(
        page_size=3, page_token=pages[0].next_page_token, limit=2
    )
    rest = [e.sequence async for p in audit.client.query(resumed) for e in p.entries]
    assert rest == [3, 4]


async def test_a_malformed_page_token_is_invalid_argument(sqlite_audit: AuditServer) -> None:
    with pytest.raises(RPCError) as info:
        async for _ in sqlite_audit.client.query(audit_pb2.QueryEventsRequest(page_token="x")):
            pass
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT


async def test_query_returns_events_as_exported_with_their_chain_hash(audit: AuditServer) -> None:
    await _append_all(audit, 2)
    entries = await _entries(audit)
    assert entries[1].event.chain_hash == entries[1].chain_hash.hex()
    assert entries[1].event.event_id == "ev-1"
    assert entries[1].HasField("received_at")


async def test_tail_delivers_stored_then_live_events_in_order(audit: AuditServer) -> None:
    await _append_all(audit, 3)
    received: list[int] = []
    stream = audit.client.tail(audit_pb2.TailEventsRequest(from_sequence=1))

    async def follow() -> None:
        async for response in stream:
            received.append(response.entry.sequence)
            if len(received) == 2:
                # Caught up with the stored events: append the live ones now.
                for i in range(3, 6):
                    await audit.client.append(event(i))
            if len(received) == 5:
                return

    await asyncio.wait_for(follow(), WAIT)
    await stream.aclose()  # type: ignore[attr-defined]
    assert received == [1, 2, 3, 4, 5]


async def test_tail_applies_the_filter(sqlite_audit: AuditServer) -> None:
    for i in range(6):
        await sqlite_audit.client.append(
            event(i, event_type="approval.created" if i % 2 else "test.other")
        )
    request = audit_pb2.TailEventsRequest(
        filter=audit_pb2.EventFilter(event_type_prefix="approval.")
    )
    seen: list[int] = []

    async def follow() -> None:
        async for response in sqlite_audit.client.tail(request):
            seen.append(response.entry.sequence)
            if len(seen) == 3:
                return

    await asyncio.wait_for(follow(), WAIT)
    assert seen == [1, 3, 5]


# --- checkpoints and proofs ------------------------------------------------------------------


async def test_a_checkpoint_is_a_signed_note_over_the_current_tree(audit: AuditServer) -> None:
    await _append_all(audit, 5)
    checkpoint = await audit.client.get_checkpoint(refresh=True)
    signed = parse_and_verify(checkpoint.note, checkpoint.verifier_key)
    assert (signed.origin, signed.size, signed.root) == (
        "cabincrew.local/audit",
        5,
        checkpoint.root_hash,
    )
    assert checkpoint.verifier_key.endswith(
        base64.b64encode(b"\x01" + checkpoint.public_key).decode()
    )
    latest = await audit.client.get_checkpoint(refresh=False)
    assert latest.tree_size == 5


async def test_scheduled_checkpoints_follow_the_tree(data_dir: Path) -> None:
    server = await start_audit(data_dir, **{"audit.checkpoint_interval_seconds": 0.05})
    try:
        await _append_all(server, 3)

        async def until_signed() -> int:
            # Each call is a round trip; the scheduler signs every 50 ms.
            while (size := (await server.client.get_checkpoint()).tree_size) != 3:
                pass
            return size

        assert await asyncio.wait_for(until_signed(), WAIT) == 3
    finally:
        await stop_audit(server)


async def test_inclusion_proofs_verify_against_the_checkpoint_root(audit: AuditServer) -> None:
    acks = await _append_all(audit, 11)
    checkpoint = await audit.client.get_checkpoint(refresh=True)
    for ack in acks:
        proof = await audit.client.inclusion_proof(ack.sequence)
        assert proof.leaf_hash == ack.leaf_hash
        assert verify_inclusion(
            ack.leaf_hash, ack.sequence, 11, list(proof.hashes), checkpoint.root_hash
        )
    older = await audit.client.inclusion_proof(2, tree_size=5)
    assert verify_inclusion(acks[2].leaf_hash, 2, 5, list(older.hashes), older.root_hash)


async def test_consistency_proofs_link_earlier_trees_to_the_current_one(audit: AuditServer) -> None:
    await _append_all(audit, 4)
    first = await audit.client.get_checkpoint(refresh=True)
    await _append_all(audit, 9, prefix="later")
    second = await audit.client.get_checkpoint(refresh=True)
    proof = await audit.client.consistency_proof(4)
    assert proof.to_size == 13
    assert verify_consistency(4, 13, list(proof.hashes), first.root_hash, second.root_hash)


@pytest.mark.parametrize(
    ("sequence", "tree_size"), [(5, 0), (1, 9), (-1, 0)], ids=["beyond", "big-tree", "negative"]
)
async def test_a_proof_outside_the_tree_is_invalid_argument(
    sqlite_audit: AuditServer, sequence: int, tree_size: int
) -> None:
    await _append_all(sqlite_audit, 3)
    with pytest.raises(RPCError) as info:
        await sqlite_audit.client.inclusion_proof(sequence, tree_size)
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_consistency_proof_from_the_empty_tree_is_invalid_argument(
    sqlite_audit: AuditServer,
) -> None:
    await _append_all(sqlite_audit, 2)
    with pytest.raises(RPCError) as info:
        await sqlite_audit.client.consistency_proof(0)
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_slow_tail_consumer_still_gets_every_event_in_order(
    sqlite_audit: AuditServer,
) -> None:
    # The tail reads the store page by page as the consumer pulls, so a consumer that stops
    # reading holds back only one page on the server, however much is appended meanwhile.
    await sqlite_audit.client.append(event(0))
    stream = sqlite_audit.client.tail(audit_pb2.TailEventsRequest())
    first = await asyncio.wait_for(stream.__anext__(), WAIT)  # type: ignore[attr-defined]
    assert first.entry.sequence == 0
    await _stream(sqlite_audit, [event(i) for i in range(1, 1500)])
    seen = [first.entry.sequence]

    async def rest() -> None:
        async for response in stream:
            seen.append(response.entry.sequence)
            if len(seen) == 1500:
                return

    await asyncio.wait_for(rest(), WAIT)
    await stream.aclose()  # type: ignore[attr-defined]
    assert seen == list(range(1500))


async def test_concurrent_appends_are_group_committed_gap_free(audit: AuditServer) -> None:
    # Rows written by one transaction share its received time: fewer distinct times than
    # events means several concurrent appends were committed together.
    count = 200
    acks = await asyncio.gather(
        *(audit.client.append(event(i, prefix="group")) for i in range(count))
    )
    assert sorted(ack.sequence for ack in acks) == list(range(count))
    url = audit.store_url()
    table = "audit.audit_events" if url.startswith("postgresql") else "audit_events"
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text(f"SELECT sequence, received_at_us FROM {table} ORDER BY sequence")
            ).all()
    finally:
        engine.dispose()
    assert [row[0] for row in rows] == list(range(count))
    transactions = len({row[1] for row in rows})
    assert transactions < count
