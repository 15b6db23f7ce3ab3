"""Optional webhook that tells people an approval waits for them.

When an approval becomes pending, a background task POSTs a JSON document to
``approval.webhook_url`` with the header ``X-CabinCrew-Signature: sha256=<hex>``, the
HMAC-SHA256 of the exact body bytes under the secret in ``approval.webhook_secret_file``.
Delivery never blocks the RPC that created the approval; it is retried with exponential
backoff (tenacity) on connection errors, timeouts, 408, 429 and 5xx, and a delivery that
finally fails is reported to ``on_failure`` (the service audits it). The body holds what a
person needs to find the approval, not its artifact previews.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from approval_svc.model import Approval, format_instant
from cabincrew.config import ApprovalConfig, ConfigError
from cabincrew.errors import Violation

log = logging.getLogger("approval_svc.webhook")

SIGNATURE_HEADER = "X-CabinCrew-Signature"
DELIVERY_HEADER = "X-CabinCrew-Delivery"
EVENT_HEADER = "X-CabinCrew-Event"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one delivery."""

    attempts: int = 6
    initial_seconds: float = 0.5
    max_seconds: float = 30.0
    timeout_seconds: float = 10.0


class _Retryable(Exception):
    """A failure worth another attempt."""


class _Permanent(Exception):
    """A failure that another attempt would not fix (for example 400 or 404)."""


def sign_body(secret: bytes, body: bytes) -> str:
    """The signature header value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str) -> bool:
    """Receiver side: whether ``header`` is the signature of ``body`` (constant time)."""
    return hmac.compare_digest(sign_body(secret, body), header)


def load_secret(config: ApprovalConfig) -> bytes | None:
    """The webhook secret, or None when no webhook is configured.

    A webhook without a secret is refused at start: receivers could not tell our
    notifications from anyone's.
    """
    if not config.webhook_url:
        return None
    if not config.webhook_url.startswith(("http://", "https://")):
        raise ConfigError(
            "approval.webhook_url: must be an http:// or https:// URL",
            [Violation("approval.webhook_url", "must be an http:// or https:// URL")],
        )
    if not config.webhook_secret_file:
        raise ConfigError(
            "approval.webhook_secret_file: required when approval.webhook_url is set",
            [Violation("approval.webhook_secret_file", "required with webhook_url")],
        )
    try:
        secret = Path(config.webhook_secret_file).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(
            f"approval.webhook_secret_file: cannot read it ({exc.strerror})",
            [Violation("approval.webhook_secret_file", "cannot be read")],
        ) from None
    if len(secret) < 16:
        raise ConfigError(
            "approval.webhook_secret_file: the secret must be at least 16 bytes",
            [Violation("approval.webhook_secret_file", "at least 16 bytes")],
        )
    return secret


def payload(approval: Approval, now: datetime) -> dict[str, Any]:
    """The JSON document sent for a pending approval."""
    return {
        "event": "approval.pending",
        "sent_at": format_instant(now),
        "approval": {
            "approval_id": approval.approval_id,
            "subject_kind": approval.subject_kind.value,
            "subject_hash": approval.subject_hash,
            "workflow_id": approval.workflow_id,
            "step_id": approval.step_id,
            "gateway_request_id": approval.gateway_request_id,
            "reason": approval.reason,
            "required_role": approval.required_role,
            "quorum": approval.quorum,
            "requester": approval.requester,
            "created_at": format_instant(approval.created_at),
            "expires_at": format_instant(approval.expires_at),
            "triggered_policies": [
                str(p.get("policy_id", "")) for p in approval.triggered_policies
            ],
            "artifacts": [
                {"name": a.name, "role": a.role, "hash": a.hash, "size": a.size}
                for a in approval.artifacts
            ],
        },
        "review": f"cabincrew approvals show {approval.approval_id}",
    }


class WebhookNotifier:
    """Delivers pending notifications in background tasks (``start``/``aclose``)."""

    def __init__(
        self,
        url: str,
        secret: bytes,
        on_failure: Callable[[Approval, str], Awaitable[None]],
        *,
        policy: RetryPolicy | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._url = url
        self._secret = secret
        self._on_failure = on_failure
        self._policy = policy or RetryPolicy()
        self._clock = clock
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        """Open the HTTP client."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=self._policy.timeout_seconds,
                follow_redirects=False,
            )

    def notify(self, approval: Approval) -> None:
        """Schedule delivery for ``approval``; returns at once."""
        if self._closed:
            return
        task = asyncio.create_task(self._deliver(approval), name=f"webhook:{approval.approval_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for deliveries in flight (tests and graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop: deliveries still retrying are abandoned; idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _deliver(self, approval: Approval) -> None:
        body = json.dumps(payload(approval, self._clock()), sort_keys=True).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign_body(self._secret, body),
            DELIVERY_HEADER: uuid.uuid4().hex,
            EVENT_HEADER: "approval.pending",
        }
        policy = self._policy
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts),
            wait=wait_exponential(multiplier=policy.initial_seconds, max=policy.max_seconds),
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._post(body, headers)
        except asyncio.CancelledError:
            raise
        except (_Retryable, _Permanent) as exc:
            detail = f"{exc} (after {retrying.statistics.get('attempt_number', 1)} attempt(s))"
            log.warning("webhook for approval %s failed: %s", approval.approval_id, detail)
            try:
                await self._on_failure(approval, detail)
            except Exception:
                log.exception("could not record the webhook failure")

    async def _post(self, body: bytes, headers: dict[str, str]) -> None:
        if self._client is None:
            raise _Permanent("notifier not started")
        try:
            response = await self._client.post(self._url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise _Retryable("timed out") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"connection failed ({type(exc).__name__})") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        if status in (408, 429) or status >= 500:
            raise _Retryable(f"HTTP {status}")
        raise _Permanent(f"HTTP {status}")
