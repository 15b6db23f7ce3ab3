"""``cabincrew audit`` as a user runs it, against a real server; and the export as an
independent verifier would check it (the protocol schema, RFC 8785, RFC 6962)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import rfc8785

from audit_svc.checkpoint import parse_and_verify
from audit_svc.merkle import root_from_leaves
from cabincrew.convert import to_protocol, validate_protocol
from tests.audit.conftest import AuditServer, FakeAudit, event, run_cli, serve_fake

pytestmark = pytest.mark.timeout(90)


def _write_events(path: Path, count: int, prefix: str = "cli") -> list[dict[str, Any]]:
    documents = []
    for i in range(count):
        document = to_protocol(event(i, prefix=prefix))
        document["workflow"] = {"workflow_id": f"wf-{i % 3}"}
        documents.append(document)
    documents[5]["message"] = "deploy key AKIAIOSFODNN7EXAMPLE leaked"
    path.write_text("".join(json.dumps(d) + "\n" for d in documents), encoding="utf-8")
    return documents


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _independent_leaf(event_document: dict[str, Any]) -> bytes:
    body = {
        k: v
        for k, v in event_document.items()
        if k not in ("chain_hash", "signature", "signature_key_ref")
    }
    return hashlib.sha256(b"\x00" + rfc8785.dumps(body)).digest()


async def test_append_export_and_offline_verification_round_trip(
    sqlite_audit: AuditServer, tmp_path: Path
) -> None:
    port, data_dir = sqlite_audit.port, sqlite_audit.config.data_path
    source = tmp_path / "events.jsonl"
    _write_events(source, 40)

    code, out, _ = await run_cli(
        "audit", "append", str(source), "--json", port=port, data_dir=data_dir
    )
    assert code == 0
    acks = _json_lines(out)
    assert acks == [{"event_id": f"cli-{i}", "sequence": i, "duplicate": False} for i in range(40)]
    code, out, _ = await run_cli(
        "audit", "append", str(source), "--json", port=port, data_dir=data_dir
    )
    assert code == 0
    assert all(ack["duplicate"] for ack in _json_lines(out))

    checkpoint_file = tmp_path / "checkpoint.json"
    code, out, _ = await run_cli(
        "audit", "checkpoint", "--json", "--out", str(checkpoint_file), port=port, data_dir=data_dir
    )
    assert code == 0
    checkpoint = json.loads(out)
    assert set(checkpoint) == {"origin", "tree_size", "root_hash", "note", "public_key"}
    assert json.loads(checkpoint_file.read_text()) == checkpoint

    export_file = tmp_path / "export.jsonl"
    code, _, _ = await run_cli(
        "audit", "export", "--out", str(export_file), port=port, data_dir=data_dir
    )
    assert code == 0
    lines = _json_lines(export_file.read_text(encoding="utf-8"))

    # What an independent verifier does, with none of our code but the tree definition.
    assert [line["sequence"] for line in lines] == list(range(40))
    chain = bytes(32)
    leaves = []
    for line in lines:
        assert list(line) == ["sequence", "event", "leaf_hash", "chain_hash"]
        assert validate_protocol(line["event"], "AuditEvent") == []
        leaf = _independent_leaf(line["event"])
        chain = hashlib.sha256(chain + leaf).digest()
        assert (line["leaf_hash"], line["chain_hash"]) == (leaf.hex(), chain.hex())
        assert line["event"]["chain_hash"] == chain.hex()
        leaves.append(leaf)
    signed = parse_and_verify(checkpoint["note"], checkpoint["public_key"])
    assert signed.size == checkpoint["tree_size"] == 40
    assert root_from_leaves(leaves) == signed.root == bytes.fromhex(checkpoint["root_hash"])
    assert "AKIAIOSFODNN7EXAMPLE" not in export_file.read_text(encoding="utf-8")

    code, out, _ = await run_cli(
        "audit",
        "verify",
        "--export",
        str(export_file),
        "--checkpoint",
        str(checkpoint_file),
        "--json",
        port=port,
        data_dir=data_dir,
    )
    assert code == 0
    assert json.loads(out)["ok"] is True

    lines[7]["event"]["message"] = "rewritten history"
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    code, out, _ = await run_cli(
        "audit",
        "verify",
        "--export",
        str(tampered),
        "--checkpoint",
        str(checkpoint_file),
        "--json",
        port=port,
        data_dir=data_dir,
    )
    assert code != 0
    assert json.loads(out)["first_bad_sequence"] == 7


async def test_offline_verification_needs_no_server(
    tmp_path: Path, sqlite_audit: AuditServer
) -> None:
    for i in range(5):
        await sqlite_audit.client.append(event(i))
    port, data_dir = sqlite_audit.port, sqlite_audit.config.data_path
    export_file, checkpoint_file = tmp_path / "e.jsonl", tmp_path / "c.json"
    await run_cli(
        "audit", "checkpoint", "--out", str(checkpoint_file), port=port, data_dir=data_dir
    )
    await run_cli("audit", "export", "--out", str(export_file), port=port, data_dir=data_dir)
    # Nothing listens on port 1.
    code, out, _ = await run_cli(
        "audit",
        "verify",
        "--export",
        str(export_file),
        "--checkpoint",
        str(checkpoint_file),
        port=1,
        data_dir=tmp_path,
    )
    assert code == 0
    assert out.startswith("ok: 5 entries")


async def test_online_verify_and_prove_through_the_cli(sqlite_audit: AuditServer) -> None:
    for i in range(9):
        await sqlite_audit.client.append(event(i))
    port, data_dir = sqlite_audit.port, sqlite_audit.config.data_path
    code, out, _ = await run_cli("audit", "verify", "--json", port=port, data_dir=data_dir)
    assert (code, json.loads(out)["ok"], json.loads(out)["tree_size"]) == (0, True, 9)
    code, out, _ = await run_cli("audit", "prove", "6", "--json", port=port, data_dir=data_dir)
    assert code == 0
    proof = json.loads(out)
    assert (proof["verified"], proof["tree_size"], len(proof["hashes"])) == (True, 9, 4)


async def test_query_and_tail_print_matching_entries(sqlite_audit: AuditServer) -> None:
    for i in range(6):
        await sqlite_audit.client.append(
            event(i, event_type="approval.created" if i % 2 else "test.other")
        )
    port, data_dir = sqlite_audit.port, sqlite_audit.config.data_path
    code, out, _ = await run_cli(
        "audit", "query", "--event-type-prefix", "approval.", "--json", port=port, data_dir=data_dir
    )
    assert code == 0
    assert [line["sequence"] for line in _json_lines(out)] == [1, 3, 5]
    code, out, _ = await run_cli(
        "audit", "tail", "--from", "2", "--limit", "3", "--json", port=port, data_dir=data_dir
    )
    assert code == 0
    assert [line["event"]["event_id"] for line in _json_lines(out)] == ["ev-2", "ev-3", "ev-4"]


async def test_append_reports_bad_lines_and_refusals_and_exits_non_zero(
    sqlite_audit: AuditServer, tmp_path: Path
) -> None:
    good = to_protocol(event(0))
    missing_state = {**to_protocol(event(1)), "workflow_state": ""}
    source = tmp_path / "mixed.jsonl"
    source.write_text(
        json.dumps(good) + "\nnot json\n" + json.dumps(missing_state) + "\n", encoding="utf-8"
    )
    code, out, err = await run_cli(
        "audit",
        "append",
        str(source),
        "--json",
        port=sqlite_audit.port,
        data_dir=sqlite_audit.config.data_path,
    )
    assert code == 1
    assert _json_lines(out) == [{"event_id": "ev-0", "sequence": 0, "duplicate": False}]
    assert "line 2" in err and "line 3" in err


@pytest.mark.parametrize("batches", [True, False], ids=["batching", "before-batches"])
async def test_append_sends_a_file_in_batches_or_one_by_one_to_a_service_without_them(
    tmp_path: Path, data_dir: Path, batches: bool
) -> None:
    fake = FakeAudit(batches=batches)
    app = await serve_fake(fake, data_dir)
    source = tmp_path / "events.jsonl"
    documents = _write_events(source, 600, prefix="many")
    try:
        code, out, _ = await run_cli(
            "audit", "append", str(source), "--json", port=app.port, data_dir=data_dir
        )
    finally:
        await app.stop(0)
    assert code == 0
    ids = [d["event_id"] for d in documents]
    assert [ack["event_id"] for ack in _json_lines(out)] == ids
    assert fake.acked == ids
    assert max(fake.request_sizes) <= 256
    if batches:
        assert max(fake.request_sizes) > 1
    else:
        # The first batch may hold one line or many, by how fast the file was read; after
        # its refusal only single events follow.
        assert fake.singly_after_the_first_refused_batch()


async def test_export_ranges_prove_at_a_tree_size_and_online_verify_names_a_tampered_entry(
    sqlite_audit: AuditServer, tmp_path: Path
) -> None:
    from audit_svc.merkle import verify_inclusion
    from tests.audit.test_integrity import _tamper

    port, data_dir = sqlite_audit.port, sqlite_audit.config.data_path
    source = tmp_path / "events.jsonl"
    _write_events(source, 10)
    code, _, err = await run_cli("audit", "append", str(source), port=port, data_dir=data_dir)
    assert code == 0, err

    part = tmp_path / "part.jsonl"
    code, _, err = await run_cli(
        "audit", "export", "--out", str(part), "--from", "3", "--to", "7",
        port=port, data_dir=data_dir,
    )  # fmt: skip
    assert code == 0, err
    assert [line["sequence"] for line in _json_lines(part.read_text())] == [3, 4, 5, 6]

    code, out, err = await run_cli(
        "audit", "prove", "2", "--tree-size", "5", "--json", port=port, data_dir=data_dir
    )
    assert code == 0, err
    proof = json.loads(out)
    assert proof["tree_size"] == 5 and proof["verified"]
    hashes = [bytes.fromhex(h) for h in proof["hashes"]]
    root = bytes.fromhex(proof["root_hash"])
    assert verify_inclusion(bytes.fromhex(proof["leaf_hash"]), 2, 5, hashes, root)
    assert not verify_inclusion(bytes.fromhex(proof["leaf_hash"]), 3, 5, hashes, root)

    code, out, _ = await run_cli("audit", "verify", port=port, data_dir=data_dir)
    assert code == 0 and out.startswith("ok: 10 entries")
    _tamper(sqlite_audit, "UPDATE {table} SET event = replace(event, 'cli-6', 'cli-X')")
    code, out, err = await run_cli("audit", "verify", "--json", port=port, data_dir=data_dir)
    assert code == 1
    assert json.loads(out)["first_bad_sequence"] == 6
