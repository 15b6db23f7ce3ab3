"""ApprovalService through a real gRPC server on a loopback port.

Every refusal is checked twice: the status code on the wire and the ``approval.refused``
audit event that names it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import duration_pb2

from approval_svc import wire
from approval_svc.records import verify_approval, verify_record
from cabincrew.clients import ApprovalClient, RPCError
from cabincrew.convert import validate_protocol
from cabincrew.v1 import approval_pb2, common_pb2
from tests.approval.conftest import (
    START,
    ApprovalEnv,
    StartServer,
    client_channel,
    create_request,
    subject,
)
from tests.conftest import make_config, token_for

T = TypeVar("T")

PENDING = approval_pb2.APPROVAL_STATE_PENDING
APPROVED = approval_pb2.APPROVAL_STATE_APPROVED
REJECTED = approval_pb2.APPROVAL_STATE_REJECTED
EXPIRED = approval_pb2.APPROVAL_STATE_EXPIRED
CANCELLED = approval_pb2.APPROVAL_STATE_CANCELLED
CONSUMED = approval_pb2.APPROVAL_STATE_CONSUMED


async def refused(call: Awaitable[Any], code: grpc.StatusCode) -> RPCError:
    """Await ``call`` and check that it fails with ``code``."""
    with pytest.raises(RPCError) as info:
        await call
    assert info.value.status == code
    return info.value


async def create(
    env: ApprovalEnv, requester: str = "alice", **fields: Any
) -> approval_pb2.Approval:
    return await env.client(requester, ["developer"]).create(create_request(**fields))


async def test_create_opens_a_pending_approval_bound_to_the_subject(env: ApprovalEnv) -> None:
    approval = await create(env, subject_hash=subject("plan-1"))

    assert approval.state == PENDING
    assert approval.subject_hash == subject("plan-1")
    assert approval.requester == "alice"
    assert approval.created_by == "alice"
    assert approval.quorum == 1
    assert approval.expires_at.ToDatetime().replace(tzinfo=START.tzinfo) == START + timedelta(
        hours=24
    )
    (event,) = env.audit.of_type("approval.created")
    assert event["approval"]["approval_id"] == approval.approval_id
    assert event["approval"]["plan_token_hash"] == subject("plan-1")
    assert event["approval"]["required_role"] == "release-manager"
    assert event["workflow"] == {"workflow_id": "wf-1", "step_id": "deploy"}
    assert event["workflow_state"] == "AWAITING_APPROVAL"


async def test_create_is_idempotent_by_request_id(env: ApprovalEnv) -> None:
    first = await create(env, request_id="req-1")
    again = await create(env, request_id="req-1")
    assert again.approval_id == first.approval_id
    assert len(env.audit.of_type("approval.created")) == 1

    await refused(
        create(env, request_id="req-1", reason="something else"), grpc.StatusCode.ALREADY_EXISTS
    )


async def test_create_reports_each_invalid_field(env: ApprovalEnv) -> None:
    error = await refused(
        create(env, subject_hash="not-a-hash", required_role="", quorum=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {v.field for v in error.violations} >= {"quorum"}
    error = await refused(
        create(env, subject_hash="nothex", required_role=""), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert {v.field for v in error.violations} >= {"subject_hash", "required_role"}


async def test_a_ttl_and_a_quorum_can_be_asked_for(env: ApprovalEnv) -> None:
    approval = await create(env, ttl=duration_pb2.Duration(seconds=600), quorum=3)
    assert approval.quorum == 3
    assert (approval.expires_at.seconds - approval.created_at.seconds) == 600


async def test_only_a_service_may_ask_on_behalf_of_someone(env: ApprovalEnv) -> None:
    await refused(create(env, on_behalf_of="bob"), grpc.StatusCode.PERMISSION_DENIED)
    assert env.audit.refusals("not_allowed")

    orchestrator = env.client("orchestrator", ["service"])
    approval = await orchestrator.create(create_request(on_behalf_of="bob"))
    assert approval.requester == "bob"
    assert approval.created_by == "orchestrator"


async def test_approving_another_subject_hash_is_refused(env: ApprovalEnv) -> None:
    approval = await create(env, subject_hash=subject("what was judged"))
    carol = env.client("carol", ["release-manager"])

    await refused(
        carol.respond(approval.approval_id, subject("something else"), True),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    (event,) = env.audit.refusals("subject_mismatch")
    assert event["approval"]["approval_id"] == approval.approval_id
    assert event["approval"]["approver"] == "carol"
    assert event["approval"]["plan_token_hash"] == subject("what was judged")
    assert (await carol.get(approval.approval_id)).state == PENDING


async def test_an_approver_without_the_required_role_is_refused(env: ApprovalEnv) -> None:
    approval = await create(env)
    mallory = env.client("mallory", ["developer"])

    await refused(
        mallory.respond(approval.approval_id, approval.subject_hash, True),
        grpc.StatusCode.PERMISSION_DENIED,
    )

    (event,) = env.audit.refusals("wrong_role")
    assert event["approval"]["approver"] == "mallory"
    assert event["approval"]["required_role"] == "release-manager"


async def test_the_requester_cannot_approve_their_own_request(env: ApprovalEnv) -> None:
    alice = env.client("alice", ["release-manager"])
    approval = await alice.create(create_request())

    await refused(
        alice.respond(approval.approval_id, approval.subject_hash, True),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert env.audit.refusals("self_approval")


async def test_a_requester_named_by_a_service_cannot_approve_either(env: ApprovalEnv) -> None:
    orchestrator = env.client("orchestrator", ["service"])
    approval = await orchestrator.create(create_request(on_behalf_of="bob"))
    bob = env.client("bob", ["release-manager"])

    await refused(
        bob.respond(approval.approval_id, approval.subject_hash, True),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert env.audit.refusals("self_approval")


async def test_calls_without_credentials_are_unauthenticated_and_audited(
    env: ApprovalEnv, tmp_path: Path
) -> None:
    approval = await create(env)
    anonymous = env.client(None)
    # Signed by a key the service does not trust.
    stranger = token_for(make_config(tmp_path / "elsewhere"), "mallory", ["approver"])
    forged = ApprovalClient(client_channel(env.port, stranger), deadline_seconds=10, max_attempts=1)
    try:
        await refused(
            anonymous.respond(approval.approval_id, approval.subject_hash, True),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        await refused(
            forged.respond(approval.approval_id, approval.subject_hash, True),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    finally:
        await forged.aclose()

    events = env.audit.refusals("unauthenticated")
    assert [e["message"].split(" ")[0] for e in events] == ["RespondApproval"] * 2
    assert all(e["approval"]["approver"] == "" for e in events)
    assert stranger not in json.dumps(events)


async def test_anonymous_callers_are_refused_and_audited_where_the_server_admits_them(
    start_server: StartServer,
) -> None:
    env = await start_server(**{"auth.allow_anonymous": True})
    approval = await create(env)
    anonymous = env.client(None)

    await refused(
        anonymous.respond(approval.approval_id, approval.subject_hash, True),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await refused(anonymous.create(create_request()), grpc.StatusCode.UNAUTHENTICATED)
    await refused(anonymous.get(approval.approval_id), grpc.StatusCode.UNAUTHENTICATED)

    events = env.audit.refusals("unauthenticated")
    assert len(events) == 3
    assert events[0]["approval"]["approval_id"] == approval.approval_id
    assert events[0]["approval"]["approver"] == ""


async def test_an_expired_approval_cannot_be_approved(env: ApprovalEnv) -> None:
    approval = await create(env)
    carol = env.client("carol", ["release-manager"])
    env.clock.advance(timedelta(hours=24))

    await refused(
        carol.respond(approval.approval_id, approval.subject_hash, True),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    assert env.audit.refusals("expired")
    assert len(env.audit.of_type("approval.expired")) == 1
    assert (await carol.get(approval.approval_id)).state == EXPIRED


async def test_an_expired_approval_cannot_be_consumed(env: ApprovalEnv) -> None:
    orchestrator = env.client("orchestrator", ["service"])
    approval = await orchestrator.create(create_request(on_behalf_of="alice"))
    carol = env.client("carol", ["release-manager"])
    await carol.respond(approval.approval_id, approval.subject_hash, True)
    env.clock.advance(timedelta(hours=25))

    await refused(
        orchestrator.consume(approval.approval_id, approval.subject_hash),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    assert env.audit.refusals("expired")
    assert (await orchestrator.get(approval.approval_id)).state == EXPIRED


async def test_expiry_is_enforced_on_read(env: ApprovalEnv) -> None:
    approval = await create(env)
    env.clock.advance(timedelta(days=2))
    reader = env.client("reader", [])

    assert (await reader.get(approval.approval_id)).state == EXPIRED
    assert len(env.audit.of_type("approval.expired")) == 1
    assert (await reader.get(approval.approval_id)).state == EXPIRED
    assert len(env.audit.of_type("approval.expired")) == 1


async def test_an_approved_approval_is_consumed_once_only(env: ApprovalEnv) -> None:
    orchestrator = env.client("orchestrator", ["service"])
    approval = await orchestrator.create(create_request(on_behalf_of="alice"))
    carol = env.client("carol", ["release-manager"])
    await carol.respond(approval.approval_id, approval.subject_hash, True)

    used = await orchestrator.consume(approval.approval_id, approval.subject_hash, "use-1")
    assert used.state == CONSUMED
    assert used.consumed_by == "orchestrator"
    # A retry of the same call (same request id) is not a second use.
    retried = await orchestrator.consume(approval.approval_id, approval.subject_hash, "use-1")
    assert retried.state == CONSUMED

    await refused(
        orchestrator.consume(approval.approval_id, approval.subject_hash, "use-2"),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert len(env.audit.of_type("approval.consumed")) == 1
    assert env.audit.refusals("double_consume")


async def test_consuming_for_another_subject_hash_fails(env: ApprovalEnv) -> None:
    orchestrator = env.client("orchestrator", ["service"])
    approval = await orchestrator.create(create_request(on_behalf_of="alice"))
    await env.client("carol", ["release-manager"]).respond(
        approval.approval_id, approval.subject_hash, True
    )

    await refused(
        orchestrator.consume(approval.approval_id, subject("drifted plan")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert env.audit.refusals("subject_mismatch")
    assert (await orchestrator.get(approval.approval_id)).state == APPROVED


async def test_a_pending_approval_cannot_be_consumed(env: ApprovalEnv) -> None:
    orchestrator = env.client("orchestrator", ["service"])
    approval = await orchestrator.create(create_request(on_behalf_of="alice"))

    await refused(
        orchestrator.consume(approval.approval_id, approval.subject_hash),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert env.audit.refusals("wrong_state")


async def test_only_a_service_or_the_creator_may_consume(env: ApprovalEnv) -> None:
    orchestrator = env.client("orchestrator", ["service"])
    approval = await orchestrator.create(create_request(on_behalf_of="alice"))
    await env.client("carol", ["release-manager"]).respond(
        approval.approval_id, approval.subject_hash, True
    )

    for name in ("alice", "carol"):
        await refused(
            env.client(name, ["release-manager"]).consume(
                approval.approval_id, approval.subject_hash
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    assert len(env.audit.refusals("not_allowed")) == 2


async def test_a_quorum_of_two_needs_two_distinct_approvers(env: ApprovalEnv) -> None:
    approval = await create(env, quorum=2)
    carol = env.client("carol", ["release-manager"])
    dave = env.client("dave", ["admin"])

    after_one = await carol.respond(approval.approval_id, approval.subject_hash, True, "ok")
    assert after_one.state == PENDING
    await refused(
        carol.respond(approval.approval_id, approval.subject_hash, True, "again"),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert env.audit.refusals("already_responded")
    assert (await carol.get(approval.approval_id)).state == PENDING

    after_two = await dave.respond(approval.approval_id, approval.subject_hash, True, "fine")
    assert after_two.state == APPROVED
    assert [d.approver for d in after_two.decisions] == ["carol", "dave"]
    assert len(env.audit.of_type("approval.responded")) == 2
    (approved,) = env.audit.of_type("approval.approved")
    assert approved["approval"]["approved"] is True


async def test_one_rejection_rejects(env: ApprovalEnv) -> None:
    approval = await create(env, quorum=2)
    carol = env.client("carol", ["release-manager"])

    await refused(
        carol.respond(approval.approval_id, approval.subject_hash, False, ""),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    rejected = await carol.respond(approval.approval_id, approval.subject_hash, False, "risky")
    assert rejected.state == REJECTED
    assert len(env.audit.of_type("approval.rejected")) == 1
    await refused(
        env.client("dave", ["release-manager"]).respond(
            approval.approval_id, approval.subject_hash, True
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_decision_records_are_signed_by_the_service_key(env: ApprovalEnv) -> None:
    approval = await create(env)
    carol = env.client("carol", ["release-manager", "sre"])
    approved = await carol.respond(approval.approval_id, approval.subject_hash, True, "lgtm")
    key = await carol.signing_key()

    (record,) = approved.decisions
    assert record.approver == "carol"
    assert list(record.approver_roles) == ["release-manager", "sre"]
    assert record.subject_hash == approval.subject_hash
    assert record.key_id == key.key_id
    domain = wire.approval_from_proto(approved)
    assert verify_approval(domain, key.public_key) == []
    assert verify_record(domain.decisions[0], key.public_key)


async def test_a_retried_response_is_answered_once(env: ApprovalEnv) -> None:
    approval = await create(env, quorum=2)
    carol = env.client("carol", ["release-manager"])
    request = approval_pb2.RespondApprovalRequest(
        approval_id=approval.approval_id,
        subject_hash=approval.subject_hash,
        approved=True,
        request_id="resp-1",
    )
    stub: Any = carol.stub
    first = await stub.RespondApproval(request, timeout=5)
    second = await stub.RespondApproval(request, timeout=5)
    assert first.approval == second.approval
    assert len(env.audit.of_type("approval.responded")) == 1


async def test_the_requester_or_an_admin_may_cancel(env: ApprovalEnv) -> None:
    approval = await create(env)
    await refused(
        env.client("carol", ["release-manager"]).cancel(approval.approval_id, "no"),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    cancelled = await env.client("alice", []).cancel(approval.approval_id, "not needed")
    assert cancelled.state == CANCELLED
    assert cancelled.cancelled_by == "alice"
    (event,) = env.audit.of_type("approval.cancelled")
    assert event["approval"]["reason"] == "not needed"

    other = await create(env)
    by_admin = await env.client("root", ["admin"]).cancel(other.approval_id, "cleanup")
    assert by_admin.state == CANCELLED
    await refused(
        env.client("carol", ["release-manager"]).respond(
            other.approval_id, other.subject_hash, True
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_unknown_approvals_are_not_found(env: ApprovalEnv) -> None:
    carol = env.client("carol", ["release-manager"])
    await refused(carol.get("nope"), grpc.StatusCode.NOT_FOUND)
    await refused(carol.respond("nope", subject(), True), grpc.StatusCode.NOT_FOUND)
    assert env.audit.refusals("not_found")


async def test_list_filters_and_pages(env: ApprovalEnv) -> None:
    created = []
    for index in range(5):
        created.append(
            await create(
                env,
                "alice" if index % 2 else "bob",
                workflow_id=f"wf-{index % 2}",
                required_role="sre" if index < 3 else "release-manager",
                subject_hash=subject(f"p{index}"),
            )
        )
        env.clock.advance(timedelta(seconds=1))
    reader = env.client("reader", [])

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await reader.list(approval_pb2.ListApprovalsRequest(page_size=2, page_token=token))
        pages += 1
        seen.extend(a.approval_id for a in page.approvals)
        token = page.next_page_token
        if not token:
            break
    assert seen == [a.approval_id for a in created]
    assert pages == 3

    sre = await reader.list(approval_pb2.ListApprovalsRequest(required_role="sre"))
    assert len(sre.approvals) == 3
    by_alice = await reader.list(approval_pb2.ListApprovalsRequest(requester="alice"))
    assert {a.requester for a in by_alice.approvals} == {"alice"}
    wf1 = await reader.list(approval_pb2.ListApprovalsRequest(workflow_id="wf-1"))
    assert len(wf1.approvals) == 2

    await env.client("root", ["admin"]).respond(
        created[0].approval_id, created[0].subject_hash, True
    )
    pending = await reader.list(approval_pb2.ListApprovalsRequest(state=PENDING))
    assert len(pending.approvals) == 4

    first = await reader.list(approval_pb2.ListApprovalsRequest(page_size=1))
    await refused(
        reader.list(
            approval_pb2.ListApprovalsRequest(
                page_size=1, page_token=first.next_page_token, required_role="sre"
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await refused(
        reader.list(approval_pb2.ListApprovalsRequest(page_token="garbage")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_the_sweeper_expires_overdue_approvals_once(env: ApprovalEnv) -> None:
    short = await create(env, ttl=duration_pb2.Duration(seconds=60), subject_hash=subject("a"))
    long = await create(env, subject_hash=subject("b"))
    env.clock.advance(timedelta(minutes=2))

    expired = await env.manager.sweep_once()
    assert [a.approval_id for a in expired] == [short.approval_id]
    assert await env.manager.sweep_once() == []
    (event,) = env.audit.of_type("approval.expired")
    assert event["approval"]["approval_id"] == short.approval_id
    assert event["severity"] == "warning"
    reader = env.client("reader", [])
    assert (await reader.get(long.approval_id)).state == PENDING


async def test_the_sweeper_runs_in_the_background(start_server: StartServer) -> None:
    env = await start_server(**{"approval.sweep_interval_seconds": 0.01})
    approval = await create(env, ttl=duration_pb2.Duration(seconds=60))
    reader = env.client("reader", [])
    stream = reader.watch(approval.approval_id)
    first = await asyncio.wait_for(anext(stream), 5)
    assert first.approval.state == PENDING

    env.clock.advance(timedelta(minutes=5))
    states = [u.approval.state async for u in _bounded(stream, 5)]
    assert states[-1] == EXPIRED
    assert len(env.audit.of_type("approval.expired")) == 1


async def test_watch_sends_the_current_state_then_each_change_until_terminal(
    env: ApprovalEnv,
) -> None:
    orchestrator = env.client("orchestrator", ["service"])
    approval = await orchestrator.create(create_request(on_behalf_of="alice", quorum=2))
    stream = orchestrator.watch(approval.approval_id)

    first = await asyncio.wait_for(anext(stream), 5)
    assert first.approval.state == PENDING
    await env.client("carol", ["release-manager"]).respond(
        approval.approval_id, approval.subject_hash, True
    )
    one = await asyncio.wait_for(anext(stream), 5)
    assert (one.approval.state, len(one.approval.decisions)) == (PENDING, 1)
    await env.client("dave", ["release-manager"]).respond(
        approval.approval_id, approval.subject_hash, True
    )
    two = await asyncio.wait_for(anext(stream), 5)
    assert two.approval.state == APPROVED
    await orchestrator.consume(approval.approval_id, approval.subject_hash)
    rest = [u.approval.state async for u in _bounded(stream, 5)]
    assert rest == [CONSUMED]


async def test_watching_an_unknown_approval_is_not_found(env: ApprovalEnv) -> None:
    stream = env.client("reader", []).watch("missing")
    await refused(anext(stream), grpc.StatusCode.NOT_FOUND)


async def test_gateway_approvals_carry_the_gateway_request(env: ApprovalEnv) -> None:
    gateway = env.client("mcp-gateway", ["service"])
    await refused(
        gateway.create(
            create_request(
                subject_kind=approval_pb2.SUBJECT_KIND_MCP_REQUEST, workflow_id="", step_id=""
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    approval = await gateway.create(
        create_request(
            subject_kind=approval_pb2.SUBJECT_KIND_MCP_REQUEST,
            workflow_id="",
            step_id="",
            gateway_request_id="mcp-req-7",
            on_behalf_of="agent-1",
        )
    )
    assert approval.gateway_request_id == "mcp-req-7"
    (event,) = env.audit.of_type("approval.created")
    assert event["gateway"] == {
        "gateway_type": "mcp",
        "request_id": "mcp-req-7",
        "policy_decision": "require_approval",
    }
    assert event["workflow"] is None


async def test_triggered_policies_and_artifacts_round_trip(env: ApprovalEnv) -> None:
    policy = common_pb2.PolicyEvaluation(
        source=common_pb2.POLICY_SOURCE_OPA,
        policy_id="prod-deploy",
        decision=common_pb2.DECISION_REQUIRE_APPROVAL,
        severity=2,
        reason="production",
    )
    artifact = approval_pb2.ArtifactSummary(
        name="patch", role="evidence", hash=subject("x"), size=42, preview="--- a\n+++ b\n"
    )
    approval = await create(env, triggered_policies=[policy], artifacts=[artifact])
    fetched = await env.client("reader", []).get(approval.approval_id)
    assert list(fetched.triggered_policies) == [policy]
    assert list(fetched.artifacts) == [artifact]


async def test_audit_events_hold_the_protocol_approval_part_and_no_secrets(
    env: ApprovalEnv,
) -> None:
    alice_token = env.token("alice", ["developer"])
    approval = await create(env)
    carol = env.client("carol", ["release-manager"])
    await refused(
        carol.respond(approval.approval_id, subject("other"), True),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await carol.respond(approval.approval_id, approval.subject_hash, True, "ok")

    assert {e["event_type"] for e in env.audit.events} == {
        "approval.created",
        "approval.refused",
        "approval.responded",
        "approval.approved",
    }
    for event in env.audit.events:
        assert validate_protocol(event["approval"], "AuditApproval") == []
        assert event["event_type"].startswith("approval.")
        text = repr(event)
        assert alice_token not in text
        assert "BEGIN PRIVATE KEY" not in text


async def _bounded(stream: Any, seconds: float) -> Any:
    """Items of ``stream`` until it ends, each within ``seconds``."""
    while True:
        try:
            item = await asyncio.wait_for(anext(stream), seconds)
        except StopAsyncIteration:
            return
        yield item
