"""The orchestrator checks the signed decision records of an approval it consumes.

A real ApprovalService issues the records; a fake one (a servicer on a real server) then
answers ConsumeApproval with what the real one said, or with an altered copy, as a
compromised database or a service in the middle would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cabincrew.clients import ChannelOptions, open_channel
from cabincrew.runtime.handle import GrpcServiceHandle
from cabincrew.runtime.server import create_server
from cabincrew.v1 import approval_pb2, approval_pb2_grpc
from orchestrator_svc.peers import ApprovalPeer
from orchestrator_svc.ports import PeerRefused
from tests.approval.conftest import StartServer, create_request
from tests.approval.conftest import start_server as start_server  # the fixture, by name
from tests.conftest import make_config, token_for


class _Replay(approval_pb2_grpc.ApprovalServiceServicer):
    """Answers with a recorded consumed approval and the real service's key."""

    def __init__(self, consumed: approval_pb2.Approval, key: approval_pb2.GetSigningKeyResponse):
        self.consumed = consumed
        self.key = key

    async def ConsumeApproval(self, request: object, context: object) -> object:  # type: ignore[override]
        return approval_pb2.ConsumeApprovalResponse(approval=self.consumed)

    async def GetSigningKey(self, request: object, context: object) -> object:  # type: ignore[override]
        return self.key


@pytest.fixture
async def recorded(
    start_server: StartServer,
) -> tuple[approval_pb2.Approval, approval_pb2.GetSigningKeyResponse]:
    """An approval approved by a release manager and consumed, as the real service says."""
    env = await start_server()
    orchestrator = env.client("orchestrator", ["service"])
    approval = await orchestrator.create(create_request(on_behalf_of="alice"))
    carol = env.client("carol", ["release-manager"])
    await carol.respond(approval.approval_id, approval.subject_hash, True)
    consumed = await orchestrator.consume(approval.approval_id, approval.subject_hash, "use-1")
    return consumed, await orchestrator.signing_key()


async def _peer_against(tmp_path: Path, servicer: _Replay) -> AsyncIterator[ApprovalPeer]:
    async def build(context: object) -> GrpcServiceHandle:
        return GrpcServiceHandle(
            "approval",
            "cabincrew.v1.ApprovalService",
            servicer,
            approval_pb2_grpc.add_ApprovalServiceServicer_to_server,
        )

    config = make_config(tmp_path / "fake", services=("approval",))
    app, port = await create_server(config, {"approval": build})  # type: ignore[dict-item]
    await app.start()
    token = token_for(config, "service:orchestrator", ["service"])
    peer = ApprovalPeer(open_channel(ChannelOptions(f"127.0.0.1:{port}", token=token)), 10.0)
    try:
        yield peer
    finally:
        await peer.aclose()
        await app.stop(0)


async def test_records_as_the_service_signed_them_are_accepted(
    recorded: tuple[approval_pb2.Approval, approval_pb2.GetSigningKeyResponse], tmp_path: Path
) -> None:
    consumed, key = recorded
    async for peer in _peer_against(tmp_path, _Replay(consumed, key)):
        await peer.consume(consumed.approval_id, consumed.subject_hash, "use-1")


@pytest.mark.parametrize("alteration", ["role", "approver", "signature", "subject", "no_records"])
async def test_an_altered_record_is_refused_like_a_failed_consume(
    recorded: tuple[approval_pb2.Approval, approval_pb2.GetSigningKeyResponse],
    tmp_path: Path,
    alteration: str,
) -> None:
    consumed, key = recorded
    forged = approval_pb2.Approval()
    forged.CopyFrom(consumed)
    record = forged.decisions[0]
    if alteration == "role":
        del record.approver_roles[:]
        record.approver_roles.append("developer")
    elif alteration == "approver":
        record.approver = "mallory"
    elif alteration == "signature":
        record.signature = bytes(64)
    elif alteration == "subject":
        forged.subject_hash = "0" * 64
    else:
        del forged.decisions[:]
    async for peer in _peer_against(tmp_path, _Replay(forged, key)):
        with pytest.raises(PeerRefused) as caught:
            await peer.consume(consumed.approval_id, consumed.subject_hash, "use-1")
        assert caught.value.status == "FAILED_PRECONDITION"
