"""A plain ``ServiceHandle`` for services built from a servicer and optional lifecycle hooks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc


class GrpcServiceHandle:
    """Registers one servicer; start/close/serving delegate to optional callables."""

    def __init__(
        self,
        name: str,
        grpc_service_name: str,
        servicer: Any,
        add_fn: Callable[[Any, grpc.aio.Server], None],
        *,
        on_start: Callable[[], Awaitable[None]] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        serving: Callable[[], bool] | None = None,
        on_unauthenticated: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self.grpc_service_name = grpc_service_name
        self.servicer = servicer
        self._add_fn = add_fn
        self._on_start = on_start
        self._on_close = on_close
        self._serving = serving
        # Records a call the runtime refused before it reached the servicer (method, why).
        self.on_unauthenticated = on_unauthenticated
        self._closed = False

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the servicer."""
        self._add_fn(self.servicer, server)

    async def start(self) -> None:
        """Run the start hook."""
        if self._on_start is not None:
            await self._on_start()

    async def aclose(self) -> None:
        """Run the close hook once."""
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            await self._on_close()

    def serving(self) -> bool:
        """Whether the service reports SERVING."""
        return self._serving() if self._serving is not None else not self._closed
