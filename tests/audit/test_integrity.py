"""Append-only storage and tamper evidence: the database refuses changes, and changes made
behind its back (triggers dropped) make verification fail at the right sequence."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from audit_svc.events import GENESIS_CHAIN_HASH, leaf_hash, next_chain_hash
from cabincrew.emitter import OutboxEmitter
from cabincrew.redaction import RULE_IDS, generate_labeled_example
from cabincrew.v1 import common_pb2
from tests.audit.conftest import WAIT, AuditServer, event, start_audit, stop_audit
from tests.conftest import token_for

pytestmark = pytest.mark.timeout(60)

AUDIT_ROOT = Path(__file__).resolve().parents[2] / "audit_svc"


def _engine(server: AuditServer) -> sa.Engine:
    url = server.store_url()
    if url.startswith("sqlite"):
        return sa.create_engine(url)
    return sa.create_engine(url).execution_options(schema_translate_map={"audit": "audit"})


def _table(engine: sa.Engine) -> str:
    return "audit_events" if engine.dialect.name == "sqlite" else "audit.audit_events"


def _tamper(
    server: AuditServer,
    *statements: str,
    params: dict[str, object] | list[dict[str, object]] | None = None,
) -> None:
    """Run SQL behind the service's back, with the append-only triggers dropped."""
    engine = _engine(server)
    table = _table(engine)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("DROP TRIGGER audit_events_refuse_update")
                conn.exec_driver_sql("DROP TRIGGER audit_events_refuse_delete")
            else:
                conn.exec_driver_sql(f"DROP TRIGGER audit_events_refuse_change ON {table}")
            for statement in statements:
                conn.execute(sa.text(statement.format(table=table)), params or {})
    finally:
        engine.dispose()


async def _fill(server: AuditServer, count: int = 8) -> None:
    for i in range(count):
        await server.client.append(event(i))
    await server.client.get_checkpoint(refresh=True)


@pytest.mark.parametrize("statement", ["UPDATE {table} SET event = 'x'", "DELETE FROM {table}"])
async def test_the_database_refuses_update_and_delete(audit: AuditServer, statement: str) -> None:
    await _fill(audit, 2)
    engine = _engine(audit)
    try:
        with pytest.raises(sa.exc.DBAPIError), engine.begin() as conn:
            conn.execute(sa.text(statement.format(table=_table(engine))))
    finally:
        engine.dispose()
    assert (await audit.client.verify_log()).ok


def test_the_service_code_has_no_update_or_delete_path() -> None:
    for path in AUDIT_ROOT.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        pattern = (
            r"\b(sa|sqlalchemy)\.(update|delete)\b|\b(events|checkpoints)\.(update|delete)\b"
            r"|UPDATE\s+\S+\s+SET|DELETE\s+FROM|\bTRUNCATE\s"
        )
        assert not re.search(pattern, text, re.IGNORECASE), path.name


def _swap_rows(table: str) -> list[str]:
    return [
        f"UPDATE {table} SET sequence = -1 WHERE sequence = 2",
        f"UPDATE {table} SET sequence = 2 WHERE sequence = 3",
        f"UPDATE {table} SET sequence = 3 WHERE sequence = -1",
    ]


TAMPERING: dict[str, tuple[list[str], int]] = {
    "edited": (
        ["UPDATE {table} SET event = replace(event, 'event 3', 'event X') WHERE sequence = 3"],
        3,
    ),
    "deleted": (["DELETE FROM {table} WHERE sequence = 3"], 3),
    "reordered": (_swap_rows("{table}"), 2),
    "appended-to-the-end-removed": (["DELETE FROM {table} WHERE sequence = 7"], 7),
}


@pytest.mark.parametrize("kind", list(TAMPERING))
async def test_an_out_of_band_change_fails_verification_at_its_sequence(
    audit: AuditServer, kind: str
) -> None:
    await _fill(audit)
    statements, bad = TAMPERING[kind]
    _tamper(audit, *statements)
    result = await audit.client.verify_log()
    assert not result.ok
    assert result.first_bad_sequence == bad


def _forged_insert(server: AuditServer, position: int) -> None:
    """Insert a forged entry at ``position`` with correct-looking leaf and chain hashes."""
    engine = _engine(server)
    table = _table(engine)
    try:
        with engine.connect() as conn:
            rows = (
                conn.execute(
                    sa.text(f"SELECT * FROM {table} WHERE sequence = :s"), {"s": position - 1}
                )
                .mappings()
                .one()
            )
            previous = bytes(rows["chain_hash"])
    finally:
        engine.dispose()
    forged = json.loads(rows["event"])
    forged["event_id"] = "forged"
    forged["message"] = "nothing to see here"
    text = json.dumps(forged, sort_keys=True, separators=(",", ":"))
    leaf = leaf_hash(text.encode())
    values = {
        **dict(rows),
        "sequence": position,
        "event_id": "forged",
        "event": text,
        "leaf_hash": leaf,
        "chain_hash": next_chain_hash(previous, leaf),
    }
    columns = ", ".join(values)
    placeholders = ", ".join(f":{name}" for name in values)
    _tamper(
        server,
        f"UPDATE {{table}} SET sequence = sequence + 1000 WHERE sequence >= {position}",
        "UPDATE {table} SET sequence = sequence - 999 WHERE sequence >= 1000",
        f"INSERT INTO {{table}} ({columns}) VALUES ({placeholders})",
        params=values,
    )


async def test_an_inserted_entry_fails_verification_at_its_sequence(audit: AuditServer) -> None:
    await _fill(audit)
    _forged_insert(audit, 4)
    result = await audit.client.verify_log()
    assert (result.ok, result.first_bad_sequence) == (False, 4)


async def test_after_a_restart_the_signed_checkpoint_catches_a_consistent_rewrite(
    data_dir: Path, database_url: str
) -> None:
    server = await start_audit(data_dir, database_url)
    await _fill(server)
    # Rewrite entry 5 and recompute every hash after it, as a careful attacker would.
    engine = _engine(server)
    table = _table(engine)
    with engine.connect() as conn:
        rows = [
            dict(r)
            for r in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY sequence")).mappings()
        ]
    engine.dispose()
    rows[5]["event"] = rows[5]["event"].replace("event 5", "event X")
    chain = GENESIS_CHAIN_HASH
    rewritten: list[dict[str, object]] = []
    for row in rows:
        leaf = leaf_hash(row["event"].encode())
        chain = next_chain_hash(chain, leaf)
        rewritten.append({"e": row["event"], "l": leaf, "c": chain, "s": row["sequence"]})
    await stop_audit(server)
    update = "UPDATE {table} SET event = :e, leaf_hash = :l, chain_hash = :c WHERE sequence = :s"
    _tamper(server, update, params=rewritten)
    server = await start_audit(data_dir, database_url)
    try:
        result = await server.client.verify_log()
        assert not result.ok
        assert 0 <= result.first_bad_sequence <= 5
        assert not server.app.handles[0].serving()
    finally:
        await stop_audit(server)


# --- redaction canary -----------------------------------------------------------------------


def _canaries() -> list[tuple[str, str]]:
    rng = random.Random(20240601)
    return [
        (example.text, example.secret)
        for rule in RULE_IDS
        for example in [generate_labeled_example(rule, rng)]
    ]


def _read_all(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())


def _leaks(secret: str, data: bytes) -> list[str]:
    # Any long run of the secret's letters and digits counts, escaped or not.
    runs = re.findall(r"[A-Za-z0-9]{10,}", secret) or [secret]
    return [run for run in runs if run.encode() in data]


def _event_with(text: str, index: int) -> common_pb2.AuditEvent:
    incoming = event(index, message=f"saw {text}")
    incoming.policy.decision = common_pb2.DECISION_DENY
    incoming.policy.workflow_state = "PRE_FLIGHT_RUNNING"
    incoming.policy.violations.append(text)
    evaluation = incoming.policy.policy_evaluations.add(
        source=common_pb2.POLICY_SOURCE_OPA,
        policy_id="secrets",
        decision=common_pb2.DECISION_DENY,
        severity=3,
        reason=text,
    )
    evaluation.evaluated_at.FromSeconds(1_700_000_000)
    evaluation.evidence.update({"match": {"text": text}})
    incoming.gateway.request_id = "r-1"
    return incoming


async def test_no_stored_byte_contains_a_canary_secret(data_dir: Path) -> None:
    server = await start_audit(data_dir)
    canaries = _canaries()
    emitter = OutboxEmitter(
        "orchestrator",
        data_dir / "orchestrator" / "outbox.db",
        address=lambda: f"127.0.0.1:{server.port}",
        token=lambda: token_for(server.config, "service:orchestrator", ["service"]),
    )
    try:
        for index, (text, _secret) in enumerate(canaries):
            ack = await server.client.append(_event_with(text, index))
            assert ack.redactions >= 1
            await emitter.emit(
                "orchestrator.step_failed",
                workflow_state="FAILED",
                message=f"engine said: {text}",
                engine={"engine_id": "command", "error": text},
            )
        assert await emitter.wait_drained(WAIT)
        await server.client.get_checkpoint(refresh=True)
    finally:
        await emitter.aclose()
        await stop_audit(server)
    stored = _read_all(data_dir)
    assert len(stored) > 10_000
    leaked = {secret: _leaks(secret, stored) for _, secret in canaries}
    assert {s: runs for s, runs in leaked.items() if runs} == {}


async def test_no_row_in_postgresql_contains_a_canary_secret(
    data_dir: Path, pg_database: str
) -> None:
    server = await start_audit(data_dir, pg_database)
    canaries = _canaries()
    try:
        for index, (text, _secret) in enumerate(canaries):
            await server.client.append(_event_with(text, index))
        engine = _engine(server)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM audit.audit_events")).all()
        engine.dispose()
    finally:
        await stop_audit(server)
    stored = repr(rows).encode()
    assert {s: _leaks(s, stored) for _, s in canaries if _leaks(s, stored)} == {}
