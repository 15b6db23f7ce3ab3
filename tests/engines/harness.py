"""Run engines as real subprocesses and check everything they emit against the protocol."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator

REPO = Path(__file__).resolve().parents[2]
ENGINES = REPO / "engines"
SCHEMA_PATH = REPO / "cabincrew" / "schemas" / "protocol.schema.json"
PROTOCOL_VERSION = "1"
PLAN_TOKEN = "a" * 64
ENGINE_TIMEOUT_SECONDS = 60  # a bound, not an expectation: engines finish in well under 1 s

_DEFINITIONS = json.loads(SCHEMA_PATH.read_text())["definitions"]


def validator(definition: str) -> Draft7Validator:
    """Return a draft-07 validator for one protocol definition (refs resolve in-document)."""
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": _DEFINITIONS,
        "$ref": f"#/definitions/{definition}",
    }
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


ENGINE_INPUT = validator("EngineInput")
ENGINE_OUTPUT = validator("EngineOutput")
ARTIFACT = validator("Artifact")


def engine_path(name: str) -> Path:
    """Return the entry point of an engine."""
    return ENGINES / name / "engine.py"


@dataclass
class EngineRun:
    """What one engine launch produced."""

    returncode: int
    receipt: dict[str, Any]
    stdout: str
    stderr: str

    @property
    def error_code(self) -> str | None:
        """The machine-readable error code from the receipt's diagnostics."""
        return (self.receipt.get("diagnostics") or {}).get("error_code")

    def artifact(self, name: str) -> dict[str, Any]:
        """Return the receipt entry for one artifact."""
        matches: list[dict[str, Any]] = [
            entry for entry in self.receipt.get("artifacts", []) if entry["name"] == name
        ]
        assert len(matches) == 1, f"artifact {name} not in receipt"
        return matches[0]


def parse_single_json(stdout: str) -> dict[str, Any]:
    """Parse stdout, asserting it holds exactly one JSON document and nothing else."""
    document, end = json.JSONDecoder().raw_decode(stdout.lstrip())
    assert stdout.lstrip()[end:].strip() == "", "stdout holds more than one JSON document"
    assert isinstance(document, dict)
    return document


def check_artifacts(artifacts_dir: Path, receipt: dict[str, Any]) -> None:
    """Validate every artifact on disk and the receipt's hash/size against the README rule."""
    for directory in artifacts_dir.iterdir():
        assert directory.is_dir() and not directory.is_symlink()
        document = json.loads((directory / "artifact.json").read_text())
        ARTIFACT.validate(document)
        assert {p.name for p in directory.iterdir()} <= {"artifact.json", "body.data"}
        assert ("body_file" in document) == (directory / "body.data").exists()
    for entry in receipt.get("artifacts", []):
        directory = artifacts_dir / entry["path"]
        assert entry["path"] == entry["name"]
        assert entry["role"] in {"evidence", "state", "log"}
        body = directory / "body.data"
        hashed = (body if body.exists() else directory / "artifact.json").read_bytes()
        assert entry["hash"] == hashlib.sha256(hashed).hexdigest()
        assert entry["size"] == len(hashed)


@dataclass
class Sandbox:
    """A workspace, a temp dir and fresh artifact dirs, as the orchestrator would provide."""

    root: Path
    workspace: Path = field(init=False)
    temp: Path = field(init=False)
    _count: int = 0

    def __post_init__(self) -> None:
        self.workspace = self.root / "workspace"
        self.temp = self.root / "temp"
        self.workspace.mkdir()
        self.temp.mkdir()

    def fresh_artifacts_dir(self) -> Path:
        """Create a new, empty artifacts dir (outside the workspace)."""
        self._count += 1
        path = self.root / f"artifacts-{self._count}"
        path.mkdir()
        return path

    def carry_state(self, plan_dir: Path, plan: EngineRun) -> Path:
        """Copy the plan's state artifacts into a fresh artifacts dir, as for take-off."""
        target = self.fresh_artifacts_dir()
        for entry in plan.receipt["artifacts"]:
            if entry["role"] == "state":
                shutil.copytree(plan_dir / entry["path"], target / entry["name"])
        return target

    def request(self, mode: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Build a schema-valid EngineInput."""
        request: dict[str, Any] = {
            "protocol_version": PROTOCOL_VERSION,
            "mode": mode,
            "meta": {"workflow_id": "wf-test", "step_id": "step-1"},
            "config": config,
            "secrets": {},
            "allowed_secrets": [],
            "context": {},
            "orchestrator": {"run_index": 0, "workspace_hash": "0" * 64, "artifacts_salt": "s"},
        }
        if mode == "take-off":
            request["expected_plan_token"] = PLAN_TOKEN
        request.update(extra)
        ENGINE_INPUT.validate(request)
        return request

    def run(
        self,
        engine: str,
        mode: str,
        config: dict[str, Any],
        artifacts_dir: Path,
        *,
        raw_input: bytes | None = None,
        input_file: bool = False,
        direct: bool = False,
        extra_env: dict[str, str] | None = None,
        **extra: Any,
    ) -> EngineRun:
        """Launch an engine and check its stdout, receipt, exit code and artifacts."""
        payload = raw_input
        if payload is None:
            payload = json.dumps(self.request(mode, config, **extra)).encode()
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": os.environ.get("HOME", "/"),
            "CABINCREW_WORKSPACE": str(self.workspace),
            "CABINCREW_ARTIFACTS_DIR": str(artifacts_dir),
            "CABINCREW_TEMP_DIR": str(self.temp),
            "CABINCREW_MODE": mode,
            **(extra_env or {}),
        }
        stdin: bytes | None = payload
        if input_file:
            path = self.root / f"input-{self._count}.json"
            path.write_bytes(payload)
            env["CABINCREW_INPUT_FILE"] = str(path)
            stdin = b""
        command = (
            [str(engine_path(engine))] if direct else [sys.executable, str(engine_path(engine))]
        )
        completed = subprocess.run(
            [*command, "--mode", mode],
            input=stdin,
            capture_output=True,
            env=env,
            timeout=ENGINE_TIMEOUT_SECONDS,
            check=False,
        )
        stdout = completed.stdout.decode()
        receipt = parse_single_json(stdout)
        ENGINE_OUTPUT.validate(receipt)
        assert receipt["mode"] == mode
        assert (completed.returncode == 0) == (receipt["status"] == "success")
        assert completed.returncode in (0, 1, 2)
        check_artifacts(artifacts_dir, receipt)
        return EngineRun(completed.returncode, receipt, stdout, completed.stderr.decode())


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Capture every entry under ``root``: type, bytes or link target, and permission bits."""
    entries: dict[str, tuple[Any, ...]] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(directory) / name
            info = path.lstat()
            key = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                entries[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                entries[key] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                entries[key] = ("file", path.read_bytes(), stat.S_IMODE(info.st_mode))
    return entries
