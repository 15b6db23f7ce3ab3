"""The pending-approval webhook against a real local HTTP server."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from approval_svc.webhook import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    RetryPolicy,
    verify_signature,
)
from cabincrew.config import ConfigError
from tests.approval.conftest import ApprovalEnv, StartServer, create_request

SECRET = b"a-webhook-secret-of-some-length"
FAST = RetryPolicy(attempts=3, initial_seconds=0.001, max_seconds=0.01, timeout_seconds=5)


@dataclass
class Hook:
    """A tiny HTTP receiver: answers with ``statuses`` in turn (then the last one)."""

    statuses: list[int] = field(default_factory=lambda: [200])
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    # Cleared: the handler waits before answering (to show the RPC does not wait for it).
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def __post_init__(self) -> None:
        self.release.set()

    async def wait_requests(self, count: int) -> None:
        """Wait (bounded) until ``count`` more requests arrived."""
        for _ in range(count):
            assert await asyncio.to_thread(self.arrived.acquire, True, 5), "no request came"


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            index = len(state.received)
            state.received.append(({k: v for k, v in self.headers.items()}, body))
            state.arrived.release()
            state.release.wait(5)
            status = state.statuses[min(index, len(state.statuses) - 1)]
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/approvals"
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


async def with_webhook(start_server: StartServer, hook: Hook, tmp_path: Path) -> ApprovalEnv:
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    return await start_server(
        webhook_policy=FAST,
        **{"approval.webhook_url": hook.url, "approval.webhook_secret_file": str(secret_file)},
    )


async def test_a_new_approval_is_announced_with_a_signed_post_without_waiting(
    start_server: StartServer, hook: Hook, tmp_path: Path
) -> None:
    env = await with_webhook(start_server, hook, tmp_path)
    hook.release.clear()  # the receiver hangs until released

    approval = await env.client("alice", []).create(
        create_request(artifacts=[{"name": "patch", "preview": "+ password = hunter2", "size": 20}])
    )
    await hook.wait_requests(1)
    assert approval.state == 1  # the RPC answered while the receiver still hangs
    hook.release.set()
    await env.manager.notifier.drain()

    ((headers, body),) = hook.received
    assert verify_signature(SECRET, body, headers[SIGNATURE_HEADER])
    assert headers[SIGNATURE_HEADER].startswith("sha256=")
    document = json.loads(body)
    assert document["event"] == "approval.pending"
    assert document["approval"]["approval_id"] == approval.approval_id
    assert document["approval"]["subject_hash"] == approval.subject_hash
    assert document["approval"]["required_role"] == "release-manager"
    assert b"hunter2" not in body  # previews stay in the service
    assert env.audit.of_type("approval.webhook_failed") == []


async def test_a_failed_delivery_is_retried_with_the_same_signed_body(
    start_server: StartServer, hook: Hook, tmp_path: Path
) -> None:
    hook.statuses = [500, 503, 204]
    env = await with_webhook(start_server, hook, tmp_path)

    await env.client("alice", []).create(create_request())
    await hook.wait_requests(3)
    await env.manager.notifier.drain()

    assert len(hook.received) == 3
    assert len({body for _, body in hook.received}) == 1
    assert len({headers[DELIVERY_HEADER] for headers, _ in hook.received}) == 1
    assert env.audit.of_type("approval.webhook_failed") == []


async def test_a_delivery_that_keeps_failing_is_audited(
    start_server: StartServer, hook: Hook, tmp_path: Path
) -> None:
    hook.statuses = [502]
    env = await with_webhook(start_server, hook, tmp_path)

    approval = await env.client("alice", []).create(create_request())
    await hook.wait_requests(FAST.attempts)
    await env.manager.notifier.drain()

    (event,) = env.audit.of_type("approval.webhook_failed")
    assert event["approval"]["approval_id"] == approval.approval_id
    assert event["severity"] == "error"
    assert SECRET.decode() not in repr(event)
    assert hook.url not in repr(event)


async def test_a_client_error_is_not_retried(
    start_server: StartServer, hook: Hook, tmp_path: Path
) -> None:
    hook.statuses = [404]
    env = await with_webhook(start_server, hook, tmp_path)

    await env.client("alice", []).create(create_request())
    await hook.wait_requests(1)
    await env.manager.notifier.drain()

    assert len(hook.received) == 1
    assert len(env.audit.of_type("approval.webhook_failed")) == 1


async def test_an_unreachable_receiver_is_audited(
    start_server: StartServer, tmp_path: Path
) -> None:
    unreachable = Hook(url="http://127.0.0.1:9/nothing-listens-here")
    env = await with_webhook(start_server, unreachable, tmp_path)

    await env.client("alice", []).create(create_request())
    await env.manager.notifier.drain()

    assert len(env.audit.of_type("approval.webhook_failed")) == 1


async def test_a_retried_create_is_announced_once(
    start_server: StartServer, hook: Hook, tmp_path: Path
) -> None:
    env = await with_webhook(start_server, hook, tmp_path)
    alice = env.client("alice", [])

    await alice.create(create_request(request_id="same"))
    await alice.create(create_request(request_id="same"))
    await hook.wait_requests(1)
    await env.manager.notifier.drain()

    assert len(hook.received) == 1


async def test_a_webhook_without_a_secret_is_refused_at_start(
    start_server: StartServer, hook: Hook
) -> None:
    with pytest.raises(ConfigError):
        await start_server(**{"approval.webhook_url": hook.url})
