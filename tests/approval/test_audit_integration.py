"""Every refusal reaches the real audit log: the approval service's own outbox emitter
streams to a real AuditService hosted by the same server."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest

from cabincrew.clients import AuditClient, ChannelOptions, RPCError, open_channel
from cabincrew.convert import to_protocol, validate_protocol
from cabincrew.v1 import audit_pb2, common_pb2
from tests.approval.conftest import ApprovalEnv, StartServer, create_request, subject


async def refused(call: object, code: grpc.StatusCode) -> None:
    with pytest.raises(RPCError) as info:
        await call  # type: ignore[misc]
    assert info.value.status == code


async def tail(env: ApprovalEnv, event_type: str, count: int) -> list[common_pb2.AuditEvent]:
    """The first ``count`` events of ``event_type`` in the audit log (bounded wait)."""
    token = env.token("auditor", ["auditor"])
    client = AuditClient(open_channel(ChannelOptions(address=f"127.0.0.1:{env.port}", token=token)))
    found: list[common_pb2.AuditEvent] = []
    request = audit_pb2.TailEventsRequest(
        from_sequence=0, filter=audit_pb2.EventFilter(event_type=event_type)
    )

    async def collect() -> None:
        async for response in client.tail(request):
            found.append(response.entry.event)
            if len(found) == count:
                return

    try:
        await asyncio.wait_for(collect(), 30)
    finally:
        await client.aclose()
    return found


async def test_each_refusal_is_in_the_audit_log(start_server: StartServer) -> None:
    env = await start_server(
        services=("audit", "approval"), real_audit=True, **{"auth.allow_anonymous": True}
    )
    orchestrator = env.client("orchestrator", ["service"])
    carol = env.client("carol", ["release-manager"])
    alice_token = env.token("alice", ["release-manager"])
    alice = env.client("alice", ["release-manager"])

    pending = await orchestrator.create(create_request(on_behalf_of="alice"))
    await refused(
        carol.respond(pending.approval_id, subject("another plan"), True),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await refused(
        env.client("mallory", ["developer"]).respond(
            pending.approval_id, pending.subject_hash, True
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await refused(
        alice.respond(pending.approval_id, pending.subject_hash, True),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await refused(
        env.client(None).respond(pending.approval_id, pending.subject_hash, True),
        grpc.StatusCode.UNAUTHENTICATED,
    )

    used = await orchestrator.create(create_request(subject("used"), on_behalf_of="alice"))
    await carol.respond(used.approval_id, used.subject_hash, True)
    await orchestrator.consume(used.approval_id, used.subject_hash)
    await refused(
        orchestrator.consume(used.approval_id, used.subject_hash),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    env.clock.advance(timedelta(hours=25))
    await refused(
        carol.respond(pending.approval_id, pending.subject_hash, True),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    events = await tail(env, "approval.refused", 6)
    reasons = [e.approval.reason.split(":", 1)[0] for e in events]
    assert reasons == [
        "subject_mismatch",
        "wrong_role",
        "self_approval",
        "unauthenticated",
        "double_consume",
        "expired",
    ]
    for event in events:
        document = to_protocol(event)
        assert validate_protocol(document, "AuditEvent") == []
        assert event.approval.approval_id in (pending.approval_id, used.approval_id)
        assert alice_token not in str(event)
    (expired,) = await tail(env, "approval.expired", 1)
    assert expired.approval.approval_id == pending.approval_id
