"""Stopping a server while clients watch workflows and approvals: the stop completes and
every open watch ends with an error the client can act on (watch again elsewhere)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from cabincrew.clients import RPCError
from cabincrew.v1 import common_pb2
from tests.orchestrator.test_service_support import definition, start_orchestra, step_of

GATE = definition(
    [
        {
            "id": "sign-off",
            "kind": "approval",
            "description": "release sign-off",
            "governance": {"approval_role": "release-manager"},
        }
    ]
)


async def _drain(stream: AsyncIterator[Any], first: asyncio.Event) -> grpc.StatusCode | None:
    """Read a watch to its end; the status it ended with (None: it ended cleanly)."""
    try:
        async for _update in stream:
            first.set()
    except RPCError as exc:
        return exc.status
    return None


async def test_stop_ends_open_watches_and_returns(tmp_path: Path) -> None:
    env = await start_orchestra(tmp_path)
    try:
        waiting = []
        for _ in range(3):
            workflow = await env.submit(GATE)
            waiting.append(
                await env.until(
                    workflow.workflow_id,
                    lambda w: w.state == common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL,
                )
            )
        streams = [env.workflows().watch(w.workflow_id) for w in waiting]
        streams += [env.approvals().watch(step_of(w, "sign-off").approval_id) for w in waiting]
        firsts = [asyncio.Event() for _ in streams]
        watchers = [
            asyncio.create_task(_drain(stream, first))
            for stream, first in zip(streams, firsts, strict=True)
        ]
        async with asyncio.timeout(30):
            for first in firsts:  # every watch is open and has sent its first update
                await first.wait()
        async with asyncio.timeout(30):
            await env.server.stop(0)
        async with asyncio.timeout(30):
            endings = await asyncio.gather(*watchers)
        assert all(not task.cancelled() for task in watchers)
        # UNAVAILABLE, never a clean end (the workflows did not finish): the client watches
        # again, on another replica or after the restart.
        assert endings == [grpc.StatusCode.UNAVAILABLE] * len(watchers), endings
    finally:
        await env.close()  # the clients' channels; stopping again is a no-op
