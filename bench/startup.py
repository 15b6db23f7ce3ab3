"""Start-up: time from launching ``cabincrew up`` to all six services SERVING.

Each run starts ``cabincrew up`` on a fresh data dir in a subprocess and polls the standard
gRPC health service of every CabinCrew service (every 20 ms) until all six answer SERVING;
the clock runs from the spawn to the last SERVING. A second, warm run on the same data dir
shows the start of a machine that has run before (keys and databases exist).

Baseline, in the same invocation: a bare ``grpc.aio`` server in a subprocess that serves
only the health service, timed the same way; the difference is what CabinCrew's own
start-up adds (imports, databases and migrations, policy compilation, ONNX sessions).

Usage: ``python bench/startup.py [--runs 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
CABINCREW = Path(sys.executable).parent / "cabincrew"
SERVICES = [
    "cabincrew.v1.AuditService",
    "cabincrew.v1.PreflightService",
    "cabincrew.v1.ApprovalService",
    "cabincrew.v1.OrchestratorService",
    "cabincrew.v1.McpGatewayService",
    "cabincrew.v1.LlmGatewayService",
]
BARE = """
import asyncio, sys, grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
async def main():
    server = grpc.aio.server()
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(sys.argv[1])
    await server.start()
    servicer.set("bare", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _until_serving(address: str, names: list[str], limit: float = 120.0) -> None:
    pending = set(names)
    deadline = time.monotonic() + limit
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while pending:
            if time.monotonic() > deadline:
                raise SystemExit(f"not SERVING after {limit} s: {sorted(pending)}")
            for name in list(pending):
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=1)
                except grpc.aio.AioRpcError:
                    continue
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    pending.discard(name)
            if pending:
                await asyncio.sleep(0.02)


async def _timed(command: list[str], address: str, names: list[str]) -> float:
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("CABINCREW")},
    )
    try:
        await _until_serving(address, names)
        return time.perf_counter() - started
    finally:
        process.terminate()
        await process.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    cold: list[float] = []
    warm: list[float] = []
    bare: list[float] = []
    for _ in range(args.runs):
        data = Path(tempfile.mkdtemp(prefix="cabincrew-startup-"))
        try:
            for series in (cold, warm):
                address = f"127.0.0.1:{free_port()}"
                command = [str(CABINCREW), "up", "--addr", address, "--data-dir", str(data)]
                series.append(await _timed(command, address, SERVICES))
        finally:
            shutil.rmtree(data, ignore_errors=True)
        address = f"127.0.0.1:{free_port()}"
        bare.append(await _timed([sys.executable, "-c", BARE, address], address, ["bare"]))

    def line(label: str, values: list[float]) -> str:
        return (
            f"{label:<52} median {statistics.median(values):6.2f} s  "
            f"(min {min(values):.2f}, max {max(values):.2f})"
        )

    print(f"runs: {args.runs}; load average {os.getloadavg()[0]:.2f}")
    print(line("baseline: bare grpc.aio health server, SERVING", bare))
    print(line("cabincrew up, fresh data dir, all six SERVING", cold))
    print(line("cabincrew up, same data dir again, all six SERVING", warm))
    print(
        f"{'added by CabinCrew over the baseline (fresh / again)':<52} "
        f"{statistics.median(cold) - statistics.median(bare):6.2f} s / "
        f"{statistics.median(warm) - statistics.median(bare):.2f} s"
    )


if __name__ == "__main__":
    asyncio.run(main())
