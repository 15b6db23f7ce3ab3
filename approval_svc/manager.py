"""The approval service's use cases: who may do what, in which order, with which evidence.

No gRPC and no SQL: callers pass the authenticated ``Principal`` and domain values; the
store persists, the signer signs decision records, the audit emitter records every act and
every refusal, the change feed wakes watchers and the optional webhook tells people.
Time comes from an injected ``clock`` so that expiry is testable without waiting.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from approval_svc.errors import (
    ApprovalError,
    ApprovalNotFound,
    Expired,
    NotAllowed,
    NotAuthenticated,
)
from approval_svc.events import ApprovalAudit
from approval_svc.feed import ChangeFeed
from approval_svc.model import (
    SERVICE_ROLE,
    Approval,
    DecisionRecord,
    NewApproval,
    State,
    apply_decision,
    cancel,
    check_respond,
    consume,
    decision_for,
)
from approval_svc.records import sign_record
from approval_svc.store import ApprovalStore, Cursor, ListFilter, RequestKey, to_us
from approval_svc.webhook import RetryPolicy, WebhookNotifier
from cabincrew.aio import wait_event
from cabincrew.auth import Principal
from cabincrew.canonical import canonical_hash
from cabincrew.emitter import AuditEmitter, EmitError
from cabincrew.errors import CabinCrewError, InvalidArgument, Unavailable, Violation
from cabincrew.signing import Signer

log = logging.getLogger("approval_svc")

Clock = Callable[[], datetime]
DEFAULT_PAGE = 50
MAX_PAGE = 500
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def utc_now() -> datetime:
    """The real clock."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class WebhookSettings:
    """Where pending notifications go, and how hard to try."""

    url: str
    secret: bytes
    policy: RetryPolicy = field(default_factory=RetryPolicy)

    def __repr__(self) -> str:  # the secret never reaches logs
        return f"WebhookSettings(url={self.url!r}, policy={self.policy!r})"


@dataclass(frozen=True)
class Page:
    """One page of ``list``."""

    approvals: tuple[Approval, ...]
    next_page_token: str


class ApprovalManager:
    """Creates, answers, uses, withdraws, expires and watches approvals."""

    def __init__(
        self,
        store: ApprovalStore,
        signer: Signer,
        emitter: AuditEmitter,
        *,
        clock: Clock = utc_now,
        default_ttl: timedelta = timedelta(hours=24),
        sweep_seconds: float = 5.0,
        poll_seconds: float = 5.0,
        webhook: WebhookSettings | None = None,
    ) -> None:
        self._store = store
        self._signer = signer
        self._clock = clock
        self._default_ttl = default_ttl
        self._sweep_seconds = sweep_seconds
        self._poll_seconds = poll_seconds
        self.audit = ApprovalAudit(emitter, clock)
        self.feed = ChangeFeed()
        self.notifier = (
            WebhookNotifier(
                webhook.url,
                webhook.secret,
                self.audit_webhook_failure,
                policy=webhook.policy,
                clock=clock,
            )
            if webhook is not None
            else None
        )
        self._stop = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    # Lifecycle.

    async def start(self) -> None:
        """Start the expiry sweeper and the webhook client."""
        if self.notifier is not None:
            await self.notifier.start()
        if self._sweeper is None and self._sweep_seconds > 0:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="approval-sweeper")

    async def aclose(self) -> None:
        """Stop the sweeper, end watches, drop pending webhook retries, close the store."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.feed.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await self._sweeper
        if self.notifier is not None:
            await self.notifier.aclose()
        await asyncio.to_thread(self._store.close)

    def serving(self) -> bool:
        """Whether the service should report SERVING."""
        return not self._closed and (self._sweeper is None or not self._sweeper.done())

    async def _sweep_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sweep_once()
            except Exception:
                log.exception("expiry sweep failed; retrying")
            await wait_event(self._stop, self._sweep_seconds)

    async def sweep_once(self) -> list[Approval]:
        """Expire every overdue approval now, audit each and wake its watchers."""
        expired = await asyncio.to_thread(self._store.expire_due, self._clock())
        for approval in expired:
            await self.audit.expired(approval)
            self.feed.publish(approval.approval_id)
        return expired

    # Use cases.

    async def create(self, principal: Principal, build: Callable[[], NewApproval]) -> Approval:
        """Create a pending approval (idempotent by request id); ``build`` makes the
        request from the wire, after the caller is known to be authenticated."""
        async with self._refusals("create", principal, ""):
            _authenticated(principal)
            new = build()
            if new.created_by != principal.name:
                raise NotAllowed("created_by must be the authenticated caller")
            if new.requester != principal.name and not principal.has_role(SERVICE_ROLE):
                raise NotAllowed(
                    "only a principal with the role 'service' may ask on behalf of someone else"
                )
            now = self._clock()
            approval = Approval.open(uuid.uuid4().hex, new, now, self._default_ttl)
            key = RequestKey("create", new.request_id, new.fingerprint())
            stored, created = await asyncio.to_thread(self._store.create, approval, key)
        if created:
            await self.audit.created(stored)
            if self.notifier is not None:
                self.notifier.notify(stored)
        return await self._fresh(stored)

    async def get(self, principal: Principal, approval_id: str) -> Approval:
        """One approval; an overdue one is expired first (expiry is enforced on read)."""
        async with self._refusals("get", principal, approval_id, audit_all=False):
            _authenticated(principal)
            approval = await asyncio.to_thread(self._store.get, approval_id)
            if approval is None:
                raise ApprovalNotFound(f"no approval {approval_id!r}")
        return await self._fresh(approval)

    async def list_approvals(
        self, principal: Principal, where: ListFilter, page_size: int, page_token: str
    ) -> Page:
        """A page of approvals, oldest first."""
        async with self._refusals("list", principal, "", audit_all=False):
            _authenticated(principal)
            if page_size < 0:
                raise InvalidArgument(
                    "page_size must not be negative", [Violation("page_size", "not negative")]
                )
            limit = min(page_size or DEFAULT_PAGE, MAX_PAGE)
            scope = _filter_hash(where)
            after = _decode_token(page_token, scope) if page_token else None
        await self.sweep_once()
        rows = await asyncio.to_thread(self._store.list_approvals, where, limit + 1, after)
        now = self._clock()
        page = tuple(a.with_expiry(now) for a in rows[:limit])
        token = _encode_token(page[-1], scope) if len(rows) > limit else ""
        return Page(page, token)

    async def respond(
        self,
        principal: Principal,
        approval_id: str,
        subject_hash: str,
        approved: bool,
        reason: str,
        request_id: str = "",
    ) -> Approval:
        """Record the caller's signed answer; the approver is always the caller."""
        signed: list[DecisionRecord] = []
        async with self._refusals("respond", principal, approval_id, subject_hash):
            _authenticated(principal)
            _check_subject_hash(subject_hash)
            _check_reason(reason, required=not approved)
            now = self._clock()
            key = _key(
                "respond",
                request_id,
                approval_id=approval_id,
                principal=principal.name,
                subject_hash=subject_hash,
                approved=approved,
                reason=reason,
            )

            def transition(current: Approval) -> Approval:
                check_respond(current, principal, subject_hash, now)
                record = sign_record(
                    decision_for(current, principal, approved, reason, now), self._signer
                )
                signed.append(record)
                return apply_decision(current, record)

            updated, _ = await asyncio.to_thread(self._store.update, approval_id, transition, key)
            if updated is None:
                raise ApprovalNotFound(f"no approval {approval_id!r}")
        if signed:
            record = signed[-1]
            await self.audit.responded(updated, record)
            if updated.state in (State.APPROVED, State.REJECTED):
                await self.audit.decided(updated, record)
            self.feed.publish(approval_id)
        return await self._fresh(updated)

    async def consume(
        self, principal: Principal, approval_id: str, subject_hash: str, request_id: str = ""
    ) -> Approval:
        """Use an approved approval once, for its subject (orchestrator, gateways)."""
        async with self._refusals("consume", principal, approval_id, subject_hash):
            _authenticated(principal)
            _check_subject_hash(subject_hash)
            now = self._clock()
            key = _key(
                "consume",
                request_id,
                approval_id=approval_id,
                principal=principal.name,
                subject_hash=subject_hash,
            )
            updated, changed = await asyncio.to_thread(
                self._store.update,
                approval_id,
                lambda current: consume(current, principal, subject_hash, now),
                key,
            )
            if updated is None:
                raise ApprovalNotFound(f"no approval {approval_id!r}")
        if changed:
            await self.audit.consumed(updated)
            self.feed.publish(approval_id)
        return updated

    async def cancel(
        self, principal: Principal, approval_id: str, reason: str, request_id: str = ""
    ) -> Approval:
        """Withdraw an unused approval (its requester, its creator or an admin)."""
        async with self._refusals("cancel", principal, approval_id):
            _authenticated(principal)
            _check_reason(reason, required=False)
            now = self._clock()
            key = _key(
                "cancel",
                request_id,
                approval_id=approval_id,
                principal=principal.name,
                reason=reason,
            )
            updated, changed = await asyncio.to_thread(
                self._store.update,
                approval_id,
                lambda current: cancel(current, principal, reason, now),
                key,
            )
            if updated is None:
                raise ApprovalNotFound(f"no approval {approval_id!r}")
        if changed:
            await self.audit.cancelled(updated)
            self.feed.publish(approval_id)
        return updated

    async def watch(self, principal: Principal, approval_id: str) -> AsyncIterator[Approval]:
        """The current approval, then each change, until a terminal state.

        State is always re-read from the store, so a watcher that reconnects after a restart
        of the service sees what happened meanwhile. Changes by another replica arrive within
        ``poll_seconds``. When the service stops, the stream fails with UNAVAILABLE so that
        clients reconnect.
        """
        with self.feed.subscribe(approval_id) as changed:
            current = await self.get(principal, approval_id)
            yield current
            while not current.state.terminal:
                await wait_event(changed, self._poll_seconds)
                changed.clear()
                if self.feed.closed:
                    raise Unavailable("the approval service is stopping; watch again")
                latest = await self.get(principal, approval_id)
                if latest != current:
                    current = latest
                    yield current

    def signing_key(self) -> tuple[str, bytes]:
        """Key id and raw Ed25519 public key that verify decision records."""
        return self._signer.key_id, self._signer.public_key_bytes()

    async def audit_webhook_failure(self, approval: Approval, detail: str) -> None:
        """Record that people could not be notified."""
        await self.audit.webhook_failed(approval, detail)

    # Helpers.

    async def _fresh(self, approval: Approval) -> Approval:
        """``approval`` as of now: an overdue one is expired (and persisted, audited)."""
        now = self._clock()
        if approval.overdue(now):
            await self.sweep_once()
        return approval.with_expiry(now)

    @asynccontextmanager
    async def _refusals(
        self,
        operation: str,
        principal: Principal,
        approval_id: str,
        offered_hash: str = "",
        *,
        audit_all: bool = True,
    ) -> AsyncIterator[None]:
        """Audit the refusal raised in the block (every one for acts, only missing
        credentials for reads), then let it propagate."""
        try:
            yield
        except EmitError:
            raise
        except CabinCrewError as exc:
            if audit_all or isinstance(exc, NotAuthenticated):
                await self._audit_refusal(operation, principal, approval_id, offered_hash, exc)
            raise

    async def unauthenticated(self, operation: str, detail: str) -> None:
        """A call the runtime refused before it got here: no or a bad token."""
        await self.audit.refused(operation, "", None, "", "unauthenticated", detail)

    async def _audit_refusal(
        self,
        operation: str,
        principal: Principal,
        approval_id: str,
        offered_hash: str,
        exc: CabinCrewError,
    ) -> None:
        try:
            if isinstance(exc, Expired):
                await self.sweep_once()
            approval = (
                await asyncio.to_thread(self._store.get, approval_id) if approval_id else None
            )
            refusal = exc.refusal if isinstance(exc, ApprovalError) else exc.code.name.lower()
            await self.audit.refused(
                operation,
                approval_id,
                approval,
                principal.name if principal.authenticated else "",
                refusal,
                exc.message,
                offered_hash if _HEX64.match(offered_hash) else "",
            )
        except Exception:
            # The caller is refused either way; losing the record of a refusal is logged.
            log.exception("could not audit a refused %s", operation)


def _authenticated(principal: Principal) -> None:
    if not principal.authenticated:
        raise NotAuthenticated("approvals need an authenticated caller")


def _check_subject_hash(subject_hash: str) -> None:
    if not _HEX64.match(subject_hash):
        raise InvalidArgument(
            "subject_hash must be the SHA-256 the approval is bound to",
            [Violation("subject_hash", "64 lowercase hex characters")],
        )


def _check_reason(reason: str, *, required: bool) -> None:
    if required and not reason.strip():
        raise InvalidArgument(
            "a rejection needs a reason", [Violation("reason", "required when rejecting")]
        )
    if len(reason) > 4_000:
        raise InvalidArgument(
            "reason is too long", [Violation("reason", "at most 4000 characters")]
        )


def _key(method: str, request_id: str, **payload: object) -> RequestKey | None:
    if not request_id:
        return None
    if len(request_id) > 128:
        raise InvalidArgument(
            "request_id is too long", [Violation("request_id", "at most 128 characters")]
        )
    return RequestKey(method, request_id, canonical_hash(payload))


def _filter_hash(where: ListFilter) -> str:
    return canonical_hash(
        {
            "state": where.state.value if where.state else "",
            "workflow_id": where.workflow_id,
            "required_role": where.required_role,
            "requester": where.requester,
        }
    )[:16]


def _encode_token(last: Approval, scope: str) -> str:
    raw = json.dumps({"c": to_us(last.created_at), "i": last.approval_id, "f": scope})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_token(token: str, scope: str) -> Cursor:
    bad = InvalidArgument(
        "page_token is not one this list returned",
        [Violation("page_token", "pass next_page_token from the previous page unchanged")],
    )
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        cursor = Cursor(int(raw["c"]), str(raw["i"]))
        same_scope = raw["f"] == scope
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise bad from None
    if not same_scope:
        raise bad
    return cursor
