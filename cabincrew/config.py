"""Configuration: a YAML file plus environment overrides, parsed once into frozen dataclasses.

Only entry points call ``load_config``; library code receives the frozen result and never
reads the environment. Overrides use ``CABINCREW__SECTION__KEY=value`` (double underscores
separate levels), plus the documented shortcuts ``CABINCREW_ADDR``, ``CABINCREW_DATA_DIR``
and ``CABINCREW_DATABASE_URL``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cabincrew.errors import InvalidArgument, Violation

SERVICE_NAMES = ("audit", "preflight", "approval", "orchestrator", "mcp_gateway", "llm_gateway")


class ConfigError(InvalidArgument):
    """A configuration file or override that does not validate."""

    def remedy(self) -> str:
        return "fix the named key in the config file or the CABINCREW__* environment variable"


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS; mTLS when ``client_ca_file`` is set."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    require_client_auth: bool = False

    @property
    def enabled(self) -> bool:
        """Whether TLS is configured."""
        return bool(self.cert_file and self.key_file)


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC listener."""

    addr: str = "127.0.0.1:7070"
    grace_seconds: float = 5.0
    max_message_bytes: int = 16 * 1024 * 1024
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class AuthConfig:
    """Bearer-token verification and this process's own service identity."""

    audience: str = "cabincrew"
    # Private key that signs tokens; in the embedded mode it lives in the data dir.
    key_file: str = ""
    # Extra public keys (PEM files) whose tokens are trusted.
    trusted_public_keys: tuple[str, ...] = ()
    allow_anonymous: bool = False
    # A token this process presents to the other services (distributed mode).
    service_token_file: str = ""
    # mTLS: client certificate common names mapped to roles.
    mtls_roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class DatabaseConfig:
    """SQLAlchemy URL; empty means one SQLite file per service under the data dir."""

    url: str = ""


@dataclass(frozen=True)
class ClientConfig:
    """How this process reaches the other services."""

    # Service name -> host:port; empty means this process's own address.
    addresses: Mapping[str, str] = field(default_factory=dict)
    deadline_seconds: float = 30.0
    tls_ca_file: str = ""


@dataclass(frozen=True)
class AuditConfig:
    """AuditService settings."""

    origin: str = "cabincrew.local/audit"
    checkpoint_interval_seconds: float = 60.0
    max_queue: int = 100_000
    max_batch: int = 2_000
    max_event_bytes: int = 256 * 1024


@dataclass(frozen=True)
class PreflightConfig:
    """PreflightService settings."""

    # Empty: the repository's policies/. Several bundles are evaluated together.
    policy_dirs: tuple[str, ...] = ()
    # Empty: every model folder under the repository's models/build/ (none if absent).
    model_dirs: tuple[str, ...] = ()
    # False: policies only, no ONNX model is loaded whatever model_dirs says.
    load_models: bool = True
    execution_provider: str = "auto"
    aggregation_method: str = "most_restrictive"
    max_batch: int = 32
    max_wait_ms: float = 2.0
    # Models a domain (preflight, mcp, llm) runs by default; a domain not listed runs all.
    domain_models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Folders a request's body_ref may point into; empty means the data dir.
    body_ref_roots: tuple[str, ...] = ()
    # Larger bodies (or content texts) are denied, not judged in part.
    max_body_bytes: int = 8 * 1024 * 1024
    max_total_bytes: int = 32 * 1024 * 1024
    # Compiled Rego interpreters evaluated in parallel.
    max_interpreters: int = 4
    # Wait until the audit event is durable in the outbox before answering (fail closed).
    audit_before_reply: bool = True


@dataclass(frozen=True)
class ApprovalConfig:
    """ApprovalService settings."""

    default_ttl_seconds: float = 24 * 3600.0
    sweep_interval_seconds: float = 5.0
    webhook_url: str = ""
    webhook_secret_file: str = ""


@dataclass(frozen=True)
class OrchestratorConfig:
    """OrchestratorService settings."""

    max_parallel_steps: int = 4
    max_running_workflows: int = 32
    lease_seconds: float = 15.0
    workspaces_dir: str = ""
    # For crash tests only: the process SIGKILLs itself right after the first log entry that
    # reaches this state (a step State name, e.g. "TAKEOFF_RUNNING") is durably written. Never
    # set it in production; a non-empty value is logged loudly at start.
    unsafe_crash_after_state: str = ""


@dataclass(frozen=True)
class GatewayConfig:
    """MCP and LLM gateway settings (their HTTP listeners)."""

    mcp_http_addr: str = ""
    llm_http_addr: str = ""


@dataclass(frozen=True)
class Config:
    """The whole configuration of one process."""

    data_dir: str = ".cabincrew"
    services: tuple[str, ...] = SERVICE_NAMES
    log_level: str = "info"
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    clients: ClientConfig = field(default_factory=ClientConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)
    approval: ApprovalConfig = field(default_factory=ApprovalConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    gateways: GatewayConfig = field(default_factory=GatewayConfig)

    @property
    def data_path(self) -> Path:
        """The data dir as a path."""
        return Path(self.data_dir)

    def database_url(self, service: str) -> str:
        """The database URL a service uses."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.data_path / service / f'{service}.db').resolve()}"

    def auth_key_path(self) -> Path:
        """Where the token-signing key lives."""
        return (
            Path(self.auth.key_file) if self.auth.key_file else self.data_path / "keys" / "auth.key"
        )

    def address_of(self, service: str) -> str:
        """host:port of a service (this process's own listener unless configured)."""
        return self.clients.addresses.get(service, self.server.addr)


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Parse a YAML file, then environment overrides, then explicit overrides (CLI flags)."""
    raw: dict[str, Any] = {}
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problem = _yaml_problem(exc)
            raise ConfigError(f"config file {path} is not valid YAML: {problem}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        raw = loaded
    for path_key, value in _env_overrides(environ or {}).items():
        _set_path(raw, path_key, value)
    for dotted, value in (overrides or {}).items():
        _set_path(raw, dotted.split("."), value)
    config: Config = _build(Config, raw, "")
    return config


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What and where, without the quoted line: a config file can hold secrets."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "syntax error"
    if mark is None:
        return str(problem)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], Any]:
    found: dict[tuple[str, ...], Any] = {}
    shortcuts = {
        "CABINCREW_ADDR": ("server", "addr"),
        "CABINCREW_DATA_DIR": ("data_dir",),
        "CABINCREW_DATABASE_URL": ("database", "url"),
    }
    for name, path in shortcuts.items():
        if environ.get(name):
            found[path] = environ[name]
    for name, value in environ.items():
        if name.startswith("CABINCREW__"):
            path = tuple(part.lower() for part in name[len("CABINCREW__") :].split("__") if part)
            if path:
                found[path] = _parse_scalar(value)
    return found


def _parse_scalar(value: str) -> Any:
    # YAML scalars give "true", "3", "[a, b]" their obvious types.
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _set_path(raw: dict[str, Any], path: typing.Sequence[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _build(cls: type[Any], raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where or 'config'}: expected a mapping",
            [Violation(where or "config", "expected a mapping")],
        )
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{name}: unknown key", [Violation(name, "unknown key")])
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            name = f"{where}.{f.name}" if where else f.name
            values[f.name] = _coerce(hints[f.name], raw[f.name], name)
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type[Any], hint), value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        return _fail(where, "expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return _fail(where, "expected an integer")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return _fail(where, "expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return _fail(where, "expected a string")
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            return _fail(where, "expected a list")
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or (isinstance(origin, type) and issubclass(origin, Mapping)):
        _key, item = typing.get_args(hint)
        if not isinstance(value, dict):
            return _fail(where, "expected a mapping")
        return types.MappingProxyType(
            {str(k): _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
        )
    return _fail(where, f"unsupported type {hint}")


def _fail(where: str, description: str) -> Any:
    raise ConfigError(f"{where}: {description}", [Violation(where, description)])
