"""Wiring: builds the PreflightService servicer from config.

Policies and models are loaded before the service is registered. A bundle or a model that
does not load does not stop the process: the service starts NOT_SERVING, says why in
GetGovernance and the logs, and denies what it cannot judge; SIGHUP (or Reload) retries.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from cabincrew.config import ConfigError, PreflightConfig
from cabincrew.decisions import AggregationMethod
from cabincrew.emitter import emitter_for
from cabincrew.runtime.context import ServiceContext, ServiceHandle
from cabincrew.runtime.handle import GrpcServiceHandle
from cabincrew.v1 import preflight_pb2_grpc
from preflight_svc.errors import PreflightError
from preflight_svc.governance import (
    Governance,
    GovernanceHolder,
    GovernanceSettings,
    default_model_dirs,
    default_policy_dirs,
    load_governance,
)
from preflight_svc.onnx_models import ProviderPreference, RuntimeConfig
from preflight_svc.opa import PolicyDomain
from preflight_svc.pipeline import Limits, Preflight
from preflight_svc.service import PreflightServiceServicer

GRPC_SERVICE_NAME = "cabincrew.v1.PreflightService"

log = logging.getLogger("cabincrew.preflight")


def settings_from(config: PreflightConfig) -> GovernanceSettings:
    """Governance settings from config; default folders are looked up anew on every load."""
    try:
        provider = ProviderPreference.parse(config.execution_provider)
        aggregation = AggregationMethod.parse(config.aggregation_method)
        domains = {
            PolicyDomain(name): tuple(models) for name, models in config.domain_models.items()
        }
        return GovernanceSettings(
            policy_dirs=default_policy_dirs(config.policy_dirs),
            model_dirs=default_model_dirs(config.model_dirs) if config.load_models else (),
            provider=provider,
            aggregation=aggregation,
            domain_models=domains,
            runtime=RuntimeConfig(max_batch=config.max_batch, max_wait_ms=config.max_wait_ms),
            max_interpreters=config.max_interpreters,
        )
    except ValueError as exc:
        raise ConfigError(f"preflight: {exc}") from None


def limits_from(config: PreflightConfig, data_dir: Path) -> Limits:
    """Request limits from config; body references default to the data dir."""
    roots = tuple(Path(p).resolve() for p in config.body_ref_roots) or (data_dir.resolve(),)
    try:
        return Limits(config.max_body_bytes, config.max_total_bytes, roots)
    except ValueError as exc:
        raise ConfigError(f"preflight: {exc}") from None


async def build(context: ServiceContext) -> ServiceHandle:
    """Create the service handle for the runtime: options first, then policies and models."""
    config = context.config.preflight
    settings_from(config)  # refuse bad options before loading anything
    limits = limits_from(config, context.config.data_path)
    if config.max_batch < 1 or config.max_wait_ms < 0:
        raise ConfigError("preflight: max_batch must be at least 1 and max_wait_ms not negative")

    def loader() -> Governance:
        return load_governance(settings_from(config))

    governance = await asyncio.to_thread(loader)
    preflight = Preflight(
        GovernanceHolder(governance),
        limits,
        emitter_for(context, "preflight"),
        workers=config.max_interpreters,
        audit_before_reply=config.audit_before_reply,
    )

    async def on_sighup() -> None:
        try:
            await preflight.reload(loader)
        except PreflightError as exc:
            log.error("SIGHUP reload refused: %s", exc)

    context.reload_hooks.append(on_sighup)
    return GrpcServiceHandle(
        "preflight",
        GRPC_SERVICE_NAME,
        PreflightServiceServicer(preflight, loader),
        preflight_pb2_grpc.add_PreflightServiceServicer_to_server,
        on_close=preflight.aclose,
        serving=preflight.serving,
    )
