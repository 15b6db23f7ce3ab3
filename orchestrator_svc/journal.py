"""A workflow's journal: every transition goes to the log first, then to audit and watchers.

``Journal.write`` folds the new entry into the in-memory record (so an entry that cannot
apply is refused before it is stored), appends it through the ``Log`` port (fenced by the
lease), then hands its audit events to the ``AuditTrail`` and tells watchers. Audit events
are emitted in order but without waiting for each one's fsync, so that concurrent events share
the outbox's group commit; ``AuditTrail.flush`` is the barrier that governed actions wait on
(take-off, the end of a workflow): if the outbox cannot be written, they fail closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from cabincrew.emitter import AuditEmitter
from orchestrator_svc.events import AuditSpec, events_for
from orchestrator_svc.model import Entry, State, WorkflowRecord, apply
from orchestrator_svc.store import Materialised, NewEntry

log = logging.getLogger("orchestrator_svc.journal")


def now_us() -> int:
    """Wall-clock microseconds since the epoch."""
    return time.time_ns() // 1000


class Log(Protocol):
    """Where entries go (the store, run in a thread)."""

    async def append(
        self,
        workflow_id: str,
        owner: str | None,
        expected_position: int,
        entries: Sequence[NewEntry],
        materialised: Materialised,
        *,
        durable: bool,
        now_us: int,
        plan_token: tuple[str, str, Mapping[str, Any]] | None = None,
        audited_position: int | None = None,
        release: bool = False,
        clear_command: bool = False,
    ) -> list[Entry]:
        """Append after ``expected_position``; raises ``LeaseLost`` when fenced out."""
        ...


def materialise(record: WorkflowRecord, step_ids: Sequence[str] | None = None) -> Materialised:
    """The rows an append writes for ``record`` (all steps, or only ``step_ids``)."""
    chosen = list(record.steps) if step_ids is None else list(step_ids)
    return Materialised(
        summary=record.summary_dict(),
        state=record.state.value,
        terminal=record.terminal,
        held=record.held,
        updated_us=record.updated_us,
        steps={
            step_id: (record.steps[step_id].state.value, record.steps[step_id].to_dict())
            for step_id in chosen
        },
    )


class AuditTrail:
    """Emits the events of log entries in order, and tracks which positions are done."""

    def __init__(self, emitter: AuditEmitter) -> None:
        self._emitter = emitter
        self._tasks: dict[str, list[asyncio.Task[int]]] = {}
        self._done: dict[str, int] = {}
        self._failed: dict[str, BaseException] = {}

    def submit(self, entry: Entry, workflow_state: str) -> None:
        """Start emitting the events of ``entry`` (tasks start in order: the outbox keeps it)."""
        specs = events_for(entry, workflow_state)
        task = asyncio.ensure_future(self._emit(entry.position, specs))
        tasks = self._tasks.setdefault(entry.workflow_id, [])
        tasks.append(task)
        task.add_done_callback(lambda done: self._settle(entry.workflow_id, done))

    async def emit_specs(self, specs: Sequence[AuditSpec]) -> None:
        """Emit events now and wait (recovery re-emits missing events this way)."""
        await self._emit(0, specs)

    async def _emit(self, position: int, specs: Sequence[AuditSpec]) -> int:
        for spec in specs:
            await self._emitter.emit(
                spec.event_type,
                workflow_state=spec.workflow_state,
                severity=spec.severity,
                message=spec.message,
                event_id=spec.event_id,
                **spec.parts,
            )
        return position

    def _settle(self, workflow_id: str, task: asyncio.Task[int]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._failed.setdefault(workflow_id, error)
            log.error("audit events of workflow %s could not be recorded: %s", workflow_id, error)
            return
        tasks = self._tasks.get(workflow_id, [])
        # The audited position only moves past a prefix of finished tasks.
        while tasks and tasks[0].done() and not tasks[0].cancelled() and not tasks[0].exception():
            self._done[workflow_id] = max(self._done.get(workflow_id, 0), tasks.pop(0).result())

    def audited(self, workflow_id: str) -> int | None:
        """The last position whose events (and all before) reached the outbox, if known."""
        return self._done.get(workflow_id)

    async def flush(self, workflow_id: str) -> None:
        """Wait for the workflow's pending events; raise if any could not be recorded."""
        tasks = list(self._tasks.get(workflow_id, []))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        error = self._failed.get(workflow_id)
        if error is not None:
            raise error

    def forget(self, workflow_id: str) -> None:
        """Drop bookkeeping of a workflow this process no longer runs."""
        for task in self._tasks.pop(workflow_id, []):
            if not task.done():
                # Keep emitting: dropping would lose events; just stop tracking.
                continue
        self._done.pop(workflow_id, None)
        self._failed.pop(workflow_id, None)

    async def aclose(self) -> None:
        """Wait briefly for pending emits (they are in the outbox once they return)."""
        pending = [task for tasks in self._tasks.values() for task in tasks if not task.done()]
        if pending:
            with contextlib.suppress(Exception):
                await asyncio.wait(pending, timeout=5)


class Journal:
    """The in-memory record of one workflow this process owns, and its writer."""

    def __init__(
        self,
        record: WorkflowRecord,
        log_port: Log,
        trail: AuditTrail,
        owner: str,
        on_change: Callable[[WorkflowRecord], None],
        clock: Callable[[], int] = now_us,
        *,
        unsafe_crash_after_state: State | None = None,
    ) -> None:
        self.record = record
        self._log = log_port
        self._trail = trail
        self._owner = owner
        self._on_change = on_change
        self._clock = clock
        self._lock = asyncio.Lock()
        self._unsafe_crash_after = unsafe_crash_after_state

    @property
    def workflow_id(self) -> str:
        """The workflow's id."""
        return self.record.workflow_id

    async def write(
        self,
        entry_type: str,
        data: Mapping[str, Any],
        *,
        durable: bool = False,
        plan_token: tuple[str, Mapping[str, Any]] | None = None,
        release: bool = False,
        clear_command: bool = False,
    ) -> Entry:
        """Log one transition, then audit it and tell watchers; returns the stored entry."""
        async with self._lock:
            record = self.record
            stamp = max(self._clock(), record.updated_us)
            candidate = Entry(
                record.workflow_id, record.position + 1, stamp, entry_type, dict(data)
            )
            updated = apply(record, candidate)
            step_id = candidate.step_id
            if entry_type in ("workflow_completed", "workflow_failed", "workflow_cancelled"):
                changed_steps: list[str] | None = None
            else:
                changed_steps = [step_id] if step_id else []
            # Entries without a state of their own (workspace_created) count as the workflow's.
            crash = self._unsafe_crash_after is not None and (
                (candidate.state or updated.state) is self._unsafe_crash_after
            )
            append = asyncio.ensure_future(
                self._log.append(
                    record.workflow_id,
                    self._owner,
                    record.position,
                    [NewEntry(entry_type, candidate.data, stamp)],
                    materialise(updated, changed_steps),
                    durable=durable or crash,
                    now_us=stamp,
                    plan_token=(step_id, plan_token[0], plan_token[1]) if plan_token else None,
                    audited_position=self._trail.audited(record.workflow_id),
                    release=release,
                    clear_command=clear_command,
                )
            )
            # A cancelled caller must not leave the memory behind the database: the append
            # runs to its end, the record follows it, and only then does cancellation win.
            cancelled = False
            while not append.done():
                try:
                    await asyncio.shield(append)
                except asyncio.CancelledError:
                    cancelled = True
                except Exception:
                    break
            stored = append.result()
            if crash:
                _unsafe_crash(stored[0])
            self.record = updated
            entry = stored[0]
            self._trail.submit(entry, updated.state.value)
        self._on_change(updated)
        if cancelled:
            raise asyncio.CancelledError()
        return entry

    async def flush_audit(self) -> None:
        """The barrier before governed actions: every event so far is in the outbox."""
        await self._trail.flush(self.workflow_id)


def _unsafe_crash(entry: Entry) -> None:
    """Die like a power cut right after ``entry`` is durable (orchestrator crash tests only)."""
    log.critical(
        "orchestrator.unsafe_crash_after_state: SIGKILL after entry %d (%s) of workflow %s",
        entry.position,
        entry.entry_type,
        entry.workflow_id,
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["AuditTrail", "Journal", "Log", "materialise", "now_us"]
