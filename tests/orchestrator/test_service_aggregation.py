"""A workflow's governance aggregation method reaches Evaluate and changes the decision.

The bundle has three preflight policies: two allow and one warns. ``most_restrictive`` (the
default) gives warn, ``majority`` gives allow, ``all_allow`` gives deny, so each method is
visible in the step's decision and in how the workflow ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cabincrew.v1 import common_pb2
from tests.orchestrator.test_service_support import (
    Orchestra,
    definition,
    patch_step,
    serving_bundle,
    step_of,
)

ALLOW = 'default decision := "allow"\n'
WARN = 'default decision := "warn"\n\nreasons contains "this policy always warns"\n'
README = {"path": "README.md", "action": "update", "content": "aggregated\n"}


@pytest.fixture
async def split(tmp_path: Path) -> AsyncIterator[Orchestra]:
    """A server whose preflight policies vote allow, allow and warn."""
    async with serving_bundle(
        tmp_path, {"first_allow": ALLOW, "second_allow": ALLOW, "warns": WARN}
    ) as env:
        yield env


@pytest.mark.parametrize(
    ("governance", "decision", "state"),
    [
        ({}, common_pb2.DECISION_WARN, common_pb2.WORKFLOW_STATE_COMPLETED),
        (
            {"aggregation": "majority"},
            common_pb2.DECISION_ALLOW,
            common_pb2.WORKFLOW_STATE_COMPLETED,
        ),
        ({"aggregation": "all_allow"}, common_pb2.DECISION_DENY, common_pb2.WORKFLOW_STATE_FAILED),
    ],
    ids=["default-most-restrictive", "majority", "all-allow"],
)
async def test_the_workflow_aggregation_method_decides_how_policy_votes_combine(
    split: Orchestra, governance: dict[str, Any], decision: int, state: int
) -> None:
    top = {"governance": governance} if governance else {}
    workflow = await split.submit(definition([patch_step([README])], **top))
    done = await split.finish(workflow.workflow_id)
    assert done.state == state, done.error
    assert step_of(done, "patch").decision == decision
    evaluated = [
        e
        for e in await split.audit_events(workflow.workflow_id)
        if e.event_type == "orchestrator.policy_evaluated"
    ]
    method = governance.get("aggregation", "most_restrictive").upper()
    assert len(evaluated) == 1
    policy = evaluated[0].policy
    assert policy.aggregation_method == common_pb2.AggregationMethod.Value(
        f"AGGREGATION_METHOD_{method}"
    )
    assert len(policy.policy_evaluations) == 3 and policy.decision == decision


async def test_a_step_aggregation_method_overrides_the_workflow_one(split: Orchestra) -> None:
    step = patch_step([README], governance={"aggregation": "majority"})
    workflow = await split.submit(definition([step], governance={"aggregation": "all_allow"}))
    done = await split.finish(workflow.workflow_id)
    assert done.state == common_pb2.WORKFLOW_STATE_COMPLETED, done.error
    assert step_of(done, "patch").decision == common_pb2.DECISION_ALLOW
