"""Preflight latency and throughput over loopback gRPC, against baselines in the same run.

1. ``Evaluate`` with the policies alone (``preflight.load_models=false``): p50/p99 of one
   request at a time (with the preflight process's CPU per request over the same loop),
   and decisions/s with several in flight. Once with the audit event
   made durable before the answer (the default) and once written after it, so that the
   cost of the fsync is visible.
2. The same with the default models (``models/build``) as well: OPA + ONNX.
3. ``Classify`` texts/s through the service (several clients, micro-batched by the
   service) against the same ONNX file run directly with onnxruntime in this process at its
   best batch size, with the same windowing. Goal: ratio ≥ 0.8.

The service runs alone in a subprocess (``python -m preflight_svc``), sending its audit
events to an audit service in another one, so that client and server do not share an
interpreter. The direct baseline runs in this process while the service is idle, in rounds
alternating with the service so that a change of load on the machine hits both; the ratio
is the median over the rounds. One artifact per request: a unified diff of a small Python
file (about 1 KiB). A fourth part times each server-side stage of an OPA-only ``Evaluate``
in process.

Usage: ``python bench/preflight.py [--requests 2000] [--concurrency 8] [--texts 4096]
[--provider cpu|cuda] [--model prompt-injection] [--opa-only]``
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cabincrew.auth import issue_token  # noqa: E402
from cabincrew.clients import ChannelOptions, PreflightClient, open_channel  # noqa: E402
from cabincrew.signing import Ed25519Signer  # noqa: E402
from cabincrew.v1 import common_pb2, preflight_pb2  # noqa: E402
from preflight_svc.onnx_manifest import load_manifest, normalise_text, window_input  # noqa: E402
from preflight_svc.onnx_models import CPU, CUDA, char_windows  # noqa: E402

MODELS = ROOT / "models" / "build"

DIFF = "".join(
    [
        "--- a/src/app/handlers.py\n+++ b/src/app/handlers.py\n@@ -1,18 +1,20 @@\n",
        " import logging\n import json\n\n log = logging.getLogger(__name__)\n\n",
        *(f" def handler_{i}(event):\n     return json.dumps(event)\n\n" for i in range(6)),
        "-def handle(request):\n-    return handler_0(request)\n",
        "+def handle(request, context=None):\n+    log.info('handling %s', request)\n",
        "+    return handler_0(request)\n",
    ]
)


class Server:
    """``python -m <module>`` in a subprocess; preflight sends its audit events to ``audit``."""

    def __init__(
        self, data_dir: Path, module: str = "preflight_svc", audit: int = 0, **settings: str
    ) -> None:
        env = {
            **os.environ,
            "CABINCREW_ADDR": "127.0.0.1:0",
            "CABINCREW_DATA_DIR": str(data_dir),
            "CABINCREW__LOG_LEVEL": "warning",
            **{f"CABINCREW__PREFLIGHT__{k.upper()}": v for k, v in settings.items()},
        }
        if audit:
            env["CABINCREW__CLIENTS__ADDRESSES__AUDIT"] = f"127.0.0.1:{audit}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        text = ""
        for line in self.process.stdout:
            text += line
            found = re.search(r"127\.0\.0\.1:(\d+)", text)
            if found:
                self.port = int(found.group(1))
                break
        else:
            raise RuntimeError(f"{module} did not start")
        signer = Ed25519Signer.load_or_create(data_dir / "keys" / "auth.key")
        self.token = issue_token(signer, "bench", ["operator"], ttl_seconds=3600)

    def client(self) -> PreflightClient:
        options = ChannelOptions(address=f"127.0.0.1:{self.port}", token=self.token)
        return PreflightClient(open_channel(options), deadline_seconds=60, max_attempts=1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        assert self.process.stdout is not None
        self.process.stdout.close()


def evaluate_request(skip_models: bool) -> preflight_pb2.EvaluateRequest:
    """One step with one diff artifact, as the orchestrator sends it."""
    body = DIFF.encode()
    request = preflight_pb2.EvaluateRequest(
        workflow_id="wf-bench",
        step_id="patch",
        mode=common_pb2.MODE_FLIGHT_PLAN,
        receipt=common_pb2.EngineOutput(
            protocol_version="1",
            engine_id="cabincrew.file-patch",
            mode=common_pb2.MODE_FLIGHT_PLAN,
            receipt_id="r-bench",
            status="success",
        ),
        context=preflight_pb2.EvaluationContext(
            environment="staging", repository="acme/app", workspace_root="/ws", requester="bench"
        ),
        options=preflight_pb2.GovernanceOptions(skip_models=skip_models),
        request_id="bench",
    )
    item = request.artifacts.add()
    item.descriptor.CopyFrom(
        common_pb2.EngineArtifact(
            name="edit-000-handlers.py",
            role="evidence",
            path="edit-000-handlers.py",
            hash=hashlib.sha256(body).hexdigest(),
            size=len(body),
        )
    )
    item.artifact.CopyFrom(
        common_pb2.Artifact(
            artifact_type="diff",
            action="update",
            target="src/app/handlers.py",
            mime="text/x-diff",
            body_file="body.data",
        )
    )
    item.body = body
    return request


async def measure_evaluate(
    server: Server, request: preflight_pb2.EvaluateRequest, count: int, concurrency: int
) -> dict[str, float]:
    """p50/p99 one at a time, then decisions/s with ``concurrency`` in flight."""
    client = server.client()
    try:
        first = (await client.evaluate(request)).result
        for _ in range(min(200, count // 5)):
            await client.evaluate(request)
        latencies = []
        cpu_before = process_cpu_seconds(server.process.pid)
        for _ in range(count):
            started = time.perf_counter()
            await client.evaluate(request)
            latencies.append(time.perf_counter() - started)
        server_cpu_ms = (process_cpu_seconds(server.process.pid) - cpu_before) * 1000 / count
        latencies.sort()
        per_worker = max(1, count // concurrency)

        async def worker() -> None:
            for _ in range(per_worker):
                await client.evaluate(request)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await client.aclose()
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "decisions_per_s": per_worker * concurrency / elapsed,
        "server_cpu_ms": server_cpu_ms,
        "evaluations": float(len(first.evaluations)),
        "decision": float(first.decision),
    }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (Linux /proc; NaN elsewhere).

    The server's CPU per request moves much less than latency with what else the machine
    runs (contention still inflates it somewhat), so it is the steadier figure to compare
    across runs on shared cores.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_bare_rpc(server: Server, count: int) -> float:
    """p50 of a health check: one loopback round trip with no work behind it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    client = server.client()
    stub = health_pb2_grpc.HealthStub(client.channel)
    request = health_pb2.HealthCheckRequest(service="cabincrew.v1.PreflightService")
    try:
        for _ in range(200):
            await stub.Check(request, timeout=10)
        latencies = []
        for _ in range(count):
            started = time.perf_counter()
            await stub.Check(request, timeout=10)
            latencies.append(time.perf_counter() - started)
    finally:
        await client.aclose()
    return statistics.median(latencies) * 1000


async def measure_classify(
    server: Server, model: str, texts: Sequence[str], clients: int, per_request: int
) -> float:
    """texts/s through Classify with ``clients`` concurrent callers."""
    client = server.client()
    try:
        await client.classify(model, list(texts[:per_request]))
        chunks = [list(texts[i : i + per_request]) for i in range(0, len(texts), per_request)]
        queue: asyncio.Queue[list[str]] = asyncio.Queue()
        for chunk in chunks:
            queue.put_nowait(chunk)

        async def worker() -> None:
            while not queue.empty():
                await client.classify(model, queue.get_nowait())

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return len(texts) / (time.perf_counter() - started)
    finally:
        await client.aclose()


class Direct:
    """The model's ONNX file run directly with onnxruntime, with the service's windowing."""

    def __init__(self, folder: Path, provider: str) -> None:
        import onnxruntime as ort

        self.manifest = load_manifest(folder)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = [CUDA, CPU] if provider == "cuda" else [CPU]
        self.session = ort.InferenceSession(
            str(folder / self.manifest.model_file), sess_options=options, providers=providers
        )
        (self.input,) = self.session.get_inputs()
        self.output = self.manifest.output_name or self.session.get_outputs()[0].name

    def _run(self, batch: Sequence[str]) -> None:
        m = self.manifest
        windows = [
            window_input(w, m.append_shape)
            for t in batch
            for w in char_windows(normalise_text(t, m.normalise), m.max_length, m.stride)
        ]
        feed = np.array(windows, dtype=object)
        if len(self.input.shape) == 2:
            feed = feed.reshape(-1, 1)
        self.session.run([self.output], {self.input.name: feed})

    def rate(self, texts: Sequence[str], size: int) -> float:
        """texts/s in batches of ``size`` texts."""
        self._run(texts[:size])
        started = time.perf_counter()
        for start in range(0, len(texts), size):
            self._run(texts[start : start + size])
        return len(texts) / (time.perf_counter() - started)


async def breakdown(count: int) -> dict[str, float]:
    """Median cost of each server-side stage of an OPA-only Evaluate, in this process."""
    from cabincrew.emitter import OutboxEmitter
    from preflight_svc import wire
    from preflight_svc.governance import (
        DEFAULT_POLICY_DIR,
        GovernanceHolder,
        GovernanceSettings,
        load_governance,
    )
    from preflight_svc.onnx_models import ProviderPreference
    from preflight_svc.opa import PolicyDomain
    from preflight_svc.pipeline import Limits, Preflight
    from preflight_svc.policy_input import (
        ArtifactInput,
        PolicyContext,
        build_preflight_input,
        validate_policy_input,
    )

    settings = GovernanceSettings(
        policy_dirs=(DEFAULT_POLICY_DIR,), model_dirs=(), provider=ProviderPreference.CPU
    )
    governance = load_governance(settings)
    message = evaluate_request(skip_models=True)
    request = wire.step_request(message)
    item = request.artifacts[0]
    artifact = ArtifactInput(
        item.name, item.role, item.path, item.hash, item.size, item.document, item.body
    )

    def document() -> dict[str, Any]:
        return build_preflight_input(
            workflow_id="wf",
            step_id="s",
            mode="flight-plan",
            receipt=request.receipt,
            artifacts=[artifact],
            context=PolicyContext(environment="staging", workspace_root="/ws"),
        )

    built = document()
    with tempfile.TemporaryDirectory() as tmp:
        emitter = OutboxEmitter(
            "preflight", Path(tmp) / "outbox.db", address=lambda: "127.0.0.1:9", token=lambda: ""
        )
        preflight = Preflight(GovernanceHolder(governance), Limits(), emitter, workers=1)
        verdict = await preflight.evaluate_step(request)
        event = preflight._step_event(request, verdict)  # what the service records

        async def emit() -> None:
            await emitter.emit(
                event.event_type,
                workflow_state=event.workflow_state,
                message=event.message,
                workflow=event.workflow,
                artifacts=event.artifacts,
                policy=event.policy,
            )

        stages = {
            "request → domain (wire)": lambda: wire.step_request(message),
            "policy input built": document,
            "policy input validated (JSON Schema)": lambda: validate_policy_input(built),
            "OPA, all preflight packages": lambda: governance.evaluate_policies(
                PolicyDomain.PREFLIGHT, built
            ),
            "result → protobuf": lambda: wire.result_message(verdict),
        }
        figures = {name: _median(fn, count) for name, fn in stages.items()}
        timings = []
        for _ in range(min(count, 300)):
            started = time.perf_counter()
            await emit()
            timings.append(time.perf_counter() - started)
        figures["audit event: encode + durable outbox write"] = statistics.median(timings) * 1000
        await preflight.aclose()
        await emitter.aclose()
    return figures


def _median(fn: Any, count: int) -> float:
    for _ in range(50):
        fn()
    timings = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000


def eval_texts(folder: Path, count: int) -> list[str]:
    """Texts from the model's held-out set (repeated to ``count``)."""
    found: list[str] = []
    for path in sorted((folder / "eval").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            found.extend(json.loads(line)["text"] for line in handle)
    if not found:
        raise SystemExit(f"{folder} has no eval set")
    return [found[i % len(found)] for i in range(count)]


def line(name: str, figures: dict[str, float]) -> str:
    return (
        f"| {name} | {figures['p50_ms']:.2f} ms | {figures['p99_ms']:.2f} ms | "
        f"{figures['decisions_per_s']:,.0f} | {figures['server_cpu_ms']:.2f} ms |"
    )


async def main(args: argparse.Namespace) -> int:
    rows: list[str] = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-preflight-") as tmp:
        base = Path(tmp)
        # One data dir: the audit service trusts the auth key the preflight emitter signs with.
        audit = Server(base, module="audit_svc")
        try:
            await run_all(args, base, audit.port, rows, results)
        finally:
            audit.stop()
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        "\n| setting | p50 | p99 | decisions/s | preflight CPU per request |"
        "\n| --- | --- | --- | --- | --- |"
    )
    print("\n".join(rows))
    print("\nServer-side stages of one OPA-only Evaluate (median, in process):")
    stages = await breakdown(min(args.requests, 1000))
    for name, ms in stages.items():
        print(f"| {name} | {ms:.3f} ms |")
    results["stages_ms"] = stages
    print("\nJSON: " + json.dumps(results, sort_keys=True))
    return 0


async def run_all(
    args: argparse.Namespace, base: Path, audit: int, rows: list[str], results: dict[str, Any]
) -> None:
    """Every measurement, with the audit service at ``audit``."""
    for name, settings in (
        ("OPA only, audit durable before the answer", {"load_models": "false"}),
        (
            "OPA only, audit written after the answer",
            {"load_models": "false", "audit_before_reply": "false"},
        ),
    ):
        server = Server(base, audit=audit, **settings)
        try:
            if not rows:
                bare = await measure_bare_rpc(server, args.requests)
                print(f"health check round trip (baseline): p50 {bare:.2f} ms")
                results["bare_rpc_p50_ms"] = bare
            figures = await measure_evaluate(
                server, evaluate_request(skip_models=True), args.requests, args.concurrency
            )
        finally:
            server.stop()
        print(f"{name}: {figures}")
        results[name] = figures
        rows.append(line(name, figures))

    model_dir = MODELS / args.model
    if args.opa_only:
        return
    if not (model_dir / "manifest.json").is_file():
        print(f"{model_dir} is missing: run `make models` for the ONNX figures")
    else:
        server = Server(
            base,
            audit=audit,
            execution_provider=args.provider,
            model_dirs=str(MODELS),
        )
        try:
            count = len(list(MODELS.glob("*/manifest.json")))
            name = f"OPA + {count} ONNX models ({args.provider})"
            figures = await measure_evaluate(
                server, evaluate_request(skip_models=False), args.requests, args.concurrency
            )
            print(f"{name}: {figures}")
            results[name] = figures
            rows.append(line(name, figures))
            texts = eval_texts(model_dir, args.texts)
            ratio = await compare_classify(server, Direct(model_dir, args.provider), args, texts)
            results["classify_ratio"] = ratio
        finally:
            server.stop()


async def compare_classify(
    server: Server, direct: Direct, args: argparse.Namespace, texts: Sequence[str]
) -> float:
    """Service and direct texts/s, alternating in rounds so that load drift hits both."""
    configs = ((1, 256), (4, 64), (8, 32), (16, 32))
    service = {c: await measure_classify(server, args.model, texts, *c) for c in configs}
    alone = {size: direct.rate(texts, size) for size in (1, 8, 32, 64, 128, 256)}
    for (clients, per_request), rate in service.items():
        print(f"  Classify via the service, {clients}x{per_request}: {rate:,.0f} texts/s")
    for size, rate in alone.items():
        print(f"  directly in this process, batch {size:>3}: {rate:,.0f} texts/s")
    best_config = max(service, key=lambda c: service[c])
    best_size = max(alone, key=lambda k: alone[k])
    ratios = [service[best_config] / alone[best_size]]
    for _ in range(2):
        via = await measure_classify(server, args.model, texts, *best_config)
        ratios.append(via / direct.rate(texts, best_size))
    ratio = statistics.median(ratios)
    print(
        f"Classify {args.model}: service at {best_config[0]}x{best_config[1]} against direct "
        f"at batch {best_size}, ratio per round {', '.join(f'{r:.2f}' for r in ratios)}: "
        f"median {ratio:.2f} (goal >= 0.8)"
    )
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--texts", type=int, default=4096)
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="prompt-injection")
    parser.add_argument(
        "--opa-only", action="store_true", help="only the OPA-only settings and the stages"
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
