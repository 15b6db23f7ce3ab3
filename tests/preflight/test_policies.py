"""The default policy bundle in policies/: its own Rego tests, and decisions on real inputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from cabincrew.decisions import AggregationMethod, Decision, aggregate
from preflight_svc.opa import PolicyBundle, PolicyDomain, load_bundle, run_policy_tests
from preflight_svc.policy_input import (
    ArtifactInput,
    ChangeStats,
    PolicyContext,
    SecretFinding,
    build_content_input,
    build_preflight_input,
    validate_policy_input,
)

POLICIES = Path(__file__).resolve().parents[2] / "policies"

Phase = Literal["request", "response"]


@pytest.fixture(scope="module")
def bundle() -> Iterator[PolicyBundle]:
    yield load_bundle(POLICIES, max_interpreters=1)


def file_artifact(target: str, body: bytes = b"x = 1\n", action: str = "update") -> ArtifactInput:
    document = {"artifact_type": "file", "action": action, "target": target, "mime": "text/plain"}
    return ArtifactInput("change", "evidence", "change", "0" * 64, len(body), document, body)


def preflight_input(
    artifacts: list[ArtifactInput],
    *,
    environment: str = "dev",
    secrets: list[SecretFinding] | None = None,
    stats: ChangeStats | None = None,
) -> dict[str, Any]:
    document = build_preflight_input(
        workflow_id="wf",
        step_id="step",
        mode="flight-plan",
        receipt={"engine_id": "file-patch", "status": "success"},
        artifacts=artifacts,
        context=PolicyContext(environment=environment, repository="acme/app", workspace_root="/w"),
        secrets_found=secrets or [],
        stats=stats,
    )
    validate_policy_input(document)
    return document


def verdict(bundle: PolicyBundle, domain: PolicyDomain, document: dict[str, Any]) -> Decision:
    results = bundle.evaluate(domain, document)
    return aggregate(AggregationMethod.MOST_RESTRICTIVE, (r.decision for r in results))


def by_policy(
    bundle: PolicyBundle, domain: PolicyDomain, document: dict[str, Any]
) -> dict[str, Any]:
    return {r.policy_id: r for r in bundle.evaluate(domain, document)}


def test_every_rego_test_of_the_default_bundle_passes() -> None:
    results = run_policy_tests(POLICIES)
    assert len(results) > 40
    assert [r.test_id for r in results if not r.passed] == []


def test_the_default_bundle_has_policies_for_every_domain(bundle: PolicyBundle) -> None:
    assert bundle.packages(PolicyDomain.PREFLIGHT) == (
        "cabincrew.preflight.change_size",
        "cabincrew.preflight.environment",
        "cabincrew.preflight.paths",
        "cabincrew.preflight.secrets",
    )
    assert bundle.packages(PolicyDomain.MCP)
    assert bundle.packages(PolicyDomain.LLM)


def test_a_benign_change_is_allowed(bundle: PolicyBundle) -> None:
    document = preflight_input([file_artifact("src/app.py", b"def f():\n    return 1\n")])
    results = bundle.evaluate(PolicyDomain.PREFLIGHT, document)
    assert [r.decision for r in results] == [Decision.ALLOW] * 4


def test_a_protected_file_is_denied(bundle: PolicyBundle) -> None:
    results = by_policy(bundle, PolicyDomain.PREFLIGHT, preflight_input([file_artifact(".env")]))
    paths = results["cabincrew.preflight.paths"]
    assert paths.decision is Decision.DENY
    assert paths.reasons == ("artifact change targets .env, an environment file",)


def test_a_path_climbing_out_of_the_workspace_is_denied(bundle: PolicyBundle) -> None:
    document = preflight_input([file_artifact("../outside.txt")])
    assert verdict(bundle, PolicyDomain.PREFLIGHT, document) is Decision.DENY


def test_ci_configuration_requires_approval(bundle: PolicyBundle) -> None:
    document = preflight_input([file_artifact(".github/workflows/ci.yml")])
    assert verdict(bundle, PolicyDomain.PREFLIGHT, document) is Decision.REQUIRE_APPROVAL


def test_a_secret_found_by_the_scanner_is_denied(bundle: PolicyBundle) -> None:
    document = preflight_input(
        [file_artifact("src/config.py")],
        secrets=[SecretFinding("aws_access_key", artifact="change", line=1)],
    )
    results = by_policy(bundle, PolicyDomain.PREFLIGHT, document)
    assert results["cabincrew.preflight.secrets"].decision is Decision.DENY


def test_a_private_key_in_a_body_is_denied_even_without_the_scanner(bundle: PolicyBundle) -> None:
    body = b"-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n"
    results = by_policy(
        bundle, PolicyDomain.PREFLIGHT, preflight_input([file_artifact("k.txt", body)])
    )
    assert results["cabincrew.preflight.secrets"].decision is Decision.DENY


def test_fifty_deletions_require_approval(bundle: PolicyBundle) -> None:
    artifacts = [file_artifact(f"old/{i}.py", b"", action="delete") for i in range(50)]
    results = by_policy(bundle, PolicyDomain.PREFLIGHT, preflight_input(artifacts))
    change_size = results["cabincrew.preflight.change_size"]
    assert change_size.decision is Decision.REQUIRE_APPROVAL
    assert change_size.evidence["findings"][0]["value"] == 50


def test_a_large_diff_warns(bundle: PolicyBundle) -> None:
    stats = ChangeStats(files_changed=5, lines_added=450, lines_removed=100)
    document = preflight_input([file_artifact("src/app.py")], stats=stats)
    assert verdict(bundle, PolicyDomain.PREFLIGHT, document) is Decision.WARN


def test_production_requires_a_release_manager(bundle: PolicyBundle) -> None:
    document = preflight_input([file_artifact("src/app.py")], environment="production")
    results = by_policy(bundle, PolicyDomain.PREFLIGHT, document)
    environment = results["cabincrew.preflight.environment"]
    assert environment.decision is Decision.REQUIRE_APPROVAL
    assert environment.required_role == "release-manager"
    assert verdict(bundle, PolicyDomain.PREFLIGHT, document) is Decision.REQUIRE_APPROVAL


def mcp_call(name: str, arguments: dict[str, Any], phase: Phase = "request") -> dict[str, Any]:
    payload = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }
    document = build_content_input(
        domain="mcp",
        phase=phase,
        payload=payload,
        context={"workspace_root": "/w"},
    )
    validate_policy_input(document)
    return document


def test_an_ordinary_mcp_call_is_allowed(bundle: PolicyBundle) -> None:
    document = mcp_call("write_file", {"path": "src/a.py", "content": "print(1)\n"})
    assert verdict(bundle, PolicyDomain.MCP, document) is Decision.ALLOW


def test_an_mcp_call_outside_the_workspace_is_denied(bundle: PolicyBundle) -> None:
    document = mcp_call("read_file", {"path": "/etc/passwd"})
    assert verdict(bundle, PolicyDomain.MCP, document) is Decision.DENY


def test_an_mcp_call_on_a_protected_file_is_denied(bundle: PolicyBundle) -> None:
    document = mcp_call("read_file", {"path": "deploy/id_rsa"})
    assert verdict(bundle, PolicyDomain.MCP, document) is Decision.DENY


def test_a_dangerous_mcp_tool_requires_approval(bundle: PolicyBundle) -> None:
    document = mcp_call("run_command", {"command": "make test"})
    assert verdict(bundle, PolicyDomain.MCP, document) is Decision.REQUIRE_APPROVAL


def test_an_mcp_response_carrying_a_key_is_denied(bundle: PolicyBundle) -> None:
    payload = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"content": [{"type": "text", "text": "AKIAIOSFODNN7EXAMPLE"}]},
    }
    document = build_content_input(domain="mcp", phase="response", payload=payload, context={})
    assert verdict(bundle, PolicyDomain.MCP, document) is Decision.DENY


def llm(phase: Phase, payload: dict[str, Any]) -> dict[str, Any]:
    document = build_content_input(domain="llm", phase=phase, payload=payload, context={})
    validate_policy_input(document)
    return document


def test_an_ordinary_prompt_is_allowed(bundle: PolicyBundle) -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "Summarise this diff."}]}
    assert verdict(bundle, PolicyDomain.LLM, llm("request", request)) is Decision.ALLOW


def test_a_prompt_asking_for_secrets_is_denied(bundle: PolicyBundle) -> None:
    request = {
        "model": "m",
        "messages": [{"role": "user", "content": "Print all environment variables"}],
    }
    assert verdict(bundle, PolicyDomain.LLM, llm("request", request)) is Decision.DENY


def test_a_response_containing_a_secret_is_denied(bundle: PolicyBundle) -> None:
    response = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": "token: ghp_abcdefghijklmnopqrstuvwxyz0123456789",
                }
            }
        ]
    }
    assert verdict(bundle, PolicyDomain.LLM, llm("response", response)) is Decision.DENY


def test_a_harmless_response_is_allowed(bundle: PolicyBundle) -> None:
    response = {"choices": [{"message": {"role": "assistant", "content": "Done."}}]}
    assert verdict(bundle, PolicyDomain.LLM, llm("response", response)) is Decision.ALLOW
