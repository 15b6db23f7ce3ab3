"""Protocol plumbing shared by the CabinCrew engines: input, artifacts and the receipt.

Standard library only: engines run as plain subprocesses, possibly on machines where the
CabinCrew package is not installed. Each engine puts this directory on ``sys.path``
relative to its own file, so ``engines/`` must be shipped as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

PROTOCOL_VERSION = "1"
SUPPORTED_PROTOCOL_VERSIONS = frozenset({PROTOCOL_VERSION})
MODES = ("flight-plan", "take-off")
ROLES = frozenset({"evidence", "state", "log"})
ARTIFACT_FILE = "artifact.json"
BODY_FILE = "body.data"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_VALIDATION = 2

MAX_INPUT_BYTES = 16 * 1024 * 1024
MAX_ARTIFACT_JSON_BYTES = 4 * 1024 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024

# Artifact names become directory names and appear in receipts and audit records, so they
# are restricted to a portable, unambiguous alphabet.
ARTIFACT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
SHA256_HEX_RE = re.compile(r"^[0-9a-f]{64}$")

_INPUT_KEYS = frozenset(
    {
        "protocol_version",
        "mode",
        "meta",
        "config",
        "secrets",
        "allowed_secrets",
        "context",
        "identity_token",
        "orchestrator",
        "expected_plan_token",
    }
)
_ORCHESTRATOR_KEYS = frozenset({"run_index", "workspace_hash", "artifacts_salt"})


class EngineError(Exception):
    """A failure that ends the run with a failure receipt and exit code 1."""

    exit_code = EXIT_FAILURE

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class ValidationError(EngineError):
    """Bad arguments, environment, input, config or state artifacts: exit code 2."""

    exit_code = EXIT_VALIDATION


def sha256_hex(data: bytes) -> str:
    """Return the lowercase hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """Return a deterministic UTF-8 JSON encoding (sorted keys, no whitespace)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def is_within(root: str, path: str) -> bool:
    """Return True when the resolved ``path`` is ``root`` or lies below it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_regular_file(path: str, limit: int) -> bytes:
    """Read a regular file without following a symlink in its last component."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise OSError(f"{path} is larger than {limit} bytes")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_new_file(path: str, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` (never overwrite, never follow a symlink) and write ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


class Run:
    """One engine invocation: validated input, environment, and what the receipt reports."""

    def __init__(
        self,
        engine_id: str,
        mode: str,
        request: Mapping[str, Any],
        workspace: str,
        artifacts_dir: str,
        temp_dir: str | None,
    ) -> None:
        self.engine_id = engine_id
        self.mode = mode
        self.request = request
        self.workspace = workspace
        self.artifacts_dir = artifacts_dir
        self.temp_dir = temp_dir
        self.artifacts: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.metrics: list[dict[str, Any]] = []
        self.diagnostics: dict[str, Any] = {}

    @property
    def config(self) -> Mapping[str, Any]:
        """The step's config object (empty when absent)."""
        value = self.request.get("config")
        return value if isinstance(value, Mapping) else {}

    @property
    def secrets(self) -> Mapping[str, Any]:
        """The secrets the orchestrator mapped to this step (empty when absent)."""
        value = self.request.get("secrets")
        return value if isinstance(value, Mapping) else {}

    def warn(self, message: str) -> None:
        """Record a warning for the receipt and echo it to stderr."""
        self.warnings.append(message)
        log(f"warning: {message}")

    def metric(self, name: str, value: float, **tags: Any) -> None:
        """Record a numeric metric for the receipt."""
        entry: dict[str, Any] = {"name": name, "value": value}
        if tags:
            entry["tags"] = tags
        self.metrics.append(entry)

    def write_artifact(
        self,
        name: str,
        role: str,
        *,
        artifact_type: str,
        action: str,
        mime: str,
        target: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        body: Any = None,
        data: bytes | None = None,
    ) -> dict[str, Any]:
        """Write ``<name>/artifact.json`` (+ ``body.data``) and return its receipt entry."""
        if not ARTIFACT_NAME_RE.match(name):
            raise EngineError("internal_error", f"unsafe artifact name {name!r}")
        if role not in ROLES:
            raise EngineError("internal_error", f"unknown artifact role {role!r}")
        document: dict[str, Any] = {"artifact_type": artifact_type, "action": action, "mime": mime}
        if target is not None:
            document["target"] = target
        if body is not None:
            document["body"] = body
        if data is not None:
            document["body_file"] = BODY_FILE
        if metadata is not None:
            document["metadata"] = dict(metadata)
        # Stable bytes: the same plan must produce byte-identical artifacts on every run.
        encoded = (
            json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
            + "\n"
        ).encode("utf-8")
        directory = os.path.join(self.artifacts_dir, name)
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            raise EngineError(
                "artifact_conflict", f"artifact {name!r} already exists", artifact=name
            ) from None
        write_new_file(os.path.join(directory, ARTIFACT_FILE), encoded)
        if data is not None:
            write_new_file(os.path.join(directory, BODY_FILE), data)
        hashed = data if data is not None else encoded
        entry = {
            "name": name,
            "role": role,
            "path": name,
            "hash": sha256_hex(hashed),
            "size": len(hashed),
        }
        self.artifacts.append(entry)
        return entry

    def list_artifacts(self) -> list[str]:
        """Return the names of the artifacts present in ARTIFACTS_DIR, sorted."""
        names = []
        for entry in sorted(os.listdir(self.artifacts_dir)):
            path = os.path.join(self.artifacts_dir, entry)
            if not ARTIFACT_NAME_RE.match(entry) or not stat.S_ISDIR(os.lstat(path).st_mode):
                raise ValidationError(
                    "state_invalid", f"unexpected entry {entry!r} in artifacts dir", artifact=entry
                )
            names.append(entry)
        return names

    def read_artifact(self, name: str) -> tuple[dict[str, Any], bytes | None]:
        """Read a restored artifact's JSON and body, refusing anything malformed."""
        directory = os.path.join(self.artifacts_dir, name)
        try:
            if not stat.S_ISDIR(os.lstat(directory).st_mode):
                raise OSError("not a directory")
            raw = read_regular_file(os.path.join(directory, ARTIFACT_FILE), MAX_ARTIFACT_JSON_BYTES)
            document = json.loads(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValidationError(
                "state_invalid", f"artifact {name!r} is missing or unreadable: {exc}", artifact=name
            ) from None
        if not isinstance(document, dict) or not all(
            isinstance(document.get(key), str) for key in ("artifact_type", "action", "mime")
        ):
            raise ValidationError(
                "state_invalid", f"artifact {name!r} is not a valid artifact", artifact=name
            )
        body_path = os.path.join(directory, BODY_FILE)
        has_body = os.path.lexists(body_path)
        if document.get("body_file") not in (None, BODY_FILE) or (
            has_body != (document.get("body_file") == BODY_FILE)
        ):
            raise ValidationError(
                "state_invalid", f"artifact {name!r} body_file does not match", artifact=name
            )
        if not has_body:
            return document, None
        try:
            return document, read_regular_file(body_path, MAX_BODY_BYTES)
        except OSError as exc:
            raise ValidationError(
                "state_invalid", f"artifact {name!r} body is unreadable: {exc}", artifact=name
            ) from None


def log(message: str) -> None:
    """Write one human-readable log line to stderr (stdout is reserved for the receipt)."""
    print(message, file=sys.stderr, flush=True)


def _parse_mode(argv: list[str]) -> str:
    """Accept exactly ``--mode <mode>`` or ``--mode=<mode>``."""
    if len(argv) == 2 and argv[0] == "--mode":
        mode = argv[1]
    elif len(argv) == 1 and argv[0].startswith("--mode="):
        mode = argv[0].split("=", 1)[1]
    else:
        raise ValidationError("invalid_arguments", "usage: engine --mode flight-plan|take-off")
    if mode not in MODES:
        raise ValidationError("invalid_arguments", f"unknown mode {mode!r}")
    return mode


def _directory_from_env(variable: str) -> str:
    """Return the resolved directory named by a required environment variable."""
    value = os.environ.get(variable, "")
    if not value or not os.path.isabs(value):
        raise ValidationError("invalid_environment", f"{variable} must be an absolute path")
    if not os.path.isdir(value):
        raise ValidationError("invalid_environment", f"{variable} is not a directory")
    return os.path.realpath(value)


def _read_input() -> bytes:
    """Read the raw EngineInput from CABINCREW_INPUT_FILE when set, else from stdin."""
    path = os.environ.get("CABINCREW_INPUT_FILE")
    try:
        if path:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_INPUT_BYTES + 1)
        else:
            raw = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise ValidationError("invalid_input", f"cannot read input: {exc.strerror}") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise ValidationError("invalid_input", f"input is larger than {MAX_INPUT_BYTES} bytes")
    return raw


def _check_input(request: Any, mode: str) -> Mapping[str, Any]:
    """Check the EngineInput shape the protocol schema prescribes."""

    def fail(message: str) -> ValidationError:
        return ValidationError("invalid_input", message)

    if not isinstance(request, dict):
        raise fail("input must be a JSON object")
    unknown = sorted(set(request) - _INPUT_KEYS)
    if unknown:
        raise fail(f"unknown input fields: {', '.join(unknown)}")
    version = request.get("protocol_version")
    if not isinstance(version, str):
        raise fail("protocol_version must be a string")
    if version not in SUPPORTED_PROTOCOL_VERSIONS:
        raise fail(f"unsupported protocol_version {version!r}")
    if request.get("mode") != mode:
        raise fail("input mode does not match --mode")
    meta = request.get("meta")
    if (
        not isinstance(meta, dict)
        or set(meta) != {"workflow_id", "step_id"}
        or not all(isinstance(value, str) for value in meta.values())
    ):
        raise fail("meta must hold exactly the strings workflow_id and step_id")
    for key in ("config", "secrets", "context"):
        if key in request and not isinstance(request[key], dict):
            raise fail(f"{key} must be an object")
    allowed = request.get("allowed_secrets", [])
    if not isinstance(allowed, list) or not all(isinstance(item, str) for item in allowed):
        raise fail("allowed_secrets must be an array of strings")
    for key in ("identity_token", "expected_plan_token"):
        if key in request and not isinstance(request[key], str):
            raise fail(f"{key} must be a string")
    orchestrator = request.get("orchestrator", {})
    if not isinstance(orchestrator, dict) or set(orchestrator) - _ORCHESTRATOR_KEYS:
        raise fail("orchestrator must be an object with run_index, workspace_hash, artifacts_salt")
    run_index = orchestrator.get("run_index", 0)
    if isinstance(run_index, bool) or not isinstance(run_index, int) or run_index < 0:
        raise fail("orchestrator.run_index must be a non-negative integer")
    for key in ("workspace_hash", "artifacts_salt"):
        if key in orchestrator and not isinstance(orchestrator[key], str):
            raise fail(f"orchestrator.{key} must be a string")
    # Take-off is only legitimate for a plan the orchestrator verified; an engine launched
    # without the token it was verified against is outside the governed path.
    if mode == "take-off" and not request.get("expected_plan_token"):
        raise fail("take-off requires expected_plan_token")
    return request


def load_run(engine_id: str, argv: list[str]) -> Run:
    """Parse arguments, environment and input into a validated ``Run``."""
    # Input is drained first so a launcher writing to our stdin never sees a broken pipe.
    input_error: ValidationError | None = None
    raw = b""
    try:
        raw = _read_input()
    except ValidationError as exc:
        input_error = exc
    mode = _parse_mode(argv)
    env_mode = os.environ.get("CABINCREW_MODE")
    if env_mode is not None and env_mode != mode:
        raise ValidationError("invalid_environment", "CABINCREW_MODE does not match --mode")
    workspace = _directory_from_env("CABINCREW_WORKSPACE")
    artifacts_dir = _directory_from_env("CABINCREW_ARTIFACTS_DIR")
    if is_within(workspace, artifacts_dir):
        # Writing artifacts there would mutate the workspace during flight-plan.
        raise ValidationError("invalid_environment", "artifacts dir lies inside the workspace")
    temp_dir = None
    if os.environ.get("CABINCREW_TEMP_DIR"):
        temp_dir = _directory_from_env("CABINCREW_TEMP_DIR")
    if mode == "flight-plan" and os.listdir(artifacts_dir):
        raise ValidationError("invalid_environment", "artifacts dir must be empty for flight-plan")
    if input_error is not None:
        raise input_error
    try:
        request = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValidationError("invalid_input", "input is not valid UTF-8 JSON") from None
    return Run(engine_id, mode, _check_input(request, mode), workspace, artifacts_dir, temp_dir)


def _redact(value: Any, secrets: Iterable[str]) -> Any:
    """Replace every secret value inside strings of ``value`` (defence in depth)."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "[REDACTED]")
        return value
    if isinstance(value, list):
        return [_redact(item, secrets) for item in value]
    if isinstance(value, dict):
        return {key: _redact(item, secrets) for key, item in value.items()}
    return value


def _fallback_mode(argv: list[str]) -> str:
    """Pick a schema-valid mode for a receipt when the arguments could not be parsed."""
    for candidate in (*argv, os.environ.get("CABINCREW_MODE", "")):
        candidate = candidate.removeprefix("--mode=")
        if candidate in MODES:
            return candidate
    return MODES[0]


def build_receipt(
    engine_id: str, mode: str, run: Run | None, error: EngineError | None
) -> dict[str, Any]:
    """Assemble the EngineOutput receipt for this invocation."""
    request: Mapping[str, Any] = run.request if run is not None else {}
    receipt: dict[str, Any] = {
        "protocol_version": str(request.get("protocol_version", PROTOCOL_VERSION)),
        "engine_id": engine_id,
        "mode": mode,
        "status": "failure" if error is not None else "success",
        "artifacts": list(run.artifacts) if run is not None else [],
        "warnings": list(run.warnings) if run is not None else [],
        "metrics": list(run.metrics) if run is not None else [],
    }
    diagnostics = dict(run.diagnostics) if run is not None else {}
    if error is not None:
        receipt["error"] = error.message
        diagnostics.update(error.details)
        diagnostics["error_code"] = error.code
    if diagnostics:
        receipt["diagnostics"] = diagnostics
    if mode == "take-off" and isinstance(request.get("expected_plan_token"), str):
        # Echoed, never computed: binds the receipt to the plan the orchestrator verified.
        receipt["plan_token"] = request["expected_plan_token"]
    if run is not None:
        values = sorted(
            (value for value in run.secrets.values() if isinstance(value, str) and value),
            key=len,
            reverse=True,
        )
        # Only free text is redacted: hashes and names are ours and must stay intact.
        for key in ("error", "warnings", "diagnostics"):
            if key in receipt:
                receipt[key] = _redact(receipt[key], values)
    # Derived, not random: the same invocation with the same outcome has the same id.
    identity = {
        "receipt": receipt,
        "meta": request.get("meta"),
        "orchestrator": request.get("orchestrator"),
    }
    receipt["receipt_id"] = "rcpt-" + sha256_hex(canonical_json(identity))[:32]
    return receipt


def main(engine_id: str, handlers: Mapping[str, Callable[[Run], None]]) -> int:
    """Run the handler for ``--mode``, print exactly one receipt, return the exit code."""
    argv = sys.argv[1:]
    receipt_stream = sys.stdout
    # Anything printed by accident goes to stderr: stdout must carry one receipt only.
    sys.stdout = sys.stderr
    run: Run | None = None
    mode = _fallback_mode(argv)
    error: EngineError | None = None
    try:
        run = load_run(engine_id, argv)
        mode = run.mode
        handlers[mode](run)
    except EngineError as exc:
        error = exc
    except Exception as exc:  # the receipt must still be emitted, whatever went wrong
        traceback.print_exc(file=sys.stderr)
        error = EngineError("internal_error", f"internal error: {type(exc).__name__}")
    receipt = build_receipt(engine_id, mode, run, error)
    if error is not None:
        log(f"{engine_id} {mode} failed: {receipt.get('error')}")
    # ASCII-only so the receipt survives any stdout encoding the launcher chose.
    receipt_stream.write(json.dumps(receipt, sort_keys=True) + "\n")
    receipt_stream.flush()
    return EXIT_OK if error is None else error.exit_code
