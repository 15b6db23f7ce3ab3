"""OPA/Rego policy bundles: load and compile once, evaluate per request, fail closed.

A bundle is a folder of ``*.rego`` files (any depth) and optional ``data.json`` files. Each
Rego package under ``cabincrew.preflight``, ``cabincrew.mcp`` or ``cabincrew.llm`` is one
policy of that domain; it yields ``decision`` (allow, warn, require_approval or deny),
``reasons`` (strings) and optionally ``required_role`` and ``evidence``. Files named
``*_test.rego`` hold Rego tests and are not part of what is evaluated.

Fail-closed rules: a bundle with no policy for a governed domain does not load; a policy
that errors, produces no decision or an invalid one, counts as ``deny``; ``evaluate`` never
raises. docs/policy-input.md describes the convention for policy authors.
"""

from __future__ import annotations

import enum
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cabincrew.canonical import canonical_hash, sha256_hex
from cabincrew.decisions import AggregationMethod, Decision, aggregate
from preflight_svc.errors import (
    BuiltinViolation,
    EmptyPolicySetError,
    ForbiddenBuiltinError,
    InputViolation,
    PolicyDataError,
    PolicyInputError,
    PolicyLoadError,
    PolicySyntaxError,
    UnsupportedConstructError,
)
from preflight_svc.opa_rego import UNDEFINED, CompiledRego, QueryOutcome, RegoFailure, RegoModule
from preflight_svc.opa_source import ModuleScan, is_forbidden_builtin, scan_module
from preflight_svc.policy_input import policy_domain, validate_policy_input

DATA_FILE: Final = "data.json"
TEST_SUFFIX: Final = "_test.rego"
DEFAULT_MAX_INTERPRETERS: Final = 4

# Generated wrapper packages live here; user packages may not (opa_source refuses them).
_EVAL_PACKAGE: Final = "cabincrew_internal.eval"
_OUTPUT_RULES: Final = ("decision", "reasons", "required_role", "evidence")


class PolicyDomain(enum.Enum):
    """What a policy governs: a preflight step, or gateway content (MCP or LLM)."""

    PREFLIGHT = "preflight"
    MCP = "mcp"
    LLM = "llm"

    @property
    def package_prefix(self) -> str:
        """The Rego package path under which this domain's policies live."""
        return f"cabincrew.{self.value}"


ALL_DOMAINS: Final = tuple(PolicyDomain)


@dataclass(frozen=True)
class PolicyResult:
    """The verdict of one policy package for one input document."""

    policy_id: str
    decision: Decision
    reasons: tuple[str, ...] = ()
    required_role: str | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.policy_id:
            raise ValueError("policy_id must not be empty")
        if not all(isinstance(r, str) for r in self.reasons):
            raise ValueError("reasons must be strings")
        if self.required_role is not None and not self.required_role:
            raise ValueError("required_role must be None or a non-empty string")

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON object (for audit evidence and the CLI)."""
        out: dict[str, Any] = {
            "policy_id": self.policy_id,
            "decision": self.decision.value,
            "severity": self.decision.severity,
            "reasons": list(self.reasons),
            "evidence": dict(self.evidence),
        }
        if self.required_role is not None:
            out["required_role"] = self.required_role
        return out


@dataclass(frozen=True)
class PolicyFile:
    """A file of a bundle: its bundle-relative POSIX path and the SHA-256 of its content."""

    path: str
    sha256: str


@dataclass(frozen=True)
class PolicyTestResult:
    """The outcome of one ``test_*`` rule of a bundle."""

    package: str
    name: str
    passed: bool
    error: str | None = None

    @property
    def test_id(self) -> str:
        """The test's full Rego path, such as ``data.cabincrew.preflight.paths_test.test_x``."""
        return f"data.{self.package}.{self.name}"


@dataclass(frozen=True)
class FileEvaluation:
    """What ``evaluate_file`` found: each policy's result and their most restrictive verdict."""

    domain: PolicyDomain
    decision: Decision
    results: tuple[PolicyResult, ...]
    policy_digest: str

    def to_json(self) -> dict[str, Any]:
        """The evaluation as a JSON object (what ``cabincrew policy eval`` prints)."""
        return {
            "domain": self.domain.value,
            "decision": self.decision.value,
            "policy_digest": self.policy_digest,
            "results": [r.to_json() for r in self.results],
        }


@dataclass(frozen=True)
class _Source:
    """A bundle read from disk and checked, before anything is compiled."""

    root: Path
    files: tuple[PolicyFile, ...]
    modules: tuple[RegoModule, ...]
    scans: tuple[ModuleScan, ...]
    data: Mapping[str, Any]

    @property
    def digest(self) -> str:
        return _digest(self.files)

    def policy_modules(self) -> tuple[RegoModule, ...]:
        return tuple(m for m in self.modules if not m.name.endswith(TEST_SUFFIX))

    def packages(self, domain: PolicyDomain) -> tuple[str, ...]:
        prefix = domain.package_prefix
        found = {
            s.package
            for s in self.scans
            if not s.path.endswith(TEST_SUFFIX)
            and (s.package == prefix or s.package.startswith(prefix + "."))
        }
        return tuple(sorted(found))


def policy_digest(bundle_dir: str | os.PathLike[str]) -> str:
    """SHA-256 hex over the canonical JSON of sorted [path, sha256] of the bundle's files."""
    root = _bundle_root(bundle_dir)
    return _digest(tuple(PolicyFile(rel, sha256_hex(content)) for rel, content in _walk(root)))


def load_bundle(
    bundle_dir: str | os.PathLike[str],
    *,
    domains: Iterable[PolicyDomain] = ALL_DOMAINS,
    max_interpreters: int = DEFAULT_MAX_INTERPRETERS,
) -> PolicyBundle:
    """Read, check and compile a bundle; each of ``domains`` must have a policy."""
    if max_interpreters < 1:
        raise ValueError("max_interpreters must be at least 1")
    source = _read_source(bundle_dir)
    required = tuple(domains)
    missing = [d.value for d in required if not source.packages(d)]
    if missing:
        raise EmptyPolicySetError(str(source.root), missing)
    return PolicyBundle(source, max_interpreters)


class PolicyBundle:
    """A compiled bundle; ``evaluate`` may be called from many threads at once."""

    def __init__(self, source: _Source, max_interpreters: int) -> None:
        self.root = source.root
        self.files = source.files
        self.digest = source.digest
        self._packages = {d: source.packages(d) for d in PolicyDomain}
        modules = source.policy_modules() + tuple(
            _wrapper_module(d, i, package)
            for d, packages in self._packages.items()
            for i, package in enumerate(packages)
        )
        entrypoints = [
            ep
            for d, packages in self._packages.items()
            if packages
            for ep in [_entrypoint(d)] + [_entrypoint(d, i) for i in range(len(packages))]
        ]
        data = source.data

        def compile_once() -> CompiledRego:
            return CompiledRego(modules, data, entrypoints)

        first = compile_once()
        _check_compiled_builtins(first, modules)
        self._probe(first)
        self._pool = _Pool(compile_once, first, max_interpreters)

    def packages(self, domain: PolicyDomain) -> tuple[str, ...]:
        """The policy packages of ``domain``, sorted."""
        return self._packages[domain]

    def evaluate(
        self, domain: PolicyDomain, document: Mapping[str, Any]
    ) -> tuple[PolicyResult, ...]:
        """Evaluate every policy of ``domain`` on ``document``; never raises, errors deny."""
        packages = self._packages.get(domain, ())
        if not packages:
            reason = f"no policy is loaded for domain {domain.value}: an empty policy set denies"
            return (_deny(domain.package_prefix, reason),)
        try:
            with self._pool.lease() as engine:
                engine.set_input(document)
                outcome = engine.query(_entrypoint(domain))
                if outcome.ok and isinstance(outcome.value, dict):
                    return tuple(
                        _result(package, outcome.value.get(f"p{i}", UNDEFINED))
                        for i, package in enumerate(packages)
                    )
                # One failing policy stops the whole query; ask each policy alone so that
                # the others still get their own verdict and the failure its own deny.
                return tuple(
                    _from_outcome(package, engine.query(_entrypoint(domain, i)))
                    for i, package in enumerate(packages)
                )
        except Exception as exc:
            # Fail closed: whatever went wrong (an input that is not JSON, an interpreter
            # that could not be built), every policy of the domain denies; never raise.
            reason = f"policy evaluation failed: {type(exc).__name__}: {exc}"
            return tuple(_deny(p, reason, _error_evidence("internal", str(exc))) for p in packages)

    def _probe(self, engine: CompiledRego) -> None:
        # The engine reports some compile errors (unknown functions, recursion, arity) only
        # when a rule is evaluated; evaluating each policy once on an empty input surfaces
        # them at load instead of as a deny on every request.
        engine.set_input({})
        for domain, packages in self._packages.items():
            for i, package in enumerate(packages):
                outcome = engine.query(_entrypoint(domain, i))
                static = [f for f in outcome.failures if not f.is_runtime]
                if static:
                    raise PolicySyntaxError(package, 0, 0, "; ".join(str(f) for f in static))


def run_policy_tests(bundle_dir: str | os.PathLike[str]) -> list[PolicyTestResult]:
    """Run the bundle's ``test_*`` rules (in any file) and report each one's outcome."""
    source = _read_source(bundle_dir)
    tests: list[tuple[str, str]] = []
    for scan in source.scans:
        for name in scan.test_rules:
            if (scan.package, name) not in tests:
                tests.append((scan.package, name))
    if not tests:
        return []
    entrypoints = [_rule_entrypoint(package, name) for package, name in tests]
    engine = CompiledRego(source.modules, source.data, entrypoints)
    _check_compiled_builtins(engine, source.modules)
    results: list[PolicyTestResult] = []
    for (package, name), entrypoint in zip(tests, entrypoints, strict=True):
        outcome = engine.query(entrypoint)
        if outcome.failures:
            error = "; ".join(str(f) for f in outcome.failures)
            results.append(PolicyTestResult(package, name, False, error))
        elif outcome.value is True:
            results.append(PolicyTestResult(package, name, True))
        else:
            got = "undefined" if outcome.value is UNDEFINED else json.dumps(outcome.value)
            results.append(PolicyTestResult(package, name, False, f"test is {got}, not true"))
    return results


def evaluate_file(
    input_path: str | os.PathLike[str], bundle_dir: str | os.PathLike[str]
) -> FileEvaluation:
    """Validate a policy input document from a file and evaluate it with a bundle."""
    try:
        document = json.loads(Path(input_path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PolicyInputError([InputViolation("", f"not a JSON document: {exc}")]) from None
    validate_policy_input(document)
    domain = PolicyDomain(policy_domain(document))
    bundle = load_bundle(bundle_dir, domains=(domain,), max_interpreters=1)
    results = bundle.evaluate(domain, document)
    decision = aggregate(AggregationMethod.MOST_RESTRICTIVE, (r.decision for r in results))
    return FileEvaluation(domain, decision, results, bundle.digest)


# --- reading a bundle ------------------------------------------------------------------


def _bundle_root(bundle_dir: str | os.PathLike[str]) -> Path:
    root = Path(bundle_dir)
    if not root.is_dir():
        raise PolicyLoadError(f"policy bundle {root} is not a folder")
    return root


def _walk(root: Path) -> list[tuple[str, bytes]]:
    found: list[tuple[str, bytes]] = []
    # Sorted walk without following folder links, so that the digest and the compiled set
    # are the same files in the same order on every host.
    for folder, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".rego") or name == DATA_FILE:
                path = Path(folder, name)
                found.append((path.relative_to(root).as_posix(), path.read_bytes()))
    found.sort(key=lambda item: item[0])
    return found


def _digest(files: Sequence[PolicyFile]) -> str:
    return canonical_hash(sorted([f.path, f.sha256] for f in files))


def _read_source(bundle_dir: str | os.PathLike[str]) -> _Source:
    root = _bundle_root(bundle_dir)
    entries = _walk(root)
    files = tuple(PolicyFile(rel, sha256_hex(content)) for rel, content in entries)
    modules: list[RegoModule] = []
    data: dict[str, Any] = {}
    for rel, content in entries:
        if rel.endswith(".rego"):
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError:
                raise PolicySyntaxError(rel, 1, 1, "file is not UTF-8") from None
            modules.append(RegoModule(rel, text))
        else:
            _merge_data(data, rel, content)
    if not modules:
        raise EmptyPolicySetError(str(root), [d.value for d in PolicyDomain])
    scans = tuple(scan_module(m.name, m.source) for m in modules)
    forbidden = [v for s in scans for v in s.forbidden_calls()]
    if forbidden:
        raise ForbiddenBuiltinError(forbidden)
    withs = [
        BuiltinViolation(s.path, w.line, w.column, w.name)
        for s in scans
        for w in s.whole_input_withs
    ]
    if withs:
        raise UnsupportedConstructError(
            withs, "the embedded Rego engine crashes on whole-input replacement"
        )
    clashes = _arity_clashes(scans)
    if clashes:
        raise UnsupportedConstructError(
            clashes,
            "the embedded Rego engine corrupts its memory when functions of the same name "
            "take different numbers of arguments, even in different packages",
        )
    return _Source(root, files, tuple(modules), scans, data)


def _arity_clashes(scans: Sequence[ModuleScan]) -> list[BuiltinViolation]:
    arities: dict[str, set[int]] = {}
    for scan in scans:
        for head in scan.functions:
            arities.setdefault(head.name, set()).add(head.arity)
    return [
        BuiltinViolation(scan.path, head.line, head.column, f"{head.name}/{head.arity}")
        for scan in scans
        for head in scan.functions
        if len(arities[head.name]) > 1
    ]


def _merge_data(data: dict[str, Any], rel: str, content: bytes) -> None:
    try:
        value = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PolicyDataError(rel, f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PolicyDataError(rel, "must hold a JSON object")
    # As in OPA bundles, a data.json is mounted at the path of its folder.
    target = data
    for segment in Path(rel).parent.parts:
        existing = target.setdefault(segment, {})
        if not isinstance(existing, dict):
            raise PolicyDataError(rel, f"conflicts with another data.json at {segment!r}")
        target = existing
    _deep_merge(target, value, rel)


def _deep_merge(target: dict[str, Any], value: Mapping[str, Any], rel: str) -> None:
    for key, item in value.items():
        if key not in target:
            target[key] = item
        elif isinstance(target[key], dict) and isinstance(item, dict):
            _deep_merge(target[key], item, rel)
        else:
            raise PolicyDataError(rel, f"sets {key!r}, which another data.json already sets")


def _check_compiled_builtins(engine: CompiledRego, modules: Sequence[RegoModule]) -> None:
    # Second line of defence behind the lexical scan: the builtins the compiled plans call.
    refused = sorted(name for name in engine.builtins() if is_forbidden_builtin(name))
    if refused:
        violations = [_locate(name, modules) for name in refused]
        raise ForbiddenBuiltinError(violations)


def _locate(name: str, modules: Sequence[RegoModule]) -> BuiltinViolation:
    last = name.rsplit(".", 1)[-1]
    for module in modules:
        for number, text in enumerate(module.source.splitlines(), start=1):
            if last in text:
                return BuiltinViolation(module.name, number, text.find(last) + 1, name)
    return BuiltinViolation("<bundle>", 0, 0, name)


# --- evaluation ---------------------------------------------------------------------------


def _entrypoint(domain: PolicyDomain, index: int | None = None) -> str:
    base = f"{_EVAL_PACKAGE}.{domain.value}".replace(".", "/")
    return base if index is None else f"{base}/p{index}"


def _rule_entrypoint(package: str, rule: str) -> str:
    return f"{package.replace('.', '/')}/{rule}"


def _wrapper_module(domain: PolicyDomain, index: int, package: str) -> RegoModule:
    # One generated package per policy gathers its outputs, so that a single query returns
    # every policy of a domain; rules a policy does not define are simply absent.
    ref = "data" + "".join(f'["{segment}"]' for segment in package.split("."))
    lines = [f"package {_EVAL_PACKAGE}.{domain.value}.p{index}", ""]
    lines += [f'{rule} := {ref}["{rule}"]' for rule in _OUTPUT_RULES]
    return RegoModule(f"<generated>/{domain.value}/p{index}.rego", "\n".join(lines) + "\n")


def _from_outcome(package: str, outcome: QueryOutcome) -> PolicyResult:
    if outcome.failures:
        return _failed(package, outcome.failures)
    return _result(package, outcome.value)


def _failed(package: str, failures: Sequence[RegoFailure]) -> PolicyResult:
    first = failures[0]
    reason = f"policy evaluation failed: {first.message} ({first.code})"
    return _deny(package, reason, _error_evidence(first.code, first.message))


def _error_evidence(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _deny(package: str, reason: str, evidence: Mapping[str, Any] | None = None) -> PolicyResult:
    return PolicyResult(package, Decision.DENY, (reason,), None, dict(evidence or {}))


def _result(package: str, outputs: Any) -> PolicyResult:
    if not isinstance(outputs, dict):
        outputs = {}
    reasons = _reasons(outputs.get("reasons"))
    evidence = _evidence(outputs.get("evidence"))
    raw_decision = outputs.get("decision")
    if raw_decision is None:
        return _deny(package, "policy produced no decision", evidence)
    try:
        decision = Decision.parse(raw_decision) if isinstance(raw_decision, str) else None
    except ValueError:
        decision = None
    if decision is None:
        return _deny(package, f"policy produced an invalid decision {json.dumps(raw_decision)}")
    role = outputs.get("required_role")
    if role is not None and (not isinstance(role, str) or not role):
        return _deny(package, "policy produced an invalid required_role", evidence)
    return PolicyResult(package, decision, reasons, role, evidence)


def _reasons(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for item in items:
        text = item if isinstance(item, str) else json.dumps(item, sort_keys=True)
        if text not in out:
            out.append(text)
    return tuple(out)


def _evidence(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    return {"value": value}


class _Pool:
    """Compiled interpreters leased to one caller at a time; grows up to a bound on demand."""

    def __init__(
        self, factory: Callable[[], CompiledRego], first: CompiledRego, max_size: int
    ) -> None:
        self._factory = factory
        self._idle = [first]
        self._created = 1
        self._max_size = max_size
        self._available = threading.Condition()

    @contextmanager
    def lease(self) -> Iterator[CompiledRego]:
        engine: CompiledRego | None = None
        with self._available:
            while not self._idle and self._created >= self._max_size:
                self._available.wait()
            if self._idle:
                engine = self._idle.pop()
            else:
                self._created += 1
        if engine is None:
            try:
                engine = self._factory()
            except BaseException:
                with self._available:
                    self._created -= 1
                    self._available.notify()
                raise
        try:
            yield engine
        finally:
            with self._available:
                self._idle.append(engine)
                self._available.notify()
