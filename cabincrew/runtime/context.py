"""What a hosted service receives, and what it gives back to the runtime."""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from cabincrew.auth import ANONYMOUS, Principal
from cabincrew.config import Config
from cabincrew.signing import Ed25519Signer

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "cabincrew_principal", default=ANONYMOUS
)
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "cabincrew_request_id", default=""
)


def current_principal() -> Principal:
    """The authenticated caller of the RPC being handled."""
    return _principal.get()


def current_request_id() -> str:
    """The request id of the RPC being handled (from ``x-request-id`` or generated)."""
    return _request_id.get()


class ServiceHandle(Protocol):
    """A hosted service: its gRPC name, registration and lifecycle."""

    name: str
    grpc_service_name: str

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the servicer."""

    async def start(self) -> None:
        """Start background work once the server listens."""

    async def aclose(self) -> None:
        """Release resources; idempotent."""

    def serving(self) -> bool:
        """Whether health should report SERVING."""


@dataclass
class ServiceContext:
    """Shared by the services of one process; built once by the runtime."""

    config: Config
    # The port the server actually bound (known after bind; 0 before).
    port: int = 0
    # Hooks the runtime calls on SIGHUP (preflight reload).
    reload_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Lazily created shared objects (the audit emitter, clients), by name.
    shared: dict[str, Any] = field(default_factory=dict)

    def service_dir(self, service: str) -> Path:
        """The data dir of one service, created on first use."""
        path = self.config.data_path / service
        path.mkdir(parents=True, exist_ok=True)
        return path

    def signer(self, purpose: str) -> Ed25519Signer:
        """A process signing key for ``purpose`` kept in the data dir's keys folder."""
        key = self.shared.get(f"signer:{purpose}")
        if key is None:
            key = Ed25519Signer.load_or_create(self.config.data_path / "keys" / f"{purpose}.key")
            self.shared[f"signer:{purpose}"] = key
        return key

    def self_address(self) -> str:
        """host:port of this process's own listener."""
        host = self.config.server.addr.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def address_of(self, service: str) -> str:
        """Where to reach ``service``: configured, or this process when it hosts it."""
        configured = self.config.clients.addresses.get(service)
        return configured or self.self_address()
