"""The policy input document: builders for both variants, and validation against its schema.

Every Rego policy sees one JSON document as ``input``. ``kind: preflight`` describes the
artifacts of a workflow step; ``kind: content`` describes a request or a response going
through the MCP or LLM gateway. The schema is ``schemas/policy_input.schema.json`` and
docs/policy-input.md documents each field. The builders take plain values (dicts and the
dataclasses below, never protobuf), do no I/O, and derive a few fields that are awkward to
compute in Rego (lexically normalised paths, change statistics, extracted texts).
"""

from __future__ import annotations

import functools
import json
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import jsonschema

from cabincrew.canonical import sha256_hex
from cabincrew.schema_check import fast_check
from preflight_svc.errors import InputViolation, PolicyInputError

SCHEMA_PATH: Final = Path(__file__).parent / "schemas" / "policy_input.schema.json"

# Bodies and texts are cut to these many UTF-8 bytes / characters: input size drives the
# cost of every evaluation, and secrets beyond the cut are the secret scanner's job.
DEFAULT_BODY_TEXT_LIMIT: Final = 64 * 1024
DEFAULT_TEXT_LIMIT: Final = 64 * 1024
MAX_TEXTS: Final = 256
MAX_PATHS: Final = 256

_ARTIFACT_FIELDS: Final = ("artifact_type", "action", "target", "mime", "metadata", "body_file")
_DELETE_ACTIONS: Final = frozenset({"delete", "remove"})
_CHANGE_ACTIONS: Final = frozenset(
    {
        "create",
        "update",
        "delete",
        "remove",
        "apply",
        "patch",
        "write",
        "append",
        "rename",
        "move",
        "replace",
        "modify",
    }
)
_PATH_KEYS: Final = frozenset(
    {
        "path",
        "paths",
        "file",
        "files",
        "file_path",
        "filepath",
        "filename",
        "source",
        "destination",
        "dest",
        "src",
        "dst",
        "target",
        "directory",
        "dir",
        "cwd",
        "root",
        "from",
        "to",
        "old_path",
        "new_path",
        "uri",
    }
)
_DRIVE: Final = re.compile(r"^[A-Za-z]:/")


@dataclass(frozen=True)
class ArtifactInput:
    """An artifact of a step: its descriptor, its artifact.json and its body.data bytes."""

    name: str
    role: str
    path: str
    hash: str
    size: int
    artifact: Mapping[str, Any]
    body: bytes | None = None


@dataclass(frozen=True)
class SecretFinding:
    """A secret the scanner found: where and what kind, never the value."""

    kind: str
    artifact: str | None = None
    text_index: int | None = None
    line: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The finding as it appears in the input document."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.artifact is not None:
            out["artifact"] = self.artifact
        if self.text_index is not None:
            out["text_index"] = self.text_index
        if self.line is not None:
            out["line"] = self.line
        return out


@dataclass(frozen=True)
class PolicyContext:
    """Where a change or a request comes from; ``extra`` fields are passed through."""

    environment: str = ""
    repository: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    requester: str = ""
    workspace_root: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The context as it appears in the input document."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            environment=self.environment,
            repository=self.repository,
            labels=dict(self.labels),
            requester=self.requester,
            workspace_root=self.workspace_root,
        )
        return out


@dataclass(frozen=True)
class ChangeStats:
    """Size of a step's change, as counted from its artifacts."""

    files_deleted: int = 0
    files_changed: int = 0
    lines_added: int = 0
    lines_removed: int = 0

    def __post_init__(self) -> None:
        if min(self.files_deleted, self.files_changed, self.lines_added, self.lines_removed) < 0:
            raise ValueError("change statistics cannot be negative")


def build_preflight_input(
    *,
    workflow_id: str,
    step_id: str,
    mode: Literal["flight-plan", "take-off"],
    receipt: Mapping[str, Any],
    artifacts: Sequence[ArtifactInput],
    context: PolicyContext | Mapping[str, Any],
    plan_token: Mapping[str, Any] | None = None,
    secrets_found: Iterable[SecretFinding | Mapping[str, Any]] = (),
    stats: ChangeStats | None = None,
    body_text_limit: int = DEFAULT_BODY_TEXT_LIMIT,
) -> dict[str, Any]:
    """Build the ``kind: preflight`` input for the artifacts of one step."""
    ctx = _context(context)
    root = str(ctx.get("workspace_root") or "")
    counted = stats if stats is not None else compute_change_stats(artifacts)
    document: dict[str, Any] = {
        "kind": "preflight",
        "workflow_id": workflow_id,
        "step_id": step_id,
        "mode": mode,
        "receipt": dict(receipt),
        "artifacts": [_artifact_entry(a, root, body_text_limit) for a in artifacts],
        "context": ctx,
        "stats": {
            "files_deleted": counted.files_deleted,
            "files_changed": counted.files_changed,
            "lines_added": counted.lines_added,
            "lines_removed": counted.lines_removed,
            "secrets_found": [_finding(s) for s in secrets_found],
        },
    }
    if plan_token is not None:
        document["plan_token"] = dict(plan_token)
    return document


def build_content_input(
    *,
    domain: Literal["mcp", "llm"],
    phase: Literal["request", "response"],
    payload: Mapping[str, Any],
    context: PolicyContext | Mapping[str, Any],
    texts: Sequence[str] | None = None,
    secrets_found: Iterable[SecretFinding | Mapping[str, Any]] = (),
    text_limit: int = DEFAULT_TEXT_LIMIT,
) -> dict[str, Any]:
    """Build the ``kind: content`` input for a gateway request or response."""
    if domain not in ("mcp", "llm"):
        raise ValueError(f"unknown content domain {domain!r}")
    if phase not in ("request", "response"):
        raise ValueError(f"unknown content phase {phase!r}")
    ctx = _context(context)
    found = list(texts) if texts is not None else extract_texts(domain, phase, payload)
    cut = [t[:text_limit] for t in found[:MAX_TEXTS]]
    truncated = len(found) > MAX_TEXTS or any(len(t) > text_limit for t in found)
    document: dict[str, Any] = {
        "kind": "content",
        "domain": domain,
        "phase": phase,
        "payload": dict(payload),
        "texts": cut,
        "texts_truncated": truncated,
        "context": ctx,
        "secrets_found": [_finding(s) for s in secrets_found],
    }
    if domain == "mcp":
        tool = _mcp_tool(payload)
        if tool is not None:
            document["tool"] = tool
        if phase == "request":
            root = str(ctx.get("workspace_root") or "")
            document["paths"] = _mcp_paths(payload, root)
    return document


def compute_change_stats(artifacts: Sequence[ArtifactInput]) -> ChangeStats:
    """Count deleted and changed files and added and removed lines from a step's artifacts.

    Unified diffs (artifact_type diff or patch, or a diff/patch MIME type) are read hunk by
    hunk; other artifacts count by their action, and a created or updated text file counts
    all its lines as added.
    """
    deleted = changed = added = removed = 0
    for item in artifacts:
        action = str(item.artifact.get("action", "")).lower()
        body = _body_bytes(item)
        text = _decode_text(body) if body is not None else None
        if _is_diff(item.artifact) and text is not None:
            d, c, a, r = _diff_stats(text)
            deleted, changed, added, removed = deleted + d, changed + c, added + a, removed + r
        elif action in _DELETE_ACTIONS:
            deleted += 1
            changed += 1
        elif action in _CHANGE_ACTIONS:
            changed += 1
            if text is not None:
                added += len(text.splitlines())
    return ChangeStats(deleted, changed, added, removed)


def extract_texts(domain: str, phase: str, payload: Mapping[str, Any]) -> list[str]:
    """The human-readable texts of a gateway payload, for content policies and models."""
    found: list[str] = []
    if domain == "llm":
        found = list(_llm_texts(phase, payload))
    else:
        part = (
            payload.get("params")
            if phase == "request"
            else payload.get("result", payload.get("error"))
        )
        if part is not None:
            found = list(_string_leaves(part))
    if not found:
        found = list(_string_leaves(payload))
    return [t for t in found if t]


def normalize_workspace_path(raw: str, workspace_root: str) -> tuple[str, bool]:
    """Normalise ``raw`` lexically against the workspace: (workspace-relative path, inside).

    No file system access: links are the gateway's and the orchestrator's business. A path
    that is absolute outside the root, starts with ``~``, holds a NUL or climbs above the
    root with ``..`` is outside; it is then returned normalised but absolute or unchanged.
    """
    path = raw.replace("\\", "/")
    if path.lower().startswith("file://"):
        path = path[len("file://") :]
    if "\x00" in path or path.startswith("~") or not path:
        return path, False
    root = workspace_root.replace("\\", "/").rstrip("/")
    if path.startswith("/") or _DRIVE.match(path):
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root) :]
        else:
            return posixpath.normpath(path), False
    parts: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not parts:
                return posixpath.normpath(path), False
            parts.pop()
        else:
            parts.append(segment)
    return "/".join(parts) or ".", True


def policy_domain(document: Mapping[str, Any]) -> str:
    """The policy domain a document is for: ``preflight``, ``mcp`` or ``llm``."""
    kind = document.get("kind")
    if kind == "preflight":
        return "preflight"
    if kind == "content" and document.get("domain") in ("mcp", "llm"):
        return str(document["domain"])
    raise PolicyInputError(
        [InputViolation("kind", "must be preflight, or content with domain mcp or llm")]
    )


def validate_policy_input(document: Any) -> None:
    """Raise ``PolicyInputError`` unless ``document`` matches policy_input.schema.json."""
    if not isinstance(document, dict):
        raise PolicyInputError([InputViolation("", "must be a JSON object")])
    kind = document.get("kind")
    if kind not in ("preflight", "content"):
        raise PolicyInputError([InputViolation("kind", "must be preflight or content")])
    name = "PreflightInput" if kind == "preflight" else "ContentInput"
    if _checks()[name](document):
        return
    validator = _validators()[name]
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        raise PolicyInputError([_violation(e) for e in errors[:20]])


@functools.lru_cache(maxsize=1)
def load_policy_input_schema() -> Mapping[str, Any]:
    """The policy input JSON Schema."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


@functools.lru_cache(maxsize=1)
def _validators() -> dict[str, Any]:
    schema = load_policy_input_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return {
        name: jsonschema.Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": schema["$defs"]})
        for name in ("PreflightInput", "ContentInput")
    }


@functools.lru_cache(maxsize=1)
def _checks() -> dict[str, Callable[[Any], bool]]:
    # The validators' verdicts, compiled: a valid document (the usual case) costs a tenth;
    # an invalid one is described by the validator itself, so its violations are unchanged.
    return {name: fast_check(validator) for name, validator in _validators().items()}


def _violation(error: Any) -> InputViolation:
    # Messages are built from the schema, never from the offending value, which may be a
    # secret and may end up in logs.
    where = "/".join(str(p) for p in error.absolute_path)
    rule, expected = error.validator, error.validator_value
    if rule == "type":
        text = f"must be of type {expected}"
    elif rule in ("enum", "const"):
        text = f"must be one of {expected if rule == 'enum' else [expected]}"
    elif rule == "required":
        text = error.message.replace("'", "")
    elif rule == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        text = f"unexpected field(s): {', '.join(extra)}"
    elif rule == "pattern":
        text = "does not have the expected format"
    elif rule in ("minimum", "minLength", "minItems"):
        text = f"must be at least {expected} ({rule})"
    else:
        text = f"violates {rule}"
    return InputViolation(where, text)


def _context(context: PolicyContext | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(context, PolicyContext):
        return context.to_json()
    return dict(context)


def _finding(finding: SecretFinding | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(finding, SecretFinding):
        return finding.to_json()
    return dict(finding)


def _body_bytes(item: ArtifactInput) -> bytes | None:
    if item.body is not None:
        return item.body
    inline = item.artifact.get("body")
    if inline is None:
        return None
    if isinstance(inline, str):
        return inline.encode("utf-8")
    return json.dumps(inline, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _decode_text(body: bytes) -> str | None:
    # NUL bytes mark binary content (and would also cut strings short in the engine).
    if b"\x00" in body:
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _text_prefix(body: bytes, limit: int) -> tuple[str | None, bool]:
    if len(body) <= limit:
        return _decode_text(body), False
    if _decode_text(body) is None:
        return None, False
    cut = body[:limit]
    # Drop a multi-byte character that the cut split in two.
    for trim in range(4):
        try:
            return cut[: len(cut) - trim].decode("utf-8"), True
        except UnicodeDecodeError:
            continue
    return None, False


def _artifact_entry(item: ArtifactInput, workspace_root: str, limit: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": item.name,
        "role": item.role,
        "path": item.path,
        "hash": item.hash,
        "size": item.size,
        "artifact": {k: item.artifact[k] for k in _ARTIFACT_FIELDS if k in item.artifact},
        "body_truncated": False,
    }
    body = _body_bytes(item)
    if body is not None:
        entry["body_sha256"] = sha256_hex(body)
        text, truncated = _text_prefix(body, limit)
        if text is not None:
            entry["body_text"] = text
            entry["body_truncated"] = truncated
    target = item.artifact.get("target")
    if isinstance(target, str) and target:
        normalized, inside = normalize_workspace_path(target, workspace_root)
        entry["target_normalized"] = normalized
        entry["target_in_workspace"] = inside
    return entry


def _is_diff(artifact: Mapping[str, Any]) -> bool:
    kind = str(artifact.get("artifact_type", "")).lower()
    mime = str(artifact.get("mime", "")).lower()
    return kind in ("diff", "patch") or "diff" in mime or "patch" in mime


def _diff_stats(text: str) -> tuple[int, int, int, int]:
    deleted = changed = added = removed = 0
    lines = text.splitlines()
    in_header = False
    for i, line in enumerate(lines):
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            in_header = True
            continue
        if in_header and line.startswith("+++ "):
            in_header = False
            changed += 1
            if line[4:].split("\t")[0].strip() == "/dev/null":
                deleted += 1
            continue
        if line.startswith("+"):
            added += 1
        elif line.startswith("-"):
            removed += 1
    return deleted, changed, added, removed


def _string_leaves(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _string_leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _string_leaves(item)


def _content_texts(content: Any) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                yield part
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                yield part["text"]


def _llm_texts(phase: str, payload: Mapping[str, Any]) -> Iterator[str]:
    if phase == "request":
        for key in ("system", "instructions", "prompt", "input"):
            yield from _content_texts(payload.get(key))
        for message in payload.get("messages") or ():
            if isinstance(message, Mapping):
                yield from _content_texts(message.get("content"))
        return
    yield from _content_texts(payload.get("output_text"))
    for choice in payload.get("choices") or ():
        if not isinstance(choice, Mapping):
            continue
        yield from _content_texts(choice.get("text"))
        for key in ("message", "delta"):
            message = choice.get(key)
            if not isinstance(message, Mapping):
                continue
            yield from _content_texts(message.get("content"))
            for call in message.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, Mapping) else None
                if isinstance(function, Mapping) and isinstance(function.get("arguments"), str):
                    yield function["arguments"]


def _mcp_tool(payload: Mapping[str, Any]) -> str | None:
    params = payload.get("params")
    if payload.get("method") == "tools/call" and isinstance(params, Mapping):
        name = params.get("name")
        if isinstance(name, str):
            return name
    return None


def _mcp_paths(payload: Mapping[str, Any], workspace_root: str) -> list[dict[str, Any]]:
    params = payload.get("params")
    if not isinstance(params, Mapping):
        return []
    found: list[tuple[str, str]] = []
    uri = params.get("uri")
    if isinstance(uri, str) and uri.lower().startswith("file://"):
        found.append(("params.uri", uri))
    arguments = params.get("arguments")
    if isinstance(arguments, Mapping):
        found.extend(_path_arguments(arguments, "arguments"))
    out = []
    for where, raw in found[:MAX_PATHS]:
        normalized, inside = normalize_workspace_path(raw, workspace_root)
        out.append({"raw": raw, "normalized": normalized, "in_workspace": inside, "source": where})
    return out


def _path_arguments(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            here = f"{where}.{key}"
            if str(key).lower() in _PATH_KEYS:
                if isinstance(item, str) and _looks_like_path(item):
                    yield here, item
                    continue
                if isinstance(item, list) and all(isinstance(x, str) for x in item):
                    for x in item:
                        if _looks_like_path(x):
                            yield here, x
                    continue
            yield from _path_arguments(item, here)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _path_arguments(item, f"{where}[{index}]")


def _looks_like_path(text: str) -> bool:
    # Keys such as "source" also carry code or prose in some tools; a path is one line.
    return 0 < len(text) <= 4096 and "\n" not in text
