"""Artifact validation after flight-plan, and the content-addressed artifact store.

Layout an engine must write (and nothing else)::

    ARTIFACTS_DIR/<name>/artifact.json    (valid against the protocol's Artifact schema)
    ARTIFACTS_DIR/<name>/body.data        (optional; then artifact.json has body_file "body.data")

The receipt declares each artifact as ``{name, role, path: <name>, hash, size}`` where
``hash``/``size`` are the SHA-256 hex and byte size of ``body.data`` when present, else of
``artifact.json`` (the rule in engines/README.md). Validation reports every problem at once.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import re
import secrets as secrets_module
import stat
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cabincrew.canonical import canonical_hash
from cabincrew.plantoken import PlanArtifact
from orchestrator_svc import schemacheck
from orchestrator_svc.errors import ArtifactIntegrityError, ArtifactValidationError

ARTIFACT_FILE = "artifact.json"
BODY_FILE = "body.data"
OUTPUTS_ARTIFACT = "outputs"
ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_BUFFER = 1 << 20


class Role(enum.Enum):
    """An artifact's role; values are the protocol's strings."""

    EVIDENCE = "evidence"
    STATE = "state"
    LOG = "log"


@dataclass(frozen=True)
class ArtifactLimits:
    """Bounds on what an engine may leave in its artifacts dir."""

    max_artifacts: int = 256
    max_artifact_json_bytes: int = 4 << 20
    max_body_bytes: int = 64 << 20
    max_total_bytes: int = 256 << 20
    max_outputs_bytes: int = 1 << 20


def is_safe_name(name: str) -> bool:
    """Whether ``name`` may be an artifact (directory) name."""
    return bool(ARTIFACT_NAME.match(name)) and ".." not in name


@dataclass(frozen=True)
class Artifact:
    """A validated artifact: its name, role, parsed artifact.json and integrity data."""

    name: str
    role: Role
    document: Mapping[str, Any]
    artifact_json_sha256: str
    artifact_json_size: int
    metadata_sha256: str
    body_sha256: str | None = None
    body_size: int | None = None

    def __post_init__(self) -> None:
        if not is_safe_name(self.name):
            raise ValueError(f"unsafe artifact name {self.name!r}")
        digests = [
            self.artifact_json_sha256,
            self.metadata_sha256,
            *([self.body_sha256] if self.body_sha256 else []),
        ]
        if not all(SHA256_HEX.match(d) for d in digests):
            raise ValueError("artifact digests must be lowercase SHA-256 hex")
        if (self.body_sha256 is None) != (self.body_size is None):
            raise ValueError("body digest and size go together")

    @property
    def hash(self) -> str:
        """The receipt hash: of body.data when present, else of artifact.json."""
        return self.body_sha256 if self.body_sha256 is not None else self.artifact_json_sha256

    @property
    def size(self) -> int:
        """The receipt size: of body.data when present, else of artifact.json."""
        return self.body_size if self.body_size is not None else self.artifact_json_size

    def descriptor(self) -> dict[str, Any]:
        """Return ``{name, role, path, hash, size}`` as receipts and audit events carry it."""
        return {
            "name": self.name,
            "role": self.role.value,
            "path": self.name,
            "hash": self.hash,
            "size": self.size,
        }

    def plan_artifact(self) -> PlanArtifact:
        """Return what the plan-token binds of this artifact."""
        return PlanArtifact(
            name=self.name,
            role=self.role.value,
            metadata_sha256=self.metadata_sha256,
            body_sha256=self.body_sha256,
            size=self.size,
        )


@dataclass(frozen=True)
class _Scanned:
    name: str
    document: dict[str, Any]
    json_sha256: str
    json_size: int
    metadata_sha256: str
    body_sha256: str | None
    body_size: int | None

    @property
    def hash(self) -> str:
        return self.body_sha256 if self.body_sha256 is not None else self.json_sha256

    @property
    def size(self) -> int:
        return self.body_size if self.body_size is not None else self.json_size


def validate_artifacts(
    artifacts_dir: Path,
    receipt: Mapping[str, Any],
    limits: ArtifactLimits | None = None,
    secrets: Mapping[str, str] | None = None,
    exclude: Collection[str] = (),
) -> tuple[Artifact, ...]:
    """Check the artifacts dir against the contract and the receipt; return them sorted by name.

    ``secrets`` maps secret names to values that must not appear in any artifact;
    ``exclude`` names artifacts on disk to ignore (those restored for take-off).
    Raises ``ArtifactValidationError`` listing every problem.
    """
    limits = limits or ArtifactLimits()
    problems: list[str] = []
    scanned, failed = _scan(
        Path(artifacts_dir), limits, dict(secrets or {}), set(exclude), problems
    )
    declared = receipt.get("artifacts", [])
    roles: dict[str, Role] = {}
    seen: set[str] = set()
    for index, entry in enumerate(declared):
        name = entry.get("name")
        label = (
            f"receipt artifact {name!r}" if isinstance(name, str) else f"receipt artifacts[{index}]"
        )
        if not isinstance(name, str) or not is_safe_name(name):
            problems.append(f"{label}: unsafe name")
            continue
        if name in seen:
            problems.append(f"{label}: declared twice")
            continue
        seen.add(name)
        try:
            roles[name] = Role(entry.get("role"))
        except ValueError:
            problems.append(f"{label}: role must be one of evidence, state, log")
        if entry.get("path") != name:
            problems.append(f"{label}: path must be {name!r}")
        if name in failed:
            continue
        found = scanned.get(name)
        if found is None:
            problems.append(f"{label}: declared but missing from the artifacts dir")
            continue
        if entry.get("hash") != found.hash:
            problems.append(
                f"{label}: hash mismatch (declared {entry.get('hash')!r}, found {found.hash!r})"
            )
        size = entry.get("size")
        if size is None:
            problems.append(f"{label}: size is not declared")
        elif isinstance(size, bool) or not isinstance(size, int | float) or size != found.size:
            problems.append(f"{label}: size mismatch (declared {size!r}, found {found.size})")
    for name in sorted(set(scanned) | failed):
        if name not in seen:
            problems.append(f"artifact {name!r}: on disk but not declared in the receipt")
    if problems:
        raise ArtifactValidationError(problems)
    return tuple(
        Artifact(
            name=item.name,
            role=roles[item.name],
            document=item.document,
            artifact_json_sha256=item.json_sha256,
            artifact_json_size=item.json_size,
            metadata_sha256=item.metadata_sha256,
            body_sha256=item.body_sha256,
            body_size=item.body_size,
        )
        for item in sorted(scanned.values(), key=lambda item: item.name)
    )


def _scan(
    root: Path,
    limits: ArtifactLimits,
    secrets: dict[str, str],
    exclude: set[str],
    problems: list[str],
) -> tuple[dict[str, _Scanned], set[str]]:
    """Scan every artifact dir; return the good ones and the names of the bad ones."""
    try:
        info = root.lstat()
    except FileNotFoundError:
        problems.append("the artifacts dir does not exist")
        return {}, set()
    if not stat.S_ISDIR(info.st_mode):
        problems.append("the artifacts dir is not a directory (or is a link)")
        return {}, set()
    scanned: dict[str, _Scanned] = {}
    failed: set[str] = set()
    folded: dict[str, str] = {}
    total = 0
    with os.scandir(root) as listing:
        entries = sorted(listing, key=lambda entry: entry.name)
    entries = [entry for entry in entries if entry.name not in exclude]
    if len(entries) > limits.max_artifacts:
        problems.append(
            f"{len(entries)} entries in the artifacts dir; at most {limits.max_artifacts} allowed"
        )
        return {}, {entry.name for entry in entries}
    for entry in entries:
        name = entry.name
        before = len(problems)
        if not is_safe_name(name):
            problems.append(f"artifact {name!r}: unsafe name")
        elif name.lower() in folded:
            problems.append(
                f"artifact {name!r}: name differs only in case from {folded[name.lower()]!r}"
            )
        folded.setdefault(name.lower(), name)
        entry_info = os.lstat(entry.path)
        if stat.S_ISLNK(entry_info.st_mode):
            problems.append(f"artifact {name!r}: is a symbolic link")
        elif not stat.S_ISDIR(entry_info.st_mode):
            problems.append(f"artifact {name!r}: is not a directory ({_kind(entry_info.st_mode)})")
        if len(problems) > before:
            failed.add(name)
            continue
        item, size = _scan_one(root / name, name, limits, secrets, problems)
        total += size
        if item is None:
            failed.add(name)
        else:
            scanned[name] = item
    if total > limits.max_total_bytes:
        problems.append(
            f"artifacts hold {total} bytes in all; at most {limits.max_total_bytes} allowed"
        )
    return scanned, failed


def _scan_one(
    directory: Path, name: str, limits: ArtifactLimits, secrets: dict[str, str], problems: list[str]
) -> tuple[_Scanned | None, int]:
    before = len(problems)
    files: dict[str, os.stat_result] = {}
    with os.scandir(directory) as listing:
        for entry in sorted(listing, key=lambda entry: entry.name):
            info = os.lstat(entry.path)
            if entry.name not in (ARTIFACT_FILE, BODY_FILE):
                problems.append(f"artifact {name!r}: unexpected entry {entry.name!r}")
            elif stat.S_ISLNK(info.st_mode):
                problems.append(f"artifact {name!r}: {entry.name} is a symbolic link")
            elif not stat.S_ISREG(info.st_mode):
                problems.append(
                    f"artifact {name!r}: {entry.name} is not a regular file ({_kind(info.st_mode)})"
                )
            elif info.st_nlink != 1:
                problems.append(f"artifact {name!r}: {entry.name} is a hard link")
            else:
                files[entry.name] = info
    size = sum(info.st_size for info in files.values())
    if ARTIFACT_FILE not in files and not any(ARTIFACT_FILE in p for p in problems[before:]):
        problems.append(f"artifact {name!r}: {ARTIFACT_FILE} is missing")
    if ARTIFACT_FILE in files and files[ARTIFACT_FILE].st_size > limits.max_artifact_json_bytes:
        problems.append(
            f"artifact {name!r}: {ARTIFACT_FILE} is larger than "
            f"{limits.max_artifact_json_bytes} bytes"
        )
    if BODY_FILE in files and files[BODY_FILE].st_size > limits.max_body_bytes:
        problems.append(
            f"artifact {name!r}: {BODY_FILE} is larger than {limits.max_body_bytes} bytes"
        )
    if len(problems) > before:
        return None, size
    raw = _read_small(
        directory / ARTIFACT_FILE, files[ARTIFACT_FILE], limits.max_artifact_json_bytes
    )
    if raw is None:
        problems.append(f"artifact {name!r}: {ARTIFACT_FILE} changed while it was read")
        return None, size
    document = _parse_artifact_json(raw, name, problems)
    body_sha: str | None = None
    body_size: int | None = None
    has_body = BODY_FILE in files
    if document is not None:
        body_file = document.get("body_file")
        if body_file is not None and body_file != BODY_FILE:
            problems.append(f"artifact {name!r}: body_file must be {BODY_FILE!r}")
        elif (body_file == BODY_FILE) != has_body:
            problems.append(
                f"artifact {name!r}: body_file says {body_file!r} but {BODY_FILE} is "
                f"{'present' if has_body else 'absent'}"
            )
    leaked = [secret for secret, value in secrets.items() if value and value.encode() in raw]
    if has_body:
        digest = _hash_file(directory / BODY_FILE, files[BODY_FILE], secrets)
        if digest is None:
            problems.append(f"artifact {name!r}: {BODY_FILE} changed while it was read")
        else:
            body_sha, body_size, body_leaks = digest
            leaked += body_leaks
    for secret in sorted(set(leaked)):
        problems.append(f"artifact {name!r}: contains the value of secret {secret}")
    if len(problems) > before or document is None:
        return None, size
    try:
        metadata_sha = canonical_hash(document)
    except Exception:  # rfc8785 refuses numbers outside the I-JSON range
        problems.append(
            f"artifact {name!r}: {ARTIFACT_FILE} holds values that cannot be canonicalised"
        )
        return None, size
    return (
        _Scanned(
            name=name,
            document=document,
            json_sha256=hashlib.sha256(raw).hexdigest(),
            json_size=len(raw),
            metadata_sha256=metadata_sha,
            body_sha256=body_sha,
            body_size=body_size,
        ),
        size,
    )


def _parse_artifact_json(raw: bytes, name: str, problems: list[str]) -> dict[str, Any] | None:
    try:
        document = strict_json_loads(raw)
    except ValueError:
        problems.append(f"artifact {name!r}: {ARTIFACT_FILE} is not valid UTF-8 JSON")
        return None
    if not isinstance(document, dict):
        problems.append(f"artifact {name!r}: {ARTIFACT_FILE} is not a JSON object")
        return None
    errors = schemacheck.errors("Artifact", document)
    for error in errors[:5]:
        problems.append(f"artifact {name!r}: {ARTIFACT_FILE} {error}")
    return None if errors else document


def strict_json_loads(raw: bytes) -> Any:
    """Parse UTF-8 JSON, refusing duplicate keys and NaN/Infinity (``ValueError``)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for key, value in items:
            if key in document:
                raise ValueError(f"duplicate key {key!r}")
            document[key] = value
        return document

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)


def _open_regular(path: Path, expected: os.stat_result) -> int | None:
    """Open without following links or blocking on FIFOs; None if it is not the file we listed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != (
        expected.st_dev,
        expected.st_ino,
    ):
        os.close(fd)
        return None
    return fd


def _read_small(path: Path, expected: os.stat_result, limit: int) -> bytes | None:
    fd = _open_regular(path, expected)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    return data if len(data) == expected.st_size and len(data) <= limit else None


def _hash_file(
    path: Path, expected: os.stat_result, secrets: Mapping[str, str]
) -> tuple[str, int, list[str]] | None:
    """Hash a file in 1 MiB blocks, noting which secret values occur in it."""
    fd = _open_regular(path, expected)
    if fd is None:
        return None
    needles = {name: value.encode() for name, value in secrets.items() if value}
    keep = max((len(value) for value in needles.values()), default=1) - 1
    leaked: set[str] = set()
    digest = hashlib.sha256()
    size = 0
    carry = b""
    with os.fdopen(fd, "rb") as handle:
        while block := handle.read(_BUFFER):
            digest.update(block)
            size += len(block)
            if needles:
                window = carry + block
                leaked.update(name for name, value in needles.items() if value in window)
                carry = window[-keep:] if keep else b""
    if size != expected.st_size:
        return None
    return digest.hexdigest(), size, sorted(leaked)


def _kind(mode: int) -> str:
    for test, word in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return word
    return "a special file"


def extract_outputs(
    receipt: Mapping[str, Any],
    artifacts_dir: Path,
    artifacts: Sequence[Artifact],
    limits: ArtifactLimits | None = None,
) -> dict[str, Any]:
    """Return a step's outputs: receipt metrics (name -> value), then the ``outputs`` artifact.

    The evidence artifact named ``outputs`` holds a JSON object, inline as artifact.json's
    ``body`` or as body.data; its keys override metric names.
    """
    limits = limits or ArtifactLimits()
    outputs: dict[str, Any] = {}
    for metric in receipt.get("metrics", []):
        outputs[metric["name"]] = metric["value"]
    artifact = next((item for item in artifacts if item.name == OUTPUTS_ARTIFACT), None)
    if artifact is None:
        return outputs
    document = _outputs_document(artifact, Path(artifacts_dir) / artifact.name / BODY_FILE, limits)
    outputs.update(document)
    return outputs


def _outputs_document(
    artifact: Artifact, body_path: Path, limits: ArtifactLimits
) -> dict[str, Any]:
    problem = f"artifact {OUTPUTS_ARTIFACT!r}"
    if artifact.role is not Role.EVIDENCE:
        raise ArtifactValidationError([f"{problem}: must have the role evidence"])
    if artifact.body_sha256 is None:
        value = artifact.document.get("body")
    else:
        if (artifact.body_size or 0) > limits.max_outputs_bytes:
            raise ArtifactValidationError(
                [f"{problem}: larger than {limits.max_outputs_bytes} bytes"]
            )
        data = _read_verified(body_path, artifact.body_sha256)
        try:
            value = strict_json_loads(data)
        except ValueError:
            raise ArtifactValidationError([f"{problem}: body.data is not JSON"]) from None
    if not isinstance(value, dict):
        raise ArtifactValidationError([f"{problem}: must hold a JSON object"])
    return value


def _read_verified(path: Path, digest: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ArtifactIntegrityError(
            f"{path.name} of {path.parent.name!r} changed after validation"
        )
    return data


# --- the store ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredArtifact:
    """The record that locates a stored artifact's files by content hash."""

    name: str
    role: Role
    artifact_json_sha256: str
    artifact_json_size: int
    body_sha256: str | None = None
    body_size: int | None = None

    def __post_init__(self) -> None:
        if not is_safe_name(self.name):
            raise ValueError(f"unsafe artifact name {self.name!r}")
        if not SHA256_HEX.match(self.artifact_json_sha256):
            raise ValueError("artifact_json_sha256 must be SHA-256 hex")
        if (self.body_sha256 is None) != (self.body_size is None):
            raise ValueError("body digest and size go together")
        if self.body_sha256 is not None and not SHA256_HEX.match(self.body_sha256):
            raise ValueError("body_sha256 must be SHA-256 hex")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready form, for the orchestrator's persistent state."""
        return {
            "name": self.name,
            "role": self.role.value,
            "artifact_json_sha256": self.artifact_json_sha256,
            "artifact_json_size": self.artifact_json_size,
            "body_sha256": self.body_sha256,
            "body_size": self.body_size,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoredArtifact:
        """Rebuild a record from ``to_dict`` output; malformed records raise ``ValueError``."""
        return cls(
            name=str(data["name"]),
            role=Role(data["role"]),
            artifact_json_sha256=str(data["artifact_json_sha256"]),
            artifact_json_size=int(data["artifact_json_size"]),
            body_sha256=None if data.get("body_sha256") is None else str(data["body_sha256"]),
            body_size=None if data.get("body_size") is None else int(data["body_size"]),
        )


class ArtifactStore:
    """Content-addressed, write-once artifact files: ``objects/<aa>/<sha256>``, mode 0444."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._objects = self.root / "objects"
        self._incoming = self.root / "incoming"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._incoming.mkdir(parents=True, exist_ok=True)

    def object_path(self, digest: str) -> Path:
        """Where the file with this SHA-256 lives (whether or not it is stored)."""
        if not SHA256_HEX.match(digest):
            raise ValueError("not a SHA-256 hex digest")
        return self._objects / digest[:2] / digest

    def put(self, artifacts_dir: Path, artifacts: Sequence[Artifact]) -> tuple[StoredArtifact, ...]:
        """Copy validated artifacts in, re-hashing as they are copied; return their records."""
        records = []
        for artifact in artifacts:
            directory = Path(artifacts_dir) / artifact.name
            self._put_file(directory / ARTIFACT_FILE, artifact.artifact_json_sha256, artifact.name)
            if artifact.body_sha256 is not None:
                self._put_file(directory / BODY_FILE, artifact.body_sha256, artifact.name)
            records.append(
                StoredArtifact(
                    artifact.name,
                    artifact.role,
                    artifact.artifact_json_sha256,
                    artifact.artifact_json_size,
                    artifact.body_sha256,
                    artifact.body_size,
                )
            )
        return tuple(records)

    def read(self, digest: str) -> bytes:
        """Return a stored file's bytes after checking they still hash to ``digest``."""
        path = self.object_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ArtifactIntegrityError(f"stored object {digest} is missing") from None
        with os.fdopen(fd, "rb") as handle:
            data = handle.read()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactIntegrityError(f"stored object {digest} no longer matches its hash")
        return data

    def load(self, records: Sequence[StoredArtifact]) -> tuple[Artifact, ...]:
        """Rebuild validated artifacts from the store, to recompute a plan-token before take-off."""
        problems: list[str] = []
        loaded: list[Artifact] = []
        for record in sorted(records, key=lambda record: record.name):
            try:
                raw = self.read(record.artifact_json_sha256)
                body_size = None
                if record.body_sha256 is not None:
                    body_size = self._verify_object(record.body_sha256)
            except ArtifactIntegrityError as exc:
                problems.append(f"artifact {record.name!r}: {exc.message}")
                continue
            sizes_match = len(raw) == record.artifact_json_size and body_size == record.body_size
            if not sizes_match:
                problems.append(f"artifact {record.name!r}: stored size differs from the record")
                continue
            document = strict_json_loads(raw)
            loaded.append(
                Artifact(
                    name=record.name,
                    role=record.role,
                    document=document,
                    artifact_json_sha256=record.artifact_json_sha256,
                    artifact_json_size=record.artifact_json_size,
                    metadata_sha256=canonical_hash(document),
                    body_sha256=record.body_sha256,
                    body_size=record.body_size,
                )
            )
        if problems:
            raise ArtifactIntegrityError("; ".join(problems))
        return tuple(loaded)

    def materialise(
        self,
        records: Sequence[StoredArtifact],
        destination: Path,
        roles: Collection[Role] = (Role.STATE,),
    ) -> tuple[str, ...]:
        """Write the artifacts with the given roles into an empty ``destination``; return names."""
        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=True)
        if any(destination.iterdir()):
            raise ArtifactIntegrityError(
                f"{destination} is not empty; materialise needs a fresh dir"
            )
        written = []
        for record in sorted(records, key=lambda record: record.name):
            if record.role not in roles:
                continue
            target = destination / record.name
            target.mkdir(mode=0o755)
            self._copy_out(record.artifact_json_sha256, target / ARTIFACT_FILE)
            if record.body_sha256 is not None:
                self._copy_out(record.body_sha256, target / BODY_FILE)
            written.append(record.name)
        return tuple(written)

    def _verify_object(self, digest: str) -> int:
        path = self.object_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ArtifactIntegrityError(f"stored object {digest} is missing") from None
        hasher = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "rb") as handle:
            for block in _blocks(handle):
                hasher.update(block)
                size += len(block)
        if hasher.hexdigest() != digest:
            raise ArtifactIntegrityError(f"stored object {digest} no longer matches its hash")
        return size

    def _put_file(self, source: Path, digest: str, name: str) -> None:
        final = self.object_path(digest)
        if final.exists():
            self._verify_object(digest)  # a corrupted object must not be silently reused
            return
        final.parent.mkdir(exist_ok=True)
        temp = self._incoming / f"{digest}.{secrets_module.token_hex(8)}"
        try:
            src_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            raise ArtifactIntegrityError(
                f"artifact {name!r}: {source.name} vanished after validation"
            ) from None
        try:
            with os.fdopen(src_fd, "rb") as src, open(temp, "xb") as out:
                hasher = hashlib.sha256()
                for block in _blocks(src):
                    hasher.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if hasher.hexdigest() != digest:
                raise ArtifactIntegrityError(
                    f"artifact {name!r}: {source.name} changed after validation"
                )
            os.chmod(temp, 0o444)
            try:
                # link() never replaces an existing object: a concurrent writer cannot clobber one.
                os.link(temp, final)
            except FileExistsError:
                self._verify_object(digest)
            _fsync_dir(final.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    def _copy_out(self, digest: str, target: Path) -> None:
        source = self.object_path(digest)
        try:
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ArtifactIntegrityError(f"stored object {digest} is missing") from None
        hasher = hashlib.sha256()
        with os.fdopen(fd, "rb") as src, open(target, "xb") as out:
            for block in _blocks(src):
                hasher.update(block)
                out.write(block)
        if hasher.hexdigest() != digest:
            target.unlink()
            raise ArtifactIntegrityError(f"stored object {digest} no longer matches its hash")
        os.chmod(target, 0o444)


def _blocks(handle: Any) -> Iterator[bytes]:
    while block := handle.read(_BUFFER):
        yield block


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "ARTIFACT_FILE",
    "BODY_FILE",
    "OUTPUTS_ARTIFACT",
    "Artifact",
    "ArtifactLimits",
    "ArtifactStore",
    "Role",
    "StoredArtifact",
    "extract_outputs",
    "is_safe_name",
    "strict_json_loads",
    "validate_artifacts",
]
