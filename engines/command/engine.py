#!/usr/bin/env python3
"""CabinCrew command engine: records a shell script at flight-plan, runs exactly it at take-off."""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

# The shared helper ships beside the engines; no bytecode is written next to it.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), os.pardir, "_lib"))

import enginekit as kit  # noqa: E402

ENGINE_ID = "cabincrew.command"
SCRIPT_ARTIFACT = "script"
REVIEW_ARTIFACT = "script-review"
OUTPUT_ARTIFACT = "output"
SCRIPT_MIME = "text/x-shellscript"

DEFAULT_SHELL = "/bin/sh"
DEFAULT_TIMEOUT_SECONDS = 60
MAX_TIMEOUT_SECONDS = 24 * 3600
MAX_SCRIPT_BYTES = 256 * 1024
MAX_ENV_ENTRIES = 256
OUTPUT_CAP_BYTES = 1024 * 1024  # kept per stream; the rest is counted and dropped
FILE_SIZE_LIMIT_BYTES = 1024 * 1024 * 1024
OPEN_FILES_LIMIT = 1024
READER_JOIN_SECONDS = 5.0
REDACTED = b"[REDACTED]"

# Only these are inherited from the engine's own environment: the orchestrator may have
# launched the engine with variables the script was never meant to see.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONFIG_KEYS = frozenset({"script", "shell", "timeout_seconds", "env"})


@dataclass(frozen=True)
class CommandSpec:
    """What will run: the approved script and how to run it."""

    script: str
    shell: str
    timeout_seconds: float
    env: Mapping[str, str]

    def limits(self) -> dict[str, int]:
        """Resource limits applied to the script's processes."""
        return {
            "cpu_seconds": math.ceil(self.timeout_seconds) + 1,
            "file_size_bytes": FILE_SIZE_LIMIT_BYTES,
            "open_files": OPEN_FILES_LIMIT,
            "output_cap_bytes": OUTPUT_CAP_BYTES,
        }


def parse_spec(raw: Mapping[str, Any], code: str) -> CommandSpec:
    """Validate a config (or restored metadata) into a ``CommandSpec``."""

    def fail(message: str) -> kit.ValidationError:
        return kit.ValidationError(code, message)

    script = raw.get("script")
    if not isinstance(script, str) or not script.strip():
        raise fail("script must be a non-empty string")
    try:
        size = len(script.encode("utf-8"))
    except UnicodeEncodeError:
        raise fail("script is not valid Unicode") from None
    if size > MAX_SCRIPT_BYTES or "\x00" in script:
        raise fail(f"script must be at most {MAX_SCRIPT_BYTES} bytes without NUL characters")
    shell = raw.get("shell", DEFAULT_SHELL)
    if (
        not isinstance(shell, str)
        or not shell.startswith("/")
        or posixpath.normpath(shell) != shell
        or any(ord(char) < 32 for char in shell)
    ):
        raise fail("shell must be an absolute, normalised path")
    timeout = raw.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_TIMEOUT_SECONDS
    ):
        raise fail(f"timeout_seconds must be a number in (0, {MAX_TIMEOUT_SECONDS}]")
    env = raw.get("env", {})
    if not isinstance(env, Mapping) or len(env) > MAX_ENV_ENTRIES:
        raise fail(f"env must be an object of at most {MAX_ENV_ENTRIES} entries")
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
            raise fail(f"env name {name!r} is not a valid variable name")
        if not isinstance(value, str) or "\x00" in value:
            raise fail(f"env {name} must be a string without NUL characters")
    return CommandSpec(script, shell, float(timeout), dict(sorted(env.items())))


def secret_names(names: Sequence[Any], code: str) -> list[str]:
    """Validate secret names (they become environment variable names)."""
    for name in names:
        if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
            raise kit.ValidationError(code, f"secret name {name!r} is not a valid variable name")
    return sorted(set(names))


def flight_plan(run: kit.Run) -> None:
    """Record the script and how it will run, as state and as evidence; run nothing."""
    unknown = sorted(set(run.config) - _CONFIG_KEYS)
    if unknown:
        raise kit.ValidationError("invalid_config", f"unknown config keys: {', '.join(unknown)}")
    spec = parse_spec(run.config, "invalid_config")
    if not os.access(spec.shell, os.X_OK) or os.path.isdir(spec.shell):
        raise kit.ValidationError("invalid_config", f"shell {spec.shell} is not executable")
    # Names only: the reviewer sees which secrets the script will get, never their values.
    names = secret_names([*run.request.get("allowed_secrets", []), *run.secrets], "invalid_input")
    body = spec.script.encode("utf-8")
    metadata = {
        "shell": spec.shell,
        "timeout_seconds": spec.timeout_seconds,
        "env": dict(spec.env),
        "secret_names": names,
        "script_sha256": kit.sha256_hex(body),
        "script_bytes": len(body),
        "limits": spec.limits(),
    }
    # Two artifacts with the same content: one that take-off restores, one for governance.
    for name, role in ((SCRIPT_ARTIFACT, "state"), (REVIEW_ARTIFACT, "evidence")):
        run.write_artifact(
            name,
            role,
            artifact_type="script",
            action="execute",
            mime=SCRIPT_MIME,
            target="workspace",
            metadata=metadata,
            data=body,
        )
    run.metric("script_bytes", len(body))


def load_planned(run: kit.Run) -> tuple[CommandSpec, list[str], bytes]:
    """Restore the approved script and its settings from the state artifact."""
    document, body = run.read_artifact(SCRIPT_ARTIFACT)
    metadata = document.get("metadata")
    if (
        document["artifact_type"] != "script"
        or document["action"] != "execute"
        or body is None
        or not isinstance(metadata, Mapping)
    ):
        raise kit.ValidationError("state_invalid", "script artifact is malformed")
    if metadata.get("script_sha256") != kit.sha256_hex(body):
        raise kit.ValidationError("state_invalid", "script body does not match script_sha256")
    try:
        script = body.decode("utf-8")
    except UnicodeDecodeError:
        raise kit.ValidationError("state_invalid", "script is not UTF-8") from None
    spec = parse_spec({**metadata, "script": script}, "state_invalid")
    names = metadata.get("secret_names")
    if not isinstance(names, list):
        raise kit.ValidationError("state_invalid", "secret_names is malformed")
    return spec, secret_names(names, "state_invalid"), body


def exported_secrets(run: kit.Run, planned: Sequence[str]) -> dict[str, str]:
    """Return the secrets to export: mapped now, allowed now, and named in the plan."""
    allowed = run.request.get("allowed_secrets")
    exported = {}
    for name, value in sorted(run.secrets.items()):
        if name not in planned or (allowed is not None and name not in allowed):
            run.warn(f"secret {name} is not part of the approved plan; not exported")
            continue
        if not isinstance(value, str) or "\x00" in value:
            raise kit.ValidationError("invalid_input", f"secret {name} must be a string")
        exported[name] = value
    for name in planned:
        if name not in exported:
            run.warn(f"secret {name} was planned but not provided")
    return exported


def script_environment(
    run: kit.Run, spec: CommandSpec, secrets: Mapping[str, str]
) -> dict[str, str]:
    """Build the script's environment from scratch: a few basics, config env, secrets."""
    env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env["CABINCREW_WORKSPACE"] = run.workspace
    if run.temp_dir is not None:
        env["TMPDIR"] = run.temp_dir
    env.update(spec.env)
    env.update(secrets)
    return env


def _limit_resources(limits: Mapping[str, int]) -> None:
    """Lower resource limits in the child before exec (never above the current hard limit)."""
    for kind, value in (
        (resource.RLIMIT_CPU, limits["cpu_seconds"]),
        (resource.RLIMIT_FSIZE, limits["file_size_bytes"]),
        (resource.RLIMIT_NOFILE, limits["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ):
        _, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, value))


class Capture(threading.Thread):
    """Drain one pipe, keeping at most ``keep`` bytes and counting the rest."""

    def __init__(self, stream: IO[bytes], keep: int) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.keep = keep
        self.chunks: list[bytes] = []
        self.kept = 0
        self.total = 0

    def run(self) -> None:
        """Read until end of file; draining matters so the script never blocks on a full pipe."""
        fd = self.stream.fileno()
        while chunk := os.read(fd, 65536):
            self.total += len(chunk)
            if self.kept < self.keep:
                piece = chunk[: self.keep - self.kept]
                self.chunks.append(piece)
                self.kept += len(piece)

    def data(self) -> bytes:
        """Return the kept bytes."""
        return b"".join(self.chunks)


def redact_and_cap(data: bytes, secrets: Sequence[bytes], cap: int) -> tuple[bytes, int]:
    """Cut ``data`` to ``cap`` bytes without splitting a secret, then redact every secret."""
    cut = min(len(data), cap)
    for secret in secrets:
        start = data.find(secret, max(0, cap - len(secret) + 1))
        if 0 <= start < cut:
            cut = start  # never leave a prefix of a secret at the truncation point
    kept = data[:cut]
    count = 0
    for secret in secrets:
        count += kept.count(secret)
        kept = kept.replace(secret, REDACTED)
    return kept, count


@dataclass(frozen=True)
class Outcome:
    """How the script ended."""

    returncode: int
    timed_out: bool
    duration_seconds: float


def execute(
    run: kit.Run, spec: CommandSpec, body: bytes, env: Mapping[str, str], keep: int
) -> tuple[Outcome, Capture, Capture]:
    """Run the script in the workspace, in its own process group, under limits."""
    if not os.access(spec.shell, os.X_OK) or os.path.isdir(spec.shell):
        raise kit.EngineError("shell_unavailable", f"shell {spec.shell} is not executable")
    handle, script_path = tempfile.mkstemp(prefix="script-", suffix=".sh", dir=run.temp_dir)
    try:
        with os.fdopen(handle, "wb") as script_file:
            script_file.write(body)
        limits = spec.limits()
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                [spec.shell, script_path],
                cwd=run.workspace,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # one group: a timeout kills the script and children
                preexec_fn=lambda: _limit_resources(limits),
                close_fds=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise kit.EngineError(
                "shell_unavailable", f"cannot start {spec.shell}: {exc}"
            ) from None
        assert process.stdout is not None and process.stderr is not None
        readers = (Capture(process.stdout, keep), Capture(process.stderr, keep))
        for reader in readers:
            reader.start()
        timed_out = False
        try:
            process.wait(timeout=spec.timeout_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
        # Also after a normal exit: background children must not outlive the step.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
        duration = time.monotonic() - started
        for reader in readers:
            reader.join(READER_JOIN_SECONDS)
            if reader.is_alive():
                # A process that left the group still holds the pipe; keep what we have.
                run.warn("script output was still open after the script ended")
            else:
                reader.stream.close()
    finally:
        os.unlink(script_path)
    return Outcome(process.returncode, timed_out, duration), readers[0], readers[1]


def take_off(run: kit.Run) -> None:
    """Run the approved script and record its output as a log artifact."""
    spec, planned_names, body = load_planned(run)
    secrets = exported_secrets(run, planned_names)
    secret_bytes = sorted(
        (value.encode("utf-8") for value in secrets.values() if value), key=len, reverse=True
    )
    # Keep a little more than the cap so a secret crossing the cap is seen whole.
    keep = OUTPUT_CAP_BYTES + max((len(secret) for secret in secret_bytes), default=0)
    env = script_environment(run, spec, secrets)
    kit.log(f"running approved script ({len(body)} bytes) with {spec.shell}")
    outcome, stdout, stderr = execute(run, spec, body, env, keep)

    streams: dict[str, Any] = {}
    redactions = 0
    for label, reader in (("stdout", stdout), ("stderr", stderr)):
        text, count = redact_and_cap(reader.data(), secret_bytes, OUTPUT_CAP_BYTES)
        redactions += count
        streams[label] = text.decode("utf-8", errors="replace")
        streams[f"{label}_bytes"] = reader.total
        streams[f"{label}_truncated"] = reader.total > OUTPUT_CAP_BYTES
    code = outcome.returncode
    summary = {
        "exit_code": code if code >= 0 else None,
        "signal": -code if code < 0 else None,
        "timed_out": outcome.timed_out,
        "redactions": redactions,
        "stdout_bytes": streams["stdout_bytes"],
        "stderr_bytes": streams["stderr_bytes"],
        "stdout_truncated": streams["stdout_truncated"],
        "stderr_truncated": streams["stderr_truncated"],
    }
    run.write_artifact(
        OUTPUT_ARTIFACT,
        "log",
        artifact_type="command_output",
        action="record",
        mime="application/json",
        metadata=summary,
        data=(json.dumps({**summary, **streams}, sort_keys=True, indent=2) + "\n").encode(),
    )
    run.metric("duration_seconds", round(outcome.duration_seconds, 3))
    run.metric("stdout_bytes", streams["stdout_bytes"])
    run.metric("stderr_bytes", streams["stderr_bytes"])
    if outcome.timed_out:
        raise kit.EngineError(
            "script_timeout", f"script timed out after {spec.timeout_seconds:g} seconds"
        )
    if code < 0:
        raise kit.EngineError("script_failed", f"script was killed by signal {-code}")
    if code != 0:
        raise kit.EngineError("script_failed", f"script exited with status {code}", exit_code=code)
    run.metric("exit_code", 0)


if __name__ == "__main__":
    sys.exit(kit.main(ENGINE_ID, {"flight-plan": flight_plan, "take-off": take_off}))
