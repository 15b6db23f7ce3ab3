"""The orchestrator's state: workflow and step records, and the reducer that replays the WAL.

Everything here is pure: a ``WorkflowRecord`` is rebuilt by folding ``apply`` over the
write-ahead log entries of one workflow, in order. The materialised rows in the database are
this fold's result, kept for fast reads; recovery folds the log again and checks both agree.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from orchestrator_svc.dag import StepState


class State(enum.Enum):
    """The protocol's workflow states, plus CANCELLED and TAKEOFF_INTERRUPTED (ours)."""

    INIT = "INIT"
    PLAN_RUNNING = "PLAN_RUNNING"
    PLAN_GENERATED = "PLAN_GENERATED"
    ARTIFACTS_VALIDATED = "ARTIFACTS_VALIDATED"
    TOKEN_CREATED = "TOKEN_CREATED"
    PRE_FLIGHT_RUNNING = "PRE_FLIGHT_RUNNING"
    PREFLIGHT_COMPLETE = "PREFLIGHT_COMPLETE"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    APPROVED = "APPROVED"
    READY_FOR_TAKEOFF = "READY_FOR_TAKEOFF"
    TAKEOFF_RUNNING = "TAKEOFF_RUNNING"
    EXECUTION_COMPLETE = "EXECUTION_COMPLETE"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TAKEOFF_INTERRUPTED = "TAKEOFF_INTERRUPTED"

    @property
    def terminal(self) -> bool:
        """Whether nothing changes this state any more."""
        return self in (State.COMPLETED, State.FAILED, State.CANCELLED)


# Entry types of the write-ahead log. Names the protocol defines (WALEntryType) are used
# where they fit; the rest are ours (see docs/orchestrator.md).
WORKFLOW_STARTED = "workflow_started"
WORKSPACE_CREATED = "workspace_created"
WORKFLOW_RELEASED = "workflow_released"
STEP_STARTED = "step_started"
STEP_STATE = "step_state"
STEP_RETRY = "step_retry"
ARTIFACT_CREATED = "artifact_created"
PLAN_TOKEN_CREATED = "plan_token_created"
POLICY_EVALUATED = "policy_evaluated"
APPROVAL_REQUESTED = "approval_requested"
APPROVAL_RECEIVED = "approval_received"
TAKEOFF_STARTED = "takeoff_started"
TAKEOFF_INTERRUPTED = "takeoff_interrupted"
STEP_COMPLETED = "step_completed"
STEP_SKIPPED = "step_skipped"
STEP_FAILED = "step_failed"
STEP_CANCELLED = "step_cancelled"
WORKFLOW_RESUMED = "workflow_resumed"
WORKFLOW_COMPLETED = "workflow_completed"
WORKFLOW_FAILED = "workflow_failed"
WORKFLOW_CANCELLED = "workflow_cancelled"

# Step fields an entry may set (anything else in its data is kept in the log only).
_STEP_FIELDS = frozenset(
    {
        "attempt",
        "takeoff_attempt",
        "decision",
        "plan_token",
        "approval_id",
        "error",
        "failure_kind",
        "outputs",
        "records",
        "takeoff_records",
        "workspace_hash",
        "engine_id",
        "receipt_id",
        "governance",
        "approval",
        "config",
        "warnings",
        "skipped",
        "receipt",
        "takeoff_receipt",
        "required_role",
    }
)


@dataclass(frozen=True)
class StepRecord:
    """One step of a workflow as the log says it stands."""

    step_id: str
    kind: str  # engine | approval
    state: State = State.INIT
    attempt: int = 0
    takeoff_attempt: int = 0
    decision: str | None = None
    plan_token: str | None = None
    approval_id: str | None = None
    required_role: str | None = None
    error: str | None = None
    failure_kind: str | None = None
    outputs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    records: tuple[Mapping[str, Any], ...] = ()
    takeoff_records: tuple[Mapping[str, Any], ...] = ()
    workspace_hash: str | None = None
    engine_id: str | None = None
    receipt_id: str | None = None
    governance: Mapping[str, Any] | None = None
    approval: Mapping[str, Any] | None = None
    config: Mapping[str, Any] | None = None
    receipt: Mapping[str, Any] | None = None
    takeoff_receipt: Mapping[str, Any] | None = None
    warnings: tuple[str, ...] = ()
    skipped: bool = False
    started_us: int | None = None
    finished_us: int | None = None
    updated_us: int = 0

    @property
    def dag_state(self) -> StepState:
        """How the scheduler sees this step."""
        if self.state is State.COMPLETED:
            return StepState.SKIPPED if self.skipped else StepState.SUCCEEDED
        if self.state is State.FAILED:
            return StepState.FAILED
        if self.state is State.CANCELLED:
            return StepState.CANCELLED
        if self.state is State.INIT:
            return StepState.PENDING
        if self.state in (State.AWAITING_APPROVAL, State.TAKEOFF_INTERRUPTED):
            return StepState.WAITING
        return StepState.RUNNING

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the materialised step row."""
        data: dict[str, Any] = {
            "step_id": self.step_id,
            "kind": self.kind,
            "state": self.state.value,
            "attempt": self.attempt,
            "takeoff_attempt": self.takeoff_attempt,
            "outputs": _thaw(self.outputs),
            "records": [_thaw(r) for r in self.records],
            "takeoff_records": [_thaw(r) for r in self.takeoff_records],
            "warnings": list(self.warnings),
            "skipped": self.skipped,
            "updated_us": self.updated_us,
        }
        for name in (
            "decision",
            "plan_token",
            "approval_id",
            "required_role",
            "error",
            "failure_kind",
            "workspace_hash",
            "engine_id",
            "receipt_id",
            "started_us",
            "finished_us",
        ):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        for name in ("governance", "approval", "config", "receipt", "takeoff_receipt"):
            value = getattr(self, name)
            if value is not None:
                data[name] = _thaw(value)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepRecord:
        """Inverse of ``to_dict``."""
        values = dict(data)
        values["state"] = State(values["state"])
        values["outputs"] = MappingProxyType(dict(values.get("outputs", {})))
        values["records"] = tuple(values.get("records", ()))
        values["takeoff_records"] = tuple(values.get("takeoff_records", ()))
        values["warnings"] = tuple(values.get("warnings", ()))
        return cls(**values)


@dataclass(frozen=True)
class Definition:
    """A workflow definition as submitted, enough to parse it again after a restart."""

    text: str | None
    document: Mapping[str, Any] | None
    filename: str
    base_dir: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "text": self.text,
            "document": _thaw(self.document) if self.document is not None else None,
            "filename": self.filename,
            "base_dir": self.base_dir,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Definition:
        """Inverse of ``to_dict``."""
        return cls(data.get("text"), data.get("document"), data["filename"], data.get("base_dir"))


@dataclass(frozen=True)
class WorkflowRecord:
    """A workflow as the log says it stands."""

    workflow_id: str
    name: str
    definition: Definition
    digest: str
    steps: Mapping[str, StepRecord]
    created_us: int
    updated_us: int
    requester: str = ""
    inputs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    environment: str = ""
    workspace_source: str | None = None
    workspace: str | None = None
    workspace_kind: str | None = None
    workspace_commit: str | None = None
    batch_id: str = ""
    held: bool = False
    finished: State | None = None  # COMPLETED, FAILED or CANCELLED once the workflow ended
    error: str = ""
    last_state: State = State.INIT  # the state of the latest step transition
    position: int = 0  # WAL entries applied

    @property
    def state(self) -> State:
        """The workflow's state, derived from its steps (see docs/orchestrator.md)."""
        if self.finished is not None:
            return self.finished
        states = [step.state for step in self.steps.values()]
        if State.TAKEOFF_INTERRUPTED in states:
            return State.TAKEOFF_INTERRUPTED
        if State.AWAITING_APPROVAL in states:
            return State.AWAITING_APPROVAL
        active = [
            step
            for step in self.steps.values()
            if step.state is not State.INIT and not step.state.terminal
        ]
        if active:
            # Parallel steps: the one that moved last speaks for the workflow.
            return max(active, key=lambda step: step.updated_us).state
        # Between steps (or about to end): nothing is running right now.
        return State.INIT

    @property
    def terminal(self) -> bool:
        """Whether the workflow ended."""
        return self.finished is not None

    def step(self, step_id: str) -> StepRecord:
        """One step; ``KeyError`` if unknown."""
        return self.steps[step_id]

    def summary_dict(self) -> dict[str, Any]:
        """JSON form of the workflow-level fields (steps are stored as their own rows)."""
        return {
            "workflow_id": self.workflow_id,
            "name": self.name,
            "definition": self.definition.to_dict(),
            "digest": self.digest,
            "step_ids": list(self.steps),
            "created_us": self.created_us,
            "updated_us": self.updated_us,
            "requester": self.requester,
            "inputs": _thaw(self.inputs),
            "labels": dict(self.labels),
            "environment": self.environment,
            "workspace_source": self.workspace_source,
            "workspace": self.workspace,
            "workspace_kind": self.workspace_kind,
            "workspace_commit": self.workspace_commit,
            "batch_id": self.batch_id,
            "held": self.held,
            "finished": self.finished.value if self.finished else None,
            "error": self.error,
            "last_state": self.last_state.value,
            "position": self.position,
        }

    @classmethod
    def from_dicts(
        cls, summary: Mapping[str, Any], steps: Iterable[Mapping[str, Any]]
    ) -> WorkflowRecord:
        """Rebuild from ``summary_dict`` and the steps' ``to_dict`` forms."""
        by_id = {data["step_id"]: StepRecord.from_dict(data) for data in steps}
        ordered = {step_id: by_id[step_id] for step_id in summary["step_ids"]}
        return cls(
            workflow_id=summary["workflow_id"],
            name=summary["name"],
            definition=Definition.from_dict(summary["definition"]),
            digest=summary["digest"],
            steps=MappingProxyType(ordered),
            created_us=summary["created_us"],
            updated_us=summary["updated_us"],
            requester=summary.get("requester", ""),
            inputs=MappingProxyType(dict(summary.get("inputs", {}))),
            labels=MappingProxyType(dict(summary.get("labels", {}))),
            environment=summary.get("environment", ""),
            workspace_source=summary.get("workspace_source"),
            workspace=summary.get("workspace"),
            workspace_kind=summary.get("workspace_kind"),
            workspace_commit=summary.get("workspace_commit"),
            batch_id=summary.get("batch_id", ""),
            held=bool(summary.get("held", False)),
            finished=State(summary["finished"]) if summary.get("finished") else None,
            error=summary.get("error", ""),
            last_state=State(summary.get("last_state", "INIT")),
            position=int(summary.get("position", 0)),
        )


@dataclass(frozen=True)
class Entry:
    """One write-ahead log entry as the domain sees it (position within its workflow)."""

    workflow_id: str
    position: int
    timestamp_us: int
    entry_type: str
    data: Mapping[str, Any]
    sequence: int = 0  # global order, assigned by the database
    checksum: str = ""

    @property
    def step_id(self) -> str:
        """The step the entry is about, or an empty string."""
        value = self.data.get("step_id", "")
        return value if isinstance(value, str) else ""

    @property
    def state(self) -> State | None:
        """The state the entry moves its step (or the workflow) to, when it names one."""
        value = self.data.get("state")
        return State(value) if isinstance(value, str) else None


class ReplayError(ValueError):
    """The log cannot be applied (an entry out of place): the workflow must halt."""


def new_record(entry: Entry) -> WorkflowRecord:
    """The record a ``workflow_started`` entry creates."""
    if entry.entry_type != WORKFLOW_STARTED or entry.position != 1:
        raise ReplayError("a workflow's log must start with workflow_started")
    data = entry.data
    steps = {
        item["step_id"]: StepRecord(item["step_id"], item["kind"], updated_us=entry.timestamp_us)
        for item in data["steps"]
    }
    return WorkflowRecord(
        workflow_id=entry.workflow_id,
        name=data["name"],
        definition=Definition.from_dict(data["definition"]),
        digest=data["digest"],
        steps=MappingProxyType(steps),
        created_us=entry.timestamp_us,
        updated_us=entry.timestamp_us,
        requester=data.get("requester", ""),
        inputs=MappingProxyType(dict(data.get("inputs", {}))),
        labels=MappingProxyType(dict(data.get("labels", {}))),
        environment=data.get("environment", ""),
        workspace_source=data.get("workspace_source"),
        batch_id=data.get("batch_id", ""),
        held=bool(data.get("held", False)),
        position=1,
    )


def apply(record: WorkflowRecord | None, entry: Entry) -> WorkflowRecord:
    """Fold one entry into the record (the only way a record changes)."""
    if record is None:
        return new_record(entry)
    if entry.position != record.position + 1:
        raise ReplayError(
            f"entry {entry.position} of workflow {entry.workflow_id} follows {record.position}"
        )
    if record.terminal and entry.entry_type not in (WORKFLOW_RELEASED,):
        raise ReplayError(f"entry {entry.position} follows the end of the workflow")
    changes: dict[str, Any] = {"position": entry.position, "updated_us": entry.timestamp_us}
    data = entry.data
    kind = entry.entry_type
    if kind == WORKSPACE_CREATED:
        changes.update(
            workspace=data["path"],
            workspace_kind=data["kind"],
            workspace_commit=data.get("commit"),
        )
    elif kind == WORKFLOW_RELEASED:
        changes["held"] = False
    elif kind in (WORKFLOW_COMPLETED, WORKFLOW_FAILED, WORKFLOW_CANCELLED):
        changes["finished"] = State(data["state"])
        changes["error"] = data.get("error", "")
        if "steps" in data:
            # Ending a workflow also ends its open steps (cancelled), in the same entry.
            steps = dict(record.steps)
            for step_id, state in data["steps"].items():
                steps[step_id] = dataclasses.replace(
                    steps[step_id],
                    state=State(state),
                    finished_us=entry.timestamp_us,
                    updated_us=entry.timestamp_us,
                    error=data.get("error") or steps[step_id].error,
                )
            changes["steps"] = MappingProxyType(steps)
    elif entry.step_id:
        if entry.step_id not in record.steps:
            raise ReplayError(f"entry {entry.position} names unknown step {entry.step_id!r}")
        state = entry.state
        if state is None:
            raise ReplayError(f"entry {entry.position} moves step {entry.step_id!r} nowhere")
        step = record.steps[entry.step_id]
        step_changes: dict[str, Any] = {
            key: _freeze(value) for key, value in data.items() if key in _STEP_FIELDS
        }
        if "warning" in data:
            step_changes["warnings"] = (*step.warnings, str(data["warning"]))
        step_changes["state"] = state
        step_changes["updated_us"] = entry.timestamp_us
        if step.started_us is None and state is not State.INIT:
            step_changes["started_us"] = entry.timestamp_us
        if state.terminal:
            step_changes["finished_us"] = entry.timestamp_us
        if kind == WORKFLOW_RESUMED:
            step_changes["error"] = None
        steps = dict(record.steps)
        steps[entry.step_id] = dataclasses.replace(step, **step_changes)
        changes["steps"] = MappingProxyType(steps)
        changes["last_state"] = state
    else:
        raise ReplayError(f"entry {entry.position} has an unknown type {kind!r}")
    return dataclasses.replace(record, **changes)


def replay(entries: Iterable[Entry]) -> WorkflowRecord:
    """Fold a whole log."""
    record: WorkflowRecord | None = None
    for entry in entries:
        record = apply(record, entry)
    if record is None:
        raise ReplayError("an empty log")
    return record


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_thaw(item) for item in value]
    return value


thaw = _thaw

__all__ = [
    "Definition",
    "Entry",
    "ReplayError",
    "State",
    "StepRecord",
    "WorkflowRecord",
    "apply",
    "new_record",
    "replay",
    "thaw",
]
