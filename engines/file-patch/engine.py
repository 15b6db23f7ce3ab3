#!/usr/bin/env python3
"""CabinCrew file-patch engine: plans file edits as unified diffs, then applies those diffs."""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The shared helper ships beside the engines; no bytecode is written next to it.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), os.pardir, "_lib"))

import enginekit as kit  # noqa: E402

ENGINE_ID = "cabincrew.file-patch"
ACTIONS = ("create", "update", "delete")
MAX_EDITS = 1000
MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_PATH_CHARS = 4096
MAX_SEGMENT_BYTES = 200
DEFAULT_CREATE_MODE = 0o644
DIFF_MIME = "text/x-diff"
NO_NEWLINE_MARKER = "\\ No newline at end of file"
SUMMARY_ARTIFACT = "summary"
RESULT_ARTIFACT = "take-off-result"

_EDIT_KEYS = {
    "create": frozenset({"path", "action", "content", "mode"}),
    "update": frozenset({"path", "action", "content", "replace", "mode"}),
    "delete": frozenset({"path", "action"}),
}
_EDIT_NAME_RE = re.compile(r"^edit-(\d{3,})(?:-[a-z0-9._-]+)?$")
_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_MODE_RE = re.compile(r"^0?[0-7]{3}$")
_SLUG_RE = re.compile(r"[^a-z0-9._-]+")


class DiffError(Exception):
    """A unified diff that is malformed or does not apply exactly."""


@dataclass(frozen=True)
class FileState:
    """What a workspace path holds right now."""

    exists: bool
    data: bytes | None = None
    mode: int | None = None


@dataclass(frozen=True)
class Hunk:
    """One ``@@`` block of a unified diff: ops are (' '|'-'|'+', line with its newline)."""

    old_start: int
    old_len: int
    ops: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Edit:
    """One planned file change, as recorded in (or restored from) a state artifact."""

    index: int
    path: str
    action: str
    before_sha256: str | None
    after_sha256: str | None
    before_mode: int | None
    after_mode: int | None
    diff: str

    @property
    def artifact_name(self) -> str:
        """Deterministic, filesystem-safe artifact name for this edit."""
        slug = _SLUG_RE.sub("-", self.path.lower()).strip("-.")[:48].rstrip("-.")
        return f"edit-{self.index:03d}" + (f"-{slug}" if slug else "")


# -- paths -----------------------------------------------------------------------------


def path_problem(path: Any) -> str | None:
    """Return why ``path`` is not an acceptable workspace-relative path, or None."""
    if not isinstance(path, str) or not path:
        return "path must be a non-empty string"
    if len(path) > MAX_PATH_CHARS:
        return "path is too long"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "path must be valid Unicode"
    if any(ord(char) < 32 or ord(char) == 127 for char in path):
        return "path must not contain control characters"
    if "\\" in path:
        return "path must use '/' separators"
    if path.startswith("/"):
        return "path must be relative to the workspace"
    segments = path.split("/")
    if ".." in segments:
        return "path must not contain '..'"
    if any(segment in ("", ".") for segment in segments):
        return "path must be normalised (no empty or '.' segments)"
    # Below NAME_MAX (255) so the hidden scratch names used at take-off still fit.
    if any(len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES for segment in segments):
        return f"path segment is longer than {MAX_SEGMENT_BYTES} bytes"
    return None


class PathRefused(Exception):
    """A workspace path that may not be touched; ``code`` says why."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def resolved_target(workspace: str, path: str) -> str:
    """Return the resolved location of ``path``, refusing anything outside the workspace."""
    full = os.path.join(workspace, path)
    resolved = os.path.realpath(full)
    if not kit.is_within(workspace, resolved) or resolved == workspace:
        raise PathRefused("path_escape", "path resolves outside the workspace")
    return resolved


def inspect_target(workspace: str, path: str) -> FileState:
    """Read what ``path`` holds without following a symlink out of the workspace."""
    resolved_target(workspace, path)
    segments = path.split("/")
    for depth in range(1, len(segments)):
        ancestor = os.path.join(workspace, *segments[:depth])
        try:
            info = os.stat(ancestor)
        except FileNotFoundError:
            break
        if not stat.S_ISDIR(info.st_mode):
            raise PathRefused("invalid_path", f"{'/'.join(segments[:depth])} is not a directory")
    full = os.path.join(workspace, path)
    try:
        info = os.lstat(full)
    except FileNotFoundError:
        return FileState(exists=False)
    if stat.S_ISLNK(info.st_mode):
        raise PathRefused("invalid_path", "target is a symlink")
    if not stat.S_ISREG(info.st_mode):
        raise PathRefused("invalid_path", "target is not a regular file")
    if stat.S_IMODE(info.st_mode) & ~0o777:
        # Rewriting a setuid/setgid file would carry the privilege over to unreviewed bytes.
        raise PathRefused("invalid_path", "target has setuid, setgid or sticky bits")
    if info.st_size > MAX_FILE_BYTES:
        raise PathRefused("file_too_large", f"target is larger than {MAX_FILE_BYTES} bytes")
    data = kit.read_regular_file(full, MAX_FILE_BYTES)
    return FileState(exists=True, data=data, mode=stat.S_IMODE(info.st_mode))


def check_disjoint(workspace: str, edits: Sequence[tuple[int, str]]) -> None:
    """Refuse two edits of one file, or of a file and something beneath it."""
    seen: dict[str, tuple[int, str]] = {}
    for index, path in edits:
        resolved = resolved_target(workspace, path)
        if resolved in seen:
            raise kit.ValidationError(
                "duplicate_path",
                f"edits[{index}] targets the same file as edits[{seen[resolved][0]}]",
                edit_index=index,
                path=path,
            )
        seen[resolved] = (index, path)
    for resolved, (index, path) in seen.items():
        parent = os.path.dirname(resolved)
        while parent != workspace and kit.is_within(workspace, parent):
            if parent in seen:
                raise kit.ValidationError(
                    "conflicting_paths",
                    f"edits[{index}] lies beneath the file edited by edits[{seen[parent][0]}]",
                    edit_index=index,
                    path=path,
                )
            parent = os.path.dirname(parent)


# -- unified diffs ---------------------------------------------------------------------


def split_lines(text: str) -> list[str]:
    """Split on '\\n' only, keeping line ends (str.splitlines also splits on \\r, \\f, ...)."""
    pieces = text.split("\n")
    lines = [piece + "\n" for piece in pieces[:-1]]
    if pieces[-1]:
        lines.append(pieces[-1])
    return lines


def make_diff(path: str, before: str | None, after: str | None) -> str:
    """Return a git-style unified diff (3 lines of context) from ``before`` to ``after``."""
    fromfile = "/dev/null" if before is None else f"a/{path}"
    tofile = "/dev/null" if after is None else f"b/{path}"
    out = []
    for line in difflib.unified_diff(
        split_lines(before or ""), split_lines(after or ""), fromfile, tofile, n=3
    ):
        if line.endswith("\n"):
            out.append(line)
        else:
            out.append(line + "\n" + NO_NEWLINE_MARKER + "\n")
    return "".join(out)


def parse_diff(diff: str) -> tuple[str | None, str | None, list[Hunk]]:
    """Parse a single-file unified diff into its header paths and hunks."""
    lines = split_lines(diff)
    if not lines:
        return None, None, []
    if len(lines) < 2 or not lines[0].startswith("--- ") or not lines[1].startswith("+++ "):
        raise DiffError("missing ---/+++ header")
    if not all(line.endswith("\n") for line in lines):
        raise DiffError("diff does not end with a newline")
    old_name, new_name = lines[0][4:-1], lines[1][4:-1]
    hunks: list[Hunk] = []
    position = 2
    while position < len(lines):
        match = _HUNK_RE.match(lines[position])
        if not match:
            raise DiffError(f"expected a hunk header at diff line {position + 1}")
        old_start = int(match.group(1))
        old_len = int(match.group(2)) if match.group(2) is not None else 1
        new_len = int(match.group(4)) if match.group(4) is not None else 1
        position += 1
        ops: list[tuple[str, str]] = []
        old_seen = new_seen = 0
        while old_seen < old_len or new_seen < new_len:
            if position >= len(lines):
                raise DiffError("hunk is shorter than its header says")
            op, text = lines[position][0], lines[position][1:]
            if op not in " -+":
                raise DiffError(f"unexpected diff line {position + 1}")
            position += 1
            if position < len(lines) and lines[position].startswith("\\"):
                text = text.removesuffix("\n")
                position += 1
            ops.append((op, text))
            old_seen += op != "+"
            new_seen += op != "-"
        if old_seen != old_len or new_seen != new_len:
            raise DiffError("hunk is longer than its header says")
        hunks.append(Hunk(old_start, old_len, tuple(ops)))
    return old_name, new_name, hunks


def apply_hunks(before: str, hunks: Sequence[Hunk]) -> str:
    """Apply hunks exactly (no fuzz, no offset): every context and removed line must match."""
    source = split_lines(before)
    out: list[str] = []
    cursor = 0
    for hunk in hunks:
        # With no old lines, old_start names the line after which the new lines go.
        start = hunk.old_start if hunk.old_len == 0 else hunk.old_start - 1
        if start < cursor or start > len(source):
            raise DiffError("hunks overlap or lie beyond the end of the file")
        out.extend(source[cursor:start])
        cursor = start
        for op, text in hunk.ops:
            if op == "+":
                out.append(text)
                continue
            if cursor >= len(source) or source[cursor] != text:
                raise DiffError(f"diff does not match line {cursor + 1}")
            if op == " ":
                out.append(text)
            cursor += 1
    out.extend(source[cursor:])
    return "".join(out)


def count_changes(hunks: Sequence[Hunk]) -> tuple[int, int]:
    """Return (lines added, lines removed)."""
    added = sum(op == "+" for hunk in hunks for op, _ in hunk.ops)
    removed = sum(op == "-" for hunk in hunks for op, _ in hunk.ops)
    return added, removed


def decode_text(data: bytes, index: int, path: str) -> str:
    """Decode file content as UTF-8, refusing binary files (they have no line diff)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise kit.ValidationError(
            "binary_file", f"edits[{index}] ({path}): file is not UTF-8 text", edit_index=index
        ) from None


def format_mode(mode: int | None) -> str | None:
    """Render permission bits as a 4-digit octal string."""
    return None if mode is None else f"{mode:04o}"


def parse_mode(value: Any) -> int | None:
    """Parse an octal permission string such as '0644'; None when malformed."""
    if not isinstance(value, str) or not _MODE_RE.match(value):
        return None
    return int(value, 8)


# -- flight-plan -----------------------------------------------------------------------


def _invalid(index: int, path: Any, code: str, reason: str) -> kit.ValidationError:
    """Build a validation error that names the offending edit."""
    shown = path if isinstance(path, str) else None
    return kit.ValidationError(
        code, f"edits[{index}] ({shown!r}): {reason}", edit_index=index, path=shown
    )


def plan_edit(workspace: str, index: int, raw: Any) -> Edit:
    """Validate one config edit against the workspace and compute its diff."""
    if not isinstance(raw, Mapping):
        raise _invalid(index, None, "invalid_config", "edit must be an object")
    path, action = raw.get("path"), raw.get("action")
    if action not in ACTIONS:
        raise _invalid(index, path, "invalid_config", "action must be create, update or delete")
    unknown = sorted(set(raw) - _EDIT_KEYS[action])
    if unknown:
        raise _invalid(index, path, "invalid_config", f"unknown keys: {', '.join(unknown)}")
    problem = path_problem(path)
    if problem:
        raise _invalid(index, path, "invalid_path", problem)
    assert isinstance(path, str)
    try:
        current = inspect_target(workspace, path)
    except PathRefused as refused:
        raise _invalid(index, path, refused.code, refused.reason) from None
    except OSError as exc:
        raise _invalid(index, path, "invalid_path", f"cannot read target: {exc.strerror}") from None
    mode = raw.get("mode")
    if mode is not None and parse_mode(mode) is None:
        raise _invalid(index, path, "invalid_config", "mode must be an octal string like '0644'")

    before: str | None = None
    if action == "create":
        if current.exists:
            raise _invalid(index, path, "target_exists", "cannot create: file already exists")
        if not isinstance(raw.get("content"), str):
            raise _invalid(index, path, "invalid_config", "create needs string content")
    else:
        if not current.exists:
            raise _invalid(index, path, "target_missing", f"cannot {action}: file does not exist")
        assert current.data is not None
        before = decode_text(current.data, index, path)

    after: str | None
    if action == "create":
        after = raw["content"]
    elif action == "delete":
        after = None
    else:
        after = _updated_content(index, path, raw, before or "")
    if after is not None and len(after.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise _invalid(index, path, "file_too_large", "new content is too large")
    try:
        after_bytes = None if after is None else after.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(index, path, "invalid_config", "content is not valid Unicode") from None

    after_mode: int | None = None
    if action != "delete":
        after_mode = parse_mode(mode) if mode is not None else current.mode
        if after_mode is None:
            after_mode = DEFAULT_CREATE_MODE
    diff = make_diff(path, before, after)
    # Self-check: take-off applies this text, so it must reproduce `after` exactly here.
    if apply_hunks(before or "", parse_diff(diff)[2]) != (after or ""):
        raise kit.EngineError("internal_error", f"edits[{index}]: diff does not round-trip")
    return Edit(
        index=index,
        path=path,
        action=action,
        before_sha256=None if current.data is None else kit.sha256_hex(current.data),
        after_sha256=None if after_bytes is None else kit.sha256_hex(after_bytes),
        before_mode=current.mode,
        after_mode=after_mode,
        diff=diff,
    )


def _updated_content(index: int, path: str, raw: Mapping[str, Any], before: str) -> str:
    """Return the new content of an update: full ``content`` or ordered ``replace`` pairs."""
    has_content, has_replace = "content" in raw, "replace" in raw
    if has_content == has_replace:
        raise _invalid(index, path, "invalid_config", "update needs exactly one of content/replace")
    if has_content:
        if not isinstance(raw["content"], str):
            raise _invalid(index, path, "invalid_config", "content must be a string")
        return str(raw["content"])
    replacements = raw["replace"]
    if not isinstance(replacements, list) or not replacements:
        raise _invalid(index, path, "invalid_config", "replace must be a non-empty list")
    text = before
    for number, pair in enumerate(replacements):
        if (
            not isinstance(pair, Mapping)
            or set(pair) != {"old", "new"}
            or not isinstance(pair["old"], str)
            or not isinstance(pair["new"], str)
            or not pair["old"]
        ):
            raise _invalid(
                index, path, "invalid_config", f"replace[{number}] needs non-empty old and new"
            )
        # Exactly one match: an ambiguous replacement would edit a line nobody reviewed.
        occurrences = text.count(pair["old"])
        if occurrences != 1:
            error = _invalid(
                index,
                path,
                "replace_mismatch",
                f"replace[{number}].old occurs {occurrences} times (need exactly 1)",
            )
            error.details.update(replace_index=number, occurrences=occurrences)
            raise error
        text = text.replace(pair["old"], pair["new"], 1)
    return text


def flight_plan(run: kit.Run) -> None:
    """Validate the edits, write one diff artifact per edit and a summary; touch nothing."""
    config = run.config
    unknown = sorted(set(config) - {"edits"})
    if unknown:
        raise kit.ValidationError("invalid_config", f"unknown config keys: {', '.join(unknown)}")
    raw_edits = config.get("edits")
    if not isinstance(raw_edits, list) or not raw_edits:
        raise kit.ValidationError("invalid_config", "edits must be a non-empty list")
    if len(raw_edits) > MAX_EDITS:
        raise kit.ValidationError("invalid_config", f"at most {MAX_EDITS} edits are allowed")
    edits = [plan_edit(run.workspace, index, raw) for index, raw in enumerate(raw_edits)]
    check_disjoint(run.workspace, [(edit.index, edit.path) for edit in edits])

    summary_edits = []
    totals = {"create": 0, "update": 0, "delete": 0}
    lines_added = lines_removed = 0
    for edit in edits:
        added, removed = count_changes(parse_diff(edit.diff)[2])
        lines_added += added
        lines_removed += removed
        totals[edit.action] += 1
        if edit.action == "update" and not edit.diff and edit.before_mode == edit.after_mode:
            run.warn(f"edits[{edit.index}] ({edit.path}) changes nothing")
        run.write_artifact(
            edit.artifact_name,
            "state",
            artifact_type="diff",
            action=edit.action,
            mime=DIFF_MIME,
            target=edit.path,
            metadata={
                "path": edit.path,
                "before_sha256": edit.before_sha256,
                "after_sha256": edit.after_sha256,
                "mode": format_mode(edit.after_mode),
                "before_mode": format_mode(edit.before_mode),
                "lines_added": added,
                "lines_removed": removed,
            },
            data=edit.diff.encode("utf-8"),
        )
        summary_edits.append(
            {
                "artifact": edit.artifact_name,
                "path": edit.path,
                "action": edit.action,
                "lines_added": added,
                "lines_removed": removed,
            }
        )
    counts = {
        "files_changed": len(edits),
        "files_created": totals["create"],
        "files_updated": totals["update"],
        "files_deleted": totals["delete"],
        "lines_added": lines_added,
        "lines_removed": lines_removed,
    }
    summary = {**counts, "edits": summary_edits}
    run.write_artifact(
        SUMMARY_ARTIFACT,
        "evidence",
        artifact_type="summary",
        action="report",
        mime="application/json",
        metadata=counts,
        data=(json.dumps(summary, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode(),
    )
    for name, value in counts.items():
        run.metric(name, value)


# -- take-off --------------------------------------------------------------------------


def _state_error(name: str, reason: str) -> kit.ValidationError:
    """Build the error for a restored state artifact that is not what flight-plan wrote."""
    return kit.ValidationError("state_invalid", f"artifact {name!r}: {reason}", artifact=name)


def _hash_field(metadata: Mapping[str, Any], key: str, present: bool, name: str) -> str | None:
    """Read a sha256 metadata field that must be set exactly when ``present``."""
    value = metadata.get(key)
    if present and isinstance(value, str) and kit.SHA256_HEX_RE.match(value):
        return value
    if not present and value is None:
        return None
    raise _state_error(name, f"metadata.{key} is malformed")


def _mode_field(metadata: Mapping[str, Any], key: str, present: bool, name: str) -> int | None:
    """Read an octal mode metadata field that must be set exactly when ``present``."""
    value = metadata.get(key)
    if not present and value is None:
        return None
    mode = parse_mode(value) if present else None
    if mode is None:
        raise _state_error(name, f"metadata.{key} is malformed")
    return mode


def load_edit(run: kit.Run, name: str, index: int) -> Edit:
    """Rebuild one planned edit from its state artifact, checking it is self-consistent."""
    document, body = run.read_artifact(name)
    action = document["action"]
    metadata = document.get("metadata")
    if document["artifact_type"] != "diff" or action not in ACTIONS:
        raise _state_error(name, "not a file-patch diff artifact")
    if body is None or not isinstance(metadata, Mapping):
        raise _state_error(name, "diff body or metadata missing")
    path = metadata.get("path")
    if not isinstance(path, str) or path_problem(path) or document.get("target") != path:
        raise _state_error(name, "target path is malformed")
    try:
        diff = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _state_error(name, "diff is not UTF-8") from None
    edit = Edit(
        index=index,
        path=path,
        action=action,
        before_sha256=_hash_field(metadata, "before_sha256", action != "create", name),
        after_sha256=_hash_field(metadata, "after_sha256", action != "delete", name),
        before_mode=_mode_field(metadata, "before_mode", action != "create", name),
        after_mode=_mode_field(metadata, "mode", action != "delete", name),
        diff=diff,
    )
    if edit.artifact_name != name:
        raise _state_error(name, "artifact name does not match its index and path")
    return edit


def load_edits(run: kit.Run) -> list[Edit]:
    """Restore every edit artifact; their indices must run 0..n-1 without gaps."""
    indexed = []
    for name in run.list_artifacts():
        match = _EDIT_NAME_RE.match(name)
        if match:
            indexed.append((int(match.group(1)), name))
    indexed.sort()
    if not indexed:
        raise kit.ValidationError("state_invalid", "no edit state artifacts to apply")
    if [index for index, _ in indexed] != list(range(len(indexed))):
        raise kit.ValidationError("state_invalid", "edit state artifacts are incomplete")
    return [load_edit(run, name, index) for index, name in indexed]


@dataclass(frozen=True)
class Change:
    """A verified edit, ready to stage: the bytes and mode to write (None for delete)."""

    edit: Edit
    target: str
    data: bytes | None


def _drift(edit: Edit, reason: str) -> kit.EngineError:
    """Build the refusal for a workspace that no longer matches the plan."""
    return kit.EngineError(
        "workspace_drift",
        f"{edit.path}: {reason}; nothing was applied",
        edit_index=edit.index,
        path=edit.path,
    )


def verify_edit(workspace: str, edit: Edit) -> Change:
    """Check the file still matches the plan and compute its new bytes from the diff."""
    try:
        current = inspect_target(workspace, edit.path)
    except PathRefused as refused:
        raise _drift(edit, refused.reason) from None
    except OSError as exc:
        raise _drift(edit, f"cannot read target: {exc.strerror}") from None
    if edit.action == "create":
        if current.exists:
            raise _drift(edit, "file was created since the plan")
    elif not current.exists:
        raise _drift(edit, "file was removed since the plan")
    elif current.data is None or kit.sha256_hex(current.data) != edit.before_sha256:
        raise _drift(edit, "file content changed since the plan")
    elif current.mode != edit.before_mode:
        raise _drift(edit, "file mode changed since the plan")
    try:
        before = "" if current.data is None else current.data.decode("utf-8")
        old_name, new_name, hunks = parse_diff(edit.diff)
        expected_old = "/dev/null" if edit.action == "create" else f"a/{edit.path}"
        expected_new = "/dev/null" if edit.action == "delete" else f"b/{edit.path}"
        if old_name is not None and (old_name, new_name) != (expected_old, expected_new):
            raise DiffError("diff header does not match the planned path and action")
        after = apply_hunks(before, hunks)
    except (DiffError, UnicodeDecodeError) as exc:
        raise kit.EngineError(
            "diff_mismatch", f"{edit.path}: planned diff does not apply: {exc}; nothing was applied"
        ) from None
    data = after.encode("utf-8")
    if edit.action == "delete":
        if data:
            raise kit.EngineError(
                "diff_mismatch", f"{edit.path}: delete diff leaves content; nothing was applied"
            )
        return Change(edit, os.path.join(workspace, edit.path), None)
    if kit.sha256_hex(data) != edit.after_sha256:
        raise kit.EngineError(
            "diff_mismatch",
            f"{edit.path}: applying the diff does not give after_sha256; nothing was applied",
            edit_index=edit.index,
        )
    return Change(edit, os.path.join(workspace, edit.path), data)


class Transaction:
    """Stage every new file beside its target, then swap all in; undo everything on error."""

    def __init__(self, workspace: str) -> None:
        self.workspace = workspace
        self.created_dirs: list[str] = []
        self.staged: dict[int, str] = {}
        self.backups: dict[int, str] = {}
        self.placed: list[tuple[Change, str | None]] = []

    def _sibling(self, target: str, kind: str, index: int) -> str:
        """Name a hidden scratch file next to ``target`` (same filesystem: rename is atomic)."""
        parent, base = os.path.split(target)
        return os.path.join(parent, f".{base}.cabincrew-{kind}-{index:03d}")

    def _make_parents(self, target: str) -> None:
        """Create missing parent directories, remembering them for rollback."""
        missing = []
        parent = os.path.dirname(target)
        while not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(missing):
            if not kit.is_within(self.workspace, os.path.realpath(os.path.dirname(directory))):
                raise OSError(f"{directory} would be created outside the workspace")
            os.mkdir(directory, 0o755)
            self.created_dirs.append(directory)

    def stage(self, change: Change) -> None:
        """Write the new content of one change to a scratch file, durable before any swap."""
        index = change.edit.index
        if change.edit.action != "create":
            backup = self._sibling(change.target, "backup", index)
            if os.path.lexists(backup):
                raise OSError(f"scratch path {backup} already exists")
            self.backups[index] = backup
        if change.data is None:
            return
        self._make_parents(change.target)
        staged = self._sibling(change.target, "stage", index)
        mode = change.edit.after_mode if change.edit.after_mode is not None else 0o644
        kit.write_new_file(staged, change.data, 0o600)
        self.staged[index] = staged
        fd = os.open(staged, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)  # exact bits: the process umask must not alter the plan
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self, change: Change) -> None:
        """Swap one staged change into place, keeping the old file as a backup."""
        index = change.edit.index
        backup = self.backups.get(index)
        if change.edit.action == "create" and os.path.lexists(change.target):
            raise OSError(f"{change.edit.path} appeared during take-off")
        if backup is not None:
            os.rename(change.target, backup)
            self.placed.append((change, backup))
        if change.data is not None:
            os.rename(self.staged.pop(index), change.target)
            if backup is None:
                self.placed.append((change, None))

    def rollback(self) -> None:
        """Restore every original file and remove everything this transaction created."""
        for change, backup in reversed(self.placed):
            try:
                if backup is not None:
                    os.replace(backup, change.target)
                else:
                    os.unlink(change.target)
            except OSError as exc:
                kit.log(f"rollback of {change.edit.path} failed: {exc}")
        for staged in self.staged.values():
            try:
                os.unlink(staged)
            except OSError as exc:
                kit.log(f"cannot remove scratch file {staged}: {exc}")
        for directory in reversed(self.created_dirs):
            try:
                os.rmdir(directory)
            except OSError as exc:
                kit.log(f"cannot remove directory {directory}: {exc}")

    def finish(self) -> list[str]:
        """Drop the backups and flush directory entries; return what could not be done."""
        problems = []
        parents = set()
        for change, backup in self.placed:
            parents.add(os.path.dirname(change.target))
            if backup is not None:
                try:
                    os.unlink(backup)
                except OSError as exc:
                    problems.append(f"cannot remove backup {backup}: {exc.strerror}")
        # The renames are only durable once their directories are flushed.
        for parent in sorted(parents):
            try:
                fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                problems.append(f"cannot flush directory {parent}: {exc.strerror}")
        return problems


def take_off(run: kit.Run) -> None:
    """Apply exactly the planned diffs, all or nothing, after checking nothing drifted."""
    edits = load_edits(run)
    try:
        check_disjoint(run.workspace, [(edit.index, edit.path) for edit in edits])
    except PathRefused as refused:
        raise kit.EngineError("workspace_drift", f"{refused.reason}; nothing was applied") from None
    except kit.ValidationError as exc:
        raise kit.ValidationError("state_invalid", exc.message, **exc.details) from None
    changes = [verify_edit(run.workspace, edit) for edit in edits]

    transaction = Transaction(run.workspace)
    try:
        for change in changes:
            transaction.stage(change)
        for change in changes:
            transaction.commit(change)
    except OSError as exc:
        transaction.rollback()
        raise kit.EngineError(
            "apply_failed", f"could not apply the edits ({exc}); nothing was applied"
        ) from None
    for problem in transaction.finish():
        run.warn(problem)

    applied = [
        {
            "artifact": change.edit.artifact_name,
            "path": change.edit.path,
            "action": change.edit.action,
            "after_sha256": change.edit.after_sha256,
        }
        for change in changes
    ]
    run.diagnostics["applied"] = applied
    run.write_artifact(
        RESULT_ARTIFACT,
        "log",
        artifact_type="apply_result",
        action="applied",
        mime="application/json",
        metadata={"edits_applied": len(applied)},
        data=(json.dumps({"applied": applied}, sort_keys=True, indent=2) + "\n").encode(),
    )
    run.metric("edits_applied", len(applied))


if __name__ == "__main__":
    sys.exit(kit.main(ENGINE_ID, {"flight-plan": flight_plan, "take-off": take_off}))
