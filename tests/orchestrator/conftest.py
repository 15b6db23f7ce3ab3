"""Fixtures for the orchestrator domain tests: directories and throwaway engines."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator_svc.workflow import EngineSpec

REPO = Path(__file__).resolve().parents[2]
ENGINES = REPO / "engines"

# Helpers every throwaway engine starts with: read the input, write artifacts, print a receipt.
PRELUDE = """
import hashlib, json, os, sys
MODE = sys.argv[sys.argv.index("--mode") + 1]
REQUEST = json.load(sys.stdin)
CONFIG = REQUEST.get("config", {})
ARTIFACTS = os.environ["CABINCREW_ARTIFACTS_DIR"]

def artifact(name, role="evidence", body=None, data=None, document=None):
    path = os.path.join(ARTIFACTS, name)
    os.mkdir(path)
    doc = document if document is not None else {
        "artifact_type": "test", "action": "none", "mime": "application/json"}
    if body is not None:
        doc["body"] = body
    if data is not None:
        doc["body_file"] = "body.data"
    raw = json.dumps(doc, sort_keys=True).encode()
    with open(os.path.join(path, "artifact.json"), "wb") as handle:
        handle.write(raw)
    if data is not None:
        with open(os.path.join(path, "body.data"), "wb") as handle:
            handle.write(data)
    hashed = data if data is not None else raw
    return {"name": name, "role": role, "path": name,
            "hash": hashlib.sha256(hashed).hexdigest(), "size": len(hashed)}

def receipt(artifacts=(), status="success", **extra):
    document = {"protocol_version": "1", "engine_id": "test.engine", "mode": MODE,
                "receipt_id": "r-1", "status": status, "artifacts": list(artifacts)}
    document.update(extra)
    print(json.dumps(document))
"""


@dataclass(frozen=True)
class Dirs:
    """The directories one engine launch uses."""

    workspace: Path
    artifacts: Path
    temp: Path
    log: Path
    root: Path


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    """A workspace with one file, and paths for artifacts, temp and the step log."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "README.md").write_text("hello\n")
    return Dirs(
        workspace,
        tmp_path / "artifacts",
        tmp_path / "temp",
        tmp_path / "logs" / "step.log",
        tmp_path,
    )


def script_engine(directory: Path, body: str, prelude: bool = True) -> EngineSpec:
    """Write a Python engine script and return how to launch it (no site-packages, isolated)."""
    script = directory / "engine.py"
    script.write_text((PRELUDE if prelude else "") + textwrap.dedent(body))
    return EngineSpec((sys.executable, "-I", "-S", str(script)))


def noop_engine() -> EngineSpec:
    """The shipped noop engine."""
    return EngineSpec((sys.executable, "-I", "-S", str(ENGINES / "noop" / "engine.py")))
