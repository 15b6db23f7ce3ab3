"""The file-patch engine, run as a subprocess: plan without touching, apply exactly the plan."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.engines.harness import PLAN_TOKEN, EngineRun, Sandbox, snapshot

ENGINE = "file-patch"

SAMPLE_EDITS: list[dict[str, Any]] = [
    {"path": "src/app.py", "action": "update", "replace": [{"old": "world", "new": "there"}]},
    {"path": "notes.txt", "action": "update", "content": "no newline\nnow two"},
    {
        "path": "new/dir/run.sh",
        "action": "create",
        "content": "#!/bin/sh\necho hi\n",
        "mode": "0755",
    },
    {"path": "old.txt", "action": "delete"},
]


def seed(sandbox: Sandbox) -> None:
    """Populate the workspace the sample edits apply to."""
    (sandbox.workspace / "src").mkdir()
    (sandbox.workspace / "src" / "app.py").write_text("print('hello')\nprint('world')\n")
    (sandbox.workspace / "notes.txt").write_text("no newline")
    (sandbox.workspace / "old.txt").write_text("bye\n")
    (sandbox.workspace / "untouched.txt").write_text("keep\n")


def plan(sandbox: Sandbox, edits: list[dict[str, Any]]) -> tuple[Path, EngineRun]:
    """Run flight-plan into a fresh artifacts dir."""
    artifacts = sandbox.fresh_artifacts_dir()
    return artifacts, sandbox.run(ENGINE, "flight-plan", {"edits": edits}, artifacts)


def take_off(sandbox: Sandbox, plan_dir: Path, planned: EngineRun, **kwargs: Any) -> EngineRun:
    """Run take-off with the plan's state artifacts restored into a fresh artifacts dir."""
    artifacts = sandbox.carry_state(plan_dir, planned)
    config = kwargs.pop("config", {"edits": SAMPLE_EDITS})
    return sandbox.run(ENGINE, "take-off", config, artifacts, **kwargs)


def sha256(data: bytes) -> str:
    """Hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


def test_flight_plan_leaves_the_workspace_byte_identical(sandbox: Sandbox) -> None:
    seed(sandbox)
    before = snapshot(sandbox.workspace)

    _, result = plan(sandbox, SAMPLE_EDITS)

    assert result.returncode == 0
    assert snapshot(sandbox.workspace) == before


def test_flight_plan_writes_one_state_diff_per_edit_and_a_summary(sandbox: Sandbox) -> None:
    seed(sandbox)
    artifacts, result = plan(sandbox, SAMPLE_EDITS)

    names = [(entry["name"], entry["role"]) for entry in result.receipt["artifacts"]]
    assert names == [
        ("edit-000-src-app.py", "state"),
        ("edit-001-notes.txt", "state"),
        ("edit-002-new-dir-run.sh", "state"),
        ("edit-003-old.txt", "state"),
        ("summary", "evidence"),
    ]
    update = json.loads((artifacts / "edit-000-src-app.py" / "artifact.json").read_text())
    assert update["artifact_type"] == "diff"
    assert update["action"] == "update"
    assert update["target"] == "src/app.py"
    assert update["mime"] == "text/x-diff"
    original = (sandbox.workspace / "src" / "app.py").read_bytes()
    assert update["metadata"]["before_sha256"] == sha256(original)
    assert update["metadata"]["after_sha256"] == sha256(b"print('hello')\nprint('there')\n")
    assert update["metadata"]["mode"] == "0644"
    diff = (artifacts / "edit-000-src-app.py" / "body.data").read_text()
    assert diff.startswith("--- a/src/app.py\n+++ b/src/app.py\n@@ ")
    assert "-print('world')\n+print('there')\n" in diff

    create = json.loads((artifacts / "edit-002-new-dir-run.sh" / "artifact.json").read_text())
    assert create["metadata"]["before_sha256"] is None
    assert create["metadata"]["mode"] == "0755"
    delete = json.loads((artifacts / "edit-003-old.txt" / "artifact.json").read_text())
    assert delete["metadata"]["after_sha256"] is None

    summary = json.loads((artifacts / "summary" / "body.data").read_text())
    assert summary["files_changed"] == 4
    assert (summary["files_created"], summary["files_updated"], summary["files_deleted"]) == (
        1,
        2,
        1,
    )
    assert (summary["lines_added"], summary["lines_removed"]) == (5, 3)


def test_flight_plan_is_deterministic(sandbox: Sandbox) -> None:
    seed(sandbox)
    first_dir, first = plan(sandbox, SAMPLE_EDITS)
    second_dir, second = plan(sandbox, SAMPLE_EDITS)

    assert first.receipt == second.receipt
    assert snapshot(first_dir) == snapshot(second_dir)


def test_take_off_applies_create_update_and_delete_exactly(sandbox: Sandbox) -> None:
    seed(sandbox)
    plan_dir, planned = plan(sandbox, SAMPLE_EDITS)

    result = take_off(sandbox, plan_dir, planned)

    assert result.returncode == 0
    assert result.receipt["plan_token"] == PLAN_TOKEN
    workspace = sandbox.workspace
    assert (workspace / "src" / "app.py").read_bytes() == b"print('hello')\nprint('there')\n"
    assert (workspace / "notes.txt").read_bytes() == b"no newline\nnow two"
    assert (workspace / "new" / "dir" / "run.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((workspace / "new" / "dir" / "run.sh").stat().st_mode) == 0o755
    assert not (workspace / "old.txt").exists()
    assert (workspace / "untouched.txt").read_bytes() == b"keep\n"
    leftovers = [p for p in workspace.rglob("*") if ".cabincrew-" in p.name]
    assert leftovers == []
    applied = result.receipt["diagnostics"]["applied"]
    assert [(item["path"], item["action"]) for item in applied] == [
        ("src/app.py", "update"),
        ("notes.txt", "update"),
        ("new/dir/run.sh", "create"),
        ("old.txt", "delete"),
    ]
    assert [entry["name"] for entry in result.receipt["artifacts"]] == ["take-off-result"]


def test_take_off_applies_the_planned_diff_not_the_config(sandbox: Sandbox) -> None:
    seed(sandbox)
    plan_dir, planned = plan(sandbox, SAMPLE_EDITS)
    other = [{"path": "notes.txt", "action": "update", "content": "something else\n"}]

    result = take_off(sandbox, plan_dir, planned, config={"edits": other})

    assert result.returncode == 0
    assert (sandbox.workspace / "notes.txt").read_bytes() == b"no newline\nnow two"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b"a\nb\nc", b"a\nB\nc"),
        (b"a\nb\nc\n", b"a\nb\nc"),
        (b"a\r\nb\r\n", b"a\r\nb\r\nc\r\n"),
        (b"x\n", b""),
        (b"", b"first line\n"),
        (b"line\x0cwith form feed\n", b"line\x0cwith form feed\nmore\n"),
    ],
)
def test_take_off_round_trips_newline_edge_cases(
    sandbox: Sandbox, before: bytes, after: bytes
) -> None:
    (sandbox.workspace / "f.txt").write_bytes(before)
    edits = [{"path": "f.txt", "action": "update", "content": after.decode()}]
    plan_dir, planned = plan(sandbox, edits)

    result = take_off(sandbox, plan_dir, planned, config={"edits": edits})

    assert result.returncode == 0
    assert (sandbox.workspace / "f.txt").read_bytes() == after


def test_take_off_creates_an_empty_file(sandbox: Sandbox) -> None:
    edits = [{"path": "empty.txt", "action": "create", "content": ""}]
    plan_dir, planned = plan(sandbox, edits)

    result = take_off(sandbox, plan_dir, planned, config={"edits": edits})

    assert result.returncode == 0
    assert (sandbox.workspace / "empty.txt").read_bytes() == b""


def test_take_off_refuses_when_a_file_changed_after_the_plan(sandbox: Sandbox) -> None:
    seed(sandbox)
    plan_dir, planned = plan(sandbox, SAMPLE_EDITS)
    (sandbox.workspace / "old.txt").write_text("edited after the plan\n")
    drifted = snapshot(sandbox.workspace)

    result = take_off(sandbox, plan_dir, planned)

    assert result.returncode == 1
    assert result.error_code == "workspace_drift"
    assert result.receipt["diagnostics"]["path"] == "old.txt"
    assert snapshot(sandbox.workspace) == drifted


def test_take_off_refuses_when_a_planned_create_target_appeared(sandbox: Sandbox) -> None:
    seed(sandbox)
    plan_dir, planned = plan(sandbox, SAMPLE_EDITS)
    (sandbox.workspace / "new").mkdir()
    (sandbox.workspace / "new" / "dir").mkdir()
    (sandbox.workspace / "new" / "dir" / "run.sh").write_text("someone else's\n")
    drifted = snapshot(sandbox.workspace)

    result = take_off(sandbox, plan_dir, planned)

    assert result.returncode == 1
    assert result.error_code == "workspace_drift"
    assert snapshot(sandbox.workspace) == drifted


def test_take_off_refuses_when_a_file_mode_changed_after_the_plan(sandbox: Sandbox) -> None:
    seed(sandbox)
    plan_dir, planned = plan(sandbox, SAMPLE_EDITS)
    os.chmod(sandbox.workspace / "notes.txt", 0o600)

    result = take_off(sandbox, plan_dir, planned)

    assert result.returncode == 1
    assert result.error_code == "workspace_drift"


def test_take_off_refuses_a_diff_that_does_not_produce_after_sha256(sandbox: Sandbox) -> None:
    seed(sandbox)
    plan_dir, planned = plan(sandbox, SAMPLE_EDITS)
    artifacts = sandbox.carry_state(plan_dir, planned)
    body = artifacts / "edit-001-notes.txt" / "body.data"
    body.write_text(body.read_text().replace("+now two", "+now TWO"))
    before = snapshot(sandbox.workspace)

    result = sandbox.run(ENGINE, "take-off", {}, artifacts)

    assert result.returncode == 1
    assert result.error_code == "diff_mismatch"
    assert snapshot(sandbox.workspace) == before


def test_take_off_is_all_or_nothing_when_staging_fails(sandbox: Sandbox) -> None:
    seed(sandbox)
    plan_dir, planned = plan(sandbox, SAMPLE_EDITS)
    # Occupy the scratch name of the last edit so staging fails after earlier edits staged.
    (sandbox.workspace / ".old.txt.cabincrew-backup-003").write_text("in the way\n")
    before = snapshot(sandbox.workspace)

    result = take_off(sandbox, plan_dir, planned)

    assert result.returncode == 1
    assert result.error_code == "apply_failed"
    assert snapshot(sandbox.workspace) == before


def test_take_off_refuses_incomplete_state_artifacts(sandbox: Sandbox) -> None:
    seed(sandbox)
    plan_dir, planned = plan(sandbox, SAMPLE_EDITS)
    artifacts = sandbox.carry_state(plan_dir, planned)
    for path in sorted((artifacts / "edit-001-notes.txt").iterdir()):
        path.unlink()
    (artifacts / "edit-001-notes.txt").rmdir()

    result = sandbox.run(ENGINE, "take-off", {}, artifacts)

    assert result.returncode == 2
    assert result.error_code == "state_invalid"


def test_take_off_requires_the_expected_plan_token(sandbox: Sandbox) -> None:
    seed(sandbox)
    plan_dir, planned = plan(sandbox, SAMPLE_EDITS)
    artifacts = sandbox.carry_state(plan_dir, planned)
    request = sandbox.request("take-off", {})
    del request["expected_plan_token"]

    result = sandbox.run(ENGINE, "take-off", {}, artifacts, raw_input=json.dumps(request).encode())

    assert result.returncode == 2
    assert result.error_code == "invalid_input"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("../outside.txt", "invalid_path"),
        ("src/../../outside.txt", "invalid_path"),
        ("/etc/passwd", "invalid_path"),
        ("./src/app.py", "invalid_path"),
        ("src//app.py", "invalid_path"),
        ("src/", "invalid_path"),
        ("", "invalid_path"),
        ("escape/secret.txt", "path_escape"),
        ("link-out.txt", "path_escape"),
        ("link-in.txt", "invalid_path"),
        ("untouched.txt/child", "invalid_path"),
    ],
)
def test_unsafe_paths_are_refused_with_exit_2_naming_the_edit(
    sandbox: Sandbox, path: str, code: str
) -> None:
    seed(sandbox)
    outside = sandbox.root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not touch\n")
    (sandbox.workspace / "escape").symlink_to(outside)
    (sandbox.workspace / "link-out.txt").symlink_to(outside / "secret.txt")
    (sandbox.workspace / "link-in.txt").symlink_to(sandbox.workspace / "untouched.txt")
    edits = [
        {"path": "notes.txt", "action": "update", "content": "fine\n"},
        {"path": path, "action": "update", "content": "pwned\n"},
    ]
    artifacts = sandbox.fresh_artifacts_dir()
    before = snapshot(sandbox.root)

    result = sandbox.run(ENGINE, "flight-plan", {"edits": edits}, artifacts)

    assert result.returncode == 2
    assert result.error_code == code
    assert result.receipt["diagnostics"]["edit_index"] == 1
    assert result.receipt["artifacts"] == []
    assert snapshot(sandbox.root) == before


def test_creating_beneath_a_symlink_that_leaves_the_workspace_is_refused(
    sandbox: Sandbox,
) -> None:
    outside = sandbox.root / "outside"
    outside.mkdir()
    (sandbox.workspace / "escape").symlink_to(outside)
    edits = [{"path": "escape/new.txt", "action": "create", "content": "x\n"}]

    result = sandbox.run(ENGINE, "flight-plan", {"edits": edits}, sandbox.fresh_artifacts_dir())

    assert result.returncode == 2
    assert result.error_code == "path_escape"
    assert list(outside.iterdir()) == []


def test_take_off_refuses_a_symlink_planted_after_the_plan(sandbox: Sandbox) -> None:
    edits = [{"path": "sub/new.txt", "action": "create", "content": "x\n"}]
    plan_dir, planned = plan(sandbox, edits)
    outside = sandbox.root / "outside"
    outside.mkdir()
    (sandbox.workspace / "sub").symlink_to(outside)

    result = take_off(sandbox, plan_dir, planned, config={"edits": edits})

    assert result.returncode == 1
    assert result.error_code == "workspace_drift"
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("edits", "code"),
    [
        ([], "invalid_config"),
        ([{"path": "notes.txt", "action": "rename"}], "invalid_config"),
        ([{"path": "notes.txt", "action": "update"}], "invalid_config"),
        ([{"path": "notes.txt", "action": "update", "content": "a", "bogus": 1}], "invalid_config"),
        ([{"path": "notes.txt", "action": "create", "content": "a"}], "target_exists"),
        ([{"path": "missing.txt", "action": "update", "content": "a"}], "target_missing"),
        ([{"path": "missing.txt", "action": "delete"}], "target_missing"),
        ([{"path": "src", "action": "delete"}], "invalid_path"),
        ([{"path": "a.txt", "action": "create", "content": "x", "mode": "4755"}], "invalid_config"),
        (
            [
                {"path": "notes.txt", "action": "delete"},
                {"path": "notes.txt", "action": "update", "content": "a"},
            ],
            "duplicate_path",
        ),
        (
            [
                {"path": "d", "action": "create", "content": "a"},
                {"path": "d/e.txt", "action": "create", "content": "b"},
            ],
            "conflicting_paths",
        ),
        (
            [{"path": "src/app.py", "action": "update", "replace": [{"old": "print", "new": "x"}]}],
            "replace_mismatch",
        ),
        (
            [{"path": "src/app.py", "action": "update", "replace": [{"old": "nope", "new": "x"}]}],
            "replace_mismatch",
        ),
    ],
)
def test_invalid_edits_are_refused_with_exit_2(
    sandbox: Sandbox, edits: list[dict[str, Any]], code: str
) -> None:
    seed(sandbox)

    result = sandbox.run(ENGINE, "flight-plan", {"edits": edits}, sandbox.fresh_artifacts_dir())

    assert result.returncode == 2
    assert result.error_code == code


def test_binary_files_are_refused(sandbox: Sandbox) -> None:
    (sandbox.workspace / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    edits = [{"path": "blob.bin", "action": "update", "content": "text\n"}]

    result = sandbox.run(ENGINE, "flight-plan", {"edits": edits}, sandbox.fresh_artifacts_dir())

    assert result.returncode == 2
    assert result.error_code == "binary_file"


def test_engine_runs_as_an_executable_reading_its_input_file(sandbox: Sandbox) -> None:
    seed(sandbox)
    artifacts = sandbox.fresh_artifacts_dir()

    result = sandbox.run(
        ENGINE, "flight-plan", {"edits": SAMPLE_EDITS}, artifacts, input_file=True, direct=True
    )

    assert result.returncode == 0
    assert len(result.receipt["artifacts"]) == 5


def test_files_with_setuid_bits_are_refused(sandbox: Sandbox) -> None:
    target = sandbox.workspace / "tool"
    target.write_text("#!/bin/sh\n")
    os.chmod(target, 0o4755)
    edits = [{"path": "tool", "action": "update", "content": "#!/bin/sh\necho hi\n"}]

    result = sandbox.run(ENGINE, "flight-plan", {"edits": edits}, sandbox.fresh_artifacts_dir())

    assert result.returncode == 2
    assert result.error_code == "invalid_path"
