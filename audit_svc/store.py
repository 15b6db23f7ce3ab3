"""SQLAlchemy storage of the audit log: one append-only table of events, one of checkpoints.

SQLite (embedded): WAL journal, ``synchronous=FULL`` so a commit is on disk before an ack,
``BEGIN IMMEDIATE`` for appends. PostgreSQL: schema ``audit``; appends serialise across
processes on ``pg_advisory_xact_lock``. On both, triggers refuse UPDATE and DELETE, and the
code has no path that issues either. Every method is synchronous: the log calls them from
worker threads.

Sequencing is single-writer per database: under the lock an append reads the rows written
since this process last looked (by another process sharing the database), checks their
chain, and numbers its own events after them. Those rows are returned so the caller's
in-memory Merkle tree catches up before it takes the new leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.engine import Connection, Engine

from audit_svc.errors import EventConflict, LogCorrupted
from audit_svc.events import GENESIS_CHAIN_HASH, PreparedEvent, next_chain_hash

log = logging.getLogger("cabincrew.audit.store")

SCHEMA = "audit"
# Any constant works; both processes sharing a database must use the same one.
_APPEND_LOCK_KEY = 0x0CAB1A0D1
_MIGRATION_LOCK_KEY = 0x0CAB1A0D2
_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Event ids per duplicate lookup statement.
_LOOKUP_CHUNK = 500

metadata = sa.MetaData(schema=SCHEMA)
# INTEGER (not BIGINT) on SQLite makes the sequence the rowid: no second index to maintain.
_SEQUENCE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("sequence", _SEQUENCE, primary_key=True, autoincrement=False),
    sa.Column("event_id", sa.String(128), nullable=False, unique=True),
    sa.Column("event", sa.Text, nullable=False),
    sa.Column("signature", sa.Text, nullable=False),
    sa.Column("signature_key_ref", sa.Text, nullable=False),
    sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("chain_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("received_at_us", sa.BigInteger, nullable=False),
    sa.Column("redactions", sa.Integer, nullable=False),
    sa.Column("event_type", sa.String(128), nullable=False),
    sa.Column("workflow_id", sa.Text, nullable=False),
    sa.Column("step_id", sa.Text, nullable=False),
    sa.Column("severity", sa.SmallInteger, nullable=False),
    sa.Column("event_time_us", sa.BigInteger, nullable=False),
)

# Built once: every append runs it (its compilation is cached, its construction is not).
_ROWS_FROM = (
    sa.select(events.c.sequence, events.c.leaf_hash, events.c.chain_hash)
    .where(events.c.sequence >= sa.bindparam("start"))
    .order_by(events.c.sequence)
)

checkpoints = sa.Table(
    "audit_checkpoints",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tree_size", sa.BigInteger, nullable=False),
    sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("verifier_key", sa.Text, nullable=False),
    sa.Column("created_at_us", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class StoredEntry:
    """One stored row."""

    sequence: int
    event: bytes
    signature: str
    signature_key_ref: str
    leaf_hash: bytes
    chain_hash: bytes
    received_at_us: int
    redactions: int


@dataclass(frozen=True, slots=True)
class Appended:
    """Where one event of a batch ended up: its ack (``log.Ack``)."""

    event_id: str
    sequence: int
    duplicate: bool
    leaf_hash: bytes
    redactions: int


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one append transaction."""

    outcomes: list[Appended | EventConflict]
    # Leaf hashes of every row from ``known_size`` on, other writers' first, then ours.
    new_leaves: list[bytes]
    last_chain: bytes


@dataclass(frozen=True)
class EventQuery:
    """Row filters; ``None`` and empty strings do not filter."""

    workflow_id: str = ""
    step_id: str = ""
    event_type: str = ""
    event_type_prefix: str = ""
    min_severity: int = 0
    from_time_us: int | None = None
    to_time_us: int | None = None
    from_sequence: int = 0
    to_sequence: int | None = None


@dataclass(frozen=True)
class CheckpointRecord:
    """A signed checkpoint as stored."""

    tree_size: int
    root_hash: bytes
    note: str
    verifier_key: str
    created_at_us: int


class SqlAuditStore:
    """The audit log in a SQLAlchemy database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        table = f"{SCHEMA}.audit_events" if self.dialect == "postgresql" else "audit_events"
        marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._marker = marker
        self._insert_sql = (
            f"INSERT INTO {table} ({', '.join(_ROW_COLUMNS)}) "
            f"VALUES ({', '.join([marker] * len(_ROW_COLUMNS))})"
        )
        self._lookup_sql = (
            "SELECT event_id, sequence, event, signature, signature_key_ref, leaf_hash, "
            f"redactions FROM {table} WHERE event_id IN "
        )

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> SqlAuditStore:
        """Connect, apply migrations, and return the store."""
        store = cls(create_engine(url))
        if migrate:
            store.migrate()
        return store

    def close(self) -> None:
        """Release connections."""
        self.engine.dispose()

    def migrate(self) -> None:
        """Bring the schema to the latest Alembic revision (serialised across processes)."""
        schema = SCHEMA if self.dialect == "postgresql" else None
        config = AlembicConfig()
        config.set_main_option("script_location", str(_MIGRATIONS))
        config.attributes["audit_schema"] = schema
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY}
                )
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"'))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    # --- appending -----------------------------------------------------------------------

    def append_batch(
        self,
        batch: Sequence[PreparedEvent],
        known_size: int,
        known_chain: bytes,
        received_at_us: int,
    ) -> BatchResult:
        """Append a batch in one transaction; duplicates and conflicts are not written."""
        with self._write() as conn:
            new_leaves, last_chain = self._catch_up(conn, known_size, known_chain)
            next_sequence = known_size + len(new_leaves)
            existing = self._stored(conn, list({event.event_id for event in batch}))
            fresh: dict[str, tuple[PreparedEvent, int]] = {}
            outcomes: list[Appended | EventConflict] = []
            rows: list[tuple[Any, ...]] = []
            for event in batch:
                event_id = event.event_id
                if event_id in existing or event_id in fresh:
                    outcomes.append(self._place_again(event, existing, fresh))
                    continue
                sequence = next_sequence + len(rows)
                fresh[event_id] = (event, sequence)
                last_chain = next_chain_hash(last_chain, event.leaf_hash)
                rows.append(_row(event, sequence, last_chain, received_at_us))
                new_leaves.append(event.leaf_hash)
                outcomes.append(
                    Appended(event_id, sequence, False, event.leaf_hash, event.redactions)
                )
            if rows:
                # The driver's executemany on plain tuples: SQLAlchemy's per-row parameter
                # processing would cost more CPU (and GIL) than the insert itself.
                conn.exec_driver_sql(self._insert_sql, rows)
        return BatchResult(outcomes, new_leaves, last_chain)

    def _stored(self, conn: Connection, ids: list[str]) -> dict[str, Any]:
        """The stored rows of those of ``ids`` that are stored, by event_id."""
        found: dict[str, Any] = {}
        # Driver SQL in chunks: SQLAlchemy's expanding IN costs about a microsecond per id
        # to render, and the chunks stay below every driver's parameter limit.
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            chunk = ids[start : start + _LOOKUP_CHUNK]
            statement = self._lookup_sql + f"({', '.join([self._marker] * len(chunk))})"
            for row in conn.exec_driver_sql(statement, tuple(chunk)):
                found[row.event_id] = row
        return found

    @staticmethod
    def _place_again(
        event: PreparedEvent,
        existing: dict[str, Any],
        fresh: dict[str, tuple[PreparedEvent, int]],
    ) -> Appended | EventConflict:
        """The outcome of an event whose id is stored already, or earlier in this batch."""
        stored = existing.get(event.event_id)
        if stored is not None:
            same = event.same_content(
                stored.event.encode(), stored.signature, stored.signature_key_ref
            )
            if not same:
                return _conflict(event.event_id)
            return Appended(
                event.event_id, stored.sequence, True, bytes(stored.leaf_hash), stored.redactions
            )
        first, first_sequence = fresh[event.event_id]
        if not event.same_content(first.leaf_input, first.signature, first.signature_key_ref):
            return _conflict(event.event_id)
        return Appended(event.event_id, first_sequence, True, first.leaf_hash, first.redactions)

    def _catch_up(
        self, conn: Connection, known_size: int, known_chain: bytes
    ) -> tuple[list[bytes], bytes]:
        """Rows written since ``known_size`` (by other processes), with their chain checked."""
        start = max(known_size - 1, 0)
        rows = conn.execute(_ROWS_FROM, {"start": start}).all()
        previous = known_chain if known_size else GENESIS_CHAIN_HASH
        if known_size:
            if not rows or rows[0].sequence != start or bytes(rows[0].chain_hash) != known_chain:
                raise LogCorrupted(f"stored entry {start} changed under the running log", start)
            rows = rows[1:]
        leaves: list[bytes] = []
        expected = known_size
        for row in rows:
            leaf = bytes(row.leaf_hash)
            previous = next_chain_hash(previous, leaf)
            if row.sequence != expected or bytes(row.chain_hash) != previous:
                raise LogCorrupted(f"stored entry {expected} does not chain", expected)
            leaves.append(leaf)
            expected += 1
        return leaves, previous

    def _write(self) -> Any:
        conn = self.engine.connect()
        conn.execution_options(cabincrew_write=True)
        return _WriteTransaction(conn, self.dialect)

    # --- reading -------------------------------------------------------------------------

    def hashes(self, start: int, limit: int) -> list[tuple[int, bytes, bytes]]:
        """(sequence, leaf hash, chain hash) of up to ``limit`` rows from ``start``."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(events.c.sequence, events.c.leaf_hash, events.c.chain_hash)
                .where(events.c.sequence >= start)
                .order_by(events.c.sequence)
                .limit(limit)
            ).all()
        return [(row.sequence, bytes(row.leaf_hash), bytes(row.chain_hash)) for row in rows]

    def entries(self, query: EventQuery, limit: int) -> list[StoredEntry]:
        """Up to ``limit`` rows matching ``query``, in sequence order."""
        statement = sa.select(
            events.c.sequence,
            events.c.event,
            events.c.signature,
            events.c.signature_key_ref,
            events.c.leaf_hash,
            events.c.chain_hash,
            events.c.received_at_us,
            events.c.redactions,
        )
        for condition in _conditions(query):
            statement = statement.where(condition)
        statement = statement.order_by(events.c.sequence).limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(statement).all()
        return [
            StoredEntry(
                row.sequence,
                row.event.encode(),
                row.signature,
                row.signature_key_ref,
                bytes(row.leaf_hash),
                bytes(row.chain_hash),
                row.received_at_us,
                row.redactions,
            )
            for row in rows
        ]

    def scan(self, chunk: int = 20_000) -> Iterator[list[tuple[int, bytes, bytes, bytes]]]:
        """Every row as (sequence, event bytes, leaf hash, chain hash), in chunks, by key range."""
        start = 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(
                        events.c.sequence, events.c.event, events.c.leaf_hash, events.c.chain_hash
                    )
                    .where(events.c.sequence >= start)
                    .order_by(events.c.sequence)
                    .limit(chunk)
                ).all()
            if not rows:
                return
            yield [
                (row.sequence, row.event.encode(), bytes(row.leaf_hash), bytes(row.chain_hash))
                for row in rows
            ]
            start = rows[-1].sequence + 1

    def max_sequence(self) -> int:
        """The highest stored sequence, or -1 for an empty log."""
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(sa.func.max(events.c.sequence))).scalar()
        return -1 if value is None else int(value)

    # --- checkpoints ---------------------------------------------------------------------

    def add_checkpoint(self, record: CheckpointRecord) -> None:
        """Store a signed checkpoint."""
        with self.engine.begin() as conn:
            conn.execute(
                checkpoints.insert(),
                {
                    "tree_size": record.tree_size,
                    "root_hash": record.root_hash,
                    "note": record.note,
                    "verifier_key": record.verifier_key,
                    "created_at_us": record.created_at_us,
                },
            )

    def latest_checkpoint(self) -> CheckpointRecord | None:
        """The most recently stored checkpoint."""
        statement = sa.select(checkpoints).order_by(checkpoints.c.id.desc()).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(statement).first()
        return None if row is None else _checkpoint(row)

    def checkpoints(self) -> list[CheckpointRecord]:
        """Every stored checkpoint, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(checkpoints).order_by(checkpoints.c.id)).all()
        return [_checkpoint(row) for row in rows]


class _WriteTransaction:
    """A transaction that holds the log's write lock (BEGIN IMMEDIATE / advisory lock)."""

    def __init__(self, conn: Connection, dialect: str) -> None:
        self._conn = conn
        self._dialect = dialect

    def __enter__(self) -> Connection:
        self._transaction = self._conn.begin()
        if self._dialect == "postgresql":
            self._conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _APPEND_LOCK_KEY})
        return self._conn

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        try:
            if kind is None:
                self._transaction.commit()
            else:
                self._transaction.rollback()
        finally:
            self._conn.close()


def create_engine(url: str) -> Engine:
    """An engine with the pragmas and locking the log relies on."""
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True).execution_options(
            schema_translate_map={SCHEMA: SCHEMA}
        )
    database = sa.make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Autocommit at the driver level; transactions are begun explicitly below, so that
        # appends can use BEGIN IMMEDIATE (the pysqlite default defers the lock).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("cabincrew_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine.execution_options(schema_translate_map={SCHEMA: None})


_ROW_COLUMNS = (
    "sequence",
    "event_id",
    "event",
    "signature",
    "signature_key_ref",
    "leaf_hash",
    "chain_hash",
    "received_at_us",
    "redactions",
    "event_type",
    "workflow_id",
    "step_id",
    "severity",
    "event_time_us",
)


def _row(event: PreparedEvent, sequence: int, chain: bytes, received_at_us: int) -> tuple[Any, ...]:
    return (
        sequence,
        event.event_id,
        event.leaf_input.decode(),
        event.signature,
        event.signature_key_ref,
        event.leaf_hash,
        chain,
        received_at_us,
        event.redactions,
        event.event_type,
        event.workflow_id,
        event.step_id,
        event.severity,
        event.event_time_us,
    )


def _conflict(event_id: str) -> EventConflict:
    return EventConflict(f"event {event_id} is already stored with different content")


def _conditions(query: EventQuery) -> list[Any]:
    found: list[Any] = [events.c.sequence >= query.from_sequence]
    if query.to_sequence is not None:
        found.append(events.c.sequence < query.to_sequence)
    if query.workflow_id:
        found.append(events.c.workflow_id == query.workflow_id)
    if query.step_id:
        found.append(events.c.step_id == query.step_id)
    if query.event_type:
        found.append(events.c.event_type == query.event_type)
    if query.event_type_prefix:
        found.append(events.c.event_type.startswith(query.event_type_prefix, autoescape=True))
    if query.min_severity:
        found.append(events.c.severity >= query.min_severity)
    if query.from_time_us is not None:
        found.append(events.c.event_time_us >= query.from_time_us)
    if query.to_time_us is not None:
        found.append(events.c.event_time_us < query.to_time_us)
    return found


def _checkpoint(row: Any) -> CheckpointRecord:
    return CheckpointRecord(
        tree_size=row.tree_size,
        root_hash=bytes(row.root_hash),
        note=row.note,
        verifier_key=row.verifier_key,
        created_at_us=row.created_at_us,
    )
