"""The audit events each write-ahead log entry yields: a pure function of the entry.

Because events derive from the log, with ids derived from the entry's position
(``orch-<workflow>-<position>[.<n>]``), the audit trail can always be completed from the log
after a crash: recovery re-derives the events of entries that may not have reached the audit
outbox and emits those the audit service does not have yet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator_svc import model
from orchestrator_svc.model import Entry, State

COMPONENT = "orchestrator"


@dataclass(frozen=True)
class AuditSpec:
    """One audit event to emit, in the protocol's JSON parts (see ``AuditEmitter.emit``)."""

    event_id: str
    event_type: str
    workflow_state: str
    severity: str = "info"
    message: str = ""
    parts: Mapping[str, Any] = field(default_factory=dict)


def event_id(workflow_id: str, position: int, index: int = 0) -> str:
    """The deterministic id of the ``index``-th event of a log entry."""
    base = f"orch-{workflow_id}-{position}"
    return base if index == 0 else f"{base}.{index}"


_STEP_EVENT = {
    model.STEP_STARTED: "orchestrator.engine_started",
    model.STEP_RETRY: "orchestrator.engine_retry",
    model.ARTIFACT_CREATED: "orchestrator.artifacts_validated",
    model.PLAN_TOKEN_CREATED: "orchestrator.plan_token_created",
    model.POLICY_EVALUATED: "orchestrator.policy_evaluated",
    model.APPROVAL_REQUESTED: "orchestrator.approval_requested",
    model.APPROVAL_RECEIVED: "orchestrator.approval_received",
    model.TAKEOFF_STARTED: "orchestrator.takeoff_started",
    model.TAKEOFF_INTERRUPTED: "orchestrator.takeoff_interrupted",
    model.STEP_COMPLETED: "orchestrator.step_completed",
    model.STEP_SKIPPED: "orchestrator.step_skipped",
    model.STEP_FAILED: "orchestrator.step_failed",
    model.STEP_CANCELLED: "orchestrator.step_cancelled",
    model.WORKFLOW_RESUMED: "orchestrator.workflow_resumed",
}

_STATE_EVENT = {
    State.PLAN_GENERATED: "orchestrator.engine_completed",
    State.PRE_FLIGHT_RUNNING: "orchestrator.preflight_started",
    State.READY_FOR_TAKEOFF: "orchestrator.plan_token_verified",
    State.EXECUTION_COMPLETE: "orchestrator.takeoff_completed",
}

_WORKFLOW_EVENT = {
    model.WORKFLOW_STARTED: "orchestrator.workflow_submitted",
    model.WORKSPACE_CREATED: "orchestrator.workspace_created",
    model.WORKFLOW_RELEASED: "orchestrator.workflow_released",
    model.WORKFLOW_COMPLETED: "orchestrator.workflow_completed",
    model.WORKFLOW_FAILED: "orchestrator.workflow_failed",
    model.WORKFLOW_CANCELLED: "orchestrator.workflow_cancelled",
}


def events_for(entry: Entry, workflow_state: str) -> list[AuditSpec]:
    """The events of one entry; ``workflow_state`` is the workflow's state after it."""
    data = entry.data
    step_id = entry.step_id
    state = entry.state
    state_text = state.value if state is not None else workflow_state
    workflow: dict[str, Any] = {"workflow_id": entry.workflow_id}
    if step_id:
        workflow["step_id"] = step_id
        mode = _mode(entry)
        if mode:
            workflow["mode"] = mode
    specs: list[AuditSpec] = []

    def add(event_type: str, severity: str = "info", message: str = "", **parts: Any) -> None:
        specs.append(
            AuditSpec(
                event_id(entry.workflow_id, entry.position, len(specs)),
                event_type,
                state_text,
                severity,
                message,
                {"workflow": workflow, **{k: v for k, v in parts.items() if v is not None}},
            )
        )

    kind = entry.entry_type
    if kind in _WORKFLOW_EVENT:
        severity = {
            model.WORKFLOW_FAILED: "error",
            model.WORKFLOW_CANCELLED: "warning",
        }.get(kind, "info")
        add(_WORKFLOW_EVENT[kind], severity, _workflow_message(kind, data))
        return specs
    event_type = _STEP_EVENT.get(kind) or (_STATE_EVENT.get(state) if state else None)
    if event_type is None:
        event_type = "orchestrator.step_state_changed"
    engine = _engine(data)
    if kind == model.STEP_STARTED:
        attempt = data.get("attempt", 1)
        note = " (redone after a restart)" if data.get("recovered") else ""
        add(event_type, "info", f"flight-plan attempt {attempt} of step {step_id}{note}")
    elif kind == model.STEP_RETRY:
        add(
            event_type,
            "warning",
            f"flight-plan attempt {data.get('attempt')} failed ({data.get('failure_kind')}): "
            f"{data.get('error', '')}; retrying in {data.get('delay_seconds', 0)} s",
            engine=engine,
        )
        if data.get("failure_kind") == "timed_out":
            add("orchestrator.engine_timed_out", "error", str(data.get("error", "")), engine=engine)
    elif state is State.PLAN_GENERATED:
        add(event_type, "info", f"flight-plan of step {step_id} produced a receipt", engine=engine)
    elif kind == model.ARTIFACT_CREATED:
        add(event_type, "info", "", artifacts=list(data.get("artifacts", [])) or None)
    elif kind == model.PLAN_TOKEN_CREATED:
        token = data.get("token", {})
        add(event_type, "info", "", plan_token=token.get("plan_token"))
    elif kind == model.POLICY_EVALUATED:
        governance = data.get("governance", {})
        decision = data.get("decision", "deny")
        severity = {"deny": "error", "warn": "warning", "require_approval": "warning"}.get(
            decision, "info"
        )
        add(
            event_type,
            severity,
            f"preflight decided {decision}",
            policy=_policy(governance, state_text),
        )
        if decision == "warn":
            warnings = governance.get("warnings") or governance.get("violations") or []
            add(
                "orchestrator.preflight_warning",
                "warning",
                "; ".join(str(w) for w in warnings) or "preflight warned",
            )
    elif kind == model.APPROVAL_REQUESTED:
        add(
            event_type,
            "info",
            f"approval {data.get('approval_id')} requested from role "
            f"{data.get('required_role')} for plan-token {data.get('subject_hash', '')}",
        )
    elif kind == model.APPROVAL_RECEIVED:
        approval = data.get("approval")
        add(event_type, "info", "", approval=_audit_approval(approval))
    elif state is State.READY_FOR_TAKEOFF and kind == model.STEP_STATE:
        add(event_type, "info", "", integrity_check=data.get("integrity"))
    elif kind == model.TAKEOFF_STARTED:
        message = f"take-off attempt {data.get('takeoff_attempt', 1)} of step {step_id}"
        if data.get("approval_consumed"):
            message += f" (approval {data['approval_consumed']} consumed)"
        add(event_type, "info", message)
    elif state is State.EXECUTION_COMPLETE:
        add(
            event_type,
            "info",
            "",
            engine=engine,
            artifacts=list(data.get("artifacts", [])) or None,
        )
    elif kind == model.STEP_FAILED:
        add(event_type, "error", str(data.get("error", "")), engine=engine)
        if data.get("integrity_check") is not None:
            add(
                "orchestrator.integrity_failed",
                "critical",
                "the plan no longer matches its plan-token; take-off refused",
                integrity_check=data["integrity_check"],
            )
        if data.get("failure_kind") == "timed_out":
            add("orchestrator.engine_timed_out", "error", str(data.get("error", "")), engine=engine)
        if data.get("post_check") is not None:
            add(
                "orchestrator.post_check_evaluated",
                "error",
                "",
                policy=_policy(data["post_check"], state_text),
            )
    elif kind == model.STEP_COMPLETED:
        add(event_type, "info", "")
        if data.get("post_check") is not None:
            decision = data["post_check"].get("decision", "allow")
            add(
                "orchestrator.post_check_evaluated",
                "warning" if decision != "allow" else "info",
                f"post-execution checks decided {decision}",
                policy=_policy(data["post_check"], state_text),
            )
    elif kind == model.TAKEOFF_INTERRUPTED:
        add(
            event_type,
            "warning",
            "take-off was cut off by a restart; it is not re-run without an operator "
            "(cabincrew workflows resume ID --retry-takeoff, or cancel)",
        )
    else:
        add(event_type, "info", str(data.get("message", "")))
    return specs


def _mode(entry: Entry) -> str:
    state = entry.state
    if state is None:
        return ""
    if state in (State.PLAN_RUNNING, State.PLAN_GENERATED, State.ARTIFACTS_VALIDATED):
        return "flight-plan"
    if state in (State.TAKEOFF_RUNNING, State.EXECUTION_COMPLETE, State.TAKEOFF_INTERRUPTED):
        return "take-off"
    return ""


def _engine(data: Mapping[str, Any]) -> dict[str, Any] | None:
    engine = {
        key: data[name]
        for key, name in (
            ("engine_id", "engine_id"),
            ("receipt_id", "receipt_id"),
            ("status", "receipt_status"),
        )
        if isinstance(data.get(name), str) and data[name]
    }
    if data.get("failure_kind") and data.get("error"):
        engine["error"] = str(data["error"])
        engine.setdefault("status", "failure")
    return engine or None


def _policy(governance: Mapping[str, Any], state: str) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "decision": governance.get("decision", "deny"),
        "workflow_state": state,
        "policy_evaluations": list(governance.get("evaluations", [])),
        "violations": list(governance.get("violations", [])),
        "warnings": list(governance.get("warnings", [])),
    }
    if governance.get("aggregation_method"):
        policy["aggregation_method"] = governance["aggregation_method"]
    return policy


def _audit_approval(approval: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not approval:
        return None
    result = {
        "approval_id": approval["approval_id"],
        "required_role": approval.get("required_role", ""),
        "approved": bool(approval.get("approved")),
        "approver": ", ".join(approval.get("approvers", [])) or "unknown",
        "plan_token_hash": approval.get("subject_hash", ""),
        "timestamp": approval["decided_at"],
    }
    if approval.get("reason"):
        result["reason"] = approval["reason"]
    return result


def _workflow_message(kind: str, data: Mapping[str, Any]) -> str:
    if kind == model.WORKFLOW_STARTED:
        return f"workflow {data.get('name')} submitted by {data.get('requester') or 'unknown'}"
    if kind == model.WORKSPACE_CREATED:
        return f"workspace {data.get('kind')} at {data.get('path')}"
    if kind in (model.WORKFLOW_FAILED, model.WORKFLOW_CANCELLED):
        return str(data.get("error", ""))
    return ""


def describe(specs: Sequence[AuditSpec]) -> list[str]:
    """Event types, for logs and tests."""
    return [spec.event_type for spec in specs]


__all__ = ["COMPONENT", "AuditSpec", "describe", "event_id", "events_for"]
