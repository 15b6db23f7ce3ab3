"""Loading, compiling and evaluating policy bundles, and the fail-closed rules."""

from __future__ import annotations

import json
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from cabincrew.decisions import Decision
from cabincrew.redaction import generate_example
from preflight_svc.errors import (
    EmptyPolicySetError,
    ForbiddenBuiltinError,
    PolicyDataError,
    PolicyInputError,
    PolicyLoadError,
    PolicySyntaxError,
    PreflightError,
    UnsupportedConstructError,
)
from preflight_svc.governance import DEFAULT_POLICY_DIR
from preflight_svc.opa import (
    PolicyBundle,
    PolicyDomain,
    PolicyResult,
    _entrypoint,
    _from_outcome,
    evaluate_file,
    load_bundle,
    policy_digest,
    run_policy_tests,
)
from preflight_svc.policy_input import ArtifactInput, PolicyContext, build_preflight_input

PREFLIGHT = (PolicyDomain.PREFLIGHT,)

ALLOW = """package cabincrew.preflight.allow_all
import rego.v1
decision := "allow"
reasons := {"nothing to see"}
"""

BY_ENVIRONMENT = """package cabincrew.preflight.env
import rego.v1
default decision := "allow"
decision := "require_approval" if input.context.environment == "production"
reasons contains "production" if decision == "require_approval"
required_role := "release-manager" if decision == "require_approval"
evidence := {"environment": input.context.environment}
"""


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def evaluate_one(
    root: Path, source: str, document: dict[str, object]
) -> tuple[Decision, tuple[str, ...]]:
    bundle = load_bundle(write(root, {"p.rego": source}), domains=PREFLIGHT, max_interpreters=1)
    (result,) = bundle.evaluate(PolicyDomain.PREFLIGHT, document)
    return result.decision, result.reasons


def test_a_bundle_yields_one_result_per_package_with_the_package_as_id(tmp_path: Path) -> None:
    bundle = load_bundle(
        write(tmp_path, {"a.rego": ALLOW, "sub/b.rego": BY_ENVIRONMENT}), domains=PREFLIGHT
    )
    results = bundle.evaluate(PolicyDomain.PREFLIGHT, {"context": {"environment": "production"}})
    assert [r.policy_id for r in results] == [
        "cabincrew.preflight.allow_all",
        "cabincrew.preflight.env",
    ]
    allow, env = results
    assert allow.decision is Decision.ALLOW and allow.reasons == ("nothing to see",)
    assert env.decision is Decision.REQUIRE_APPROVAL
    assert env.required_role == "release-manager"
    assert env.evidence == {"environment": "production"}


def test_packages_are_discovered_per_domain_and_test_files_are_not_policies(tmp_path: Path) -> None:
    files = {
        "pre.rego": ALLOW,
        "mcp.rego": 'package cabincrew.mcp.tools\ndecision := "allow"\n',
        "lib.rego": "package cabincrew.lib.x\ny := 1\n",
        "pre_test.rego": (
            "package cabincrew.preflight.allow_all_test\nimport rego.v1\ntest_x if true\n"
        ),
    }
    bundle = load_bundle(write(tmp_path, files), domains=(PolicyDomain.PREFLIGHT, PolicyDomain.MCP))
    assert bundle.packages(PolicyDomain.PREFLIGHT) == ("cabincrew.preflight.allow_all",)
    assert bundle.packages(PolicyDomain.MCP) == ("cabincrew.mcp.tools",)
    assert bundle.packages(PolicyDomain.LLM) == ()


def test_data_json_files_are_mounted_at_their_folder(tmp_path: Path) -> None:
    files = {
        "data.json": json.dumps({"limits": {"max": 3}}),
        "teams/data.json": json.dumps({"owners": ["a"]}),
        "p.rego": (
            "package cabincrew.preflight.data\nimport rego.v1\n"
            'decision := "deny" if { data.limits.max == 3; data.teams.owners == ["a"] }\n'
        ),
    }
    bundle = load_bundle(write(tmp_path, files), domains=PREFLIGHT)
    (result,) = bundle.evaluate(PolicyDomain.PREFLIGHT, {})
    assert result.decision is Decision.DENY


def test_an_empty_folder_does_not_load(tmp_path: Path) -> None:
    with pytest.raises(EmptyPolicySetError):
        load_bundle(tmp_path)


def test_a_bundle_without_a_package_for_a_governed_domain_does_not_load(tmp_path: Path) -> None:
    write(tmp_path, {"a.rego": ALLOW})
    with pytest.raises(EmptyPolicySetError) as caught:
        load_bundle(tmp_path, domains=(PolicyDomain.PREFLIGHT, PolicyDomain.LLM))
    assert caught.value.missing == ("llm",)


def test_a_missing_folder_does_not_load(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError):
        load_bundle(tmp_path / "nope")


@pytest.mark.parametrize(
    ("call", "builtin"),
    [
        ('http.send({"method": "get", "url": "http://localhost"})', "http.send"),
        ('net.lookup_ip_addr("localhost")', "net.lookup_ip_addr"),
        ('net.cidr_contains("10.0.0.0/8", "10.1.1.1")', "net.cidr_contains"),
        ("time.now_ns()", "time.now_ns"),
        ('rand.intn("seed", 10)', "rand.intn"),
        ('uuid.rfc4122("seed")', "uuid.rfc4122"),
        ("opa.runtime()", "opa.runtime"),
    ],
)
def test_forbidden_builtins_are_refused_at_load_with_file_and_line(
    tmp_path: Path, call: str, builtin: str
) -> None:
    source = f"package cabincrew.preflight.bad\nimport rego.v1\n\nx := v if {{\n\tv := {call}\n}}\n"
    write(tmp_path, {"a.rego": ALLOW, "nested/bad.rego": source})
    with pytest.raises(ForbiddenBuiltinError) as caught:
        load_bundle(tmp_path, domains=PREFLIGHT)
    (violation,) = caught.value.violations
    assert (violation.path, violation.line, violation.builtin) == ("nested/bad.rego", 5, builtin)
    assert caught.value.remedy()


def test_forbidden_builtins_in_test_files_are_refused_too(tmp_path: Path) -> None:
    test = (
        "package cabincrew.preflight.allow_all_test\nimport rego.v1\ntest_t if time.now_ns() > 0\n"
    )
    write(tmp_path, {"a.rego": ALLOW, "a_test.rego": test})
    with pytest.raises(ForbiddenBuiltinError):
        load_bundle(tmp_path, domains=PREFLIGHT)
    with pytest.raises(ForbiddenBuiltinError):
        run_policy_tests(tmp_path)


def test_whole_input_replacement_is_refused_because_the_engine_crashes_on_it(
    tmp_path: Path,
) -> None:
    test = (
        "package cabincrew.preflight.allow_all_test\nimport rego.v1\n"
        'test_t if { data.cabincrew.preflight.allow_all.decision == "allow" with input as {} }\n'
    )
    write(tmp_path, {"a.rego": ALLOW, "a_test.rego": test})
    with pytest.raises(UnsupportedConstructError):
        run_policy_tests(tmp_path)


def test_functions_sharing_a_name_with_different_arities_are_refused(tmp_path: Path) -> None:
    other = "package cabincrew.lib.other\nimport rego.v1\nf(a, b) := a\n"
    mine = ALLOW + "f(a) := a\n"
    write(tmp_path, {"a.rego": mine, "b.rego": other})
    with pytest.raises(UnsupportedConstructError):
        load_bundle(tmp_path, domains=PREFLIGHT)


def test_a_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    write(
        tmp_path,
        {"a.rego": ALLOW, "bad.rego": "package cabincrew.preflight.bad\n\ndecision := if {\n"},
    )
    with pytest.raises(PolicySyntaxError) as caught:
        load_bundle(tmp_path, domains=PREFLIGHT)
    assert caught.value.path == "bad.rego"
    assert caught.value.line == 3


def test_an_unknown_function_is_a_load_error_not_a_deny_per_request(tmp_path: Path) -> None:
    source = (
        "package cabincrew.preflight.bad\nimport rego.v1\ndecision := x if { x := foo.bar(1) }\n"
    )
    write(tmp_path, {"bad.rego": source})
    with pytest.raises(PolicySyntaxError):
        load_bundle(tmp_path, domains=PREFLIGHT)


def test_data_json_that_is_not_an_object_does_not_load(tmp_path: Path) -> None:
    write(tmp_path, {"a.rego": ALLOW, "data.json": "[1, 2]"})
    with pytest.raises(PolicyDataError):
        load_bundle(tmp_path, domains=PREFLIGHT)


def test_two_data_json_files_setting_the_same_key_do_not_load(tmp_path: Path) -> None:
    files = {
        "a.rego": ALLOW,
        "data.json": json.dumps({"x": {"y": 1}}),
        "x/data.json": json.dumps({"y": 2}),
    }
    write(tmp_path, files)
    with pytest.raises(PolicyDataError):
        load_bundle(tmp_path, domains=PREFLIGHT)


def test_load_errors_are_preflight_errors_with_a_remedy(tmp_path: Path) -> None:
    with pytest.raises(PreflightError) as caught:
        load_bundle(tmp_path)
    assert caught.value.remedy()


def test_a_runtime_type_error_denies_with_the_error_as_reason(tmp_path: Path) -> None:
    source = (
        "package cabincrew.preflight.typed\nimport rego.v1\n"
        'decision := "allow" if { concat(",", input.x) }\n'
    )
    decision, reasons = evaluate_one(tmp_path, source, {"x": 1})
    assert decision is Decision.DENY
    assert reasons and "eval_type_error" in reasons[0]


def test_a_builtin_error_denies_instead_of_being_undefined(tmp_path: Path) -> None:
    source = (
        "package cabincrew.preflight.div\nimport rego.v1\n"
        'default decision := "allow"\n'
        'decision := "deny" if { 1 / input.n > 1 }\n'
    )
    decision, _ = evaluate_one(tmp_path, source, {"n": 0})
    assert decision is Decision.DENY


def test_conflicting_outputs_deny_with_the_error_as_reason(tmp_path: Path) -> None:
    source = (
        "package cabincrew.preflight.conflict\nimport rego.v1\n"
        'decision := "allow" if input.a\n'
        'decision := "warn" if input.b\n'
    )
    decision, reasons = evaluate_one(tmp_path, source, {"a": True, "b": True})
    assert decision is Decision.DENY
    assert "eval_conflict_error" in reasons[0]


def test_an_undefined_decision_denies(tmp_path: Path) -> None:
    source = 'package cabincrew.preflight.silent\nimport rego.v1\ndecision := "allow" if input.ok\n'
    decision, _ = evaluate_one(tmp_path, source, {"ok": False})
    assert decision is Decision.DENY


@pytest.mark.parametrize("value", ['"yes"', "true", '["allow"]', '"ALLOW"'])
def test_a_decision_that_is_not_one_of_the_four_denies(tmp_path: Path, value: str) -> None:
    decision, _ = evaluate_one(
        tmp_path, f"package cabincrew.preflight.odd\ndecision := {value}\n", {}
    )
    assert decision is Decision.DENY


def test_a_required_role_that_is_not_a_string_denies(tmp_path: Path) -> None:
    source = (
        'package cabincrew.preflight.role\ndecision := "require_approval"\nrequired_role := 7\n'
    )
    decision, _ = evaluate_one(tmp_path, source, {})
    assert decision is Decision.DENY


def test_one_failing_policy_does_not_change_the_others_verdicts(tmp_path: Path) -> None:
    broken = (
        "package cabincrew.preflight.broken\nimport rego.v1\n"
        'decision := "allow" if { concat(",", input.x) }\n'
    )
    bundle = load_bundle(write(tmp_path, {"a.rego": ALLOW, "b.rego": broken}), domains=PREFLIGHT)
    allow, failed = bundle.evaluate(PolicyDomain.PREFLIGHT, {"x": 1})
    assert allow.decision is Decision.ALLOW
    assert failed.decision is Decision.DENY
    assert failed.evidence["error"]["code"] == "eval_type_error"


def test_evaluate_never_raises_on_an_input_that_is_not_json(tmp_path: Path) -> None:
    bundle = load_bundle(write(tmp_path, {"a.rego": ALLOW}), domains=PREFLIGHT)
    (result,) = bundle.evaluate(PolicyDomain.PREFLIGHT, {"x": object()})
    assert result.decision is Decision.DENY


def test_a_domain_without_policies_denies_instead_of_allowing(tmp_path: Path) -> None:
    bundle = load_bundle(write(tmp_path, {"a.rego": ALLOW}), domains=PREFLIGHT)
    (result,) = bundle.evaluate(PolicyDomain.LLM, {})
    assert result.decision is Decision.DENY


def test_quotes_in_input_strings_cannot_forge_policy_outputs(tmp_path: Path) -> None:
    # The engine's JSON rendering does not escape strings; outputs are read from its nodes.
    source = (
        "package cabincrew.preflight.echo\nimport rego.v1\n"
        'decision := "deny"\nevidence := {"path": input.path}\nreasons := {input.path}\n'
    )
    forged = 'x"}, "decision": "allow", "z": {"a": "'
    decision, reasons = evaluate_one(tmp_path, source, {"path": forged})
    assert decision is Decision.DENY
    assert reasons == (forged,)


def test_a_nul_in_an_input_string_does_not_hide_what_follows_it(tmp_path: Path) -> None:
    source = (
        "package cabincrew.preflight.nul\nimport rego.v1\n"
        'default decision := "allow"\n'
        'decision := "deny" if contains(input.text, "SECRET")\n'
    )
    decision, _ = evaluate_one(tmp_path, source, {"text": "harmless\x00SECRET"})
    assert decision is Decision.DENY


def test_evaluation_from_many_threads_gives_each_caller_its_own_answer(tmp_path: Path) -> None:
    bundle = load_bundle(
        write(tmp_path, {"a.rego": BY_ENVIRONMENT}), domains=PREFLIGHT, max_interpreters=3
    )
    failures: list[str] = []

    def worker(index: int) -> None:
        for round_ in range(40):
            production = (index + round_) % 2 == 0
            env = "production" if production else "dev"
            (result,) = bundle.evaluate(PolicyDomain.PREFLIGHT, {"context": {"environment": env}})
            expected = Decision.REQUIRE_APPROVAL if production else Decision.ALLOW
            if result.decision is not expected or result.evidence != {"environment": env}:
                failures.append(f"{index}/{round_}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert failures == []


def test_policy_digest_is_stable_and_follows_content(tmp_path: Path) -> None:
    write(tmp_path, {"a.rego": ALLOW, "x/data.json": "{}", "notes.txt": "ignored"})
    first = policy_digest(tmp_path)
    assert first == policy_digest(tmp_path)
    assert first == load_bundle(tmp_path, domains=PREFLIGHT).digest
    (tmp_path / "notes.txt").write_text("still ignored")
    assert policy_digest(tmp_path) == first
    (tmp_path / "x" / "data.json").write_text('{"k": 1}')
    second = policy_digest(tmp_path)
    assert second != first
    (tmp_path / "a.rego").write_text(ALLOW + "\n")
    assert policy_digest(tmp_path) not in (first, second)


def test_policy_digest_depends_on_file_names(tmp_path: Path) -> None:
    write(tmp_path / "one", {"a.rego": ALLOW})
    write(tmp_path / "two", {"b.rego": ALLOW})
    assert policy_digest(tmp_path / "one") != policy_digest(tmp_path / "two")


def test_rego_tests_report_pass_fail_and_error_per_test(tmp_path: Path) -> None:
    tests = (
        "package cabincrew.preflight.env_test\nimport rego.v1\n"
        "import data.cabincrew.preflight.env\n"
        "test_production_needs_approval if {\n"
        '\tenv.decision == "require_approval" with input.context.environment as "production"\n'
        "}\n"
        "test_wrong_expectation if {\n"
        '\tenv.decision == "deny" with input.context.environment as "dev"\n'
        "}\n"
        "test_errors if { 1 / 0 }\n"
    )
    write(tmp_path, {"env.rego": BY_ENVIRONMENT, "env_test.rego": tests})
    results = {r.name: r for r in run_policy_tests(tmp_path)}
    assert results["test_production_needs_approval"].passed
    assert not results["test_wrong_expectation"].passed
    assert results["test_wrong_expectation"].error is not None
    assert not results["test_errors"].passed
    assert results["test_production_needs_approval"].test_id == (
        "data.cabincrew.preflight.env_test.test_production_needs_approval"
    )


def test_a_bundle_without_tests_reports_none(tmp_path: Path) -> None:
    assert run_policy_tests(write(tmp_path, {"a.rego": ALLOW})) == []


def test_evaluate_file_validates_then_aggregates_most_restrictively(tmp_path: Path) -> None:
    bundle = write(tmp_path / "bundle", {"a.rego": ALLOW, "b.rego": BY_ENVIRONMENT})
    document = {
        "kind": "preflight",
        "workflow_id": "wf",
        "step_id": "s",
        "mode": "flight-plan",
        "receipt": {"engine_id": "e", "status": "success"},
        "artifacts": [],
        "context": {"environment": "production"},
        "stats": {
            "files_deleted": 0,
            "files_changed": 0,
            "lines_added": 0,
            "lines_removed": 0,
            "secrets_found": [],
        },
    }
    path = tmp_path / "input.json"
    path.write_text(json.dumps(document))
    evaluation = evaluate_file(path, bundle)
    assert evaluation.domain is PolicyDomain.PREFLIGHT
    assert evaluation.decision is Decision.REQUIRE_APPROVAL
    assert evaluation.policy_digest == policy_digest(bundle)
    assert evaluation.to_json()["results"][1]["required_role"] == "release-manager"


def test_evaluate_file_refuses_an_invalid_document(tmp_path: Path) -> None:
    bundle = write(tmp_path / "bundle", {"a.rego": ALLOW})
    path = tmp_path / "input.json"
    path.write_text(json.dumps({"kind": "preflight"}))
    with pytest.raises(PolicyInputError):
        evaluate_file(path, bundle)
    path.write_text("not json")
    with pytest.raises(PolicyInputError):
        evaluate_file(path, bundle)


def _one_query_per_package(
    bundle: PolicyBundle, domain: PolicyDomain, document: dict[str, Any]
) -> tuple[PolicyResult, ...]:
    """The reference: each policy's wrapper queried on its own, as the fallback does."""
    with bundle._pool.lease() as engine:
        engine.set_input(document)
        return tuple(
            _from_outcome(package, engine.query(_entrypoint(domain, i)))
            for i, package in enumerate(bundle.packages(domain))
        )


def _preflight_documents() -> list[dict[str, Any]]:
    def document(target: str, body: str, environment: str, lines: int) -> dict[str, Any]:
        data = body.encode()
        artifact = ArtifactInput(
            "edit",
            "evidence",
            "edit",
            "0" * 64,
            len(data),
            {"artifact_type": "diff", "action": "update", "target": target, "mime": "text/x-diff"},
            data,
        )
        built = build_preflight_input(
            workflow_id="wf",
            step_id="s",
            mode="flight-plan",
            receipt={"engine_id": "e", "mode": "flight-plan", "status": "success"},
            artifacts=[artifact],
            context=PolicyContext(environment=environment, workspace_root="/ws"),
        )
        built["stats"]["lines_added"] = lines
        return built

    key = generate_example("aws-access-key-id", random.Random(3))
    return [
        document("src/app.py", "+print('hello')\n", "staging", 1),
        document(".env", "+TOKEN=1\n", "production", 1),
        document("../../etc/passwd", f"+aws = '{key}'\n", "staging", 5000),
        document(".github/workflows/ci.yml", "+on: push\n", "Production", 300),
    ]


def test_the_single_query_gives_each_default_policy_its_verdict_when_queried_alone() -> None:
    bundle = load_bundle(DEFAULT_POLICY_DIR)
    for document in _preflight_documents():
        single = bundle.evaluate(PolicyDomain.PREFLIGHT, document)
        assert single == _one_query_per_package(bundle, PolicyDomain.PREFLIGHT, document)
    decisions = {
        r.decision for d in _preflight_documents() for r in bundle.evaluate(PREFLIGHT[0], d)
    }
    assert decisions >= {Decision.ALLOW, Decision.DENY, Decision.REQUIRE_APPROVAL}


def test_with_a_broken_policy_each_policy_still_gets_its_verdict_when_queried_alone(
    tmp_path: Path,
) -> None:
    root = tmp_path / "bundle"
    shutil.copytree(DEFAULT_POLICY_DIR, root)
    broken = (
        "package cabincrew.preflight.broken\nimport rego.v1\n"
        'decision := "allow" if { concat(",", input.stats.lines_added) }\n'
    )
    write(root, {"preflight/broken.rego": broken})
    bundle = load_bundle(root)
    for document in _preflight_documents():
        results = bundle.evaluate(PolicyDomain.PREFLIGHT, document)
        assert results == _one_query_per_package(bundle, PolicyDomain.PREFLIGHT, document)
        failed = {r.policy_id: r for r in results}["cabincrew.preflight.broken"]
        assert failed.decision is Decision.DENY
        assert failed.evidence["error"]["code"] == "eval_type_error"
