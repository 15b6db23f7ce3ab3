"""Protobuf ↔ domain for PreflightService: request checks with field violations, and results.

Everything here is translation and shape-checking; the judging happens in ``pipeline``. A
request whose *shape* is wrong (missing ids, unknown enum values, a descriptor that is not a
descriptor) is ``InvalidRequest`` → INVALID_ARGUMENT with one violation per field. A request
that is well formed but whose *content* fails a check (a body that does not hash to its
descriptor, an unreadable body reference) is judged: its result is ``deny``.
"""

from __future__ import annotations

import math
from typing import Any, Final, Literal

from google.protobuf import struct_pb2

from cabincrew.convert import ConversionError, to_protocol
from cabincrew.decisions import AggregationMethod, Decision
from cabincrew.errors import Violation
from cabincrew.v1 import common_pb2, preflight_pb2
from preflight_svc.governance import Governance
from preflight_svc.onnx_models import ModelStatus, TextScore
from preflight_svc.opa import ALL_DOMAINS, PolicyDomain
from preflight_svc.pipeline import (
    ARTIFACT_NAME,
    MAX_ARTIFACTS,
    ROLES,
    SHA256_HEX,
    Classification,
    ContentRequest,
    InvalidRequest,
    Options,
    StepArtifact,
    StepRequest,
    Verdict,
)
from preflight_svc.policy_input import PolicyContext

MAX_ID: Final = 256
MAX_REQUEST_ID: Final = 128
MAX_CLASSIFY_TEXTS: Final = 10_000

DECISIONS: Final = {
    Decision.ALLOW: common_pb2.DECISION_ALLOW,
    Decision.WARN: common_pb2.DECISION_WARN,
    Decision.REQUIRE_APPROVAL: common_pb2.DECISION_REQUIRE_APPROVAL,
    Decision.DENY: common_pb2.DECISION_DENY,
}
AGGREGATIONS: Final = {
    AggregationMethod.MOST_RESTRICTIVE: common_pb2.AGGREGATION_METHOD_MOST_RESTRICTIVE,
    AggregationMethod.UNANIMOUS: common_pb2.AGGREGATION_METHOD_UNANIMOUS,
    AggregationMethod.MAJORITY: common_pb2.AGGREGATION_METHOD_MAJORITY,
    AggregationMethod.ANY_DENY: common_pb2.AGGREGATION_METHOD_ANY_DENY,
    AggregationMethod.ALL_ALLOW: common_pb2.AGGREGATION_METHOD_ALL_ALLOW,
}
_METHODS: Final = {number: method for method, number in AGGREGATIONS.items()}
_SOURCES: Final = {
    "opa": common_pb2.POLICY_SOURCE_OPA,
    "onnx": common_pb2.POLICY_SOURCE_ONNX,
    "custom": common_pb2.POLICY_SOURCE_CUSTOM,
}
_MODES: Final[dict[int, Literal["flight-plan", "take-off"]]] = {
    common_pb2.MODE_FLIGHT_PLAN: "flight-plan",
    common_pb2.MODE_TAKE_OFF: "take-off",
}
_PHASES: Final[dict[int, Literal["request", "response"]]] = {
    preflight_pb2.CONTENT_PHASE_REQUEST: "request",
    preflight_pb2.CONTENT_PHASE_RESPONSE: "response",
}
_DOMAINS: Final = {
    preflight_pb2.CONTENT_DOMAIN_MCP: PolicyDomain.MCP,
    preflight_pb2.CONTENT_DOMAIN_LLM: PolicyDomain.LLM,
}


class _Checks:
    """Collects field violations; raises them all at once."""

    def __init__(self) -> None:
        self.violations: list[Violation] = []

    def need(self, ok: bool, field: str, description: str) -> bool:
        if not ok:
            self.violations.append(Violation(field, description))
        return ok

    def identifier(self, value: str, field: str, limit: int = MAX_ID) -> None:
        if self.need(bool(value), field, "required"):
            self.need(len(value) <= limit, field, f"at most {limit} characters")

    def raise_if_any(self, what: str) -> None:
        if self.violations:
            raise InvalidRequest(f"invalid {what}", self.violations)


def step_request(message: preflight_pb2.EvaluateRequest) -> StepRequest:
    """Check an EvaluateRequest and turn it into the domain request."""
    checks = _Checks()
    checks.identifier(message.workflow_id, "workflow_id")
    checks.identifier(message.step_id, "step_id")
    checks.need(len(message.request_id) <= MAX_REQUEST_ID, "request_id", "at most 128 characters")
    mode = _MODES.get(message.mode)
    checks.need(mode is not None, "mode", "must be MODE_FLIGHT_PLAN or MODE_TAKE_OFF")
    if checks.need(message.HasField("receipt"), "receipt", "required (the engine's receipt)"):
        checks.need(bool(message.receipt.engine_id), "receipt.engine_id", "required")
        checks.need(
            message.receipt.status in ("success", "failure"),
            "receipt.status",
            "must be success or failure",
        )
    checks.need(
        len(message.artifacts) <= MAX_ARTIFACTS,
        "artifacts",
        f"at most {MAX_ARTIFACTS} artifacts",
    )
    seen: set[str] = set()
    for i, item in enumerate(message.artifacts):
        where = f"artifacts[{i}]"
        if checks.need(item.HasField("descriptor"), f"{where}.descriptor", "required"):
            d = item.descriptor
            if checks.need(
                bool(ARTIFACT_NAME.match(d.name)) and ".." not in d.name,
                f"{where}.descriptor.name",
                "must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ without '..'",
            ):
                checks.need(d.name not in seen, f"{where}.descriptor.name", "duplicate name")
                seen.add(d.name)
            checks.need(d.role in ROLES, f"{where}.descriptor.role", "evidence, state or log")
            checks.need(
                bool(SHA256_HEX.match(d.hash)),
                f"{where}.descriptor.hash",
                "lowercase hex SHA-256",
            )
            checks.need(d.size >= 0, f"{where}.descriptor.size", "must not be negative")
        checks.need(item.HasField("artifact"), f"{where}.artifact", "required (artifact.json)")
        if item.WhichOneof("body_source") == "body_ref":
            checks.need(bool(item.body_ref), f"{where}.body_ref", "must not be empty")
    options = _options(message.options, checks)
    checks.raise_if_any("EvaluateRequest")
    assert mode is not None
    artifacts = []
    for i, item in enumerate(message.artifacts):
        d = item.descriptor
        source = item.WhichOneof("body_source")
        artifacts.append(
            StepArtifact(
                name=d.name,
                role=d.role,
                path=d.path,
                hash=d.hash,
                size=d.size,
                document=_json(item.artifact, f"artifacts[{i}].artifact"),
                body=item.body if source == "body" else None,
                body_ref=item.body_ref if source == "body_ref" else None,
                artifact_json=item.artifact_json or None,
            )
        )
    return StepRequest(
        workflow_id=message.workflow_id,
        step_id=message.step_id,
        mode=mode,
        receipt=_json(message.receipt, "receipt"),
        artifacts=tuple(artifacts),
        context=_context(message.context),
        plan_token=(
            _json(message.plan_token, "plan_token") if message.HasField("plan_token") else None
        ),
        options=options,
        request_id=message.request_id,
    )


def content_request(message: preflight_pb2.EvaluateContentRequest) -> ContentRequest:
    """Check an EvaluateContentRequest and turn it into the domain request."""
    checks = _Checks()
    domain = _DOMAINS.get(message.domain)
    checks.need(domain is not None, "domain", "must be CONTENT_DOMAIN_MCP or CONTENT_DOMAIN_LLM")
    phase = _PHASES.get(message.phase)
    checks.need(phase is not None, "phase", "must be CONTENT_PHASE_REQUEST or _RESPONSE")
    checks.need(len(message.request_id) <= MAX_REQUEST_ID, "request_id", "at most 128 characters")
    options = _options(message.options, checks)
    checks.raise_if_any("EvaluateContentRequest")
    assert domain is not None and phase is not None
    return ContentRequest(
        domain=domain,
        phase=phase,
        payload=struct_to_json(message.payload),
        texts=tuple(message.texts) if message.texts else None,
        context=_context(message.context),
        options=options,
        request_id=message.request_id,
        payload_bytes=message.payload.ByteSize(),
    )


def classify_request(message: preflight_pb2.ClassifyRequest) -> tuple[str, list[str]]:
    """Check a ClassifyRequest."""
    checks = _Checks()
    checks.identifier(message.model, "model", 64)
    checks.need(
        len(message.texts) <= MAX_CLASSIFY_TEXTS,
        "texts",
        f"at most {MAX_CLASSIFY_TEXTS} texts per request",
    )
    checks.raise_if_any("ClassifyRequest")
    return message.model, list(message.texts)


def _options(message: preflight_pb2.GovernanceOptions, checks: _Checks) -> Options:
    method: AggregationMethod | None = None
    number = message.aggregation_method
    if number == common_pb2.AGGREGATION_METHOD_CUSTOM:
        checks.need(False, "options.aggregation_method", "custom aggregation is not supported")
    elif number != common_pb2.AGGREGATION_METHOD_UNSPECIFIED:
        method = _METHODS.get(number)
        checks.need(method is not None, "options.aggregation_method", "unknown method")
    for i, name in enumerate(message.models):
        checks.need(bool(name), f"options.models[{i}]", "must not be empty")
    checks.need(
        not (message.skip_models and message.models),
        "options.skip_models",
        "cannot be set together with options.models",
    )
    models: tuple[str, ...] | None = None
    if message.skip_models:
        models = ()
    elif message.models:
        models = tuple(message.models)
    return Options(aggregation=method, models=models)


def _context(message: preflight_pb2.EvaluationContext) -> PolicyContext:
    return PolicyContext(
        environment=message.environment,
        repository=message.repository,
        labels=dict(message.labels),
        requester=message.requester,
        workspace_root=message.workspace_root,
        extra=struct_to_json(message.extra),
    )


def _json(message: Any, field: str) -> dict[str, Any]:
    try:
        return to_protocol(message)
    except ConversionError as exc:
        raise InvalidRequest(
            f"invalid {field}",
            [Violation(f"{field}.{v.field}".rstrip("."), v.description) for v in exc.violations],
        ) from None


def struct_to_json(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON; integral numbers read back as integers."""
    return {key: _value(struct.fields[key]) for key in sorted(struct.fields)}


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if math.isfinite(number) and number.is_integer() and abs(number) <= 2**53:
            return int(number)
        return number if math.isfinite(number) else None
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_json(value.struct_value)
    if kind == "list_value":
        return [_value(v) for v in value.list_value.values]
    return None


# --- results ----------------------------------------------------------------------------------


def result_message(verdict: Verdict) -> common_pb2.GovernanceResult:
    """A verdict as the wire's GovernanceResult."""
    result = common_pb2.GovernanceResult(
        decision=DECISIONS[verdict.decision],
        aggregation_method=AGGREGATIONS[verdict.aggregation],
        violations=list(verdict.violations),
        warnings=list(verdict.warnings),
        policy_digest=verdict.policy_digest,
        governance_hash=verdict.governance_hash,
        evaluation_id=verdict.evaluation_id,
    )
    for evaluation in verdict.evaluations:
        item = result.evaluations.add(
            source=_SOURCES[evaluation.source.value],
            policy_id=evaluation.policy_id,
            decision=DECISIONS[evaluation.decision],
            severity=evaluation.severity,
            reason=evaluation.reason,
        )
        item.evidence.update(dict(evaluation.evidence))
        item.evaluated_at.FromJsonString(evaluation.evaluated_at)
    if verdict.requires is not None:
        result.requires.role = verdict.requires.role
        result.requires.reason = verdict.requires.reason
    return result


def classify_message(result: Classification) -> preflight_pb2.ClassifyResponse:
    """Scores as the wire's ClassifyResponse."""
    return preflight_pb2.ClassifyResponse(
        model=result.model,
        model_version=result.version,
        execution_provider=result.provider,
        results=[_score(s) for s in result.scores],
    )


def _score(score: TextScore) -> preflight_pb2.TextScore:
    return preflight_pb2.TextScore(
        index=score.index, scores=dict(score.scores), decision=DECISIONS[score.decision]
    )


def governance_message(governance: Governance) -> preflight_pb2.GetGovernanceResponse:
    """What GetGovernance answers."""
    provider = governance.registry.provider.name
    response = preflight_pb2.GetGovernanceResponse(
        policy_digest=governance.policy_digest,
        governance_hash=governance.governance_hash,
        execution_provider=provider,
        default_aggregation_method=AGGREGATIONS[governance.settings.aggregation],
        serving=governance.serving,
        policy_error=governance.policy_error or "",
    )
    for f in governance.policy_files:
        response.policies.add(path=f.path, sha256=f.sha256, packages=f.packages, bundle=f.bundle)
    for m in governance.models:
        response.models.add(
            name=m.name,
            version=m.version,
            task=m.task,
            sha256=m.sha256,
            labels=list(m.labels),
            execution_provider=m.provider,
            healthy=m.status is ModelStatus.SERVING,
            error=m.error or "",
            input_kind=m.input_kind,
            manifest_digest=m.manifest_digest,
            path=m.path,
        )
    for domain in ALL_DOMAINS:
        response.domain_models.add(
            domain=domain.value, models=list(governance.domain_models.get(domain, ()))
        )
    response.loaded_at.FromDatetime(governance.loaded_at)
    return response


def decision_name(number: int) -> str:
    """The protocol word for a wire decision."""
    for decision, value in DECISIONS.items():
        if value == number:
            return decision.value
    return "unspecified"
