"""Shared by the preflight service, governance and CLI tests: bundles, tiny models, a real
server (audit + preflight on port 0) and request builders. Holds no tests itself.

The ``votes`` bundle lets a test choose each policy's decision through the request's
context labels (``vote_a``, ``vote_b``, ``vote_c``; allow when absent), so one server
serves every combination. The ``tiny`` model is a text-kind ONNX graph built here: 0.95 for
a text that mentions "attack", 0.7 for "suspicious", 0.05 otherwise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper

from cabincrew.clients import AuditClient, ChannelOptions, PreflightClient, open_channel
from cabincrew.config import Config
from cabincrew.runtime.server import CabinCrewServer, create_server
from cabincrew.v1 import audit_pb2, common_pb2, preflight_pb2
from tests.conftest import make_config, token_for

WAIT = 10.0
SERVICE = "cabincrew.v1.PreflightService"

_VOTE = """package cabincrew.{domain}.vote_{name}

import rego.v1

default decision := "allow"

decision := input.context.labels.vote_{name} if input.context.labels.vote_{name}

reasons contains "policy {name} votes so" if decision != "allow"

required_role := "{role}" if decision == "require_approval"
"""

# Errors at evaluation time when labels.broken is not a number (strict builtins).
_BROKEN = """package cabincrew.preflight.zz_broken

import rego.v1

default decision := "allow"

decision := "warn" if to_number(input.context.labels.broken) > 1000
"""


def write_votes_bundle(folder: Path, *, broken: bool = False) -> Path:
    """Three preflight policies a, b, c and one mcp/llm policy each, voting from labels."""
    folder.mkdir(parents=True, exist_ok=True)
    roles = {"a": "security", "b": "release-manager", "c": "approver"}
    for name, role in roles.items():
        (folder / f"vote_{name}.rego").write_text(
            _VOTE.format(domain="preflight", name=name, role=role)
        )
    for domain in ("mcp", "llm"):
        (folder / f"{domain}.rego").write_text(
            _VOTE.format(domain=domain, name="a", role="security")
        )
    if broken:
        (folder / "zz_broken.rego").write_text(_BROKEN)
    return folder


def tiny_graph(bias: float = 0.05) -> bytes:
    """A text graph: P(flagged) 0.95 for 'attack', 0.7 for 'suspicious', else ``bias``."""

    def hit(pattern: str, out: str) -> list[Any]:
        return [
            helper.make_node("RegexFullMatch", ["text"], [out + "_b"], pattern=pattern),
            helper.make_node("Cast", [out + "_b"], [out + "_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [out + "_f", out + "_w"], [out]),
        ]

    nodes = [
        *hit("(?s).*attack.*", "a"),
        *hit("(?s).*suspicious.*", "s"),
        helper.make_node("Max", ["a", "s", "floor"], ["p"]),
        helper.make_node("Sub", ["one", "p"], ["q"]),
        helper.make_node("Concat", ["q", "p"], ["probabilities"], axis=1),
    ]
    scalars = {"a_w": 0.95, "s_w": 0.7, "floor": bias, "one": 1.0}
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        initializer=[
            helper.make_tensor(k, TensorProto.FLOAT, [1], [v]) for k, v in scalars.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    return bytes(model.SerializeToString())


def write_tiny_model(
    folder: Path, name: str = "tiny", *, bias: float = 0.05, **manifest: Any
) -> Path:
    """A model folder: model.onnx and its manifest (thresholds: 0.9 deny, 0.6 approval)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_graph(bias)
    (folder / "model.onnx").write_bytes(model)
    document: dict[str, Any] = {
        "schema_version": 1,
        "name": name,
        "version": "0.0.1",
        "task": "test-flagging",
        "input_kind": "text",
        "labels": ["benign", "flagged"],
        "thresholds": {
            "flagged": [
                {"min_score": 0.9, "decision": "deny"},
                {"min_score": 0.6, "decision": "require_approval"},
            ]
        },
        "max_length": 64,
        "stride": 16,
        "sha256": hashlib.sha256(model).hexdigest(),
        **manifest,
    }
    (folder / "manifest.json").write_text(json.dumps(document), encoding="utf-8")
    return folder


@dataclass
class PreflightServer:
    """A started server hosting audit and preflight, with clients."""

    app: CabinCrewServer
    config: Config
    client: PreflightClient
    audit: AuditClient
    channel: grpc.aio.Channel
    _closers: list[Any] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.app.port

    @property
    def stub(self) -> Any:
        """The raw stub, for calls whose errors a test inspects."""
        return self.client.stub

    async def health(self) -> int:
        """The health status of PreflightService, refreshed first."""
        await self.app.refresh_health()
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=WAIT)
        return int(response.status)

    async def audit_events(self, event_type: str) -> list[common_pb2.AuditEvent]:
        """Every stored event of a type, once the preflight outbox is drained."""
        emitter = self.app.context.shared["emitter:preflight"]
        assert await emitter.wait_drained(WAIT)
        request = audit_pb2.QueryEventsRequest(
            filter=audit_pb2.EventFilter(event_type=event_type), page_size=1000
        )
        events: list[common_pb2.AuditEvent] = []
        async for page in self.audit.query(request):
            events.extend(entry.event for entry in page.entries)
        return events

    async def close(self) -> None:
        await self.client.aclose()
        await self.audit.aclose()
        await self.channel.close()
        await self.app.stop(0)


async def start_preflight(
    data_dir: Path,
    policy_dirs: Sequence[Path],
    model_dirs: Sequence[Path] = (),
    **overrides: Any,
) -> PreflightServer:
    """Audit + preflight on port 0; no model unless ``model_dirs`` names some."""
    values: dict[str, Any] = {
        "preflight.policy_dirs": [str(p) for p in policy_dirs],
        "preflight.load_models": bool(model_dirs),
        "preflight.execution_provider": "cpu",
        "preflight.max_wait_ms": 0.0,
        **overrides,
    }
    if model_dirs:
        values["preflight.model_dirs"] = [str(p) for p in model_dirs]
    config = make_config(data_dir, services=("audit", "preflight"), **values)
    app, port = await create_server(config)
    await app.start()
    token = token_for(config, "tester", ["operator"])
    options = ChannelOptions(address=f"127.0.0.1:{port}", token=token)
    client = PreflightClient(open_channel(options), deadline_seconds=WAIT, max_attempts=1)
    audit = AuditClient(open_channel(options), deadline_seconds=WAIT)
    return PreflightServer(app, config, client, audit, open_channel(options))


# --- request builders -------------------------------------------------------------------------


def artifact(
    name: str = "change",
    body: bytes | None = b"x = 1\n",
    *,
    target: str = "src/app.py",
    action: str = "update",
    role: str = "evidence",
    artifact_type: str = "file",
    mime: str = "text/plain",
) -> preflight_pb2.ArtifactInput:
    """An artifact as an engine leaves it, with a descriptor by the engine hash rule."""
    document: dict[str, Any] = {
        "artifact_type": artifact_type,
        "action": action,
        "mime": mime,
        "target": target,
    }
    item = preflight_pb2.ArtifactInput()
    item.artifact.artifact_type = artifact_type
    item.artifact.action = action
    item.artifact.mime = mime
    item.artifact.target = target
    if body is not None:
        document["body_file"] = "body.data"
        item.artifact.body_file = "body.data"
        item.body = body
        hashed = body
    else:
        hashed = (json.dumps(document, sort_keys=True, indent=2) + "\n").encode()
    item.descriptor.CopyFrom(
        common_pb2.EngineArtifact(
            name=name,
            role=role,
            path=name,
            hash=hashlib.sha256(hashed).hexdigest(),
            size=len(hashed),
        )
    )
    return item


def step_request(
    artifacts: Sequence[preflight_pb2.ArtifactInput] = (),
    *,
    labels: Mapping[str, str] | None = None,
    method: int = common_pb2.AGGREGATION_METHOD_UNSPECIFIED,
    models: Sequence[str] | None = None,
    workflow_id: str = "wf-1",
    environment: str = "dev",
) -> preflight_pb2.EvaluateRequest:
    """An EvaluateRequest for one step; ``models=[]`` skips the models."""
    options = preflight_pb2.GovernanceOptions(aggregation_method=method)
    if models is not None:
        if models:
            options.models.extend(models)
        else:
            options.skip_models = True
    return preflight_pb2.EvaluateRequest(
        workflow_id=workflow_id,
        step_id="step-1",
        mode=common_pb2.MODE_FLIGHT_PLAN,
        receipt=common_pb2.EngineOutput(
            protocol_version="1",
            engine_id="test.engine",
            mode=common_pb2.MODE_FLIGHT_PLAN,
            receipt_id="r-1",
            status="success",
        ),
        artifacts=list(artifacts),
        context=preflight_pb2.EvaluationContext(
            environment=environment,
            workspace_root="/workspace",
            labels=dict(labels or {}),
            requester="olivia",
        ),
        options=options,
        request_id="req-1",
    )


def decisions(result: common_pb2.GovernanceResult) -> dict[str, int]:
    """policy_id → decision of every evaluation."""
    return {e.policy_id: e.decision for e in result.evaluations}
