"""The domain modules together, with the shipped file-patch engine: plan, bind, verify, apply."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from cabincrew import protocol_schema
from cabincrew.plantoken import (
    PlanBinding,
    PlanToken,
    diff_tokens,
    integrity_check,
    sign_plan_token,
    verify_signed,
)
from cabincrew.signing import Ed25519Signer
from orchestrator_svc.artifacts import ArtifactStore, Role, validate_artifacts
from orchestrator_svc.errors import ArtifactIntegrityError
from orchestrator_svc.runner import Mode, RunLimits, build_engine_input, run_engine
from orchestrator_svc.workflow import EngineSpec
from orchestrator_svc.workspace import copy_workspace, workspace_hash
from tests.orchestrator.conftest import ENGINES

FILE_PATCH = EngineSpec((sys.executable, "-I", "-S", str(ENGINES / "file-patch" / "engine.py")))
LIMITS = RunLimits(timeout_seconds=60)
WHEN = datetime(2025, 1, 1, tzinfo=UTC)


async def test_a_plan_is_bound_verified_and_applied(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "README.md").write_text("hello world\n")
    workspace = copy_workspace(source, tmp_path / "ws").path
    before = workspace_hash(workspace)
    config = {
        "edits": [
            {"path": "README.md", "action": "update", "replace": [{"old": "world", "new": "there"}]}
        ]
    }
    artifacts_dir, temp, logs = tmp_path / "artifacts", tmp_path / "temp", tmp_path / "logs"

    plan_input = build_engine_input(
        mode=Mode.FLIGHT_PLAN,
        workflow_id="wf",
        step_id="patch",
        config=config,
        workspace_hash=before,
    )
    flight = await run_engine(
        FILE_PATCH,
        Mode.FLIGHT_PLAN,
        plan_input,
        workspace=workspace,
        artifacts_dir=artifacts_dir,
        temp_dir=temp,
        log_path=logs / "plan.log",
        limits=LIMITS,
    )
    assert flight.ok, (flight.failure, flight.stderr_tail)
    assert flight.receipt is not None
    assert workspace_hash(workspace) == before  # flight-plan did not mutate the workspace

    artifacts = validate_artifacts(artifacts_dir, flight.receipt)
    assert {a.role for a in artifacts} == {Role.STATE, Role.EVIDENCE}
    store = ArtifactStore(tmp_path / "store")
    records = store.put(artifacts_dir, artifacts)
    binding = PlanBinding(
        workflow_id="wf",
        step_id="patch",
        engine_id=flight.receipt["engine_id"],
        model="none",
        workspace_hash=before,
        artifacts=tuple(a.plan_artifact() for a in artifacts),
    )
    token = PlanToken.create(binding, WHEN)
    signer = Ed25519Signer.generate()
    envelope = sign_plan_token(token, signer).to_dict()
    assert verify_signed(envelope, signer.public_key_bytes()) == []

    # Before take-off: recompute from the store and the workspace; nothing differs.
    actual = PlanToken.create(
        PlanBinding(
            **{
                **binding.__dict__,
                "artifacts": tuple(a.plan_artifact() for a in store.load(records)),
                "workspace_hash": workspace_hash(workspace),
            }
        ),
        WHEN,
    )
    check = integrity_check(token, actual)
    assert check["plan_token_match"] and protocol_schema.errors("AuditIntegrity", check) == []

    take_off_input = build_engine_input(
        mode=Mode.TAKE_OFF, workflow_id="wf", step_id="patch", expected_plan_token=token.token
    )
    restored: list[str] = []
    take_off = await run_engine(
        FILE_PATCH,
        Mode.TAKE_OFF,
        take_off_input,
        workspace=workspace,
        artifacts_dir=artifacts_dir,
        temp_dir=temp,
        log_path=logs / "take-off.log",
        limits=LIMITS,
        restore=lambda target: restored.extend(store.materialise(records, target)),
    )
    assert take_off.ok, (take_off.failure, take_off.stderr_tail)
    assert take_off.receipt is not None and take_off.receipt["plan_token"] == token.token
    assert restored and all(name.startswith("edit-") for name in restored)
    validate_artifacts(artifacts_dir, take_off.receipt, exclude=restored)
    assert (workspace / "README.md").read_text() == "hello there\n"


async def test_tampering_with_stored_artifacts_or_the_workspace_is_detected(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "a.txt").write_text("one\n")
    before = workspace_hash(workspace)
    config = {"edits": [{"path": "a.txt", "action": "update", "content": "two\n"}]}
    plan_input = build_engine_input(
        mode=Mode.FLIGHT_PLAN, workflow_id="wf", step_id="s", config=config
    )
    flight = await run_engine(
        FILE_PATCH,
        Mode.FLIGHT_PLAN,
        plan_input,
        workspace=workspace,
        artifacts_dir=tmp_path / "art",
        temp_dir=tmp_path / "tmp",
        log_path=tmp_path / "log",
        limits=LIMITS,
    )
    assert flight.ok and flight.receipt is not None
    artifacts = validate_artifacts(tmp_path / "art", flight.receipt)
    store = ArtifactStore(tmp_path / "store")
    records = store.put(tmp_path / "art", artifacts)
    token = PlanToken.create(
        PlanBinding(
            "wf",
            "s",
            "cabincrew.file-patch",
            "none",
            before,
            tuple(a.plan_artifact() for a in artifacts),
        ),
        WHEN,
    )

    (workspace / "a.txt").write_text("drifted\n")
    drifted = PlanToken.create(
        PlanBinding(
            "wf",
            "s",
            "cabincrew.file-patch",
            "none",
            workspace_hash(workspace),
            token.binding.artifacts,
        ),
        WHEN,
    )
    assert [d.split(" (")[0] for d in diff_tokens(token, drifted)] == ["workspace hash changed"]

    state = next(r for r in records if r.role is Role.STATE and r.body_sha256)
    path = store.object_path(state.body_sha256 or "")
    os.chmod(path, 0o644)
    path.write_bytes(b"--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-one\n+rm -rf /\n")
    try:
        store.load(records)
    except ArtifactIntegrityError as exc:
        check = integrity_check(token, None, [exc.message])
        assert (
            not check["plan_token_match"] and protocol_schema.errors("AuditIntegrity", check) == []
        )
    else:
        raise AssertionError("a changed stored artifact must not load")
