"""Workflow definitions: parse YAML or JSON, validate, and build frozen domain objects.

Every problem found is reported at once, each as ``file:line: field.path: message``; the
line comes from the YAML node marks, so a JSON-pointer path from the schema validator maps to
the line a human has to edit. See docs/workflows.md for the format.
"""

from __future__ import annotations

import copy
import enum
import functools
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError

from cabincrew.canonical import canonical_hash
from orchestrator_svc.dag import Dag
from orchestrator_svc.errors import (
    DagError,
    ExpressionSyntaxError,
    InputsError,
    Issue,
    UnsupportedStepError,
    WorkflowDefinitionError,
)
from orchestrator_svc.templating import (
    Condition,
    Reference,
    Scope,
    Template,
    render_config,
    string_leaves,
)

SCHEMA_PATH = Path(__file__).parent / "schemas" / "workflow.schema.json"
MAX_DEFINITION_BYTES = 1 << 20
MAX_EXPANDED_NODES = 200_000
DEFAULT_CONCURRENCY = 4
DEFAULT_TIMEOUT_SECONDS = 600.0
DEFAULT_MAX_BACKOFF_SECONDS = 300.0
# Engines may not receive secrets under names the runner sets itself.
RESERVED_ENV = frozenset({"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PWD", "SHELL", "USER"})
RESERVED_ENV_PREFIX = "CABINCREW_"

PathParts = tuple[str | int, ...]


class StepKind(enum.Enum):
    """What a step does; ``tool`` and ``llm`` are reserved and cannot run yet."""

    ENGINE = "engine"
    APPROVAL = "approval"
    TOOL = "tool"
    LLM = "llm"

    @property
    def supported(self) -> bool:
        """Whether the orchestrator can run steps of this kind."""
        return self in (StepKind.ENGINE, StepKind.APPROVAL)


@dataclass(frozen=True)
class InputSpec:
    """A declared workflow input."""

    name: str
    required: bool
    has_default: bool = False
    default: Any = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.required and self.has_default:
            raise ValueError(f"input {self.name!r} cannot be both required and defaulted")


@dataclass(frozen=True)
class GitSource:
    """A git repository and the ref to check out (detached) as the workspace."""

    repo: str
    ref: str

    def __post_init__(self) -> None:
        if not self.repo or not self.ref or self.ref.startswith("-"):
            raise ValueError("a git source needs a repo and a ref that does not start with '-'")


@dataclass(frozen=True)
class WorkspaceSpec:
    """Where a workflow's workspace comes from: a folder to copy, or a git ref."""

    source: Path | None = None
    git: GitSource | None = None

    def __post_init__(self) -> None:
        if (self.source is None) == (self.git is None):
            raise ValueError("a workspace has exactly one of source or git")


@dataclass(frozen=True)
class GovernanceSpec:
    """Governance settings; ``None`` means "not set here" so that step settings can inherit."""

    policy_bundle: str | None = None
    models: tuple[str, ...] | None = None
    aggregation: str | None = None
    approval_role: str | None = None
    approval_quorum: int | None = None

    def over(self, base: GovernanceSpec) -> GovernanceSpec:
        """Return these settings with unset fields taken from ``base``."""
        return GovernanceSpec(
            policy_bundle=_first(self.policy_bundle, base.policy_bundle),
            models=_first(self.models, base.models),
            aggregation=_first(self.aggregation, base.aggregation),
            approval_role=_first(self.approval_role, base.approval_role),
            approval_quorum=_first(self.approval_quorum, base.approval_quorum),
        )

    @property
    def effective_aggregation(self) -> str:
        """The aggregation method, defaulting to the protocol's most_restrictive."""
        return self.aggregation or "most_restrictive"

    @property
    def effective_quorum(self) -> int:
        """How many distinct approvers an approval needs (default 1)."""
        return self.approval_quorum or 1


def _first(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


@dataclass(frozen=True)
class EngineSpec:
    """How to launch an engine: its argv (``--mode ...`` is appended by the runner)."""

    argv: tuple[str, ...]
    idempotent_takeoff: bool = False

    def __post_init__(self) -> None:
        if not self.argv or not self.argv[0]:
            raise ValueError("an engine needs a non-empty command")


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed run is attempted again, with capped exponential back-off."""

    max_attempts: int = 1
    backoff_seconds: float = 0.0
    max_backoff_seconds: float = DEFAULT_MAX_BACKOFF_SECONDS

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.backoff_seconds < 0 or self.max_backoff_seconds < 0:
            raise ValueError("retry settings must be positive")

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after ``failed_attempts`` failures (deterministic, no jitter)."""
        if failed_attempts < 1:
            return 0.0
        exponent = min(failed_attempts - 1, 32)
        return float(min(self.backoff_seconds * (2**exponent), self.max_backoff_seconds))


@dataclass(frozen=True)
class PostChecks:
    """Checks after take-off: preflight on its artifacts, and whether it must produce any."""

    preflight: bool = True
    require_artifacts: bool = False


@dataclass(frozen=True)
class Step:
    """One step of a workflow, with governance already merged over the workflow's."""

    id: str
    kind: StepKind
    depends_on: tuple[str, ...] = ()
    engine: EngineSpec | None = None
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    secrets: tuple[str, ...] = ()
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    retries: RetryPolicy = RetryPolicy()
    when: Condition | None = None
    governance: GovernanceSpec = GovernanceSpec()
    allow_workspace_drift: bool = False
    post_checks: PostChecks = PostChecks()
    outputs: Mapping[str, str] | None = None
    description: str = ""
    line: int | None = field(default=None, compare=False)  # where it was declared, for messages

    def __post_init__(self) -> None:
        if self.kind is StepKind.ENGINE and self.engine is None:
            raise ValueError(f"engine step {self.id!r} needs an engine")
        if self.kind is StepKind.APPROVAL and self.engine is not None:
            raise ValueError(f"approval step {self.id!r} cannot have an engine")
        if self.timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")

    def should_run(self, scope: Scope) -> bool:
        """Evaluate the ``when`` condition (steps without one always run)."""
        return True if self.when is None else self.when.evaluate(scope)

    def render_config(self, scope: Scope) -> dict[str, Any]:
        """Return the step's config with every template rendered."""
        return render_config(self.config, scope)

    def references(self) -> tuple[Reference, ...]:
        """Every input or step value that this step's config and condition refer to."""
        refs = [
            ref
            for _, text in string_leaves(self.config)
            for ref in Template.parse(text).references()
        ]
        if self.when is not None:
            refs.extend(self.when.references())
        return tuple(refs)


@dataclass(frozen=True)
class Workflow:
    """A validated workflow definition."""

    id: str
    steps: tuple[Step, ...]
    dag: Dag
    description: str = ""
    inputs: Mapping[str, InputSpec] = field(default_factory=lambda: MappingProxyType({}))
    concurrency: int = DEFAULT_CONCURRENCY
    workspace: WorkspaceSpec | None = None
    governance: GovernanceSpec = GovernanceSpec()
    source: str = "<document>"
    document: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if tuple(step.id for step in self.steps) != self.dag.nodes:
            raise ValueError("the DAG must list exactly the workflow's steps, in order")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the definition as submitted."""
        return canonical_hash(_thaw(self.document))

    def step(self, step_id: str) -> Step:
        """Return the step with this id; unknown ids raise ``KeyError``."""
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def ensure_runnable(self) -> None:
        """Raise ``UnsupportedStepError`` if any step uses a reserved kind (tool, llm)."""
        issues = [
            Issue(
                self.source,
                step.line,
                f"steps[{index}].kind",
                f"step {step.id!r}: kind {step.kind.value!r} is reserved and not yet supported",
            )
            for index, step in enumerate(self.steps)
            if not step.kind.supported
        ]
        if issues:
            raise UnsupportedStepError(issues)

    def resolve_inputs(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Apply defaults and check the given inputs against the declared ones."""
        problems = [f"unknown input {name!r}" for name in sorted(set(given) - set(self.inputs))]
        resolved: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            if name in given:
                resolved[name] = copy.deepcopy(given[name])
            elif spec.has_default:
                resolved[name] = copy.deepcopy(spec.default)
            elif spec.required:
                problems.append(f"missing required input {name!r}")
        if problems:
            raise InputsError(problems)
        return resolved


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_thaw(item) for item in value]
    return value


# --- loading ------------------------------------------------------------------------------


def load_workflow(path: str | Path) -> Workflow:
    """Read and validate a workflow file; relative paths in it resolve against its folder."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise WorkflowDefinitionError(
            [Issue(file.name, None, "", f"cannot read: {exc.strerror}")]
        ) from None
    return parse_workflow(raw, source=file.name, base_dir=file.resolve().parent)


def parse_workflow(
    text: str | bytes, source: str = "workflow.yaml", base_dir: Path | None = None
) -> Workflow:
    """Parse YAML or JSON text into a validated ``Workflow``; raise ``WorkflowDefinitionError``."""
    if len(text) > MAX_DEFINITION_BYTES:
        raise WorkflowDefinitionError(
            [Issue(source, None, "", f"larger than {MAX_DEFINITION_BYTES} bytes")]
        )
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise WorkflowDefinitionError([Issue(source, None, "", "not UTF-8 text")]) from None
    document, lines = _compose(text, source)
    return _build(document, source, base_dir, lines)


def workflow_from_document(
    document: Mapping[str, Any], source: str = "<document>", base_dir: Path | None = None
) -> Workflow:
    """Validate an already-parsed definition (for example a protobuf Struct); no line numbers."""
    return _build(_normalise_numbers(_thaw(document)), source, base_dir, _Lines({}, {}))


def _normalise_numbers(value: Any) -> Any:
    # protobuf Struct carries every number as a double; integral ones become ints again.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _normalise_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_normalise_numbers(item) for item in value]
    return value


@dataclass(frozen=True)
class _Lines:
    """1-based lines of value nodes and of mapping keys, by path."""

    values: Mapping[PathParts, int]
    keys: Mapping[PathParts, int]

    def of(self, path: PathParts, prefer_key: bool = True) -> int | None:
        for length in range(len(path), -1, -1):
            prefix = path[:length]
            if prefer_key and prefix in self.keys:
                return self.keys[prefix]
            if prefix in self.values:
                return self.values[prefix]
        return None


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-style scalars: only true/false are booleans, no timestamps."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag not in (_BOOL_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _compose(text: str, source: str) -> tuple[Any, _Lines]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise WorkflowDefinitionError([Issue(source, None, "", "the file is empty")])
        if _expanded_size(node, {}) > MAX_EXPANDED_NODES:
            raise WorkflowDefinitionError(
                [
                    Issue(
                        source,
                        None,
                        "",
                        f"more than {MAX_EXPANDED_NODES} values once aliases are expanded",
                    )
                ]
            )
        values: dict[PathParts, int] = {}
        keys: dict[PathParts, int] = {}
        issues: list[Issue] = []
        _walk(node, (), values, keys, issues, source, set())
        if issues:
            raise WorkflowDefinitionError(issues)
        document = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise WorkflowDefinitionError(
            [Issue(source, line, "", f"not valid YAML/JSON: {exc.problem}")]
        ) from None
    except yaml.YAMLError:
        raise WorkflowDefinitionError([Issue(source, None, "", "not valid YAML/JSON")]) from None
    except RecursionError:
        raise WorkflowDefinitionError([Issue(source, None, "", "nested too deeply")]) from None
    finally:
        loader.dispose()
    issues = list(_json_problems(document, (), source, _Lines(values, keys)))
    if issues:
        raise WorkflowDefinitionError(issues)
    return document, _Lines(values, keys)


def _walk(
    node: yaml.Node,
    path: PathParts,
    values: dict[PathParts, int],
    keys: dict[PathParts, int],
    issues: list[Issue],
    source: str,
    ancestors: set[int],
    walked: set[int] | None = None,
) -> None:
    walked = set() if walked is None else walked
    values[path] = node.start_mark.line + 1
    if id(node) in ancestors:
        issues.append(
            Issue(source, node.start_mark.line + 1, _format_path(path), "recursive alias")
        )
        return
    if id(node) in walked:
        # An alias: the node's own lines were recorded under the path where it was defined.
        return
    walked.add(id(node))
    if isinstance(node, yaml.MappingNode):
        ancestors.add(id(node))
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                issues.append(
                    Issue(
                        source,
                        key_node.start_mark.line + 1,
                        _format_path(path),
                        "keys must be strings",
                    )
                )
                continue
            key = key_node.value
            if key in seen:
                issues.append(
                    Issue(
                        source,
                        key_node.start_mark.line + 1,
                        _format_path((*path, key)),
                        "duplicate key",
                    )
                )
            seen.add(key)
            keys.setdefault((*path, key), key_node.start_mark.line + 1)
            _walk(value_node, (*path, key), values, keys, issues, source, ancestors, walked)
        ancestors.discard(id(node))
    elif isinstance(node, yaml.SequenceNode):
        ancestors.add(id(node))
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), values, keys, issues, source, ancestors, walked)
        ancestors.discard(id(node))


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Count nodes with aliases expanded, so that an alias bomb is refused before it is walked."""
    known = memo.get(id(node))
    if known is not None:
        return known
    memo[id(node)] = 1  # provisional, in case of a (separately reported) recursive alias
    total = 1
    if isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(item, memo) for item in node.value)
    memo[id(node)] = min(total, MAX_EXPANDED_NODES + 1)
    return memo[id(node)]


def _json_problems(value: Any, path: PathParts, source: str, lines: _Lines) -> Iterator[Issue]:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                yield Issue(
                    source, lines.of(path), _format_path(path), f"key {key!r} must be a string"
                )
            else:
                yield from _json_problems(item, (*path, key), source, lines)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _json_problems(item, (*path, index), source, lines)
    elif isinstance(value, float) and not math.isfinite(value):
        yield Issue(source, lines.of(path), _format_path(path), "numbers must be finite")
    elif not (value is None or isinstance(value, str | int | float | bool)):
        yield Issue(
            source,
            lines.of(path),
            _format_path(path),
            f"unsupported value type {type(value).__name__}",
        )


def _format_path(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += part if not out else f".{part}"
    return out


@functools.cache
def _schema_validator() -> Draft7Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def workflow_schema() -> dict[str, Any]:
    """Return the JSON schema of workflow definitions (a copy)."""
    return copy.deepcopy(dict(_schema_validator().schema))


def _schema_issues(document: Any, source: str, lines: _Lines) -> list[Issue]:
    issues: dict[tuple[str, str], Issue] = {}
    for error in _schema_validator().iter_errors(document):
        for issue in _describe(error, source, lines):
            issues.setdefault((issue.path, issue.message), issue)
    return sorted(issues.values(), key=lambda issue: (issue.line or 0, issue.path, issue.message))


def _describe(error: ValidationError, source: str, lines: _Lines) -> Iterator[Issue]:
    path: PathParts = tuple(error.absolute_path)
    instance = error.instance
    if error.validator == "required" and isinstance(instance, dict):
        for name in error.validator_value:
            if name not in instance:
                yield Issue(source, lines.of(path), _format_path((*path, name)), "required")
        return
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = set(error.schema.get("properties", {}))
        for name in sorted(set(instance) - known):
            where = (*path, name)
            yield Issue(source, lines.of(where), _format_path(where), "unknown field")
        return
    yield Issue(source, lines.of(path, prefer_key=False), _format_path(path), _message(error))


def _message(error: ValidationError) -> str:
    expected = error.validator_value
    match error.validator:
        case "type":
            kinds = expected if isinstance(expected, list) else [expected]
            return "must be " + " or ".join(_TYPE_WORDS.get(str(kind), str(kind)) for kind in kinds)
        case "enum":
            return "must be one of " + ", ".join(json.dumps(item) for item in expected)
        case "pattern":
            return f"does not match {expected}"
        case "minProperties" | "maxProperties" if error.schema.get("maxProperties") == 1:
            return "needs exactly one of: " + ", ".join(error.schema.get("properties", {}))
        case "minimum" | "exclusiveMinimum" | "maximum" | "exclusiveMaximum":
            word = {
                "minimum": ">=",
                "exclusiveMinimum": ">",
                "maximum": "<=",
                "exclusiveMaximum": "<",
            }
            return f"must be {word[str(error.validator)]} {expected}"
        case "minItems":
            return f"needs at least {expected} item(s)"
        case "maxItems":
            return f"allows at most {expected} item(s)"
        case "minLength":
            return "must not be empty" if expected == 1 else f"needs at least {expected} characters"
        case "maxLength":
            return f"allows at most {expected} characters"
        case "propertyNames":
            return "has an invalid name"
        case _:
            return str(error.message)


_TYPE_WORDS = {
    "string": "a string",
    "array": "a list",
    "object": "a mapping",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
}


def _build(document: Any, source: str, base_dir: Path | None, lines: _Lines) -> Workflow:
    issues = _schema_issues(document, source, lines)
    if issues:
        raise WorkflowDefinitionError(issues)
    builder = _Builder(document, source, base_dir, lines)
    workflow = builder.build()
    if builder.issues:
        raise WorkflowDefinitionError(
            sorted(builder.issues, key=lambda issue: (issue.line or 0, issue.path))
        )
    assert workflow is not None
    return workflow


class _Builder:
    """Semantic checks that a schema cannot express, and construction of the domain objects."""

    def __init__(
        self, document: dict[str, Any], source: str, base_dir: Path | None, lines: _Lines
    ) -> None:
        self.document = document
        self.source = source
        self.base_dir = base_dir
        self.lines = lines
        self.issues: list[Issue] = []

    def issue(self, path: PathParts, message: str, prefer_key: bool = True) -> None:
        self.issues.append(
            Issue(self.source, self.lines.of(path, prefer_key), _format_path(path), message)
        )

    def build(self) -> Workflow | None:
        doc = self.document
        inputs = self.inputs(doc.get("inputs", {}))
        governance = self.governance(doc.get("governance", {}))
        workspace = self.workspace(doc.get("workspace"))
        raw_steps: list[dict[str, Any]] = doc["steps"]
        dag = self.dag(raw_steps)
        steps = [self.step(index, raw, governance) for index, raw in enumerate(raw_steps)]
        if dag is not None:
            for index, raw in enumerate(raw_steps):
                self.check_references(index, raw, steps, dag, inputs)
        if self.issues or dag is None:
            return None
        return Workflow(
            id=doc["id"],
            description=doc.get("description", ""),
            inputs=MappingProxyType(inputs),
            concurrency=doc.get("concurrency", DEFAULT_CONCURRENCY),
            workspace=workspace,
            governance=governance,
            steps=tuple(step for step in steps if step is not None),
            dag=dag,
            source=self.source,
            document=MappingProxyType(copy.deepcopy(doc)),
        )

    def inputs(self, raw: dict[str, Any]) -> dict[str, InputSpec]:
        specs: dict[str, InputSpec] = {}
        for name, spec in raw.items():
            has_default = "default" in spec
            required = spec.get("required", not has_default)
            if required and has_default:
                self.issue(
                    ("inputs", name, "required"), "an input with a default cannot be required"
                )
                continue
            specs[name] = InputSpec(
                name, required, has_default, spec.get("default"), spec.get("description", "")
            )
        return specs

    def governance(self, raw: dict[str, Any]) -> GovernanceSpec:
        models = raw.get("models")
        return GovernanceSpec(
            policy_bundle=raw.get("policy_bundle"),
            models=tuple(models) if models is not None else None,
            aggregation=raw.get("aggregation"),
            approval_role=raw.get("approval_role"),
            approval_quorum=raw.get("approval_quorum"),
        )

    def workspace(self, raw: dict[str, Any] | None) -> WorkspaceSpec | None:
        if raw is None:
            return None
        if "git" in raw:
            return WorkspaceSpec(git=GitSource(self.resolve(raw["git"]["repo"]), raw["git"]["ref"]))
        return WorkspaceSpec(source=Path(self.resolve(raw["source"])))

    def resolve(self, text: str) -> str:
        # Only explicit relative paths move: bare words (git URLs, PATH commands) stay as written.
        if self.base_dir is not None and (
            text.startswith("./") or text.startswith("../") or text in (".", "..")
        ):
            return str((self.base_dir / text).resolve())
        return text

    def dag(self, raw_steps: list[dict[str, Any]]) -> Dag | None:
        try:
            return Dag.build([(raw["id"], raw.get("depends_on", [])) for raw in raw_steps])
        except DagError as exc:
            positions: dict[str, list[int]] = {}
            for index, raw in enumerate(raw_steps):
                positions.setdefault(raw["id"], []).append(index)
            for problem in dict.fromkeys(exc.problems):
                index = positions[problem.step][0]
                if problem.dependency is None:
                    # A duplicate id: point at every later declaration, not the first.
                    for later in positions[problem.step][1:]:
                        self.issue(("steps", later, "id"), f"duplicate step id {problem.step!r}")
                    continue
                deps = raw_steps[index].get("depends_on", [])
                where: PathParts = ("steps", index, "depends_on")
                if problem.dependency in deps:
                    # The last mention, so that "listed twice" points at the repeat.
                    where = (*where, len(deps) - 1 - deps[::-1].index(problem.dependency))
                self.issue(where, str(problem), prefer_key=False)
            return None

    def step(
        self, index: int, raw: dict[str, Any], workflow_governance: GovernanceSpec
    ) -> Step | None:
        here: PathParts = ("steps", index)
        kind = StepKind(raw["kind"])
        step_id = raw["id"]
        engine = None
        if "engine" in raw:
            command = raw["engine"]["command"]
            argv = [command] if isinstance(command, str) else list(command)
            argv += raw["engine"].get("args", [])
            engine = EngineSpec(
                tuple(self.resolve(arg) for arg in argv),
                raw["engine"].get("idempotent_takeoff", False),
            )
        if kind is StepKind.ENGINE and engine is None:
            self.issue((*here, "engine"), f"step {step_id!r}: an engine step needs an engine")
        raw_governance = dict(raw.get("governance", {}))
        allow_drift = bool(raw_governance.pop("allow_workspace_drift", False))
        governance = self.governance(raw_governance).over(workflow_governance)
        if kind is StepKind.APPROVAL:
            for forbidden in ("engine", "secrets", "config", "post_checks", "retries"):
                if forbidden in raw:
                    self.issue(
                        (*here, forbidden), f"approval step {step_id!r} cannot have {forbidden}"
                    )
            if governance.approval_role is None:
                self.issue(
                    (*here, "governance", "approval_role") if "governance" in raw else here,
                    f"approval step {step_id!r} needs an approval_role "
                    "(here or in the workflow governance)",
                )
            engine = None
        secrets = tuple(raw.get("secrets", []))
        for position, name in enumerate(secrets):
            if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIX):
                self.issue(
                    (*here, "secrets", position), f"secret name {name!r} is reserved for the runner"
                )
            if name in secrets[:position]:
                self.issue((*here, "secrets", position), f"secret {name!r} is listed twice")
        when = None
        if "when" in raw:
            try:
                when = Condition.parse(raw["when"])
            except ExpressionSyntaxError as exc:
                self.issue((*here, "when"), exc.message, prefer_key=False)
        for where, text in string_leaves(raw.get("config", {}), (*here, "config")):
            try:
                Template.parse(text)
            except ExpressionSyntaxError as exc:
                self.issue(where, exc.message, prefer_key=False)
        retries_raw = raw.get("retries", {})
        retries = RetryPolicy(
            max_attempts=retries_raw.get("max_attempts", 1),
            backoff_seconds=float(retries_raw.get("backoff_seconds", 0.0)),
            max_backoff_seconds=float(
                retries_raw.get("max_backoff_seconds", DEFAULT_MAX_BACKOFF_SECONDS)
            ),
        )
        if retries.max_backoff_seconds < retries.backoff_seconds:
            self.issue(
                (*here, "retries", "max_backoff_seconds"), "must be at least backoff_seconds"
            )
        checks = raw.get("post_checks", {})
        outputs_raw = raw.get("outputs")
        outputs = (
            MappingProxyType(
                {name: spec.get("description", "") for name, spec in outputs_raw.items()}
            )
            if outputs_raw is not None
            else None
        )
        if self.issues_for(here) or (kind is StepKind.ENGINE and engine is None):
            return None
        return Step(
            id=step_id,
            kind=kind,
            depends_on=tuple(raw.get("depends_on", [])),
            engine=engine,
            config=MappingProxyType(copy.deepcopy(raw.get("config", {}))),
            secrets=secrets,
            timeout_seconds=float(raw.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)),
            retries=retries,
            when=when,
            governance=governance,
            allow_workspace_drift=allow_drift,
            post_checks=PostChecks(
                checks.get("preflight", True), checks.get("require_artifacts", False)
            ),
            outputs=outputs,
            description=raw.get("description", ""),
            line=self.lines.of(here, prefer_key=False),
        )

    def issues_for(self, path: PathParts) -> bool:
        prefix = _format_path(path)
        return any(
            issue.path == prefix or issue.path.startswith(prefix + ".") for issue in self.issues
        )

    def check_references(
        self,
        index: int,
        raw: dict[str, Any],
        steps: list[Step | None],
        dag: Dag,
        inputs: Mapping[str, InputSpec],
    ) -> None:
        here: PathParts = ("steps", index)
        step_id = raw["id"]
        ancestors = dag.ancestors(step_id)
        located: list[tuple[PathParts, Reference]] = []
        for where, text in string_leaves(raw.get("config", {}), (*here, "config")):
            try:
                located.extend((where, ref) for ref in Template.parse(text).references())
            except ExpressionSyntaxError:
                continue  # already reported
        if "when" in raw:
            try:
                located.extend(
                    ((*here, "when"), ref) for ref in Condition.parse(raw["when"]).references()
                )
            except ExpressionSyntaxError:
                pass
        by_id = {step.id: step for step in steps if step is not None}
        for where, ref in located:
            if ref.root == "inputs":
                if ref.name not in inputs:
                    self.issue(
                        where,
                        f"{ref}: the workflow declares no input {ref.name!r}",
                        prefer_key=False,
                    )
                continue
            if ref.name not in ancestors:
                self.issue(
                    where,
                    f"{ref}: step {ref.name!r} is not among this step's dependencies",
                    prefer_key=False,
                )
                continue
            target = by_id.get(ref.name)
            if target is None or ref.field != "outputs":
                continue
            if target.kind is StepKind.APPROVAL:
                self.issue(
                    where, f"{ref}: approval step {ref.name!r} has no outputs", prefer_key=False
                )
            elif target.outputs is not None and ref.keys[0] not in target.outputs:
                self.issue(
                    where,
                    f"{ref}: step {ref.name!r} declares no output {ref.keys[0]!r}",
                    prefer_key=False,
                )


__all__ = [
    "EngineSpec",
    "GitSource",
    "GovernanceSpec",
    "InputSpec",
    "PostChecks",
    "RetryPolicy",
    "Step",
    "StepKind",
    "Workflow",
    "WorkspaceSpec",
    "load_workflow",
    "parse_workflow",
    "workflow_from_document",
    "workflow_schema",
]
