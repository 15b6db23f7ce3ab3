"""Artifact validation, step outputs and the content-addressed store."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from cabincrew import protocol_schema
from cabincrew.canonical import canonical_hash
from orchestrator_svc.artifacts import (
    ArtifactLimits,
    ArtifactStore,
    Role,
    StoredArtifact,
    extract_outputs,
    is_safe_name,
    validate_artifacts,
)
from orchestrator_svc.errors import ArtifactIntegrityError, ArtifactValidationError

BASE = {"artifact_type": "test", "action": "none", "mime": "application/json"}


def write(
    root: Path,
    name: str,
    document: dict[str, Any] | None = None,
    body: bytes | None = None,
    role: str = "evidence",
    raw: bytes | None = None,
) -> dict[str, Any]:
    """Write one artifact the way an engine would and return its receipt entry."""
    directory = root / name
    directory.mkdir(parents=True)
    doc = dict(document if document is not None else BASE)
    if body is not None:
        doc["body_file"] = "body.data"
        (directory / "body.data").write_bytes(body)
    encoded = raw if raw is not None else json.dumps(doc, sort_keys=True, indent=2).encode() + b"\n"
    (directory / "artifact.json").write_bytes(encoded)
    hashed = body if body is not None else encoded
    return {
        "name": name,
        "role": role,
        "path": name,
        "hash": hashlib.sha256(hashed).hexdigest(),
        "size": len(hashed),
    }


def receipt(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"artifacts": list(entries)}


def problems_of(root: Path, declared: dict[str, Any], **kwargs: Any) -> tuple[str, ...]:
    with pytest.raises(ArtifactValidationError) as caught:
        validate_artifacts(root, declared, **kwargs)
    return caught.value.problems


def test_valid_artifacts_come_back_sorted_with_their_integrity_data(tmp_path: Path) -> None:
    b = write(tmp_path, "b-state", body=b"patch body", role="state")
    a = write(tmp_path, "a-evidence", {**BASE, "body": {"k": 1}, "metadata": {"n": 2}})
    artifacts = validate_artifacts(tmp_path, receipt(b, a))
    assert [item.name for item in artifacts] == ["a-evidence", "b-state"]
    evidence, state = artifacts
    assert evidence.role is Role.EVIDENCE and state.role is Role.STATE
    assert evidence.body_sha256 is None and evidence.hash == a["hash"]
    assert state.body_sha256 == hashlib.sha256(b"patch body").hexdigest()
    assert state.metadata_sha256 == canonical_hash({**BASE, "body_file": "body.data"})
    for item in artifacts:
        assert protocol_schema.errors("EngineArtifact", item.descriptor()) == []
        assert protocol_schema.errors("Artifact", dict(item.document)) == []


def test_an_empty_artifacts_dir_with_no_declared_artifacts_is_valid(tmp_path: Path) -> None:
    assert validate_artifacts(tmp_path, {}) == ()


@pytest.mark.parametrize(
    "name", [".hidden", "a..b", "-dash", "sp ace", "x" * 129, "ünï", "a/b"[0:0] + "..", "é"]
)
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    assert not is_safe_name(name)


def test_an_artifact_with_an_unsafe_name_is_refused(tmp_path: Path) -> None:
    entry = write(tmp_path, ".sneaky")
    problems = problems_of(tmp_path, receipt(entry))
    assert len(problems) >= 1


def test_names_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, receipt(write(tmp_path, "Plan"), write(tmp_path, "plan")))
    assert len(problems) == 1


def test_a_symlinked_artifact_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    entry = write(real, "real")
    root = tmp_path / "artifacts"
    root.mkdir()
    (root / "real").symlink_to(real / "real")
    problems_of(root, receipt(entry))


def test_a_symlinked_artifact_json_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps(BASE))
    root = tmp_path / "artifacts"
    (root / "x").mkdir(parents=True)
    (root / "x" / "artifact.json").symlink_to(outside)
    problems_of(
        root, receipt({"name": "x", "role": "evidence", "path": "x", "hash": "0" * 64, "size": 1})
    )


def test_a_symlinked_artifacts_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    entry = write(real, "a")
    (tmp_path / "link").symlink_to(real)
    problems_of(tmp_path / "link", receipt(entry))


def test_stray_files_subdirectories_and_special_files_are_refused(tmp_path: Path) -> None:
    entries = [write(tmp_path, name) for name in ("a", "b", "c", "d")]
    (tmp_path / "a" / "notes.txt").write_text("extra")
    (tmp_path / "b" / "nested").mkdir()
    os.mkfifo(tmp_path / "c" / "body.data")
    (tmp_path / "top-level-file").write_text("x")
    problems = problems_of(tmp_path, receipt(*entries))
    assert len(problems) == 5  # three bad artifacts, the stray top-level file, and it undeclared


def test_a_hard_linked_body_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "workspace-file"
    outside.write_bytes(b"data")
    root = tmp_path / "artifacts"
    entry = write(root, "a", body=b"data")
    (root / "a" / "body.data").unlink()
    os.link(outside, root / "a" / "body.data")
    problems_of(root, receipt(entry))


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({"artifact_type": "t", "action": "a"}).encode(),  # mime missing
        json.dumps({**BASE, "role": "state"}).encode(),  # unknown field
        b'{"artifact_type": "t", "action": "a", "mime": "m", "mime": "n"}',  # duplicate key
        json.dumps({**BASE, "metadata": {"big": 2**60}}).encode(),  # outside I-JSON
        b'{"artifact_type": "t", "action": "a", "mime": NaN}',
        "\ufeff{}".encode("utf-16"),
    ],
)
def test_invalid_artifact_json_is_refused(tmp_path: Path, raw: bytes) -> None:
    entry = write(tmp_path, "a", raw=raw)
    problems_of(tmp_path, receipt(entry))


def test_body_file_must_agree_with_the_presence_of_body_data(tmp_path: Path) -> None:
    missing_body = write(tmp_path, "claims-body", {**BASE, "body_file": "body.data"})
    (tmp_path / "undeclared-body").mkdir()
    (tmp_path / "undeclared-body" / "artifact.json").write_text(json.dumps(BASE))
    (tmp_path / "undeclared-body" / "body.data").write_text("x")
    other = {
        "name": "undeclared-body",
        "role": "log",
        "path": "undeclared-body",
        "hash": hashlib.sha256(b"x").hexdigest(),
        "size": 1,
    }
    problems = problems_of(tmp_path, receipt(missing_body, other))
    assert len(problems) == 2


def test_oversize_artifacts_and_totals_are_refused(tmp_path: Path) -> None:
    entries = [write(tmp_path, f"a{i}", body=b"x" * 600) for i in range(3)]
    limits = ArtifactLimits(max_body_bytes=500)
    assert len(problems_of(tmp_path, receipt(*entries), limits=limits)) == 3
    total = ArtifactLimits(max_total_bytes=1500)
    assert len(problems_of(tmp_path, receipt(*entries), limits=total)) == 1
    few = ArtifactLimits(max_artifacts=2)
    problems_of(tmp_path, receipt(*entries), limits=few)


def test_every_difference_from_the_receipt_is_listed(tmp_path: Path) -> None:
    good = write(tmp_path, "good")
    wrong_hash = {**write(tmp_path, "wrong-hash", body=b"abc"), "hash": "0" * 64}
    wrong_size = {**write(tmp_path, "wrong-size", body=b"abc"), "size": 4}
    write(tmp_path, "undeclared")
    missing = {"name": "missing", "role": "state", "path": "missing", "hash": "1" * 64, "size": 1}
    bad_role = {**write(tmp_path, "bad-role"), "role": "secret-sauce"}
    bad_path = {**write(tmp_path, "bad-path"), "path": "../bad-path"}
    no_size = {key: value for key, value in write(tmp_path, "no-size").items() if key != "size"}
    twice = dict(good)
    problems = problems_of(
        tmp_path, receipt(good, wrong_hash, wrong_size, missing, bad_role, bad_path, no_size, twice)
    )
    assert len(problems) == 8


def test_an_artifact_holding_a_secret_value_is_refused(tmp_path: Path) -> None:
    secret = "sk-live-0123456789"
    in_body = write(tmp_path, "in-body", body=b"x" * ((1 << 20) - 5) + secret.encode())
    in_json = write(tmp_path, "in-json", {**BASE, "metadata": {"token": secret}})
    problems = problems_of(tmp_path, receipt(in_body, in_json), secrets={"API_KEY": secret})
    assert len(problems) == 2
    assert all(secret not in problem for problem in problems)


def test_excluded_names_are_ignored_on_disk(tmp_path: Path) -> None:
    write(tmp_path, "restored-state", role="state")
    new = write(tmp_path, "result", role="log")
    artifacts = validate_artifacts(tmp_path, receipt(new), exclude={"restored-state"})
    assert [item.name for item in artifacts] == ["result"]


def test_outputs_come_from_metrics_and_the_outputs_artifact(tmp_path: Path) -> None:
    inline = write(tmp_path, "outputs", {**BASE, "body": {"changed": "true", "files": 3}})
    artifacts = validate_artifacts(tmp_path, receipt(inline))
    metrics = {"metrics": [{"name": "files", "value": 1}, {"name": "lines", "value": 10}]}
    assert extract_outputs(metrics, tmp_path, artifacts) == {
        "files": 3,
        "lines": 10,
        "changed": "true",
    }


def test_outputs_may_be_a_json_body_file(tmp_path: Path) -> None:
    entry = write(tmp_path, "outputs", body=json.dumps({"url": "https://x"}).encode())
    artifacts = validate_artifacts(tmp_path, receipt(entry))
    assert extract_outputs({}, tmp_path, artifacts) == {"url": "https://x"}


@pytest.mark.parametrize(
    ("document", "body", "role"),
    [
        ({**BASE, "body": ["not", "an", "object"]}, None, "evidence"),
        (BASE, b"not json", "evidence"),
        ({**BASE, "body": {"a": 1}}, None, "state"),
    ],
)
def test_a_malformed_outputs_artifact_is_refused(
    tmp_path: Path, document: dict[str, Any], body: bytes | None, role: str
) -> None:
    entry = write(tmp_path, "outputs", document, body=body, role=role)
    artifacts = validate_artifacts(tmp_path, receipt(entry))
    with pytest.raises(ArtifactValidationError):
        extract_outputs({}, tmp_path, artifacts)


def stored(tmp_path: Path) -> tuple[ArtifactStore, tuple[StoredArtifact, ...], Path]:
    source = tmp_path / "flight"
    entries = [
        write(
            source,
            "edit-001",
            {**BASE, "metadata": {"path": "a.txt"}},
            body=b"--- a\n+++ b\n",
            role="state",
        ),
        write(source, "summary", {**BASE, "body": {"files": 1}}),
        write(source, "duplicate-body", body=b"--- a\n+++ b\n", role="log"),
    ]
    artifacts = validate_artifacts(source, receipt(*entries))
    store = ArtifactStore(tmp_path / "store")
    return store, store.put(source, artifacts), source


def test_the_store_keeps_read_only_files_named_by_their_hash(tmp_path: Path) -> None:
    store, records, _ = stored(tmp_path)
    body_digest = hashlib.sha256(b"--- a\n+++ b\n").hexdigest()
    path = store.object_path(body_digest)
    assert path.read_bytes() == b"--- a\n+++ b\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    objects = [p for p in (tmp_path / "store" / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 4  # three artifact.json files and one shared body
    assert [StoredArtifact.from_dict(json.loads(json.dumps(r.to_dict()))) for r in records] == list(
        records
    )


def test_materialise_restores_state_artifacts_that_validate_again(tmp_path: Path) -> None:
    store, records, _ = stored(tmp_path)
    target = tmp_path / "take-off-artifacts"
    assert store.materialise(records, target) == ("edit-001",)
    (record,) = [r for r in records if r.name == "edit-001"]
    declared = {
        "name": "edit-001",
        "role": "state",
        "path": "edit-001",
        "hash": record.body_sha256,
        "size": record.body_size,
    }
    (again,) = validate_artifacts(target, receipt(declared))
    (original,) = [a for a in store.load(records) if a.name == "edit-001"]
    assert again.plan_artifact() == original.plan_artifact()
    assert stat.S_IMODE((target / "edit-001" / "body.data").stat().st_mode) == 0o444


def test_a_changed_stored_file_is_an_integrity_error(tmp_path: Path) -> None:
    store, records, _ = stored(tmp_path)
    path = store.object_path(records[0].body_sha256 or "")
    os.chmod(path, 0o644)
    path.write_bytes(b"--- a\n+++ evil\n")
    with pytest.raises(ArtifactIntegrityError):
        store.materialise(records, tmp_path / "target")
    with pytest.raises(ArtifactIntegrityError):
        store.load(records)
    with pytest.raises(ArtifactIntegrityError):
        store.read(records[0].body_sha256 or "")


def test_a_deleted_stored_file_is_an_integrity_error(tmp_path: Path) -> None:
    store, records, _ = stored(tmp_path)
    store.object_path(records[1].artifact_json_sha256).unlink()
    with pytest.raises(ArtifactIntegrityError):
        store.load(records)


def test_load_rebuilds_the_same_plan_artifacts(tmp_path: Path) -> None:
    source = tmp_path / "flight"
    entry = write(
        source, "edit-001", {**BASE, "metadata": {"path": "a.txt"}}, body=b"diff", role="state"
    )
    artifacts = validate_artifacts(source, receipt(entry))
    store = ArtifactStore(tmp_path / "store")
    records = store.put(source, artifacts)
    assert [a.plan_artifact() for a in store.load(records)] == [
        a.plan_artifact() for a in artifacts
    ]


def test_a_file_changed_after_validation_is_not_stored(tmp_path: Path) -> None:
    source = tmp_path / "flight"
    entry = write(source, "edit-001", body=b"original", role="state")
    artifacts = validate_artifacts(source, receipt(entry))
    (source / "edit-001" / "body.data").write_bytes(b"swapped!")
    with pytest.raises(ArtifactIntegrityError):
        ArtifactStore(tmp_path / "store").put(source, artifacts)


def test_materialise_needs_an_empty_destination(tmp_path: Path) -> None:
    store, records, _ = stored(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    (target / "leftover").write_text("x")
    with pytest.raises(ArtifactIntegrityError):
        store.materialise(records, target)


def test_records_with_unsafe_names_or_digests_are_refused() -> None:
    good = {"name": "a", "role": "state", "artifact_json_sha256": "a" * 64, "artifact_json_size": 1}
    StoredArtifact.from_dict(good)
    for bad in (
        {**good, "name": "../x"},
        {**good, "artifact_json_sha256": "../../etc/passwd"},
        {**good, "role": "x"},
    ):
        with pytest.raises(ValueError):
            StoredArtifact.from_dict(bad)
