"""The typed clients against a real server hosting a flaky fake servicer: idempotent calls
are retried on UNAVAILABLE, the others are tried once, and every call has a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from cabincrew.clients import ChannelOptions, PreflightClient, RPCError, open_channel
from cabincrew.runtime.handle import GrpcServiceHandle
from cabincrew.runtime.server import CabinCrewServer, create_server
from cabincrew.v1 import preflight_pb2, preflight_pb2_grpc
from tests.conftest import make_config, token_for


class _Flaky(preflight_pb2_grpc.PreflightServiceServicer):
    """Answers UNAVAILABLE to the first ``failures`` calls of each method; Classify hangs."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}

    async def _fail_first(self, name: str, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")

    async def GetGovernance(self, request: object, context: grpc.aio.ServicerContext) -> object:  # type: ignore[override,type-arg]
        await self._fail_first("GetGovernance", context)
        return preflight_pb2.GetGovernanceResponse(policy_digest="d")

    async def Reload(self, request: object, context: grpc.aio.ServicerContext) -> object:  # type: ignore[override,type-arg]
        await self._fail_first("Reload", context)
        return preflight_pb2.ReloadResponse()

    async def Classify(self, request: object, context: object) -> object:  # type: ignore[override]
        self.calls["Classify"] = self.calls.get("Classify", 0) + 1
        await asyncio.Event().wait()  # never answers: the client's deadline must end it
        raise AssertionError("unreachable")


@pytest.fixture
async def flaky(data_dir: Path) -> AsyncIterator[tuple[_Flaky, CabinCrewServer, str]]:
    servicer = _Flaky(failures=2)

    async def build(context: object) -> GrpcServiceHandle:
        return GrpcServiceHandle(
            "preflight",
            "cabincrew.v1.PreflightService",
            servicer,
            preflight_pb2_grpc.add_PreflightServiceServicer_to_server,
        )

    config = make_config(data_dir, services=("preflight",))
    app, _ = await create_server(config, {"preflight": build})  # type: ignore[dict-item]
    await app.start()
    try:
        yield servicer, app, token_for(config, "tester", ["operator"])
    finally:
        await app.stop(0)


def _client(app: CabinCrewServer, token: str, **kwargs: float) -> PreflightClient:
    options = ChannelOptions(address=f"127.0.0.1:{app.port}", token=token)
    return PreflightClient(open_channel(options), **kwargs)  # type: ignore[arg-type]


async def test_an_idempotent_call_is_retried_through_unavailable(
    flaky: tuple[_Flaky, CabinCrewServer, str],
) -> None:
    servicer, app, token = flaky
    client = _client(app, token, deadline_seconds=10, max_attempts=5)
    try:
        governance = await client.get_governance()
    finally:
        await client.aclose()
    assert governance.policy_digest == "d"
    assert servicer.calls["GetGovernance"] == 3


async def test_a_call_that_is_not_idempotent_is_tried_once(
    flaky: tuple[_Flaky, CabinCrewServer, str],
) -> None:
    servicer, app, token = flaky
    client = _client(app, token, deadline_seconds=10, max_attempts=5)
    try:
        with pytest.raises(RPCError) as caught:
            await client.reload()
    finally:
        await client.aclose()
    assert caught.value.status is grpc.StatusCode.UNAVAILABLE
    assert servicer.calls["Reload"] == 1


async def test_every_call_ends_at_its_deadline(flaky: tuple[_Flaky, CabinCrewServer, str]) -> None:
    servicer, app, token = flaky
    client = _client(app, token, deadline_seconds=0.5, max_attempts=3)
    try:
        with pytest.raises(RPCError) as caught:
            await asyncio.wait_for(client.classify("any", ["text"]), 10)
    finally:
        await client.aclose()
    assert caught.value.status is grpc.StatusCode.DEADLINE_EXCEEDED
    assert servicer.calls["Classify"] == 1
