"""PreflightPeer against a fake PreflightService: which calls ask preflight, which reuse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from cabincrew.v1 import common_pb2, preflight_pb2, preflight_pb2_grpc
from orchestrator_svc.peers import PreflightPeer, service_channel
from orchestrator_svc.ports import Digests, Evaluation

BEFORE = Digests("a" * 64, "b" * 64)
AFTER = Digests("c" * 64, "d" * 64)


class FakePreflight(preflight_pb2_grpc.PreflightServiceServicer):
    """GetGovernance answers BEFORE (counting calls); Evaluate answers with AFTER."""

    def __init__(self) -> None:
        self.governance_calls = 0

    async def GetGovernance(self, request: Any, context: Any) -> Any:
        self.governance_calls += 1
        return preflight_pb2.GetGovernanceResponse(
            policy_digest=BEFORE.policy_digest, governance_hash=BEFORE.governance_hash
        )

    async def Evaluate(self, request: Any, context: Any) -> Any:
        result = common_pb2.GovernanceResult(
            decision=common_pb2.DECISION_ALLOW,
            policy_digest=AFTER.policy_digest,
            governance_hash=AFTER.governance_hash,
        )
        return preflight_pb2.EvaluateResponse(result=result)


@pytest.fixture
async def peer_and_fake() -> AsyncIterator[tuple[PreflightPeer, FakePreflight]]:
    fake = FakePreflight()
    server = grpc.aio.server()
    preflight_pb2_grpc.add_PreflightServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    peer = PreflightPeer(service_channel(f"127.0.0.1:{port}", lambda: "token"), deadline=5)
    try:
        yield peer, fake
    finally:
        await peer.aclose()
        await server.stop(0)


def evaluation() -> Evaluation:
    return Evaluation(
        workflow_id="wf",
        step_id="s",
        mode="flight-plan",
        receipt={},
        artifacts=[],
        plan_token=None,
        environment="",
        labels={},
        requester="",
        workspace_root="",
        repository="",
        extra={},
        aggregation=None,
        models=None,
        request_id="wf.s.x",
    )


async def test_expected_digests_ask_preflight_only_when_none_were_seen(
    peer_and_fake: tuple[PreflightPeer, FakePreflight],
) -> None:
    peer, fake = peer_and_fake

    assert await peer.expected_digests() == BEFORE
    assert await peer.expected_digests() == BEFORE
    assert fake.governance_calls == 1


async def test_a_verdict_updates_the_expected_digests(
    peer_and_fake: tuple[PreflightPeer, FakePreflight],
) -> None:
    peer, fake = peer_and_fake
    await peer.expected_digests()

    verdict = await peer.evaluate(evaluation())

    assert verdict.policy_digest == AFTER.policy_digest
    assert await peer.expected_digests() == AFTER
    assert fake.governance_calls == 1


async def test_digests_always_ask_preflight(
    peer_and_fake: tuple[PreflightPeer, FakePreflight],
) -> None:
    peer, fake = peer_and_fake
    await peer.evaluate(evaluation())

    assert await peer.digests() == BEFORE
    assert await peer.digests() == BEFORE
    assert fake.governance_calls == 2
