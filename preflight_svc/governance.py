"""The governance in force: policy bundles, model registry and their digests, as one snapshot.

A ``Governance`` is immutable once loaded. Every request leases the snapshot current when it
starts and finishes on it; ``Reload`` builds a new snapshot next to the old one and swaps it
in atomically, and the old one is closed when its last lease ends (``GovernanceHolder``).

Provenance:

- ``policy_digest``: SHA-256 over the canonical JSON of the sorted ``[path, sha256]`` of every
  policy file (``*.rego`` and ``data.json``). With one bundle this is exactly
  ``preflight_svc.opa.policy_digest(dir)``; with several, each path is prefixed by the
  bundle's position in ``policy_dirs`` (``"1/preflight/paths.rego"``).
- ``governance_hash``: SHA-256 over the canonical JSON of ``{policy_digest, models,
  aggregation, domain_models}``, where ``models`` is the sorted list of ``[name, version,
  sha256, manifest_digest]`` of every configured model (healthy or not), ``aggregation`` the
  default method and ``domain_models`` the models each domain runs by default. The manifest
  digest is there because thresholds change decisions as much as weights do.

A snapshot whose policies did not load still exists: it reports ``policy_error``, the service
is NOT_SERVING and every evaluation denies (an empty or broken policy set is never allow).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cabincrew.canonical import canonical_hash, sha256_hex
from cabincrew.decisions import AggregationMethod, Decision
from preflight_svc.errors import EmptyPolicySetError, PolicyLoadError, PreflightError
from preflight_svc.onnx_models import (
    ModelInfo,
    ModelRegistry,
    ModelStatus,
    ProviderPreference,
    RuntimeConfig,
    discover_model_dirs,
)
from preflight_svc.opa import (
    ALL_DOMAINS,
    PolicyBundle,
    PolicyDomain,
    PolicyResult,
    load_bundle,
    policy_digest,
)

log = logging.getLogger("cabincrew.preflight")

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
DEFAULT_POLICY_DIR: Final = REPO_ROOT / "policies"
DEFAULT_MODELS_DIR: Final = REPO_ROOT / "models" / "build"


class GovernanceLoadError(PreflightError):
    """A reload was refused; the governance in force stays."""

    def remedy(self) -> str:
        """Explain how to get a reload accepted."""
        return (
            "Fix the policy bundle (`cabincrew policy test DIR`) or the model folders "
            "(`cabincrew models list`), then reload again; the previous governance stays in "
            "force meanwhile."
        )


@dataclass(frozen=True)
class GovernanceSettings:
    """Where policies and models come from and how decisions combine by default."""

    policy_dirs: tuple[Path, ...]
    model_dirs: tuple[Path, ...]
    provider: ProviderPreference = ProviderPreference.AUTO
    aggregation: AggregationMethod = AggregationMethod.MOST_RESTRICTIVE
    # Per domain, the models it runs when a request names none; a domain not listed runs all.
    domain_models: Mapping[PolicyDomain, tuple[str, ...]] = field(default_factory=dict)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    max_interpreters: int = 4

    def __post_init__(self) -> None:
        if not self.policy_dirs:
            raise ValueError("at least one policy folder is needed (an empty set never allows)")
        if self.max_interpreters < 1:
            raise ValueError("max_interpreters must be at least 1")


def default_policy_dirs(configured: Sequence[str]) -> tuple[Path, ...]:
    """The configured policy folders, or the repository's ``policies/``."""
    return tuple(Path(p) for p in configured) or (DEFAULT_POLICY_DIR,)


def default_model_dirs(configured: Sequence[str]) -> tuple[Path, ...]:
    """The configured model folders, or every model folder under ``models/build/``."""
    if configured:
        return tuple(Path(p) for p in configured)
    if DEFAULT_MODELS_DIR.is_dir():
        return tuple(discover_model_dirs(DEFAULT_MODELS_DIR))
    return ()


@dataclass(frozen=True)
class PolicyFileInfo:
    """One file of a loaded bundle."""

    bundle: str
    path: str
    sha256: str
    packages: tuple[str, ...]


@dataclass(frozen=True)
class Governance:
    """One loaded, immutable set of policies and models with its digests."""

    settings: GovernanceSettings
    bundles: tuple[PolicyBundle, ...]
    registry: ModelRegistry
    policy_digest: str
    governance_hash: str
    domain_models: Mapping[PolicyDomain, tuple[str, ...]]
    loaded_at: datetime
    policy_error: str | None = None
    policy_files: tuple[PolicyFileInfo, ...] = ()

    @property
    def serving(self) -> bool:
        """Policies loaded and every configured model healthy."""
        return self.policy_error is None and self.registry.health().serving

    @property
    def models(self) -> tuple[ModelInfo, ...]:
        """Every configured model, healthy or not."""
        return self.registry.models

    def healthy_model(self, name: str) -> bool:
        """Whether ``name`` is a configured model that loaded."""
        return any(m.name == name and m.status is ModelStatus.SERVING for m in self.models)

    def has_model(self, name: str) -> bool:
        """Whether ``name`` is a configured model (healthy or not)."""
        return any(m.name == name for m in self.models)

    def evaluate_policies(
        self, domain: PolicyDomain, document: Mapping[str, Any]
    ) -> tuple[PolicyResult, ...]:
        """Every policy of ``domain`` in every bundle, in bundle then package order."""
        if self.policy_error is not None:
            reason = f"no policy bundle is loaded, so nothing can be allowed: {self.policy_error}"
            return (
                PolicyResult(
                    domain.package_prefix,
                    Decision.DENY,
                    (reason,),
                    None,
                    {"error": {"code": "policy_load", "message": self.policy_error}},
                ),
            )
        results: list[PolicyResult] = []
        for bundle in self.bundles:
            if bundle.packages(domain):
                results.extend(bundle.evaluate(domain, document))
        return tuple(results)

    def summary(self) -> dict[str, Any]:
        """A JSON summary for logs and the CLI."""
        return {
            "policy_digest": self.policy_digest,
            "governance_hash": self.governance_hash,
            "policy_error": self.policy_error,
            "execution_provider": self.registry.provider.name,
            "models": {m.name: m.status.value for m in self.models},
        }

    async def aclose(self) -> None:
        """Stop the model workers (idempotent)."""
        await self.registry.aclose()


def load_governance(settings: GovernanceSettings) -> Governance:
    """Load policies and models (blocking; run it off the event loop). Never raises for a
    broken bundle or model: the snapshot records why and denies."""
    bundles, error = _load_bundles(settings)
    registry = ModelRegistry.load(settings.model_dirs, settings.provider, config=settings.runtime)
    names = tuple(sorted(m.name for m in registry.models))
    domain_models = {
        domain: tuple(settings.domain_models.get(domain, names)) for domain in ALL_DOMAINS
    }
    for domain, chosen in domain_models.items():
        missing = [n for n in chosen if n not in names]
        if missing:
            log.error(
                "domain %s names models that are not configured: %s (its decisions deny)",
                domain.value,
                ", ".join(missing),
            )
    digest = _policy_digest(settings.policy_dirs, bundles)
    governance_hash = canonical_hash(
        {
            "policy_digest": digest,
            "models": sorted(
                [m.name, m.version, m.sha256, m.manifest_digest] for m in registry.models
            ),
            "aggregation": settings.aggregation.value,
            "domain_models": {d.value: list(ms) for d, ms in domain_models.items()},
        }
    )
    governance = Governance(
        settings=settings,
        bundles=bundles,
        registry=registry,
        policy_digest=digest,
        governance_hash=governance_hash,
        domain_models=domain_models,
        loaded_at=datetime.now(UTC),
        policy_error=error,
        policy_files=_files(settings.policy_dirs, bundles),
    )
    if error is not None:
        log.error("policies did not load; every decision is deny: %s", error)
    health = registry.health()
    if not health.serving:
        log.error("models unhealthy (decisions that need them deny): %s", dict(health.unhealthy))
    if not registry.models:
        log.info("no ONNX model configured: decisions come from the policies alone")
    log.info(
        "governance %s loaded: policy digest %s, provider %s (%s), models %s",
        governance_hash[:12],
        digest[:12],
        registry.provider.name,
        registry.provider.reason,
        ", ".join(f"{m.name}={m.status.value}" for m in registry.models) or "none",
    )
    return governance


def _load_bundles(
    settings: GovernanceSettings,
) -> tuple[tuple[PolicyBundle, ...], str | None]:
    bundles: list[PolicyBundle] = []
    try:
        for folder in settings.policy_dirs:
            # Each domain needs a policy in some bundle, checked below over all of them.
            bundles.append(
                load_bundle(folder, domains=(), max_interpreters=settings.max_interpreters)
            )
        missing = [d.value for d in ALL_DOMAINS if not any(b.packages(d) for b in bundles)]
        if missing:
            raise EmptyPolicySetError(", ".join(str(p) for p in settings.policy_dirs), missing)
        clashes = _package_clashes(bundles)
        if clashes:
            raise PolicyLoadError(
                "a package is defined in more than one bundle: " + ", ".join(clashes)
            )
    except PolicyLoadError as exc:
        return (), f"{exc} ({exc.remedy()})"
    return tuple(bundles), None


def _package_clashes(bundles: Sequence[PolicyBundle]) -> list[str]:
    seen: dict[str, int] = {}
    for bundle in bundles:
        for domain in ALL_DOMAINS:
            for package in bundle.packages(domain):
                seen[package] = seen.get(package, 0) + 1
    return sorted(p for p, n in seen.items() if n > 1)


def _policy_digest(dirs: Sequence[Path], bundles: Sequence[PolicyBundle]) -> str:
    if bundles:
        if len(bundles) == 1:
            return bundles[0].digest
        return canonical_hash(
            sorted([f"{i}/{f.path}", f.sha256] for i, b in enumerate(bundles) for f in b.files)
        )
    # Not loaded: still name what is on disk, so two broken sets are told apart.
    digests = []
    for folder in dirs:
        try:
            digests.append(policy_digest(folder))
        except (PolicyLoadError, OSError):
            digests.append(sha256_hex(b""))
    return digests[0] if len(digests) == 1 else canonical_hash(digests)


def _files(dirs: Sequence[Path], bundles: Sequence[PolicyBundle]) -> tuple[PolicyFileInfo, ...]:
    out: list[PolicyFileInfo] = []
    for folder, bundle in zip(dirs, bundles, strict=False):
        for f in bundle.files:
            out.append(
                PolicyFileInfo(str(folder), f.path, f.sha256, _packages_in(bundle.root / f.path))
            )
    return tuple(out)


def _packages_in(path: Path) -> tuple[str, ...]:
    # For GetGovernance only: the package line of a Rego file (data.json files have none).
    if path.suffix != ".rego":
        return ()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return ()
    found = [ln.split(None, 1)[1].strip() for ln in lines if ln.startswith("package ")]
    return tuple(p for p in found if p)


class GovernanceHolder:
    """The snapshot in force; swaps atomically and closes old snapshots once unused."""

    def __init__(self, current: Governance) -> None:
        self._current = current
        self._leases: dict[int, int] = {}
        self._retired: dict[int, Governance] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def current(self) -> Governance:
        """The snapshot new requests get."""
        return self._current

    @property
    def lock(self) -> asyncio.Lock:
        """Held while a reload builds and swaps (reloads run one at a time)."""
        return self._lock

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Governance]:
        """Use the current snapshot until the block ends, even if a reload swaps it."""
        governance = self._current
        key = id(governance)
        self._leases[key] = self._leases.get(key, 0) + 1
        try:
            yield governance
        finally:
            left = self._leases[key] - 1
            if left:
                self._leases[key] = left
            else:
                del self._leases[key]
                retired = self._retired.pop(key, None)
                if retired is not None:
                    self._close_later(retired)

    def swap(self, new: Governance) -> Governance:
        """Make ``new`` current; the old one closes when its last lease ends."""
        old, self._current = self._current, new
        if id(old) in self._leases:
            self._retired[id(old)] = old
        else:
            self._close_later(old)
        return old

    def _close_later(self, governance: Governance) -> None:
        task = asyncio.get_running_loop().create_task(governance.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close every snapshot (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for governance in [*self._retired.values(), self._current]:
            with contextlib.suppress(Exception):
                await governance.aclose()
        self._retired.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def accept_reload(current: Governance, new: Governance) -> str | None:
    """Why ``new`` must not replace ``current`` (None: swap it in).

    Policies that do not load are always refused. Models that do not load are refused while
    the current set serves, so a bad file never takes a working service down; when the
    current set is not serving either, the new one is taken (it may be the repair).
    """
    if new.policy_error is not None:
        return f"the new policies do not load: {new.policy_error}"
    health = new.registry.health()
    if not health.serving and current.serving:
        listed = "; ".join(f"{k}: {v}" for k, v in sorted(health.unhealthy.items()))
        return f"the new models do not all load ({listed})"
    return None


def model_names(models: Iterable[ModelInfo]) -> tuple[str, ...]:
    """Sorted names of models."""
    return tuple(sorted(m.name for m in models))
