"""Plan-tokens: the hash that binds a flight-plan's artifacts to the take-off that applies them.

The protocol's ``PlanToken`` JSON carries, per artifact, only ``{name, hash, size}``; roles
and metadata must be bound too, so each artifact's ``hash`` in the token is the SHA-256 of the
canonical JSON of ``{name, role, metadata_sha256, body_sha256, size}``. The ``token`` is the
SHA-256 of the canonical JSON of the *binding document*::

    {version, workflow_id, step_id, engine_id, protocol_version, model, workspace_hash,
     policy_digest, governance_hash, artifacts: [<artifact binding>, ... sorted by name]}

``created_at`` is not hashed: no wall clock enters hashed content. Signatures are Ed25519
over the canonical JSON of the binding document. Used by the orchestrator and, offline, by
the CLI. See docs/workflows.md, section "Plan-token".
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc

from cabincrew import PROTOCOL_VERSION, protocol_schema
from cabincrew.canonical import canonical_hash, canonical_json
from cabincrew.errors import CabinCrewError
from cabincrew.schema_check import protocol_check
from cabincrew.signing import Signer, key_id_for, verify

PLAN_TOKEN_VERSION = "1"
SIGNATURE_ALGORITHM = "ed25519"
ROLES = frozenset({"evidence", "state", "log"})
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})$")
_BINDING_KEYS = (
    "version",
    "workflow_id",
    "step_id",
    "engine_id",
    "protocol_version",
    "model",
    "workspace_hash",
    "policy_digest",
    "governance_hash",
    "artifacts",
)
_ARTIFACT_KEYS = ("name", "role", "metadata_sha256", "body_sha256", "size")


class PlanTokenError(CabinCrewError):
    """A plan-token document is malformed or inconsistent with its binding."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return (
            "The stored plan-token was altered or produced by an incompatible version; "
            "do not take off. Plan the step again to get a fresh token."
        )


@dataclass(frozen=True)
class PlanArtifact:
    """What the token binds of one artifact."""

    name: str
    role: str
    metadata_sha256: str
    body_sha256: str | None
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PlanTokenError("an artifact needs a name")
        if self.role not in ROLES:
            raise PlanTokenError(f"artifact {self.name!r}: role must be evidence, state or log")
        if not isinstance(self.metadata_sha256, str) or not _SHA256_HEX.match(self.metadata_sha256):
            raise PlanTokenError(f"artifact {self.name!r}: metadata_sha256 must be SHA-256 hex")
        if self.body_sha256 is not None and (
            not isinstance(self.body_sha256, str) or not _SHA256_HEX.match(self.body_sha256)
        ):
            raise PlanTokenError(f"artifact {self.name!r}: body_sha256 must be SHA-256 hex or null")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise PlanTokenError(f"artifact {self.name!r}: size must be a non-negative integer")

    def binding(self) -> dict[str, Any]:
        """Return the artifact's binding object (the input of its hash)."""
        return {
            "name": self.name,
            "role": self.role,
            "metadata_sha256": self.metadata_sha256,
            "body_sha256": self.body_sha256,
            "size": self.size,
        }

    @property
    def hash(self) -> str:
        """SHA-256 hex of the canonical JSON of the binding object."""
        return canonical_hash(self.binding())

    @classmethod
    def from_binding(cls, data: Mapping[str, Any]) -> PlanArtifact:
        """Rebuild from ``binding()`` output; anything else raises ``PlanTokenError``."""
        if not isinstance(data, Mapping) or set(data) != set(_ARTIFACT_KEYS):
            raise PlanTokenError(
                f"an artifact binding has exactly the keys {', '.join(_ARTIFACT_KEYS)}"
            )
        return cls(
            data["name"], data["role"], data["metadata_sha256"], data["body_sha256"], data["size"]
        )


@dataclass(frozen=True)
class PlanBinding:
    """Everything the token hashes; artifacts are kept sorted by name."""

    workflow_id: str
    step_id: str
    engine_id: str
    model: str
    workspace_hash: str
    artifacts: tuple[PlanArtifact, ...]
    policy_digest: str | None = None
    governance_hash: str | None = None
    protocol_version: str = PROTOCOL_VERSION
    version: str = PLAN_TOKEN_VERSION

    def __post_init__(self) -> None:
        for field in (
            "workflow_id",
            "step_id",
            "engine_id",
            "model",
            "workspace_hash",
            "protocol_version",
        ):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise PlanTokenError(f"{field} must be a non-empty string")
        for field in ("policy_digest", "governance_hash"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                raise PlanTokenError(f"{field} must be a non-empty string or null")
        if self.version != PLAN_TOKEN_VERSION:
            raise PlanTokenError(f"plan-token version {self.version!r} is not supported")
        ordered = tuple(sorted(self.artifacts, key=lambda artifact: artifact.name))
        names = [artifact.name for artifact in ordered]
        if len(set(names)) != len(names):
            raise PlanTokenError("artifact names in a plan must be unique")
        object.__setattr__(self, "artifacts", ordered)

    def document(self) -> dict[str, Any]:
        """Return the binding document whose canonical JSON is hashed and signed."""
        return {
            "version": self.version,
            "workflow_id": self.workflow_id,
            "step_id": self.step_id,
            "engine_id": self.engine_id,
            "protocol_version": self.protocol_version,
            "model": self.model,
            "workspace_hash": self.workspace_hash,
            "policy_digest": self.policy_digest,
            "governance_hash": self.governance_hash,
            "artifacts": [artifact.binding() for artifact in self.artifacts],
        }

    def canonical(self) -> bytes:
        """Return the canonical JSON bytes of the binding document (what is signed)."""
        return canonical_json(self.document())

    @property
    def token(self) -> str:
        """SHA-256 hex of the canonical binding document."""
        return canonical_hash(self.document())

    @classmethod
    def from_document(cls, data: Mapping[str, Any]) -> PlanBinding:
        """Rebuild from ``document()`` output; anything else raises ``PlanTokenError``."""
        if not isinstance(data, Mapping) or set(data) != set(_BINDING_KEYS):
            raise PlanTokenError(
                f"a binding document has exactly the keys {', '.join(_BINDING_KEYS)}"
            )
        artifacts = data["artifacts"]
        if not isinstance(artifacts, list):
            raise PlanTokenError("artifacts must be a list")
        binding = cls(
            workflow_id=data["workflow_id"],
            step_id=data["step_id"],
            engine_id=data["engine_id"],
            model=data["model"],
            workspace_hash=data["workspace_hash"],
            artifacts=tuple(PlanArtifact.from_binding(item) for item in artifacts),
            policy_digest=data["policy_digest"],
            governance_hash=data["governance_hash"],
            protocol_version=data["protocol_version"],
            version=data["version"],
        )
        if [item.get("name") for item in artifacts] != [a.name for a in binding.artifacts]:
            raise PlanTokenError("artifacts in a binding document must be sorted by name")
        return binding


@dataclass(frozen=True)
class PlanToken:
    """A plan binding and when it was created; renders the protocol's PlanToken JSON."""

    binding: PlanBinding
    created_at: str

    def __post_init__(self) -> None:
        if not isinstance(self.created_at, str) or not _RFC3339.match(self.created_at):
            raise PlanTokenError("created_at must be an RFC 3339 timestamp")

    @classmethod
    def create(cls, binding: PlanBinding, created_at: datetime) -> PlanToken:
        """Build a token; ``created_at`` must be timezone-aware and is stored in UTC."""
        if created_at.tzinfo is None:
            raise PlanTokenError("created_at must be timezone-aware")
        stamp = created_at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        return cls(binding, stamp)

    @property
    def token(self) -> str:
        """The plan-token hash."""
        return self.binding.token

    def to_protocol(self) -> dict[str, Any]:
        """Return the protocol ``PlanToken`` JSON (valid against the vendored schema)."""
        binding = self.binding
        document: dict[str, Any] = {
            "token": binding.token,
            "version": binding.version,
            "artifacts": [
                {"name": a.name, "hash": a.hash, "size": a.size} for a in binding.artifacts
            ],
            "model": binding.model,
            "engine_id": binding.engine_id,
            "protocol_version": binding.protocol_version,
            "workspace_hash": binding.workspace_hash,
            "created_at": self.created_at,
        }
        if binding.policy_digest is not None:
            document["policy_digest"] = binding.policy_digest
        if binding.governance_hash is not None:
            document["governance_hash"] = binding.governance_hash
        return document

    def to_dict(self) -> dict[str, Any]:
        """Return ``{plan_token, binding}``: everything needed to recompute and compare."""
        return {"plan_token": self.to_protocol(), "binding": self.binding.document()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanToken:
        """Rebuild from ``to_dict`` output, refusing a token inconsistent with its binding."""
        if not isinstance(data, Mapping) or not {"plan_token", "binding"} <= set(data):
            raise PlanTokenError("expected an object with plan_token and binding")
        problems = _consistency(data["plan_token"], data["binding"])
        if problems:
            raise PlanTokenError("; ".join(problems))
        return cls(PlanBinding.from_document(data["binding"]), data["plan_token"]["created_at"])


def _consistency(plan_token: Any, binding_document: Any) -> list[str]:
    """Problems between a protocol PlanToken JSON and the binding it claims to hash."""
    if not isinstance(plan_token, Mapping):
        return ["plan_token is not an object"]
    document = dict(plan_token)
    problems = (
        []
        if protocol_check("PlanToken")(document)
        else [f"plan_token{error}" for error in protocol_schema.errors("PlanToken", document)]
        or ["plan_token: not a valid PlanToken"]
    )
    if problems:
        return problems
    try:
        binding = PlanBinding.from_document(binding_document)
        rendered = PlanToken(binding, plan_token["created_at"]).to_protocol()
    except PlanTokenError as exc:
        return [f"binding: {exc.message}"]
    if plan_token["token"] != binding.token:
        problems.append("token does not match the hash of the binding document")
    for key in sorted(set(rendered) | set(plan_token)):
        if key != "token" and rendered.get(key) != plan_token.get(key):
            problems.append(f"plan_token {key} does not match the binding document")
    return problems


@dataclass(frozen=True)
class SignedPlanToken:
    """A plan-token with its binding and an Ed25519 signature over the binding."""

    plan_token: Mapping[str, Any]
    binding: Mapping[str, Any]
    signature: str  # base64
    key_id: str
    public_key: str  # base64 of the raw 32-byte key
    algorithm: str = SIGNATURE_ALGORITHM

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON envelope."""
        return {
            "plan_token": dict(self.plan_token),
            "binding": dict(self.binding),
            "signature": self.signature,
            "key_id": self.key_id,
            "public_key": self.public_key,
            "algorithm": self.algorithm,
        }

    def token(self) -> PlanToken:
        """Return the (unverified) plan-token inside; use ``verify_signed`` first."""
        return PlanToken.from_dict({"plan_token": self.plan_token, "binding": self.binding})


def sign_plan_token(token: PlanToken, signer: Signer) -> SignedPlanToken:
    """Sign the canonical JSON of the token's binding document."""
    public_key = signer.public_key_bytes()
    return SignedPlanToken(
        plan_token=token.to_protocol(),
        binding=token.binding.document(),
        signature=base64.b64encode(signer.sign(token.binding.canonical())).decode("ascii"),
        key_id=signer.key_id,
        public_key=base64.b64encode(public_key).decode("ascii"),
    )


def verify_signed(
    envelope: Mapping[str, Any], trusted_public_key: bytes | None = None
) -> list[str]:
    """Return every problem with a signed envelope; an empty list means it verifies.

    Without ``trusted_public_key`` only self-consistency is checked (any key signs); pass
    the orchestrator's key to check authenticity.
    """
    if not isinstance(envelope, Mapping):
        return ["the envelope is not an object"]
    expected = {"plan_token", "binding", "signature", "key_id", "public_key", "algorithm"}
    if set(envelope) != expected:
        return [f"the envelope must have exactly the keys {', '.join(sorted(expected))}"]
    problems = _consistency(envelope["plan_token"], envelope["binding"])
    if envelope["algorithm"] != SIGNATURE_ALGORITHM:
        problems.append(f"unsupported signature algorithm {envelope['algorithm']!r}")
        return problems
    public_key = _b64(envelope["public_key"])
    signature = _b64(envelope["signature"])
    if public_key is None:
        problems.append("public_key is not base64")
    if signature is None:
        problems.append("signature is not base64")
    if public_key is None or signature is None:
        return problems
    if envelope["key_id"] != key_id_for(public_key):
        problems.append("key_id does not match the public key")
    if trusted_public_key is not None and public_key != trusted_public_key:
        problems.append("signed by a key that is not trusted")
    try:
        signed_bytes = canonical_json(envelope["binding"])
    except Exception:  # rfc8785 refuses values outside the I-JSON domain
        problems.append("the binding document cannot be canonicalised")
        return problems
    if not verify(public_key, signed_bytes, signature):
        problems.append("signature does not verify over the binding document")
    return problems


def _b64(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def diff_tokens(expected: PlanToken | PlanBinding, actual: PlanToken | PlanBinding) -> list[str]:
    """Return human-readable differences between two plans; empty when they bind the same."""
    old = expected.binding if isinstance(expected, PlanToken) else expected
    new = actual.binding if isinstance(actual, PlanToken) else actual
    differences: list[str] = []
    for field, label in (
        ("version", "plan-token version"),
        ("workflow_id", "workflow id"),
        ("step_id", "step id"),
        ("engine_id", "engine id"),
        ("protocol_version", "protocol version"),
        ("model", "model"),
        ("workspace_hash", "workspace hash"),
        ("policy_digest", "policy digest"),
        ("governance_hash", "governance hash"),
    ):
        before, after = getattr(old, field), getattr(new, field)
        if before != after:
            differences.append(f"{label} changed ({_short(before)} -> {_short(after)})")
    differences.extend(_artifact_differences(old.artifacts, new.artifacts))
    return differences


def _artifact_differences(old: Sequence[PlanArtifact], new: Sequence[PlanArtifact]) -> list[str]:
    before = {artifact.name: artifact for artifact in old}
    after = {artifact.name: artifact for artifact in new}
    differences: list[str] = []
    for name in sorted(set(before) | set(after)):
        if name not in after:
            differences.append(f"artifact {name} missing")
            continue
        if name not in before:
            differences.append(f"artifact {name} added")
            continue
        a, b = before[name], after[name]
        if a.hash == b.hash:
            continue
        what = []
        if a.role != b.role:
            what.append(f"role {a.role} -> {b.role}")
        if a.metadata_sha256 != b.metadata_sha256:
            what.append("artifact.json changed")
        if a.body_sha256 != b.body_sha256:
            if a.body_sha256 is None:
                what.append("body added")
            elif b.body_sha256 is None:
                what.append("body removed")
            else:
                what.append("body changed")
        if a.size != b.size:
            what.append(f"size {a.size} -> {b.size}")
        differences.append(f"artifact {name} hash changed ({', '.join(what)})")
    return differences


def _short(value: str | None) -> str:
    if value is None:
        return "none"
    return value[:12] + "…" if len(value) > 16 else value


def integrity_check(
    expected: PlanToken, actual: PlanToken | None, extra_differences: Sequence[str] = ()
) -> dict[str, Any]:
    """Return the protocol's AuditIntegrity object comparing the approved and current plans.

    ``actual`` is ``None`` when the current plan could not be recomputed (for example a
    corrupted artifact store); ``extra_differences`` says why.
    """
    differences = list(extra_differences)
    result: dict[str, Any] = {"expected_plan_token": expected.token}
    if actual is None:
        result.update(plan_token_match=False, artifacts_match=False)
    else:
        differences = diff_tokens(expected, actual) + differences
        result["actual_plan_token"] = actual.token
        result["plan_token_match"] = expected.token == actual.token and not extra_differences
        result["artifacts_match"] = (
            not _artifact_differences(expected.binding.artifacts, actual.binding.artifacts)
            and not extra_differences
        )
    result["differences"] = differences
    return result


__all__ = [
    "PLAN_TOKEN_VERSION",
    "PlanArtifact",
    "PlanBinding",
    "PlanToken",
    "PlanTokenError",
    "SignedPlanToken",
    "diff_tokens",
    "integrity_check",
    "sign_plan_token",
    "verify_signed",
]
