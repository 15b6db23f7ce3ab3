"""``cabincrew preflight``, ``policy`` and ``models`` as a user runs them: subprocesses,
against a real server where they need one."""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from preflight_svc.governance import DEFAULT_POLICY_DIR
from preflight_svc.onnx_eval import evaluate_model_dir
from preflight_svc.opa import policy_digest
from preflight_svc.policy_input import build_content_input
from tests.conftest import BIN, ROOT
from tests.preflight.test_service_support import (
    PreflightServer,
    start_preflight,
    write_tiny_model,
    write_votes_bundle,
)

pytestmark = pytest.mark.timeout(90)


async def cabincrew(
    *args: str, port: int = 0, data_dir: Path | None = None, stdin: bytes | None = None
) -> tuple[int, str, str]:
    """Run the CLI without blocking the loop (the server may be in this process)."""
    environ = {k: v for k, v in os.environ.items() if k != "CABINCREW_TOKEN"}
    if port:
        environ["CABINCREW_ADDR"] = f"127.0.0.1:{port}"
    if data_dir is not None:
        environ["CABINCREW_DATA_DIR"] = str(data_dir)
    process = await asyncio.create_subprocess_exec(
        str(BIN / "cabincrew"),
        *args,
        cwd=ROOT,
        env=environ,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def enginekit() -> ModuleType:
    """The engines' own library, to write artifacts exactly as an engine does."""
    path = ROOT / "engines" / "_lib" / "enginekit.py"
    spec = importlib.util.spec_from_file_location("enginekit_for_cli_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def server(tmp_path: Path, data_dir: Path) -> AsyncIterator[PreflightServer]:
    """Default policies and the tiny model."""
    running = await start_preflight(
        data_dir, [DEFAULT_POLICY_DIR], [write_tiny_model(tmp_path / "models" / "tiny")]
    )
    try:
        yield running
    finally:
        await running.close()


async def test_preflight_evaluate_judges_an_artifacts_folder_as_an_engine_wrote_it(
    server: PreflightServer, tmp_path: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    run = enginekit().Run("demo.engine", "flight-plan", {}, str(tmp_path), str(artifacts), None)
    diff = "--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-hello\n+hello world\n"
    run.write_artifact(
        "readme",
        "evidence",
        artifact_type="diff",
        action="update",
        mime="text/x-diff",
        target="README.md",
        data=diff.encode(),
    )
    run.write_artifact(
        "summary",
        "log",
        artifact_type="message",
        action="note",
        mime="application/json",
        body={"files": 1, "ratio": 0.5},
    )
    context = tmp_path / "context.json"
    context.write_text(json.dumps({"environment": "dev", "workspace_root": "/ws"}))
    code, out, err = await cabincrew(
        "preflight",
        "evaluate",
        "--artifacts",
        str(artifacts),
        "--context",
        str(context),
        "--json",
        port=server.port,
        data_dir=server.config.data_path,
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["decision"] == "allow"
    assert {e["policy_id"] for e in result["evaluations"]} >= {
        "cabincrew.preflight.paths",
        "cabincrew.preflight.secrets",
        "tiny",
    }
    assert result["policy_digest"] == policy_digest(DEFAULT_POLICY_DIR)

    context.write_text(json.dumps({"environment": "production", "workspace_root": "/ws"}))
    code, out, err = await cabincrew(
        "preflight",
        "evaluate",
        "--artifacts",
        str(artifacts),
        "--context",
        str(context),
        port=server.port,
        data_dir=server.config.data_path,
    )
    assert code == 0, err
    assert "require_approval" in out and "release-manager" in out


async def test_preflight_classify_reads_stdin_and_prints_one_json_object_per_line(
    server: PreflightServer,
) -> None:
    code, out, err = await cabincrew(
        "preflight",
        "classify",
        "--model",
        "tiny",
        port=server.port,
        data_dir=server.config.data_path,
        stdin=b"a calm sentence\nthis is an attack\nrather suspicious\n",
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert [line["decision"] for line in lines] == ["allow", "deny", "require_approval"]
    assert all(set(line) == {"index", "scores", "decision"} for line in lines)
    assert set(lines[0]["scores"]) == {"benign", "flagged"}

    code, _, err = await cabincrew(
        "preflight",
        "classify",
        "--model",
        "nope",
        port=server.port,
        data_dir=server.config.data_path,
        stdin=b"x\n",
    )
    assert code == 1 and err.startswith("error:") and "Traceback" not in err


async def test_preflight_governance_and_reload_show_the_digests(server: PreflightServer) -> None:
    code, out, err = await cabincrew(
        "preflight", "governance", "--json", port=server.port, data_dir=server.config.data_path
    )
    assert code == 0, err
    shown = json.loads(out)
    assert shown["serving"] and shown["policy_digest"] == policy_digest(DEFAULT_POLICY_DIR)
    assert [m["name"] for m in shown["models"]] == ["tiny"]
    code, out, err = await cabincrew(
        "preflight", "reload", "--json", port=server.port, data_dir=server.config.data_path
    )
    assert code == 0, err
    assert json.loads(out)["governance_hash"] == shown["governance_hash"]


async def test_policy_test_reports_each_test_and_fails_when_one_fails(tmp_path: Path) -> None:
    code, out, err = await cabincrew("policy", "test", str(DEFAULT_POLICY_DIR), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["failed"] == 0 and report["passed"] == len(report["tests"]) > 10

    bundle = write_votes_bundle(tmp_path / "bundle")
    (bundle / "vote_a_test.rego").write_text(
        "package cabincrew.preflight.vote_a_test\n\nimport rego.v1\n\n"
        "import data.cabincrew.preflight.vote_a\n\n"
        'test_allows_by_default if vote_a.decision == "allow"\n\n'
        'test_wrongly_expects_deny if vote_a.decision == "deny"\n'
    )
    code, out, _ = await cabincrew("policy", "test", str(bundle))
    assert code == 1
    assert "PASS" in out and "FAIL" in out
    (bundle / "bad.rego").write_text(
        "package cabincrew.preflight.bad\n\nimport rego.v1\n\n"
        'decision := "allow" if http.send({"method": "get", "url": "http://x"})\n'
    )
    code, _, err = await cabincrew("policy", "test", str(bundle))
    assert code == 1 and err.startswith("error:")


async def test_policy_eval_prints_the_decision_of_an_input_document(tmp_path: Path) -> None:
    document = build_content_input(
        domain="mcp",
        phase="request",
        payload={"method": "tools/call", "params": {"name": "read", "arguments": {"path": ".env"}}},
        context={"workspace_root": "/ws"},
    )
    source = tmp_path / "input.json"
    source.write_text(json.dumps(document))
    code, out, err = await cabincrew("policy", "eval", "--input", str(source), "--json")
    assert code == 0, err
    evaluation = json.loads(out)
    assert evaluation["decision"] == "deny" and evaluation["domain"] == "mcp"
    bundle = write_votes_bundle(tmp_path / "bundle")
    code, out, err = await cabincrew(
        "policy", "eval", "--input", str(source), "--bundle", str(bundle), "--json"
    )
    assert code == 0, err
    assert json.loads(out)["decision"] == "allow"


def _with_eval_set(folder: Path) -> dict[str, Any]:
    rows = [("calm words", 0), ("an attack", 1), ("very suspicious", 1), ("plain text", 0)]
    (folder / "eval").mkdir()
    with gzip.open(folder / "eval" / "heldout.jsonl.gz", "wt", encoding="utf-8") as handle:
        for text, label in rows:
            handle.write(json.dumps({"text": text, "label": label}) + "\n")
    manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    manifest["metrics"] = evaluate_model_dir(folder).as_dict()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


async def test_models_list_and_eval_reproduce_the_recorded_figures(tmp_path: Path) -> None:
    root = tmp_path / "models"
    manifest = _with_eval_set(write_tiny_model(root / "tiny"))
    write_tiny_model(root / "other", name="other")
    (root / "other" / "model.onnx").write_bytes(b"tampered")

    code, out, err = await cabincrew("models", "list", "--dir", str(root), "--json")
    assert code == 0, err
    listed = {m["name"]: m for m in json.loads(out)["models"]}
    assert listed["tiny"]["verified"] and not listed["other"]["verified"]

    code, out, err = await cabincrew("models", "eval", "tiny", "--dir", str(root), "--json")
    assert code == 0, err
    (report,) = json.loads(out)["models"]
    assert report["matches_manifest"] and report["sets"]["heldout"]["auc"] == 1.0

    manifest["metrics"]["heldout"]["auc"] = 0.5
    (root / "tiny" / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = await cabincrew("models", "eval", "tiny", "--dir", str(root))
    assert code == 1 and "NO" in out
