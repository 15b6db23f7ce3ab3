"""The workflow engine: runs a workflow's DAG of steps, each through the protocol's states.

Each step is a small state machine: a handler per state does its work, writes the next
transition to the journal (log first), and returns; the loop picks the handler of the state
the log now shows. Recovery is therefore the same code: after a restart the loop starts from
whatever state the log recorded, with three rules (docs/orchestrator.md, "Recovery"):

- a flight-plan that was running (``PLAN_RUNNING``, ``PLAN_GENERATED``) is redone from an
  empty artifacts dir;
- a take-off that was running (``TAKEOFF_RUNNING``) is never re-run silently: the step goes
  to ``TAKEOFF_INTERRUPTED`` and waits for ``resume --retry-takeoff`` or ``cancel``, unless
  the engine declared its take-off idempotent;
- everything else continues where it stood (every call to another service is idempotent).

The engine talks to other services only through the ports in ``ports.py``; no gRPC here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cabincrew.canonical import canonical_hash
from cabincrew.plantoken import (
    PlanBinding,
    PlanToken,
    PlanTokenError,
    SignedPlanToken,
    integrity_check,
    sign_plan_token,
    verify_signed,
)
from cabincrew.signing import Signer
from orchestrator_svc import model
from orchestrator_svc.artifacts import (
    BODY_FILE,
    Artifact,
    ArtifactLimits,
    ArtifactStore,
    StoredArtifact,
    extract_outputs,
    validate_artifacts,
)
from orchestrator_svc.errors import (
    ArtifactIntegrityError,
    ArtifactValidationError,
    ExpressionError,
    OrchestratorError,
    WorkspaceError,
)
from orchestrator_svc.journal import Journal
from orchestrator_svc.model import State, StepRecord
from orchestrator_svc.ports import (
    ApprovalRequest,
    Approvals,
    ApprovalState,
    ArtifactForReview,
    Digests,
    Evaluation,
    Governance,
    PeerRefused,
    PeerUnavailable,
    Verdict,
)
from orchestrator_svc.runner import (
    EngineRun,
    Mode,
    RunLimits,
    build_engine_input,
    remove_tree,
    run_engine,
)
from orchestrator_svc.store import LeaseLost
from orchestrator_svc.templating import Scope, StepValues, step_outputs
from orchestrator_svc.workflow import Step, StepKind, Workflow, WorkspaceSpec
from orchestrator_svc.workspace import (
    create_workspace,
    diff_manifests,
    manifest_hash,
    workspace_hash,
    workspace_manifest,
)

log = logging.getLogger("orchestrator_svc.scheduler")
A = TypeVar("A")
B = TypeVar("B")

PREVIEW_CHARS = 2000
MAX_GOVERNANCE_RETRIES = 3


@dataclass(frozen=True)
class Settings:
    """Where a process keeps run files, and its limits."""

    workspaces_dir: Path
    runs_dir: Path
    logs_dir: Path
    max_parallel_steps: int = 4
    kill_grace_seconds: float = 5.0
    inline_body_bytes: int = 1 << 20
    inline_total_bytes: int = 8 << 20
    artifact_limits: ArtifactLimits = field(default_factory=ArtifactLimits)


@dataclass(frozen=True)
class EngineContext:
    """Everything a runner needs besides its journal."""

    governance: Governance
    approvals: Approvals
    artifacts: ArtifactStore
    signer: Signer
    secrets: Callable[[str], str | None]
    settings: Settings
    # (workflow id, step id, token) -> the signed envelope stored with the token, or None.
    plan_tokens: Callable[[str, str, str], Awaitable[Mapping[str, Any] | None]]


class StepFailed(Exception):
    """A step cannot continue; ``kind`` names why (see docs/orchestrator.md)."""

    def __init__(self, kind: str, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.kind = kind
        self.error = error
        self.extra = extra


class RunnerStopped(Exception):
    """The runner lost its lease or was shut down; leave the workflow to its next owner."""


class WorkspaceLock:
    """Flight-plans share the workspace; a take-off (with its integrity check) has it alone."""

    def __init__(self) -> None:
        self._condition = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        """Hold the workspace unchanged (no take-off runs meanwhile)."""
        async with self._condition:
            await self._condition.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            async with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the workspace alone."""
        async with self._condition:
            self._writers_waiting += 1
            try:
                await self._condition.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._condition:
                self._writer = False
                self._condition.notify_all()


class WorkflowRunner:
    """Drives one workflow this process owns until it ends (or the lease is lost)."""

    def __init__(self, journal: Journal, workflow: Workflow, context: EngineContext) -> None:
        self.journal = journal
        self.workflow = workflow
        self.context = context
        self.settings = context.settings
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._workspace_lock = WorkspaceLock()
        self._failing = False
        self._cancel_reason: str | None = None
        self._cancel_by = ""
        self._stopped = False
        # Plan-tokens this runner signed, by step (see _verified_token).
        self._signed: dict[str, PlanToken] = {}

    @property
    def workflow_id(self) -> str:
        """The workflow's id."""
        return self.journal.workflow_id

    @property
    def record(self) -> model.WorkflowRecord:
        """The current record."""
        return self.journal.record

    # --- the workflow loop ----------------------------------------------------------------

    async def run(self) -> None:
        """Run until the workflow ends; returns early (quietly) if the lease is lost."""
        try:
            await self._run()
        except (LeaseLost, RunnerStopped):
            log.info("workflow %s: stopped here (lease lost or shutting down)", self.workflow_id)
        finally:
            await self._stop_tasks()

    async def _run(self) -> None:
        if self.record.terminal:
            return
        if self.record.workspace is None:
            try:
                await self._create_workspace()
            except WorkspaceError as exc:
                await self._finish(State.FAILED, f"workspace: {exc.message}")
                return
        limit = max(1, min(self.workflow.concurrency, self.settings.max_parallel_steps))
        while True:
            record = self.record
            if record.terminal:
                return
            if self._cancel_reason is not None:
                await self._cancel_all()
                return
            for step_id, step in record.steps.items():
                # Steps the log shows in progress (after a restart, or a resume) get a task.
                if (
                    step_id not in self._tasks
                    and step.state not in (State.INIT, State.TAKEOFF_INTERRUPTED)
                    and not step.state.terminal
                ):
                    self._start(step_id)
            if not self._failing and any(s.state is State.FAILED for s in record.steps.values()):
                self._failing = True
                await self._stop_before_takeoff("another step failed")
                continue
            states = {step_id: step.dag_state for step_id, step in self.record.steps.items()}
            frontier = self.workflow.dag.frontier(states, limit)
            for step_id in frontier.skip:
                await self.journal.write(
                    model.STEP_SKIPPED,
                    {
                        "step_id": step_id,
                        "state": State.COMPLETED.value,
                        "skipped": True,
                        "message": "a dependency was skipped",
                    },
                )
            for step_id in frontier.cancel:
                await self.journal.write(
                    model.STEP_CANCELLED,
                    {
                        "step_id": step_id,
                        "state": State.CANCELLED.value,
                        "error": "a dependency failed or was cancelled",
                    },
                )
            if frontier.skip or frontier.cancel:
                continue
            if frontier.finished:
                await self._finish_from_steps()
                return
            if not self._failing:
                for step_id in frontier.ready:
                    if step_id not in self._tasks:
                        self._start(step_id)
            await self._wait_for_change()

    def _start(self, step_id: str) -> None:
        task = asyncio.create_task(self._run_step(step_id), name=f"{self.workflow_id}/{step_id}")
        self._tasks[step_id] = task
        task.add_done_callback(lambda _done: self._wake.set())

    async def _wait_for_change(self) -> None:
        # Reap finished tasks; a task that died of LeaseLost stops the whole runner.
        for step_id, task in list(self._tasks.items()):
            if task.done():
                del self._tasks[step_id]
                error = None if task.cancelled() else task.exception()
                if isinstance(error, LeaseLost | RunnerStopped):
                    raise RunnerStopped()
                if error is not None:
                    # The log could not be written (database down?): try again shortly.
                    log.error("workflow %s step %s stopped: %r", self.workflow_id, step_id, error)
                    await asyncio.sleep(1.0)
        if any(
            step_id not in self._tasks
            and self.record.steps[step_id].state not in (State.INIT, State.TAKEOFF_INTERRUPTED)
            and not self.record.steps[step_id].state.terminal
            for step_id in self.record.steps
        ):
            return
        self._wake.clear()
        if any(task.done() for task in self._tasks.values()):
            return
        # Nothing deferred waits while the runner sleeps (a finished step, for one).
        await self.journal.flush()
        await self._wake.wait()

    async def _finish_from_steps(self) -> None:
        failed = [s for s in self.record.steps.values() if s.state is State.FAILED]
        if failed:
            first = failed[0]
            await self._finish(State.FAILED, f"step {first.step_id} failed: {first.error or ''}")
        elif any(s.state is State.CANCELLED for s in self.record.steps.values()):
            await self._finish(State.FAILED, "a step was cancelled")
        else:
            await self._finish(State.COMPLETED, "")

    async def _finish(
        self, state: State, error: str, steps: Mapping[str, str] | None = None
    ) -> None:
        entry_type = {
            State.COMPLETED: model.WORKFLOW_COMPLETED,
            State.FAILED: model.WORKFLOW_FAILED,
            State.CANCELLED: model.WORKFLOW_CANCELLED,
        }[state]
        data: dict[str, Any] = {"state": state.value}
        if error:
            data["error"] = error
        if steps:
            data["steps"] = dict(steps)
        await self.journal.write(entry_type, data, durable=True, release=True, clear_command=True)
        await self._cleanup_runs()

    async def _cleanup_runs(self) -> None:
        directory = self.settings.runs_dir / self.workflow_id
        if directory.exists():
            with contextlib.suppress(OSError):
                await asyncio.to_thread(remove_tree, directory)

    async def _create_workspace(self) -> None:
        record = self.record
        destination = self.settings.workspaces_dir / self.workflow_id
        spec: WorkspaceSpec | None
        if record.workspace_source:
            spec = WorkspaceSpec(source=Path(record.workspace_source))
        else:
            spec = self.workflow.workspace

        def create() -> tuple[str, str | None, str]:
            if destination.exists() or destination.is_symlink():
                # Left by a crash in the middle of a copy: start again.
                remove_tree(destination) if destination.is_dir() else destination.unlink()
            if spec is None:
                destination.mkdir(parents=True, mode=0o755)
                return "empty", None, workspace_hash(destination)
            destination.parent.mkdir(parents=True, exist_ok=True)
            created = create_workspace(spec, destination)
            return created.kind, created.commit, workspace_hash(destination)

        kind, commit, digest = await asyncio.to_thread(create)
        data: dict[str, Any] = {"path": str(destination), "kind": kind, "hash": digest}
        if commit:
            data["commit"] = commit
        # Logged with the first step's start: nothing depends on it alone.
        await self.journal.write(model.WORKSPACE_CREATED, data, defer=True)

    # --- operator commands ----------------------------------------------------------------

    def request_cancel(self, reason: str, by: str) -> None:
        """Ask the loop to cancel the workflow (done by the loop, in order)."""
        if self._cancel_reason is None:
            self._cancel_reason = reason or "cancelled"
            self._cancel_by = by
            for step_id, task in self._tasks.items():
                if self.record.steps[step_id].state is not State.TAKEOFF_RUNNING:
                    task.cancel()
            self._wake.set()

    async def _cancel_all(self) -> None:
        await self._stop_before_takeoff("the workflow was cancelled")
        # A take-off in progress finishes: killing it could leave the workspace half-applied.
        running = [task for task in self._tasks.values() if not task.done()]
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        self._tasks.clear()
        if self.record.terminal:
            return
        open_steps = {
            step_id: State.CANCELLED.value
            for step_id, step in self.record.steps.items()
            if not step.state.terminal
        }
        reason = self._cancel_reason or "cancelled"
        by = f" by {self._cancel_by}" if self._cancel_by else ""
        await self._finish(State.CANCELLED, f"cancelled{by}: {reason}", open_steps)

    async def _stop_before_takeoff(self, why: str) -> None:
        """Cancel steps that have not started take-off; withdraw their approvals."""
        for step_id, task in list(self._tasks.items()):
            if self.record.steps[step_id].state is not State.TAKEOFF_RUNNING:
                task.cancel()
        for step_id, task in list(self._tasks.items()):
            if task.cancelled() or self.record.steps[step_id].state is not State.TAKEOFF_RUNNING:
                with contextlib.suppress(BaseException):
                    await task
                self._tasks.pop(step_id, None)
        for step_id, step in self.record.steps.items():
            if step.state.terminal or step.state is State.TAKEOFF_RUNNING:
                continue
            if step_id in self._tasks:
                continue
            if step.approval_id and step.state is State.AWAITING_APPROVAL:
                with contextlib.suppress(OrchestratorError):
                    await self.context.approvals.cancel(step.approval_id, why)
            if self._cancel_reason is None:
                await self.journal.write(
                    model.STEP_CANCELLED,
                    {"step_id": step_id, "state": State.CANCELLED.value, "error": why},
                )

    async def resume(self, retry_takeoff: bool, by: str) -> None:
        """Re-run interrupted take-offs (the operator's explicit decision)."""
        interrupted = [
            step_id
            for step_id, step in self.record.steps.items()
            if step.state is State.TAKEOFF_INTERRUPTED
        ]
        for step_id in interrupted:
            await self.journal.write(
                model.WORKFLOW_RESUMED,
                {
                    "step_id": step_id,
                    "state": State.READY_FOR_TAKEOFF.value,
                    "retry_takeoff": retry_takeoff,
                    "by": by,
                    "message": f"take-off re-run on the decision of {by}",
                },
                durable=True,
                clear_command=True,
            )
        self._wake.set()

    async def _stop_tasks(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()

    # --- steps ----------------------------------------------------------------------------

    async def _run_step(self, step_id: str) -> None:
        step = self.workflow.step(step_id)
        while True:
            record = self.record.steps[step_id]
            if record.state.terminal or record.state is State.TAKEOFF_INTERRUPTED:
                return
            try:
                if step.kind is StepKind.APPROVAL:
                    await self._gate_handler(record.state)(step, record)
                else:
                    await self._engine_handler(record.state)(step, record)
            except StepFailed as failure:
                await self._fail(step_id, failure)
                return
            except (asyncio.CancelledError, LeaseLost, RunnerStopped):
                raise
            except ExpressionError as exc:
                await self._fail(step_id, StepFailed("expression", exc.message))
                return
            except PeerUnavailable as exc:
                # Governance fails closed: no answer is never "allow".
                await self._fail(step_id, StepFailed("dependency_unavailable", exc.message))
                return
            except PeerRefused as exc:
                await self._fail(step_id, StepFailed("refused", exc.message))
                return
            except Exception as exc:
                log.exception("workflow %s step %s: internal error", self.workflow_id, step_id)
                await self._fail(
                    step_id, StepFailed("internal_error", f"internal error ({type(exc).__name__})")
                )
                return

    def _engine_handler(self, state: State) -> Callable[[Step, StepRecord], Any]:
        return {
            State.INIT: self._flight_plan,
            State.PLAN_RUNNING: self._flight_plan,
            State.PLAN_GENERATED: self._flight_plan,
            State.ARTIFACTS_VALIDATED: self._create_token,
            State.TOKEN_CREATED: self._preflight,
            State.PRE_FLIGHT_RUNNING: self._preflight,
            State.PREFLIGHT_COMPLETE: self._after_preflight,
            State.AWAITING_APPROVAL: self._await_approval,
            State.APPROVED: self._takeoff,
            State.READY_FOR_TAKEOFF: self._takeoff,
            State.TAKEOFF_RUNNING: self._interrupted_takeoff,
            State.EXECUTION_COMPLETE: self._post_checks,
        }[state]

    def _gate_handler(self, state: State) -> Callable[[Step, StepRecord], Any]:
        handlers: dict[State, Callable[[Step, StepRecord], Any]] = {
            State.INIT: self._gate_request,
            State.AWAITING_APPROVAL: self._await_approval,
            State.APPROVED: self._gate_pass,
        }
        if state not in handlers:
            raise StepFailed("invalid_state", f"an approval step cannot be in state {state.value}")
        return handlers[state]

    async def _fail(self, step_id: str, failure: StepFailed) -> None:
        record = self.record.steps[step_id]
        if record.approval_id and record.state in (
            State.AWAITING_APPROVAL,
            State.APPROVED,
            State.READY_FOR_TAKEOFF,
        ):
            # An approval the failed step will never use must not stay usable (best effort:
            # a consumed one cannot be cancelled and needs nothing).
            with contextlib.suppress(OrchestratorError):
                await self.context.approvals.cancel(
                    record.approval_id, f"step failed: {failure.error}"[:1000]
                )
        data: dict[str, Any] = {
            "step_id": step_id,
            "state": State.FAILED.value,
            "error": failure.error,
            "failure_kind": failure.kind,
        }
        data.update(failure.extra)
        await self.journal.write(model.STEP_FAILED, data, durable=True)

    def _scope(self) -> Scope:
        values = {
            step_id: StepValues(outputs=model.thaw(step.outputs), decision=step.decision)
            for step_id, step in self.record.steps.items()
            if step.state is State.COMPLETED and not step.skipped
        }
        return Scope(inputs=model.thaw(self.record.inputs), steps=values)

    def _paths(self, step_id: str, label: str) -> tuple[Path, Path, Path]:
        run = self.settings.runs_dir / self.workflow_id / step_id / label
        log_path = self.settings.logs_dir / self.workflow_id / step_id / f"{label}.log"
        return run / "artifacts", run / "temp", log_path

    def _secrets(self, step: Step) -> dict[str, str]:
        values: dict[str, str] = {}
        missing = []
        for name in step.secrets:
            value = self.context.secrets(name)
            if value is None:
                missing.append(name)
            else:
                values[name] = value
        if missing:
            raise StepFailed(
                "missing_secret",
                f"secret(s) {', '.join(missing)} are not set in the orchestrator's environment",
            )
        return values

    def _limits(self, step: Step) -> RunLimits:
        return RunLimits(
            timeout_seconds=step.timeout_seconds,
            kill_grace_seconds=self.settings.kill_grace_seconds,
            cpu_seconds=max(1, int(step.timeout_seconds) + 1),
        )

    def _engine_context(self) -> dict[str, Any]:
        record = self.record
        return {
            "workflow_name": record.name,
            "environment": record.environment,
            "requester": record.requester,
            "labels": dict(record.labels),
        }

    @property
    def _workspace(self) -> Path:
        assert self.record.workspace is not None
        return Path(self.record.workspace)

    # flight-plan ------------------------------------------------------------------------

    async def _flight_plan(self, step: Step, record: StepRecord) -> None:
        scope = self._scope()
        if record.state is State.INIT and not step.should_run(scope):
            await self.journal.write(
                model.STEP_SKIPPED,
                {
                    "step_id": step.id,
                    "state": State.COMPLETED.value,
                    "skipped": True,
                    "message": "its when condition is false",
                },
            )
            return
        config = step.render_config(scope)
        secrets = self._secrets(step)
        assert step.engine is not None
        recovered = record.state is not State.INIT
        attempt = record.attempt
        failures = 0
        while True:
            attempt += 1
            artifacts_dir, temp_dir, log_path = self._paths(step.id, f"plan-{attempt}")
            async with self._workspace_lock.shared():
                before = await asyncio.to_thread(workspace_manifest, self._workspace)
                before_hash = manifest_hash(before)
                await self.journal.write(
                    model.STEP_STARTED,
                    {
                        "step_id": step.id,
                        "state": State.PLAN_RUNNING.value,
                        "attempt": attempt,
                        "workspace_hash": before_hash,
                        "config": config,
                        "recovered": recovered,
                    },
                )
                engine_input = build_engine_input(
                    mode=Mode.FLIGHT_PLAN,
                    workflow_id=self.workflow_id,
                    step_id=step.id,
                    config=config,
                    context=self._engine_context(),
                    run_index=attempt,
                    workspace_hash=before_hash,
                )
                run = await run_engine(
                    step.engine,
                    Mode.FLIGHT_PLAN,
                    engine_input,
                    workspace=self._workspace,
                    artifacts_dir=artifacts_dir,
                    temp_dir=temp_dir,
                    log_path=log_path,
                    secrets=secrets,
                    limits=self._limits(step),
                )
                after = await asyncio.to_thread(workspace_manifest, self._workspace)
            if manifest_hash(after) != before_hash:
                changes = diff_manifests(before, after)
                raise StepFailed(
                    "workspace_mutated",
                    "flight-plan changed the workspace: " + "; ".join(changes[:20]),
                    **_engine_data(run),
                )
            if run.ok:
                break
            assert run.failure is not None
            failures += 1
            if failures >= step.retries.max_attempts:
                raise StepFailed(run.failure.kind.value, run.failure.reason, **_engine_data(run))
            delay = step.retries.delay(failures)
            await self.journal.write(
                model.STEP_RETRY,
                {
                    "step_id": step.id,
                    "state": State.PLAN_RUNNING.value,
                    "attempt": attempt,
                    "error": run.failure.reason,
                    "failure_kind": run.failure.kind.value,
                    "delay_seconds": delay,
                    **_engine_data(run),
                },
            )
            recovered = False
            if delay > 0:
                await asyncio.sleep(delay)
        receipt = dict(run.receipt or {})
        await self.journal.write(
            model.STEP_STATE,
            {
                "step_id": step.id,
                "state": State.PLAN_GENERATED.value,
                "receipt": receipt,
                "engine_warnings": list(receipt.get("warnings", [])),
                "duration_ms": round(run.duration_seconds * 1000, 3),
                **_engine_data(run),
            },
            # Logged with the plan-token: a crash before it redoes the flight-plan, which
            # leaves nothing behind but the content-addressed copies of its artifacts.
            defer=True,
        )
        limits = self.settings.artifact_limits

        def admit() -> tuple[tuple[Artifact, ...], dict[str, Any], tuple[StoredArtifact, ...]]:
            # One thread hop for the three blocking stages.
            artifacts = validate_artifacts(artifacts_dir, receipt, limits, secrets)
            outputs = extract_outputs(receipt, artifacts_dir, artifacts, limits)
            return artifacts, outputs, self.context.artifacts.put(artifacts_dir, artifacts)

        try:
            artifacts, outputs, records = await asyncio.to_thread(admit)
        except ArtifactValidationError as exc:
            raise StepFailed("invalid_artifacts", exc.message, **_engine_data(run)) from None
        except ArtifactIntegrityError as exc:
            raise StepFailed("invalid_artifacts", exc.message, **_engine_data(run)) from None
        await self.journal.write(
            model.ARTIFACT_CREATED,
            {
                "step_id": step.id,
                "state": State.ARTIFACTS_VALIDATED.value,
                "records": [item.to_dict() for item in records],
                "artifacts": [item.descriptor() for item in artifacts],
                "outputs": outputs,
            },
            defer=True,
        )
        with contextlib.suppress(OSError):
            await asyncio.to_thread(remove_tree, artifacts_dir.parent)

    # plan-token -------------------------------------------------------------------------

    def _stored(self, record: StepRecord) -> list[StoredArtifact]:
        return [StoredArtifact.from_dict(item) for item in record.records]

    async def _binding(
        self, step: Step, record: StepRecord, workspace: str, *, check: bool = True
    ) -> PlanBinding:
        """The binding recomputed from the store, ``workspace`` and the governance in force."""
        artifacts, digests = await self._plan_inputs(record, check=check)
        return self._bind(step, record, workspace, artifacts, digests)

    async def _plan_inputs(
        self, record: StepRecord, *, check: bool = True
    ) -> tuple[tuple[Artifact, ...], Digests]:
        # The store reload (a thread) and GetGovernance (a call) do not depend on each other:
        # run them together. Both must succeed; a store error wins, as when they ran in turn.
        # A new token (check=False) may bind the digests last seen: preflight's verdict
        # confirms them or the token is bound again; a check always asks preflight.
        governance = self.context.governance
        return await _together(
            asyncio.to_thread(self.context.artifacts.load, self._stored(record)),
            governance.digests() if check else governance.expected_digests(),
        )

    def _bind(
        self,
        step: Step,
        record: StepRecord,
        workspace: str,
        artifacts: tuple[Artifact, ...],
        digests: Digests,
    ) -> PlanBinding:
        receipt = record.receipt or {}
        return PlanBinding(
            workflow_id=self.workflow_id,
            step_id=step.id,
            engine_id=str(receipt.get("engine_id") or record.engine_id or "unknown"),
            model=_model_of(receipt),
            workspace_hash=workspace,
            artifacts=tuple(item.plan_artifact() for item in artifacts),
            policy_digest=digests.policy_digest or None,
            governance_hash=digests.governance_hash or None,
        )

    async def _create_token(self, step: Step, record: StepRecord) -> None:
        try:
            binding = await self._binding(step, record, record.workspace_hash or "", check=False)
        except ArtifactIntegrityError as exc:
            raise StepFailed("integrity", f"stored artifacts changed: {exc.message}") from None
        await self._write_token(step, binding)

    async def _write_token(self, step: Step, binding: PlanBinding) -> PlanToken:
        token = PlanToken.create(binding, datetime.now(UTC))
        envelope = sign_plan_token(token, self.context.signer).to_dict()
        self._signed[step.id] = token
        await self.journal.write(
            model.PLAN_TOKEN_CREATED,
            {
                "step_id": step.id,
                "state": State.TOKEN_CREATED.value,
                "plan_token": token.token,
                "token": token.to_dict(),
                "key_id": envelope["key_id"],
            },
            plan_token=(token.token, envelope),
        )
        return token

    async def _verified_token(
        self, step: Step, record: StepRecord, *, trust_own: bool = False
    ) -> tuple[PlanToken, list[str]]:
        """The stored plan-token after checking its signature (problems listed, not raised).

        ``trust_own`` accepts the token this runner signed itself, from memory: the check
        before take-off never does, it always reads and verifies what is stored.
        """
        if record.plan_token is None:
            raise StepFailed("integrity", "the step has no plan-token")
        own = self._signed.get(step.id)
        if trust_own and own is not None and own.token == record.plan_token:
            return own, []
        envelope = await self._load_envelope(step.id, record.plan_token)
        if envelope is None:
            raise StepFailed("integrity", "the signed plan-token is missing from the store")
        problems = verify_signed(envelope, self.context.signer.public_key_bytes())
        try:
            token = SignedPlanToken(**envelope).token()
        except (PlanTokenError, TypeError) as exc:
            raise StepFailed("integrity", f"the stored plan-token does not parse: {exc}") from None
        if token.token != record.plan_token:
            problems.append("the stored plan-token is not the one the log recorded")
        return token, [f"signed plan-token: {problem}" for problem in problems]

    async def _load_envelope(self, step_id: str, token: str) -> dict[str, Any] | None:
        found = await self.context.plan_tokens(self.workflow_id, step_id, token)
        return None if found is None else dict(found)

    # preflight --------------------------------------------------------------------------

    def _for_review(self, stored: list[StoredArtifact]) -> list[ArtifactForReview]:
        """What preflight reads of the stored artifacts, loaded and checked again (blocking:
        one thread hop)."""
        artifacts = self.context.artifacts.load(stored)
        inline_left = self.settings.inline_total_bytes
        reviewed = []
        for item in artifacts:
            body: bytes | None = None
            body_path: str | None = None
            if item.body_sha256 is not None:
                size = item.body_size or 0
                if size <= self.settings.inline_body_bytes and size <= inline_left:
                    body = self.context.artifacts.read(item.body_sha256)
                    inline_left -= size
                else:
                    body_path = str(self.context.artifacts.object_path(item.body_sha256))
            raw = self.context.artifacts.read(item.artifact_json_sha256)
            reviewed.append(
                ArtifactForReview(item.descriptor(), dict(item.document), body, body_path, raw)
            )
        return reviewed

    def _evaluation(
        self,
        step: Step,
        mode: str,
        receipt: Mapping[str, Any],
        artifacts: list[ArtifactForReview],
        token: PlanToken | None,
        suffix: str,
    ) -> Evaluation:
        record = self.record
        governance = step.governance
        extra: dict[str, Any] = {"workflow_name": record.name}
        if governance.policy_bundle:
            extra["policy_bundle"] = governance.policy_bundle
        return Evaluation(
            workflow_id=self.workflow_id,
            step_id=step.id,
            mode=mode,
            receipt=receipt,
            artifacts=artifacts,
            plan_token=token.to_protocol() if token is not None else None,
            environment=record.environment,
            labels=dict(record.labels),
            requester=record.requester,
            workspace_root=record.workspace or "",
            repository=record.workspace_source or "",
            extra=extra,
            aggregation=governance.aggregation,
            models=governance.models,
            request_id=f"{self.workflow_id}.{step.id}.{suffix}",
        )

    async def _preflight(self, step: Step, record: StepRecord) -> None:
        token, problems = await self._verified_token(step, record, trust_own=True)
        if problems:
            raise StepFailed(
                "integrity",
                "; ".join(problems),
                integrity_check=integrity_check(token, None, problems),
            )
        if record.state is not State.PRE_FLIGHT_RUNNING:
            # Logged with the verdict: a crash before it asks preflight again.
            await self.journal.write(
                model.STEP_STATE,
                {"step_id": step.id, "state": State.PRE_FLIGHT_RUNNING.value},
                defer=True,
            )
        try:
            reviewed = await asyncio.to_thread(self._for_review, self._stored(record))
        except ArtifactIntegrityError as exc:
            raise StepFailed(
                "integrity",
                exc.message,
                integrity_check=integrity_check(token, None, [exc.message]),
            ) from None
        verdict: Verdict | None = None
        for _ in range(MAX_GOVERNANCE_RETRIES):
            verdict = await self.context.governance.evaluate(
                self._evaluation(
                    step, "flight-plan", record.receipt or {}, reviewed, token, token.token
                )
            )
            same = (verdict.policy_digest or None) == token.binding.policy_digest and (
                verdict.governance_hash or None
            ) == token.binding.governance_hash
            if same or verdict.policy_digest is None:
                break
            # Governance was reloaded between the token and the verdict: bind the new one.
            binding = dataclasses.replace(
                token.binding,
                policy_digest=verdict.policy_digest,
                governance_hash=verdict.governance_hash or None,
            )
            token = await self._write_token(step, binding)
            await self.journal.write(
                model.STEP_STATE,
                {"step_id": step.id, "state": State.PRE_FLIGHT_RUNNING.value},
                defer=True,
            )
        else:
            raise StepFailed("governance_changing", "governance kept changing during preflight")
        assert verdict is not None
        data: dict[str, Any] = {
            "step_id": step.id,
            "state": State.PREFLIGHT_COMPLETE.value,
            "decision": verdict.decision,
            "governance": verdict.to_dict(),
        }
        if verdict.decision == "warn":
            data["warning"] = (
                "; ".join(verdict.warnings or verdict.violations) or "preflight warned"
            )
        # Logged with what the verdict leads to (the approval request, or the integrity
        # check before take-off): a crash before that evaluates again.
        await self.journal.write(model.POLICY_EVALUATED, data, defer=True)

    async def _after_preflight(self, step: Step, record: StepRecord) -> None:
        decision = record.decision or "deny"
        governance = record.governance or {}
        if decision == "deny":
            reasons = list(governance.get("violations", [])) or ["preflight denied the plan"]
            raise StepFailed("denied", "preflight denied: " + "; ".join(str(r) for r in reasons))
        if decision == "require_approval":
            await self._request_approval(step, record)
            return
        if decision not in ("allow", "warn"):
            raise StepFailed("denied", f"unknown decision {decision!r}; failing closed")
        await self._takeoff(step, record)

    # approvals --------------------------------------------------------------------------

    async def _request_approval(self, step: Step, record: StepRecord) -> None:
        assert record.plan_token is not None
        governance = record.governance or {}
        role = (
            step.governance.approval_role
            or str(governance.get("requires_role") or "")
            or "approver"
        )
        reasons = [str(governance.get("requires_reason") or "")] + [
            str(v) for v in governance.get("violations", [])
        ]
        reason = (
            "; ".join(dict.fromkeys(r for r in reasons if r)) or f"step {step.id} needs approval"
        )
        triggered = tuple(
            e for e in governance.get("evaluations", []) if e.get("decision") != "allow"
        )
        summaries = await asyncio.to_thread(self._summaries, record)
        approval_id = await self.context.approvals.create(
            ApprovalRequest(
                request_id=f"{self.workflow_id}.{step.id}.{record.plan_token}",
                workflow_id=self.workflow_id,
                step_id=step.id,
                subject_hash=record.plan_token,
                reason=reason[:2000],
                required_role=role,
                quorum=step.governance.effective_quorum,
                requester=self.record.requester,
                triggered=triggered,
                artifacts=tuple(summaries),
            )
        )
        await self.journal.write(
            model.APPROVAL_REQUESTED,
            {
                "step_id": step.id,
                "state": State.AWAITING_APPROVAL.value,
                "approval_id": approval_id,
                "required_role": role,
                "quorum": step.governance.effective_quorum,
                "subject_hash": record.plan_token,
            },
        )

    def _summaries(self, record: StepRecord) -> list[dict[str, Any]]:
        """What an approver sees of each artifact: hashes and a preview of text bodies."""
        summaries = []
        for stored in self._stored(record):
            document: dict[str, Any] = {}
            with contextlib.suppress(ArtifactIntegrityError, ValueError):
                document = json.loads(self.context.artifacts.read(stored.artifact_json_sha256))
            preview = ""
            if stored.body_sha256 is not None:
                with contextlib.suppress(ArtifactIntegrityError):
                    data = self.context.artifacts.read(stored.body_sha256)
                    with contextlib.suppress(UnicodeDecodeError):
                        preview = data[: PREVIEW_CHARS * 4].decode("utf-8")[:PREVIEW_CHARS]
            elif "body" in document:
                body = document["body"]
                preview = body if isinstance(body, str) else _compact(body)
                preview = preview[:PREVIEW_CHARS]
            summaries.append(
                {
                    "name": stored.name,
                    "role": stored.role.value,
                    "hash": stored.body_sha256 or stored.artifact_json_sha256,
                    "size": stored.body_size
                    if stored.body_size is not None
                    else stored.artifact_json_size,
                    "preview": preview,
                    "target": str(document.get("target", "")),
                    "action": str(document.get("action", "")),
                }
            )
        return summaries

    async def _await_approval(self, step: Step, record: StepRecord) -> None:
        assert record.approval_id is not None
        outcome = await self.context.approvals.wait(record.approval_id)
        if outcome.state in (ApprovalState.APPROVED, ApprovalState.CONSUMED):
            if outcome.subject_hash != record.plan_token:
                raise StepFailed("approval_mismatch", "the approval is bound to another plan-token")
            await self.journal.write(
                model.APPROVAL_RECEIVED,
                {
                    "step_id": step.id,
                    "state": State.APPROVED.value,
                    "approval": outcome.to_dict(),
                },
            )
            return
        raise StepFailed(
            f"approval_{outcome.state.value}",
            f"approval {outcome.approval_id} was {outcome.state.value}"
            + (f": {outcome.reason}" if outcome.reason else ""),
            approval=outcome.to_dict(),
        )

    async def _gate_request(self, step: Step, record: StepRecord) -> None:
        if not step.should_run(self._scope()):
            await self.journal.write(
                model.STEP_SKIPPED,
                {
                    "step_id": step.id,
                    "state": State.COMPLETED.value,
                    "skipped": True,
                    "message": "its when condition is false",
                },
            )
            return
        ancestors = sorted(self.workflow.dag.ancestors(step.id))
        subject = canonical_hash(
            {
                "kind": "approval_gate",
                "workflow_id": self.workflow_id,
                "step_id": step.id,
                "plan_tokens": {a: self.record.steps[a].plan_token for a in ancestors},
            }
        )
        role = step.governance.approval_role or "approver"
        approval_id = await self.context.approvals.create(
            ApprovalRequest(
                request_id=f"{self.workflow_id}.{step.id}.{subject}",
                workflow_id=self.workflow_id,
                step_id=step.id,
                subject_hash=subject,
                reason=step.description or f"workflow {self.record.name}: gate {step.id}",
                required_role=role,
                quorum=step.governance.effective_quorum,
                requester=self.record.requester,
            )
        )
        await self.journal.write(
            model.APPROVAL_REQUESTED,
            {
                "step_id": step.id,
                "state": State.AWAITING_APPROVAL.value,
                "approval_id": approval_id,
                "required_role": role,
                "quorum": step.governance.effective_quorum,
                "subject_hash": subject,
                "plan_token": subject,
            },
        )

    async def _gate_pass(self, step: Step, record: StepRecord) -> None:
        assert record.approval_id is not None and record.plan_token is not None
        await self._consume(step, record)
        await self.journal.write(
            model.STEP_COMPLETED, {"step_id": step.id, "state": State.COMPLETED.value}
        )

    async def _consume(self, step: Step, record: StepRecord) -> str | None:
        if not record.approval_id:
            return None
        assert record.plan_token is not None
        try:
            await self.context.approvals.consume(
                record.approval_id,
                record.plan_token,
                request_id=f"{self.workflow_id}.{step.id}.{record.plan_token}.consume",
            )
        except PeerRefused as exc:
            raise StepFailed("approval_unusable", exc.message) from None
        return record.approval_id

    # take-off ---------------------------------------------------------------------------

    async def _integrity(self, step: Step, record: StepRecord) -> dict[str, Any]:
        """Recompute the plan from the store and the workspace; fail on any difference."""
        # The workspace is hashed (a thread), and the store reloaded and GetGovernance asked
        # (together), while the stored token is read and verified; every check still
        # completes before anything is decided.
        hashing = (
            None
            if step.allow_workspace_drift
            else asyncio.ensure_future(asyncio.to_thread(workspace_hash, self._workspace))
        )
        loading = asyncio.ensure_future(self._plan_inputs(record))
        pending = [task for task in (hashing, loading) if task is not None]
        try:
            token, problems = await self._verified_token(step, record)
            workspace = token.binding.workspace_hash if hashing is None else await hashing
        except BaseException:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        actual: PlanToken | None = None
        extra = list(problems)
        try:
            artifacts, digests = await loading
            actual = PlanToken(
                self._bind(step, record, workspace, artifacts, digests), token.created_at
            )
        except ArtifactIntegrityError as exc:
            extra.append(f"artifact store: {exc.message}")
        check = integrity_check(token, actual, extra)
        if not check["plan_token_match"]:
            raise StepFailed(
                "integrity",
                "plan-token mismatch before take-off: " + "; ".join(check["differences"]),
                integrity_check=check,
            )
        return check

    async def _takeoff(self, step: Step, record: StepRecord) -> None:
        assert step.engine is not None
        secrets = self._secrets(step)
        failures = 0
        attempt = record.takeoff_attempt
        async with self._workspace_lock.exclusive():
            check = await self._integrity(step, record)
            if record.state is not State.READY_FOR_TAKEOFF:
                await self.journal.write(
                    model.STEP_STATE,
                    {
                        "step_id": step.id,
                        "state": State.READY_FOR_TAKEOFF.value,
                        "integrity": check,
                    },
                )
            consumed = await self._consume(step, record)
            try:
                # Fail closed: take-off only once every event so far is durably queued.
                await self.journal.flush_audit()
            except Exception as exc:
                raise StepFailed(
                    "audit_unavailable", f"audit events cannot be recorded: {exc}"
                ) from None
            restored: list[str] = []
            while True:
                attempt += 1
                artifacts_dir, temp_dir, log_path = self._paths(step.id, f"takeoff-{attempt}")
                data: dict[str, Any] = {
                    "step_id": step.id,
                    "state": State.TAKEOFF_RUNNING.value,
                    "takeoff_attempt": attempt,
                }
                if consumed:
                    data["approval_consumed"] = consumed
                await self.journal.write(model.TAKEOFF_STARTED, data, durable=True)
                stored = self._stored(record)
                restored.clear()

                def restore(
                    target: Path, stored: list[StoredArtifact] = stored, into: list[str] = restored
                ) -> None:
                    into.extend(self.context.artifacts.materialise(stored, target))

                engine_input = build_engine_input(
                    mode=Mode.TAKE_OFF,
                    workflow_id=self.workflow_id,
                    step_id=step.id,
                    config=model.thaw(record.config or {}),
                    context=self._engine_context(),
                    run_index=attempt,
                    workspace_hash=record.workspace_hash,
                    expected_plan_token=record.plan_token,
                )
                try:
                    run = await run_engine(
                        step.engine,
                        Mode.TAKE_OFF,
                        engine_input,
                        workspace=self._workspace,
                        artifacts_dir=artifacts_dir,
                        temp_dir=temp_dir,
                        log_path=log_path,
                        secrets=secrets,
                        limits=self._limits(step),
                        restore=restore,
                    )
                except ArtifactIntegrityError as exc:
                    raise StepFailed("integrity", exc.message) from None
                if run.ok:
                    break
                assert run.failure is not None
                failures += 1
                if not step.engine.idempotent_takeoff or failures >= step.retries.max_attempts:
                    raise StepFailed(
                        run.failure.kind.value,
                        f"take-off failed: {run.failure.reason}",
                        **_engine_data(run),
                    )
                await asyncio.sleep(step.retries.delay(failures))
        receipt = dict(run.receipt or {})
        limits = self.settings.artifact_limits

        def admit() -> tuple[tuple[Artifact, ...], tuple[StoredArtifact, ...]]:
            artifacts = validate_artifacts(artifacts_dir, receipt, limits, secrets, restored)
            return artifacts, self.context.artifacts.put(artifacts_dir, artifacts)

        try:
            artifacts, records = await asyncio.to_thread(admit)
        except (ArtifactValidationError, ArtifactIntegrityError) as exc:
            raise StepFailed("invalid_artifacts", f"take-off: {exc.message}") from None
        outputs = model.thaw(record.outputs)
        outputs.update(step_outputs(receipt.get("metrics", []), None))
        await self.journal.write(
            model.STEP_STATE,
            {
                "step_id": step.id,
                "state": State.EXECUTION_COMPLETE.value,
                "takeoff_receipt": receipt,
                "takeoff_records": [item.to_dict() for item in records],
                "artifacts": [item.descriptor() for item in artifacts],
                "outputs": outputs,
                "duration_ms": round(run.duration_seconds * 1000, 3),
                **_engine_data(run),
            },
            # Not a barrier: if a power loss drops it, recovery finds TAKEOFF_RUNNING and
            # waits for an operator, which is safe.
        )
        with contextlib.suppress(OSError):
            await asyncio.to_thread(remove_tree, artifacts_dir.parent)

    async def _interrupted_takeoff(self, step: Step, record: StepRecord) -> None:
        assert step.engine is not None
        if step.engine.idempotent_takeoff:
            # The engine promised that running its take-off again is harmless.
            await self.journal.write(
                model.WORKFLOW_RESUMED,
                {
                    "step_id": step.id,
                    "state": State.READY_FOR_TAKEOFF.value,
                    "retry_takeoff": True,
                    "by": "orchestrator (idempotent take-off)",
                    "message": "take-off re-run after a restart: the engine declared it idempotent",
                },
            )
            return
        await self.journal.write(
            model.TAKEOFF_INTERRUPTED,
            {
                "step_id": step.id,
                "state": State.TAKEOFF_INTERRUPTED.value,
                "error": "take-off was cut off by a restart",
            },
            durable=True,
        )

    async def _post_checks(self, step: Step, record: StepRecord) -> None:
        data: dict[str, Any] = {"step_id": step.id, "state": State.COMPLETED.value}
        if step.post_checks.require_artifacts and not record.takeoff_records:
            raise StepFailed(
                "post_check", "take-off produced no artifacts, and the step requires some"
            )
        if step.post_checks.preflight:
            stored = [StoredArtifact.from_dict(item) for item in record.takeoff_records]
            token, _ = await self._verified_token(step, record, trust_own=True)
            try:
                reviewed = await asyncio.to_thread(self._for_review, stored)
            except ArtifactIntegrityError as exc:
                raise StepFailed("integrity", exc.message) from None
            verdict = await self.context.governance.evaluate(
                self._evaluation(
                    step, "take-off", record.takeoff_receipt or {}, reviewed, token, "post"
                )
            )
            data["post_check"] = verdict.to_dict()
            if verdict.decision == "deny":
                reasons = list(verdict.violations) or ["post-execution checks denied"]
                raise StepFailed(
                    "post_check_denied",
                    "post-execution checks denied: " + "; ".join(reasons),
                    post_check=verdict.to_dict(),
                )
            if verdict.decision != "allow":
                data["warning"] = "post-execution checks: " + (
                    "; ".join(verdict.warnings or verdict.violations) or verdict.decision
                )
        # Logged with the next transition (the end of the workflow, or another step's);
        # a crash before it runs the post-execution checks again.
        await self.journal.write(model.STEP_COMPLETED, data, defer=True)


async def _together(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Await two independent operations concurrently; raise the first one's error first."""
    one, two = asyncio.ensure_future(first), asyncio.ensure_future(second)
    try:
        await asyncio.wait((one, two))
    except BaseException:
        one.cancel()
        two.cancel()
        await asyncio.gather(one, two, return_exceptions=True)
        raise
    errors = [task.exception() for task in (one, two)]  # both retrieved, none left unseen
    for error in errors:
        if error is not None:
            raise error
    return one.result(), two.result()


def _engine_data(run: EngineRun) -> dict[str, Any]:
    receipt = run.receipt or {}
    data: dict[str, Any] = {}
    if isinstance(receipt.get("engine_id"), str):
        data["engine_id"] = receipt["engine_id"]
    if isinstance(receipt.get("receipt_id"), str):
        data["receipt_id"] = receipt["receipt_id"]
    if isinstance(receipt.get("status"), str):
        data["receipt_status"] = receipt["status"]
    if run.stderr_tail:
        data["stderr_tail"] = run.stderr_tail[-2000:]
    return data


def _model_of(receipt: Mapping[str, Any]) -> str:
    diagnostics = receipt.get("diagnostics")
    if isinstance(diagnostics, Mapping) and isinstance(diagnostics.get("model"), str):
        return str(diagnostics["model"]) or "none"
    return "none"


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


__all__ = [
    "BODY_FILE",
    "EngineContext",
    "RunnerStopped",
    "Settings",
    "StepFailed",
    "WorkflowRunner",
    "WorkspaceLock",
]
