"""Crash matrix: SIGKILL a real ``cabincrew up`` in each phase of a workflow, start it again.

Checks: a flight-plan cut off is redone from an empty artifacts dir; a pending approval
survives; a take-off cut off is never re-run without an operator (unless the engine said its
take-off is idempotent); the workflow ends correctly; and no audit event that the audit
service had acknowledged before the crash is lost, while every logged transition ends up in
the audit trail. The deterministic kill after each state is in ``test_crash_matrix.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from cabincrew.clients import (
    ApprovalClient,
    AuditClient,
    ChannelOptions,
    OrchestratorClient,
    PreflightClient,
    RPCError,
    open_channel,
)
from cabincrew.v1 import audit_pb2, common_pb2, orchestrator_pb2
from tests.conftest import BIN, free_port, make_config, token_for
from tests.orchestrator.test_service_support import (
    TERMINAL,
    EngineSignals,
    definition,
    gate_engine,
    make_source,
    step_of,
)

COMPLETED = common_pb2.WORKFLOW_STATE_COMPLETED
START_SECONDS = 90.0


@dataclass
class Up:
    """One ``cabincrew up`` process on a fixed port and data dir; its output is kept."""

    root: Path
    port: int
    extra_env: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    output: list[str] = field(default_factory=list)
    _drain: asyncio.Task[None] | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def token(self, principal: str, roles: list[str]) -> str:
        config = make_config(self.data_dir)
        return token_for(config, principal, roles)

    async def start(self) -> None:
        """Start and wait (bounded) for the line that says it listens."""
        self.process = await asyncio.create_subprocess_exec(
            str(BIN / "cabincrew"),
            "up",
            "--addr",
            f"127.0.0.1:{self.port}",
            "--data-dir",
            str(self.data_dir),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "CABINCREW__ORCHESTRATOR__LEASE_SECONDS": "3", **self.extra_env},
        )
        listening = asyncio.Event()
        self._drain = asyncio.create_task(self._read(self.process, listening))
        try:
            async with asyncio.timeout(START_SECONDS):
                await listening.wait()
        except TimeoutError:
            raise AssertionError("cabincrew up did not start:\n" + "".join(self.output)) from None

    async def _read(self, process: asyncio.subprocess.Process, listening: asyncio.Event) -> None:
        # Keeps draining the pipe so that the server never blocks on its own logs.
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode("utf-8", "replace")
            self.output.append(line)
            if "listening on" in line:
                listening.set()

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self._reap()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop in time."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await self.process.wait()
            except TimeoutError:
                self.process.send_signal(signal.SIGKILL)
        await self._reap()

    async def _reap(self) -> None:
        if self.process is not None:
            await self.process.wait()
        if self._drain is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain

    def channel(
        self, principal: str = "olivia", roles: tuple[str, ...] = ("operator",)
    ) -> grpc.aio.Channel:
        return open_channel(
            ChannelOptions(f"127.0.0.1:{self.port}", self.token(principal, list(roles)))
        )


@pytest.fixture
async def up(tmp_path: Path) -> AsyncIterator[Up]:
    """A started ``cabincrew up`` (skips when PreflightService does not answer)."""
    server = Up(tmp_path, free_port())
    await asyncio.to_thread(make_source, tmp_path)
    await server.start()
    try:
        async with server.channel("probe", ("service",)) as channel:
            # Governance must answer: the crash matrix needs real preflight decisions.
            await PreflightClient(channel, deadline_seconds=10).get_governance()
        yield server
    finally:
        await server.stop()
        for pid_file in (tmp_path / "gate").glob("*.pid"):
            kill_engine(pid_file)


@pytest.fixture
async def signals(tmp_path: Path) -> AsyncIterator[EngineSignals]:
    """The FIFO the gate engines announce their runs on."""
    reader = EngineSignals(tmp_path / "gate")
    try:
        yield reader
    finally:
        await reader.close()


async def watch_until(up: Up, workflow_id: str, predicate: object) -> orchestrator_pb2.Workflow:
    """Watch (reconnecting across restarts) until ``predicate(workflow)`` holds; bounded."""
    async with asyncio.timeout(120), up.channel() as channel:
        client = OrchestratorClient(channel)
        while True:
            try:
                async for update in client.watch(workflow_id):
                    if predicate(update.workflow):  # type: ignore[operator]
                        return update.workflow
                    if update.workflow.state in TERMINAL:
                        raise AssertionError(f"ended first: {update.workflow}")
            except RPCError as exc:
                if exc.status is not grpc.StatusCode.UNAVAILABLE:
                    raise


async def audit_ids(up: Up, workflow_id: str) -> list[str]:
    """Event ids the audit service stored for a workflow."""
    async with up.channel("auditor", ("admin",)) as channel:
        client = AuditClient(channel, deadline_seconds=30)
        request = audit_pb2.QueryEventsRequest(
            filter=audit_pb2.EventFilter(workflow_id=workflow_id), page_size=1000
        )
        return [
            entry.event.event_id async for page in client.query(request) for entry in page.entries
        ]


async def submit(
    up: Up, gate_dir: Path, block: str, path: str = "out.txt", **engine: object
) -> str:
    step = {
        "id": "step",
        "kind": "engine",
        "engine": {"command": gate_engine(up.root / "engines"), **engine},
        "config": {"gate_dir": str(gate_dir), "block": block, "path": path, "content": "applied\n"},
    }
    async with up.channel() as channel:
        workflow = await OrchestratorClient(channel).submit(
            orchestrator_pb2.SubmitWorkflowRequest(
                definition=orchestrator_pb2.WorkflowDefinition(text=definition([step])),
                workspace_source=str(up.root / "source"),
            )
        )
    return workflow.workflow_id


def kill_engine(pid_file: Path) -> None:
    """The engine outlives the SIGKILLed server (its own session): end it like a reboot would."""
    with contextlib.suppress(ProcessLookupError, ValueError):
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)


async def all_transitions_audited(up: Up, workflow_id: str, before_crash: list[str]) -> None:
    """Acknowledged events survived, and every log entry's event reached the trail."""
    async with up.channel() as channel:
        timeline = await OrchestratorClient(channel).timeline(workflow_id)
    wanted = {f"orch-{workflow_id}-{n}" for n in range(1, len(timeline.entries) + 1)}
    stored: list[str] = []
    async with asyncio.timeout(60), up.channel("auditor", ("admin",)) as channel:
        # The live tail from the start of the log: recovery may still be re-emitting.
        request = audit_pb2.TailEventsRequest(
            from_sequence=0, filter=audit_pb2.EventFilter(workflow_id=workflow_id)
        )
        async for item in AuditClient(channel).tail(request):
            stored.append(item.entry.event.event_id)
            if wanted <= set(stored):
                break
    assert set(before_crash) <= set(stored)
    assert len(stored) == len(set(stored))


async def test_a_flight_plan_cut_off_by_a_crash_is_redone(up: Up, signals: EngineSignals) -> None:
    gate = up.root / "gate"
    workflow_id = await submit(up, gate, block="flight-plan")
    await signals.wait("flight-plan.1")
    before = await audit_ids(up, workflow_id)
    await up.kill()
    kill_engine(gate / "flight-plan.1.pid")
    await up.start()
    await signals.wait("flight-plan.2")  # the plan is made again, from scratch
    (gate / "flight-plan.release").touch()
    done = await watch_until(up, workflow_id, lambda w: w.state in TERMINAL)
    assert done.state == COMPLETED, done.error
    assert (Path(done.workspace) / "out.txt").read_text() == "applied\n"
    assert step_of(done, "step").attempts == 2
    await all_transitions_audited(up, workflow_id, before)


async def test_a_pending_approval_survives_a_crash(up: Up, signals: EngineSignals) -> None:
    gate = up.root / "gate"
    workflow_id = await submit(up, gate, block="none", path=".github/workflows/deploy.yml")
    waiting = await watch_until(
        up, workflow_id, lambda w: w.state == common_pb2.WORKFLOW_STATE_AWAITING_APPROVAL
    )
    approval_id = step_of(waiting, "step").approval_id
    before = await audit_ids(up, workflow_id)
    await up.kill()
    await up.start()
    async with up.channel("alice", ("admin",)) as channel:
        approvals = ApprovalClient(channel)
        approval = await approvals.get(approval_id)
        assert approval.state == 1  # still pending
        await approvals.respond(approval_id, approval.subject_hash, True, "after the crash")
    done = await watch_until(up, workflow_id, lambda w: w.state in TERMINAL)
    assert done.state == COMPLETED, done.error
    assert "flight-plan.2" not in signals.seen()  # the plan was not made again
    await all_transitions_audited(up, workflow_id, before)


async def test_a_take_off_cut_off_by_a_crash_waits_for_an_operator(
    up: Up, signals: EngineSignals
) -> None:
    gate = up.root / "gate"
    workflow_id = await submit(up, gate, block="take-off")
    await signals.wait("take-off.1")
    before = await audit_ids(up, workflow_id)
    await up.kill()
    kill_engine(gate / "take-off.1.pid")
    await up.start()
    interrupted = await watch_until(
        up, workflow_id, lambda w: w.state == common_pb2.WORKFLOW_STATE_TAKEOFF_INTERRUPTED
    )
    assert "take-off.2" not in signals.seen()  # never re-run silently
    async with up.channel() as channel:
        client = OrchestratorClient(channel)
        with pytest.raises(RPCError) as caught:
            await client.resume(workflow_id, retry_takeoff=False)
        assert caught.value.status is grpc.StatusCode.FAILED_PRECONDITION
        await client.resume(workflow_id, retry_takeoff=True)
    await signals.wait("take-off.2")
    (gate / "take-off.release").touch()
    done = await watch_until(up, workflow_id, lambda w: w.state in TERMINAL)
    assert done.state == COMPLETED, done.error
    assert (Path(interrupted.workspace) / "out.txt").read_text() == "applied\n"
    await all_transitions_audited(up, workflow_id, before)


async def test_an_idempotent_take_off_is_re_run_after_a_crash(
    up: Up, signals: EngineSignals
) -> None:
    gate = up.root / "gate"
    workflow_id = await submit(up, gate, block="take-off", idempotent_takeoff=True)
    await signals.wait("take-off.1")
    await up.kill()
    kill_engine(gate / "take-off.1.pid")
    (gate / "take-off.release").touch()
    await up.start()
    done = await watch_until(up, workflow_id, lambda w: w.state in TERMINAL)
    assert done.state == COMPLETED, done.error
    await signals.wait("take-off.2")
