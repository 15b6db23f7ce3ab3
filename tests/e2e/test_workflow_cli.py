"""The workflow commands as a user types them, against a real ``cabincrew up``.

``run`` (exit codes), ``workflows list|show|watch|timeline|cancel``, ``approvals`` with a
second identity from ``auth issue``, ``batch submit|show``, ``plan-token export|verify``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT, free_port
from tests.orchestrator.test_crash import Up
from tests.orchestrator.test_service_support import make_source

CABINCREW = str(BIN / "cabincrew")
EXAMPLES = ROOT / "examples"


@dataclass
class User:
    """Runs the CLI with a given environment (address, data dir, token)."""

    env: dict[str, str]
    cwd: Path

    def __call__(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if token is not None:
            env["CABINCREW_TOKEN"] = token
        return subprocess.run(
            [CABINCREW, *args], env=env, cwd=self.cwd, capture_output=True, text=True, timeout=120
        )

    def json(self, *args: str, token: str | None = None) -> dict[str, object]:
        result = self(*args, "--json", token=token)
        assert result.returncode == 0, result.stderr
        document: dict[str, object] = json.loads(result.stdout)
        return document

    def issue(self, principal: str, roles: Sequence[str]) -> str:
        result = self("auth", "issue", "--principal", principal, "--roles", ",".join(roles))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()


@pytest.fixture
async def session(tmp_path: Path) -> AsyncIterator[tuple[Up, User]]:
    """A running ``cabincrew up`` and a user of it (the local operator)."""
    up = Up(tmp_path, free_port())
    make_source(tmp_path)
    await up.start()
    try:
        yield up, user_of(up, tmp_path)
    finally:
        await up.stop()


def user_of(up: Up, cwd: Path) -> User:
    """The local operator of ``up``, running the CLI in ``cwd``."""
    env = {
        **os.environ,
        "CABINCREW_ADDR": f"127.0.0.1:{up.port}",
        "CABINCREW_DATA_DIR": str(up.data_dir),
        "NO_COLOR": "1",
        "COLUMNS": "200",
    }
    env.pop("CABINCREW_TOKEN", None)
    return User(env, cwd)


def gate_file(tmp_path: Path) -> Path:
    path = tmp_path / "gate.yaml"
    path.write_text(
        "id: sign-off\nsteps:\n  - id: gate\n    kind: approval\n"
        "    governance: {approval_role: approver}\n"
    )
    return path


async def test_workflows_can_be_run_followed_listed_and_cancelled_from_the_cli(
    session: tuple[Up, User], tmp_path: Path
) -> None:
    _, user = session
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\nsteps:\n  - id: a\n    kind: warp\n")
    refused = user("run", str(bad), "--wait")
    assert refused.returncode != 0 and "bad.yaml:4" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) <= 3

    submitted = user.json("run", str(gate_file(tmp_path)))
    workflow_id = str(submitted["workflow"]["workflow_id"])  # type: ignore[index]
    listed = user.json("workflows", "list")
    assert [w["workflow_id"] for w in listed["workflows"]] == [workflow_id]  # type: ignore[index,union-attr]
    waited = user("workflows", "watch", workflow_id, "--timeout", "2")
    assert waited.returncode == 3  # still waiting for a human when the timeout passed
    pending = user.json("approvals", "list", "--state", "pending")
    approval_id = pending["approvals"][0]["approval_id"]  # type: ignore[index]
    assert user("approvals", "approve", approval_id).returncode != 0  # the requester may not
    alice = user.issue("alice", ["approver"])
    assert user("approvals", "approve", approval_id, token=alice).returncode == 0
    done = user("workflows", "watch", workflow_id, "--timeout", "60")
    assert done.returncode == 0 and "COMPLETED" in done.stdout
    timeline = user.json("workflows", "timeline", workflow_id)
    types = [entry["entry_type"] for entry in timeline["entries"]]  # type: ignore[union-attr]
    assert types[0] == "workflow_started" and types[-1] == "workflow_completed"

    second = user.json("run", str(gate_file(tmp_path)))
    second_id = str(second["workflow"]["workflow_id"])  # type: ignore[index]
    cancelled = user.json("workflows", "cancel", second_id, "--reason", "not needed")
    assert cancelled["workflow"]["state"] == "WORKFLOW_STATE_CANCELLED"  # type: ignore[index]
    assert user("workflows", "show", second_id).returncode == 0


async def test_governed_examples_end_as_their_policies_say(session: tuple[Up, User]) -> None:
    up, user = session
    assert await _governance_wired(up), "PreflightService answers UNIMPLEMENTED"
    allowed = user("run", str(EXAMPLES / "allow.yaml"), "--wait", "--json")
    assert allowed.returncode == 0, allowed.stderr
    workflow = json.loads(allowed.stdout)["workflow"]
    readme = Path(workflow["workspace"]) / "README.md"
    assert "Owned by platform." in readme.read_text()

    denied = user("run", str(EXAMPLES / "deny.yaml"), "--wait")
    assert denied.returncode == 1 and "FAILED" in denied.stdout

    exported = user("plan-token", "export", workflow["workflow_id"], "--out", "token.json")
    assert exported.returncode == 0, exported.stderr
    assert user("plan-token", "verify", "token.json").returncode == 0
    token = json.loads((user.cwd / "token.json").read_text())
    token["binding"]["workspace_hash"] = "0" * 64
    (user.cwd / "token.json").write_text(json.dumps(token))
    assert user("plan-token", "verify", "token.json").returncode == 1

    batch = user(
        "batch",
        "submit",
        str(EXAMPLES / "batch.yaml"),
        "--max-concurrent",
        "2",
        "--policy",
        "quarantine",
        "--wait",
        "--json",
    )
    assert batch.returncode == 1  # one item (deny.yaml) fails and is quarantined
    items = json.loads(batch.stdout)["batch"]["items"]
    assert [item.get("quarantined", False) for item in items] == [False, False, True, False]
    assert user("audit", "verify").returncode == 0


async def _governance_wired(up: Up) -> bool:
    from cabincrew.clients import PreflightClient, RPCError

    async with up.channel("probe", ("service",)) as channel:
        try:
            await PreflightClient(channel, deadline_seconds=10).get_governance()
        except RPCError as exc:
            if exc.status.name == "UNIMPLEMENTED":
                return False
            raise
    return True


def test_the_examples_parse() -> None:
    from orchestrator_svc.workflow import load_workflow

    for path in sorted(EXAMPLES.glob("*.yaml")):
        if path.name != "batch.yaml":
            load_workflow(path).ensure_runnable()
