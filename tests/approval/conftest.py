"""Fixtures for the approval service: a real server on a loopback port, a controlled clock,
an audit recorder, identities and typed clients."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from approval_svc.server import build
from approval_svc.webhook import RetryPolicy
from cabincrew.clients import ApprovalClient, ChannelOptions, open_channel
from cabincrew.config import Config
from cabincrew.runtime.server import CabinCrewServer, create_server, service_factories
from cabincrew.v1 import approval_pb2
from tests.conftest import make_config, token_for

START = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class Recorder:
    """An ``AuditEmitter`` fake that keeps what it was given (a fake of a dependency)."""

    events: list[dict[str, Any]] = field(default_factory=list)

    async def emit(
        self,
        event_type: str,
        *,
        workflow_state: str,
        severity: str = "info",
        message: str = "",
        workflow: Mapping[str, Any] | None = None,
        engine: Mapping[str, Any] | None = None,
        plan_token: Mapping[str, Any] | None = None,
        artifacts: Sequence[Mapping[str, Any]] | None = None,
        policy: Mapping[str, Any] | None = None,
        approval: Mapping[str, Any] | None = None,
        integrity_check: Mapping[str, Any] | None = None,
        gateway: Mapping[str, Any] | None = None,
        event_id: str | None = None,
    ) -> str:
        event_id = event_id or f"ev-{len(self.events)}"
        self.events.append(
            {
                "event_id": event_id,
                "event_type": event_type,
                "workflow_state": workflow_state,
                "severity": severity,
                "message": message,
                "workflow": dict(workflow) if workflow else None,
                "gateway": dict(gateway) if gateway else None,
                "approval": dict(approval) if approval else None,
            }
        )
        return event_id

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        """Events of one type, oldest first."""
        return [e for e in self.events if e["event_type"] == event_type]

    def refusals(self, refusal: str) -> list[dict[str, Any]]:
        """``approval.refused`` events whose reason starts with ``refusal``."""
        return [
            e
            for e in self.of_type("approval.refused")
            if e["approval"]["reason"].startswith(f"{refusal}:")
        ]


def client_channel(port: int, token: str) -> grpc.aio.Channel:
    """A loopback channel that sends ``token`` (if any) on every call."""
    return open_channel(ChannelOptions(address=f"127.0.0.1:{port}", token=token))


def subject(text: str = "plan") -> str:
    """A subject hash."""
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class ApprovalEnv:
    """A running approval server and what tests need around it."""

    server: CabinCrewServer
    config: Config
    clock: FakeClock
    audit: Recorder
    _clients: list[ApprovalClient] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def manager(self) -> Any:
        handle = next(h for h in self.server.handles if h.name == "approval")
        return handle.servicer.manager  # type: ignore[attr-defined]

    def token(self, name: str, roles: list[str]) -> str:
        return token_for(self.config, name, roles)

    def client(self, name: str | None, roles: list[str] | None = None) -> ApprovalClient:
        """A client acting as ``name`` (None: no credentials). No retries: tests see
        every status as it is."""
        token = self.token(name, roles or []) if name else ""
        client = ApprovalClient(
            client_channel(self.port, token), deadline_seconds=10, max_attempts=1
        )
        self._clients.append(client)
        return client

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


def create_request(
    subject_hash: str | None = None, *, request_id: str = "", **fields: Any
) -> approval_pb2.CreateApprovalRequest:
    """A valid plan-token approval request (fields override)."""
    values: dict[str, Any] = {
        "request_id": request_id,
        "workflow_id": "wf-1",
        "step_id": "deploy",
        "subject_kind": approval_pb2.SUBJECT_KIND_PLAN_TOKEN,
        "subject_hash": subject_hash or subject(),
        "reason": "production deploy needs a release manager",
        "required_role": "release-manager",
        **fields,
    }
    return approval_pb2.CreateApprovalRequest(**values)


StartServer = Callable[..., Awaitable[ApprovalEnv]]


@pytest.fixture
async def start_server(data_dir: Path) -> AsyncIterator[StartServer]:
    """Start approval servers (stopped at the end); keyword arguments override config."""
    started: list[ApprovalEnv] = []

    async def start(
        *,
        clock: FakeClock | None = None,
        audit: Recorder | None = None,
        services: tuple[str, ...] = ("approval",),
        factories: dict[str, Any] | None = None,
        webhook_policy: RetryPolicy | None = None,
        schema: str | None = None,
        real_audit: bool = False,
        **overrides: object,
    ) -> ApprovalEnv:
        config = make_config(data_dir, services=services, **overrides)
        clock = clock or FakeClock()
        audit = audit if audit is not None else Recorder()
        approval_factory = functools.partial(
            build,
            clock=clock,
            # real_audit: the process's own OutboxEmitter (``emitter_for``) streams to a
            # real AuditService; the recorder then stays empty.
            emitter=None if real_audit else audit,
            webhook_policy=webhook_policy,
            schema=schema,
        )
        app, _port = await create_server(
            config, {**service_factories(), **(factories or {}), "approval": approval_factory}
        )
        await app.start()
        env = ApprovalEnv(app, config, clock, audit)
        started.append(env)
        return env

    yield start
    for env in reversed(started):
        await env.aclose()
        await env.server.stop(0)


@pytest.fixture
async def env(start_server: StartServer) -> ApprovalEnv:
    """One running approval server with a controlled clock and an audit recorder."""
    return await start_server()
