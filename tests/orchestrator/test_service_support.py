"""Shared pieces of the orchestrator service tests: real servers on port 0, clients, engines.

No tests here. The other ``test_service*``, ``test_crash*`` and ``test_batch*`` modules import
the fixtures and helpers by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from cabincrew.config import Config
from cabincrew.runtime import create_server
from cabincrew.runtime.server import CabinCrewServer, ServiceFactory, service_factories
from cabincrew.v1 import audit_pb2, common_pb2, orchestrator_pb2
from tests.conftest import make_config, token_for
from tests.orchestrator.conftest import ENGINES, PRELUDE

PY = sys.executable
SERVICES = ("audit", "preflight", "approval", "orchestrator")
TERMINAL = {
    common_pb2.WORKFLOW_STATE_COMPLETED,
    common_pb2.WORKFLOW_STATE_FAILED,
    common_pb2.WORKFLOW_STATE_CANCELLED,
}
WAIT_SECONDS = 60.0

# An engine whose runs the test controls: it records each launch in gate_dir and, in the mode
# named by `block`, waits until the file `<mode>.release` appears there. Flight-plan plans to
# write `content` into `path`; take-off writes it.
GATE_ENGINE = PRELUDE + textwrap.dedent(
    """
    import time
    gate = CONFIG["gate_dir"]
    index = REQUEST.get("orchestrator", {}).get("run_index", 0)
    with open(os.path.join(gate, f"{MODE}.{index}.pid"), "w") as handle:
        handle.write(str(os.getpid()))
    try:  # tell the test, through its FIFO, that this run started (no reader: nobody asked)
        fd = os.open(os.path.join(gate, "events"), os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, f"{MODE}.{index}\\n".encode())
        os.close(fd)
    except OSError:
        pass
    if CONFIG.get("block") == MODE:
        while not os.path.exists(os.path.join(gate, f"{MODE}.release")):
            time.sleep(0.02)
    if MODE == "flight-plan":
        body = CONFIG.get("content", "changed\\n").encode()
        document = {"artifact_type": "file", "action": "update", "mime": "text/plain",
                    "target": CONFIG.get("path", "out.txt"), "body_file": "body.data"}
        receipt([artifact("plan", role="state", data=body, document=document)])
    else:
        with open(os.path.join(ARTIFACTS, "plan", "body.data"), "rb") as handle:
            body = handle.read()
        target = os.path.join(os.environ["CABINCREW_WORKSPACE"], CONFIG.get("path", "out.txt"))
        with open(target, "ab") as handle:
            handle.write(body)
        receipt([artifact("applied", role="log", body={"bytes": len(body)})],
                plan_token=REQUEST["expected_plan_token"])
    """
)


class EngineSignals:
    """What gate engines write to the FIFO ``gate_dir/events``, as awaitable lines.

    The FIFO is held open read-write, so engines can always write to it and a reader thread
    hands each line to the event loop: tests wait on events, never poll.
    """

    def __init__(self, gate_dir: Path) -> None:
        gate_dir.mkdir(parents=True, exist_ok=True)
        self.path = gate_dir / "events"
        os.mkfifo(self.path)
        self._fd = os.open(self.path, os.O_RDWR)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._seen: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._fd, 4096)
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line == b"__close__":
                    return
                self._loop.call_soon_threadsafe(self._queue.put_nowait, line.decode())

    async def wait(self, line: str, timeout: float = WAIT_SECONDS) -> None:
        """Wait (bounded) until an engine announced ``line`` (for example ``take-off.1``)."""
        async with asyncio.timeout(timeout):
            while line not in self._seen:
                self._seen.append(await self._queue.get())

    def seen(self) -> list[str]:
        """Lines received so far (without waiting)."""
        while not self._queue.empty():
            self._seen.append(self._queue.get_nowait())
        return list(self._seen)

    async def close(self) -> None:
        """Stop the reader thread and close the FIFO."""
        os.write(self._fd, b"__close__\n")
        await asyncio.to_thread(self._thread.join, 5)
        os.close(self._fd)


def engine(name: str) -> list[str]:
    """The argv of a shipped engine, run isolated by this interpreter."""
    return [PY, "-I", "-S", str(ENGINES / name / "engine.py")]


def script(directory: Path, body: str, name: str = "engine.py", prelude: bool = True) -> list[str]:
    """Write a throwaway engine and return its argv."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text((PRELUDE if prelude else "") + textwrap.dedent(body))
    return [PY, "-I", "-S", str(path)]


def gate_engine(directory: Path) -> list[str]:
    """The controllable engine (see GATE_ENGINE)."""
    return script(directory, GATE_ENGINE, "gate.py", prelude=False)


def definition(steps: Sequence[Mapping[str, Any]], **top: Any) -> str:
    """A workflow definition as JSON text (the YAML loader reads it, with line numbers)."""
    return json.dumps({"id": top.pop("id", "test-flow"), **top, "steps": list(steps)}, indent=1)


def patch_step(
    edits: Sequence[Mapping[str, Any]], step_id: str = "patch", **extra: Any
) -> dict[str, Any]:
    """A file-patch step."""
    return {
        "id": step_id,
        "kind": "engine",
        "engine": {"command": engine("file-patch")},
        "config": {"edits": list(edits)},
        "timeout_seconds": 60,
        **extra,
    }


@dataclass
class Orchestra:
    """A server hosting audit, preflight, approval and orchestrator, and clients for it."""

    server: CabinCrewServer
    port: int
    config: Config
    root: Path
    source: Path
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def token(self, principal: str, roles: Sequence[str]) -> str:
        """A bearer token signed by the data dir's key."""
        return token_for(self.config, principal, list(roles))

    def _channel(self, principal: str, roles: Sequence[str]) -> grpc.aio.Channel:
        channel = open_channel(
            ChannelOptions(f"127.0.0.1:{self.port}", self.token(principal, roles))
        )
        self._channels.append(channel)
        return channel

    def workflows(
        self, principal: str = "olivia", roles: Sequence[str] = ("operator",)
    ) -> OrchestratorClient:
        """An orchestrator client acting as ``principal``."""
        return OrchestratorClient(self._channel(principal, roles), deadline_seconds=20)

    def approvals(
        self, principal: str = "alice", roles: Sequence[str] = ("approver",)
    ) -> ApprovalClient:
        """An approval client acting as ``principal``."""
        return ApprovalClient(self._channel(principal, roles), deadline_seconds=20)

    def audit(self) -> AuditClient:
        """An audit client with every role."""
        return AuditClient(self._channel("auditor", ("admin",)), deadline_seconds=60)

    async def submit(self, text: str, **request: Any) -> orchestrator_pb2.Workflow:
        """Submit a definition (JSON or YAML text)."""
        request.setdefault("workspace_source", str(self.source))
        return await self.workflows().submit(
            orchestrator_pb2.SubmitWorkflowRequest(
                definition=orchestrator_pb2.WorkflowDefinition(text=text, filename="test.yaml"),
                **request,
            )
        )

    async def until(
        self,
        workflow_id: str,
        predicate: Callable[[orchestrator_pb2.Workflow], bool],
        timeout: float = WAIT_SECONDS,
    ) -> orchestrator_pb2.Workflow:
        """Watch until ``predicate`` holds (bounded), and return that workflow."""
        client = self.workflows()
        async with asyncio.timeout(timeout):
            while True:
                last: orchestrator_pb2.Workflow | None = None
                try:
                    async for update in client.watch(workflow_id):
                        last = update.workflow
                        if predicate(last):
                            return last
                except RPCError as exc:
                    if exc.status is not grpc.StatusCode.UNAVAILABLE:
                        raise
                if last is not None and last.state in TERMINAL:
                    raise AssertionError(f"workflow ended as {last.state} first: {last.error}")

    async def finish(self, workflow_id: str) -> orchestrator_pb2.Workflow:
        """Wait for the end of a workflow."""
        return await self.until(workflow_id, lambda w: w.state in TERMINAL)

    async def audit_events(self, workflow_id: str) -> list[common_pb2.AuditEvent]:
        """Every stored audit event of a workflow, once this process's outbox is drained."""
        emitter = self.server.context.shared.get("emitter:orchestrator")
        if emitter is not None:
            assert await emitter.wait_drained(30)
        events = []
        request = audit_pb2.QueryEventsRequest(
            filter=audit_pb2.EventFilter(workflow_id=workflow_id), page_size=1000
        )
        async for page in self.audit().query(request):
            events.extend(entry.event for entry in page.entries)
        return events

    async def governance_wired(self) -> bool:
        """Whether PreflightService answers (it is being built in parallel)."""
        client = PreflightClient(self._channel("probe", ("service",)), deadline_seconds=10)
        try:
            await client.get_governance()
        except RPCError as exc:
            if exc.status is grpc.StatusCode.UNIMPLEMENTED:
                return False
            raise
        return True

    async def close(self) -> None:
        """Close clients, then the server."""
        for channel in self._channels:
            await channel.close()
        await self.server.stop(0)


def make_source(root: Path) -> Path:
    """A workspace source folder with a few files."""
    source = root / "source"
    (source / "docs").mkdir(parents=True)
    (source / "README.md").write_text("hello world\n")
    (source / "docs" / "guide.md").write_text("line 1\nline 2\n")
    (source / ".env").write_text("DEBUG=1\n")
    (source / ".github" / "workflows").mkdir(parents=True)
    (source / ".github" / "workflows" / "ci.yml").write_text("on: push\n")
    return source


async def start_orchestra(
    root: Path,
    *,
    data_dir: Path | None = None,
    orchestrator: ServiceFactory | None = None,
    services: tuple[str, ...] = SERVICES,
    **overrides: Any,
) -> Orchestra:
    """Start the four services on an ephemeral port (state in ``root/data``)."""
    data = data_dir or root / "data"
    config = make_config(data, services=services, **overrides)
    factories = service_factories()
    if orchestrator is not None:
        factories["orchestrator"] = orchestrator
    server, port = await create_server(config, factories)
    await server.start()
    source = root / "source"
    if not await asyncio.to_thread(source.exists):
        await asyncio.to_thread(make_source, root)
    return Orchestra(server, port, config, root, source)


@pytest.fixture
async def orchestra(tmp_path: Path) -> AsyncIterator[Orchestra]:
    """A running server; closed after the test."""
    env = await start_orchestra(tmp_path)
    try:
        yield env
    finally:
        await env.close()


@pytest.fixture
async def governed(orchestra: Orchestra) -> Orchestra:
    """The running server, once PreflightService is known to answer."""
    assert await orchestra.governance_wired(), "PreflightService answers UNIMPLEMENTED"
    return orchestra


def step_of(workflow: orchestrator_pb2.Workflow, step_id: str) -> orchestrator_pb2.StepStatus:
    """One step of a workflow message."""
    return next(step for step in workflow.steps if step.step_id == step_id)


def state_name(value: int) -> str:
    """A WorkflowState value's short name."""
    return common_pb2.WorkflowState.Name(value).removeprefix("WORKFLOW_STATE_")  # type: ignore[arg-type]


# Packages that allow everything in the gateway domains: a bundle must govern every domain.
_ALLOW_ALL = (
    'package cabincrew.{domain}.allow_all\n\nimport rego.v1\n\ndefault decision := "allow"\n'
)


def write_bundle(directory: Path, preflight: Mapping[str, str]) -> Path:
    """A policy bundle whose preflight domain holds ``preflight`` (package name -> Rego body).

    Each body is written after ``package cabincrew.preflight.<name>`` and ``import rego.v1``;
    the MCP and LLM domains allow everything.
    """
    for domain in ("mcp", "llm"):
        (directory / domain).mkdir(parents=True, exist_ok=True)
        (directory / domain / "allow_all.rego").write_text(_ALLOW_ALL.format(domain=domain))
    (directory / "preflight").mkdir(parents=True, exist_ok=True)
    for name, body in preflight.items():
        header = f"package cabincrew.preflight.{name}\n\nimport rego.v1\n\n"
        (directory / "preflight" / f"{name}.rego").write_text(header + textwrap.dedent(body))
    return directory


@contextlib.asynccontextmanager
async def serving_bundle(tmp_path: Path, preflight: Mapping[str, str]) -> AsyncIterator[Orchestra]:
    """A running server whose preflight policies are only ``preflight`` (see write_bundle)."""
    bundle = write_bundle(tmp_path / "bundle", preflight)
    env = await start_orchestra(
        tmp_path, **{"preflight.policy_dirs": [str(bundle)], "preflight.load_models": False}
    )
    try:
        assert await env.governance_wired(), "PreflightService answers UNIMPLEMENTED"
        yield env
    finally:
        await env.close()
