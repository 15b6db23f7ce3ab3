"""gRPC handlers of AuditService: protobuf in, domain calls, protobuf out.

Any authenticated principal may append and read (services append with their own tokens;
operators read); the runtime's interceptor has already refused unauthenticated calls.
Domain errors become a status once, through ``cabincrew.errors.to_status``; inside
``AppendStream`` a refused event is an ``ItemError`` and the stream stays open, while
back-pressure and shutdown end the stream with RESOURCE_EXHAUSTED / UNAVAILABLE after the
responses to every request before them.

An ``AppendStream`` request carries one event or a batch (``events``); each gets one
response, in order. A batch's events are prepared one by one (a refused event is an
``ItemError`` in its place, the others stand) and queued as one group, all or none, so that
back-pressure refuses whole requests and a sender resends from the first unanswered one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from audit_svc.errors import AuditError, BadRequest, InvalidEvent
from audit_svc.events import PreparedEvent, prepare_event, stored_to_message
from audit_svc.log import Ack, AuditLog, Outcome
from audit_svc.store import EventQuery, StoredEntry
from cabincrew.errors import CabinCrewError, to_status
from cabincrew.v1 import audit_pb2, audit_pb2_grpc, common_pb2

log = logging.getLogger("cabincrew.audit")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Events of one stream between reading and acking; beyond this the stream stops reading and
# HTTP/2 flow control holds the sender back.
STREAM_WINDOW = 4096
# Events in one AppendStreamRequest; a larger batch is INVALID_ARGUMENT.
MAX_REQUEST_EVENTS = 1000

_END = object()


@dataclasses.dataclass(frozen=True)
class _Request:
    """One read request on its way to its response: its events' ids, refusals and commit."""

    batch: bool
    event_ids: list[str]
    # By position in the request: events refused before queueing.
    refused: dict[int, InvalidEvent]
    # Resolves to the outcomes of the other events, in order.
    committed: asyncio.Future[list[Outcome]]


class _Window:
    """Counts one stream's events between reading and answering."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._free = size
        self._room = asyncio.Event()

    async def take(self, count: int) -> None:
        # A request larger than the window still goes through, alone.
        while self._free < min(count, self._size):
            self._room.clear()
            await self._room.wait()
        self._free -= count

    def give(self, count: int) -> None:
        self._free += count
        self._room.set()


class AuditServiceServicer(audit_pb2_grpc.AuditServiceServicer):
    """AuditService over one ``AuditLog``."""

    def __init__(self, log: AuditLog, max_event_bytes: int) -> None:
        self._log = log
        self._max_event_bytes = max_event_bytes

    async def Append(
        self, request: audit_pb2.AppendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> audit_pb2.AppendResponse:
        try:
            prepared = prepare_event(request.event, self._max_event_bytes)
            ack = await self._log.append(prepared)
        except CabinCrewError as exc:
            await context.abort_with_status(to_status(exc))
            raise AssertionError("unreachable") from None
        return audit_pb2.AppendResponse(ack=_ack(ack))

    async def AppendStream(
        self,
        request_iterator: AsyncIterator[audit_pb2.AppendStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[audit_pb2.AppendStreamResponse]:
        # In order: a _Request, a stream-ending error, or _END.
        pending: asyncio.Queue[Any] = asyncio.Queue()
        window = _Window(STREAM_WINDOW)
        reader = asyncio.create_task(self._read_stream(request_iterator, pending, window))
        try:
            while True:
                item = await pending.get()
                if item is _END:
                    break
                if isinstance(item, CabinCrewError):
                    await context.abort_with_status(to_status(item))
                try:
                    outcomes = await item.committed
                except AuditError as exc:
                    # Closing or a failed commit: the sender resends from this request.
                    await context.abort_with_status(to_status(exc))
                    raise AssertionError("unreachable") from None
                yield _response(item, outcomes)
                window.give(len(item.event_ids))
        finally:
            reader.cancel()

    async def _read_stream(
        self,
        requests: AsyncIterator[audit_pb2.AppendStreamRequest],
        pending: asyncio.Queue[Any],
        window: _Window,
    ) -> None:
        try:
            async for request in requests:
                batch = len(request.events) > 0
                if batch and request.HasField("event"):
                    await pending.put(BadRequest("set either event or events", "event"))
                    return
                if len(request.events) > MAX_REQUEST_EVENTS:
                    await pending.put(
                        BadRequest(f"at most {MAX_REQUEST_EVENTS} events per request", "events")
                    )
                    return
                items = request.events if batch else [request.event]
                await window.take(len(items))
                prepared: list[PreparedEvent] = []
                refused: dict[int, InvalidEvent] = {}
                for index, event in enumerate(items):
                    try:
                        prepared.append(prepare_event(event, self._max_event_bytes))
                    except InvalidEvent as exc:
                        refused[index] = exc
                try:
                    committed = self._log.submit(prepared)
                except CabinCrewError as exc:
                    # Overloaded, closing or corrupted: end the stream after the earlier
                    # responses, so the sender resends from this request in order.
                    await pending.put(exc)
                    return
                event_ids = [event.event_id for event in items]
                await pending.put(_Request(batch, event_ids, refused, committed))
        except Exception:
            # Never leave the writer side waiting for an end that would not come.
            log.exception("reading an AppendStream failed")
            await pending.put(CabinCrewError("the stream could not be read"))
            return
        await pending.put(_END)

    async def QueryEvents(
        self, request: audit_pb2.QueryEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[audit_pb2.QueryEventsResponse]:
        try:
            query = _query(request.filter)
            page_size = _page_size(request.page_size)
            start = _page_token(request.page_token)
            if request.limit < 0:
                raise BadRequest("must not be negative", "limit")
        except CabinCrewError as exc:
            await context.abort_with_status(to_status(exc))
            return
        remaining = request.limit or None
        position = max(query.from_sequence, start)
        while remaining is None or remaining > 0:
            size = page_size if remaining is None else min(page_size, remaining)
            rows = await self._log.entries(_from(query, position), size)
            if not rows:
                break
            position = rows[-1].sequence + 1
            more = len(rows) == size
            yield audit_pb2.QueryEventsResponse(
                entries=[_entry(row) for row in rows],
                next_page_token=str(position) if more else "",
            )
            if not more:
                break
            if remaining is not None:
                remaining -= len(rows)

    async def TailEvents(
        self, request: audit_pb2.TailEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[audit_pb2.TailEventsResponse]:
        try:
            if request.from_sequence < 0:
                raise BadRequest("must not be negative", "from_sequence")
            query = _from(_query(request.filter), request.from_sequence)
        except CabinCrewError as exc:
            await context.abort_with_status(to_status(exc))
            return
        async for row in self._log.tail(query):
            yield audit_pb2.TailEventsResponse(entry=_entry(row))

    async def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> audit_pb2.GetCheckpointResponse:
        checkpoint = await self._log.checkpoint(refresh=request.refresh)
        return audit_pb2.GetCheckpointResponse(
            origin=checkpoint.origin,
            tree_size=checkpoint.tree_size,
            root_hash=checkpoint.root_hash,
            note=checkpoint.note,
            verifier_key=checkpoint.verifier_key,
            public_key=checkpoint.public_key,
            created_at=_timestamp(checkpoint.created_at_us),
        )

    async def GetInclusionProof(
        self,
        request: audit_pb2.GetInclusionProofRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> audit_pb2.GetInclusionProofResponse:
        try:
            proof = await self._log.inclusion_proof(request.sequence, request.tree_size)
        except CabinCrewError as exc:
            await context.abort_with_status(to_status(exc))
            raise AssertionError("unreachable") from None
        return audit_pb2.GetInclusionProofResponse(
            sequence=proof.sequence,
            tree_size=proof.tree_size,
            leaf_hash=proof.leaf_hash,
            hashes=proof.hashes,
            root_hash=proof.root_hash,
        )

    async def GetConsistencyProof(
        self,
        request: audit_pb2.GetConsistencyProofRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> audit_pb2.GetConsistencyProofResponse:
        try:
            proof = await self._log.consistency_proof(request.from_size, request.to_size)
        except CabinCrewError as exc:
            await context.abort_with_status(to_status(exc))
            raise AssertionError("unreachable") from None
        return audit_pb2.GetConsistencyProofResponse(
            from_size=proof.from_size,
            to_size=proof.to_size,
            hashes=proof.hashes,
            from_root=proof.from_root,
            to_root=proof.to_root,
        )

    async def VerifyLog(
        self, request: audit_pb2.VerifyLogRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> audit_pb2.VerifyLogResponse:
        result = await self._log.verify()
        return audit_pb2.VerifyLogResponse(
            ok=result.ok,
            tree_size=result.tree_size,
            root_hash=result.root_hash,
            first_bad_sequence=result.first_bad_sequence,
            reason=result.reason,
        )


def _ack(ack: Ack) -> audit_pb2.AppendAck:
    return audit_pb2.AppendAck(
        event_id=ack.event_id,
        sequence=ack.sequence,
        duplicate=ack.duplicate,
        redactions=ack.redactions,
        leaf_hash=ack.leaf_hash,
    )


def _response(request: _Request, outcomes: list[Outcome]) -> audit_pb2.AppendStreamResponse:
    """One response to one request: refusals and committed outcomes, in request order."""
    if not request.batch:
        event_id, outcome = next(_in_order(request, outcomes))
        if isinstance(outcome, Ack):
            return audit_pb2.AppendStreamResponse(ack=_ack(outcome), event_id=event_id)
        return audit_pb2.AppendStreamResponse(error=_item_error(outcome), event_id=event_id)
    response = audit_pb2.AppendStreamResponse()
    results = response.results
    for event_id, outcome in _in_order(request, outcomes):
        result = results.add(event_id=event_id)
        if isinstance(outcome, Ack):
            # Field by field into the result: building an AppendAck and copying it in costs
            # twice as much, once per event.
            ack = result.ack
            ack.event_id = outcome.event_id
            ack.sequence = outcome.sequence
            ack.duplicate = outcome.duplicate
            ack.redactions = outcome.redactions
            ack.leaf_hash = outcome.leaf_hash
        else:
            result.error.CopyFrom(_item_error(outcome))
    return response


def _in_order(
    request: _Request, outcomes: list[Outcome]
) -> Iterator[tuple[str, Outcome | InvalidEvent]]:
    committed = iter(outcomes)
    for index, event_id in enumerate(request.event_ids):
        refusal = request.refused.get(index)
        yield event_id, refusal if refusal is not None else next(committed)


def _item_error(error: CabinCrewError) -> common_pb2.ItemError:
    violations = getattr(error, "violations", ())
    return common_pb2.ItemError(
        code=error.code.value[0],
        message=error.message,
        field_violations=[
            common_pb2.FieldViolation(field=v.field, description=v.description) for v in violations
        ],
    )


def _entry(row: StoredEntry) -> audit_pb2.LogEntry:
    return audit_pb2.LogEntry(
        sequence=row.sequence,
        event=stored_to_message(row.event, row.signature, row.signature_key_ref, row.chain_hash),
        leaf_hash=row.leaf_hash,
        chain_hash=row.chain_hash,
        received_at=_timestamp(row.received_at_us),
        redactions=row.redactions,
    )


def _timestamp(micros: int) -> timestamp_pb2.Timestamp:
    seconds, rest = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=rest * 1000)


def _micros(stamp: timestamp_pb2.Timestamp) -> int:
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


def _query(event_filter: audit_pb2.EventFilter) -> EventQuery:
    if event_filter.from_sequence < 0:
        raise BadRequest("must not be negative", "filter.from_sequence")
    if event_filter.to_sequence < 0:
        raise BadRequest("must not be negative", "filter.to_sequence")
    if event_filter.min_severity not in common_pb2.EventSeverity.values():
        raise BadRequest("unknown severity", "filter.min_severity")
    return EventQuery(
        workflow_id=event_filter.workflow_id,
        step_id=event_filter.step_id,
        event_type=event_filter.event_type,
        event_type_prefix=event_filter.event_type_prefix,
        min_severity=int(event_filter.min_severity),
        from_time_us=_micros(event_filter.from_time)
        if event_filter.HasField("from_time")
        else None,
        to_time_us=_micros(event_filter.to_time) if event_filter.HasField("to_time") else None,
        from_sequence=event_filter.from_sequence,
        to_sequence=event_filter.to_sequence or None,
    )


def _from(query: EventQuery, position: int) -> EventQuery:
    return dataclasses.replace(query, from_sequence=max(query.from_sequence, position))


def _page_size(requested: int) -> int:
    if requested < 0:
        raise BadRequest("must not be negative", "page_size")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _page_token(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit() or len(token) > 19:
        raise BadRequest("not a page token from this service", "page_token")
    return int(token)
