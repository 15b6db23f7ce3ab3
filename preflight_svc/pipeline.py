"""The preflight pipeline: artifact validation → secret scan → OPA → ONNX → aggregation.

Pure domain code: plain values in, a ``Verdict`` out; no gRPC. ``Preflight`` runs it against
the governance in force (leased for the whole request, so a reload never changes the rules
half-way), records an audit event per evaluation, and serves ``Classify`` and ``Reload``.

Checks that are not votes. Artifact validation, plan-token binding and size limits are
*gates*: they add an evaluation (source ``custom``, policy id ``builtin.*``) only when they
fail. A failed gate, a policy that errors, a model that is unavailable or fails, and a
missing policy set are *failures*: each is a ``deny`` evaluation, and a failure makes the
final decision ``deny`` whatever the aggregation method says (a majority of allows does not
outvote "we could not check"). An ordinary ``deny`` from a policy or a model is a vote like
any other and combines by the method, as the protocol defines it.

Determinism: for the same request and the same governance the evaluations come out in the
same order (gates, then policies in bundle and package order, then models by name) with the
same content; only ``evaluated_at`` and ``evaluation_id`` differ.

Secrets: bodies are scanned with ``cabincrew.redaction``; the findings (rule, artifact,
line) go to the policies, never the matched text. Reasons and evidence are redacted before
they leave the pipeline, whatever a policy puts in them.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from cabincrew.canonical import canonical_hash, canonical_json, sha256_hex
from cabincrew.convert import validate_protocol
from cabincrew.decisions import AggregationMethod, Decision, EmptyDecisionSet, aggregate
from cabincrew.errors import Violation
from cabincrew.plantoken import PlanArtifact, PlanTokenError
from cabincrew.redaction import find_secrets, redact_json, redact_text
from preflight_svc.errors import PolicyInputError, PreflightError
from preflight_svc.governance import (
    Governance,
    GovernanceHolder,
    GovernanceLoadError,
    accept_reload,
)
from preflight_svc.onnx_errors import (
    BatcherClosed,
    ModelError,
    ModelInferenceError,
    ModelOverloaded,
    ModelUnavailable,
    UnknownModel,
)
from preflight_svc.onnx_models import TextScore
from preflight_svc.opa import PolicyDomain, PolicyResult
from preflight_svc.policy_input import (
    ArtifactInput,
    PolicyContext,
    SecretFinding,
    build_content_input,
    build_preflight_input,
    extract_texts,
    validate_policy_input,
)

log = logging.getLogger("cabincrew.preflight")

DEFAULT_ROLE: Final = "approver"
ROLES: Final = frozenset({"evidence", "state", "log"})
ARTIFACT_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_HEX: Final = re.compile(r"^[0-9a-f]{64}$")
BODY_FILE: Final = "body.data"
MAX_ARTIFACTS: Final = 256
MAX_FINDINGS_PER_ARTIFACT: Final = 50
MAX_FLAGGED: Final = 16
# Evidence of one evaluation larger than this is replaced by its digest in audit events.
MAX_AUDIT_EVIDENCE_BYTES: Final = 8 * 1024
MAX_AUDIT_REASONS: Final = 100

GATE_ARTIFACTS: Final = "builtin.artifact_validation"
GATE_PLAN_TOKEN: Final = "builtin.plan_token"
GATE_CONTENT: Final = "builtin.content_limits"


class Source(enum.Enum):
    """Where an evaluation came from; values are the protocol's wire strings."""

    OPA = "opa"
    ONNX = "onnx"
    CUSTOM = "custom"


class InvalidRequest(PreflightError):
    """A request that does not make sense; nothing was judged."""

    def __init__(self, message: str, violations: Sequence[Violation]) -> None:
        super().__init__(message)
        self.message = message
        self.violations = tuple(violations)

    def remedy(self) -> str:
        """Point at the field list."""
        return "Correct the listed fields of the request; docs/preflight.md describes them."


def invalid(field_name: str, description: str) -> InvalidRequest:
    """One-violation ``InvalidRequest``."""
    return InvalidRequest(f"{field_name}: {description}", [Violation(field_name, description)])


# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """Per-request governance choices."""

    aggregation: AggregationMethod | None = None
    # None: the domain's default models; (): no model at all.
    models: tuple[str, ...] | None = None


@dataclass(frozen=True)
class StepArtifact:
    """One artifact of a step as received: descriptor, artifact.json, body."""

    name: str
    role: str
    path: str
    hash: str
    size: int
    document: Mapping[str, Any]
    body: bytes | None = None
    body_ref: str | None = None
    artifact_json: bytes | None = None

    def __post_init__(self) -> None:
        if not ARTIFACT_NAME.match(self.name) or ".." in self.name:
            raise ValueError(f"unsafe artifact name {self.name!r}")
        if self.role not in ROLES:
            raise ValueError(f"artifact {self.name}: role must be evidence, state or log")
        if not SHA256_HEX.match(self.hash):
            raise ValueError(f"artifact {self.name}: hash must be lowercase SHA-256 hex")
        if self.size < 0:
            raise ValueError(f"artifact {self.name}: size must not be negative")
        if self.body is not None and self.body_ref is not None:
            raise ValueError(f"artifact {self.name}: a body is inline or by reference, not both")

    def descriptor(self) -> dict[str, Any]:
        """``{name, role, path, hash, size}`` as receipts and audit events carry it."""
        return {
            "name": self.name,
            "role": self.role,
            "path": self.path,
            "hash": self.hash,
            "size": self.size,
        }


@dataclass(frozen=True)
class StepRequest:
    """Judge the artifacts of one workflow step."""

    workflow_id: str
    step_id: str
    mode: Literal["flight-plan", "take-off"]
    receipt: Mapping[str, Any]
    artifacts: tuple[StepArtifact, ...]
    context: PolicyContext = field(default_factory=PolicyContext)
    plan_token: Mapping[str, Any] | None = None
    options: Options = field(default_factory=Options)
    request_id: str = ""

    def __post_init__(self) -> None:
        if not self.workflow_id or not self.step_id:
            raise ValueError("workflow_id and step_id are required")
        names = [a.name for a in self.artifacts]
        if len(set(names)) != len(names):
            raise ValueError("artifact names must be unique")


@dataclass(frozen=True)
class ContentRequest:
    """Judge a gateway's MCP or LLM request or response."""

    domain: PolicyDomain
    phase: Literal["request", "response"]
    payload: Mapping[str, Any]
    texts: tuple[str, ...] | None = None
    context: PolicyContext = field(default_factory=PolicyContext)
    options: Options = field(default_factory=Options)
    request_id: str = ""
    # Size of the payload as received (decides whether to judge it off the event loop).
    payload_bytes: int = 0

    def __post_init__(self) -> None:
        if self.domain not in (PolicyDomain.MCP, PolicyDomain.LLM):
            raise ValueError("content is judged for the mcp or llm domain")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may make the service read and judge."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_total_bytes: int = 32 * 1024 * 1024
    body_ref_roots: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or self.max_total_bytes < self.max_body_bytes:
            raise ValueError("need 0 < max_body_bytes <= max_total_bytes")


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """One evaluation (the protocol's PolicyEvaluation)."""

    source: Source
    policy_id: str
    decision: Decision
    reason: str
    evidence: Mapping[str, Any]
    evaluated_at: str
    # A fail-closed deny: a check that could not be made. Never outvoted.
    failure: bool = False

    @property
    def severity(self) -> int:
        """Protocol severity of the decision."""
        return self.decision.severity

    def to_protocol(self, *, bounded: bool = False) -> dict[str, Any]:
        """The protocol's PolicyEvaluation JSON; ``bounded`` shrinks large evidence."""
        evidence: Mapping[str, Any] = self.evidence
        if bounded:
            encoded = canonical_json(dict(evidence))
            if len(encoded) > MAX_AUDIT_EVIDENCE_BYTES:
                evidence = {
                    "truncated": True,
                    "evidence_sha256": sha256_hex(encoded),
                    "evidence_bytes": len(encoded),
                }
        return {
            "source": self.source.value,
            "policy_id": self.policy_id,
            "decision": self.decision.value,
            "severity": self.decision.severity,
            "reason": self.reason,
            "evidence": dict(evidence),
            "evaluated_at": self.evaluated_at,
        }


@dataclass(frozen=True)
class Requires:
    """Who must approve and why (when the decision is require_approval)."""

    role: str
    reason: str


@dataclass(frozen=True)
class Verdict:
    """The aggregated result of one evaluation request."""

    evaluation_id: str
    decision: Decision
    aggregation: AggregationMethod
    evaluations: tuple[Evaluation, ...]
    violations: tuple[str, ...]
    warnings: tuple[str, ...]
    requires: Requires | None
    policy_digest: str
    governance_hash: str
    evaluated_at: str
    failures: tuple[str, ...] = ()

    def audit_policy(self, workflow_state: str) -> dict[str, Any]:
        """The protocol's AuditPolicy JSON for the audit event (bounded in size)."""
        return {
            "decision": self.decision.value,
            "policy_evaluations": [e.to_protocol(bounded=True) for e in self.evaluations],
            "aggregation_method": self.aggregation.value,
            "workflow_state": workflow_state,
            "violations": list(self.violations[:MAX_AUDIT_REASONS]),
            "warnings": list(self.warnings[:MAX_AUDIT_REASONS]),
        }

    def comparable(self) -> dict[str, Any]:
        """Everything that must be equal for equal inputs (timestamps and ids aside)."""
        return {
            "decision": self.decision.value,
            "aggregation": self.aggregation.value,
            "evaluations": [
                {k: v for k, v in e.to_protocol().items() if k != "evaluated_at"}
                for e in self.evaluations
            ],
            "violations": list(self.violations),
            "warnings": list(self.warnings),
            "requires": None
            if self.requires is None
            else [self.requires.role, self.requires.reason],
            "policy_digest": self.policy_digest,
            "governance_hash": self.governance_hash,
        }


@dataclass(frozen=True)
class Classification:
    """Raw scores of a model for a batch of texts."""

    model: str
    version: str
    provider: str
    scores: tuple[TextScore, ...]


class AuditSink(Protocol):
    """What the pipeline needs of the audit emitter (``cabincrew.emitter.AuditEmitter``)."""

    async def emit(
        self,
        event_type: str,
        *,
        workflow_state: str,
        severity: str = "info",
        message: str = "",
        workflow: Mapping[str, Any] | None = None,
        plan_token: Mapping[str, Any] | None = None,
        artifacts: Sequence[Mapping[str, Any]] | None = None,
        policy: Mapping[str, Any] | None = None,
        gateway: Mapping[str, Any] | None = None,
        event_id: str | None = None,
    ) -> str:
        """Record one event durably; returns its id."""
        ...


# --- stage 1: artifacts ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    """An artifact with its body bytes (if any could be read) and what is wrong with it."""

    artifact: StepArtifact
    body: bytes | None
    problems: tuple[str, ...]


def engine_encoding(document: Mapping[str, Any]) -> bytes:
    """artifact.json as an engine writes it (engines/README.md): sorted, indented, UTF-8."""
    text = json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def _load_artifacts(
    artifacts: Sequence[StepArtifact], receipt: Mapping[str, Any], limits: Limits
) -> list[_Loaded]:
    total = 0
    declared = {
        str(a.get("name")): a for a in receipt.get("artifacts") or () if isinstance(a, Mapping)
    }
    loaded: list[_Loaded] = []
    for item in artifacts:
        problems: list[str] = []
        where = f"artifact {item.name}"
        for path, text in validate_protocol(dict(item.document), "Artifact")[:3]:
            problems.append(f"{where}: artifact.json does not match the protocol ({path}: {text})")
        if declared:
            entry = declared.get(item.name)
            if entry is None:
                problems.append(f"{where}: not listed in the engine receipt")
            elif {k: entry.get(k) for k in ("role", "hash", "size")} != {
                "role": item.role,
                "hash": item.hash,
                "size": item.size,
            }:
                problems.append(f"{where}: descriptor differs from the engine receipt's entry")
        body, body_problem = _read_body(item, limits)
        if body_problem:
            problems.append(f"{where}: {body_problem}")
        if body is not None:
            total += len(body)
            if total > limits.max_total_bytes:
                problems.append(
                    f"{where}: bodies exceed {limits.max_total_bytes} bytes in all; "
                    "preflight judges nothing in part"
                )
                body = None
        problems.extend(f"{where}: {p}" for p in _integrity(item, body))
        loaded.append(_Loaded(item, body, tuple(problems)))
    return loaded


def _receipt_problems(artifacts: Sequence[StepArtifact], receipt: Mapping[str, Any]) -> list[str]:
    declared = {
        str(a.get("name")) for a in receipt.get("artifacts") or () if isinstance(a, Mapping)
    }
    if not declared:
        return []
    missing = sorted(declared - {a.name for a in artifacts})
    return [f"artifact {name[:128]}: listed in the engine receipt but not sent" for name in missing]


def _read_body(item: StepArtifact, limits: Limits) -> tuple[bytes | None, str | None]:
    if item.body is not None:
        if len(item.body) > limits.max_body_bytes:
            return None, f"body of {len(item.body)} bytes exceeds {limits.max_body_bytes}"
        return item.body, None
    if item.body_ref is None:
        return None, None
    path = Path(item.body_ref)
    if not path.is_absolute():
        return None, "body_ref must be an absolute path"
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None, "body_ref is not readable"
    if not any(real.is_relative_to(root) for root in limits.body_ref_roots):
        return None, "body_ref points outside the folders preflight may read (body_ref_roots)"
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None, "body_ref is not readable"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, "body_ref is not a regular file"
        if info.st_size > limits.max_body_bytes:
            return None, f"body of {info.st_size} bytes exceeds {limits.max_body_bytes}"
        chunks = []
        left = limits.max_body_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    except OSError:
        return None, "body_ref is not readable"
    finally:
        os.close(fd)
    if len(data) > limits.max_body_bytes:
        return None, f"body exceeds {limits.max_body_bytes} bytes"
    return data, None


def _integrity(item: StepArtifact, body: bytes | None) -> list[str]:
    problems: list[str] = []
    body_file = item.document.get("body_file")
    has_body = item.body is not None or item.body_ref is not None
    if body_file and not has_body:
        problems.append(f"artifact.json names body_file {body_file!r} but no body was sent")
    if has_body and not body_file:
        problems.append("a body was sent but artifact.json names no body_file")
    if has_body:
        if body is not None and (sha256_hex(body) != item.hash or len(body) != item.size):
            problems.append("body does not match the descriptor's hash and size")
        return problems
    if item.artifact_json is not None:
        raw = item.artifact_json
        if sha256_hex(raw) != item.hash or len(raw) != item.size:
            problems.append("artifact.json does not match the descriptor's hash and size")
        elif not _same_document(raw, item.document):
            problems.append("artifact.json bytes and the artifact document differ")
        return problems
    encoded = engine_encoding(item.document)
    if sha256_hex(encoded) != item.hash or len(encoded) != item.size:
        # Verified later against the plan-token's binding when the request carries one.
        problems.append(_UNVERIFIED)
    return problems


_UNVERIFIED: Final = (
    "descriptor hash cannot be verified: no body, no artifact_json bytes, the document does "
    "not re-encode to it, and no plan-token binds it"
)


def _same_document(raw: bytes, document: Mapping[str, Any]) -> bool:
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    try:
        return canonical_hash(parsed) == canonical_hash(dict(document))
    except Exception:  # rfc8785 refuses values JSON cannot hold
        return False


def _check_plan_token(
    token: Mapping[str, Any] | None,
    loaded: Sequence[_Loaded],
    governance: Governance,
    bind_artifacts: bool,
) -> tuple[list[str], set[str]]:
    """Problems with the plan-token, and the artifacts whose binding it verified.

    The digests must name the governance in force in both modes. The artifacts are checked
    against the token's bindings only for a flight-plan: a take-off's artifacts are the
    results of the execution, not the plan the token binds.
    """
    if token is None:
        return [], set()
    problems: list[str] = []
    digest, ghash = token.get("policy_digest"), token.get("governance_hash")
    if (digest and digest != governance.policy_digest) or (
        ghash and ghash != governance.governance_hash
    ):
        problems.append(
            "governance changed since the plan: the plan-token binds policy digest "
            f"{str(digest or '-')[:12]} and governance hash {str(ghash or '-')[:12]}, in force "
            f"are {governance.policy_digest[:12]} and {governance.governance_hash[:12]}"
        )
    bound = {str(a.get("name")): a for a in token.get("artifacts") or () if isinstance(a, Mapping)}
    verified: set[str] = set()
    if not bound or not bind_artifacts:
        return problems, verified
    by_name = {entry.artifact.name: entry for entry in loaded}
    if set(bound) != set(by_name):
        missing = sorted(set(bound) ^ set(by_name))
        problems.append(
            "the plan-token binds other artifacts than were sent: " + ", ".join(missing[:10])
        )
    for name in sorted(set(bound) & set(by_name)):
        entry = by_name[name]
        item = entry.artifact
        body_sha = None
        if item.body is not None or item.body_ref is not None:
            if entry.body is None:
                continue  # already a problem of its own
            body_sha = sha256_hex(entry.body)
        try:
            expected = PlanArtifact(
                name=item.name,
                role=item.role,
                metadata_sha256=canonical_hash(dict(item.document)),
                body_sha256=body_sha,
                size=item.size,
            )
        except (PlanTokenError, TypeError, ValueError):
            problems.append(f"artifact {name}: cannot be bound")
            continue
        claim = bound[name]
        if claim.get("hash") != expected.hash or claim.get("size") != item.size:
            problems.append(f"artifact {name}: does not match its plan-token binding")
        else:
            verified.add(name)
    return problems, verified


def _secret_findings(name: str, texts: Sequence[str]) -> list[SecretFinding]:
    found: list[SecretFinding] = []
    seen: set[tuple[str, int | None]] = set()
    for index, text in enumerate(texts):
        for finding in find_secrets(text):
            # Lines only for the body (the first text), where they mean something.
            line = text.count("\n", 0, finding.start) + 1 if index == 0 else None
            key = (finding.rule_id, line)
            if key in seen:
                continue
            seen.add(key)
            found.append(SecretFinding(finding.rule_id, artifact=name, line=line))
            if len(found) >= MAX_FINDINGS_PER_ARTIFACT:
                return found
    return found


def _body_text(data: bytes | None, document: Mapping[str, Any]) -> str | None:
    """The text models read for an artifact: a UTF-8 body, else the inline body."""
    if data is not None:
        if b"\x00" in data:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    inline = document.get("body")
    if inline is None:
        return None
    if isinstance(inline, str):
        return inline
    return json.dumps(inline, sort_keys=True, ensure_ascii=False)


def model_text_of(document: Mapping[str, Any], text: str | None) -> str | None:
    """What the models read of an artifact: for a unified diff, the lines it adds.

    Models judge what a step is about to write. Diff headers (``--- /dev/null``), context
    and removed lines are not written, and classifiers trained on code and prose read them
    as noise (a new-file header looks like shell redirection to a dangerous-code model).
    """
    if text is None or not _is_diff(document):
        return text
    added = [
        line[1:]
        for line in text.splitlines()
        if line.startswith("+") and not line.startswith("+++ ")
    ]
    return "\n".join(added) + "\n" if added else None


def _is_diff(document: Mapping[str, Any]) -> bool:
    kind = str(document.get("artifact_type", "")).lower()
    mime = str(document.get("mime", "")).lower()
    return kind in ("diff", "patch") or "diff" in mime or "patch" in mime


# --- the pipeline ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    """What the synchronous stages produce for the model stage."""

    gates: tuple[Evaluation, ...]
    policies: tuple[Evaluation, ...]
    texts: tuple[str, ...]
    # For each text, where it came from (an artifact name, or a text index).
    origins: tuple[str, ...]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _gate(policy_id: str, problems: Sequence[str], at: str) -> Evaluation:
    return Evaluation(
        Source.CUSTOM,
        policy_id,
        Decision.DENY,
        "; ".join(problems[:10])
        + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""),
        {"problems": list(problems[:50])},
        at,
        failure=True,
    )


def _policy_evaluation(result: PolicyResult, at: str) -> Evaluation:
    evidence: dict[str, Any] = dict(result.evidence)
    error = evidence.get("error")
    failure = result.decision is Decision.DENY and (
        (isinstance(error, Mapping) and "code" in error)
        or any(r.startswith(_OPA_FAILURE_PREFIXES) for r in result.reasons)
    )
    if result.required_role is not None:
        evidence["required_role"] = result.required_role
    redacted, _ = redact_json(evidence)
    reason = "; ".join(redact_text(r)[0] for r in result.reasons)
    return Evaluation(Source.OPA, result.policy_id, result.decision, reason, redacted, at, failure)


# The reasons preflight_svc.opa gives when a policy could not be judged (docs/policy-input.md,
# "Fail-closed rules"); such a deny is a failure, not a vote.
_OPA_FAILURE_PREFIXES: Final = (
    "policy evaluation failed",
    "policy produced no decision",
    "policy produced an invalid",
    "no policy is loaded",
    "no policy bundle is loaded",
)


def _prepare_step(
    governance: Governance, request: StepRequest, limits: Limits, at: str
) -> _Prepared:
    loaded = _load_artifacts(request.artifacts, request.receipt, limits)
    token_problems, token_verified = _check_plan_token(
        request.plan_token, loaded, governance, request.mode == "flight-plan"
    )
    artifact_problems = _receipt_problems(request.artifacts, request.receipt) + [
        p
        for entry in loaded
        for p in entry.problems
        if not (p.endswith(_UNVERIFIED) and entry.artifact.name in token_verified)
    ]
    gates = []
    if artifact_problems:
        gates.append(_gate(GATE_ARTIFACTS, artifact_problems, at))
    if token_problems:
        gates.append(_gate(GATE_PLAN_TOKEN, token_problems, at))

    findings: list[SecretFinding] = []
    inputs: list[ArtifactInput] = []
    texts: list[str] = []
    origins: list[str] = []
    for entry in loaded:
        item = entry.artifact
        text = _body_text(entry.body, item.document)
        if entry.body is not None and text is None:
            scan = [entry.body.decode("utf-8", "replace")]
        else:
            scan = [text] if text is not None else []
        meta = {k: v for k, v in item.document.items() if k != "body"}
        scan.append(json.dumps(meta, sort_keys=True, ensure_ascii=False))
        findings.extend(_secret_findings(item.name, scan))
        model_text = model_text_of(item.document, text)
        if model_text:
            texts.append(model_text)
            origins.append(item.name)
        inputs.append(
            ArtifactInput(
                item.name, item.role, item.path, item.hash, item.size, item.document, entry.body
            )
        )
    document = build_preflight_input(
        workflow_id=request.workflow_id,
        step_id=request.step_id,
        mode=request.mode,
        receipt=request.receipt,
        artifacts=inputs,
        context=request.context,
        plan_token=request.plan_token,
        secrets_found=findings,
    )
    _validate(document)
    results = governance.evaluate_policies(PolicyDomain.PREFLIGHT, document)
    return _Prepared(
        tuple(gates),
        tuple(_policy_evaluation(r, at) for r in results),
        tuple(texts),
        tuple(origins),
    )


def _prepare_content(
    governance: Governance, request: ContentRequest, limits: Limits, at: str
) -> _Prepared:
    domain: Literal["mcp", "llm"] = "mcp" if request.domain is PolicyDomain.MCP else "llm"
    texts = (
        list(request.texts)
        if request.texts is not None
        else extract_texts(domain, request.phase, request.payload)
    )
    payload_text = json.dumps(dict(request.payload), sort_keys=True, ensure_ascii=False)
    size = len(payload_text.encode("utf-8")) + sum(len(t.encode("utf-8")) for t in texts)
    gates: list[Evaluation] = []
    if size > limits.max_total_bytes:
        gates.append(
            _gate(
                GATE_CONTENT,
                [f"content of {size} bytes exceeds {limits.max_total_bytes}; none is judged"],
                at,
            )
        )
        texts = []
    payload = {} if gates else request.payload  # nothing of an oversize request is judged
    findings: list[SecretFinding] = []
    seen: set[tuple[str, int]] = set()
    for index, text in enumerate(texts):
        for finding in find_secrets(text):
            if (finding.rule_id, index) not in seen:
                seen.add((finding.rule_id, index))
                findings.append(SecretFinding(finding.rule_id, text_index=index))
    if request.texts is not None and not gates:
        # Explicit texts may leave parts of the payload out; its secrets count too.
        kinds = sorted({f.rule_id for f in find_secrets(payload_text)} - {f.kind for f in findings})
        findings.extend(SecretFinding(kind) for kind in kinds)
    document = build_content_input(
        domain=domain,
        phase=request.phase,
        payload=payload,
        context=request.context,
        texts=texts,
        secrets_found=findings,
    )
    _validate(document)
    results = governance.evaluate_policies(request.domain, document)
    return _Prepared(
        tuple(gates),
        tuple(_policy_evaluation(r, at) for r in results),
        tuple(texts),
        tuple(f"text {i}" for i in range(len(texts))),
    )


def _validate(document: Mapping[str, Any]) -> None:
    try:
        validate_policy_input(document)
    except PolicyInputError as exc:
        raise InvalidRequest(
            "the request does not make a valid policy input",
            [Violation(f"policy_input.{v.path}".rstrip("."), v.message) for v in exc.violations],
        ) from None


async def _run_models(
    governance: Governance, names: Sequence[str], prepared: _Prepared, at: str
) -> list[Evaluation]:
    async def one(name: str) -> Evaluation | None:
        try:
            scores = await governance.registry.classify(name, list(prepared.texts))
        except ModelUnavailable as exc:
            return _model_failure(name, f"model {name} is unavailable: {exc.reason}", at)
        except UnknownModel:
            return _model_failure(name, f"model {name} is not configured", at)
        except ModelOverloaded:
            raise
        except ModelInferenceError as exc:
            return _model_failure(name, f"model {name} failed: {exc.message}", at)
        except BatcherClosed:
            raise
        except ModelError as exc:
            return _model_failure(name, f"model {name} failed: {exc.message}", at)
        if not scores:
            return None  # nothing to read: the model has no vote
        return _model_evaluation(governance, name, scores, prepared.origins, at)

    found = await asyncio.gather(*(one(n) for n in sorted(set(names))))
    return [e for e in found if e is not None]


def _model_failure(name: str, reason: str, at: str) -> Evaluation:
    return Evaluation(
        Source.ONNX, name, Decision.DENY, reason, {"error": {"message": reason}}, at, failure=True
    )


def _model_evaluation(
    governance: Governance,
    name: str,
    scores: Sequence[TextScore],
    origins: Sequence[str],
    at: str,
) -> Evaluation:
    decision = max((s.decision for s in scores), key=lambda d: d.severity)
    labels = sorted({label for s in scores for label in s.scores})
    max_scores = {
        label: round(max(s.scores.get(label, 0.0) for s in scores), 6) for label in labels
    }
    flagged = [
        {
            "source": origins[s.index],
            "decision": s.decision.value,
            "scores": {k: round(v, 6) for k, v in sorted(s.scores.items())},
        }
        for s in scores
        if s.decision is not Decision.ALLOW
    ]
    version = next((m.version for m in governance.models if m.name == name), "")
    evidence: dict[str, Any] = {
        "model": name,
        "version": version,
        "texts": len(scores),
        "max_scores": max_scores,
    }
    if flagged:
        evidence["flagged"] = flagged[:MAX_FLAGGED]
    if decision is Decision.ALLOW:
        reason = ""
    else:
        where = ", ".join(sorted({str(f["source"]) for f in flagged})[:5])
        top = ", ".join(f"{k} {v:.3f}" for k, v in max_scores.items() if k in _flag_labels(flagged))
        reason = f"{name} {version} flags {where} ({top}): {decision.value}"
    return Evaluation(Source.ONNX, name, decision, reason, evidence, at)


def _flag_labels(flagged: Sequence[Mapping[str, Any]]) -> set[str]:
    # The labels that scored highest in the flagged texts (the positive classes).
    out: set[str] = set()
    for f in flagged:
        scores = f["scores"]
        if scores:
            out.add(max(scores, key=lambda k: scores[k]))
    return out


def combine(
    evaluations: Sequence[Evaluation], method: AggregationMethod
) -> tuple[Decision, tuple[str, ...]]:
    """Aggregate by ``method``; any failure (or no evaluation) is deny, never outvoted.

    Returns the decision and the failures that forced a deny.
    """
    failures = tuple(f"{e.policy_id}: {e.reason}" for e in evaluations if e.failure)
    try:
        decision = aggregate(method, (e.decision for e in evaluations))
    except EmptyDecisionSet:
        return Decision.DENY, (*failures, "no evaluation at all: an empty set is never allow")
    return (Decision.DENY if failures else decision), failures


def _conclude(
    governance: Governance,
    prepared: _Prepared,
    models: Sequence[Evaluation],
    method: AggregationMethod,
    at: str,
) -> Verdict:
    evaluations = (*prepared.gates, *prepared.policies, *models)
    decision, failures = combine(evaluations, method)
    violations = tuple(
        f"{e.policy_id}: {e.reason or e.decision.value}"
        for e in evaluations
        if e.decision in (Decision.DENY, Decision.REQUIRE_APPROVAL)
    )
    warnings = tuple(
        f"{e.policy_id}: {e.reason or e.decision.value}"
        for e in evaluations
        if e.decision is Decision.WARN
    )
    requires = None
    if decision is Decision.REQUIRE_APPROVAL:
        asking = [e for e in evaluations if e.decision is Decision.REQUIRE_APPROVAL]
        roles = [
            str(e.evidence["required_role"]) for e in asking if e.evidence.get("required_role")
        ]
        reason = "; ".join(f"{e.policy_id}: {e.reason}" for e in asking if e.reason) or (
            f"the evaluations disagree and {method.value} asks a person to decide"
        )
        requires = Requires(roles[0] if roles else DEFAULT_ROLE, reason)
    return Verdict(
        evaluation_id=str(uuid.uuid4()),
        decision=decision,
        aggregation=method,
        evaluations=evaluations,
        violations=violations,
        warnings=warnings,
        requires=requires,
        policy_digest=governance.policy_digest,
        governance_hash=governance.governance_hash,
        evaluated_at=at,
        failures=failures,
    )


def _models_for(governance: Governance, domain: PolicyDomain, options: Options) -> tuple[str, ...]:
    if options.models is None:
        return governance.domain_models.get(domain, ())
    unknown = [i for i, name in enumerate(options.models) if not governance.has_model(name)]
    if unknown:
        raise InvalidRequest(
            "options.models names models that are not configured",
            [
                Violation(f"options.models[{i}]", "no model of this name is configured")
                for i in unknown
            ],
        )
    return options.models


class Preflight:
    """The service's domain object: judges requests with the governance in force."""

    def __init__(
        self,
        holder: GovernanceHolder,
        limits: Limits,
        audit: AuditSink | None,
        *,
        workers: int = 4,
        audit_before_reply: bool = True,
    ) -> None:
        self._holder = holder
        self._limits = limits
        self._audit = audit
        self._audit_before_reply = audit_before_reply
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preflight")
        self._pending: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def governance(self) -> Governance:
        """The governance in force."""
        return self._holder.current

    def serving(self) -> bool:
        """Whether health should say SERVING."""
        return not self._closed and self._holder.current.serving

    async def evaluate_step(self, request: StepRequest) -> Verdict:
        """Judge a step's artifacts."""
        async with self._holder.lease() as governance:
            at = _now()
            names = _models_for(governance, PolicyDomain.PREFLIGHT, request.options)
            small = not any(a.body_ref for a in request.artifacts) and _inline_size(
                len(a.body or b"") + len(a.artifact_json or b"") for a in request.artifacts
            )
            prepared = await self._run(small, _prepare_step, governance, request, self._limits, at)
            models = await _run_models(governance, names, prepared, at)
            method = request.options.aggregation or governance.settings.aggregation
            verdict = _conclude(governance, prepared, models, method, at)
        await self._record(self._step_event(request, verdict))
        return verdict

    async def evaluate_content(self, request: ContentRequest) -> Verdict:
        """Judge a gateway request or response."""
        async with self._holder.lease() as governance:
            at = _now()
            names = _models_for(governance, request.domain, request.options)
            small = _inline_size([request.payload_bytes, *(len(t) for t in request.texts or ())])
            prepared = await self._run(
                small, _prepare_content, governance, request, self._limits, at
            )
            models = await _run_models(governance, names, prepared, at)
            method = request.options.aggregation or governance.settings.aggregation
            verdict = _conclude(governance, prepared, models, method, at)
        await self._record(self._content_event(request, verdict))
        return verdict

    async def classify(self, model: str, texts: Sequence[str]) -> Classification:
        """Raw scores; raises ``UnknownModel`` or ``ModelUnavailable`` for a bad model."""
        size = sum(len(t.encode("utf-8")) for t in texts)
        if size > self._limits.max_total_bytes:
            raise invalid("texts", f"{size} bytes in all exceed {self._limits.max_total_bytes}")
        async with self._holder.lease() as governance:
            scores = await governance.registry.classify(model, list(texts))
            version = next((m.version for m in governance.models if m.name == model), "")
            return Classification(model, version, governance.registry.provider.name, tuple(scores))

    async def reload(self, loader: Callable[[], Governance]) -> tuple[Governance, bool]:
        """Load anew and swap atomically; a refused reload keeps the governance in force."""
        async with self._holder.lock:
            current = self._holder.current
            new = await asyncio.get_running_loop().run_in_executor(None, loader)
            refusal = accept_reload(current, new)
            if refusal is not None:
                await new.aclose()
                log.error(
                    "reload refused, governance %s stays: %s", current.governance_hash[:12], refusal
                )
                raise GovernanceLoadError(refusal)
            self._holder.swap(new)
            changed = new.governance_hash != current.governance_hash
            log.info(
                "reloaded: governance %s -> %s%s",
                current.governance_hash[:12],
                new.governance_hash[:12],
                "" if changed else " (unchanged)",
            )
            return new, changed

    async def aclose(self) -> None:
        """Finish background audit writes, close the governance (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._holder.aclose()
        self._executor.shutdown(wait=True)

    async def _run(self, inline: bool, fn: Callable[..., _Prepared], *args: Any) -> _Prepared:
        # A small request costs about a millisecond of policy evaluation: the hop to a
        # thread would add a fifth of that. Large bodies and file reads go to a thread so
        # the event loop keeps serving other calls.
        if inline:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- audit --------------------------------------------------------------------------

    async def _record(self, event: _Event) -> None:
        if self._audit is None:
            return
        if self._audit_before_reply:
            await self._emit(event)
            return
        task = asyncio.get_running_loop().create_task(self._emit_logged(event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _emit(self, event: _Event) -> None:
        assert self._audit is not None
        await self._audit.emit(
            event.event_type,
            workflow_state=event.workflow_state,
            severity=event.severity,
            message=event.message,
            workflow=event.workflow,
            plan_token=event.plan_token,
            artifacts=event.artifacts,
            policy=event.policy,
            gateway=event.gateway,
            event_id=event.event_id,
        )

    async def _emit_logged(self, event: _Event) -> None:
        try:
            await self._emit(event)
        except Exception:
            log.exception("the audit event of a preflight evaluation could not be written")

    def _step_event(self, request: StepRequest, verdict: Verdict) -> _Event:
        state = "PREFLIGHT_COMPLETE"
        token = request.plan_token
        if token is not None and validate_protocol(dict(token), "PlanToken"):
            token = None  # only a complete protocol PlanToken can travel in the event
        return _Event(
            event_id=verdict.evaluation_id,
            event_type="preflight.evaluated",
            workflow_state=state,
            severity=_severity(verdict),
            message=(
                f"preflight {verdict.decision.value} for {request.workflow_id}/{request.step_id} "
                f"({len(verdict.evaluations)} evaluations, {verdict.aggregation.value}, "
                f"evaluation {verdict.evaluation_id})"
            ),
            workflow={
                "workflow_id": request.workflow_id,
                "step_id": request.step_id,
                "mode": request.mode,
            },
            plan_token=token,
            artifacts=[a.descriptor() for a in request.artifacts],
            policy=verdict.audit_policy(state),
            gateway=None,
        )

    def _content_event(self, request: ContentRequest, verdict: Verdict) -> _Event:
        state = "PREFLIGHT_COMPLETE"
        gateway: dict[str, Any] = {
            "gateway_type": request.domain.value,
            "policy_decision": verdict.decision.value,
        }
        if request.request_id:
            gateway["request_id"] = request.request_id
        tool = _tool(request)
        if tool:
            gateway["tool"] = tool
        model = request.payload.get("model")
        if isinstance(model, str) and model:
            gateway["model"] = model
        return _Event(
            event_id=verdict.evaluation_id,
            event_type="preflight.content_evaluated",
            workflow_state=state,
            severity=_severity(verdict),
            message=(
                f"preflight {verdict.decision.value} for a {request.domain.value} "
                f"{request.phase} ({len(verdict.evaluations)} evaluations, "
                f"{verdict.aggregation.value}, evaluation {verdict.evaluation_id})"
            ),
            workflow=None,
            plan_token=None,
            artifacts=None,
            policy=verdict.audit_policy(state),
            gateway=gateway,
        )


INLINE_BYTES: Final = 64 * 1024


def _inline_size(sizes: Iterable[int]) -> bool:
    total = 0
    for size in sizes:
        total += size
        if total > INLINE_BYTES:
            return False
    return True


def _tool(request: ContentRequest) -> str:
    params = request.payload.get("params")
    if request.domain is PolicyDomain.MCP and isinstance(params, Mapping):
        name = params.get("name")
        if isinstance(name, str):
            return name
    return ""


def _severity(verdict: Verdict) -> str:
    if verdict.failures:
        return "error"
    if verdict.decision is Decision.DENY:
        return "warning"
    return "info"


@dataclass(frozen=True)
class _Event:
    # The evaluation id: the event of an evaluation is found by the id its result carries.
    event_id: str
    event_type: str
    workflow_state: str
    severity: str
    message: str
    workflow: Mapping[str, Any] | None
    plan_token: Mapping[str, Any] | None
    artifacts: Sequence[Mapping[str, Any]] | None
    policy: Mapping[str, Any]
    gateway: Mapping[str, Any] | None
