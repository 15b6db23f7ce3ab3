"""The orchestrator's use cases, and the lifecycle of the workflows this process runs.

``OrchestratorManager`` validates submissions, writes each new workflow's first log entry,
and runs the workflows it holds a lease on (``WorkflowRunner``). A claim loop takes unowned
or expired workflows (after a restart, or from a replica that died) through the same recovery
path: replay the log, verify its checksums and the stored artifacts, then run from the state
the log recorded. Leases are renewed on the same loop; commands that reach a replica which
does not own the workflow (cancel, resume) are left in the database for the owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cabincrew.aio import wait_event
from cabincrew.auth import Principal
from cabincrew.canonical import canonical_hash
from cabincrew.emitter import AuditEmitter
from cabincrew.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Violation,
)
from orchestrator_svc import model
from orchestrator_svc.artifacts import StoredArtifact
from orchestrator_svc.errors import (
    ArtifactIntegrityError,
    WorkflowDefinitionError,
)
from orchestrator_svc.events import AuditSpec, events_for
from orchestrator_svc.journal import AuditTrail, Journal, materialise, now_us
from orchestrator_svc.model import Definition, Entry, State, WorkflowRecord
from orchestrator_svc.scheduler import EngineContext, WorkflowRunner
from orchestrator_svc.store import (
    LeaseLost,
    ListFilter,
    Materialised,
    NewEntry,
    RequestKey,
    WorkflowRow,
    WorkflowStore,
)
from orchestrator_svc.wal import verify_chain
from orchestrator_svc.workflow import Workflow, parse_workflow, workflow_from_document

log = logging.getLogger("orchestrator_svc.manager")

T = TypeVar("T")

OPERATOR_ROLES = ("operator", "service")
DEFAULT_PAGE = 50
MAX_PAGE = 500
POLICIES = ("quarantine", "strict", "continue")
MAX_BATCH_ITEMS = 1000


@dataclass(frozen=True)
class Submission:
    """A workflow to run, as a caller asked for it."""

    request_id: str
    definition: Definition
    inputs: Mapping[str, str] = field(default_factory=dict)
    workspace_source: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    environment: str = ""


@dataclass(frozen=True)
class ManagerSettings:
    """How this process takes part in running workflows."""

    owner: str
    lease_seconds: float = 15.0
    max_running: int = 32
    # The embedded mode: one process per data dir, so a restart takes every lease at once.
    exclusive: bool = True
    lock_file: Path | None = None
    # Crash tests only (orchestrator.unsafe_crash_after_state): see Journal.
    unsafe_crash_after_state: State | None = None


@dataclass(frozen=True)
class TimelineItem:
    """One log entry with its place in the workflow's history."""

    entry: Entry
    since_previous_us: int


@dataclass(frozen=True)
class Timeline:
    """A workflow's recorded history with durations and stats."""

    workflow_id: str
    items: tuple[TimelineItem, ...]
    total_us: int
    steps: tuple[tuple[str, int, str], ...]  # (step id, duration, final state)
    counts: Mapping[str, int]


def owner_id() -> str:
    """A name for this process in leases."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def parse_definition(definition: Definition) -> Workflow:
    """Parse a stored or submitted definition (``WorkflowDefinitionError`` when invalid)."""
    base = Path(definition.base_dir) if definition.base_dir else None
    if definition.text is not None:
        return parse_workflow(definition.text, source=definition.filename, base_dir=base)
    if definition.document is None:
        raise InvalidArgument(
            "a workflow definition needs text or a document",
            [Violation("definition", "set text or document")],
        )
    return workflow_from_document(definition.document, source=definition.filename, base_dir=base)


class AsyncStore:
    """The store's blocking methods, run on its own threads (the ``Log`` port)."""

    def __init__(self, store: WorkflowStore) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(
            max_workers=1 if store.sqlite else 8, thread_name_prefix="orchestrator-db"
        )

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on a store thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def append(
        self,
        workflow_id: str,
        owner: str | None,
        expected_position: int,
        entries: Sequence[NewEntry],
        materialised: Materialised,
        **kwargs: Any,
    ) -> list[Entry]:
        """``WorkflowStore.append`` in a thread."""
        return await self.call(
            self.store.append,
            workflow_id,
            owner,
            expected_position,
            entries,
            materialised,
            **kwargs,
        )

    def close(self) -> None:
        """Stop the threads (after the store's last use)."""
        self._executor.shutdown(wait=True)


class Feed:
    """Wakes watchers of a workflow when this process changes it."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}
        self.closed = False

    def publish(self, workflow_id: str) -> None:
        """Tell every watcher of ``workflow_id``."""
        for event in self._events.get(workflow_id, ()):
            event.set()

    @contextlib.contextmanager
    def subscribe(self, workflow_id: str) -> Iterator[asyncio.Event]:
        """An event set on each change."""
        event = asyncio.Event()
        self._events.setdefault(workflow_id, set()).add(event)
        try:
            yield event
        finally:
            watchers = self._events.get(workflow_id)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    self._events.pop(workflow_id, None)

    def close(self) -> None:
        """Wake everyone, for shutdown."""
        self.closed = True
        for events in self._events.values():
            for event in events:
                event.set()


class OrchestratorManager:
    """Use cases of OrchestratorService and the runners of this process."""

    def __init__(
        self,
        store: WorkflowStore,
        context: EngineContext,
        emitter: AuditEmitter,
        settings: ManagerSettings,
        *,
        audit_ids: Callable[[str], Awaitable[set[str]]] | None = None,
        clock: Callable[[], int] = now_us,
    ) -> None:
        self._store = AsyncStore(store)
        self._sync_store = store
        self.context = context
        self._emitter = emitter
        self.settings = settings
        self.trail = AuditTrail(emitter)
        self.feed = Feed()
        self._clock = clock
        self._audit_ids = audit_ids
        self._running: dict[str, tuple[WorkflowRunner, asyncio.Task[None]]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._batch_locks: dict[str, asyncio.Lock] = {}
        self._lock_fd: int | None = None
        self._started = False
        self._closing = False

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Take this process's place: recover unfinished workflows, then claim and renew."""
        if self.settings.lock_file is not None:
            self._lock_fd = _exclusive_lock(self.settings.lock_file)
        await self._claim(steal=self.settings.exclusive)
        self._loop_task = asyncio.create_task(self._loop(), name="orchestrator-leases")
        self._spawn(self._reconcile_all())
        for batch_id in await self._store.call(self._sync_store.open_batches):
            self._spawn(self.advance_batch(batch_id))
        self._started = True

    async def aclose(self) -> None:
        """Stop runners (their workflows resume on the next start), then the store; idempotent."""
        if self._closing:
            return
        self._closing = True
        self.feed.close()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(BaseException):
                await self._loop_task
        for _, task in list(self._running.values()):
            task.cancel()
        for _, task in list(self._running.values()):
            with contextlib.suppress(BaseException):
                await task
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task
        await self.trail.aclose()
        for workflow_id in list(self._running):
            with contextlib.suppress(Exception):
                await self._store.call(self._sync_store.release, self.settings.owner, workflow_id)
        self._running.clear()
        self._store.close()
        self._sync_store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def serving(self) -> bool:
        """Whether health should say SERVING."""
        return self._started and not self._closing

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _loop(self) -> None:
        interval = max(0.2, min(self.settings.lease_seconds / 3, 5.0))
        while True:
            await wait_event(self._wake, interval)
            self._wake.clear()
            try:
                await self._renew()
                await self._claim(steal=False)
                for batch_id in await self._store.call(self._sync_store.open_batches):
                    await self.advance_batch(batch_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the lease loop failed; retrying")

    async def _renew(self) -> None:
        owned = list(self._running)
        if not owned:
            return
        lease_us = int(self.settings.lease_seconds * 1_000_000)
        claim = await self._store.call(
            self._sync_store.renew, self.settings.owner, owned, self._clock(), lease_us
        )
        for workflow_id in owned:
            entry = self._running.get(workflow_id)
            if workflow_id in claim.owned or entry is None or entry[0].record.terminal:
                continue  # a workflow that just ended gave its lease back itself
            row = await self._store.call(self._sync_store.load, workflow_id)
            if row is not None and row.summary.get("finished"):
                continue  # it ended meanwhile (its runner is about to notice)
            log.warning("lost the lease of workflow %s; stopping its runner", workflow_id)
            current = self._running.pop(workflow_id, None)
            if current is not None:
                current[1].cancel()
        for workflow_id, command in claim.commands.items():
            entry = self._running.get(workflow_id)
            if entry is None:
                continue
            runner = entry[0]
            if "cancel" in command:
                runner.request_cancel(str(command["cancel"]), str(command.get("by", "")))
            elif "resume" in command and _interrupted(runner.record):
                await runner.resume(True, str(command.get("by", "")))

    async def _claim(self, *, steal: bool) -> None:
        room = self.settings.max_running - len(self._running)
        if room <= 0 or self._closing:
            return
        lease_us = int(self.settings.lease_seconds * 1_000_000)
        ids = await self._store.call(
            self._sync_store.claim, self.settings.owner, self._clock(), lease_us, room, steal=steal
        )
        for workflow_id in ids:
            if workflow_id in self._running:
                continue
            try:
                await self._adopt(workflow_id)
            except LeaseLost:
                continue
            except Exception:
                log.exception("cannot recover workflow %s", workflow_id)

    async def _adopt(self, workflow_id: str) -> None:
        """Recovery: replay and verify the log, verify stored artifacts, then run."""
        entries = await self._store.call(self._sync_store.entries, workflow_id)
        row = await self._store.call(self._sync_store.load, workflow_id)
        if row is None:
            return
        stored = WorkflowRecord.from_dicts(row.summary, row.steps)
        problems = verify_chain(entries)
        record = stored
        if not problems:
            try:
                record = model.replay(entries)
            except model.ReplayError as exc:
                problems.append(str(exc))
        if not problems and _snapshot(record) != _snapshot(stored):
            problems.append("the materialised state differs from the replayed log")
        journal = self._journal(stored if problems else record)
        if problems:
            await self._halt(journal, problems)
            return
        if record.terminal:
            return
        if record.position > 1:
            self._spawn(self._audit_recovery(record))
        for step in record.steps.values():
            if step.state.terminal or not step.records:
                continue
            try:
                records = [StoredArtifact.from_dict(item) for item in step.records]
                await asyncio.to_thread(self.context.artifacts.load, records)
            except (ArtifactIntegrityError, ValueError, KeyError) as exc:
                message = getattr(exc, "message", str(exc))
                await journal.write(
                    model.STEP_FAILED,
                    {
                        "step_id": step.step_id,
                        "state": State.FAILED.value,
                        "error": f"stored artifacts failed verification on recovery: {message}",
                        "failure_kind": "integrity",
                        "integrity_check": {
                            "expected_plan_token": step.plan_token or "",
                            "plan_token_match": False,
                            "artifacts_match": False,
                            "differences": [f"artifact store: {message}"],
                        },
                    },
                    durable=True,
                )
        self._launch(journal)

    async def _halt(self, journal: Journal, problems: list[str]) -> None:
        record = journal.record
        log.error("workflow %s: the log does not verify: %s", record.workflow_id, problems)
        await self.trail.emit_specs(
            [
                AuditSpec(
                    f"orch-{record.workflow_id}-corrupt-{uuid.uuid4().hex[:8]}",
                    "orchestrator.wal_corrupted",
                    record.state.value,
                    "critical",
                    "the write-ahead log does not verify: " + "; ".join(problems[:10]),
                    {"workflow": {"workflow_id": record.workflow_id}},
                )
            ]
        )
        if record.terminal:
            return
        open_steps = {
            step_id: State.FAILED.value
            for step_id, step in record.steps.items()
            if not step.state.terminal
        }
        await journal.write(
            model.WORKFLOW_FAILED,
            {
                "state": State.FAILED.value,
                "error": "halted: the write-ahead log does not verify",
                "steps": open_steps,
            },
            durable=True,
            release=True,
        )

    def _journal(self, record: WorkflowRecord) -> Journal:
        return Journal(
            record,
            self._store,
            self.trail,
            self.settings.owner,
            lambda updated: self.feed.publish(updated.workflow_id),
            self._clock,
            unsafe_crash_after_state=self.settings.unsafe_crash_after_state,
        )

    def _launch(self, journal: Journal, workflow: Workflow | None = None) -> None:
        record = journal.record
        workflow = workflow or parse_definition(record.definition)
        runner = WorkflowRunner(journal, workflow, self.context)
        task = asyncio.create_task(runner.run(), name=f"workflow-{record.workflow_id}")
        self._running[record.workflow_id] = (runner, task)
        task.add_done_callback(lambda _t: self._finished(record.workflow_id, runner))

    def _finished(self, workflow_id: str, runner: WorkflowRunner) -> None:
        current = self._running.get(workflow_id)
        if current is not None and current[0] is runner:
            del self._running[workflow_id]
        if self._closing:
            return
        if runner.record.terminal:
            self._spawn(self._after_end(runner.record))
        self._wake.set()

    async def _after_end(self, record: WorkflowRecord) -> None:
        try:
            await self.trail.flush(record.workflow_id)
            await self._store.call(
                self._sync_store.set_audited, record.workflow_id, record.position
            )
        except Exception as exc:
            log.error("audit of workflow %s is incomplete: %s", record.workflow_id, exc)
        self.trail.forget(record.workflow_id)
        if record.batch_id:
            await self.advance_batch(record.batch_id)

    # --- audit recovery -------------------------------------------------------------------

    async def _reconcile_all(self) -> None:
        """Emit events that a crash kept from the audit outbox (derived from the log)."""
        if self._audit_ids is None:
            return
        for workflow_id, audited, _ in await self._store.call(self._sync_store.unaudited):
            if workflow_id in self._running:
                continue  # its runner's own recovery handles it
            entries = await self._store.call(self._sync_store.entries, workflow_id)
            if entries:
                await self._emit_missing(model.replay(entries), entries, audited)

    async def _audit_recovery(self, record: WorkflowRecord) -> None:
        row = await self._store.call(self._sync_store.load, record.workflow_id)
        if row is None or row.audited_position >= row.position:
            return
        entries = await self._store.call(self._sync_store.entries, record.workflow_id)
        await self._emit_missing(record, entries, row.audited_position)

    async def _emit_missing(
        self, record: WorkflowRecord, entries: list[Entry], audited: int
    ) -> None:
        if self._audit_ids is None:
            return
        wait_drained = getattr(self._emitter, "wait_drained", None)
        for delay in (0.5, 1, 2, 5, 10, 30):
            try:
                if wait_drained is not None:
                    await wait_drained(30.0)
                known = await self._audit_ids(record.workflow_id)
                break
            except Exception as exc:
                log.info("audit recovery of %s waits: %s", record.workflow_id, exc)
                await asyncio.sleep(delay)
        else:
            return
        state: WorkflowRecord | None = None
        missing: list[AuditSpec] = []
        for entry in entries:
            state = model.apply(state, entry)
            if entry.position <= audited:
                continue
            missing.extend(
                spec for spec in events_for(entry, state.state.value) if spec.event_id not in known
            )
        if missing:
            log.info("re-emitting %d audit event(s) of %s", len(missing), record.workflow_id)
            await self.trail.emit_specs(missing)
        await self._store.call(
            self._sync_store.set_audited, record.workflow_id, entries[-1].position
        )

    # --- use cases ------------------------------------------------------------------------

    async def submit(self, principal: Principal, submission: Submission) -> WorkflowRow:
        """Validate and start a workflow (idempotent by request id)."""
        _operator(principal)
        workflow, inputs = self._validate(submission)
        key = _key("submit", submission.request_id, _fingerprint(workflow, inputs, submission))
        if key is not None:
            existing = await self._store.call(self._sync_store.request, key)
            if existing is not None:
                return await self._row(existing)
        workflow_id = uuid.uuid4().hex
        entry, materialised = self._first_entry(
            workflow_id, workflow, submission, inputs, principal.name, "", held=False
        )
        own = len(self._running) < self.settings.max_running and not self._closing
        lease_us = int(self.settings.lease_seconds * 1_000_000)
        created_id, created = await self._store.call(
            self._sync_store.create_workflow,
            workflow_id,
            entry,
            materialised,
            name=workflow.id,
            batch_id="",
            requester=principal.name,
            owner=self.settings.owner if own else None,
            lease_expires_us=entry.timestamp_us + lease_us if own else 0,
            key=key,
        )
        if created:
            record = model.new_record(
                Entry(workflow_id, 1, entry.timestamp_us, entry.entry_type, entry.data)
            )
            self.trail.submit(
                Entry(workflow_id, 1, entry.timestamp_us, entry.entry_type, entry.data),
                record.state.value,
            )
            if own:
                self._launch(self._journal(record), workflow)
            else:
                self._wake.set()
        return await self._row(created_id)

    def _validate(self, submission: Submission) -> tuple[Workflow, dict[str, Any]]:
        workflow = parse_definition(submission.definition)
        workflow.ensure_runnable()
        inputs = workflow.resolve_inputs(dict(submission.inputs))
        if submission.workspace_source:
            source = Path(submission.workspace_source)
            if not source.is_absolute() or not source.is_dir():
                raise InvalidArgument(
                    "workspace_source must be an absolute path of a directory",
                    [Violation("workspace_source", "not an absolute path of a directory")],
                )
        return workflow, inputs

    def _first_entry(
        self,
        workflow_id: str,
        workflow: Workflow,
        submission: Submission,
        inputs: Mapping[str, Any],
        requester: str,
        batch_id: str,
        *,
        held: bool,
    ) -> tuple[NewEntry, Materialised]:
        stamp = self._clock()
        data = {
            "name": workflow.id,
            "definition": submission.definition.to_dict(),
            "digest": workflow.digest,
            "steps": [{"step_id": step.id, "kind": step.kind.value} for step in workflow.steps],
            "requester": requester,
            "inputs": dict(inputs),
            "labels": dict(submission.labels),
            "environment": submission.environment,
            "workspace_source": submission.workspace_source or None,
            "batch_id": batch_id,
            "held": held,
        }
        entry = NewEntry(model.WORKFLOW_STARTED, data, stamp)
        record = model.new_record(Entry(workflow_id, 1, stamp, model.WORKFLOW_STARTED, data))
        return entry, materialise(record)

    async def _row(self, workflow_id: str) -> WorkflowRow:
        row = await self._store.call(self._sync_store.load, workflow_id)
        if row is None:
            raise NotFound(f"no workflow {workflow_id!r}")
        return row

    async def get(self, principal: Principal, workflow_id: str) -> WorkflowRow:
        """One workflow."""
        _authenticated(principal)
        return await self._row(workflow_id)

    async def envelopes(self, row: WorkflowRow) -> dict[str, Mapping[str, Any]]:
        """The signed plan-token of each step that has one (for offline verification)."""
        found: dict[str, Mapping[str, Any]] = {}
        for step in row.steps:
            token = step.get("plan_token")
            if step.get("kind") == "engine" and isinstance(token, str):
                envelope = await self.plan_token(row.workflow_id, step["step_id"], token)
                if envelope is not None:
                    found[step["step_id"]] = envelope
        return found

    async def list_workflows(
        self, principal: Principal, where: ListFilter, page_size: int, page_token: str
    ) -> tuple[list[WorkflowRow], str]:
        """A page of workflows, oldest first."""
        _authenticated(principal)
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative", [Violation("page_size", "< 0")])
        limit = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        after = _decode_cursor(page_token) if page_token else None
        rows = await self._store.call(self._sync_store.list_workflows, where, limit + 1, after)
        token = ""
        if len(rows) > limit:
            last = rows[limit - 1]
            token = f"{last.summary['created_us']}.{last.workflow_id}"
        return rows[:limit], token

    async def watch(self, principal: Principal, workflow_id: str) -> AsyncIterator[WorkflowRow]:
        """The current workflow, then each change, until it ends."""
        _authenticated(principal)
        with self.feed.subscribe(workflow_id) as changed:
            row = await self._row(workflow_id)
            yield row
            while not row.summary.get("finished"):
                await wait_event(changed, 1.0)
                changed.clear()
                if self.feed.closed:
                    raise Unavailable("the orchestrator is stopping; watch again")
                latest = self._local_row(workflow_id) or await self._row(workflow_id)
                if latest.position != row.position:
                    row = latest
                    yield row

    def _local_row(self, workflow_id: str) -> WorkflowRow | None:
        """The row of a workflow this process runs, from its journal's record.

        The journal publishes a record only after its append committed, so this is what the
        database holds (summary, steps, position) without a round trip and a reparse; the
        lease fields are not tracked here. None when another process (or nobody) runs it.
        """
        local = self._running.get(workflow_id)
        if local is None:
            return None
        record = local[0].journal.published
        return WorkflowRow(
            workflow_id=record.workflow_id,
            summary=record.summary_dict(),
            steps=tuple(step.to_dict() for step in record.steps.values()),
            position=record.position,
            audited_position=0,
            owner=self.settings.owner,
            lease_expires_us=0,
            command=None,
            record=record,
        )

    async def cancel(
        self, principal: Principal, workflow_id: str, reason: str, request_id: str = ""
    ) -> WorkflowRow:
        """Cancel a workflow; a take-off in progress is allowed to finish first."""
        _operator(principal)
        if len(reason) > 2000:
            raise InvalidArgument("reason is too long", [Violation("reason", "at most 2000")])
        row = await self._row(workflow_id)
        if row.summary.get("finished"):
            if row.summary["finished"] == State.CANCELLED.value:
                return row
            raise FailedPrecondition(
                f"workflow {workflow_id} already ended ({row.summary['finished']})",
                "STATE",
                workflow_id,
            )
        local = self._running.get(workflow_id)
        if local is not None:
            local[0].request_cancel(reason, principal.name)
            await self._until_ended(workflow_id, local[1])
            return await self._row(workflow_id)
        if row.owner is None or row.lease_expires_us <= self._clock():
            record = WorkflowRecord.from_dicts(row.summary, row.steps)
            journal = self._journal(record)
            open_steps = {
                step_id: State.CANCELLED.value
                for step_id, step in record.steps.items()
                if not step.state.terminal
            }
            try:
                await journal.write(
                    model.WORKFLOW_CANCELLED,
                    {
                        "state": State.CANCELLED.value,
                        "error": f"cancelled by {principal.name}: {reason or 'cancelled'}",
                        "steps": open_steps,
                    },
                    durable=True,
                    release=True,
                    clear_command=True,
                )
            except LeaseLost:
                pass  # someone took it meanwhile: fall through to leaving a command
            else:
                self._spawn(self._after_end(journal.record))
                return await self._row(workflow_id)
        await self._store.call(
            self._sync_store.leave_command,
            workflow_id,
            {"cancel": reason or "cancelled", "by": principal.name},
        )
        return await self._row(workflow_id)

    async def _until_ended(self, workflow_id: str, task: asyncio.Task[None]) -> None:
        # asyncio.wait: the task's own end (even cancelled) is not raised here, while a
        # cancellation of the caller is.
        await asyncio.wait({task}, timeout=10.0)

    async def resume(
        self, principal: Principal, workflow_id: str, retry_takeoff: bool, request_id: str = ""
    ) -> WorkflowRow:
        """Re-run interrupted take-offs, on an operator's explicit decision."""
        _operator(principal)
        row = await self._row(workflow_id)
        record = WorkflowRecord.from_dicts(row.summary, row.steps)
        if not _interrupted(record):
            if request_id and record.state is not State.TAKEOFF_INTERRUPTED:
                # A retried call whose first attempt already resumed the workflow.
                seen = await self._store.call(
                    self._sync_store.request,
                    RequestKey("resume", request_id, canonical_hash([workflow_id, retry_takeoff])),
                )
                if seen is not None:
                    return row
            raise FailedPrecondition(
                f"workflow {workflow_id} is {record.state.value}; only a workflow whose "
                "take-off was interrupted can be resumed",
                "STATE",
                workflow_id,
            )
        if not retry_takeoff:
            raise FailedPrecondition(
                "the take-off was cut off by a crash and may have changed the workspace "
                "partly; resume with retry_takeoff to run it again, or cancel the workflow",
                "RETRY_TAKEOFF_REQUIRED",
                workflow_id,
            )
        if request_id:
            await self._store.call(
                self._sync_store.put_request,
                RequestKey("resume", request_id, canonical_hash([workflow_id, retry_takeoff])),
                workflow_id,
                self._clock(),
            )
        local = self._running.get(workflow_id)
        if local is not None:
            await local[0].resume(True, principal.name)
        else:
            await self._store.call(
                self._sync_store.leave_command,
                workflow_id,
                {"resume": True, "by": principal.name},
            )
            self._wake.set()
        return await self._row(workflow_id)

    async def timeline(self, principal: Principal, workflow_id: str) -> Timeline:
        """The recorded history, with durations and stats."""
        _authenticated(principal)
        entries = await self._store.call(self._sync_store.entries, workflow_id)
        if not entries:
            raise NotFound(f"no workflow {workflow_id!r}")
        return build_timeline(workflow_id, entries)

    async def plan_token(
        self, workflow_id: str, step_id: str, token: str
    ) -> Mapping[str, Any] | None:
        """A signed plan-token envelope (the engine's ``plan_tokens`` port)."""
        return await self._store.call(self._sync_store.plan_token, workflow_id, step_id, token)

    # --- batches --------------------------------------------------------------------------

    async def submit_batch(
        self,
        principal: Principal,
        request_id: str,
        items: Sequence[Submission],
        max_concurrent: int,
        policy: str,
    ) -> tuple[Mapping[str, Any], bool, int]:
        """Validate every item, create them held, then release up to ``max_concurrent``."""
        _operator(principal)
        violations: list[Violation] = []
        if not items:
            violations.append(Violation("items", "a batch needs at least one item"))
        if len(items) > MAX_BATCH_ITEMS:
            violations.append(Violation("items", f"at most {MAX_BATCH_ITEMS} items"))
        if max_concurrent < 1:
            violations.append(Violation("max_concurrent", "must be at least 1"))
        if policy not in POLICIES:
            violations.append(Violation("failure_policy", "quarantine, strict or continue"))
        validated: list[tuple[Workflow, dict[str, Any]]] = []
        for index, item in enumerate(items):
            try:
                validated.append(self._validate(item))
            except WorkflowDefinitionError as exc:
                violations.extend(
                    Violation(f"items[{index}].{v.field}", v.description) for v in exc.violations
                )
            except InvalidArgument as exc:
                found = [
                    Violation(f"items[{index}].{v.field}", v.description) for v in exc.violations
                ]
                violations.extend(found or [Violation(f"items[{index}]", exc.message)])
        if violations:
            raise InvalidArgument(
                f"invalid batch: {violations[0].field}: {violations[0].description}", violations
            )
        fingerprint = canonical_hash(
            {
                "items": [
                    _fingerprint(workflow, inputs, item)
                    for (workflow, inputs), item in zip(validated, items, strict=True)
                ],
                "max_concurrent": max_concurrent,
                "policy": policy,
            }
        )
        key = _key("batch", request_id, fingerprint)
        batch_id = uuid.uuid4().hex
        rows = []
        documents = []
        for index, ((workflow, inputs), item) in enumerate(zip(validated, items, strict=True)):
            workflow_id = uuid.uuid4().hex
            entry, materialised = self._first_entry(
                workflow_id, workflow, item, inputs, principal.name, batch_id, held=True
            )
            rows.append((workflow_id, entry, materialised, workflow.id, principal.name))
            documents.append(
                {"index": index, "workflow_id": workflow_id, "quarantined": False, "reason": ""}
            )
        document = {
            "batch_id": batch_id,
            "max_concurrent": max_concurrent,
            "policy": policy,
            "requester": principal.name,
            "items": documents,
            "stopped": False,
        }
        created_id, created = await self._store.call(
            self._sync_store.create_batch, batch_id, document, rows, self._clock(), key
        )
        if created:
            for workflow_id, entry, _, _, _ in rows:
                first = Entry(workflow_id, 1, entry.timestamp_us, entry.entry_type, entry.data)
                self.trail.submit(first, State.INIT.value)
            await self.advance_batch(created_id)
        return await self.get_batch(principal, created_id)

    async def get_batch(
        self, principal: Principal, batch_id: str
    ) -> tuple[Mapping[str, Any], bool, int]:
        """(document with each item's state, done, created_us)."""
        _authenticated(principal)
        # Apply the policy first, so that a read right after an item ended sees its effect.
        await self.advance_batch(batch_id)
        loaded = await self._store.call(self._sync_store.load_batch, batch_id)
        if loaded is None:
            raise NotFound(f"no batch {batch_id!r}")
        document, done, created = loaded
        states = await self._store.call(self._sync_store.batch_states, batch_id)
        items = [
            {**item, "state": states.get(item["workflow_id"], ("INIT", False, True, ""))[0]}
            for item in document["items"]
        ]
        return {**document, "items": items}, done, created

    async def advance_batch(self, batch_id: str) -> None:
        """Apply the failure policy and release held items up to ``max_concurrent``."""
        lock = self._batch_locks.setdefault(batch_id, asyncio.Lock())
        async with lock:
            loaded = await self._store.call(self._sync_store.load_batch, batch_id)
            if loaded is None or loaded[1]:
                return
            document = dict(loaded[0])
            items = [dict(item) for item in document["items"]]
            states = await self._store.call(self._sync_store.batch_states, batch_id)
            changed = False
            for item in items:
                state, terminal, _, _ = states[item["workflow_id"]]
                if state == State.FAILED.value and not item.get("failure_seen"):
                    item["failure_seen"] = True
                    changed = True
                    row = await self._row(item["workflow_id"])
                    error = str(row.summary.get("error", "")) or "failed"
                    if document["policy"] == "quarantine":
                        item.update(quarantined=True, reason=error)
                    else:
                        item["reason"] = error
                    if document["policy"] == "strict" and not document["stopped"]:
                        document["stopped"] = True
                        document["stop_reason"] = f"item {item['index']} failed: {error}"
            if document["stopped"]:
                for item in items:
                    state, terminal, held, _ = states[item["workflow_id"]]
                    if held and not terminal:
                        await self._cancel_held(
                            item["workflow_id"], str(document.get("stop_reason", "batch stopped"))
                        )
                        item["reason"] = "not started: " + str(document.get("stop_reason", ""))
                        changed = True
                states = await self._store.call(self._sync_store.batch_states, batch_id)
            else:
                running = sum(1 for s in states.values() if not s[1] and not s[2])
                room = int(document["max_concurrent"]) - running
                for item in items:
                    if room <= 0:
                        break
                    state, terminal, held, _ = states[item["workflow_id"]]
                    if held and not terminal:
                        if await self._release(item["workflow_id"]):
                            room -= 1
                            self._wake.set()
                states = await self._store.call(self._sync_store.batch_states, batch_id)
            # An item that failed after the first read above has not had the policy applied
            # yet: the batch is not done until it has (the next advance sees it).
            unseen = any(
                states[item["workflow_id"]][0] == State.FAILED.value
                and not item.get("failure_seen")
                for item in items
            )
            done = all(s[1] for s in states.values()) and not unseen
            if changed or done:
                document["items"] = items
                await self._store.call(
                    self._sync_store.update_batch, batch_id, document, done, self._clock()
                )

    async def _unowned_journal(self, workflow_id: str) -> Journal | None:
        row = await self._row(workflow_id)
        if row.owner is not None and row.lease_expires_us > self._clock():
            return None
        return self._journal(WorkflowRecord.from_dicts(row.summary, row.steps))

    async def _release(self, workflow_id: str) -> bool:
        journal = await self._unowned_journal(workflow_id)
        if journal is None or not journal.record.held:
            return False
        try:
            await journal.write(model.WORKFLOW_RELEASED, {}, release=True)
        except LeaseLost:
            return False
        return True

    async def _cancel_held(self, workflow_id: str, reason: str) -> None:
        journal = await self._unowned_journal(workflow_id)
        if journal is None or journal.record.terminal:
            return
        open_steps = {
            step_id: State.CANCELLED.value
            for step_id, step in journal.record.steps.items()
            if not step.state.terminal
        }
        with contextlib.suppress(LeaseLost):
            await journal.write(
                model.WORKFLOW_CANCELLED,
                {
                    "state": State.CANCELLED.value,
                    "error": f"batch stopped: {reason}",
                    "steps": open_steps,
                },
                durable=True,
                release=True,
            )


def build_timeline(workflow_id: str, entries: Sequence[Entry]) -> Timeline:
    """Durations between entries, per-step durations, final states and counts by type."""
    items = []
    previous: int | None = None
    counts: dict[str, int] = {}
    first_of: dict[str, int] = {}
    last_of: dict[str, tuple[int, str]] = {}
    for entry in entries:
        items.append(TimelineItem(entry, 0 if previous is None else entry.timestamp_us - previous))
        previous = entry.timestamp_us
        counts[entry.entry_type] = counts.get(entry.entry_type, 0) + 1
        step_id = entry.step_id
        if step_id and entry.state is not None:
            first_of.setdefault(step_id, entry.timestamp_us)
            last_of[step_id] = (entry.timestamp_us, entry.state.value)
        elif entry.data.get("steps") and isinstance(entry.data["steps"], Mapping):
            for sid, state in entry.data["steps"].items():
                first_of.setdefault(sid, entry.timestamp_us)
                last_of[sid] = (entry.timestamp_us, str(state))
    steps = tuple(
        (step_id, last_of[step_id][0] - first_of[step_id], last_of[step_id][1])
        for step_id in first_of
    )
    total = entries[-1].timestamp_us - entries[0].timestamp_us if entries else 0
    return Timeline(workflow_id, tuple(items), total, steps, counts)


def _snapshot(record: WorkflowRecord) -> tuple[Any, ...]:
    return (
        record.summary_dict(),
        [step.to_dict() for step in record.steps.values()],
    )


def _interrupted(record: WorkflowRecord) -> bool:
    return any(step.state is State.TAKEOFF_INTERRUPTED for step in record.steps.values())


def _authenticated(principal: Principal) -> None:
    if not principal.authenticated:
        raise Unauthenticated("this call needs an authenticated caller")


def _operator(principal: Principal) -> None:
    _authenticated(principal)
    if not any(principal.has_role(role) for role in OPERATOR_ROLES):
        raise PermissionDenied(
            f"{principal.name} may not run or change workflows; the role 'operator' is needed"
        )


def _fingerprint(workflow: Workflow, inputs: Mapping[str, Any], submission: Submission) -> str:
    return canonical_hash(
        {
            "digest": workflow.digest,
            "inputs": dict(inputs),
            "workspace_source": submission.workspace_source,
            "labels": dict(submission.labels),
            "environment": submission.environment,
            "base_dir": submission.definition.base_dir,
        }
    )


def _key(method: str, request_id: str, fingerprint: str) -> RequestKey | None:
    if not request_id:
        return None
    if len(request_id) > 128:
        raise InvalidArgument("request_id is too long", [Violation("request_id", "at most 128")])
    return RequestKey(method, request_id, fingerprint)


def _decode_cursor(token: str) -> tuple[int, str]:
    created, _, workflow_id = token.partition(".")
    try:
        return int(created), workflow_id
    except ValueError:
        raise InvalidArgument(
            "page_token is not valid", [Violation("page_token", "not a token from this service")]
        ) from None


def _exclusive_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise Unavailable(
            f"another orchestrator process uses {path.parent}; the embedded (SQLite) mode "
            "allows one per data dir"
        ) from None
    return fd


__all__ = [
    "AsyncStore",
    "Feed",
    "ManagerSettings",
    "OrchestratorManager",
    "Submission",
    "Timeline",
    "TimelineItem",
    "build_timeline",
    "owner_id",
    "parse_definition",
]
