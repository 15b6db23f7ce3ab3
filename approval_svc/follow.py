"""Client-side helper: follow an approval until it ends, across restarts of the service.

``WatchApproval`` sends the current state first, so a watcher that reconnects after the
service restarted (or after a network failure) loses nothing: it simply watches again.
The orchestrator and the gateways use ``follow`` to wait for a decision.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from cabincrew.clients import ApprovalClient, RPCError
from cabincrew.v1 import approval_pb2

TERMINAL = frozenset(
    {
        approval_pb2.APPROVAL_STATE_REJECTED,
        approval_pb2.APPROVAL_STATE_EXPIRED,
        approval_pb2.APPROVAL_STATE_CANCELLED,
        approval_pb2.APPROVAL_STATE_CONSUMED,
    }
)
_RECONNECT = frozenset({grpc.StatusCode.UNAVAILABLE})


async def follow(
    client: ApprovalClient,
    approval_id: str,
    *,
    until: frozenset[int] = TERMINAL,
    max_failures: int = 20,
    initial_backoff: float = 0.05,
    max_backoff: float = 2.0,
) -> AsyncIterator[approval_pb2.Approval]:
    """Yield every state the service sends (the current one first after each connect),
    until one in ``until``; reconnect with exponential backoff while it is UNAVAILABLE.

    Pass ``until=TERMINAL | {APPROVAL_STATE_APPROVED}`` to stop at a decision.
    """
    failures = 0
    while True:
        try:
            async for update in client.watch(approval_id):
                failures = 0
                yield update.approval
                if update.approval.state in until:
                    return
            return
        except RPCError as exc:
            if exc.status not in _RECONNECT or failures >= max_failures:
                raise
            failures += 1
            await asyncio.sleep(min(max_backoff, initial_backoff * 2 ** (failures - 1)))
