"""Batches: max_concurrent, the quarantine / strict / continue policies, restarts."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cabincrew.clients import RPCError
from cabincrew.v1 import common_pb2, orchestrator_pb2
from tests.orchestrator.test_service_support import (
    TERMINAL,
    Orchestra,
    definition,
    engine,
    orchestra,
    start_orchestra,
    step_of,
)

__all__ = ["orchestra"]

GATE = definition([{"id": "g", "kind": "approval", "governance": {"approval_role": "approver"}}])
FAILS = definition(
    [
        {
            "id": "boom",
            "kind": "engine",
            "engine": {"command": engine("noop")},
            "config": {"fail": True},
        }
    ],
    id="fails",
)
AWAITING = common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL


def item(text: str) -> orchestrator_pb2.BatchItem:
    return orchestrator_pb2.BatchItem(definition=orchestrator_pb2.WorkflowDefinition(text=text))


async def submit(
    env: Orchestra, texts: list[str], max_concurrent: int, policy: int, request_id: str = ""
) -> orchestrator_pb2.Batch:
    return await env.workflows().submit_batch(
        orchestrator_pb2.SubmitBatchRequest(
            request_id=request_id,
            items=[item(text) for text in texts],
            max_concurrent=max_concurrent,
            failure_policy=policy,
        )
    )


async def approve_gate(env: Orchestra, workflow_id: str) -> None:
    waiting = await env.until(workflow_id, lambda w: w.state == AWAITING)
    approval_id = step_of(waiting, "g").approval_id
    approval = await env.approvals().get(approval_id)
    await env.approvals().respond(approval_id, approval.subject_hash, True)
    await env.finish(workflow_id)


async def _until_done(env: Orchestra, batch_id: str) -> orchestrator_pb2.Batch:
    """Watch the batch's items to their ends; the batch is done once they all are."""
    client = env.workflows()
    batch = await client.get_batch(batch_id)
    for entry in batch.items:
        await env.until(entry.workflow_id, lambda w: w.state in TERMINAL)
    batch = await client.get_batch(batch_id)
    assert batch.done
    return batch


async def test_strict_stops_at_the_first_failure_and_cancels_what_was_queued(
    orchestra: Orchestra,
) -> None:
    batch = await submit(orchestra, [FAILS, GATE, GATE], 1, orchestrator_pb2.FAILURE_POLICY_STRICT)
    assert [state for state in (i.state for i in batch.items)][1:] == [
        common_pb2.WORKFLOW_STATE_INIT,
        common_pb2.WORKFLOW_STATE_INIT,
    ]
    done = await _until_done(orchestra, batch.batch_id)
    assert done.stopped and "item 0 failed" in done.stop_reason
    assert [i.state for i in done.items] == [
        common_pb2.WORKFLOW_STATE_FAILED,
        common_pb2.WORKFLOW_STATE_CANCELLED,
        common_pb2.WORKFLOW_STATE_CANCELLED,
    ]
    assert not any(i.quarantined for i in done.items)


async def test_quarantine_sets_failures_aside_and_the_rest_continue(orchestra: Orchestra) -> None:
    batch = await submit(
        orchestra, [FAILS, GATE, FAILS], 2, orchestrator_pb2.FAILURE_POLICY_QUARANTINE
    )
    await approve_gate(orchestra, batch.items[1].workflow_id)
    done = await _until_done(orchestra, batch.batch_id)
    assert [i.quarantined for i in done.items] == [True, False, True]
    assert all("failed" in i.reason for i in done.items if i.quarantined)
    assert done.items[1].state == common_pb2.WORKFLOW_STATE_COMPLETED
    listed = await orchestra.workflows().list(
        orchestrator_pb2.ListWorkflowsRequest(batch_id=batch.batch_id)
    )
    assert len(listed.workflows) == 3


async def test_continue_records_failures_without_quarantine(orchestra: Orchestra) -> None:
    batch = await submit(orchestra, [FAILS, FAILS], 2, orchestrator_pb2.FAILURE_POLICY_CONTINUE)
    done = await _until_done(orchestra, batch.batch_id)
    assert [i.state for i in done.items] == [common_pb2.WORKFLOW_STATE_FAILED] * 2
    assert not any(i.quarantined for i in done.items) and all(i.reason for i in done.items)


async def test_max_concurrent_holds_items_back_and_a_batch_survives_a_restart(
    tmp_path: Path,
) -> None:
    env = await start_orchestra(tmp_path)
    try:
        batch = await submit(
            env, [GATE, GATE], 1, orchestrator_pb2.FAILURE_POLICY_QUARANTINE, request_id="b-1"
        )
        again = await submit(
            env, [GATE, GATE], 1, orchestrator_pb2.FAILURE_POLICY_QUARANTINE, request_id="b-1"
        )
        assert again.batch_id == batch.batch_id
        first, second = (i.workflow_id for i in batch.items)
        await env.until(first, lambda w: w.state == AWAITING)
        held = await env.workflows().get(second)
        assert held.state == common_pb2.WORKFLOW_STATE_INIT and not held.workspace
    finally:
        await env.close()
    env = await start_orchestra(tmp_path)
    try:
        await approve_gate(env, first)
        await approve_gate(env, second)  # released once the first ended, after the restart
        done = await _until_done(env, batch.batch_id)
        assert [i.state for i in done.items] == [common_pb2.WORKFLOW_STATE_COMPLETED] * 2
    finally:
        await env.close()


async def test_an_invalid_item_refuses_the_whole_batch(orchestra: Orchestra) -> None:
    with pytest.raises(RPCError) as caught:
        await submit(
            orchestra, [GATE, "id: x\nsteps: []\n"], 1, orchestrator_pb2.FAILURE_POLICY_STRICT
        )
    assert caught.value.status is grpc.StatusCode.INVALID_ARGUMENT
    assert any(v.field.startswith("items[1].") for v in caught.value.violations)
    with pytest.raises(RPCError) as caught:
        await submit(orchestra, [GATE], 0, orchestrator_pb2.FAILURE_POLICY_UNSPECIFIED)
    assert {v.field for v in caught.value.violations} == {"max_concurrent", "failure_policy"}
    listed = await orchestra.workflows().list(orchestrator_pb2.ListWorkflowsRequest())
    assert not listed.workflows
