"""``cabincrew preflight``, ``cabincrew policy`` and ``cabincrew models``.

``preflight`` talks to a running PreflightService (evaluate an artifacts folder as an engine
leaves it, classify texts, show or reload the governance). ``policy`` and ``models`` work
offline on folders: run a bundle's Rego tests, evaluate one policy input, build the default
models, list model folders and reproduce a model card's figures.

Exit codes: 0 when the command ran (whatever the decision; read it from the output or
``--json``), 1 on an error, 2 on a usage error; ``policy test`` exits 1 when a test fails.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

import cabincrew
from cabincrew.cli.common import (
    AddrOption,
    JsonOption,
    Target,
    channel,
    console,
    fail,
    print_json,
    resolve_target,
    run,
)
from cabincrew.clients import PreflightClient
from cabincrew.convert import ConversionError, from_protocol, to_protocol
from cabincrew.v1 import common_pb2, preflight_pb2
from preflight_svc.errors import PreflightError

preflight_app = typer.Typer(
    help="Governance of a step's artifacts and of gateway content (talks to the server).",
    no_args_is_help=True,
)
policy_app = typer.Typer(help="OPA/Rego policy bundles, offline.", no_args_is_help=True)
models_app = typer.Typer(help="ONNX classifier folders, offline.", no_args_is_help=True)

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACT_FILE = "artifact.json"
BODY_FILE = "body.data"
CLASSIFY_CHUNK = 256

_DECISIONS = {
    common_pb2.DECISION_ALLOW: "allow",
    common_pb2.DECISION_WARN: "warn",
    common_pb2.DECISION_REQUIRE_APPROVAL: "require_approval",
    common_pb2.DECISION_DENY: "deny",
}
_AGGREGATIONS = {
    "most_restrictive": common_pb2.AGGREGATION_METHOD_MOST_RESTRICTIVE,
    "unanimous": common_pb2.AGGREGATION_METHOD_UNANIMOUS,
    "majority": common_pb2.AGGREGATION_METHOD_MAJORITY,
    "any_deny": common_pb2.AGGREGATION_METHOD_ANY_DENY,
    "all_allow": common_pb2.AGGREGATION_METHOD_ALL_ALLOW,
}
_AGGREGATION_NAMES = {v: k for k, v in _AGGREGATIONS.items()}
_STYLE = {"allow": "green", "warn": "yellow", "require_approval": "magenta", "deny": "red"}
_CONTEXT_KEYS = ("environment", "repository", "requester", "workspace_root")


def register(app: typer.Typer) -> None:
    """Add the ``preflight``, ``policy`` and ``models`` command groups to the main CLI."""
    app.add_typer(preflight_app, name="preflight")
    app.add_typer(policy_app, name="policy")
    app.add_typer(models_app, name="models")


# --- preflight evaluate ------------------------------------------------------------------------


def read_artifacts_dir(
    folder: Path, roles: Mapping[str, str] | None = None
) -> list[preflight_pb2.ArtifactInput]:
    """``<name>/artifact.json`` (+ ``body.data``) folders as preflight inputs.

    Descriptors follow the engine contract's hash rule (engines/README.md): the SHA-256 and
    size of ``body.data`` when it exists, else of ``artifact.json``.
    """
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    items = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir() or entry.is_symlink():
            raise ValueError(f"{entry.name}: an artifacts folder holds only <name>/ folders")
        raw = (entry / ARTIFACT_FILE).read_bytes()
        try:
            document = json.loads(raw.decode("utf-8"))
            artifact = from_protocol(document, common_pb2.Artifact)
        except (UnicodeDecodeError, ValueError) as exc:
            detail = (
                "; ".join(f"{v.field}: {v.description}" for v in exc.violations[:3])
                if isinstance(exc, ConversionError)
                else str(exc)
            )
            raise ValueError(
                f"{entry.name}/{ARTIFACT_FILE} is not a protocol Artifact ({detail})"
            ) from None
        body_path = entry / BODY_FILE
        body = body_path.read_bytes() if body_path.exists() else None
        hashed = body if body is not None else raw
        item = preflight_pb2.ArtifactInput(
            descriptor=common_pb2.EngineArtifact(
                name=entry.name,
                role=(roles or {}).get(entry.name, "evidence"),
                path=entry.name,
                hash=hashlib.sha256(hashed).hexdigest(),
                size=len(hashed),
            ),
            artifact=artifact,
            artifact_json=raw,
        )
        if body is not None:
            item.body = body
        items.append(item)
    return items


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"the {what} {path} must hold a JSON object")
    return value


def build_context(document: Mapping[str, Any]) -> preflight_pb2.EvaluationContext:
    """An EvaluationContext from a JSON object; unknown keys go to ``extra``."""
    context = preflight_pb2.EvaluationContext()
    for key in _CONTEXT_KEYS:
        if key in document:
            setattr(context, key, str(document[key]))
    labels = document.get("labels") or {}
    if not isinstance(labels, dict):
        raise ValueError("context labels must be an object of strings")
    context.labels.update({str(k): str(v) for k, v in labels.items()})
    extra = {k: v for k, v in document.items() if k not in (*_CONTEXT_KEYS, "labels")}
    if extra:
        context.extra.update(extra)
    return context


@preflight_app.command("evaluate")
def evaluate(
    artifacts: str = typer.Option(..., "--artifacts", help="Folder of <name>/artifact.json."),
    context_file: str = typer.Option(None, "--context", help="JSON context: environment, …"),
    receipt_file: str = typer.Option(None, "--receipt", help="The engine's receipt (JSON)."),
    workflow_id: str = typer.Option("cli", "--workflow-id", help="Workflow id to judge under."),
    step_id: str = typer.Option("cli", "--step-id", help="Step id to judge under."),
    take_off: bool = typer.Option(False, "--take-off", help="Judge as take-off, not plan."),
    aggregation: str = typer.Option(None, "--aggregation", help="most_restrictive, majority, …"),
    models: str = typer.Option(None, "--models", help="Comma-separated models; '' for none."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Judge an artifacts folder as a workflow step would be judged."""
    mode = common_pb2.MODE_TAKE_OFF if take_off else common_pb2.MODE_FLIGHT_PLAN
    try:
        receipt = _load_json(Path(receipt_file), "receipt") if receipt_file else None
        roles = {
            str(a.get("name")): str(a.get("role"))
            for a in (receipt or {}).get("artifacts") or ()
            if isinstance(a, dict)
        }
        inputs = read_artifacts_dir(Path(artifacts), roles)
        if receipt is None:
            receipt = {
                "protocol_version": cabincrew.PROTOCOL_VERSION,
                "engine_id": "cabincrew.cli",
                "mode": "take-off" if take_off else "flight-plan",
                "receipt_id": f"cli-{uuid.uuid4()}",
                "status": "success",
                "artifacts": [to_protocol(i.descriptor) for i in inputs],
            }
        context = build_context(_load_json(Path(context_file), "context") if context_file else {})
        request = preflight_pb2.EvaluateRequest(
            workflow_id=workflow_id,
            step_id=step_id,
            mode=mode,
            receipt=from_protocol(receipt, common_pb2.EngineOutput),
            artifacts=inputs,
            context=context,
            options=_options(aggregation, models),
            request_id=f"cli-{uuid.uuid4()}",
        )
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    response = _evaluate(resolve_target(addr), request)
    _print_result(response.result, json_out)


def _options(aggregation: str | None, models: str | None) -> preflight_pb2.GovernanceOptions:
    options = preflight_pb2.GovernanceOptions()
    if aggregation:
        if aggregation not in _AGGREGATIONS:
            raise ValueError(
                f"unknown aggregation {aggregation!r}; one of {', '.join(_AGGREGATIONS)}"
            )
        options.aggregation_method = _AGGREGATIONS[aggregation]
    if models is not None:
        names = [m.strip() for m in models.split(",") if m.strip()]
        if names:
            options.models.extend(names)
        else:
            options.skip_models = True
    return options


@run
async def _evaluate(
    target: Target, request: preflight_pb2.EvaluateRequest
) -> preflight_pb2.EvaluateResponse:
    client = PreflightClient(channel(target))
    try:
        return await client.evaluate(request)
    finally:
        await client.aclose()


def result_json(result: common_pb2.GovernanceResult) -> dict[str, Any]:
    """A GovernanceResult in the protocol's words."""
    out: dict[str, Any] = {
        "decision": _DECISIONS.get(result.decision, "unspecified"),
        "aggregation_method": _AGGREGATION_NAMES.get(result.aggregation_method, ""),
        "evaluations": [to_protocol(e) for e in result.evaluations],
        "violations": list(result.violations),
        "warnings": list(result.warnings),
        "policy_digest": result.policy_digest,
        "governance_hash": result.governance_hash,
        "evaluation_id": result.evaluation_id,
    }
    if result.HasField("requires"):
        out["requires"] = {"role": result.requires.role, "reason": result.requires.reason}
    return out


def _print_result(result: common_pb2.GovernanceResult, json_out: bool) -> None:
    document = result_json(result)
    if json_out:
        print_json(document)
        return
    decision = document["decision"]
    table = Table(title=f"{len(result.evaluations)} evaluation(s)")
    table.add_column("source", no_wrap=True)
    table.add_column("policy", overflow="fold")
    table.add_column("decision", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for e in document["evaluations"]:
        style = _STYLE.get(e["decision"], "")
        table.add_row(
            e["source"], e["policy_id"], f"[{style}]{e['decision']}[/]", e.get("reason", "")
        )
    console.print(table)
    console.print(
        f"decision: [bold {_STYLE.get(decision, '')}]{decision}[/] "
        f"({document['aggregation_method']})",
        highlight=False,
    )
    if "requires" in document:
        requires = document["requires"]
        console.print(
            f"requires approval by {requires['role']}: {requires['reason']}", highlight=False
        )
    console.print(
        f"policy digest {result.policy_digest}\ngovernance hash {result.governance_hash}",
        highlight=False,
    )


# --- preflight classify, governance, reload ---------------------------------------------------


@preflight_app.command("classify")
def classify(
    model: str = typer.Option(..., "--model", help="Model name (see `preflight governance`)."),
    addr: str = AddrOption,
    json_out: bool = JsonOption,
) -> None:
    """Score texts read from stdin, one per line; print one JSON object per line."""
    texts = [line.rstrip("\r\n") for line in sys.stdin]
    _classify(resolve_target(addr), model, texts)


@run
async def _classify(target: Target, model: str, texts: Sequence[str]) -> None:
    client = PreflightClient(channel(target))
    try:
        for start in range(0, len(texts), CLASSIFY_CHUNK):
            response = await client.classify(model, texts[start : start + CLASSIFY_CHUNK])
            for score in response.results:
                line = {
                    "index": start + score.index,
                    "scores": {k: score.scores[k] for k in sorted(score.scores)},
                    "decision": _DECISIONS.get(score.decision, "unspecified"),
                }
                sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
    finally:
        await client.aclose()


@preflight_app.command("governance")
def governance(addr: str = AddrOption, json_out: bool = JsonOption) -> None:
    """Show the policies and models in force, with their digests."""
    response = _governance(resolve_target(addr), reload=False)
    _print_governance(response, json_out)


@preflight_app.command("reload")
def reload(addr: str = AddrOption, json_out: bool = JsonOption) -> None:
    """Load policies and models anew; the old set stays if the new one does not load."""
    response = _governance(resolve_target(addr), reload=True)
    _print_governance(response, json_out)


@run
async def _governance(target: Target, reload: bool) -> preflight_pb2.GetGovernanceResponse:
    client = PreflightClient(channel(target))
    try:
        if reload:
            return (await client.reload()).governance
        return await client.get_governance()
    finally:
        await client.aclose()


def governance_json(response: preflight_pb2.GetGovernanceResponse) -> dict[str, Any]:
    """GetGovernance as plain JSON."""
    return {
        "policy_digest": response.policy_digest,
        "governance_hash": response.governance_hash,
        "serving": response.serving,
        "policy_error": response.policy_error,
        "execution_provider": response.execution_provider,
        "default_aggregation_method": _AGGREGATION_NAMES.get(
            response.default_aggregation_method, ""
        ),
        "loaded_at": response.loaded_at.ToJsonString() if response.HasField("loaded_at") else "",
        "policies": [
            {"bundle": p.bundle, "path": p.path, "sha256": p.sha256, "packages": list(p.packages)}
            for p in response.policies
        ],
        "models": [
            {
                "name": m.name,
                "version": m.version,
                "task": m.task,
                "input_kind": m.input_kind,
                "labels": list(m.labels),
                "sha256": m.sha256,
                "manifest_digest": m.manifest_digest,
                "execution_provider": m.execution_provider,
                "healthy": m.healthy,
                "error": m.error,
                "path": m.path,
            }
            for m in response.models
        ],
        "domain_models": {d.domain: list(d.models) for d in response.domain_models},
    }


def _print_governance(response: preflight_pb2.GetGovernanceResponse, json_out: bool) -> None:
    document = governance_json(response)
    if json_out:
        print_json(document)
        return
    state = "[green]serving[/]" if response.serving else "[red]NOT serving[/]"
    console.print(f"preflight {state} on {response.execution_provider}", highlight=False)
    console.print(f"policy digest   {response.policy_digest}", highlight=False)
    console.print(f"governance hash {response.governance_hash}", highlight=False)
    if response.policy_error:
        console.print(f"[red]policies not loaded:[/] {response.policy_error}", highlight=False)
    governed = ("cabincrew.preflight.", "cabincrew.mcp.", "cabincrew.llm.")
    packages = sorted(
        {
            p
            for f in response.policies
            for p in f.packages
            if p.startswith(governed) and not p.endswith("_test")
        }
    )
    console.print(
        f"{len(response.policies)} policy files; policies: {', '.join(packages)}",
        highlight=False,
        soft_wrap=True,
    )
    table = Table(title=f"{len(response.models)} model(s)")
    for column in ("name", "version", "task", "health", "sha256"):
        table.add_column(column, overflow="fold")
    for m in response.models:
        health = "[green]ok[/]" if m.healthy else f"[red]{m.error or 'unhealthy'}[/]"
        table.add_row(m.name, m.version, m.task, health, m.sha256[:16])
    console.print(table)
    for d in response.domain_models:
        console.print(f"{d.domain}: {', '.join(d.models) or '(no models)'}", highlight=False)


# --- policy --------------------------------------------------------------------------------------


@policy_app.command("test")
def policy_test(
    bundle: str = typer.Argument(..., help="Bundle folder (*.rego, data.json)."),
    json_out: bool = JsonOption,
) -> None:
    """Run the bundle's test_* rules; exit 1 if any fails."""
    from preflight_svc.opa import run_policy_tests

    try:
        results = run_policy_tests(Path(bundle))
    except PreflightError as exc:
        raise fail(f"{exc} ({exc.remedy()})") from None
    failed = [r for r in results if not r.passed]
    if json_out:
        print_json(
            {
                "passed": len(results) - len(failed),
                "failed": len(failed),
                "tests": [
                    {"test": r.test_id, "passed": r.passed, "error": r.error} for r in results
                ],
            }
        )
    else:
        for r in results:
            mark = "[green]PASS[/]" if r.passed else "[red]FAIL[/]"
            console.print(
                f"{mark} {r.test_id}" + (f": {r.error}" if r.error else ""), highlight=False
            )
        if not results:
            console.print("no test_* rules found", highlight=False)
        console.print(f"{len(results) - len(failed)} passed, {len(failed)} failed", highlight=False)
    if failed:
        raise typer.Exit(1)


@policy_app.command("eval")
def policy_eval(
    input_file: str = typer.Option(..., "--input", help="A policy input document (JSON)."),
    bundle: str = typer.Option(None, "--bundle", help="Bundle folder (default: policies/)."),
    json_out: bool = JsonOption,
) -> None:
    """Evaluate one policy input document offline and print the decision."""
    from preflight_svc.governance import DEFAULT_POLICY_DIR
    from preflight_svc.opa import evaluate_file

    try:
        evaluation = evaluate_file(input_file, Path(bundle) if bundle else DEFAULT_POLICY_DIR)
    except PreflightError as exc:
        raise fail(f"{exc} ({exc.remedy()})") from None
    except OSError as exc:
        raise fail(f"cannot read {input_file}: {exc.strerror}") from None
    document = evaluation.to_json()
    if json_out:
        print_json(document)
        return
    for r in document["results"]:
        style = _STYLE.get(r["decision"], "")
        reasons = "; ".join(r["reasons"])
        console.print(
            f"[{style}]{r['decision']:>16}[/] {r['policy_id']} {reasons}", highlight=False
        )
    decision = document["decision"]
    console.print(
        f"decision: [bold {_STYLE.get(decision, '')}]{decision}[/] ({document['domain']}, "
        f"most_restrictive; policy digest {document['policy_digest']})",
        highlight=False,
    )


# --- models ---------------------------------------------------------------------------------


_DEFAULT_MODELS = REPO_ROOT / "models" / "build"


@models_app.command("build")
def models_build(
    out: str = typer.Option(str(_DEFAULT_MODELS), "--out", help="Where the model folders go."),
    only: list[str] = typer.Option(  # noqa: B008
        None, "--only", help="Build only this model (repeatable)."
    ),
    json_out: bool = JsonOption,
) -> None:
    """Build the default models reproducibly (needs the dev extras and the network once)."""
    if not (REPO_ROOT / "models" / "build.py").is_file():
        raise fail("the model build scripts (models/) are only in a source checkout")
    target = Path(out).resolve()
    command = [sys.executable, "-m", "models.build", "--out", str(target)]
    for name in only or ():
        command += ["--only", name]
    # With --json the build's progress goes to stderr, so stdout is the JSON alone.
    result = subprocess.run(
        command, cwd=REPO_ROOT, check=False, stdout=sys.stderr if json_out else None
    )
    if result.returncode != 0:
        raise typer.Exit(result.returncode)
    if json_out:
        built = []
        for manifest in sorted(target.glob("*/manifest.json")):
            document = json.loads(manifest.read_text(encoding="utf-8"))
            if only and document.get("name") not in only:
                continue
            built.append(
                {
                    "name": document.get("name"),
                    "version": document.get("version"),
                    "sha256": document.get("sha256"),
                    "dir": str(manifest.parent),
                }
            )
        print_json({"out": str(target), "models": built})


@models_app.command("list")
def models_list(
    folder: str = typer.Option(str(_DEFAULT_MODELS), "--dir", help="Folder of model folders."),
    json_out: bool = JsonOption,
) -> None:
    """List model folders with their manifests, and check each model file's SHA-256."""
    from preflight_svc.onnx_eval import list_model_dirs
    from preflight_svc.onnx_manifest import load_manifest

    root = _models_root(folder)
    rows: list[dict[str, Any]] = []
    for path in list_model_dirs(root):
        try:
            manifest = load_manifest(path)
        except PreflightError as exc:
            rows.append({"path": str(path), "name": path.name, "error": str(exc)})
            continue
        model_file = path / manifest.model_file
        actual = _file_sha256(model_file) if model_file.is_file() else ""
        rows.append(
            {
                "path": str(path),
                "name": manifest.name,
                "version": manifest.version,
                "task": manifest.task,
                "input_kind": manifest.input_kind.value,
                "labels": list(manifest.labels),
                "sha256": manifest.sha256,
                "verified": actual == manifest.sha256,
                "manifest_digest": manifest.digest,
            }
        )
    if json_out:
        print_json({"models": rows})
        return
    table = Table(title=f"{len(rows)} model(s) in {root}")
    for column in ("name", "version", "task", "kind", "file"):
        table.add_column(column, overflow="fold")
    for row in rows:
        if "error" in row:
            table.add_row(row["name"], "", "", "", f"[red]{row['error']}[/]")
            continue
        check = "[green]sha256 ok[/]" if row["verified"] else "[red]sha256 MISMATCH or missing[/]"
        table.add_row(row["name"], row["version"], row["task"], row["input_kind"], check)
    console.print(table)


def _models_root(folder: str) -> Path:
    root = Path(folder)
    if not root.is_dir():
        raise fail(f"{root} does not exist; build the default models with `cabincrew models build`")
    return root


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@models_app.command("eval")
def models_eval(
    names: list[str] = typer.Argument(  # noqa: B008
        None, help="Models to evaluate (default: all)."
    ),
    folder: str = typer.Option(str(_DEFAULT_MODELS), "--dir", help="Folder of model folders."),
    json_out: bool = JsonOption,
) -> None:
    """Recompute each model's held-out figures and compare them with its manifest."""
    from preflight_svc.onnx_eval import evaluate_model_dir, format_evaluation, list_model_dirs
    from preflight_svc.onnx_manifest import load_manifest

    root = _models_root(folder)
    chosen = [p for p in list_model_dirs(root) if not names or p.name in names]
    missing = sorted(set(names or ()) - {p.name for p in chosen})
    if missing:
        raise fail(f"no model folder named {', '.join(missing)} in {root}")
    report = []
    mismatched = False
    for path in chosen:
        try:
            evaluation = evaluate_model_dir(path)
            recorded = load_manifest(path).raw.get("metrics", {})
        except PreflightError as exc:
            raise fail(f"{path.name}: {exc} ({exc.remedy()})") from None
        figures = evaluation.as_dict()
        same = _same_figures(figures, recorded)
        mismatched = mismatched or not same
        report.append(
            {
                "model": evaluation.model,
                "version": evaluation.version,
                "sets": figures,
                "matches_manifest": same,
            }
        )
        if not json_out:
            sys.stdout.write(format_evaluation(evaluation) + "\n")
            verdict = "yes" if same else "NO"
            sys.stdout.write(f"  matches the figures recorded in its manifest: {verdict}\n")
    if json_out:
        print_json({"models": report})
    if mismatched:
        raise typer.Exit(1)


def _same_figures(figures: Mapping[str, Any], recorded: Mapping[str, Any]) -> bool:
    if not figures:
        return False
    return all(
        set_name in recorded and _close(value, recorded[set_name])
        for set_name, value in figures.items()
    )


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) <= set(b) and all(_close(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)
