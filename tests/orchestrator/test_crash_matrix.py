"""The deterministic crash matrix: a real ``cabincrew up`` SIGKILLs itself after each state.

``orchestrator.unsafe_crash_after_state`` makes the process kill itself right after the log
entry that reaches the named state is durable, so the crash lands exactly there (not "at or
soon after", as a kill from outside would). The server is then started without the hook and
the workflow must end correctly: COMPLETED, or TAKEOFF_INTERRUPTED waiting for an operator
when the take-off was cut off. A state the runner logs together with the next one (a
deferred transition: ``Journal.write(defer=True)``) is durable only with it, so the crash
lands after that append. Every flight-plan run starts from an empty artifacts dir, the
take-off's effect happens once, and no audit event the audit service stored before the crash
is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cabincrew.clients import ApprovalClient, AuditClient, OrchestratorClient, RPCError
from cabincrew.config import ConfigError
from cabincrew.v1 import audit_pb2, common_pb2, orchestrator_pb2
from tests.conftest import free_port
from tests.orchestrator.conftest import PRELUDE
from tests.orchestrator.test_crash import (
    START_SECONDS,
    Up,
    all_transitions_audited,
    kill_engine,
    watch_until,
)
from tests.orchestrator.test_service_support import (
    GATE_ENGINE,
    TERMINAL,
    definition,
    make_source,
    script,
    start_orchestra,
    step_of,
)

COMPLETED = common_pb2.WORKFLOW_STATE_COMPLETED
AWAITING = common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL
INTERRUPTED = common_pb2.WORKFLOW_STATE_TAKEOFF_INTERRUPTED
APPROVAL_STATES = ("AWAITING_APPROVAL", "APPROVED")

# Every state one governed engine step passes through; the approval states need a plan that
# the default policies send for approval (a CI configuration file).
STATES = [
    "INIT",
    "PLAN_RUNNING",
    "PLAN_GENERATED",
    "ARTIFACTS_VALIDATED",
    "TOKEN_CREATED",
    "PRE_FLIGHT_RUNNING",
    "PREFLIGHT_COMPLETE",
    "AWAITING_APPROVAL",
    "APPROVED",
    "READY_FOR_TAKEOFF",
    "TAKEOFF_RUNNING",
    "EXECUTION_COMPLETE",
    "COMPLETED",
]

# The gate engine, which also records what its artifacts dir held when it started.
RECORDING_ENGINE = GATE_ENGINE.replace(
    PRELUDE,
    PRELUDE
    + """
_index = REQUEST.get("orchestrator", {}).get("run_index", 0)
with open(os.path.join(CONFIG["gate_dir"], f"{MODE}.{_index}.artifacts"), "w") as _handle:
    json.dump(sorted(os.listdir(ARTIFACTS)) if os.path.isdir(ARTIFACTS) else [], _handle)
""",
    1,
)


@pytest.fixture
async def root(tmp_path: Path) -> AsyncIterator[Path]:
    """A source folder and a gate dir; engines left behind are ended afterwards."""
    await asyncio.to_thread(make_source, tmp_path)
    (tmp_path / "gate").mkdir()
    try:
        yield tmp_path
    finally:
        for pid_file in (tmp_path / "gate").glob("*.pid"):
            kill_engine(pid_file)


class AuditWitness:
    """Event ids the audit service streamed back (so had stored) while the server lived."""

    def __init__(self, up: Up) -> None:
        self.seen: list[str] = []
        self._up = up
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._tail())
        async with asyncio.timeout(10):
            await self._started.wait()

    async def _tail(self) -> None:
        async with self._up.channel("auditor", ("admin",)) as channel:
            request = audit_pb2.TailEventsRequest(
                from_sequence=0, filter=audit_pb2.EventFilter(event_type_prefix="orchestrator.")
            )
            stream = AuditClient(channel).tail(request)
            self._started.set()
            with contextlib.suppress(RPCError):  # the crash ends the stream
                async for item in stream:
                    self.seen.append(item.entry.event.event_id)

    async def stop(self) -> list[str]:
        """Wait (bounded) for the stream to end with the crash; the ids seen."""
        assert self._task is not None
        async with asyncio.timeout(30):
            await self._task
        return list(self.seen)


async def approve(up: Up, workflow_id: str) -> None:
    waiting = await watch_until(up, workflow_id, lambda w: w.state == AWAITING)
    approval_id = step_of(waiting, "step").approval_id
    async with up.channel("alice", ("admin",)) as channel:
        approvals = ApprovalClient(channel, deadline_seconds=20)
        approval = await approvals.get(approval_id)
        await approvals.respond(approval_id, approval.subject_hash, True, "crash matrix")


def runs(gate: Path, mode: str) -> dict[int, list[str]]:
    """Each run of ``mode`` (by run index) and what its artifacts dir held at its start."""
    return {
        int(path.name.split(".")[1]): json.loads(path.read_text())
        for path in gate.glob(f"{mode}.*.artifacts")
    }


@pytest.mark.parametrize("state", STATES)
async def test_a_crash_right_after_each_state_is_logged_ends_correctly(
    root: Path, state: str
) -> None:
    gate = root / "gate"
    port = free_port()
    crashing = Up(
        root, port, extra_env={"CABINCREW__ORCHESTRATOR__UNSAFE_CRASH_AFTER_STATE": state}
    )
    target = ".github/workflows/deploy.yml" if state in APPROVAL_STATES else "out.txt"
    step = {
        "id": "step",
        "kind": "engine",
        "engine": {"command": script(root / "engines", RECORDING_ENGINE, "gate.py", False)},
        "config": {"gate_dir": str(gate), "block": "none", "path": target, "content": "applied\n"},
    }
    request = orchestrator_pb2.SubmitWorkflowRequest(
        definition=orchestrator_pb2.WorkflowDefinition(text=definition([step])),
        workspace_source=str(root / "source"),
        request_id=f"crash-{state}",
    )
    await crashing.start()
    assert any("UNSAFE" in line and state in line for line in crashing.output)
    witness = AuditWitness(crashing)
    await witness.start()
    workflow_id = ""
    try:
        async with crashing.channel() as channel:
            workflow_id = (await OrchestratorClient(channel).submit(request)).workflow_id
        if state == "APPROVED":
            await approve(crashing, workflow_id)
    except (RPCError, AssertionError):
        pass  # the crash may land before the answer (INIT): the request id finds it again
    assert crashing.process is not None
    async with asyncio.timeout(START_SECONDS):
        returncode = await crashing.process.wait()
    before = await witness.stop()
    await crashing.stop()
    assert returncode == -signal.SIGKILL, "".join(crashing.output)
    assert any("unsafe_crash_after_state: SIGKILL" in line for line in crashing.output)

    up = Up(root, port)
    await up.start()
    try:
        async with up.channel() as channel:
            workflow_id = (await OrchestratorClient(channel).submit(request)).workflow_id
        if state == "AWAITING_APPROVAL":
            await approve(up, workflow_id)
        done = await watch_until(
            up, workflow_id, lambda w: w.state in TERMINAL or w.state == INTERRUPTED
        )
        if state == "TAKEOFF_RUNNING":
            # The entry that says take-off started is durable, so the restart cannot know
            # whether the engine ran: it waits for an operator instead of running it again.
            assert done.state == INTERRUPTED, done.error
            assert not runs(gate, "take-off")
            async with up.channel() as channel:
                await OrchestratorClient(channel).resume(workflow_id, retry_takeoff=True)
            done = await watch_until(up, workflow_id, lambda w: w.state in TERMINAL)
        assert done.state == COMPLETED, done.error
        assert (Path(done.workspace) / target).read_text() == "applied\n"  # exactly once
        plans = runs(gate, "flight-plan")
        assert all(listing == [] for listing in plans.values()), plans
        # A stored plan is not made again. PLAN_GENERATED and ARTIFACTS_VALIDATED are logged
        # together with the plan-token (the runner defers them), so a crash "right after"
        # either one lands after the token; a crash before that append lands in
        # PLAN_RUNNING, whose flight-plan is redone (test_crash.py).
        assert len(plans) == 1, plans
        assert len(runs(gate, "take-off")) == 1
        ours = [event for event in before if event.startswith(f"orch-{workflow_id}-")]
        await all_transitions_audited(up, workflow_id, ours)
    finally:
        await up.stop()


async def test_an_unknown_crash_state_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        env = await start_orchestra(tmp_path, **{"orchestrator.unsafe_crash_after_state": "NOPE"})
        await env.close()


@pytest.mark.parametrize("what", ["stored artifact", "workspace"])
async def test_tampering_between_approval_and_take_off_fails_the_workflow_on_recovery(
    root: Path, what: str
) -> None:
    # The orchestrator stops right after the approval is logged, so that the window between
    # approval and take-off is held open; the tampering happens while it is down.
    gate = root / "gate"
    port = free_port()
    crashing = Up(
        root, port, extra_env={"CABINCREW__ORCHESTRATOR__UNSAFE_CRASH_AFTER_STATE": "APPROVED"}
    )
    step = {
        "id": "step",
        "kind": "engine",
        "engine": {"command": script(root / "engines", RECORDING_ENGINE, "gate.py", False)},
        "config": {
            "gate_dir": str(gate),
            "block": "none",
            "path": ".github/workflows/deploy.yml",
            "content": "applied\n",
        },
    }
    request = orchestrator_pb2.SubmitWorkflowRequest(
        definition=orchestrator_pb2.WorkflowDefinition(text=definition([step])),
        workspace_source=str(root / "source"),
        request_id=f"tamper-{what}",
    )
    await crashing.start()
    async with crashing.channel() as channel:
        submitted = await OrchestratorClient(channel).submit(request)
    workflow_id = submitted.workflow_id
    # Made when the workflow starts (the submit answer may come before it has one).
    workspace = root / "data" / "orchestrator" / "workspaces" / workflow_id
    with contextlib.suppress(RPCError, AssertionError):  # the crash may cut the call short
        await approve(crashing, workflow_id)
    assert crashing.process is not None
    async with asyncio.timeout(START_SECONDS):
        assert await crashing.process.wait() == -signal.SIGKILL
    await crashing.stop()

    if what == "stored artifact":
        objects = [
            p for p in (root / "data" / "orchestrator" / "artifacts").rglob("*") if p.is_file()
        ]
        assert objects
        for path in objects:
            path.chmod(0o644)
            path.write_bytes(path.read_bytes() + b"# tampered\n")
    else:
        assert (workspace / "README.md").is_file()
        (workspace / "tampered.txt").write_text("changed after the approval\n")

    up = Up(root, port)
    await up.start()
    try:
        done = await watch_until(up, workflow_id, lambda w: w.state in TERMINAL)
        assert done.state == common_pb2.WORKFLOW_STATE_FAILED
        assert ("no longer matches" if what == "stored artifact" else "workspace") in done.error
        assert not runs(gate, "take-off")
        # The live tail: the event follows the failure through the emitter's outbox.
        integrity: list[common_pb2.AuditEvent] = []
        async with asyncio.timeout(30), up.channel("auditor", ("admin",)) as channel:
            tail = audit_pb2.TailEventsRequest(
                from_sequence=0,
                filter=audit_pb2.EventFilter(
                    workflow_id=workflow_id, event_type="orchestrator.integrity_failed"
                ),
            )
            async for item in AuditClient(channel).tail(tail):
                integrity.append(item.entry.event)
                break
        events = integrity
        assert events[0].severity == common_pb2.EVENT_SEVERITY_CRITICAL
    finally:
        await up.stop()
