"""The audit emitter every service uses.

Contract: ``await emitter.emit(...)`` returns only once the event is durably written to
the service's local outbox (a SQLite file in its data dir); a background task streams the
outbox to AuditService over one long-lived ``AppendStream`` and deletes events only when
acknowledged; on reconnect they are re-sent in order and de-duplicated by ``event_id``.
The stream stays open while there is traffic and is ended after ``idle_seconds`` with
everything acknowledged, so that a server shutting down gracefully is not held for its
whole grace period by an idle emitter; the next event opens a new one. Events go in
batches (``AppendStreamRequest.events``): as many as are waiting, up to
``MAX_BATCH_EVENTS`` events or ``MAX_BATCH_BYTES`` per request. A server that predates
batches answers a batch without ``results`` (it read an empty ``event`` and refused it,
storing nothing); the emitter then resends in order with one event per message.
When the outbox cannot be written, ``emit`` raises ``EmitError`` and the caller fails
closed.

Secrets are redacted before the event touches the outbox, so no secret is at rest in any
service's data dir either. An event the audit service refuses (invalid, or an event_id
reused for different content) would block the ordered outbox forever; it is moved to the
outbox's ``dead_letter`` table, logged, and reported by a ``<component>.audit_event_refused``
event: never silently dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cabincrew.aio import wait_event
from cabincrew.errors import CabinCrewError, InvalidArgument, Violation

if TYPE_CHECKING:
    from cabincrew.runtime.context import ServiceContext

log = logging.getLogger("cabincrew.emitter")

T = TypeVar("T")

_COMPONENT = re.compile(r"[a-z][a-z0-9_]{0,63}")
REFUSED_SUFFIX = "audit_event_refused"
# Bounds of one AppendStreamRequest batch (the service takes up to 1000 events, and gRPC
# messages up to 4 MiB by default).
MAX_BATCH_EVENTS = 256
MAX_BATCH_BYTES = 1 << 20

# (outbox position, event_id, serialised AuditEvent)
_Row = tuple[int, str, bytes]


class EmitError(CabinCrewError):
    """The event could not be made durable; governed actions must fail closed."""

    def remedy(self) -> str:
        return "check that the service's data dir is writable and not full"


class AuditEmitter(Protocol):
    """What services call to record an audit event."""

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
        """Record one event (parts in the protocol's JSON form); returns its event_id.

        ``event_type`` must start with the emitting component, e.g.
        ``approval.created``; the emitter adds ``event_id`` (a UUID unless given) and
        ``timestamp``.
        """
        ...


class _Outbox:
    """The SQLite outbox; every method runs on the emitter's single database thread."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, timeout=30, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                with conn:
                    conn.execute(
                        "CREATE TABLE IF NOT EXISTS outbox (position INTEGER PRIMARY KEY "
                        "AUTOINCREMENT, event_id TEXT NOT NULL, event BLOB NOT NULL, "
                        "created_at_us INTEGER NOT NULL)"
                    )
                    conn.execute(
                        "CREATE TABLE IF NOT EXISTS dead_letter (position INTEGER PRIMARY KEY, "
                        "event_id TEXT NOT NULL, event BLOB NOT NULL, code INTEGER NOT NULL, "
                        "reason TEXT NOT NULL, failed_at_us INTEGER NOT NULL)"
                    )
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def put(self, rows: list[tuple[str, bytes, int]]) -> None:
        conn = self._db()
        # emit returns once this commits: fsynced, whatever an earlier statement set.
        conn.execute("PRAGMA synchronous=FULL")
        with conn:
            conn.executemany(
                "INSERT INTO outbox (event_id, event, created_at_us) VALUES (?, ?, ?)", rows
            )

    def after(self, position: int, limit: int) -> list[tuple[int, str, bytes]]:
        cursor = self._db().execute(
            "SELECT position, event_id, event FROM outbox WHERE position > ? "
            "ORDER BY position LIMIT ?",
            (position, limit),
        )
        return [(int(p), str(e), bytes(b)) for p, e, b in cursor.fetchall()]

    def remove(self, positions: list[int]) -> int:
        conn = self._db()
        # Without an fsync of its own: a delete lost in a crash only re-sends events the
        # service already holds, which it de-duplicates by event_id. The next insert's fsync
        # (synchronous=FULL) makes the delete durable with it. Saves one fsync per ack, on
        # the thread that the next emit's insert waits for.
        conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with conn:
                conn.executemany("DELETE FROM outbox WHERE position = ?", [(p,) for p in positions])
        finally:
            conn.execute("PRAGMA synchronous=FULL")
        return self.count()

    def dead_letter(self, position: int, code: int, reason: str) -> None:
        conn = self._db()
        with conn:
            conn.execute(
                "INSERT INTO dead_letter (position, event_id, event, code, reason, failed_at_us) "
                "SELECT position, event_id, event, ?, ?, ? FROM outbox WHERE position = ?",
                (code, reason, int(time.time() * 1e6), position),
            )
            conn.execute("DELETE FROM outbox WHERE position = ?", (position,))

    def count(self) -> int:
        row = self._db().execute("SELECT count(*) FROM outbox").fetchone()
        return int(row[0])

    def dead_letters(self) -> list[tuple[str, int, str]]:
        cursor = self._db().execute(
            "SELECT event_id, code, reason FROM dead_letter ORDER BY position"
        )
        return [(str(e), int(c), str(r)) for e, c, r in cursor.fetchall()]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _StreamBroken(Exception):
    """The stream ended; reconnect after ``delay`` seconds (None: the usual backoff)."""

    def __init__(self, delay: float | None = None) -> None:
        super().__init__()
        self.delay = delay


class OutboxEmitter:
    """An ``AuditEmitter`` with a durable local outbox and one long-lived stream."""

    def __init__(
        self,
        component: str,
        outbox_path: str | Path,
        *,
        address: Callable[[], str],
        token: Callable[[], str],
        tls_ca_file: str = "",
        window: int = 1000,
        min_backoff: float = 0.05,
        max_backoff: float = 2.0,
        idle_seconds: float = 1.0,
    ) -> None:
        if not _COMPONENT.fullmatch(component):
            raise ValueError(f"invalid component name {component!r}")
        self.component = component
        self._outbox = _Outbox(Path(outbox_path))
        self._address = address
        self._token = token
        self._tls_ca_file = tls_ca_file
        self._window = window
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._idle_seconds = idle_seconds
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-outbox")
        self._pending: list[tuple[tuple[str, bytes, int], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._work = asyncio.Event()
        self._drained = asyncio.Event()
        self._closed = False
        self._channel: grpc.aio.Channel | None = None
        # Cleared for good when the service turns out to predate batches.
        self._batching = True

    # --- emitting --------------------------------------------------------------------------

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
        """Record one event durably in the outbox; returns its event_id."""
        if self._closed:
            raise EmitError("the audit emitter is closed")
        if not event_type.startswith(f"{self.component}."):
            raise InvalidArgument(
                f"event_type must start with {self.component}.",
                [Violation("event_type", f"must start with the component, {self.component}.")],
            )
        if not workflow_state:
            # The protocol requires it for chain-of-custody reconstruction.
            raise InvalidArgument(
                "workflow_state is required",
                [Violation("workflow_state", "required; the workflow's state, e.g. INIT")],
            )
        document: dict[str, Any] = {
            "event_id": event_id or str(uuid.uuid4()),
            "timestamp": _now_rfc3339(),
            "event_type": event_type,
            "workflow_state": workflow_state,
        }
        if severity:
            document["severity"] = severity
        if message:
            document["message"] = message
        parts: dict[str, Any] = {
            "workflow": workflow,
            "engine": engine,
            "plan_token": plan_token,
            "artifacts": artifacts,
            "policy": policy,
            "approval": approval,
            "integrity_check": integrity_check,
            "gateway": gateway,
        }
        for name, part in parts.items():
            if part is not None:
                document[name] = [dict(a) for a in part] if name == "artifacts" else dict(part)
        data = _encode(document)
        await self._write((document["event_id"], data, int(time.time() * 1e6)))
        return str(document["event_id"])

    async def _write(self, row: tuple[str, bytes, int]) -> None:
        """Group commit: concurrent emits share one outbox transaction."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((row, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_pending())
        await future
        self._drained.clear()
        self._work.set()
        self._ensure_sender()

    async def _flush_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._db(self._outbox.put, [row for row, _ in batch])
            except (sqlite3.Error, OSError) as exc:
                log.error("cannot write the audit outbox: %s", exc)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(EmitError("cannot write the audit outbox"))
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, fn, *args)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start streaming what the outbox holds (also started by the first emit)."""
        self._ensure_sender()

    def _ensure_sender(self) -> None:
        if not self._closed and (self._sender is None or self._sender.done()):
            self._work.set()
            self._sender = asyncio.create_task(self._run(), name=f"audit-emitter-{self.component}")

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until every outboxed event is acknowledged (or dead-lettered)."""
        self._ensure_sender()
        deadline = asyncio.get_running_loop().time() + timeout
        while await self._db(self._outbox.count) > 0:
            self._drained.clear()
            # Another check after clearing, so an ack landing in between is not missed.
            if await self._db(self._outbox.count) == 0:
                break
            left = deadline - asyncio.get_running_loop().time()
            if not await wait_event(self._drained, left):
                return False
        return True

    async def pending_count(self) -> int:
        """Events in the outbox not yet acknowledged."""
        return await self._db(self._outbox.count)

    async def dead_letters(self) -> list[tuple[str, int, str]]:
        """(event_id, status code, reason) of every refused event."""
        return await self._db(self._outbox.dead_letters)

    async def aclose(self) -> None:
        """Stop streaming; what is not acknowledged stays in the outbox; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        with contextlib.suppress(Exception):
            await self._db(self._outbox.close)
        self._db_thread.shutdown(wait=True)

    # --- streaming -------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._min_backoff
        while not self._closed:
            await self._work.wait()
            try:
                if await self._db(self._outbox.count) == 0:
                    self._work.clear()
                    self._drained.set()
                    if await self._db(self._outbox.count) == 0:
                        continue
                await self._stream()
                backoff = self._min_backoff
            except _StreamBroken as broken:
                delay = broken.delay if broken.delay is not None else backoff
                backoff = min(backoff * 2, self._max_backoff)
                await asyncio.sleep(delay)
                # Unacknowledged events are still in the outbox: look again.
                self._work.set()
            except (sqlite3.Error, OSError) as exc:
                log.error("cannot read the audit outbox: %s", exc)
                await asyncio.sleep(self._max_backoff)
                self._work.set()
            except Exception:
                # The sender must outlive any surprise, or events would wait forever.
                log.exception("the audit emitter failed; retrying")
                await asyncio.sleep(self._max_backoff)
                self._work.set()

    def _open_channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            options = [
                ("grpc.max_reconnect_backoff_ms", int(self._max_backoff * 1000)),
                ("grpc.initial_reconnect_backoff_ms", int(self._min_backoff * 1000)),
            ]
            address = self._address()
            if self._tls_ca_file:
                ca = Path(self._tls_ca_file).read_bytes()
                credentials = grpc.ssl_channel_credentials(ca)
                self._channel = grpc.aio.secure_channel(address, credentials, options=options)
            else:
                self._channel = grpc.aio.insecure_channel(address, options=options)
        return self._channel

    async def _stream(self) -> None:
        from cabincrew.v1 import audit_pb2_grpc

        try:
            token = self._token()
        except (CabinCrewError, OSError) as exc:
            log.error("the audit emitter has no token: %s", exc)
            raise _StreamBroken(self._max_backoff) from None
        stub = audit_pb2_grpc.AuditServiceStub(self._open_channel())
        call = stub.AppendStream(metadata=(("authorization", f"Bearer {token}"),))
        # One entry per request written, in order: whether it was a batch, and its rows.
        inflight: deque[tuple[bool, list[_Row]]] = deque()
        outstanding = 0  # events in inflight
        room = asyncio.Event()
        room.set()
        idle = asyncio.Event()
        # One form for the whole stream: the receiver may learn mid-stream that the service
        # predates batches, and a group already cut as a batch must not leave as one event.
        batching = self._batching

        async def send() -> None:
            nonlocal outstanding
            last = 0
            # Whether the last read took every row committed before it (fewer than asked).
            caught_up = False
            while True:
                free = self._window - outstanding
                if caught_up and free > 0 and not self._work.is_set():
                    # Every commit sets _work after it: nothing new since that read, so
                    # another one (a round trip to the database thread) would find nothing.
                    rows = []
                else:
                    self._work.clear()
                    rows = await self._db(self._outbox.after, last, free) if free > 0 else []
                    caught_up = len(rows) < free
                if not rows:
                    if free <= 0:
                        room.clear()
                        await room.wait()
                        continue
                    if not await wait_event(self._work, self._idle_seconds) and not inflight:
                        # Idle with everything acknowledged: end the stream, so that a
                        # server shutting down gracefully is not kept waiting for it.
                        idle.set()
                        await call.done_writing()
                        return
                    continue
                for group in _batches(rows) if batching else ([row] for row in rows):
                    # One form for the whole stream, a lone event as a batch of one: a
                    # service from before batches would store an `event` sent behind a batch
                    # it refused, and the outbox's order would be lost.
                    batch = batching
                    inflight.append((batch, group))
                    outstanding += len(group)
                    await call.write(_request(group, batch))
                    last = group[-1][0]

        async def receive() -> None:
            nonlocal outstanding
            acked: list[int] = []
            try:
                while True:
                    response: Any = await call.read()
                    if response is grpc.aio.EOF:
                        if idle.is_set() and not inflight:
                            return
                        raise _StreamBroken()
                    if not inflight:
                        log.error("the audit service acknowledged an event never sent")
                        raise _StreamBroken()
                    batch, group = inflight.popleft()
                    outstanding -= len(group)
                    room.set()
                    if batch and not response.results:
                        # A service that predates batches read an empty `event` (and refused
                        # it): nothing was stored. Send one event per message from now on.
                        log.warning("the audit service does not take batches; sending singly")
                        self._batching = False
                        raise _StreamBroken(0.0)
                    results = response.results if batch else [response]
                    if len(results) != len(group):
                        log.error("the audit service answered %d of %d", len(results), len(group))
                        raise _StreamBroken()
                    for (position, event_id, data), result in zip(group, results, strict=True):
                        if result.event_id and result.event_id != event_id:
                            log.error(
                                "audit acks out of order (%s, expected %s)",
                                result.event_id,
                                event_id,
                            )
                            raise _StreamBroken()
                        if result.HasField("error"):
                            if acked:
                                await self._acknowledge(acked)
                                acked = []
                            await self._refused(position, event_id, data, result.error)
                            continue
                        acked.append(position)
                    if len(acked) >= 256 or not inflight:
                        await self._acknowledge(acked)
                        acked = []
            finally:
                if acked:
                    with contextlib.suppress(Exception):
                        await self._acknowledge(acked)

        sender = asyncio.create_task(send())
        receiver = asyncio.create_task(receive())
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            if idle.is_set():
                # The service ends the stream once it has answered everything sent.
                await receiver
                return
        except grpc.aio.AioRpcError as exc:
            raise _StreamBroken(retry_delay(exc)) from None
        except asyncio.InvalidStateError:
            raise _StreamBroken() from None
        finally:
            for task in (sender, receiver):
                task.cancel()
            for task in (sender, receiver):
                with contextlib.suppress(BaseException):
                    await task
            call.cancel()
        raise _StreamBroken()

    async def _acknowledge(self, positions: list[int]) -> None:
        left = await self._db(self._outbox.remove, positions)
        if left == 0:
            self._drained.set()

    async def _refused(self, position: int, event_id: str, data: bytes, error: Any) -> None:
        code = grpc.StatusCode.UNKNOWN
        for candidate in grpc.StatusCode:
            if candidate.value[0] == error.code:
                code = candidate
        from cabincrew.redaction import redact_text

        # An id is caller-chosen text: the service may have refused it for looking like a
        # secret, so the log gets it redacted like any other string.
        log.error(
            "the audit service refused event %s (%s: %s); moved to the outbox's dead_letter table",
            redact_text(event_id)[0],
            code.name,
            redact_text(str(error.message))[0],
        )
        await self._db(self._outbox.dead_letter, position, int(error.code), str(error.message))
        if await self._db(self._outbox.count) == 0:
            self._drained.set()
        event = _decode(data)
        if event.event_type.endswith(f".{REFUSED_SUFFIX}"):
            return
        # Report the omission as an event of its own (the protocol forbids silent omissions).
        workflow = {}
        if event.HasField("workflow"):
            workflow = {
                "workflow_id": event.workflow.workflow_id,
                "step_id": event.workflow.step_id,
            }
        try:
            await self.emit(
                f"{self.component}.{REFUSED_SUFFIX}",
                workflow_state=event.workflow_state or "UNKNOWN",
                severity="error",
                message=f"audit event {event_id} was refused ({code.name}): {error.message}",
                workflow={k: v for k, v in workflow.items() if v} or None,
            )
        except CabinCrewError as exc:
            log.error("cannot record the refusal of %s: %s", event_id, exc.message)


def _encode(document: dict[str, Any]) -> bytes:
    from cabincrew.convert import from_protocol, validate_protocol
    from cabincrew.redaction import redact_json
    from cabincrew.v1 import common_pb2

    # Fast path: a compiled check accepts the valid event; only a refused one pays for the
    # full validator's field-by-field description. Nothing invalid leaves.
    problems: list[tuple[str, str]] = []
    if not _audit_event_check()(document):
        problems = validate_protocol(document, "AuditEvent") or [("", "invalid audit event")]
    if problems:
        raise InvalidArgument(
            f"invalid audit event: {problems[0][0]}: {problems[0][1]}",
            [Violation(path, text) for path, text in problems],
        )
    redacted, _count = redact_json(document)
    return from_protocol(redacted, common_pb2.AuditEvent).SerializeToString()


@functools.cache
def _audit_event_check() -> Callable[[Any], bool]:
    """``_audit_event_validator().is_valid``, compiled (cabincrew.schema_check) when it can be."""
    from cabincrew.schema_check import UnsupportedSchema, compile_check

    validator = _audit_event_validator()
    try:
        return compile_check(validator)
    except UnsupportedSchema as exc:
        log.warning("audit events are checked with plain jsonschema: %s", exc)
        return validator.is_valid  # type: ignore[no-any-return]


@functools.cache
def _audit_event_validator() -> Any:
    """The AuditEvent validator with every ``$ref`` inlined (built once; same verdicts).

    Resolving references is most of what ``jsonschema`` spends on an event. Draft-07 ignores
    a ``$ref``'s sibling keywords, so inlining the target is exact; a recursive definition
    keeps the ordinary validator.
    """
    import jsonschema

    from cabincrew import protocol_schema
    from cabincrew.convert import _FORMAT_CHECKER, _validator

    definitions = protocol_schema.protocol_schema()["definitions"]

    def inline(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                name = ref.removeprefix("#/definitions/")
                if name == ref or name in seen or name not in definitions:
                    raise LookupError(ref)
                return inline(definitions[name], (*seen, name))
            return {key: inline(value, seen) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item, seen) for item in node]
        return node

    try:
        schema = inline(definitions["AuditEvent"], ("AuditEvent",))
    except LookupError:
        return _validator("AuditEvent")
    return jsonschema.Draft7Validator(schema, format_checker=_FORMAT_CHECKER)


def _decode(data: bytes) -> Any:
    from cabincrew.v1 import common_pb2

    return common_pb2.AuditEvent.FromString(data)


def _batches(rows: list[_Row]) -> Iterator[list[_Row]]:
    """Consecutive groups of rows within the batch bounds."""
    group: list[_Row] = []
    size = 0
    for row in rows:
        if group and (len(group) >= MAX_BATCH_EVENTS or size + len(row[2]) > MAX_BATCH_BYTES):
            yield group
            group, size = [], 0
        group.append(row)
        size += len(row[2])
    if group:
        yield group


def _request(group: list[_Row], batch: bool) -> Any:
    from cabincrew.v1 import audit_pb2

    request = audit_pb2.AppendStreamRequest()
    if not batch:
        request.event.MergeFromString(group[0][2])
        return request
    for _, _, data in group:
        request.events.add().MergeFromString(data)
    return request


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of a RESOURCE_EXHAUSTED error, else None."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    with contextlib.suppress(Exception):
        status = rpc_status.from_call(error)
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


def emitter_for(context: ServiceContext, component: str) -> AuditEmitter:
    """This process's emitter for ``component`` (one per component, closed with the server)."""
    key = f"emitter:{component}"
    existing = context.shared.get(key)
    if existing is not None:
        return existing  # type: ignore[no-any-return]
    emitter = OutboxEmitter(
        component,
        context.service_dir(component) / "outbox.db",
        address=lambda: context.address_of("audit"),
        token=_token_provider(context, component),
        tls_ca_file=context.config.clients.tls_ca_file,
    )
    context.shared[key] = emitter
    context.shared.setdefault("closers", []).append(emitter.aclose)
    with contextlib.suppress(RuntimeError):
        # Inside a running loop: start now, so events left from the last run go out.
        asyncio.get_running_loop()
        emitter.start()
    return emitter


def _token_provider(context: ServiceContext, component: str) -> Callable[[], str]:
    """A fresh token per connection: from auth.service_token_file, or issued locally."""
    config = context.config
    if config.auth.service_token_file:
        path = Path(config.auth.service_token_file)
        return lambda: path.read_text(encoding="utf-8").strip()

    def issue() -> str:
        from cabincrew.auth import issue_token
        from cabincrew.signing import Ed25519Signer

        signer = context.shared.get("signer:auth")
        if signer is None:
            signer = Ed25519Signer.load_or_create(config.auth_key_path())
            context.shared["signer:auth"] = signer
        return issue_token(
            signer,
            f"service:{component}",
            ["service"],
            ttl_seconds=3600,
            audience=config.auth.audience,
        )

    return issue
