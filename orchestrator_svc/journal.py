"""A workflow's journal: every transition goes to the log first, then to audit and watchers.

``Journal.write`` folds the new entry into the in-memory record (so an entry that cannot
apply is refused before it is stored), appends it through the ``Log`` port (fenced by the
lease), then hands its audit events to the ``AuditTrail`` and tells watchers. Audit events
are emitted in log order, in groups: the events of transitions that follow each other within
``AUDIT_LINGER_SECONDS`` share one outbox commit and one message to the audit service.
``AuditTrail.flush`` is the barrier that governed actions wait on (take-off, the end of a
workflow): it emits what is queued at once, and if the outbox cannot be written, they fail
closed.
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


# How long the events of a transition may wait so that later transitions' events join them.
# One outbox commit, one stream message and one audit-log commit then carry a whole run of
# transitions (a single-step workflow's fourteen events go in about four groups instead of
# fourteen), which is most of the audit path's cost when few workflows run at once. Nothing
# is lost by waiting: every event derives from a log entry that is already stored, recovery
# re-derives what a crash kept from the outbox, and durable entries (take-off, a failure, the
# end) and the barrier (``flush``, before take-off) emit at once.
AUDIT_LINGER_SECONDS = 0.05


class AuditTrail:
    """Emits the events of log entries in order, and tracks which positions are done."""

    def __init__(self, emitter: AuditEmitter, linger: float = AUDIT_LINGER_SECONDS) -> None:
        self._emitter = emitter
        self._linger = linger
        # Events waiting for the linger timer or a flush, per workflow, in log order.
        self._queued: dict[str, list[tuple[int, list[AuditSpec]]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: dict[str, list[asyncio.Task[int]]] = {}
        self._done: dict[str, int] = {}
        self._failed: dict[str, BaseException] = {}

    def submit(self, entry: Entry, workflow_state: str, *, now: bool = False) -> None:
        """Queue the events of ``entry``; they go out with the next group, in log order, or
        at once with everything queued before them when ``now``."""
        specs = events_for(entry, workflow_state)
        self._queued.setdefault(entry.workflow_id, []).append((entry.position, specs))
        if now or self._linger <= 0:
            self._start(entry.workflow_id)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self._start_all)

    async def emit_specs(self, specs: Sequence[AuditSpec]) -> None:
        """Emit events now and wait (recovery re-emits missing events this way)."""
        await self._emitted(0, self._emits(specs))

    def _start_all(self) -> None:
        self._timer = None
        for workflow_id in list(self._queued):
            self._start(workflow_id)

    def _start(self, workflow_id: str) -> None:
        """Start emitting what ``workflow_id`` has queued (tasks start in log order)."""
        queued = self._queued.pop(workflow_id, None)
        if not queued:
            return
        specs = [spec for _, group in queued for spec in group]
        task = asyncio.ensure_future(self._emitted(queued[-1][0], self._emits(specs)))
        self._tasks.setdefault(workflow_id, []).append(task)
        task.add_done_callback(lambda done: self._settle(workflow_id, done))

    def _emits(self, specs: Sequence[AuditSpec]) -> list[asyncio.Future[str]]:
        # Started here, in order, the emits reach the outbox in log order and share a commit.
        return [
            asyncio.ensure_future(
                self._emitter.emit(
                    spec.event_type,
                    workflow_state=spec.workflow_state,
                    severity=spec.severity,
                    message=spec.message,
                    event_id=spec.event_id,
                    **spec.parts,
                )
            )
            for spec in specs
        ]

    @staticmethod
    async def _emitted(position: int, emits: Sequence[asyncio.Future[str]]) -> int:
        """``position`` once every emit is done; the first error if one failed."""
        results = await asyncio.gather(*emits, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
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
        """Emit what is queued and wait for the workflow's pending events; raise if any
        could not be recorded."""
        self._start(workflow_id)
        tasks = list(self._tasks.get(workflow_id, []))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        error = self._failed.get(workflow_id)
        if error is not None:
            raise error

    def forget(self, workflow_id: str) -> None:
        """Drop bookkeeping of a workflow this process no longer runs (its queued events
        still go out: dropping them would lose events)."""
        self._start(workflow_id)
        self._tasks.pop(workflow_id, None)
        self._done.pop(workflow_id, None)
        self._failed.pop(workflow_id, None)

    async def aclose(self) -> None:
        """Emit what is queued and wait briefly (events are in the outbox once emitted)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._start_all()
        pending = [task for tasks in self._tasks.values() for task in tasks if not task.done()]
        if pending:
            with contextlib.suppress(Exception):
                await asyncio.wait(pending, timeout=5)


class Journal:
    """The in-memory record of one workflow this process owns, and its writer.

    ``record`` is the runner's view: every transition so far, deferred ones included.
    ``published`` is what the log holds, and what readers and watchers are shown.
    """

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
        self.published = record
        self._log = log_port
        self._trail = trail
        self._owner = owner
        self._on_change = on_change
        self._clock = clock
        self._lock = asyncio.Lock()
        self._unsafe_crash_after = unsafe_crash_after_state
        # Deferred transitions, each with the record after it, in log order.
        self._deferred: list[tuple[Entry, WorkflowRecord]] = []

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
        defer: bool = False,
        plan_token: tuple[str, Mapping[str, Any]] | None = None,
        release: bool = False,
        clear_command: bool = False,
    ) -> Entry:
        """Log one transition, then audit it and tell watchers; returns the entry.

        With ``defer`` the transition only moves ``record``: it is logged, audited and shown
        with the next transition that is not deferred (or ``flush``), in one append. Only
        transitions that no side effect depends on may wait, because a crash forgets them
        and the runner redoes the work from the last logged state.
        """
        if defer and (durable or plan_token or release or clear_command):
            raise ValueError("only a plain transition can be deferred")
        async with self._lock:
            record = self.record
            stamp = max(self._clock(), record.updated_us)
            candidate = Entry(
                record.workflow_id, record.position + 1, stamp, entry_type, dict(data)
            )
            updated = apply(record, candidate)
            if defer:
                self.record = updated
                self._deferred.append((candidate, updated))
                return candidate
            pending = [*self._deferred, (candidate, updated)]
            stored, cancelled = await self._append(
                pending,
                durable=durable,
                plan_token=plan_token,
                release=release,
                clear_command=clear_command,
            )
        self._on_change(updated)
        if cancelled:
            raise asyncio.CancelledError()
        return stored[-1]

    async def flush(self) -> None:
        """Log the deferred transitions now (before the runner waits on something)."""
        async with self._lock:
            if not self._deferred:
                return
            updated = self._deferred[-1][1]
            _, cancelled = await self._append(list(self._deferred))
        self._on_change(updated)
        if cancelled:
            raise asyncio.CancelledError()

    async def _append(
        self,
        pending: list[tuple[Entry, WorkflowRecord]],
        *,
        durable: bool = False,
        plan_token: tuple[str, Mapping[str, Any]] | None = None,
        release: bool = False,
        clear_command: bool = False,
    ) -> tuple[list[Entry], bool]:
        """Append ``pending`` in one transaction; the stored entries and whether the caller
        was cancelled meanwhile (the append itself always runs to its end)."""
        updated = pending[-1][1]
        changed: set[str] | None = set()
        for entry, _ in pending:
            if entry.entry_type in ("workflow_completed", "workflow_failed", "workflow_cancelled"):
                changed = None
            elif changed is not None and entry.step_id:
                changed.add(entry.step_id)
        # Entries without a state of their own (workspace_created) count as the workflow's.
        crash_at = next(
            (
                index
                for index, (entry, after) in enumerate(pending)
                if self._unsafe_crash_after is not None
                and (entry.state or after.state) is self._unsafe_crash_after
            ),
            None,
        )
        last = pending[-1][0]
        appending = asyncio.ensure_future(  # noqa: RUF006 (awaited below, through shield)
            self._log.append(
                last.workflow_id,
                self._owner,
                self.published.position,
                [
                    NewEntry(entry.entry_type, entry.data, entry.timestamp_us)
                    for entry, _ in pending
                ],
                materialise(updated, None if changed is None else sorted(changed)),
                durable=durable or crash_at is not None,
                now_us=last.timestamp_us,
                plan_token=(last.step_id, plan_token[0], plan_token[1]) if plan_token else None,
                audited_position=self._trail.audited(last.workflow_id),
                release=release,
                clear_command=clear_command,
            )
        )
        # A cancelled caller must not leave the memory behind the database: the append
        # runs to its end, the record follows it, and only then does cancellation win.
        cancelled = False
        while not appending.done():
            try:
                await asyncio.shield(appending)
            except asyncio.CancelledError:
                cancelled = True
            except Exception:
                break
        stored = appending.result()
        if crash_at is not None:
            _unsafe_crash(stored[crash_at])
        self.record = updated
        self.published = updated
        self._deferred.clear()
        for index, (entry, (_, after)) in enumerate(zip(stored, pending, strict=True)):
            # A durable entry marks a step that matters (take-off, a failure, the end): its
            # events, and those queued before them, do not wait for company.
            now = durable and index == len(stored) - 1
            self._trail.submit(entry, after.state.value, now=now)
        return stored, cancelled

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
