"""An approval that expires fails its step through the orchestrator, with an audit trail.

The approval service is configured with a short default TTL and sweep interval; the plan
changes a CI configuration file, which the default policies send for approval. Nobody
answers, so the sweep expires the approval and the workflow must end FAILED, never take off.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cabincrew.v1 import approval_pb2, common_pb2
from tests.orchestrator.test_service_support import (
    Orchestra,
    definition,
    patch_step,
    start_orchestra,
    step_of,
)

CI = {"path": ".github/workflows/ci.yml", "action": "update", "content": "on: [push]\n"}


@pytest.fixture
async def hasty(tmp_path: Path) -> AsyncIterator[Orchestra]:
    """A server whose approvals expire after a second, swept five times a second."""
    env = await start_orchestra(
        tmp_path,
        **{"approval.default_ttl_seconds": 1.0, "approval.sweep_interval_seconds": 0.2},
    )
    try:
        assert await env.governance_wired(), "PreflightService answers UNIMPLEMENTED"
        yield env
    finally:
        await env.close()


async def test_an_approval_that_expires_fails_the_workflow_without_take_off(
    hasty: Orchestra,
) -> None:
    workflow = await hasty.submit(definition([patch_step([CI])]))
    done = await hasty.finish(workflow.workflow_id)
    assert done.state == common_pb2.WORKFLOW_STATE_FAILED
    assert "expired" in done.error
    step = step_of(done, "patch")
    assert step.failure_kind == "approval_expired"
    assert step.approval_id and step.approval_id in step.error and "expired" in step.error
    assert (Path(done.workspace) / ".github/workflows/ci.yml").read_text() == "on: push\n"
    approval = await hasty.approvals().get(step.approval_id)
    assert approval.state == approval_pb2.APPROVAL_STATE_EXPIRED
    events = await hasty.audit_events(workflow.workflow_id)
    types = [e.event_type for e in events]
    assert "orchestrator.approval_requested" in types and "approval.created" in types
    assert "approval.expired" in types
    failed = [e for e in events if e.event_type == "orchestrator.step_failed"]
    assert failed and step.approval_id in failed[0].message
    assert "orchestrator.takeoff_started" not in types
    assert "orchestrator.workflow_failed" in types
