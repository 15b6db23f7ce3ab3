"""More of the workflow CLI against a real ``cabincrew up``: the warn example, ``run --input``,
``batch show`` and ``workflows resume --retry-takeoff`` after a take-off cut off by a crash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cabincrew.v1 import common_pb2
from tests.conftest import free_port
from tests.e2e.test_workflow_cli import EXAMPLES, User, _governance_wired, session, user_of
from tests.orchestrator.test_crash import Up, kill_engine, watch_until
from tests.orchestrator.test_service_support import (
    TERMINAL,
    definition,
    gate_engine,
    make_source,
    patch_step,
)

__all__ = ["session"]

COMPLETED = "WORKFLOW_STATE_COMPLETED"


def note_workflow(tmp_path: Path) -> Path:
    """A workflow file whose one step writes the required input ``note`` into README.md."""
    step = patch_step([{"path": "README.md", "action": "update", "content": "{{ inputs.note }}\n"}])
    path = tmp_path / "note.json"
    path.write_text(
        definition(
            [step],
            id="note",
            inputs={"note": {"required": True}},
            workspace={"source": "./source"},
        )
    )
    return path


async def test_the_warn_example_completes_with_a_recorded_warning(
    session: tuple[Up, User],
) -> None:
    up, user = session
    assert await _governance_wired(up), "PreflightService answers UNIMPLEMENTED"
    result = user("run", str(EXAMPLES / "warn.yaml"), "--wait", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    workflow: dict[str, Any] = json.loads(result.stdout)["workflow"]
    assert workflow["state"] == COMPLETED
    (step,) = workflow["steps"]
    assert step["decision"] == "DECISION_WARN" and step["warnings"], step
    assert not list((Path(workflow["workspace"]) / "logs").glob("run-*.log"))
    assert len(list((EXAMPLES / "repo" / "logs").glob("run-*.log"))) == 5  # the source stays
    warned = user(
        "audit",
        "query",
        "--workflow-id",
        workflow["workflow_id"],
        "--event-type",
        "orchestrator.preflight_warning",
        "--json",
    )
    assert warned.returncode == 0, warned.stderr
    assert [json.loads(line) for line in warned.stdout.splitlines() if line.strip()]


async def test_run_passes_inputs_given_with_input(session: tuple[Up, User], tmp_path: Path) -> None:
    _, user = session
    path = note_workflow(tmp_path)
    missing = user("run", str(path), "--wait")
    assert missing.returncode != 0
    assert user.json("workflows", "list")["workflows"] == []  # refused, nothing started
    result = user("run", str(path), "--input", "note=given on the command line", "--wait", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    workflow = json.loads(result.stdout)["workflow"]
    assert workflow["state"] == COMPLETED
    readme = Path(workflow["workspace"]) / "README.md"
    assert readme.read_text() == "given on the command line\n"


async def test_batch_show_lists_every_item_of_a_batch(
    session: tuple[Up, User], tmp_path: Path
) -> None:
    _, user = session
    note_workflow(tmp_path)
    batch_file = tmp_path / "batch.json"
    batch_file.write_text(
        json.dumps(
            {"workflow": "note.json", "items": [{"inputs": {"note": n}} for n in ("a", "b", "c")]}
        )
    )
    submitted = user("batch", "submit", str(batch_file), "--wait", "--json")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    batch = json.loads(submitted.stdout)["batch"]
    shown = user.json("batch", "show", batch["batch_id"])["batch"]
    assert shown["batch_id"] == batch["batch_id"] and shown["done"]  # type: ignore[index]
    items = shown["items"]  # type: ignore[index]
    assert [item["workflow_id"] for item in items] == [i["workflow_id"] for i in batch["items"]]
    assert [item["state"] for item in items] == [COMPLETED] * 3
    table = user("batch", "show", batch["batch_id"])
    assert table.returncode == 0, table.stderr
    for item in items:
        assert item["workflow_id"] in table.stdout
    assert user("batch", "show", "no-such-batch").returncode != 0


async def test_resume_with_retry_takeoff_runs_a_take_off_cut_off_by_a_crash(
    tmp_path: Path,
) -> None:
    make_source(tmp_path)
    gate = tmp_path / "gate"
    gate.mkdir()
    port = free_port()
    step = {
        "id": "step",
        "kind": "engine",
        "engine": {"command": gate_engine(tmp_path / "engines")},
        "config": {"gate_dir": str(gate), "block": "none", "content": "applied\n"},
    }
    path = tmp_path / "gate.json"
    path.write_text(definition([step], workspace={"source": "./source"}))
    hook = {"CABINCREW__ORCHESTRATOR__UNSAFE_CRASH_AFTER_STATE": "TAKEOFF_RUNNING"}
    crashing = Up(tmp_path, port, extra_env=hook)
    await crashing.start()
    try:
        submitted = user_of(crashing, tmp_path).json("run", str(path))
        workflow_id = str(submitted["workflow"]["workflow_id"])  # type: ignore[index]
        assert crashing.process is not None
        await crashing.process.wait()  # it kills itself once take-off is logged as started
    finally:
        await crashing.stop()
    up = Up(tmp_path, port)
    await up.start()
    try:
        user = user_of(up, tmp_path)
        interrupted = await watch_until(
            up,
            workflow_id,
            lambda w: w.state == common_pb2.WORKFLOW_STATE_TAKEOFF_INTERRUPTED,
        )
        assert not (Path(interrupted.workspace) / "out.txt").exists()
        assert user("workflows", "resume", workflow_id).returncode != 0  # take-off needs the flag
        resumed = user("workflows", "resume", workflow_id, "--retry-takeoff")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        watched = user("workflows", "watch", workflow_id, "--timeout", "60")
        assert watched.returncode == 0, watched.stdout + watched.stderr
        done = await watch_until(up, workflow_id, lambda w: w.state in TERMINAL)
        assert done.state == common_pb2.WORKFLOW_STATE_COMPLETED, done.error
        assert (Path(done.workspace) / "out.txt").read_text() == "applied\n"
    finally:
        await up.stop()
        for pid_file in gate.glob("*.pid"):
            kill_engine(pid_file)
