"""Post-execution checks through a real server: preflight on the take-off, required artifacts.

After a take-off, the step's take-off artifacts go to PreflightService again (mode
``take-off``). A deny there fails the step although the take-off already happened; a warn
completes it with a warning; ``require_artifacts`` fails a take-off that produced none. The
policy bundle judges only take-offs, by the workflow label ``post``, so the flight-plan always
passes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cabincrew.v1 import common_pb2
from tests.orchestrator.test_service_support import (
    Orchestra,
    definition,
    patch_step,
    script,
    serving_bundle,
    step_of,
)

COMPLETED = common_pb2.WORKFLOW_STATE_COMPLETED
FAILED = common_pb2.WORKFLOW_STATE_FAILED
README = {"path": "README.md", "action": "update", "content": "taken off\n"}

POST_POLICY = """
default decision := "allow"

decision := input.context.labels.post if input.mode == "take-off"

reasons contains "the post policy judged the take-off" if input.mode == "take-off"
"""


@pytest.fixture
async def judged(tmp_path: Path) -> AsyncIterator[Orchestra]:
    """A server whose only preflight policy judges take-offs by the ``post`` label."""
    async with serving_bundle(tmp_path, {"post": POST_POLICY}) as env:
        yield env


async def test_a_post_check_deny_fails_the_step_after_its_take_off(judged: Orchestra) -> None:
    workflow = await judged.submit(definition([patch_step([README])]), labels={"post": "deny"})
    done = await judged.finish(workflow.workflow_id)
    assert done.state == FAILED
    step = step_of(done, "patch")
    assert step.failure_kind == "post_check_denied"
    assert step.decision == common_pb2.DECISION_ALLOW  # the flight-plan itself was allowed
    assert (Path(done.workspace) / "README.md").read_text() == "taken off\n"  # it did happen
    events = await judged.audit_events(workflow.workflow_id)
    types = [e.event_type for e in events]
    assert "orchestrator.takeoff_completed" in types
    assert "orchestrator.step_failed" in types and "orchestrator.workflow_failed" in types


async def test_a_post_check_warn_completes_the_step_with_a_warning(judged: Orchestra) -> None:
    step = patch_step([README], post_checks={"require_artifacts": True})
    workflow = await judged.submit(definition([step]), labels={"post": "warn"})
    done = await judged.finish(workflow.workflow_id)
    assert done.state == COMPLETED, done.error
    warnings = list(step_of(done, "patch").warnings)
    assert any(w.startswith("post-execution checks: ") for w in warnings), warnings


async def test_an_allowed_take_off_completes_without_a_post_check_warning(
    judged: Orchestra,
) -> None:
    workflow = await judged.submit(definition([patch_step([README])]), labels={"post": "allow"})
    done = await judged.finish(workflow.workflow_id)
    assert done.state == COMPLETED, done.error
    assert not list(step_of(done, "patch").warnings)


async def test_a_take_off_without_artifacts_fails_a_step_that_requires_them(
    judged: Orchestra, tmp_path: Path
) -> None:
    body = """
    if MODE == "flight-plan":
        receipt([artifact("plan", role="state", document={
            "artifact_type": "note", "action": "none", "mime": "text/plain", "target": "x.txt"})])
    else:
        receipt([], plan_token=REQUEST["expected_plan_token"])
    """
    step = {
        "id": "bare",
        "kind": "engine",
        "engine": {"command": script(tmp_path / "engine", body)},
        "post_checks": {"require_artifacts": True},
    }
    workflow = await judged.submit(definition([step]), labels={"post": "allow"})
    done = await judged.finish(workflow.workflow_id)
    assert done.state == FAILED
    assert step_of(done, "bare").failure_kind == "post_check"
    types = {e.event_type for e in await judged.audit_events(workflow.workflow_id)}
    assert "orchestrator.takeoff_completed" in types
