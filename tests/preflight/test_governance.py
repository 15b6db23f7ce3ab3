"""Governance snapshots and the pipeline in process: digests, reload rules, leases, the
fail-closed laws of aggregation, artifact verification and redaction."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cabincrew.canonical import canonical_hash
from cabincrew.decisions import AggregationMethod, Decision
from preflight_svc.governance import (
    GovernanceHolder,
    GovernanceLoadError,
    GovernanceSettings,
    accept_reload,
    load_governance,
)
from preflight_svc.onnx_errors import BatcherClosed
from preflight_svc.onnx_models import ProviderPreference, RuntimeConfig
from preflight_svc.opa import PolicyDomain, policy_digest
from preflight_svc.pipeline import (
    GATE_ARTIFACTS,
    GATE_CONTENT,
    ContentRequest,
    Evaluation,
    Limits,
    Options,
    Preflight,
    Source,
    StepArtifact,
    StepRequest,
    combine,
    engine_encoding,
)
from preflight_svc.policy_input import PolicyContext
from tests.preflight.test_service_support import write_tiny_model, write_votes_bundle

pytestmark = pytest.mark.timeout(60)

RUNTIME = RuntimeConfig(max_wait_ms=0.0, executor_workers=1, intra_op_threads=1)
AT = "2026-01-01T00:00:00.000000Z"


def settings_for(
    policies: list[Path], models: list[Path] | None = None, **extra: object
) -> GovernanceSettings:
    return GovernanceSettings(
        policy_dirs=tuple(policies),
        model_dirs=tuple(models or ()),
        provider=ProviderPreference.CPU,
        runtime=RUNTIME,
        max_interpreters=1,
        **extra,  # type: ignore[arg-type]
    )


def step(
    *artifacts: StepArtifact, labels: dict[str, str] | None = None, **options: object
) -> StepRequest:
    return StepRequest(
        workflow_id="wf",
        step_id="s",
        mode="flight-plan",
        receipt={"engine_id": "e", "status": "success"},
        artifacts=artifacts,
        context=PolicyContext(labels=labels or {}, workspace_root="/ws"),
        options=Options(**options),  # type: ignore[arg-type]
    )


def body_artifact(name: str, body: bytes) -> StepArtifact:
    document = {
        "artifact_type": "file",
        "action": "update",
        "mime": "text/plain",
        "body_file": "body.data",
    }
    return StepArtifact(
        name, "evidence", name, hashlib.sha256(body).hexdigest(), len(body), document, body
    )


# --- digests ----------------------------------------------------------------------------------


async def test_the_governance_hash_follows_its_documented_recipe_and_every_input(
    tmp_path: Path,
) -> None:
    bundle = write_votes_bundle(tmp_path / "bundle")
    models = write_tiny_model(tmp_path / "models" / "tiny")
    base = load_governance(settings_for([bundle], [models]))
    try:
        manifest = json.loads((models / "manifest.json").read_text())
        assert base.policy_digest == policy_digest(bundle)
        assert base.governance_hash == canonical_hash(
            {
                "policy_digest": base.policy_digest,
                "models": [["tiny", "0.0.1", manifest["sha256"], canonical_hash(manifest)]],
                "aggregation": "most_restrictive",
                "domain_models": {"preflight": ["tiny"], "mcp": ["tiny"], "llm": ["tiny"]},
            }
        )
        hashes = {base.governance_hash}
        variants = [
            settings_for([bundle], [models], aggregation=AggregationMethod.MAJORITY),
            settings_for([bundle], [models], domain_models={PolicyDomain.PREFLIGHT: ()}),
            settings_for([bundle], []),
        ]
        for variant in variants:
            other = load_governance(variant)
            hashes.add(other.governance_hash)
            await other.aclose()
        manifest["thresholds"]["flagged"][0]["min_score"] = 0.8  # same weights, other decisions
        (models / "manifest.json").write_text(json.dumps(manifest))
        changed = load_governance(settings_for([bundle], [models]))
        hashes.add(changed.governance_hash)
        await changed.aclose()
        assert len(hashes) == 5
    finally:
        await base.aclose()


async def test_several_bundles_are_one_policy_set_with_a_prefixed_digest(tmp_path: Path) -> None:
    first = write_votes_bundle(tmp_path / "one")
    (first / "mcp.rego").unlink()
    second = tmp_path / "two"
    second.mkdir()
    (second / "mcp.rego").write_text(
        'package cabincrew.mcp.other\n\nimport rego.v1\n\ndecision := "allow"\n'
    )
    governance = load_governance(settings_for([first, second]))
    try:
        assert governance.policy_error is None
        files = sorted(
            [f"{i}/{p.name}", hashlib.sha256(p.read_bytes()).hexdigest()]
            for i, folder in enumerate((first, second))
            for p in folder.iterdir()
        )
        assert governance.policy_digest == canonical_hash(files)
    finally:
        await governance.aclose()
    (second / "again.rego").write_text((first / "vote_a.rego").read_text())
    clash = load_governance(settings_for([first, second]))
    try:
        assert clash.policy_error is not None and not clash.serving
    finally:
        await clash.aclose()


async def test_a_forbidden_builtin_or_an_empty_set_leaves_a_denying_snapshot(
    tmp_path: Path,
) -> None:
    bundle = write_votes_bundle(tmp_path / "bundle")
    (bundle / "vote_a.rego").write_text(
        "package cabincrew.preflight.vote_a\n\nimport rego.v1\n\n"
        'decision := "allow" if time.now_ns() > 0\n'
    )
    governance = load_governance(settings_for([bundle]))
    try:
        assert governance.policy_error is not None and not governance.serving
        (result,) = governance.evaluate_policies(PolicyDomain.PREFLIGHT, {})
        assert result.decision is Decision.DENY
    finally:
        await governance.aclose()
    with pytest.raises(ValueError):
        settings_for([])


# --- reload rules and leases -------------------------------------------------------------------


async def test_reload_rules_refuse_broken_policies_and_models_that_break_a_working_set(
    tmp_path: Path,
) -> None:
    bundle = write_votes_bundle(tmp_path / "bundle")
    good_models = write_tiny_model(tmp_path / "good" / "tiny")
    bad_models = write_tiny_model(tmp_path / "bad" / "tiny")
    (bad_models / "model.onnx").write_bytes(b"not onnx")
    broken_bundle = write_votes_bundle(tmp_path / "broken")
    (broken_bundle / "vote_a.rego").write_text("package cabincrew.preflight.vote_a\ndecision := \n")

    working = load_governance(settings_for([bundle], [good_models]))
    failing = load_governance(settings_for([bundle], [bad_models]))
    unloadable = load_governance(settings_for([broken_bundle], [good_models]))
    try:
        assert accept_reload(working, working) is None
        assert accept_reload(working, failing) is not None
        assert accept_reload(working, unloadable) is not None
        assert accept_reload(failing, working) is None
        assert accept_reload(failing, failing) is None  # nothing is lost by taking it
        assert accept_reload(failing, unloadable) is not None
    finally:
        for governance in (working, failing, unloadable):
            await governance.aclose()


async def test_a_leased_snapshot_outlives_a_swap_and_closes_after_its_last_lease(
    tmp_path: Path,
) -> None:
    bundle = write_votes_bundle(tmp_path / "bundle")
    models = write_tiny_model(tmp_path / "models" / "tiny")
    old = load_governance(settings_for([bundle], [models]))
    new = load_governance(settings_for([bundle], [models], aggregation=AggregationMethod.MAJORITY))
    holder = GovernanceHolder(old)
    async with holder.lease() as leased:
        holder.swap(new)
        assert holder.current is new and leased is old
        scores = await leased.registry.classify("tiny", ["attack"])  # still open
        assert scores[0].decision is Decision.DENY
        async with holder.lease() as fresh:
            assert fresh is new
    await holder.aclose()
    with pytest.raises(BatcherClosed):
        await old.registry.classify("tiny", ["x"])
    with pytest.raises(BatcherClosed):
        await new.registry.classify("tiny", ["x"])


async def test_preflight_reload_keeps_the_old_set_when_the_new_one_does_not_load(
    tmp_path: Path,
) -> None:
    bundle = write_votes_bundle(tmp_path / "bundle")
    settings = settings_for([bundle])
    preflight = Preflight(GovernanceHolder(load_governance(settings)), Limits(), None, workers=1)
    try:
        before = preflight.governance
        (bundle / "vote_a.rego").write_text("package cabincrew.preflight.vote_a\ndecision := \n")
        with pytest.raises(GovernanceLoadError):
            await preflight.reload(lambda: load_governance(settings))
        assert preflight.governance is before and preflight.serving()
    finally:
        await preflight.aclose()


# --- aggregation laws -----------------------------------------------------------------------------

DECISIONS = st.sampled_from(list(Decision))
METHODS = st.sampled_from(list(AggregationMethod))


def vote(decision: Decision, failure: bool = False) -> Evaluation:
    return Evaluation(Source.OPA, "p", decision, "", {}, AT, failure)


@settings(max_examples=200, deadline=None)
@given(st.lists(DECISIONS, max_size=12), METHODS)
def test_a_failure_is_deny_under_every_method_however_many_allow(
    decisions: list[Decision], method: AggregationMethod
) -> None:
    evaluations = [vote(d) for d in decisions] + [vote(Decision.DENY, failure=True)]
    decision, failures = combine(evaluations, method)
    assert decision is Decision.DENY and failures


@settings(max_examples=200, deadline=None)
@given(st.lists(DECISIONS, min_size=1, max_size=12), METHODS)
def test_without_failures_the_method_alone_decides(
    decisions: list[Decision], method: AggregationMethod
) -> None:
    from cabincrew.decisions import aggregate

    decision, failures = combine([vote(d) for d in decisions], method)
    assert failures == () and decision is aggregate(method, decisions)


def test_no_evaluation_at_all_is_deny() -> None:
    for method in AggregationMethod:
        decision, failures = combine([], method)
        assert decision is Decision.DENY and failures


# --- artifacts and secrets ----------------------------------------------------------------------


async def test_an_artifact_without_body_is_verified_by_bytes_encoding_or_plan_token(
    tmp_path: Path,
) -> None:
    preflight = Preflight(
        GovernanceHolder(load_governance(settings_for([write_votes_bundle(tmp_path / "b")]))),
        Limits(),
        None,
        workers=1,
    )
    document = {
        "action": "note",
        "artifact_type": "message",
        "mime": "application/json",
        "body": {"n": 1.5},
    }
    engine_bytes = engine_encoding(document)
    other_bytes = json.dumps(document).encode()

    def no_body(raw: bytes, artifact_json: bytes | None = None) -> StepArtifact:
        return StepArtifact(
            "note",
            "log",
            "note",
            hashlib.sha256(raw).hexdigest(),
            len(raw),
            document,
            artifact_json=artifact_json,
        )

    try:
        verdicts = {
            "engine encoding": await preflight.evaluate_step(step(no_body(engine_bytes))),
            "own bytes": await preflight.evaluate_step(step(no_body(other_bytes, other_bytes))),
            "unverifiable": await preflight.evaluate_step(step(no_body(other_bytes))),
            "lying bytes": await preflight.evaluate_step(step(no_body(other_bytes, engine_bytes))),
        }
        assert {k: v.decision for k, v in verdicts.items()} == {
            "engine encoding": Decision.ALLOW,
            "own bytes": Decision.ALLOW,
            "unverifiable": Decision.DENY,
            "lying bytes": Decision.DENY,
        }
        assert verdicts["unverifiable"].evaluations[0].policy_id == GATE_ARTIFACTS
    finally:
        await preflight.aclose()


async def test_reasons_and_evidence_are_redacted_even_when_a_policy_echoes_a_body(
    tmp_path: Path,
) -> None:
    bundle = write_votes_bundle(tmp_path / "bundle")
    (bundle / "echo.rego").write_text(
        "package cabincrew.preflight.echo\n\nimport rego.v1\n\n"
        'decision := "warn"\n\n'
        "reasons contains input.artifacts[0].body_text\n\n"
        'evidence := {"body": input.artifacts[0].body_text}\n'
    )
    preflight = Preflight(
        GovernanceHolder(load_governance(settings_for([bundle]))), Limits(), None, workers=1
    )
    canary = "AKIA" + "QWERTYUIOPASDFGH"
    try:
        verdict = await preflight.evaluate_step(
            step(body_artifact("leak", f"key={canary}\n".encode()))
        )
        echo = next(e for e in verdict.evaluations if e.policy_id == "cabincrew.preflight.echo")
        assert echo.decision is Decision.WARN
        assert canary not in json.dumps(echo.to_protocol()) and canary not in json.dumps(
            list(verdict.warnings)
        )
        assert "[REDACTED:" in echo.reason
    finally:
        await preflight.aclose()


async def test_in_process_verdicts_are_deterministic_for_equal_requests(tmp_path: Path) -> None:
    bundle = write_votes_bundle(tmp_path / "bundle")
    models = write_tiny_model(tmp_path / "models" / "tiny")
    preflight = Preflight(
        GovernanceHolder(load_governance(settings_for([bundle], [models]))),
        Limits(),
        None,
        workers=2,
    )
    request = step(
        body_artifact("a", b"suspicious\n"),
        body_artifact("b", b"attack\n"),
        labels={"vote_b": "warn"},
    )
    try:
        first = await preflight.evaluate_step(request)
        second = await preflight.evaluate_step(request)
        assert first.comparable() == second.comparable()
        assert first.evaluation_id != second.evaluation_id
        assert first.decision is Decision.DENY
    finally:
        await preflight.aclose()


def test_the_engine_encoding_is_what_the_engine_library_writes(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "engines" / "_lib" / "enginekit.py"
    spec = importlib.util.spec_from_file_location("enginekit_for_test", path)
    assert spec is not None and spec.loader is not None
    enginekit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(enginekit)
    run = enginekit.Run("e", "flight-plan", {}, str(tmp_path), str(tmp_path), None)
    entry = run.write_artifact(
        "note",
        "log",
        artifact_type="message",
        action="note",
        mime="text/plain",
        body={"b": "é", "a": [1, 2.5, None]},
        metadata={"k": "v"},
    )
    document = json.loads((tmp_path / "note" / "artifact.json").read_text(encoding="utf-8"))
    assert entry["hash"] == hashlib.sha256(engine_encoding(document)).hexdigest()


async def test_content_larger_than_the_limit_is_denied_without_being_judged_in_part(
    tmp_path: Path,
) -> None:
    preflight = Preflight(
        GovernanceHolder(load_governance(settings_for([write_votes_bundle(tmp_path / "b")]))),
        Limits(max_body_bytes=64, max_total_bytes=64),
        None,
        workers=1,
    )
    small = ContentRequest(PolicyDomain.LLM, "request", {"prompt": "hi"})
    large = ContentRequest(PolicyDomain.LLM, "request", {"prompt": "x" * 100})
    try:
        assert (await preflight.evaluate_content(small)).decision is Decision.ALLOW
        verdict = await preflight.evaluate_content(large)
        assert verdict.decision is Decision.DENY and verdict.failures
        assert verdict.evaluations[0].policy_id == GATE_CONTENT
    finally:
        await preflight.aclose()
