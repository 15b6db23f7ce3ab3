"""Orchestrator: governance overhead per engine step, and workflows per second.

1. Overhead: one single-step workflow with the shipped noop engine, end to end (submit, then
   watch until COMPLETED: workspace copy, flight-plan, artifact validation and store,
   plan-token, preflight, integrity check, take-off, post-execution check, every transition
   in the log and the audit outbox), minus the time of the same engine run twice directly
   (flight-plan and take-off with ``run_engine``), measured in the same run and interleaved.
   p50 and p95 over ``--samples`` workflows, one at a time.
2. Throughput: workflows/s with the noop engine and ``--workflows`` submissions kept at
   1, 8 and 32 in flight, all services in one process on SQLite (the embedded mode).
3. One process per service (``--topology``, default ``both``): the same overhead and
   throughput with audit, preflight, approval and the orchestrator each in a process of its
   own, as a deployment runs them (SQLite, its own data dir and copies of the same keys per
   process). One Python process runs its Python code on one core at a time (the GIL), so the
   embedded mode cannot use a second core however many requests wait; this one can.
4. Scale-out (with ``--postgres URL`` or CABINCREW_TEST_POSTGRES_URL): the same with one and
   with two orchestrator processes on PostgreSQL, the other services in this process;
   submissions alternate between the replicas. The ratio says what a second replica adds.

Usage: ``python bench/orchestrator.py [--samples 40] [--workflows 200] [--engine python|sh]
[--topology embedded|per-service|both] [--postgres URL]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sqlalchemy  # noqa: E402

from cabincrew.auth import issue_token  # noqa: E402
from cabincrew.clients import ChannelOptions, OrchestratorClient, open_channel  # noqa: E402
from cabincrew.config import Config, load_config  # noqa: E402
from cabincrew.runtime import create_server  # noqa: E402
from cabincrew.signing import Ed25519Signer  # noqa: E402
from cabincrew.v1 import common_pb2, orchestrator_pb2  # noqa: E402
from orchestrator_svc.runner import Mode, RunLimits, build_engine_input, run_engine  # noqa: E402
from orchestrator_svc.workflow import EngineSpec  # noqa: E402

# The no-op engines (``--engine``): the shipped Python noop (an interpreter start per launch)
# or its POSIX sh twin (same artifacts, no interpreter): the overhead subtracts the engine
# either way; the throughput depends on which one runs.
ENGINES = {
    "python": [sys.executable, "-I", "-S", str(ROOT / "engines" / "noop" / "engine.py")],
    "sh": [str(ROOT / "engines" / "noop-sh" / "engine.sh")],
}
NOOP = ENGINES["python"]
TERMINAL = {
    common_pb2.WORKFLOW_STATE_COMPLETED,
    common_pb2.WORKFLOW_STATE_FAILED,
    common_pb2.WORKFLOW_STATE_CANCELLED,
}


def definition(command: list[str]) -> str:
    """The one-step benchmark workflow around ``command``."""
    step = {"id": "noop", "kind": "engine", "engine": {"command": command}}
    return json.dumps({"id": "bench", "steps": [step]})


DEFINITION = definition(NOOP)
SERVICES = ["audit", "preflight", "approval", "orchestrator"]
LAUNCHER = """
import asyncio, functools, json, sys
from cabincrew.config import load_config
from cabincrew.runtime.server import serve, service_factories
from orchestrator_svc.server import build
config = load_config(None, environ={}, overrides=json.loads(sys.argv[1]))
factories = service_factories()
if sys.argv[2]:
    factories["orchestrator"] = functools.partial(build, schema=sys.argv[2])
asyncio.run(serve(config, factories, ready=lambda s: print("listening on", s.port, flush=True)))
"""


def config_for(data: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {"data_dir": str(data), "server.addr": "127.0.0.1:0", **overrides}
    values.setdefault("services", SERVICES)
    values.setdefault("preflight.load_models", False)
    return load_config(None, environ={}, overrides=values)


def client_for(config: Config, port: int) -> OrchestratorClient:
    token = issue_token(
        Ed25519Signer.load_or_create(config.auth_key_path()),
        "bench",
        ["operator"],
        ttl_seconds=3600,
    )
    channel = open_channel(ChannelOptions(f"127.0.0.1:{port}", token))
    return OrchestratorClient(channel, deadline_seconds=60)


async def one_workflow(client: OrchestratorClient, source: str) -> float:
    """Submit and watch to the end; seconds."""
    started = time.perf_counter()
    workflow = await client.submit(
        orchestrator_pb2.SubmitWorkflowRequest(
            definition=orchestrator_pb2.WorkflowDefinition(text=DEFINITION),
            workspace_source=source,
        )
    )
    async for update in client.watch(workflow.workflow_id):
        if update.workflow.state in TERMINAL:
            if update.workflow.state != common_pb2.WORKFLOW_STATE_COMPLETED:
                raise SystemExit(f"benchmark workflow failed: {update.workflow.error}")
            break
    return time.perf_counter() - started


async def direct_engine_runs(root: Path, index: int) -> float:
    """The same engine, flight-plan then take-off, with the runner alone; seconds."""
    spec = EngineSpec(tuple(NOOP))
    workspace = root / "direct" / "ws"
    workspace.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for mode in (Mode.FLIGHT_PLAN, Mode.TAKE_OFF):
        engine_input = build_engine_input(
            mode=mode,
            workflow_id="bench",
            step_id="noop",
            expected_plan_token="0" * 64 if mode is Mode.TAKE_OFF else None,
        )
        run = await run_engine(
            spec,
            mode,
            engine_input,
            workspace=workspace,
            artifacts_dir=root / "direct" / f"a{index}",
            temp_dir=root / "direct" / f"t{index}",
            log_path=root / "direct-logs" / f"{index}.log",
            limits=RunLimits(timeout_seconds=60),
        )
        if not run.ok:
            raise SystemExit(f"direct engine run failed: {run.failure}")
    return time.perf_counter() - started


async def throughput(
    clients: list[OrchestratorClient], source: str, total: int, width: int
) -> float:
    """Workflows per second with ``width`` in flight."""
    queue = iter(range(total))

    async def worker(offset: int) -> None:
        for index in queue:
            await one_workflow(clients[(index + offset) % len(clients)], source)

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(width)))
    return total / (time.perf_counter() - started)


def cpu_seconds() -> tuple[float, float]:
    """CPU time used so far by this process (all its threads) and by its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def overhead(client: OrchestratorClient, root: Path, source: Path, samples: int) -> None:
    """Workflows one at a time against the same engine run directly, interleaved."""
    for _ in range(3):  # warm-up: imports, first connections, caches
        await one_workflow(client, str(source))
        await direct_engine_runs(root, 0)
    overheads, whole, direct = [], [], []
    for index in range(samples):
        workflow_seconds = await one_workflow(client, str(source))
        engine_seconds = await direct_engine_runs(root, index)
        whole.append(workflow_seconds)
        direct.append(engine_seconds)
        overheads.append(workflow_seconds - engine_seconds)
    print(f"overhead per engine step (noop engine, {samples} workflows, one at a time):")
    print(
        f"  workflow end to end p50 {statistics.median(whole) * 1000:.1f} ms; "
        f"engine run twice directly p50 {statistics.median(direct) * 1000:.1f} ms"
    )
    print(
        f"  governance overhead p50 {statistics.median(overheads) * 1000:.1f} ms, "
        f"p95 {percentile(overheads, 0.95) * 1000:.1f} ms (goal: p50 <= 30 ms)"
    )


async def embedded(root: Path, samples: int, total: int, widths: list[int]) -> None:
    source = root / "source"
    config = config_for(root / "data", **{"orchestrator.max_running_workflows": 64})
    server, port = await create_server(config)
    await server.start()
    client = client_for(config, port)
    print("## embedded: all services in this process (SQLite), noop engine")
    try:
        await overhead(client, root, source, samples)
        for width in widths:
            own, children = cpu_seconds()
            rate = await throughput([client], str(source), total, width)
            own_after, children_after = cpu_seconds()
            # CPU per workflow is steadier than the rate on cores shared with other work.
            print(
                f"concurrency {width:>2}: {rate:.1f} workflows/s ({total} workflows; "
                f"CPU per workflow: services {(own_after - own) / total * 1000:.0f} ms, "
                f"engines {(children_after - children) / total * 1000:.0f} ms; "
                f"load average {os.getloadavg()[0]:.2f})"
            )
    finally:
        await client.aclose()
        await server.stop(0)


def free_address() -> str:
    """A loopback address whose port was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def process_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` and of the children it waited for (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


async def per_service(root: Path, samples: int, total: int, widths: list[int]) -> None:
    source = root / "source"
    config = config_for(root / "client")
    keys = root / "service-keys"
    keys.mkdir()
    Ed25519Signer.load_or_create(config.auth_key_path())
    shutil.copy(config.auth_key_path(), keys / "auth.key")
    Ed25519Signer.load_or_create(keys / "orchestrator.key")
    addresses = {service: free_address() for service in SERVICES}
    processes: dict[str, asyncio.subprocess.Process] = {}
    print("## one process per service (SQLite, a data dir each), noop engine")
    try:
        for service in SERVICES:  # the orchestrator last: it calls the others
            overrides = {
                "data_dir": str(root / f"svc-{service}"),
                "services": [service],
                "server.addr": addresses[service],
                "preflight.load_models": False,
                "orchestrator.max_running_workflows": 64,
                "clients.addresses": {k: v for k, v in addresses.items() if k != service},
            }
            processes[service], _ = await launch(overrides, "", keys)
        client = client_for(config, int(addresses["orchestrator"].rsplit(":", 1)[1]))
        try:
            await overhead(client, root, source, samples)
            for width in widths:
                before = {name: process_cpu(p.pid) for name, p in processes.items()}
                rate = await throughput([client], str(source), total, width)
                used = {
                    name: (process_cpu(p.pid) - before[name]) / total * 1000
                    for name, p in processes.items()
                }
                shares = ", ".join(f"{name} {ms:.0f} ms" for name, ms in used.items())
                print(
                    f"concurrency {width:>2}: {rate:.1f} workflows/s ({total} workflows; "
                    f"CPU per workflow: {shares} (orchestrator with its engines); "
                    f"load average {os.getloadavg()[0]:.2f})"
                )
        finally:
            await client.aclose()
    finally:
        for process in processes.values():
            process.terminate()
            await process.wait()


def copy_keys(keys: Path, target: Path) -> None:
    """What a deployment mounts into every replica: the same signing keys."""
    target.mkdir(parents=True)
    for key in keys.iterdir():
        shutil.copy(key, target / key.name)


async def launch(
    overrides: dict[str, Any], schema: str, keys: Path
) -> tuple[asyncio.subprocess.Process, int]:
    """A ``serve`` process with ``overrides`` and copies of ``keys``; its port."""
    await asyncio.to_thread(copy_keys, keys, Path(overrides["data_dir"]) / "keys")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LAUNCHER,
        json.dumps(overrides),
        schema,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 120)
    if not line:
        raise SystemExit(f"a service process did not start: {overrides['services']}")
    return process, int(line.split()[-1])


async def replica(
    data: Path, keys: Path, url: str, schema: str, address: str, workspaces: Path
) -> tuple[asyncio.subprocess.Process, int]:
    overrides = {
        "data_dir": str(data),
        "services": ["orchestrator"],
        "server.addr": "127.0.0.1:0",
        "database.url": url,
        "orchestrator.workspaces_dir": str(workspaces),
        "orchestrator.max_running_workflows": 64,
        "clients.addresses": {"audit": address, "preflight": address, "approval": address},
    }
    return await launch(overrides, schema, keys)


async def scale_out(root: Path, url: str, total: int, width: int) -> None:
    source = root / "source"
    config = config_for(
        root / "shared",
        services=["audit", "preflight", "approval"],
        **{"server.addr": "127.0.0.1:0"},
    )
    server, port = await create_server(config)
    await server.start()
    keys = root / "keys"
    keys.mkdir()
    shutil.copy(config.auth_key_path(), keys / "auth.key")
    Ed25519Signer.load_or_create(keys / "orchestrator.key")
    print(f"## scale-out on PostgreSQL, noop engine, concurrency {width}")
    rates = []
    try:
        for count in (1, 2):
            schema = f"bench_orch_{uuid.uuid4().hex[:10]}"
            processes = []
            clients = []
            try:
                for index in range(count):
                    process, replica_port = await replica(
                        root / f"r{count}-{index}",
                        keys,
                        url,
                        schema,
                        f"127.0.0.1:{port}",
                        root / f"workspaces-{count}",
                    )
                    processes.append(process)
                    clients.append(client_for(config, replica_port))
                await one_workflow(clients[0], str(source))
                rate = await throughput(clients, str(source), total, width)
                rates.append(rate)
                print(f"{count} orchestrator process(es): {rate:.1f} workflows/s")
            finally:
                for item in clients:
                    await item.aclose()
                for process in processes:
                    process.terminate()
                    await process.wait()
                engine = sqlalchemy.create_engine(url)
                with engine.begin() as conn:
                    conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                engine.dispose()
        print(f"two / one: {rates[1] / rates[0]:.2f}")
    finally:
        await server.stop(0)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--workflows", type=int, default=200)
    parser.add_argument("--widths", default="1,8,32")
    parser.add_argument("--postgres", default=os.environ.get("CABINCREW_TEST_POSTGRES_URL", ""))
    parser.add_argument("--engine", choices=sorted(ENGINES), default="python")
    parser.add_argument("--topology", choices=["embedded", "per-service", "both"], default="both")
    args = parser.parse_args()
    global NOOP, DEFINITION
    NOOP = ENGINES[args.engine]
    DEFINITION = definition(NOOP)
    widths = [int(w) for w in args.widths.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as folder:
        root = Path(folder)
        print(f"cpus: {os.cpu_count()}; python {sys.version.split()[0]}; engine {args.engine}")
        print(f"load average at start: {os.getloadavg()[0]:.2f}")
        source = root / "source"
        source.mkdir()
        (source / "README.md").write_text("bench\n")
        if args.topology in ("embedded", "both"):
            await embedded(root, args.samples, args.workflows, widths)
        if args.topology in ("per-service", "both"):
            await per_service(root, args.samples, args.workflows, widths)
        if args.postgres:
            await scale_out(root, args.postgres, args.workflows, max(widths))
        else:
            print("## scale-out skipped (no --postgres URL)")


if __name__ == "__main__":
    asyncio.run(main())
