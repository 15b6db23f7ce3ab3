"""OrchestratorService through real servers: what does not need governance decisions.

Submission errors, identities, idempotency, engines that misbehave, failing closed when
preflight is unreachable, human gates, cancel, watch, list and timeline.
"""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path

import grpc
import pytest

from cabincrew.clients import RPCError
from cabincrew.v1 import common_pb2, orchestrator_pb2
from orchestrator_svc.artifacts import ArtifactLimits
from orchestrator_svc.server import build
from tests.orchestrator.test_service_support import (
    TERMINAL,
    EngineSignals,
    Orchestra,
    definition,
    engine,
    gate_engine,
    orchestra,
    patch_step,
    script,
    start_orchestra,
    state_name,
    step_of,
)

__all__ = ["orchestra"]

FAILED = common_pb2.WORKFLOW_STATE_FAILED


async def test_a_definition_error_is_invalid_argument_naming_each_line_and_field(
    orchestra: Orchestra,
) -> None:
    text = (
        "id: broken\nsteps:\n  - id: a\n    kind: engine\n    engine: {command: [x]}\n"
        "    timeout_seconds: soon\n  - id: b\n    kind: warp\n"
    )
    with pytest.raises(RPCError) as caught:
        await orchestra.submit(text)
    assert caught.value.status is grpc.StatusCode.INVALID_ARGUMENT
    fields = {violation.field for violation in caught.value.violations}
    assert {"steps[0].timeout_seconds", "steps[1].kind"} <= fields
    assert "test.yaml:6" in caught.value.message and "test.yaml:8" in caught.value.message


async def test_a_reserved_step_kind_and_bad_inputs_are_invalid_argument(
    orchestra: Orchestra,
) -> None:
    tool = definition([{"id": "t", "kind": "tool"}])
    inputs = definition(
        [{"id": "a", "kind": "approval", "governance": {"approval_role": "approver"}}],
        inputs={"ticket": {"required": True}},
    )
    for text, given in ((tool, {}), (inputs, {}), (inputs, {"ticket": "1", "extra": "x"})):
        with pytest.raises(RPCError) as caught:
            await orchestra.submit(text, inputs=given)
        assert caught.value.status is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(RPCError) as caught:
        await orchestra.submit(inputs, inputs={"ticket": "1"}, workspace_source="relative/dir")
    assert caught.value.status is grpc.StatusCode.INVALID_ARGUMENT


async def test_only_an_operator_may_submit_and_anyone_authenticated_may_read(
    orchestra: Orchestra,
) -> None:
    gate = definition(
        [{"id": "a", "kind": "approval", "governance": {"approval_role": "approver"}}]
    )
    viewer = orchestra.workflows("victor", ("viewer",))
    request = orchestrator_pb2.SubmitWorkflowRequest(
        definition=orchestrator_pb2.WorkflowDefinition(text=gate)
    )
    with pytest.raises(RPCError) as caught:
        await viewer.submit(request)
    assert caught.value.status is grpc.StatusCode.PERMISSION_DENIED
    workflow = await orchestra.submit(gate)
    assert (await viewer.get(workflow.workflow_id)).workflow_id == workflow.workflow_id
    with pytest.raises(RPCError) as caught:
        await viewer.cancel(workflow.workflow_id, "no")
    assert caught.value.status is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(RPCError) as caught:
        await orchestra.workflows().get("no-such-workflow")
    assert caught.value.status is grpc.StatusCode.NOT_FOUND


async def test_the_same_request_id_returns_the_first_workflow_and_another_payload_is_refused(
    orchestra: Orchestra,
) -> None:
    gate = definition(
        [{"id": "a", "kind": "approval", "governance": {"approval_role": "approver"}}]
    )
    first = await orchestra.submit(gate, request_id="req-1")
    again = await orchestra.submit(gate, request_id="req-1")
    assert again.workflow_id == first.workflow_id
    with pytest.raises(RPCError) as caught:
        await orchestra.submit(gate, request_id="req-1", environment="production")
    assert caught.value.status is grpc.StatusCode.ALREADY_EXISTS


async def test_a_human_gate_waits_for_another_identity_and_then_completes(
    orchestra: Orchestra,
) -> None:
    gate = definition(
        [
            {
                "id": "sign-off",
                "kind": "approval",
                "description": "release sign-off",
                "governance": {"approval_role": "release-manager"},
            }
        ]
    )
    workflow = await orchestra.submit(gate)
    waiting = await orchestra.until(
        workflow.workflow_id, lambda w: w.state == common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL
    )
    step = step_of(waiting, "sign-off")
    assert step.approval_role == "release-manager"
    approval = await orchestra.approvals().get(step.approval_id)
    assert approval.requester == "olivia" and approval.subject_hash == step.plan_token_hash
    # The requester cannot approve their own workflow; a release manager can.
    with pytest.raises(RPCError) as caught:
        await orchestra.approvals("olivia", ("release-manager",)).respond(
            approval.approval_id, approval.subject_hash, True
        )
    assert caught.value.status is grpc.StatusCode.PERMISSION_DENIED
    await orchestra.approvals("rita", ("release-manager",)).respond(
        approval.approval_id, approval.subject_hash, True, "ship it"
    )
    done = await orchestra.finish(workflow.workflow_id)
    assert done.state == common_pb2.WORKFLOW_STATE_COMPLETED
    consumed = await orchestra.approvals().get(approval.approval_id)
    assert consumed.state == 6  # APPROVAL_STATE_CONSUMED: single use


async def test_a_rejected_gate_fails_the_workflow(orchestra: Orchestra) -> None:
    gate = definition(
        [{"id": "g", "kind": "approval", "governance": {"approval_role": "approver"}}]
    )
    workflow = await orchestra.submit(gate)
    waiting = await orchestra.until(
        workflow.workflow_id, lambda w: w.state == common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL
    )
    approval_id = step_of(waiting, "g").approval_id
    approval = await orchestra.approvals().get(approval_id)
    await orchestra.approvals().respond(approval_id, approval.subject_hash, False, "not today")
    done = await orchestra.finish(workflow.workflow_id)
    assert done.state == FAILED
    assert step_of(done, "g").failure_kind == "approval_rejected"


ENGINE_FAULTS = {
    "not_json": ('print("this is not a receipt")\n', {}),
    "invalid_receipt": ('print(json.dumps({"status": "ok"}))\n', {}),
    "receipt_failure": ('receipt(status="failure", error="it broke")\n', {}),
    "invalid_artifact_json": (
        'receipt([artifact("bad", document={"nope": 1})])\n',
        {"kind": "invalid_artifacts"},
    ),
    "unsafe_name": (
        'receipt([artifact("bad name")])\n',
        {"kind": "invalid_artifacts"},
    ),
    "symlink": (
        'os.symlink("/etc", os.path.join(ARTIFACTS, "escape"))\nreceipt([])\n',
        {"kind": "invalid_artifacts"},
    ),
    "oversize": (
        'receipt([artifact("big", data=b"x" * 4096)])\n',
        {"kind": "invalid_artifacts"},
    ),
    "timed_out": ("import time\ntime.sleep(60)\n", {"timeout": 1}),
    "workspace_mutated": (
        'open(os.path.join(os.environ["CABINCREW_WORKSPACE"], "x"), "w").write("x")\nreceipt([])\n',
        {},
    ),
    "engine_failure": ('receipt(status="failure", error="no")\nsys.exit(1)\n', {}),
}


async def test_engines_that_misbehave_fail_their_step_with_a_reason_and_an_audit_event(
    tmp_path: Path,
) -> None:
    factory = functools.partial(
        build, kill_grace_seconds=0.2, artifact_limits=ArtifactLimits(max_body_bytes=1024)
    )
    env = await start_orchestra(tmp_path, orchestrator=factory)
    try:
        submitted = {}
        for name, (body, options) in ENGINE_FAULTS.items():
            step = {
                "id": "s",
                "kind": "engine",
                "engine": {"command": script(tmp_path / "engines" / name, body)},
                "timeout_seconds": options.get("timeout", 60),
            }
            workflow = await env.submit(definition([step], id=name.replace("_", "-")))
            submitted[name] = workflow.workflow_id
        for name, workflow_id in submitted.items():
            done = await env.finish(workflow_id)
            step = step_of(done, "s")
            expected = ENGINE_FAULTS[name][1].get("kind", name)
            assert done.state == FAILED, name
            assert step.failure_kind == expected, (name, step.failure_kind, step.error)
            assert step.error, name
            types = {(e.event_type, e.severity) for e in await env.audit_events(workflow_id)}
            assert ("orchestrator.step_failed", common_pb2.EVENT_SEVERITY_ERROR) in types, name
            if name == "timed_out":
                assert ("orchestrator.engine_timed_out", common_pb2.EVENT_SEVERITY_ERROR) in types
            # Nothing in the workspace changed, and no take-off ran.
            assert not (Path(done.workspace) / "x").exists() or name == "workspace_mutated"
    finally:
        await env.close()


async def test_an_unreachable_preflight_fails_the_step_closed(tmp_path: Path) -> None:
    env = await start_orchestra(
        tmp_path,
        **{"clients.addresses": {"preflight": "127.0.0.1:9"}, "clients.deadline_seconds": 2.0},
    )
    try:
        workflow = await env.submit(
            definition([patch_step([{"path": "README.md", "action": "update", "content": "x\n"}])])
        )
        done = await env.finish(workflow.workflow_id)
        assert done.state == FAILED
        assert step_of(done, "patch").failure_kind == "dependency_unavailable"
        assert (Path(done.workspace) / "README.md").read_text() == "hello world\n"
    finally:
        await env.close()


async def test_cancel_stops_a_running_flight_plan_and_nothing_more_can_happen(
    orchestra: Orchestra, tmp_path: Path
) -> None:
    gate_dir = tmp_path / "gate"
    signals = EngineSignals(gate_dir)
    try:
        step = {
            "id": "slow",
            "kind": "engine",
            "engine": {"command": gate_engine(tmp_path / "engines")},
            "config": {"gate_dir": str(gate_dir), "block": "flight-plan"},
        }
        workflow = await orchestra.submit(
            definition([step, {**step, "id": "after", "depends_on": ["slow"]}])
        )
        await signals.wait("flight-plan.1")
        pid = int((gate_dir / "flight-plan.1.pid").read_text())
        cancelled = await orchestra.workflows().cancel(workflow.workflow_id, "changed my mind")
        if cancelled.state not in TERMINAL:
            cancelled = await orchestra.finish(workflow.workflow_id)
    finally:
        await signals.close()
    assert cancelled.state == common_pb2.WORKFLOW_STATE_CANCELLED
    assert "changed my mind" in cancelled.error
    assert [state_name(s.state) for s in cancelled.steps] == ["CANCELLED", "CANCELLED"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # Cancelling again is a no-op; resuming is refused.
    again = await orchestra.workflows().cancel(workflow.workflow_id, "again")
    assert again.state == common_pb2.WORKFLOW_STATE_CANCELLED
    with pytest.raises(RPCError) as caught:
        await orchestra.workflows().resume(workflow.workflow_id, retry_takeoff=True)
    assert caught.value.status is grpc.StatusCode.FAILED_PRECONDITION


async def test_watch_list_and_timeline_tell_the_recorded_history(orchestra: Orchestra) -> None:
    gate = definition(
        [{"id": "g", "kind": "approval", "governance": {"approval_role": "approver"}}]
    )
    first = await orchestra.submit(gate, labels={"team": "infra"})
    second = await orchestra.submit(gate)
    seen: list[int] = []
    client = orchestra.workflows()
    async with asyncio.timeout(30):
        async for update in client.watch(first.workflow_id):
            seen.append(update.workflow.state)
            if update.workflow.state == common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL:
                approval_id = step_of(update.workflow, "g").approval_id
                approval = await orchestra.approvals().get(approval_id)
                await orchestra.approvals().respond(approval_id, approval.subject_hash, True)
    assert seen[-1] == common_pb2.WORKFLOW_STATE_COMPLETED
    assert common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL in seen

    page = await client.list(orchestrator_pb2.ListWorkflowsRequest(page_size=1))
    rest = await client.list(
        orchestrator_pb2.ListWorkflowsRequest(page_size=1, page_token=page.next_page_token)
    )
    assert [w.workflow_id for w in [*page.workflows, *rest.workflows]] == [
        first.workflow_id,
        second.workflow_id,
    ]
    completed = await client.list(
        orchestrator_pb2.ListWorkflowsRequest(state=common_pb2.WORKFLOW_STATE_COMPLETED)
    )
    assert [w.workflow_id for w in completed.workflows] == [first.workflow_id]
    assert completed.workflows[0].labels["team"] == "infra"

    timeline = await client.timeline(first.workflow_id)
    types = [entry.entry_type for entry in timeline.entries]
    assert types[0] == "workflow_started" and types[-1] == "workflow_completed"
    assert "approval_requested" in types and "approval_received" in types
    assert [e.sequence for e in timeline.entries] == sorted(e.sequence for e in timeline.entries)
    assert timeline.stats.counts_by_type["workflow_started"] == 1
    assert [s.step_id for s in timeline.stats.steps] == ["g"]
    assert timeline.stats.steps[0].final_state == common_pb2.WORKFLOW_STATE_COMPLETED
    total = timeline.stats.total_duration.ToMicroseconds()
    assert total == sum(e.since_previous.ToMicroseconds() for e in timeline.entries)
    record = (await client.get(first.workflow_id)).record
    assert record.current_state == common_pb2.WORKFLOW_STATE_COMPLETED
    assert list(record.steps_completed) == ["g"] and record.approvals[0].approved


async def test_a_restart_keeps_a_pending_gate_and_resumes_it(tmp_path: Path) -> None:
    gate = definition(
        [{"id": "g", "kind": "approval", "governance": {"approval_role": "approver"}}]
    )
    env = await start_orchestra(tmp_path)
    try:
        workflow = await env.submit(gate)
        waiting = await env.until(
            workflow.workflow_id, lambda w: w.state == common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL
        )
    finally:
        await env.close()
    env = await start_orchestra(tmp_path)
    try:
        approval_id = step_of(waiting, "g").approval_id
        again = await env.workflows().get(workflow.workflow_id)
        assert step_of(again, "g").approval_id == approval_id
        approval = await env.approvals().get(approval_id)
        await env.approvals().respond(approval_id, approval.subject_hash, True)
        done = await env.finish(workflow.workflow_id)
        assert done.state == common_pb2.WORKFLOW_STATE_COMPLETED
        timeline = await env.workflows().timeline(workflow.workflow_id)
        assert [e.entry_type for e in timeline.entries].count("approval_requested") == 1
    finally:
        await env.close()


def test_the_engines_used_here_exist() -> None:
    assert Path(engine("file-patch")[-1]).is_file()


async def test_cancelling_a_workflow_that_waits_withdraws_its_approval(
    orchestra: Orchestra,
) -> None:
    gate = definition(
        [{"id": "g", "kind": "approval", "governance": {"approval_role": "approver"}}]
    )
    workflow = await orchestra.submit(gate)
    waiting = await orchestra.until(
        workflow.workflow_id, lambda w: w.state == common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL
    )
    await orchestra.workflows().cancel(workflow.workflow_id, "not any more")
    done = await orchestra.finish(workflow.workflow_id)
    assert done.state == common_pb2.WORKFLOW_STATE_CANCELLED
    approval = await orchestra.approvals().get(step_of(waiting, "g").approval_id)
    assert approval.state == 5  # APPROVAL_STATE_CANCELLED


async def test_a_missing_secret_fails_the_step_before_anything_runs(tmp_path: Path) -> None:
    factory = functools.partial(build, secrets={"PRESENT": "x"}.get)
    env = await start_orchestra(tmp_path, orchestrator=factory)
    try:
        step = {
            "id": "s",
            "kind": "engine",
            "engine": {"command": engine("noop")},
            "secrets": ["PRESENT", "ABSENT_TOKEN"],
        }
        workflow = await env.submit(definition([step]))
        done = await env.finish(workflow.workflow_id)
        failed = step_of(done, "s")
        assert failed.failure_kind == "missing_secret" and "ABSENT_TOKEN" in failed.error
        assert "PRESENT" not in failed.error.replace("ABSENT_TOKEN", "")
        timeline = await env.workflows().timeline(workflow.workflow_id)
        assert "step_started" not in [e.entry_type for e in timeline.entries]
    finally:
        await env.close()


async def test_a_log_that_does_not_verify_halts_its_workflow_on_restart(tmp_path: Path) -> None:
    gate = definition(
        [{"id": "g", "kind": "approval", "governance": {"approval_role": "approver"}}]
    )
    env = await start_orchestra(tmp_path)
    try:
        workflow = await env.submit(gate)
        await env.until(
            workflow.workflow_id, lambda w: w.state == common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL
        )
    finally:
        await env.close()
    database = tmp_path / "data" / "orchestrator" / "orchestrator.db"
    await asyncio.to_thread(_rewrite_history, database, workflow.workflow_id)
    env = await start_orchestra(tmp_path)
    try:
        done = await env.finish(workflow.workflow_id)
        assert done.state == FAILED and "does not verify" in done.error
        events = await env.audit_events(workflow.workflow_id)
        corrupt = [e for e in events if e.event_type == "orchestrator.wal_corrupted"]
        assert corrupt and corrupt[0].severity == common_pb2.EVENT_SEVERITY_CRITICAL
    finally:
        await env.close()


def _rewrite_history(database: Path, workflow_id: str) -> None:
    """What an attacker with the database file could do: change an entry, triggers aside."""
    import sqlite3

    conn = sqlite3.connect(database)
    with conn:
        conn.execute("DROP TRIGGER orchestrator_wal_no_update")
        conn.execute(
            "UPDATE orchestrator_wal SET data = replace(data, 'olivia', 'mallory') "
            "WHERE workflow_id = ? AND position = 1",
            (workflow_id,),
        )
    conn.close()
