"""``create_server`` builds a ``grpc.aio`` server hosting the configured services;
``serve`` runs it until SIGTERM/SIGINT and shuts down gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cabincrew.auth import ANONYMOUS, Principal, TokenVerifier
from cabincrew.config import SERVICE_NAMES, Config
from cabincrew.errors import CabinCrewError, Unauthenticated, to_status
from cabincrew.runtime.context import ServiceContext, ServiceHandle, _principal, _request_id
from cabincrew.signing import Ed25519Signer, Ed25519Verifier

log = logging.getLogger("cabincrew.runtime")

_PROTECTED_PREFIX = "/cabincrew.v1."
ServiceFactory = Callable[[ServiceContext], Awaitable[ServiceHandle]]


def service_factories() -> dict[str, ServiceFactory]:
    """The factory of every hosted service, by short name (imported lazily)."""
    from approval_svc.server import build as build_approval
    from audit_svc.server import build as build_audit
    from llm_gateway.server import build as build_llm
    from mcp_gateway.server import build as build_mcp
    from orchestrator_svc.server import build as build_orchestrator
    from preflight_svc.server import build as build_preflight

    return {
        "audit": build_audit,
        "preflight": build_preflight,
        "approval": build_approval,
        "orchestrator": build_orchestrator,
        "mcp_gateway": build_mcp,
        "llm_gateway": build_llm,
    }


class _Authenticator:
    """Turns request metadata (bearer token) or an mTLS identity into a principal."""

    def __init__(self, config: Config, verifier: TokenVerifier) -> None:
        self._verifier = verifier
        self._allow_anonymous = config.auth.allow_anonymous
        self._mtls_roles = config.auth.mtls_roles

    def principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        """Authenticate one call; raises ``Unauthenticated``."""
        metadata = dict(context.invocation_metadata() or ())
        header = metadata.get("authorization", "")
        if isinstance(header, bytes):
            header = header.decode("ascii", "replace")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
            return self._verifier.verify(token.strip())
        auth_context: dict[str, Any] = dict(context.auth_context())
        names = list(auth_context.get("x509_common_name") or [])
        if names:
            name = bytes(names[0]).decode("utf-8", "replace")
            return Principal(name=name, roles=frozenset(self._mtls_roles.get(name, ())), via="mtls")
        if self._allow_anonymous:
            return ANONYMOUS
        raise Unauthenticated("this call needs a bearer token (set CABINCREW_TOKEN)")


RefusalHook = Callable[[str, str], Awaitable[None]]


class _RefusalRecorder:
    """Hands calls refused for want of credentials to the hosting service's hook, so that
    they reach the audit log; a token bucket bounds what a flood of such calls can cost
    (each record is an fsync), and what it drops is counted in the log."""

    def __init__(self, rate_per_second: float = 5.0, burst: float = 20.0) -> None:
        self.hooks: dict[str, RefusalHook] = {}  # "/cabincrew.v1.Service/" -> hook
        self._rate = rate_per_second
        self._burst = burst
        self._tokens = burst
        self._last = time.monotonic()
        self.dropped = 0

    def _take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def record(self, method: str, detail: str) -> None:
        hook = self.hooks.get(method[: method.rfind("/") + 1])
        if hook is None:
            return
        if not self._take():
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("%d unauthenticated calls not audited (rate limit)", self.dropped)
            return
        try:
            await hook(method.rsplit("/", 1)[-1], detail)
        except Exception:
            # The call is refused either way; a lost record of it is logged.
            log.exception("could not audit an unauthenticated call to %s", method)


class _CallInterceptor(grpc.aio.ServerInterceptor):
    """Sets request id and principal context for every CabinCrew RPC."""

    def __init__(self, authenticator: _Authenticator, refusals: _RefusalRecorder) -> None:
        self._auth = authenticator
        self._refusals = refusals

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(_PROTECTED_PREFIX):
            return handler
        return _wrap_handler(handler, self._auth, details.method, self._refusals)


def _wrap_handler(
    handler: Any, auth: _Authenticator, method: str, refusals: _RefusalRecorder
) -> Any:
    async def enter(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = dict(context.invocation_metadata() or ())
        rid = metadata.get("x-request-id") or uuid.uuid4().hex
        _request_id.set(str(rid)[:128])
        try:
            _principal.set(auth.principal(context))
        except CabinCrewError as exc:
            log.info("unauthenticated call to %s (request %s)", method, rid)
            await refusals.record(method, exc.message)
            await context.abort_with_status(to_status(exc))

    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await enter(context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> Any:
            await enter(context)
            async for item in inner_us(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            await enter(context)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: Any) -> Any:
        await enter(context)
        async for item in inner_ss(requests, context):
            yield item

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )


def token_verifier(config: Config) -> TokenVerifier:
    """Trust the data dir's auth key (created if absent) plus configured public keys."""
    trusted: dict[str, bytes] = {}
    key_path = config.auth_key_path()
    if key_path.exists() or not config.auth.trusted_public_keys:
        signer = Ed25519Signer.load_or_create(key_path)
        trusted[signer.key_id] = signer.public_key_bytes()
    for path in config.auth.trusted_public_keys:
        key = Ed25519Verifier.from_pem(Path(path).read_bytes())
        trusted[key.key_id] = key.public_key_bytes()
    return TokenVerifier(trusted, audience=config.auth.audience)


class CabinCrewServer:
    """A started-or-not gRPC server with its hosted services and health."""

    def __init__(
        self,
        server: grpc.aio.Server,
        context: ServiceContext,
        handles: Sequence[ServiceHandle],
        health_servicer: health.aio.HealthServicer,
    ) -> None:
        self.server = server
        self.context = context
        self.handles = list(handles)
        self.health = health_servicer
        self._closed = False
        self._health_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return self.context.port

    async def start(self) -> None:
        """Start listening, then the services' background work, then report health."""
        await self.server.start()
        for handle in self.handles:
            await handle.start()
        await self.refresh_health()
        self._health_task = asyncio.create_task(self._watch_health())

    async def refresh_health(self) -> None:
        """Publish each service's SERVING/NOT_SERVING status."""
        all_ok = True
        for handle in self.handles:
            ok = handle.serving()
            all_ok = all_ok and ok
            await self.health.set(handle.grpc_service_name, _status(ok))
        await self.health.set("", _status(all_ok))

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.refresh_health()

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, stop accepting with ``grace``, then close resources."""
        if self._closed:
            return
        self._closed = True
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.context.config.server.grace_seconds if grace is None else grace)
        for handle in reversed(self.handles):
            try:
                await handle.aclose()
            except Exception:
                log.exception("closing %s failed", handle.name)
        for closer in self.context.shared.get("closers", []):
            await closer()


def _status(ok: bool) -> Any:
    return (
        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    )


async def create_server(
    config: Config, factories: dict[str, ServiceFactory] | None = None
) -> tuple[CabinCrewServer, int]:
    """Build and bind (not start) a server hosting ``config.services``; returns it and its port."""
    unknown = [name for name in config.services if name not in SERVICE_NAMES]
    if unknown:
        from cabincrew.config import ConfigError

        raise ConfigError(f"services: unknown service {unknown[0]!r}")
    config.data_path.mkdir(parents=True, exist_ok=True)
    authenticator = _Authenticator(config, token_verifier(config))
    options = [
        ("grpc.max_receive_message_length", config.server.max_message_bytes),
        ("grpc.max_send_message_length", config.server.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    refusals = _RefusalRecorder()
    server = grpc.aio.server(
        interceptors=[_CallInterceptor(authenticator, refusals)], options=options
    )
    port = _bind(server, config)
    context = ServiceContext(config=config, port=port)
    factories = factories or service_factories()
    handles: list[ServiceHandle] = []
    try:
        for name in config.services:
            handles.append(await factories[name](context))
    except BaseException:
        for handle in reversed(handles):
            await handle.aclose()
        raise
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for handle in handles:
        handle.add_to_server(server)
        await health_servicer.set(handle.grpc_service_name, _status(False))
        hook = getattr(handle, "on_unauthenticated", None)
        if hook is not None:
            refusals.hooks[f"/{handle.grpc_service_name}/"] = hook
    await health_servicer.set("", _status(False))
    names = [h.grpc_service_name for h in handles]
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return CabinCrewServer(server, context, handles, health_servicer), port


def _bind(server: grpc.aio.Server, config: Config) -> int:
    tls = config.server.tls
    addr = config.server.addr
    try:
        return _add_port(server, addr, tls)
    except RuntimeError:
        port = 0
    if port == 0:
        from cabincrew.errors import Unavailable

        raise Unavailable(f"cannot listen on {addr}: address in use or not available")
    return port


def _add_port(server: grpc.aio.Server, addr: str, tls: Any) -> int:
    if tls.enabled:
        key = Path(tls.key_file).read_bytes()
        cert = Path(tls.cert_file).read_bytes()
        ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
        credentials = grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=ca,
            require_client_auth=bool(ca) and tls.require_client_auth,
        )
        port = server.add_secure_port(addr, credentials)
    else:
        port = server.add_insecure_port(addr)
    if port == 0:
        raise RuntimeError(addr)
    return int(port)


async def serve(
    config: Config,
    factories: dict[str, ServiceFactory] | None = None,
    ready: Callable[[CabinCrewServer], None] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP runs reload hooks."""
    app, port = await create_server(config, factories)
    await app.start()
    log.info(
        "listening on %s (port %d), services: %s",
        config.server.addr,
        port,
        ", ".join(config.services),
    )
    if ready is not None:
        ready(app)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def reload() -> None:
        for hook in app.context.reload_hooks:
            try:
                await hook()
            except Exception:
                log.exception("reload failed")

    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await app.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")
