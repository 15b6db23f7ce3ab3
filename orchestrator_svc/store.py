"""Persistence with SQLAlchemy (SQLite embedded, PostgreSQL when configured).

Tables (all prefixed ``orchestrator_``; on PostgreSQL in their own schema, ``orchestrator``
unless told otherwise): the write-ahead log ``wal`` (append-only: triggers refuse UPDATE and
DELETE), the materialised ``workflows`` and ``steps`` rows (the fold of the log, for fast
reads, with each workflow's lease), signed ``plan_tokens``, idempotency keys (``requests``)
and ``batches``. Alembic creates and upgrades them when the store opens.

Every append is one transaction: lock the workflow row (``FOR UPDATE``), check the caller
still owns it and knows its last position (fencing: a process that lost its lease cannot
write), chain the checksums, insert the entries, update the materialised rows. Appends that
precede a side effect are *durable* (fsync: ``synchronous=FULL`` on SQLite, the default
``synchronous_commit`` on PostgreSQL); the others only survive a process crash, not a power
loss (``synchronous=NORMAL`` / ``synchronous_commit=off``), which is safe because every one
of them is redone or re-derived on recovery (docs/orchestrator.md, "Durability").

Blocking by design: callers run these methods in a thread. Times are integer microseconds.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.schema import CreateSchema

from cabincrew.errors import AlreadyExists
from orchestrator_svc.errors import OrchestratorError
from orchestrator_svc.model import Entry
from orchestrator_svc.wal import GENESIS, entry_checksum

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "orchestrator_alembic_version"

metadata = MetaData()

wal = Table(
    "orchestrator_wal",
    metadata,
    Column(
        "sequence",
        BigInteger().with_variant(Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("workflow_id", String(64), nullable=False),
    Column("position", Integer, nullable=False),
    Column("timestamp_us", BigInteger, nullable=False),
    Column("entry_type", String(64), nullable=False),
    Column("data", Text, nullable=False),
    Column("checksum", String(64), nullable=False),
    UniqueConstraint("workflow_id", "position", name="uq_orchestrator_wal_position"),
)

workflows = Table(
    "orchestrator_workflows",
    metadata,
    Column("workflow_id", String(64), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("state", String(32), nullable=False),
    Column("batch_id", String(64), nullable=False),
    Column("requester", String(128), nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("terminal", Boolean, nullable=False),
    Column("held", Boolean, nullable=False),
    Column("position", Integer, nullable=False),
    Column("checksum", String(64), nullable=False),
    Column("audited_position", Integer, nullable=False),
    Column("owner", String(128)),
    Column("lease_expires_us", BigInteger, nullable=False),
    # An operator's command for the owner (cancel, resume) when another replica received it.
    Column("command", Text),
    Column("summary", Text, nullable=False),
    Index("ix_orchestrator_workflows_created", "created_us", "workflow_id"),
    Index("ix_orchestrator_workflows_state", "state"),
    Index("ix_orchestrator_workflows_batch", "batch_id"),
    Index("ix_orchestrator_workflows_claim", "terminal", "held", "lease_expires_us"),
)

steps = Table(
    "orchestrator_steps",
    metadata,
    Column("workflow_id", String(64), primary_key=True),
    Column("step_id", String(64), primary_key=True),
    Column("state", String(32), nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("document", Text, nullable=False),
)

plan_tokens = Table(
    "orchestrator_plan_tokens",
    metadata,
    Column("workflow_id", String(64), primary_key=True),
    Column("step_id", String(64), primary_key=True),
    Column("token", String(64), primary_key=True),
    Column("created_us", BigInteger, nullable=False),
    Column("envelope", Text, nullable=False),
)

requests = Table(
    "orchestrator_requests",
    metadata,
    Column("method", String(32), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("result_id", String(64), nullable=False),
    Column("created_us", BigInteger, nullable=False),
)

batches = Table(
    "orchestrator_batches",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("created_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("done", Boolean, nullable=False),
    Column("document", Text, nullable=False),
)


# Statements of the hot path, built once: executing a prebuilt statement with a parameter
# dict skips SQLAlchemy's per-call construction and cache-key work (half of an append's CPU).
# Parameters of WHERE clauses are prefixed ``b_`` so that they never clash with the columns
# an UPDATE sets; an UPDATE without ``.values()`` sets the columns named in its parameters.
_WORKFLOW_ID = bindparam("b_workflow_id", type_=String())
_STEP_ID = bindparam("b_step_id", type_=String())
_LOCK_WORKFLOW = (
    select(
        workflows.c.position, workflows.c.checksum, workflows.c.owner, workflows.c.lease_expires_us
    )
    .where(workflows.c.workflow_id == _WORKFLOW_ID)
    .with_for_update()
)
_INSERT_ENTRY = insert(wal)
_INSERT_WORKFLOW = insert(workflows)
_UPDATE_WORKFLOW = update(workflows).where(workflows.c.workflow_id == _WORKFLOW_ID)
_INSERT_STEP = insert(steps)
_UPDATE_STEP = update(steps).where(
    and_(steps.c.workflow_id == _WORKFLOW_ID, steps.c.step_id == _STEP_ID)
)
_TOKEN_KEY = and_(
    plan_tokens.c.workflow_id == _WORKFLOW_ID,
    plan_tokens.c.step_id == _STEP_ID,
    plan_tokens.c.token == bindparam("b_token"),
)
_TOKEN_EXISTS = select(plan_tokens.c.token).where(_TOKEN_KEY)
_INSERT_TOKEN = insert(plan_tokens)
_SET_AUDITED = update(workflows).where(
    and_(
        workflows.c.workflow_id == _WORKFLOW_ID,
        workflows.c.audited_position < bindparam("b_position"),
    )
)
_LOAD_WORKFLOW = select(workflows).where(workflows.c.workflow_id == _WORKFLOW_ID)
_LOAD_STEPS = select(steps.c.document).where(steps.c.workflow_id == _WORKFLOW_ID)
_LOAD_TOKEN = select(plan_tokens.c.envelope).where(_TOKEN_KEY)

_FIND_REQUEST = select(requests.c.fingerprint, requests.c.result_id).where(
    and_(
        requests.c.method == bindparam("b_method"),
        requests.c.request_id == bindparam("b_request_id"),
    )
)
_INSERT_REQUEST = insert(requests)


class LeaseLost(OrchestratorError):
    """Another process owns the workflow now, or wrote to it meanwhile: stop touching it."""

    def remedy(self) -> str:
        return "another orchestrator took the workflow over; nothing to do here"


class StoreCorrupted(OrchestratorError):
    """A stored row does not parse."""


@dataclass(frozen=True)
class RequestKey:
    """An idempotency key: the same key with the same fingerprint is a retry."""

    method: str
    request_id: str
    fingerprint: str


@dataclass(frozen=True)
class NewEntry:
    """An entry to append (its position and checksum are assigned by the store)."""

    entry_type: str
    data: Mapping[str, Any]
    timestamp_us: int


@dataclass(frozen=True)
class Materialised:
    """What an append writes besides the log: the workflow's fold."""

    summary: Mapping[str, Any]
    state: str
    terminal: bool
    held: bool
    updated_us: int
    steps: Mapping[str, tuple[str, Mapping[str, Any]]]  # step id -> (state, document)


@dataclass(frozen=True)
class WorkflowRow:
    """A materialised workflow as stored."""

    workflow_id: str
    summary: Mapping[str, Any]
    steps: tuple[Mapping[str, Any], ...]
    position: int
    audited_position: int
    owner: str | None
    lease_expires_us: int
    command: Mapping[str, Any] | None
    # The parsed record, when the row comes from the owner's memory (no reparse needed).
    record: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ListFilter:
    """What ``list_workflows`` selects."""

    state: str = ""
    batch_id: str = ""


@dataclass(frozen=True)
class Claim:
    """The outcome of a lease renewal: what is still ours, and commands for it."""

    owned: frozenset[str]
    commands: Mapping[str, Mapping[str, Any]]


def _dumps(value: Any) -> str:
    # Stored documents are only parsed back (checksums hash their canonical form separately).
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise StoreCorrupted("a stored document is not JSON") from None


class WorkflowStore:
    """The orchestrator's tables in one database (on PostgreSQL, one schema)."""

    def __init__(self, url: str, schema: str | None = None) -> None:
        self.sqlite = url.startswith("sqlite")
        self._schema = None if self.sqlite else (schema or "orchestrator")
        self._lock = threading.Lock()
        if self.sqlite:
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            _sqlite_pragmas(engine)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=8)
        self._raw_engine = engine
        self._engine: Engine = engine.execution_options(schema_translate_map={None: self._schema})

    @property
    def schema(self) -> str | None:
        """The PostgreSQL schema (None on SQLite)."""
        return self._schema

    def migrate(self) -> None:
        """Create or upgrade the tables (Alembic); safe when replicas start together."""
        with self._raw_engine.begin() as conn:
            if not self.sqlite:
                conn.exec_driver_sql(
                    "SELECT pg_advisory_xact_lock(hashtext('cabincrew.orchestrator.migrate'))"
                )
                conn.execute(CreateSchema(self._schema or "orchestrator", if_not_exists=True))
            cfg = AlembicConfig()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = conn
            cfg.attributes["schema"] = self._schema
            cfg.attributes["version_table"] = VERSION_TABLE
            command.upgrade(cfg, "head")

    def close(self) -> None:
        """Release pooled connections."""
        self._raw_engine.dispose()

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[Connection]:
        if self.sqlite:
            with self._lock, self._engine.connect() as conn:
                # Must be set outside a transaction; it applies to the next commit. The
                # setting stays on the connection, so it is issued only when it changes.
                mode = "FULL" if durable else "NORMAL"
                info = conn.connection.info
                if info.get("cabincrew_synchronous") != mode:
                    raw = conn.connection.driver_connection
                    assert raw is not None
                    info.pop("cabincrew_synchronous", None)
                    raw.execute(f"PRAGMA synchronous={mode}")
                    info["cabincrew_synchronous"] = mode
                with conn.begin():
                    yield conn
        else:
            with self._engine.begin() as conn:
                if not durable:
                    conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                yield conn

    # --- writes ---------------------------------------------------------------------------

    def create_workflow(
        self,
        workflow_id: str,
        entry: NewEntry,
        materialised: Materialised,
        *,
        name: str,
        batch_id: str,
        requester: str,
        owner: str | None,
        lease_expires_us: int,
        key: RequestKey | None = None,
    ) -> tuple[str, bool]:
        """Insert a workflow with its first entry; with a known key, return the first result."""
        with self._tx() as conn:
            if key is not None:
                existing = _request(conn, key)
                if existing is not None:
                    return existing, False
            self._insert_workflow(
                conn,
                workflow_id,
                entry,
                materialised,
                name=name,
                batch_id=batch_id,
                requester=requester,
                owner=owner,
                lease_expires_us=lease_expires_us,
            )
            if key is not None:
                _put_request(conn, key, workflow_id, entry.timestamp_us)
        return workflow_id, True

    def _insert_workflow(
        self,
        conn: Connection,
        workflow_id: str,
        entry: NewEntry,
        materialised: Materialised,
        *,
        name: str,
        batch_id: str,
        requester: str,
        owner: str | None,
        lease_expires_us: int,
    ) -> None:
        checksum = entry_checksum(
            GENESIS, workflow_id, 1, entry.timestamp_us, entry.entry_type, entry.data
        )
        conn.execute(
            _INSERT_ENTRY,
            _wal_row(workflow_id, 1, entry.timestamp_us, entry.entry_type, entry.data, checksum),
        )
        conn.execute(
            _INSERT_WORKFLOW,
            {
                "workflow_id": workflow_id,
                "name": name,
                "state": materialised.state,
                "batch_id": batch_id,
                "requester": requester,
                "created_us": entry.timestamp_us,
                "updated_us": materialised.updated_us,
                "terminal": materialised.terminal,
                "held": materialised.held,
                "position": 1,
                "checksum": checksum,
                "audited_position": 0,
                "owner": owner,
                "lease_expires_us": lease_expires_us,
                "command": None,
                "summary": _dumps(dict(materialised.summary)),
            },
        )
        step_rows = [
            _step_row(workflow_id, step_id, state, materialised.updated_us, document)
            for step_id, (state, document) in materialised.steps.items()
        ]
        if step_rows:
            conn.execute(_INSERT_STEP, step_rows)

    def append(
        self,
        workflow_id: str,
        owner: str | None,
        expected_position: int,
        entries: Sequence[NewEntry],
        materialised: Materialised,
        *,
        durable: bool,
        now_us: int,
        plan_token: tuple[str, str, Mapping[str, Any]] | None = None,
        audited_position: int | None = None,
        release: bool = False,
        clear_command: bool = False,
    ) -> list[Entry]:
        """Append entries after ``expected_position`` and update the materialised rows.

        Raises ``LeaseLost`` when another owner holds an unexpired lease or the log moved on.
        """
        with self._tx(durable) as conn:
            row = conn.execute(_LOCK_WORKFLOW, {"b_workflow_id": workflow_id}).first()
            if row is None:
                raise LeaseLost(f"workflow {workflow_id} does not exist")
            stored_position, previous, stored_owner, lease_expires_us = row
            if stored_position != expected_position:
                raise LeaseLost(f"workflow {workflow_id} was written by someone else")
            if stored_owner is not None and stored_owner != owner and lease_expires_us > now_us:
                raise LeaseLost(f"workflow {workflow_id} is owned by {stored_owner}")
            previous = str(previous)
            position = int(stored_position)
            written: list[Entry] = []
            for item in entries:
                position += 1
                data = dict(item.data)
                checksum = entry_checksum(
                    previous, workflow_id, position, item.timestamp_us, item.entry_type, data
                )
                result = conn.execute(
                    _INSERT_ENTRY,
                    _wal_row(
                        workflow_id, position, item.timestamp_us, item.entry_type, data, checksum
                    ),
                )
                sequence = int(result.inserted_primary_key[0]) if result.inserted_primary_key else 0
                written.append(
                    Entry(
                        workflow_id,
                        position,
                        item.timestamp_us,
                        item.entry_type,
                        data,
                        sequence,
                        checksum,
                    )
                )
                previous = checksum
            values: dict[str, Any] = {
                "b_workflow_id": workflow_id,
                "position": position,
                "checksum": previous,
                "state": materialised.state,
                "terminal": materialised.terminal,
                "held": materialised.held,
                "updated_us": materialised.updated_us,
                "summary": _dumps(dict(materialised.summary)),
            }
            if audited_position is not None:
                values["audited_position"] = audited_position
            if release:
                values["owner"] = None
                values["lease_expires_us"] = 0
            elif owner is not None and stored_owner != owner:
                values["owner"] = owner
            if clear_command:
                values["command"] = None
            conn.execute(_UPDATE_WORKFLOW, values)
            for step_id, (state, document) in materialised.steps.items():
                step_row = _step_row(workflow_id, step_id, state, materialised.updated_us, document)
                # Only the changing columns: every key given to _UPDATE_STEP is SET.
                changes = {name: step_row[name] for name in ("state", "updated_us", "document")}
                keys = {"b_workflow_id": workflow_id, "b_step_id": step_id}
                if conn.execute(_UPDATE_STEP, {**changes, **keys}).rowcount == 0:
                    conn.execute(_INSERT_STEP, step_row)
            if plan_token is not None:
                step_id, token, envelope = plan_token
                keys = {"b_workflow_id": workflow_id, "b_step_id": step_id, "b_token": token}
                if conn.execute(_TOKEN_EXISTS, keys).first() is None:
                    conn.execute(
                        _INSERT_TOKEN,
                        {
                            "workflow_id": workflow_id,
                            "step_id": step_id,
                            "token": token,
                            "created_us": now_us,
                            "envelope": _dumps(dict(envelope)),
                        },
                    )
        return written

    def set_audited(self, workflow_id: str, position: int) -> None:
        """Record that every entry up to ``position`` reached the audit outbox."""
        with self._tx(durable=False) as conn:
            conn.execute(
                _SET_AUDITED,
                {
                    "b_workflow_id": workflow_id,
                    "b_position": position,
                    "audited_position": position,
                },
            )

    # --- leases ---------------------------------------------------------------------------

    def claim(
        self, owner: str, now_us: int, lease_us: int, limit: int, *, steal: bool = False
    ) -> list[str]:
        """Take up to ``limit`` unfinished, released workflows whose lease is free or expired.

        ``steal`` takes them whatever their lease says (the embedded mode, where one process
        owns the data dir, after a restart).
        """
        if limit <= 0:
            return []
        with self._tx(durable=False) as conn:
            conditions: list[Any] = [
                workflows.c.terminal.is_(False),
                workflows.c.held.is_(False),
            ]
            if not steal:
                conditions.append(
                    or_(
                        workflows.c.owner.is_(None),
                        workflows.c.owner == owner,
                        workflows.c.lease_expires_us <= now_us,
                    )
                )
            query = (
                select(workflows.c.workflow_id)
                .where(and_(*conditions))
                .order_by(workflows.c.created_us, workflows.c.workflow_id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            ids = [str(value) for value in conn.execute(query).scalars()]
            if ids:
                conn.execute(
                    update(workflows)
                    .where(workflows.c.workflow_id.in_(ids))
                    .values(owner=owner, lease_expires_us=now_us + lease_us)
                )
        return ids

    def renew(self, owner: str, workflow_ids: Sequence[str], now_us: int, lease_us: int) -> Claim:
        """Extend our leases; return those we still hold and any commands left for them."""
        if not workflow_ids:
            return Claim(frozenset(), {})
        with self._tx(durable=False) as conn:
            conn.execute(
                update(workflows)
                .where(
                    and_(
                        workflows.c.workflow_id.in_(list(workflow_ids)),
                        workflows.c.owner == owner,
                    )
                )
                .values(lease_expires_us=now_us + lease_us)
            )
            rows = conn.execute(
                select(workflows.c.workflow_id, workflows.c.command).where(
                    and_(
                        workflows.c.workflow_id.in_(list(workflow_ids)),
                        workflows.c.owner == owner,
                    )
                )
            ).all()
        commands = {str(r[0]): _loads(r[1]) for r in rows if r[1]}
        return Claim(frozenset(str(r[0]) for r in rows), commands)

    def release(self, owner: str, workflow_id: str) -> None:
        """Give a lease back."""
        with self._tx(durable=False) as conn:
            conn.execute(
                update(workflows)
                .where(and_(workflows.c.workflow_id == workflow_id, workflows.c.owner == owner))
                .values(owner=None, lease_expires_us=0)
            )

    def leave_command(self, workflow_id: str, command_doc: Mapping[str, Any]) -> bool:
        """Leave a command for the workflow's owner; False when the workflow ended."""
        with self._tx() as conn:
            changed = conn.execute(
                update(workflows)
                .where(
                    and_(workflows.c.workflow_id == workflow_id, workflows.c.terminal.is_(False))
                )
                .values(command=_dumps(dict(command_doc)))
            )
        return bool(changed.rowcount)

    def owner_of(self, workflow_id: str) -> tuple[str | None, int] | None:
        """(owner, lease expiry) of a workflow, or None when it does not exist."""
        with self._tx(durable=False) as conn:
            row = conn.execute(
                select(workflows.c.owner, workflows.c.lease_expires_us).where(
                    workflows.c.workflow_id == workflow_id
                )
            ).first()
        return None if row is None else (row[0], int(row[1]))

    # --- reads ----------------------------------------------------------------------------

    def load(self, workflow_id: str) -> WorkflowRow | None:
        """One materialised workflow with its steps."""
        with self._tx(durable=False) as conn:
            keys = {"b_workflow_id": workflow_id}
            row = conn.execute(_LOAD_WORKFLOW, keys).mappings().first()
            if row is None:
                return None
            step_rows = conn.execute(_LOAD_STEPS, keys).scalars()
            return _row(row, [_loads(text) for text in step_rows])

    def list_workflows(
        self, where: ListFilter, limit: int, after: tuple[int, str] | None = None
    ) -> list[WorkflowRow]:
        """Up to ``limit`` workflows after the (created_us, workflow_id) cursor, oldest first."""
        conditions: list[Any] = []
        if where.state:
            conditions.append(workflows.c.state == where.state)
        if where.batch_id:
            conditions.append(workflows.c.batch_id == where.batch_id)
        if after is not None:
            conditions.append(
                or_(
                    workflows.c.created_us > after[0],
                    and_(workflows.c.created_us == after[0], workflows.c.workflow_id > after[1]),
                )
            )
        query = select(workflows)
        if conditions:
            query = query.where(and_(*conditions))
        query = query.order_by(workflows.c.created_us, workflows.c.workflow_id).limit(limit)
        with self._tx(durable=False) as conn:
            rows = conn.execute(query).mappings().all()
            ids = [row["workflow_id"] for row in rows]
            documents: dict[str, list[Any]] = {workflow_id: [] for workflow_id in ids}
            if ids:
                for workflow_id, text in conn.execute(
                    select(steps.c.workflow_id, steps.c.document).where(
                        steps.c.workflow_id.in_(ids)
                    )
                ).all():
                    documents[str(workflow_id)].append(_loads(text))
        return [_row(row, documents[row["workflow_id"]]) for row in rows]

    def unfinished(self) -> list[str]:
        """Ids of every workflow that has not ended."""
        with self._tx(durable=False) as conn:
            return [
                str(value)
                for value in conn.execute(
                    select(workflows.c.workflow_id)
                    .where(workflows.c.terminal.is_(False))
                    .order_by(workflows.c.created_us)
                ).scalars()
            ]

    def unaudited(self) -> list[tuple[str, int, int]]:
        """(workflow id, audited position, last position) where the audit trail may lag."""
        with self._tx(durable=False) as conn:
            rows = conn.execute(
                select(
                    workflows.c.workflow_id,
                    workflows.c.audited_position,
                    workflows.c.position,
                ).where(workflows.c.audited_position < workflows.c.position)
            ).all()
        return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]

    def entries(self, workflow_id: str, after_position: int = 0) -> list[Entry]:
        """A workflow's log entries in position order."""
        with self._tx(durable=False) as conn:
            rows = (
                conn.execute(
                    select(wal)
                    .where(and_(wal.c.workflow_id == workflow_id, wal.c.position > after_position))
                    .order_by(wal.c.position)
                )
                .mappings()
                .all()
            )
        return [
            Entry(
                str(row["workflow_id"]),
                int(row["position"]),
                int(row["timestamp_us"]),
                str(row["entry_type"]),
                _loads(row["data"]),
                int(row["sequence"]),
                str(row["checksum"]),
            )
            for row in rows
        ]

    def plan_token(self, workflow_id: str, step_id: str, token: str) -> Mapping[str, Any] | None:
        """The signed envelope of a plan-token, or None."""
        with self._tx(durable=False) as conn:
            text = conn.execute(
                _LOAD_TOKEN, {"b_workflow_id": workflow_id, "b_step_id": step_id, "b_token": token}
            ).scalar()
        return None if text is None else dict(_loads(text))

    def request(self, key: RequestKey) -> str | None:
        """The result id of an earlier call with this key (``AlreadyExists`` on reuse)."""
        with self._tx(durable=False) as conn:
            return _request(conn, key)

    def put_request(self, key: RequestKey, result_id: str, now_us: int) -> str:
        """Record a key; returns the result id that wins (an earlier one, if any)."""
        with self._tx() as conn:
            existing = _request(conn, key)
            if existing is not None:
                return existing
            _put_request(conn, key, result_id, now_us)
        return result_id

    # --- batches --------------------------------------------------------------------------

    def create_batch(
        self,
        batch_id: str,
        document: Mapping[str, Any],
        items: Sequence[tuple[str, NewEntry, Materialised, str, str]],
        now_us: int,
        key: RequestKey | None,
    ) -> tuple[str, bool]:
        """Insert a batch and its (held) workflows in one transaction."""
        with self._tx() as conn:
            if key is not None:
                existing = _request(conn, key)
                if existing is not None:
                    return existing, False
            conn.execute(
                insert(batches).values(
                    batch_id=batch_id,
                    created_us=now_us,
                    updated_us=now_us,
                    done=False,
                    document=_dumps(dict(document)),
                )
            )
            for workflow_id, entry, materialised, name, requester in items:
                self._insert_workflow(
                    conn,
                    workflow_id,
                    entry,
                    materialised,
                    name=name,
                    batch_id=batch_id,
                    requester=requester,
                    owner=None,
                    lease_expires_us=0,
                )
            if key is not None:
                _put_request(conn, key, batch_id, now_us)
        return batch_id, True

    def load_batch(self, batch_id: str) -> tuple[Mapping[str, Any], bool, int] | None:
        """(document, done, created_us) of a batch, or None."""
        with self._tx(durable=False) as conn:
            row = conn.execute(
                select(batches.c.document, batches.c.done, batches.c.created_us).where(
                    batches.c.batch_id == batch_id
                )
            ).first()
        return None if row is None else (_loads(row[0]), bool(row[1]), int(row[2]))

    def update_batch(
        self, batch_id: str, document: Mapping[str, Any], done: bool, now_us: int
    ) -> None:
        """Replace a batch's document."""
        with self._tx() as conn:
            conn.execute(
                update(batches)
                .where(batches.c.batch_id == batch_id)
                .values(document=_dumps(dict(document)), done=done, updated_us=now_us)
            )

    def open_batches(self) -> list[str]:
        """Ids of batches not done."""
        with self._tx(durable=False) as conn:
            return [
                str(v)
                for v in conn.execute(
                    select(batches.c.batch_id).where(batches.c.done.is_(False))
                ).scalars()
            ]

    def batch_states(self, batch_id: str) -> dict[str, tuple[str, bool, bool, str]]:
        """workflow id -> (state, terminal, held, owner) of a batch's workflows."""
        with self._tx(durable=False) as conn:
            rows = conn.execute(
                select(
                    workflows.c.workflow_id,
                    workflows.c.state,
                    workflows.c.terminal,
                    workflows.c.held,
                    workflows.c.owner,
                ).where(workflows.c.batch_id == batch_id)
            ).all()
        return {str(r[0]): (str(r[1]), bool(r[2]), bool(r[3]), str(r[4] or "")) for r in rows}

    def count(self) -> int:
        """Number of workflows (for tests and stats)."""
        with self._tx(durable=False) as conn:
            return int(conn.execute(select(func.count()).select_from(workflows)).scalar() or 0)

    def delete_request_keys_before(self, before_us: int) -> int:
        """Forget idempotency keys older than ``before_us``."""
        with self._tx(durable=False) as conn:
            result = conn.execute(delete(requests).where(requests.c.created_us < before_us))
        return int(result.rowcount or 0)


def _wal_row(
    workflow_id: str,
    position: int,
    timestamp_us: int,
    entry_type: str,
    data: Mapping[str, Any],
    checksum: str,
) -> dict[str, Any]:
    """The parameters of ``_INSERT_ENTRY``."""
    return {
        "workflow_id": workflow_id,
        "position": position,
        "timestamp_us": timestamp_us,
        "entry_type": entry_type,
        "data": _dumps(dict(data)),
        "checksum": checksum,
    }


def _step_row(
    workflow_id: str, step_id: str, state: str, updated_us: int, document: Mapping[str, Any]
) -> dict[str, Any]:
    """The parameters of ``_INSERT_STEP`` (and the columns ``_UPDATE_STEP`` sets)."""
    return {
        "workflow_id": workflow_id,
        "step_id": step_id,
        "state": state,
        "updated_us": updated_us,
        "document": _dumps(dict(document)),
    }


def _request(conn: Connection, key: RequestKey) -> str | None:
    row = conn.execute(
        _FIND_REQUEST, {"b_method": key.method, "b_request_id": key.request_id}
    ).first()
    if row is None:
        return None
    if row[0] != key.fingerprint:
        raise AlreadyExists(
            f"request_id {key.request_id!r} was already used with a different {key.method} request"
        )
    return str(row[1])


def _put_request(conn: Connection, key: RequestKey, result_id: str, now_us: int) -> None:
    conn.execute(
        _INSERT_REQUEST,
        {
            "method": key.method,
            "request_id": key.request_id,
            "fingerprint": key.fingerprint,
            "result_id": result_id,
            "created_us": now_us,
        },
    )


def _row(row: Any, step_documents: list[Any]) -> WorkflowRow:
    return WorkflowRow(
        workflow_id=str(row["workflow_id"]),
        summary=_loads(row["summary"]),
        steps=tuple(step_documents),
        position=int(row["position"]),
        audited_position=int(row["audited_position"]),
        owner=row["owner"],
        lease_expires_us=int(row["lease_expires_us"]),
        command=_loads(row["command"]) if row["command"] else None,
    )


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let the "begin" event issue BEGIN IMMEDIATE instead of pysqlite's deferred BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


__all__ = [
    "Claim",
    "LeaseLost",
    "ListFilter",
    "Materialised",
    "NewEntry",
    "RequestKey",
    "StoreCorrupted",
    "WorkflowRow",
    "WorkflowStore",
]
