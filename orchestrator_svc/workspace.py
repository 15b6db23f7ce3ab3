"""Per-workflow workspaces (a copied folder or a detached git worktree) and their hashes.

``workspace_hash`` is the SHA-256 over every entry below the root except ``.git``, sorted by
path bytes. Each entry contributes four length-prefixed fields (so no separator or odd file
name can make two different trees hash alike)::

    <relative posix path> <type: d|f|l|o> <mode: x|-> <content>

where content is the SHA-256 hex of a file, the target of a symbolic link, and empty for a
directory or another kind of file ("o": FIFO, socket, device). Mode ``x`` marks a file with
any execute bit. Timestamps, owners and other permission bits are not hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from orchestrator_svc.errors import WorkspaceError
from orchestrator_svc.runner import remove_tree
from orchestrator_svc.workflow import GitSource, WorkspaceSpec

_BUFFER = 1 << 20
_GIT_TIMEOUT_SECONDS = 120.0
_GIT_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    # Never prompt for credentials or read the operator's global/system config.
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


@dataclass(frozen=True)
class Workspace:
    """A workspace on disk and where it came from."""

    path: Path
    kind: str  # "copy" or "git"
    source: str
    commit: str | None = None  # the commit checked out, for git worktrees

    def __post_init__(self) -> None:
        if self.kind not in ("copy", "git"):
            raise ValueError("a workspace is a copy or a git worktree")
        if (self.kind == "git") != (self.commit is not None):
            raise ValueError("a git workspace records its commit, a copy does not")


def create_workspace(spec: WorkspaceSpec, destination: Path) -> Workspace:
    """Create the workspace a workflow asks for at ``destination`` (which must not exist)."""
    if spec.git is not None:
        return git_worktree(spec.git, destination)
    assert spec.source is not None
    return copy_workspace(spec.source, destination)


def copy_workspace(source: Path, destination: Path) -> Workspace:
    """Copy a folder, keeping links that stay inside it and refusing ones that leave it."""
    source = Path(source)
    destination = Path(destination)
    try:
        root = source.resolve(strict=True)
    except OSError:
        raise WorkspaceError(f"workspace source {str(source)!r} does not exist") from None
    if not root.is_dir():
        raise WorkspaceError(f"workspace source {str(source)!r} is not a directory")
    if destination.exists() or destination.is_symlink():
        raise WorkspaceError(f"workspace {str(destination)!r} already exists")
    if destination.resolve() == root or root in destination.resolve().parents:
        raise WorkspaceError("the workspace cannot lie inside its own source")
    problems = list(_copy_problems(root))
    if problems:
        raise WorkspaceError("cannot copy the workspace source: " + "; ".join(problems[:20]))
    try:
        # symlinks=True copies links as links; every link was checked to stay inside above.
        shutil.copytree(root, destination, symlinks=True)
    except (OSError, shutil.Error) as exc:
        with contextlib.suppress(OSError):
            remove_tree(destination)
        raise WorkspaceError(f"copying the workspace failed: {exc}") from None
    return Workspace(destination, "copy", str(root))


def _copy_problems(root: Path) -> Iterator[str]:
    for directory, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                # realpath follows the whole chain as the kernel would ("s/../x" with s -> "."
                # escapes although it looks inside); absolute targets are refused outright
                # because they would point back into the source, not into the copy.
                resolved = os.path.realpath(path)
                inside = resolved == str(root) or resolved.startswith(str(root) + os.sep)
                if os.path.isabs(os.readlink(path)) or not inside:
                    yield f"{relative}: link leaves the workspace"
            elif not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                yield f"{relative}: special file"


def git_worktree(source: GitSource, destination: Path) -> Workspace:
    """Add a detached worktree of ``source.repo`` at ``source.ref`` (resolved to a commit)."""
    if source.ref.startswith("-"):
        raise WorkspaceError("a git ref cannot start with '-'")
    repo = Path(source.repo)
    if not repo.is_dir():
        raise WorkspaceError(f"git repository {source.repo!r} is not a local directory")
    if Path(destination).exists():
        raise WorkspaceError(f"workspace {str(destination)!r} already exists")
    commit = _git(
        repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{source.ref}^{{commit}}"
    ).strip()
    if not commit:
        raise WorkspaceError(f"ref {source.ref!r} does not name a commit in {source.repo!r}")
    _git(repo, "worktree", "add", "--detach", "--", str(destination), commit)
    return Workspace(Path(destination), "git", str(repo.resolve()), commit)


def remove_workspace(workspace: Workspace) -> None:
    """Remove a workspace (and, for git, its worktree registration)."""
    if workspace.kind == "git":
        with contextlib.suppress(WorkspaceError):
            _git(Path(workspace.source), "worktree", "remove", "--force", "--", str(workspace.path))
    if workspace.path.exists():
        remove_tree(workspace.path)
    if workspace.kind == "git":
        with contextlib.suppress(WorkspaceError):
            _git(Path(workspace.source), "worktree", "prune")


def _git(repo: Path, *args: str) -> str:
    try:
        completed = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            env=_GIT_ENV,
            timeout=_GIT_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WorkspaceError(f"git {args[0]} failed: {type(exc).__name__}") from None
    if completed.returncode != 0:
        if args[0] == "rev-parse":
            return ""
        message = completed.stderr.decode("utf-8", "replace").strip().splitlines()
        raise WorkspaceError(
            f"git {args[0]} failed: {message[-1] if message else completed.returncode}"
        )
    return completed.stdout.decode("utf-8", "replace")


# --- hashing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One hashed entry of a workspace."""

    type: str  # d, f, l or o
    executable: bool
    content: str  # file SHA-256, link target, or empty


def workspace_manifest(root: Path) -> dict[str, Entry]:
    """Return every entry below ``root`` (except ``.git``) by relative posix path."""
    root = Path(root)
    if not root.is_dir():
        raise WorkspaceError(f"workspace {str(root)!r} is not a directory")
    manifest: dict[str, Entry] = {}
    buffer = bytearray(_BUFFER)
    stack = [(os.fsencode(root), b"")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as listing:
            entries = list(listing)
        for item in entries:
            if item.name == b".git":
                continue
            relative = prefix + item.name
            key = os.fsdecode(relative)
            info = item.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                manifest[key] = Entry("d", False, "")
                stack.append((item.path, relative + b"/"))
            elif stat.S_ISREG(info.st_mode):
                manifest[key] = Entry(
                    "f", bool(info.st_mode & 0o111), _file_sha256(item.path, buffer)
                )
            elif stat.S_ISLNK(info.st_mode):
                manifest[key] = Entry("l", False, os.fsdecode(os.readlink(item.path)))
            else:
                manifest[key] = Entry("o", False, "")
    return manifest


def workspace_hash(root: Path) -> str:
    """Return the deterministic SHA-256 hex of a workspace tree (see the module docstring)."""
    return manifest_hash(workspace_manifest(root))


def manifest_hash(manifest: Mapping[str, Entry]) -> str:
    """Hash a manifest: entries sorted by path bytes, each field length-prefixed."""
    digest = hashlib.sha256(b"cabincrew-workspace-v1\n")
    for path in sorted(manifest, key=os.fsencode):
        entry = manifest[path]
        for field in (
            os.fsencode(path),
            entry.type.encode(),
            b"x" if entry.executable else b"-",
            os.fsencode(entry.content),
        ):
            digest.update(len(field).to_bytes(8, "big"))
            digest.update(field)
    return digest.hexdigest()


def diff_manifests(before: Mapping[str, Entry], after: Mapping[str, Entry]) -> list[str]:
    """Return what changed between two manifests, one line per path, sorted."""
    changes = []
    for path in sorted(set(before) | set(after), key=os.fsencode):
        if path not in after:
            changes.append(f"{path}: removed")
        elif path not in before:
            changes.append(f"{path}: added")
        elif before[path] != after[path]:
            old, new = before[path], after[path]
            if old.type != new.type:
                changes.append(f"{path}: type changed")
            elif old.content != new.content:
                changes.append(f"{path}: content changed")
            else:
                changes.append(f"{path}: mode changed")
    return changes


def _file_sha256(path: bytes, buffer: bytearray) -> str:
    digest = hashlib.sha256()
    view = memoryview(buffer)
    # O_NONBLOCK: a FIFO swapped in after the listing must not hang the hash.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while count := os.readv(fd, [buffer]):
            digest.update(view[:count])
    finally:
        os.close(fd)
    return digest.hexdigest()


__all__ = [
    "Entry",
    "Workspace",
    "copy_workspace",
    "create_workspace",
    "diff_manifests",
    "git_worktree",
    "manifest_hash",
    "remove_workspace",
    "workspace_hash",
    "workspace_manifest",
]
