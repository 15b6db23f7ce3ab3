"""``cabincrew audit``: append, export, checkpoint, verify, prove, tail and query."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
from collections import deque
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import grpc
import typer

from cabincrew.cli.common import (
    AddrOption,
    JsonOption,
    Target,
    channel,
    err_console,
    fail,
    print_json,
    resolve_target,
    run,
)
from cabincrew.clients import AuditClient, wrap_rpc_error
from cabincrew.convert import ConversionError, from_protocol, to_protocol
from cabincrew.emitter import retry_delay
from cabincrew.v1 import audit_pb2, audit_pb2_grpc, common_pb2

audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)

SEVERITIES = {
    "debug": common_pb2.EVENT_SEVERITY_DEBUG,
    "info": common_pb2.EVENT_SEVERITY_INFO,
    "warning": common_pb2.EVENT_SEVERITY_WARNING,
    "error": common_pb2.EVENT_SEVERITY_ERROR,
    "critical": common_pb2.EVENT_SEVERITY_CRITICAL,
}
_WINDOW = 1000
# Bounds of one AppendStreamRequest batch (the service takes up to 1000 events).
_BATCH_EVENTS = 256
_BATCH_BYTES = 1 << 20
_MAX_OVERLOAD_RETRIES = 50
_LONG_DEADLINE = 3600.0


def register(app: typer.Typer) -> None:
    """Add the ``audit`` command group to the main CLI."""
    app.add_typer(audit_app, name="audit")


# --- append ---------------------------------------------------------------------------------


@audit_app.command("append")
def append(
    file: str = typer.Argument(
        ..., help="AuditEvent JSON, one per line ('-': stdin); chain_hash is assigned by the log."
    ),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Stream events into the log; print one ack per event, once it is durably committed."""
    target = resolve_target(addr)
    try:
        handle: TextIO = sys.stdin if file == "-" else open(file, encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror}") from None
    with handle:
        refused = _append(target, _read_events(handle), json_out)
    if refused:
        raise typer.Exit(1)


def _read_events(handle: TextIO) -> Iterator[tuple[int, common_pb2.AuditEvent | str]]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            # The log assigns chain hashes; one carried over from an export is not ours.
            document.pop("chain_hash", None)
            yield number, from_protocol(document, common_pb2.AuditEvent)
        except ConversionError as exc:
            problems = "; ".join(f"{v.field}: {v.description}" for v in exc.violations[:3])
            yield number, f"not an AuditEvent ({problems})"
        except ValueError as exc:
            yield number, f"not JSON ({exc})"


@run
async def _append(
    target: Target, source: Iterator[tuple[int, common_pb2.AuditEvent | str]], json_out: bool
) -> int:
    chan = channel(target)
    try:
        return await _Appender(audit_pb2_grpc.AuditServiceStub(chan), source, json_out).run()
    finally:
        await chan.close()


# (line number, event) of one event read from the input.
_Line = tuple[int, common_pb2.AuditEvent]
_INPUT_END = object()


class _Input:
    """The input lines, read by a thread so that a slow pipe does not hold acks back; the
    sender takes whatever has arrived, so a file goes in batches and a trickle one by one."""

    def __init__(self, source: Iterator[tuple[int, common_pb2.AuditEvent | str]]) -> None:
        self._source = source
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        # Lines read ahead of the sender, at most.
        self._slots = threading.Semaphore(_WINDOW)
        self._ended = False
        # Why the input ended early, if it did; reported after what was read is answered.
        self.error: Exception | None = None
        threading.Thread(target=self._pump, name="audit-append-input", daemon=True).start()

    def _pump(self) -> None:
        try:
            for item in self._source:
                self._slots.acquire()
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            end: Any = _INPUT_END
        except Exception as exc:
            end = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(self._queue.put_nowait, end)

    async def take(self, most: int) -> list[tuple[int, common_pb2.AuditEvent | str]] | None:
        """At least one line (waiting for it), and as many more as have arrived, up to
        ``most``; None at the end of the input."""
        if self._ended:
            return None
        taken = [await self._queue.get()]
        while len(taken) < most and not self._queue.empty():
            taken.append(self._queue.get_nowait())
        if taken[-1] is _INPUT_END or isinstance(taken[-1], Exception):
            self._ended = True
            end = taken.pop()
            if isinstance(end, Exception):
                self.error = end
        for _ in taken:
            self._slots.release()
        return taken or None


class _Unbatched(Exception):
    """The service predates batches: it answered a batch as if it were one empty event."""


class _Appender:
    """Streams events in order, in batches when several are waiting; after
    RESOURCE_EXHAUSTED it resends what was not acked."""

    def __init__(
        self,
        stub: Any,
        source: Iterator[tuple[int, common_pb2.AuditEvent | str]],
        json_out: bool,
    ) -> None:
        self._stub = stub
        self._source = source
        self._json = json_out
        # Requests sent (or about to be) but not answered, in order: (batch?, lines).
        self._unacked: deque[tuple[bool, list[_Line]]] = deque()
        self._outstanding = 0  # lines in _unacked
        self._room = asyncio.Event()
        self._batching = True
        self.refused = 0

    async def run(self) -> int:
        lines = _Input(self._source)
        retries = 0
        while True:
            call = self._stub.AppendStream()
            resend = [line for _, group in self._unacked for line in group]
            self._unacked.clear()
            self._outstanding = 0
            sender = asyncio.create_task(self._send(call, resend, lines, self._batching))
            try:
                async for response in call:
                    batch, group = self._unacked[0]
                    if batch and not response.results:
                        raise _Unbatched
                    self._unacked.popleft()
                    self._outstanding -= len(group)
                    self._room.set()
                    retries = 0
                    results = response.results if batch else [response]
                    for (number, event), result in zip(group, results, strict=True):
                        if result.HasField("error"):
                            self.refused += 1
                            _print_refusal(number, event.event_id, result.error)
                        else:
                            _print_ack(result.ack, self._json)
                await sender
                if lines.error is not None:
                    raise fail(f"cannot read the input: {lines.error}")
                return self.refused
            except _Unbatched:
                # Nothing of that batch was stored: send everything again, one by one.
                self._batching = False
            except grpc.aio.AioRpcError as exc:
                delay = retry_delay(exc)
                if delay is None or retries >= _MAX_OVERLOAD_RETRIES:
                    raise wrap_rpc_error(exc) from None
                retries += 1
                await asyncio.sleep(delay)
            finally:
                sender.cancel()
                call.cancel()
                # The sender is gone before the unanswered lines are collected for the next
                # stream: one still running could register lines after the collection or
                # write to the old stream what the next one will send again.
                await asyncio.wait([sender])

    async def _send(self, call: Any, resend: list[_Line], lines: _Input, batching: bool) -> None:
        await self._write(call, resend, batching)
        while True:
            while self._outstanding >= _WINDOW:
                self._room.clear()
                await self._room.wait()
            taken = await lines.take(_WINDOW - self._outstanding)
            if taken is None:
                break
            events: list[_Line] = []
            for number, event in taken:
                if isinstance(event, str):
                    self.refused += 1
                    err_console.print(
                        f"[bold red]error:[/] line {number}: {event}", highlight=False
                    )
                else:
                    events.append((number, event))
            await self._write(call, events, batching)
        await call.done_writing()

    async def _write(self, call: Any, events: list[_Line], batching: bool) -> None:
        # Queued as unanswered before any write, so that a reconnect in the middle of these
        # writes resends them all, in order.
        # The form is fixed per stream, never read from the appender's changing state.
        groups = list(_groups(events)) if batching else [[line] for line in events]
        requests = []
        for group in groups:
            # One form for the whole stream (see cabincrew.emitter): a lone line is a batch
            # of one, so a service from before batches stores nothing out of order.
            batch = batching
            self._unacked.append((batch, group))
            self._outstanding += len(group)
            if batch:
                requests.append(audit_pb2.AppendStreamRequest(events=[e for _, e in group]))
            else:
                requests.append(audit_pb2.AppendStreamRequest(event=group[0][1]))
        for request in requests:
            await call.write(request)


def _groups(events: list[_Line]) -> Iterator[list[_Line]]:
    """Consecutive batches of at most _BATCH_EVENTS events and about _BATCH_BYTES."""
    group: list[_Line] = []
    size = 0
    for line in events:
        item = line[1].ByteSize()
        if group and (len(group) >= _BATCH_EVENTS or size + item > _BATCH_BYTES):
            yield group
            group, size = [], 0
        group.append(line)
        size += item
    if group:
        yield group


def _print_ack(ack: audit_pb2.AppendAck, json_out: bool) -> None:
    if json_out:
        line = json.dumps(
            {"event_id": ack.event_id, "sequence": ack.sequence, "duplicate": ack.duplicate}
        )
    else:
        line = f"{ack.sequence}\t{ack.event_id}" + ("\t(duplicate)" if ack.duplicate else "")
    # Flushed per line: whoever reads the acks learns at once what is durably committed.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _print_refusal(number: int, event_id: str, error: common_pb2.ItemError) -> None:
    code = _code_name(error.code)
    details = "; ".join(f"{v.field}: {v.description}" for v in error.field_violations)
    err_console.print(
        f"[bold red]error:[/] line {number}: event {event_id} refused: {code}: {error.message}"
        + (f" ({details})" if details else ""),
        highlight=False,
        markup=True,
    )


def _code_name(value: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code.name
    return str(value)


# --- export ---------------------------------------------------------------------------------


@audit_app.command("export")
def export(
    out: str = typer.Option(..., "--out", help="File to write, one JSON object per line."),
    from_sequence: int = typer.Option(0, "--from", help="First sequence (inclusive)."),
    to_sequence: int = typer.Option(None, "--to", help="Last sequence (exclusive)."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Export entries in sequence order: {sequence, event, leaf_hash, chain_hash} per line."""
    if from_sequence < 0 or (to_sequence is not None and to_sequence < from_sequence):
        raise fail("--from must be >= 0 and --to >= --from", 2)
    count = _export(resolve_target(addr), out, from_sequence, to_sequence)
    if json_out:
        print_json({"out": out, "count": count, "from": from_sequence, "to": to_sequence})
    else:
        err_console.print(f"exported {count} entries to {out}", highlight=False)


@run
async def _export(target: Target, out: str, start: int, end: int | None) -> int:
    client = AuditClient(channel(target))
    request = audit_pb2.QueryEventsRequest(
        filter=audit_pb2.EventFilter(from_sequence=start, to_sequence=end or 0), page_size=1000
    )
    # Written beside the target and renamed at the end: a reader never sees half an export.
    writer = _FileWriter(out)
    count = 0
    try:
        if end != start:
            async for page in client.query(request):
                lines = [
                    json.dumps(export_line(e), ensure_ascii=False) + "\n" for e in page.entries
                ]
                await asyncio.to_thread(writer.write, "".join(lines))
                count += len(lines)
        await asyncio.to_thread(writer.commit)
    finally:
        await asyncio.to_thread(writer.discard)
        await client.aclose()
    return count


class _FileWriter:
    """A file written under a temporary name and moved into place on commit."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._partial = Path(f"{path}.partial")
        self._handle: TextIO | None = None

    def write(self, text: str) -> None:
        if self._handle is None:
            self._handle = self._partial.open("w", encoding="utf-8")
        self._handle.write(text)

    def commit(self) -> None:
        self.write("")
        assert self._handle is not None
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None
        os.replace(self._partial, self._path)

    def discard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._partial.unlink(missing_ok=True)


def export_line(entry: audit_pb2.LogEntry) -> dict[str, Any]:
    """One export line: the protocol AuditEvent with its position and hashes."""
    return {
        "sequence": entry.sequence,
        "event": to_protocol(entry.event),
        "leaf_hash": entry.leaf_hash.hex(),
        "chain_hash": entry.chain_hash.hex(),
    }


# --- checkpoint, verify, prove --------------------------------------------------------------


@audit_app.command("checkpoint")
def checkpoint(
    refresh: bool = typer.Option(
        True, "--refresh/--latest", help="Sign the current tree, or show the latest scheduled."
    ),
    out: str = typer.Option(None, "--out", help="Also write the JSON form to this file."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """A signed checkpoint (C2SP signed note) of the log's Merkle tree."""
    response = _checkpoint(resolve_target(addr), refresh)
    document = checkpoint_json(response)
    if out:
        Path(out).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if json_out:
        print_json(document)
    else:
        sys.stdout.write(response.note)
        sys.stdout.write(f"\nverifier key: {response.verifier_key}\n")


@run
async def _checkpoint(target: Target, refresh: bool) -> audit_pb2.GetCheckpointResponse:
    client = AuditClient(channel(target))
    try:
        return await client.get_checkpoint(refresh=refresh)
    finally:
        await client.aclose()


def checkpoint_json(response: audit_pb2.GetCheckpointResponse) -> dict[str, Any]:
    """The ``--json`` form of a checkpoint."""
    return {
        "origin": response.origin,
        "tree_size": response.tree_size,
        "root_hash": response.root_hash.hex(),
        "note": response.note,
        "public_key": response.verifier_key,
    }


@audit_app.command("verify")
def verify(
    export_file: str = typer.Option(None, "--export", help="Verify this export offline."),
    checkpoint_file: str = typer.Option(
        None, "--checkpoint", help="The signed checkpoint (`audit checkpoint --json` output)."
    ),
    public_key: str = typer.Option(
        None, "--public-key", help="Pin the verifier key (default: the checkpoint file's)."
    ),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Verify the log: online (the server recomputes everything) or offline from an export."""
    if (export_file is None) != (checkpoint_file is None):
        raise fail("offline verification needs both --export and --checkpoint", 2)
    if export_file is not None and checkpoint_file is not None:
        result = _verify_offline(export_file, checkpoint_file, public_key)
    else:
        result = _verify_online(resolve_target(addr))
    if json_out:
        print_json(result)
    elif result["ok"]:
        sys.stdout.write(f"ok: {result['tree_size']} entries verify\n")
    else:
        err_console.print(
            f"[bold red]verification failed[/] at sequence {result['first_bad_sequence']}: "
            f"{result['reason']}",
            highlight=False,
        )
    if not result["ok"]:
        raise typer.Exit(1)


def _verify_offline(
    export_file: str, checkpoint_file: str, public_key: str | None
) -> dict[str, Any]:
    from audit_svc.verify import verify_export

    try:
        text = Path(checkpoint_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot read {checkpoint_file}: {exc.strerror}") from None
    note, key = text, public_key
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict):
        note = str(document.get("note", ""))
        key = public_key or str(document.get("public_key", ""))
    if not key:
        raise fail("the checkpoint file holds no public key; pass --public-key", 2)
    try:
        with open(export_file, encoding="utf-8") as handle:
            result = verify_export(handle, note, key)
    except OSError as exc:
        raise fail(f"cannot read {export_file}: {exc.strerror}") from None
    return _result_json(
        result.ok, result.tree_size, result.root_hash, result.first_bad_sequence, result.reason
    )


@run
async def _verify_online(target: Target) -> dict[str, Any]:
    client = AuditClient(channel(target))
    try:
        response = await client.verify_log(timeout=_LONG_DEADLINE)
    finally:
        await client.aclose()
    return _result_json(
        response.ok,
        response.tree_size,
        response.root_hash,
        response.first_bad_sequence,
        response.reason,
    )


def _result_json(ok: bool, size: int, root: bytes, bad: int, reason: str) -> dict[str, Any]:
    return {
        "ok": ok,
        "tree_size": size,
        "root_hash": root.hex(),
        "first_bad_sequence": bad,
        "reason": reason,
    }


@audit_app.command("prove")
def prove(
    sequence: int = typer.Argument(..., help="The entry to prove."),
    tree_size: int = typer.Option(
        0, "--tree-size", help="Prove against this tree size (default: a fresh signed checkpoint)."
    ),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """An inclusion proof for one entry, checked here against a signed checkpoint."""
    if sequence < 0 or tree_size < 0:
        raise fail("SEQUENCE and --tree-size must not be negative", 2)
    result = _prove(resolve_target(addr), sequence, tree_size)
    if json_out:
        print_json(result)
    else:
        sys.stdout.write(
            f"entry {result['sequence']} in tree of size {result['tree_size']}: "
            f"{'verified' if result['verified'] else 'DOES NOT VERIFY'}"
            f" ({result['root_source']})\n"
        )
        for item in result["hashes"]:
            sys.stdout.write(f"  {item}\n")
    if not result["verified"]:
        raise typer.Exit(1)


@run
async def _prove(target: Target, sequence: int, tree_size: int) -> dict[str, Any]:
    from audit_svc.checkpoint import CheckpointError, parse_and_verify
    from audit_svc.merkle import verify_inclusion

    client = AuditClient(channel(target))
    try:
        if tree_size:
            proof = await client.inclusion_proof(sequence, tree_size)
            root, source = proof.root_hash, "root reported by the server"
        else:
            signed = await client.get_checkpoint(refresh=True)
            try:
                checkpoint = parse_and_verify(signed.note, signed.verifier_key)
            except CheckpointError as exc:
                raise fail(f"the checkpoint does not verify: {exc.message}") from None
            proof = await client.inclusion_proof(sequence, checkpoint.size)
            root, source = checkpoint.root, f"signed checkpoint by {signed.verifier_key}"
    finally:
        await client.aclose()
    hashes = list(proof.hashes)
    verified = verify_inclusion(proof.leaf_hash, sequence, proof.tree_size, hashes, root)
    return {
        "sequence": sequence,
        "tree_size": proof.tree_size,
        "leaf_hash": proof.leaf_hash.hex(),
        "hashes": [h.hex() for h in hashes],
        "root_hash": root.hex(),
        "root_source": source,
        "verified": verified,
    }


# --- reading --------------------------------------------------------------------------------


def _filter(
    workflow_id: str,
    step_id: str,
    event_type: str,
    event_type_prefix: str,
    min_severity: str,
    since: str,
    until: str,
) -> audit_pb2.EventFilter:
    event_filter = audit_pb2.EventFilter(
        workflow_id=workflow_id or "",
        step_id=step_id or "",
        event_type=event_type or "",
        event_type_prefix=event_type_prefix or "",
    )
    if min_severity:
        if min_severity not in SEVERITIES:
            raise fail(f"--min-severity must be one of {', '.join(SEVERITIES)}", 2)
        event_filter.min_severity = SEVERITIES[min_severity]
    for value, target_field, name in (
        (since, event_filter.from_time, "--since"),
        (until, event_filter.to_time, "--until"),
    ):
        if value:
            try:
                target_field.FromDatetime(datetime.fromisoformat(value))
            except ValueError:
                raise fail(f"{name} must be an ISO 8601 / RFC 3339 time", 2) from None
    return event_filter


def entry_json(entry: audit_pb2.LogEntry) -> dict[str, Any]:
    """A log entry as printed by query and tail with --json."""
    line = export_line(entry)
    line["received_at"] = entry.received_at.ToJsonString()
    line["redactions"] = entry.redactions
    return line


def _print_entry(entry: audit_pb2.LogEntry, json_out: bool) -> None:
    if json_out:
        sys.stdout.write(json.dumps(entry_json(entry), ensure_ascii=False) + "\n")
    else:
        event = entry.event
        severity = common_pb2.EventSeverity.Name(event.severity).removeprefix("EVENT_SEVERITY_")
        workflow = event.workflow.workflow_id if event.HasField("workflow") else "-"
        sys.stdout.write(
            f"{entry.sequence}\t{event.timestamp.ToJsonString()}\t{severity.lower()}\t"
            f"{event.event_type}\t{workflow}\t{event.message}\n"
        )
    sys.stdout.flush()


@audit_app.command("query")
def query(
    workflow_id: str = typer.Option(None, "--workflow-id"),
    step_id: str = typer.Option(None, "--step-id"),
    event_type: str = typer.Option(None, "--event-type"),
    event_type_prefix: str = typer.Option(None, "--event-type-prefix", help="e.g. approval."),
    min_severity: str = typer.Option(None, "--min-severity", help="debug..critical"),
    since: str = typer.Option(None, "--since", help="Event time from (RFC 3339)."),
    until: str = typer.Option(None, "--until", help="Event time before (RFC 3339)."),
    from_sequence: int = typer.Option(0, "--from", help="First sequence (inclusive)."),
    to_sequence: int = typer.Option(0, "--to", help="Last sequence (exclusive); 0: none."),
    limit: int = typer.Option(100, "--limit", help="At most this many entries; 0: all."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Stored events matching the filters, in sequence order."""
    event_filter = _filter(
        workflow_id, step_id, event_type, event_type_prefix, min_severity, since, until
    )
    event_filter.from_sequence = from_sequence
    event_filter.to_sequence = to_sequence
    request = audit_pb2.QueryEventsRequest(filter=event_filter, page_size=500, limit=limit)
    _query(resolve_target(addr), request, json_out)


@run
async def _query(target: Target, request: audit_pb2.QueryEventsRequest, json_out: bool) -> None:
    client = AuditClient(channel(target))
    try:
        async for page in client.query(request):
            for entry in page.entries:
                _print_entry(entry, json_out)
    finally:
        await client.aclose()


@audit_app.command("tail")
def tail(
    from_sequence: int = typer.Option(
        None, "--from", help="First sequence (default: the latest checkpoint's size)."
    ),
    workflow_id: str = typer.Option(None, "--workflow-id"),
    step_id: str = typer.Option(None, "--step-id"),
    event_type: str = typer.Option(None, "--event-type"),
    event_type_prefix: str = typer.Option(None, "--event-type-prefix"),
    min_severity: str = typer.Option(None, "--min-severity"),
    limit: int = typer.Option(0, "--limit", help="Stop after this many entries; 0: follow."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Follow the log as events are appended (Ctrl-C to stop)."""
    event_filter = _filter(
        workflow_id, step_id, event_type, event_type_prefix, min_severity, "", ""
    )
    _tail(resolve_target(addr), from_sequence, event_filter, limit, json_out)


@run
async def _tail(
    target: Target,
    from_sequence: int | None,
    event_filter: audit_pb2.EventFilter,
    limit: int,
    json_out: bool,
) -> None:
    client = AuditClient(channel(target))
    try:
        if from_sequence is None:
            from_sequence = (await client.get_checkpoint(refresh=False)).tree_size
        request = audit_pb2.TailEventsRequest(from_sequence=from_sequence, filter=event_filter)
        seen = 0
        async for response in client.tail(request):
            _print_entry(response.entry, json_out)
            seen += 1
            if limit and seen >= limit:
                break
    finally:
        await client.aclose()
