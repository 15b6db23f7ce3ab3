"""Plan-tokens: determinism, tamper detection, signatures and the protocol JSON."""

from __future__ import annotations

import base64
import copy
import hashlib
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import rfc8785

from cabincrew import protocol_schema
from cabincrew.plantoken import (
    PlanArtifact,
    PlanBinding,
    PlanToken,
    PlanTokenError,
    diff_tokens,
    integrity_check,
    sign_plan_token,
    verify_signed,
)
from cabincrew.signing import Ed25519Signer

H = {c: c * 64 for c in "0123456789abcdef"}
WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def binding(**overrides: object) -> PlanBinding:
    values: dict[str, object] = {
        "workflow_id": "wf-1",
        "step_id": "plan",
        "engine_id": "cabincrew.file-patch",
        "model": "none",
        "workspace_hash": H["a"],
        "policy_digest": H["b"],
        "governance_hash": H["c"],
        "artifacts": (
            PlanArtifact("edit-001", "state", H["1"], H["2"], 120),
            PlanArtifact("summary", "evidence", H["3"], None, 40),
        ),
    }
    values.update(overrides)
    return PlanBinding(**values)  # type: ignore[arg-type]


def test_the_token_is_sha256_of_the_canonical_binding_document() -> None:
    document = binding().document()
    assert binding().token == hashlib.sha256(rfc8785.dumps(document)).hexdigest()
    artifact = document["artifacts"][0]
    assert set(artifact) == {"name", "role", "metadata_sha256", "body_sha256", "size"}
    assert (
        PlanArtifact.from_binding(artifact).hash
        == hashlib.sha256(rfc8785.dumps(artifact)).hexdigest()
    )


def test_the_token_has_a_fixed_known_answer() -> None:
    # Pins the rule documented in docs/workflows.md: any change to it must be deliberate.
    assert binding().token == KNOWN_TOKEN


def test_the_token_does_not_depend_on_artifact_order_or_creation_time() -> None:
    shuffled = binding(artifacts=tuple(reversed(binding().artifacts)))
    assert shuffled.token == binding().token
    early = PlanToken.create(binding(), WHEN)
    late = PlanToken.create(binding(), WHEN + timedelta(days=3))
    assert early.token == late.token
    assert early.to_protocol()["created_at"] == "2025-01-02T03:04:05.000000Z"


@pytest.mark.parametrize(
    "change",
    [
        {"workflow_id": "wf-2"},
        {"step_id": "apply"},
        {"engine_id": "cabincrew.command"},
        {"model": "gpt-x"},
        {"workspace_hash": H["d"]},
        {"policy_digest": H["e"]},
        {"policy_digest": None},
        {"governance_hash": H["f"]},
        {"protocol_version": "2"},
        {
            "artifacts": (
                PlanArtifact("edit-001", "evidence", H["1"], H["2"], 120),
                binding().artifacts[1],
            )
        },
        {
            "artifacts": (
                PlanArtifact("edit-001", "state", H["4"], H["2"], 120),
                binding().artifacts[1],
            )
        },
        {
            "artifacts": (
                PlanArtifact("edit-001", "state", H["1"], H["5"], 120),
                binding().artifacts[1],
            )
        },
        {
            "artifacts": (
                PlanArtifact("edit-001", "state", H["1"], None, 120),
                binding().artifacts[1],
            )
        },
        {
            "artifacts": (
                PlanArtifact("edit-001", "state", H["1"], H["2"], 121),
                binding().artifacts[1],
            )
        },
        {
            "artifacts": (
                PlanArtifact("edit-002", "state", H["1"], H["2"], 120),
                binding().artifacts[1],
            )
        },
        {"artifacts": binding().artifacts[:1]},
    ],
)
def test_any_change_to_the_binding_changes_the_token_and_is_listed(
    change: dict[str, object],
) -> None:
    changed = binding(**change)
    assert changed.token != binding().token
    assert len(diff_tokens(binding(), changed)) >= 1


def test_differences_read_as_sentences() -> None:
    changed = binding(
        workspace_hash=H["d"],
        artifacts=(
            PlanArtifact("edit-001", "state", H["1"], H["5"], 121),
            PlanArtifact("extra", "log", H["6"], None, 1),
        ),
    )
    assert diff_tokens(binding(), changed) == [
        f"workspace hash changed ({H['a'][:12]}… -> {H['d'][:12]}…)",
        "artifact edit-001 hash changed (body changed, size 120 -> 121)",
        "artifact extra added",
        "artifact summary missing",
    ]
    assert diff_tokens(binding(), binding()) == []


def test_the_protocol_json_validates_against_the_schema() -> None:
    token = PlanToken.create(binding(), WHEN)
    document = token.to_protocol()
    assert protocol_schema.errors("PlanToken", document) == []
    assert document["token"] == token.token
    assert [a["name"] for a in document["artifacts"]] == ["edit-001", "summary"]
    assert document["artifacts"][0]["hash"] == binding().artifacts[0].hash
    minimal = PlanToken.create(
        binding(policy_digest=None, governance_hash=None), WHEN
    ).to_protocol()
    assert "policy_digest" not in minimal
    assert protocol_schema.errors("PlanToken", minimal) == []


def test_a_token_round_trips_and_refuses_inconsistency() -> None:
    token = PlanToken.create(binding(), WHEN)
    assert PlanToken.from_dict(copy.deepcopy(token.to_dict())) == token
    tampered = token.to_dict()
    tampered["binding"]["workspace_hash"] = H["e"]
    with pytest.raises(PlanTokenError):
        PlanToken.from_dict(tampered)
    mismatched = token.to_dict()
    mismatched["plan_token"]["model"] = "other"
    with pytest.raises(PlanTokenError):
        PlanToken.from_dict(mismatched)
    unsorted = token.to_dict()
    unsorted["binding"]["artifacts"].reverse()
    with pytest.raises(PlanTokenError):
        PlanToken.from_dict(unsorted)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: PlanArtifact("a", "secret", H["1"], None, 1),
        lambda: PlanArtifact("a", "state", "xyz", None, 1),
        lambda: PlanArtifact("a", "state", H["1"], "nothex", 1),
        lambda: PlanArtifact("a", "state", H["1"], None, -1),
        lambda: PlanArtifact("", "state", H["1"], None, 1),
        lambda: binding(workflow_id=""),
        lambda: binding(artifacts=(binding().artifacts[0], binding().artifacts[0])),
        lambda: binding(version="2"),
        lambda: PlanToken(binding(), "yesterday"),
        lambda: PlanToken.create(binding(), datetime(2025, 1, 1)),
    ],
)
def test_malformed_plans_are_refused(bad: object) -> None:
    with pytest.raises(PlanTokenError):
        bad()  # type: ignore[operator]


def test_created_at_is_stored_in_utc() -> None:
    local = datetime(2025, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert PlanToken.create(binding(), local).created_at == "2025-01-02T03:04:05.000000Z"


def test_a_signed_token_verifies_and_any_tampering_is_detected() -> None:
    signer = Ed25519Signer.generate()
    envelope = sign_plan_token(PlanToken.create(binding(), WHEN), signer).to_dict()
    assert verify_signed(envelope) == []
    assert verify_signed(envelope, trusted_public_key=signer.public_key_bytes()) == []

    other = Ed25519Signer.generate()
    assert verify_signed(envelope, trusted_public_key=other.public_key_bytes())

    mutations: list[Callable[[dict[str, Any]], object]] = [
        lambda e: e["binding"].__setitem__("workspace_hash", H["f"]),
        lambda e: e["binding"]["artifacts"][0].__setitem__("size", 999),
        lambda e: e["plan_token"].__setitem__("token", H["0"]),
        lambda e: e["plan_token"]["artifacts"].pop(),
        lambda e: e.__setitem__("signature", base64.b64encode(b"\0" * 64).decode()),
        lambda e: e.__setitem__("signature", "not base64!"),
        lambda e: e.__setitem__("key_id", "0" * 16),
        lambda e: e.__setitem__("algorithm", "rsa"),
        lambda e: e.__setitem__("extra", 1),
    ]
    for mutate in mutations:
        tampered = copy.deepcopy(envelope)
        mutate(tampered)
        assert verify_signed(tampered), mutate


def test_a_consistent_token_re_signed_by_an_attacker_fails_only_the_trust_check() -> None:
    signer, attacker = Ed25519Signer.generate(), Ed25519Signer.generate()
    forged = sign_plan_token(
        PlanToken.create(binding(workspace_hash=H["9"]), WHEN), attacker
    ).to_dict()
    assert verify_signed(forged) == []
    assert len(verify_signed(forged, trusted_public_key=signer.public_key_bytes())) == 1


def test_the_signed_envelope_exposes_its_token() -> None:
    token = PlanToken.create(binding(), WHEN)
    signed = sign_plan_token(token, Ed25519Signer.generate())
    assert signed.token() == token
    assert signed.key_id == signed.to_dict()["key_id"]


def test_integrity_checks_are_valid_audit_integrity_objects() -> None:
    expected = PlanToken.create(binding(), WHEN)
    same = integrity_check(expected, PlanToken.create(binding(), WHEN + timedelta(hours=1)))
    assert same["plan_token_match"] and same["artifacts_match"] and same["differences"] == []
    drifted = integrity_check(expected, PlanToken.create(binding(workspace_hash=H["d"]), WHEN))
    assert not drifted["plan_token_match"] and drifted["artifacts_match"]
    tampered = integrity_check(
        expected, PlanToken.create(binding(artifacts=binding().artifacts[:1]), WHEN)
    )
    assert not tampered["artifacts_match"] and tampered["differences"] == [
        "artifact summary missing"
    ]
    broken = integrity_check(expected, None, ["stored object missing"])
    assert broken["differences"] == ["stored object missing"] and "actual_plan_token" not in broken
    for result in (same, drifted, tampered, broken):
        assert protocol_schema.errors("AuditIntegrity", result) == []


def test_replace_keeps_invariants() -> None:
    with pytest.raises(PlanTokenError):
        replace(binding(), model="")


KNOWN_TOKEN = "ec9fe5b0810d9cc404e2610d523f3edd161c2cb95326fbfbc581453d82cc9d36"
