"""Launch one engine exactly as the protocol's engine contract says, and judge its receipt.

The engine is not trusted. It runs in its own session (so the whole process group can be
killed), with a scrubbed environment, resource limits, a fresh artifacts dir and temp dir,
bounded stdout and stderr, and secret values masked in everything the runner writes or
reports. A misbehaving engine is a *result* (``EngineRun.failure``), never an exception;
only a caller mistake (bad directories, bad secret names, bad input) raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cabincrew import PROTOCOL_VERSION
from orchestrator_svc import schemacheck
from orchestrator_svc.errors import EngineLaunchError
from orchestrator_svc.workflow import RESERVED_ENV, RESERVED_ENV_PREFIX, EngineSpec

# A fixed PATH: the parent's PATH (virtualenvs, user bins) must not decide what runs.
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
SAFE_LANG = "C.UTF-8"
MASK = "***"
INPUT_FILE_NAME = "engine-input.json"
_SECRET_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class Mode(enum.Enum):
    """An engine execution mode; values are the protocol's wire strings."""

    FLIGHT_PLAN = "flight-plan"
    TAKE_OFF = "take-off"


@dataclass(frozen=True)
class RunLimits:
    """Bounds on one engine launch; ``None`` leaves a resource limit as inherited."""

    timeout_seconds: float = 600.0
    kill_grace_seconds: float = 5.0
    # After the process group is killed, how long to wait for its pipes to close.
    drain_seconds: float = 5.0
    cpu_seconds: int | None = 600
    memory_bytes: int | None = 4 << 30
    file_size_bytes: int | None = 1 << 30
    open_files: int | None = 1024
    max_stdout_bytes: int = 8 << 20
    max_stderr_log_bytes: int = 4 << 20
    stderr_tail_bytes: int = 16 << 10

    def __post_init__(self) -> None:
        if self.timeout_seconds <= 0 or self.kill_grace_seconds < 0 or self.drain_seconds < 0:
            raise ValueError("timeouts must be positive")
        if self.max_stdout_bytes < 1 or self.max_stderr_log_bytes < 0 or self.stderr_tail_bytes < 0:
            raise ValueError("output bounds must be positive")
        for value in (self.cpu_seconds, self.memory_bytes, self.file_size_bytes, self.open_files):
            if value is not None and value < 1:
                raise ValueError("resource limits must be positive")


class FailureKind(enum.Enum):
    """Why an engine run failed."""

    LAUNCH_FAILED = "launch_failed"
    TIMED_OUT = "timed_out"
    STDOUT_TOO_LARGE = "stdout_too_large"
    KILLED = "killed"  # by a signal, typically a resource limit
    ENGINE_FAILURE = "engine_failure"  # exit 1
    VALIDATION_FAILURE = "validation_failure"  # exit 2
    UNEXPECTED_EXIT = "unexpected_exit"  # exit > 2, reserved by the protocol
    NO_RECEIPT = "no_receipt"
    NOT_JSON = "not_json"
    MULTIPLE_DOCUMENTS = "multiple_documents"
    INVALID_RECEIPT = "invalid_receipt"
    RECEIPT_MISMATCH = "receipt_mismatch"  # wrong mode, protocol version or plan token
    RECEIPT_FAILURE = "receipt_failure"  # exit 0 but status "failure"
    ESCAPED_PROCESS = "escaped_process"  # a descendant left the group and kept our pipes


@dataclass(frozen=True)
class EngineFailure:
    """A typed failure and a human-readable reason (secret values masked)."""

    kind: FailureKind
    reason: str


@dataclass(frozen=True)
class EngineRun:
    """The outcome of one launch. ``receipt`` is schema-valid whenever it is not ``None``."""

    mode: Mode
    argv: tuple[str, ...]
    exit_code: int | None
    receipt: Mapping[str, Any] | None
    failure: EngineFailure | None
    stderr_log: Path
    stderr_tail: str
    stderr_truncated: bool
    duration_seconds: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        """Whether the engine succeeded: exit 0 and a valid receipt with status success."""
        return self.failure is None


def build_engine_input(
    *,
    mode: Mode,
    workflow_id: str,
    step_id: str,
    config: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    run_index: int = 0,
    workspace_hash: str | None = None,
    expected_plan_token: str | None = None,
) -> dict[str, Any]:
    """Build a protocol EngineInput document (secrets are added by the runner, not here)."""
    document: dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION,
        "mode": mode.value,
        "meta": {"workflow_id": workflow_id, "step_id": step_id},
        "config": dict(config or {}),
        "context": dict(context or {}),
    }
    orchestrator: dict[str, Any] = {"run_index": run_index}
    if workspace_hash is not None:
        orchestrator["workspace_hash"] = workspace_hash
    document["orchestrator"] = orchestrator
    if expected_plan_token is not None:
        document["expected_plan_token"] = expected_plan_token
    problems = schemacheck.errors("EngineInput", document)
    if problems:
        raise EngineLaunchError("engine input does not match the protocol: " + "; ".join(problems))
    return document


async def run_engine(
    spec: EngineSpec,
    mode: Mode,
    engine_input: Mapping[str, Any],
    *,
    workspace: Path,
    artifacts_dir: Path,
    temp_dir: Path,
    log_path: Path,
    secrets: Mapping[str, str] | None = None,
    limits: RunLimits | None = None,
    input_file: bool = False,
    restore: Callable[[Path], object] | None = None,
) -> EngineRun:
    """Launch ``spec`` in ``mode`` and return what happened.

    ``artifacts_dir`` and ``temp_dir`` are emptied (or created) before the launch; ``restore``
    is then called with the artifacts dir, for take-off to materialise state artifacts.
    ``secrets`` become environment variables and the input's ``secrets`` object; their names
    go to ``allowed_secrets``. Stderr goes, masked and bounded, to ``log_path`` (truncated
    first: give each attempt its own log). Errors from ``restore`` (for example
    ``ArtifactIntegrityError``) propagate and nothing is launched.
    """
    limits = limits or RunLimits()
    secrets = dict(secrets or {})
    mode = Mode(mode)
    _check_secrets(secrets)
    masker = Masker(secrets.values())
    stdin_bytes = _stdin_document(engine_input, mode, secrets)
    # Checking the paths, deleting trees and copying state artifacts is blocking I/O: keep it
    # off the event loop, in one thread hop.
    workspace, artifacts_dir, temp_dir, log_path = await asyncio.to_thread(
        _prepare_dirs, workspace, artifacts_dir, temp_dir, log_path, restore
    )
    env = {
        "PATH": SAFE_PATH,
        "HOME": str(temp_dir),
        "TMPDIR": str(temp_dir),
        "LANG": SAFE_LANG,
        "CABINCREW_WORKSPACE": str(workspace),
        "CABINCREW_ARTIFACTS_DIR": str(artifacts_dir),
        "CABINCREW_TEMP_DIR": str(temp_dir),
        "CABINCREW_MODE": mode.value,
        **secrets,
    }
    if input_file:
        input_path = temp_dir / INPUT_FILE_NAME
        fd = os.open(input_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(stdin_bytes)
        env["CABINCREW_INPUT_FILE"] = str(input_path)
    argv = (*spec.argv, "--mode", mode.value)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with _StderrLog(log_path, limits.max_stderr_log_bytes, limits.stderr_tail_bytes) as log:
        try:
            return await _launch(
                argv, mode, stdin_bytes, env, temp_dir, limits, masker, log, engine_input
            )
        finally:
            # Nothing an engine left in its temp dir (possibly secrets) outlives the run.
            await asyncio.to_thread(_reset_dir, temp_dir)


async def _launch(
    argv: tuple[str, ...],
    mode: Mode,
    stdin_bytes: bytes,
    env: dict[str, str],
    cwd: Path,
    limits: RunLimits,
    masker: Masker,
    log: _StderrLog,
    engine_input: Mapping[str, Any],
) -> EngineRun:
    started = time.monotonic()

    def result(
        exit_code: int | None,
        receipt: Mapping[str, Any] | None,
        failure: EngineFailure | None,
        timed_out: bool = False,
    ) -> EngineRun:
        return EngineRun(
            mode=mode,
            argv=argv,
            exit_code=exit_code,
            receipt=receipt,
            failure=failure,
            stderr_log=log.path,
            stderr_tail=log.tail(),
            stderr_truncated=log.truncated,
            duration_seconds=time.monotonic() - started,
            timed_out=timed_out,
        )

    loop = asyncio.get_running_loop()
    protocol = _EngineProtocol(loop, limits.max_stdout_bytes, masker, log)
    try:
        executable = _resolve_executable(argv[0], cwd)
        # No preexec_fn: a fork() in a process that hosts gRPC runs gRPC's at-fork handlers,
        # which sometimes abort the child (SIGABRT). Limits are set by a tiny exec wrapper
        # instead, so the launch can use vfork/posix_spawn and no handler runs.
        transport, _ = await loop.subprocess_exec(
            lambda: protocol,
            *_limited_argv((executable, *argv[1:]), limits),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        reason = masker.text(f"cannot launch {argv[0]!r}: {exc.strerror or type(exc).__name__}")
        log.write(f"[cabincrew] {reason}\n".encode())
        return result(None, None, EngineFailure(FailureKind.LAUNCH_FAILED, reason))

    # start_new_session: the engine leads its own process group, whose id is its pid.
    group = transport.get_pid()
    protocol.group = group
    try:
        stdin = transport.get_pipe_transport(0)
        if stdin is not None:
            # Buffered by the transport; an engine that never reads it cannot block us.
            stdin.write(stdin_bytes)  # type: ignore[attr-defined]
            stdin.write_eof()  # type: ignore[attr-defined]
        timed_out = False
        try:
            # Wait for the leader's exit only: asyncio's Process.wait() would also wait for
            # every holder of the pipes, which a lingering grandchild could keep open forever.
            async with asyncio.timeout(limits.timeout_seconds):
                await asyncio.shield(protocol.exited)
        except TimeoutError:
            timed_out = True
            await _terminate(protocol, group, limits.kill_grace_seconds)
        # The leader is gone; anything it left behind in its group goes too.
        _kill_group(group, signal.SIGKILL)
        pipes_closed = True
        try:
            async with asyncio.timeout(limits.drain_seconds):
                await asyncio.shield(protocol.output_closed)
        except TimeoutError:
            # A descendant escaped the group (setsid) and holds our pipes: stop reading.
            pipes_closed = False
            log.write(b"[cabincrew] a process outside the engine's group kept its pipes open\n")
        exit_code = transport.get_returncode()
    finally:
        # Also reached on cancellation: never leave an engine's processes running.
        _kill_group(group, signal.SIGKILL)
        transport.close()
    masker_tail = masker.flush()
    if masker_tail:
        log.write(masker_tail)
    stdout_bytes = protocol.stdout()

    if timed_out:
        reason = f"timed out after {limits.timeout_seconds:g} s; process group killed"
        log.write(f"[cabincrew] {reason}\n".encode())
        return result(exit_code, None, EngineFailure(FailureKind.TIMED_OUT, reason), timed_out=True)
    if not pipes_closed:
        # Fail closed: something the engine started is still running outside our control.
        reason = "a process the engine started left its process group and is still running"
        return result(exit_code, None, EngineFailure(FailureKind.ESCAPED_PROCESS, reason))
    if protocol.overflow:
        reason = f"stdout exceeded {limits.max_stdout_bytes} bytes; process group killed"
        log.write(f"[cabincrew] {reason}\n".encode())
        return result(exit_code, None, EngineFailure(FailureKind.STDOUT_TOO_LARGE, reason))
    receipt, problem = parse_receipt(
        stdout_bytes, mode, masker, engine_input.get("expected_plan_token")
    )
    failure = _judge(exit_code, receipt, problem, masker)
    if failure is not None:
        log.write(f"[cabincrew] {failure.kind.value}: {failure.reason}\n".encode())
    return result(exit_code, receipt, failure)


def _judge(
    exit_code: int | None,
    receipt: Mapping[str, Any] | None,
    problem: EngineFailure | None,
    masker: Masker,
) -> EngineFailure | None:
    engine_error = ""
    if receipt is not None and isinstance(receipt.get("error"), str):
        engine_error = f": {receipt['error']}"
    if exit_code is None or exit_code < 0:
        name = _signal_name(-(exit_code or 0))
        return EngineFailure(FailureKind.KILLED, f"engine was killed by {name}")
    if exit_code == 1:
        return EngineFailure(
            FailureKind.ENGINE_FAILURE, masker.text("engine failed (exit 1)" + engine_error)
        )
    if exit_code == 2:
        return EngineFailure(
            FailureKind.VALIDATION_FAILURE,
            masker.text("engine validation failed (exit 2)" + engine_error),
        )
    if exit_code > 2:
        return EngineFailure(
            FailureKind.UNEXPECTED_EXIT, f"exit code {exit_code} is reserved by the protocol"
        )
    if problem is not None:
        return problem
    assert receipt is not None
    if receipt["status"] != "success":
        return EngineFailure(
            FailureKind.RECEIPT_FAILURE, masker.text("receipt status is failure" + engine_error)
        )
    return None


def _signal_name(number: int) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
    hint = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}.get(name, "")
    return name + hint


def parse_receipt(
    stdout: bytes, mode: Mode, masker: Masker | None = None, expected_plan_token: Any = None
) -> tuple[Mapping[str, Any] | None, EngineFailure | None]:
    """Parse exactly one EngineOutput JSON document from stdout and validate it."""
    masker = masker or Masker(())
    try:
        text = stdout.decode("utf-8")
    except UnicodeDecodeError:
        return None, EngineFailure(FailureKind.NOT_JSON, "stdout is not UTF-8")
    stripped = text.strip()
    if not stripped:
        return None, EngineFailure(FailureKind.NO_RECEIPT, "stdout is empty; a receipt is required")
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    try:
        document, end = decoder.raw_decode(stripped)
    except ValueError as exc:
        return None, EngineFailure(
            FailureKind.NOT_JSON, masker.text(f"stdout is not JSON: {_short(exc)}")
        )
    rest = stripped[end:].strip()
    if rest:
        try:
            decoder.raw_decode(rest)
        except ValueError:
            return None, EngineFailure(FailureKind.NOT_JSON, "stdout has text after the receipt")
        return None, EngineFailure(
            FailureKind.MULTIPLE_DOCUMENTS, "stdout holds more than one JSON document"
        )
    if not isinstance(document, dict):
        return None, EngineFailure(FailureKind.INVALID_RECEIPT, "the receipt is not a JSON object")
    problems = schemacheck.errors("EngineOutput", document)
    if problems:
        shown = "; ".join(problems[:5]) + (
            f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        )
        return None, EngineFailure(
            FailureKind.INVALID_RECEIPT,
            masker.text(f"the receipt does not match EngineOutput: {shown}"),
        )
    receipt = _mask_receipt(document, masker)
    if receipt["mode"] != mode.value:
        return receipt, EngineFailure(
            FailureKind.RECEIPT_MISMATCH, f"receipt mode {receipt['mode']!r} is not {mode.value!r}"
        )
    if receipt["protocol_version"] != PROTOCOL_VERSION:
        return receipt, EngineFailure(
            FailureKind.RECEIPT_MISMATCH,
            masker.text(
                f"receipt protocol_version {receipt['protocol_version']!r} "
                f"is not {PROTOCOL_VERSION!r}"
            ),
        )
    if (
        expected_plan_token is not None
        and receipt.get("plan_token", expected_plan_token) != expected_plan_token
    ):
        return receipt, EngineFailure(
            FailureKind.RECEIPT_MISMATCH, "receipt plan_token differs from the verified token"
        )
    return receipt, None


def _short(exc: ValueError) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"duplicate key {key!r}")
        document[key] = value
    return document


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _mask_receipt(receipt: dict[str, Any], masker: Masker) -> dict[str, Any]:
    # Artifact entries are integrity data (names, paths, hashes) and stay exactly as written.
    return {
        key: (value if key == "artifacts" else masker.value(value))
        for key, value in receipt.items()
    }


class Masker:
    """Replaces secret values with ``***`` in streamed bytes, in text and in JSON values."""

    def __init__(self, secrets: Iterable[str]) -> None:
        values = sorted({value for value in secrets if value}, key=len, reverse=True)
        self._text = values
        self._bytes = [value.encode("utf-8") for value in values]
        # Bytes held back between chunks so that a secret split across two reads is caught.
        self._keep = max((len(value) for value in self._bytes), default=1) - 1
        self._buffer = b""

    def text(self, value: str) -> str:
        """Return ``value`` with every secret masked."""
        for secret in self._text:
            value = value.replace(secret, MASK)
        return value

    def value(self, value: Any) -> Any:
        """Return a JSON value with every secret masked inside its strings."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, dict):
            return {key: self.value(item) for key, item in value.items()}
        return value

    def feed(self, chunk: bytes) -> bytes:
        """Mask a chunk of a stream; returns what is safe to write now."""
        if not self._bytes:
            return chunk
        data = self._mask_bytes(self._buffer + chunk)
        if self._keep == 0:
            self._buffer = b""
            return data
        self._buffer = data[-self._keep :]
        return data[: -self._keep]

    def flush(self) -> bytes:
        """Return what was held back at the end of the stream."""
        data, self._buffer = self._mask_bytes(self._buffer), b""
        return data

    def _mask_bytes(self, data: bytes) -> bytes:
        for secret in self._bytes:
            data = data.replace(secret, MASK.encode())
        return data


class _StderrLog:
    """Writes at most ``limit`` bytes to the step log and keeps a tail for the result."""

    def __init__(self, path: Path, limit: int, tail: int) -> None:
        self.path = path
        self.limit = limit
        self.truncated = False
        self._written = 0
        self._tail_size = tail
        self._tail = bytearray()
        self._handle = open(path, "wb")  # closed in __exit__

    def __enter__(self) -> _StderrLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._tail += data
        if len(self._tail) > self._tail_size:
            del self._tail[: len(self._tail) - self._tail_size]
        room = self.limit - self._written
        if room <= 0 or len(data) > room:
            if not self.truncated:
                self._handle.write(data[: max(room, 0)])
                self._handle.write(
                    f"\n[cabincrew] stderr truncated at {self.limit} bytes\n".encode()
                )
                self._written = self.limit
                self.truncated = True
            return
        self._handle.write(data)
        self._written += len(data)

    def tail(self) -> str:
        return bytes(self._tail).decode("utf-8", "replace")


def _rlimit_settings(limits: RunLimits) -> list[tuple[str, int, int]]:
    """(prlimit option, soft, hard) per limit, never above a hard limit we inherited."""
    wanted = [
        ("cpu", resource.RLIMIT_CPU, limits.cpu_seconds),
        ("as", resource.RLIMIT_AS, limits.memory_bytes),
        ("fsize", resource.RLIMIT_FSIZE, limits.file_size_bytes),
        ("nofile", resource.RLIMIT_NOFILE, limits.open_files),
        ("core", resource.RLIMIT_CORE, 0),
    ]
    settings = []
    for option, which, value in wanted:
        if value is None:
            continue
        _, hard = resource.getrlimit(which)
        target = value if hard == resource.RLIM_INFINITY else min(value, hard)
        soft = target
        if which == resource.RLIMIT_CPU and target > 1:
            # One second between SIGXCPU (catchable) and SIGKILL at the hard limit.
            soft = target - 1
        settings.append((option, soft, target))
    return settings


_PRLIMIT = shutil.which("prlimit", path=SAFE_PATH + ":/usr/sbin:/sbin")
# Fallback where util-linux's prlimit is missing: set the limits, then exec the engine.
_TRAMPOLINE = (
    "import os,resource,signal,sys\n"
    # Python ignores SIGPIPE and SIGXFSZ; ignored signals survive exec, so restore them.
    "for g in (signal.SIGPIPE,signal.SIGXFSZ): signal.signal(g,signal.SIG_DFL)\n"
    "for n,s,h in zip(*[iter(sys.argv[2:2+3*int(sys.argv[1])])]*3):\n"
    " resource.setrlimit(getattr(resource,'RLIMIT_'+n.upper()),(int(s),int(h)))\n"
    "a=sys.argv[2+3*int(sys.argv[1]):]\n"
    "os.execv(a[0],a)\n"
)


def _limited_argv(argv: tuple[str, ...], limits: RunLimits) -> list[str]:
    """``argv`` behind an exec wrapper that lowers soft and hard limits (so the engine
    cannot raise them back) and then execs it in the same process."""
    settings = _rlimit_settings(limits)
    if _PRLIMIT is not None:
        options = [f"--{option}={soft}:{hard}" for option, soft, hard in settings]
        return [_PRLIMIT, *options, "--", *argv]
    flat = [str(part) for setting in settings for part in setting]
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(len(settings)), *flat, *argv]


def _resolve_executable(command: str, cwd: Path) -> str:
    """The path the engine's command names (``OSError`` when it cannot be executed)."""
    if os.sep in command:
        path = Path(command) if os.path.isabs(command) else cwd / command
        if not path.is_file():
            raise FileNotFoundError(2, "No such file or directory", str(path))
        if not os.access(path, os.X_OK):
            raise PermissionError(13, "Permission denied", str(path))
        return str(path)
    found = shutil.which(command, path=SAFE_PATH)
    if found is None:
        raise FileNotFoundError(2, "No such file or directory", command)
    return found


async def _terminate(protocol: _EngineProtocol, group: int, grace: float) -> None:
    _kill_group(group, signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await asyncio.shield(protocol.exited)
    except TimeoutError:
        pass
    _kill_group(group, signal.SIGKILL)
    await asyncio.shield(protocol.exited)


class _EngineProtocol(asyncio.SubprocessProtocol):
    """Collects stdout (bounded), streams stderr to the log, and reports the leader's exit."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, max_stdout: int, masker: Masker, log: _StderrLog
    ) -> None:
        self.exited: asyncio.Future[None] = loop.create_future()
        self.output_closed: asyncio.Future[None] = loop.create_future()
        self.group: int | None = None
        self.overflow = False
        self._max_stdout = max_stdout
        self._stdout: list[bytes] = []
        self._stdout_size = 0
        self._open = {1, 2}
        self._masker = masker
        self._log = log

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        chunk = data.encode() if isinstance(data, str) else data
        if fd == 2:
            self._log.write(self._masker.feed(chunk))
            return
        self._stdout_size += len(chunk)
        if self._stdout_size > self._max_stdout:
            if not self.overflow and self.group is not None:
                _kill_group(self.group, signal.SIGKILL)
            self.overflow = True
            self._stdout.clear()
            return
        self._stdout.append(chunk)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open.discard(fd)
        if not self._open and not self.output_closed.done():
            self.output_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def stdout(self) -> bytes:
        return b"".join(self._stdout)


def _kill_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def _check_paths(
    workspace: Path, artifacts_dir: Path, temp_dir: Path, log_path: Path
) -> tuple[Path, Path, Path, Path]:
    if not Path(workspace).is_dir():
        raise EngineLaunchError(f"workspace {str(workspace)!r} is not a directory")
    resolved = [Path(p).resolve() for p in (workspace, artifacts_dir, temp_dir, log_path)]
    workspace, artifacts_dir, temp_dir, log_path = resolved
    named = {"workspace": workspace, "artifacts dir": artifacts_dir, "temp dir": temp_dir}
    for first, a in named.items():
        for second, b in named.items():
            if first < second and (a == b or a in b.parents or b in a.parents):
                raise EngineLaunchError(f"the {first} and the {second} must not overlap")
    for name, directory in named.items():
        if directory == log_path or directory in log_path.parents:
            raise EngineLaunchError(f"the step log must not lie inside the {name}")
        if len(directory.parts) < 3:
            raise EngineLaunchError(f"refusing to use {str(directory)!r} as the {name}")
    return workspace, artifacts_dir, temp_dir, log_path


def _check_secrets(secrets: Mapping[str, str]) -> None:
    for name, value in secrets.items():
        if not name or not set(name) <= _SECRET_NAME_CHARS or name[0].isdigit():
            raise EngineLaunchError(f"secret name {name!r} is not an upper-case environment name")
        if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIX):
            raise EngineLaunchError(f"secret name {name!r} is reserved for the runner")
        if not isinstance(value, str) or "\0" in value:
            raise EngineLaunchError(f"secret {name!r} must be a string without NUL characters")


def _stdin_document(
    engine_input: Mapping[str, Any], mode: Mode, secrets: Mapping[str, str]
) -> bytes:
    if "secrets" in engine_input or "allowed_secrets" in engine_input:
        # Secret values come only through the runner, so callers never persist them.
        raise EngineLaunchError("engine_input must not carry secrets; pass them to the runner")
    document = dict(engine_input)
    if document.get("mode") != mode.value:
        raise EngineLaunchError(f"engine_input mode {document.get('mode')!r} is not {mode.value!r}")
    document["secrets"] = dict(secrets)
    document["allowed_secrets"] = sorted(secrets)
    problems = schemacheck.errors("EngineInput", document)
    if problems:
        masker = Masker(secrets.values())
        raise EngineLaunchError(
            masker.text("engine input does not match the protocol: " + "; ".join(problems))
        )
    return json.dumps(document, sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")


def _prepare_dirs(
    workspace: Path,
    artifacts_dir: Path,
    temp_dir: Path,
    log_path: Path,
    restore: Callable[[Path], object] | None,
) -> tuple[Path, Path, Path, Path]:
    """Check the paths, empty both folders, then let ``restore`` fill the artifacts dir;
    the resolved paths."""
    workspace, artifacts_dir, temp_dir, log_path = _check_paths(
        workspace, artifacts_dir, temp_dir, log_path
    )
    _reset_dir(artifacts_dir)
    _reset_dir(temp_dir)
    if restore is not None:
        restore(artifacts_dir)
    return workspace, artifacts_dir, temp_dir, log_path


def _reset_dir(path: Path) -> None:
    """Make ``path`` an empty directory, removing whatever an earlier run left there."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        path.mkdir(mode=0o700, parents=True)
        return
    if stat.S_ISDIR(info.st_mode):
        remove_tree(path)
    else:
        path.unlink()
    path.mkdir(mode=0o700)


def remove_tree(root: Path) -> None:
    """Delete a directory tree without following links, even where engines made it read-only."""
    # Iterative, so that a deeply nested tree left by an engine cannot exhaust the stack.
    stack: list[tuple[str, bool]] = [(str(root), False)]
    while stack:
        path, emptied = stack.pop()
        if emptied:
            os.rmdir(path)
            continue
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        stack.append((path, True))
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, False))
                else:
                    os.unlink(entry.path)


__all__ = [
    "EngineFailure",
    "EngineRun",
    "FailureKind",
    "Masker",
    "Mode",
    "RunLimits",
    "build_engine_input",
    "parse_receipt",
    "remove_tree",
    "run_engine",
]
