"""Governed workflows end to end with the real PreflightService and ApprovalService.

The decisions come from the default policies: editing README.md is allowed, a large change
warns, a CI configuration file or the production environment needs approval, an environment
file is denied.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from cabincrew.clients import RPCError
from cabincrew.v1 import common_pb2
from tests.orchestrator.test_service_support import (
    Orchestra,
    definition,
    engine,
    governed,
    orchestra,
    patch_step,
    script,
    start_orchestra,
    state_name,
    step_of,
)

__all__ = ["governed", "orchestra"]

COMPLETED = common_pb2.WORKFLOW_STATE_COMPLETED
FAILED = common_pb2.WORKFLOW_STATE_FAILED
AWAITING = common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL

README = {"path": "README.md", "action": "update", "content": "hello governed world\n"}
CI = {
    "path": ".github/workflows/ci.yml",
    "action": "update",
    "content": "on: [push, pull_request]\n",
}


async def test_an_allowed_plan_takes_off_and_leaves_a_verifiable_trail(governed: Orchestra) -> None:
    workflow = await governed.submit(definition([patch_step([README])]))
    done = await governed.finish(workflow.workflow_id)
    assert done.state == COMPLETED, done.error
    step = step_of(done, "patch")
    assert step.decision == common_pb2.DECISION_ALLOW and len(step.plan_token_hash) == 64
    assert (Path(done.workspace) / "README.md").read_text() == "hello governed world\n"
    assert (governed.source / "README.md").read_text() == "hello world\n"  # only the copy changed
    events = await governed.audit_events(workflow.workflow_id)
    types = [e.event_type for e in events if e.event_type.startswith("orchestrator.")]
    for expected in (
        "orchestrator.workflow_submitted",
        "orchestrator.engine_started",
        "orchestrator.plan_token_created",
        "orchestrator.policy_evaluated",
        "orchestrator.plan_token_verified",
        "orchestrator.takeoff_started",
        "orchestrator.workflow_completed",
    ):
        assert expected in types
    assert types.index("orchestrator.plan_token_verified") < types.index(
        "orchestrator.takeoff_started"
    )
    token_event = next(e for e in events if e.event_type == "orchestrator.plan_token_created")
    assert token_event.plan_token.token == step.plan_token_hash
    assert (await governed.audit().verify_log()).ok


async def test_a_large_change_warns_and_still_takes_off(governed: Orchestra) -> None:
    big = "".join(f"line {n}\n" for n in range(600))
    workflow = await governed.submit(
        definition([patch_step([{"path": "big.txt", "action": "create", "content": big}])])
    )
    done = await governed.finish(workflow.workflow_id)
    assert done.state == COMPLETED, done.error
    step = step_of(done, "patch")
    assert step.decision == common_pb2.DECISION_WARN and step.warnings
    types = {e.event_type for e in await governed.audit_events(workflow.workflow_id)}
    assert "orchestrator.preflight_warning" in types


async def test_a_denied_plan_never_takes_off(governed: Orchestra) -> None:
    workflow = await governed.submit(
        definition([patch_step([{"path": ".env", "action": "update", "content": "DEBUG=0\n"}])])
    )
    done = await governed.finish(workflow.workflow_id)
    assert done.state == FAILED
    step = step_of(done, "patch")
    assert step.decision == common_pb2.DECISION_DENY and step.failure_kind == "denied"
    assert (Path(done.workspace) / ".env").read_text() == "DEBUG=1\n"
    types = {e.event_type for e in await governed.audit_events(workflow.workflow_id)}
    assert "orchestrator.takeoff_started" not in types


async def test_a_plan_that_needs_approval_waits_for_another_identity(governed: Orchestra) -> None:
    workflow = await governed.submit(definition([patch_step([CI])]))
    waiting = await governed.until(workflow.workflow_id, lambda w: w.state == AWAITING)
    step = step_of(waiting, "patch")
    approval = await governed.approvals().get(step.approval_id)
    assert approval.subject_hash == step.plan_token_hash
    assert approval.requester == "olivia" and approval.created_by == "service:orchestrator"
    previews = [a.preview for a in approval.artifacts if a.target == ".github/workflows/ci.yml"]
    assert previews and "+on: [push, pull_request]" in previews[0]
    assert approval.triggered_policies
    assert (Path(waiting.workspace) / ".github/workflows/ci.yml").read_text() == "on: push\n"
    with pytest.raises(RPCError) as caught:
        await governed.approvals("olivia", (approval.required_role,)).respond(
            approval.approval_id, approval.subject_hash, True
        )
    assert caught.value.status is grpc.StatusCode.PERMISSION_DENIED
    approver = governed.approvals("alice", (approval.required_role,))
    await approver.respond(approval.approval_id, approval.subject_hash, True, "reviewed")
    done = await governed.finish(workflow.workflow_id)
    assert done.state == COMPLETED, done.error
    assert (Path(done.workspace) / ".github/workflows/ci.yml").read_text() == CI["content"]
    assert done.record.approvals[0].approver == "alice"


async def test_tampering_with_the_workspace_after_the_plan_refuses_take_off(
    governed: Orchestra,
) -> None:
    workflow = await governed.submit(definition([patch_step([CI, README])]))
    waiting = await governed.until(workflow.workflow_id, lambda w: w.state == AWAITING)
    (Path(waiting.workspace) / "docs" / "guide.md").write_text("sneaky\n")
    await _approve(governed, step_of(waiting, "patch").approval_id)
    done = await governed.finish(workflow.workflow_id)
    assert done.state == FAILED
    assert step_of(done, "patch").failure_kind == "integrity"
    assert (Path(done.workspace) / "README.md").read_text() == "hello world\n"
    withdrawn = await governed.approvals().get(step_of(done, "patch").approval_id)
    assert withdrawn.state == 5  # APPROVAL_STATE_CANCELLED: never usable for anything else
    integrity = [
        e
        for e in await governed.audit_events(workflow.workflow_id)
        if e.event_type == "orchestrator.integrity_failed"
    ]
    assert integrity and integrity[0].severity == common_pb2.EVENT_SEVERITY_CRITICAL
    check = integrity[0].integrity_check
    assert not check.plan_token_match
    assert any(d.startswith("workspace hash changed") for d in check.differences)


async def test_tampering_with_a_stored_artifact_refuses_take_off(governed: Orchestra) -> None:
    workflow = await governed.submit(definition([patch_step([CI])]))
    waiting = await governed.until(workflow.workflow_id, lambda w: w.state == AWAITING)
    store = Path(governed.config.data_dir) / "orchestrator" / "artifacts" / "objects"
    diffs = [p for p in store.rglob("*") if p.is_file() and b"+++ b/.github" in p.read_bytes()]
    assert len(diffs) == 1
    os.chmod(diffs[0], 0o644)
    diffs[0].write_bytes(diffs[0].read_bytes().replace(b"pull_request", b"schedule"))
    await _approve(governed, step_of(waiting, "patch").approval_id)
    done = await governed.finish(workflow.workflow_id)
    assert done.state == FAILED and step_of(done, "patch").failure_kind == "integrity"
    assert (Path(done.workspace) / ".github/workflows/ci.yml").read_text() == "on: push\n"
    integrity = next(
        e
        for e in await governed.audit_events(workflow.workflow_id)
        if e.event_type == "orchestrator.integrity_failed"
    )
    assert any("artifact store" in d for d in integrity.integrity_check.differences)


async def test_steps_form_a_dag_with_conditions_templates_and_outputs(governed: Orchestra) -> None:
    # readme and guide run in parallel in one workspace: each take-off changes what the other
    # planned against, so they opt out of the whole-workspace drift check (the file-patch
    # engine still refuses a file that changed since its own plan).
    drift = {"governance": {"allow_workspace_drift": True}}
    steps = [
        patch_step([README], "readme", **drift),
        patch_step(
            [{"path": "docs/guide.md", "action": "update", "content": "{{ inputs.note }}\n"}],
            "guide",
            **drift,
        ),
        patch_step(
            [
                {
                    "path": "CHANGES.md",
                    "action": "create",
                    "content": "files: {{ steps.readme.outputs.files_changed }}\n",
                }
            ],
            "changes",
            depends_on=["readme", "guide"],
        ),
        {
            **patch_step([{"path": "never.md", "action": "create", "content": "x\n"}], "skipped"),
            "depends_on": ["readme"],
            "when": 'inputs.note == "nope"',
        },
        {
            "id": "noop",
            "kind": "engine",
            "engine": {"command": engine("noop")},
            "depends_on": ["skipped"],
        },
    ]
    workflow = await governed.submit(
        definition(steps, inputs={"note": {"default": "noted"}}, concurrency=2)
    )
    done = await governed.finish(workflow.workflow_id)
    assert done.state == COMPLETED, done.error
    assert [(s.step_id, state_name(s.state), s.skipped) for s in done.steps] == [
        ("readme", "COMPLETED", False),
        ("guide", "COMPLETED", False),
        ("changes", "COMPLETED", False),
        ("skipped", "COMPLETED", True),
        ("noop", "COMPLETED", True),
    ]
    workspace = Path(done.workspace)
    assert (workspace / "docs" / "guide.md").read_text() == "noted\n"
    assert (workspace / "CHANGES.md").read_text().startswith("files: ")
    assert not (workspace / "never.md").exists()


async def test_a_rejected_plan_fails_and_the_workspace_stays_as_it_was(governed: Orchestra) -> None:
    workflow = await governed.submit(definition([patch_step([CI])]))
    waiting = await governed.until(workflow.workflow_id, lambda w: w.state == AWAITING)
    approval_id = step_of(waiting, "patch").approval_id
    approval = await governed.approvals().get(approval_id)
    approver = governed.approvals("alice", (approval.required_role,))
    await approver.respond(approval_id, approval.subject_hash, False, "too risky")
    done = await governed.finish(workflow.workflow_id)
    assert done.state == FAILED and step_of(done, "patch").failure_kind == "approval_rejected"
    assert (Path(done.workspace) / ".github/workflows/ci.yml").read_text() == "on: push\n"


async def _approve(env: Orchestra, approval_id: str) -> None:
    approval = await env.approvals().get(approval_id)
    approver = env.approvals("alice", (approval.required_role,))
    await approver.respond(approval_id, approval.subject_hash, True, "looks fine")


async def test_a_failed_flight_plan_is_retried_with_back_off(
    governed: Orchestra, tmp_path: Path
) -> None:
    marker = tmp_path / "failed-once"
    body = f"""
    if MODE == "take-off":
        receipt([])
    elif not os.path.exists({str(marker)!r}):
        open({str(marker)!r}, "w").close()
        print("not a receipt")
    else:
        receipt([artifact("plan", role="state", document={{
            "artifact_type": "note", "action": "none", "mime": "text/plain", "target": "x.txt"}})])
    """
    step = {
        "id": "flaky",
        "kind": "engine",
        "engine": {"command": script(tmp_path / "engine", body)},
        "retries": {"max_attempts": 3, "backoff_seconds": 0.01},
        "post_checks": {"preflight": False},
    }
    workflow = await governed.submit(definition([step]))
    done = await governed.finish(workflow.workflow_id)
    assert done.state == COMPLETED, done.error
    assert step_of(done, "flaky").attempts == 2
    timeline = await governed.workflows().timeline(workflow.workflow_id)
    retries = [e for e in timeline.entries if e.entry_type == "step_retry"]
    assert len(retries) == 1 and retries[0].data["failure_kind"] == "not_json"


async def test_a_stored_artifact_changed_during_a_restart_fails_the_step_on_recovery(
    tmp_path: Path,
) -> None:
    env = await start_orchestra(tmp_path)
    try:
        assert await env.governance_wired(), "PreflightService answers UNIMPLEMENTED"
        workflow = await env.submit(definition([patch_step([CI])]))
        await env.until(workflow.workflow_id, lambda w: w.state == AWAITING)
    finally:
        await env.close()
    store = tmp_path / "data" / "orchestrator" / "artifacts" / "objects"
    diff = next(p for p in store.rglob("*") if p.is_file() and b"+++ b/.github" in p.read_bytes())
    os.chmod(diff, 0o644)
    diff.write_bytes(diff.read_bytes() + b"+more\n")
    env = await start_orchestra(tmp_path)
    try:
        done = await env.finish(workflow.workflow_id)
        assert done.state == FAILED and step_of(done, "patch").failure_kind == "integrity"
        assert "recovery" in step_of(done, "patch").error
    finally:
        await env.close()
