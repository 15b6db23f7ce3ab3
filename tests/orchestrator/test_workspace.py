"""Workspaces: copies, git worktrees and the workspace hash."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator_svc.errors import WorkspaceError
from orchestrator_svc.workflow import GitSource, WorkspaceSpec
from orchestrator_svc.workspace import (
    copy_workspace,
    create_workspace,
    diff_manifests,
    git_worktree,
    remove_workspace,
    workspace_hash,
    workspace_manifest,
)


def tree(root: Path) -> Path:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "README.md").write_text("hello\n")
    (root / "src" / "pkg" / "app.py").write_text("print('hi')\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "link-to-readme").symlink_to("README.md")
    (root / "empty").mkdir()
    return root


def retarget_link(root: Path) -> None:
    (root / "link-to-readme").unlink()
    (root / "link-to-readme").symlink_to("run.sh")


def replace_link_with_file(root: Path) -> None:
    (root / "link-to-readme").unlink()
    (root / "link-to-readme").write_text("README.md")


def test_a_copy_hashes_like_its_source_and_keeps_modes_and_inner_links(tmp_path: Path) -> None:
    source = tree(tmp_path / "source")
    workspace = copy_workspace(source, tmp_path / "ws")
    assert workspace.kind == "copy" and workspace.commit is None
    assert workspace_hash(workspace.path) == workspace_hash(source)
    assert os.readlink(workspace.path / "link-to-readme") == "README.md"
    assert os.access(workspace.path / "run.sh", os.X_OK)


@pytest.mark.parametrize(
    "target", ["../../outside", "/etc/passwd", "pkg/../../../x", "dot/../../x"]
)
def test_links_that_leave_the_source_are_refused(tmp_path: Path, target: str) -> None:
    source = tree(tmp_path / "source")
    (source / "src" / "dot").symlink_to(".")
    (source / "src" / "escape").symlink_to(target)
    with pytest.raises(WorkspaceError):
        copy_workspace(source, tmp_path / "ws")
    assert not (tmp_path / "ws").exists()


def test_special_files_in_the_source_are_refused(tmp_path: Path) -> None:
    source = tree(tmp_path / "source")
    os.mkfifo(source / "pipe")
    with pytest.raises(WorkspaceError):
        copy_workspace(source, tmp_path / "ws")


def test_an_existing_destination_or_missing_source_is_refused(tmp_path: Path) -> None:
    source = tree(tmp_path / "source")
    (tmp_path / "ws").mkdir()
    with pytest.raises(WorkspaceError):
        copy_workspace(source, tmp_path / "ws")
    with pytest.raises(WorkspaceError):
        copy_workspace(tmp_path / "nope", tmp_path / "ws2")
    with pytest.raises(WorkspaceError):
        copy_workspace(source, source / "inside")


def test_the_hash_is_deterministic_and_ignores_timestamps(tmp_path: Path) -> None:
    root = tree(tmp_path / "a")
    before = workspace_hash(root)
    os.utime(root / "README.md", (0, 0))
    assert workspace_hash(root) == before


@pytest.mark.parametrize(
    "change",
    [
        lambda r: (r / "README.md").write_text("changed\n"),
        lambda r: os.chmod(r / "README.md", 0o755),
        lambda r: os.rename(r / "README.md", r / "README.txt"),
        lambda r: (r / "empty" / "new").mkdir(),
        lambda r: (r / "empty").rmdir(),
        lambda r: retarget_link(r),
        lambda r: replace_link_with_file(r),
        lambda r: (r / "src" / "pkg" / "new.py").write_bytes(b""),
    ],
)
def test_any_change_to_content_names_types_or_exec_bits_changes_the_hash(
    tmp_path: Path, change: object
) -> None:
    root = tree(tmp_path / "a")
    before = workspace_manifest(root)
    change(root)  # type: ignore[operator]
    after = workspace_manifest(root)
    assert workspace_hash(root) != workspace_hash(tree(tmp_path / "b"))
    assert diff_manifests(before, after)


def test_the_git_directory_is_not_hashed(tmp_path: Path) -> None:
    root = tree(tmp_path / "a")
    before = workspace_hash(root)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "src" / ".git").write_text("gitdir: elsewhere\n")
    assert workspace_hash(root) == before


def test_non_utf8_file_names_are_hashed(tmp_path: Path) -> None:
    root = tmp_path / "a"
    root.mkdir()
    with open(os.path.join(os.fsencode(root), b"caf\xe9"), "wb") as handle:
        handle.write(b"x")
    assert len(workspace_hash(root)) == 64


GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")


def git(repo: Path, *args: str) -> str:
    env = {
        "PATH": "/usr/bin:/bin",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "HOME": str(repo),
    }
    return (
        subprocess.run(
            ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
            check=True,
            capture_output=True,
            env=env,
        )
        .stdout.decode()
        .strip()
    )


def repo_with_two_commits(root: Path) -> tuple[Path, str, str]:
    repo = tree(root)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    first = git(repo, "rev-parse", "HEAD")
    (repo / "README.md").write_text("second\n")
    git(repo, "commit", "-q", "-am", "two")
    return repo, first, git(repo, "rev-parse", "HEAD")


@needs_git
def test_a_git_worktree_checks_out_the_resolved_commit_detached(tmp_path: Path) -> None:
    repo, first, second = repo_with_two_commits(tmp_path / "repo")
    workspace = create_workspace(WorkspaceSpec(git=GitSource(str(repo), "main")), tmp_path / "ws")
    assert workspace.kind == "git" and workspace.commit == second
    assert (workspace.path / "README.md").read_text() == "second\n"
    old = git_worktree(GitSource(str(repo), first), tmp_path / "ws-old")
    assert (old.path / "README.md").read_text() == "hello\n"
    # The worktree's .git file (it names the main repo) is not part of the hash.
    fresh = tree(tmp_path / "fresh")
    (fresh / "empty").rmdir()  # git does not keep empty directories
    assert workspace_hash(old.path) == workspace_hash(fresh)
    remove_workspace(workspace)
    remove_workspace(old)
    assert not workspace.path.exists() and not old.path.exists()
    assert "ws" not in git(repo, "worktree", "list")


@needs_git
def test_an_unknown_git_ref_is_refused(tmp_path: Path) -> None:
    repo, _, _ = repo_with_two_commits(tmp_path / "repo")
    with pytest.raises(WorkspaceError):
        git_worktree(GitSource(str(repo), "no-such-branch"), tmp_path / "ws")
    with pytest.raises(WorkspaceError):
        git_worktree(GitSource(str(tmp_path / "not-a-repo"), "main"), tmp_path / "ws")


def test_option_like_refs_are_refused() -> None:
    with pytest.raises(ValueError):
        GitSource("/repo", "--upload-pack=evil")
