"""Persistence of approvals with SQLAlchemy (SQLite embedded, PostgreSQL when configured).

Blocking by design (there is no async driver in the dependency set): the manager calls
every method through ``asyncio.to_thread``. Every mutation is one transaction that reads
the approval with ``FOR UPDATE`` (a row lock on PostgreSQL, so replicas serialise; SQLite
takes the database write lock with ``BEGIN IMMEDIATE`` and this process serialises its
threads), applies a pure domain transition and writes the result, together with the
request id that makes the call idempotent. Times are integer microseconds since the epoch,
exact and portable. On PostgreSQL the tables live in their own schema (``approval`` unless
told otherwise); the schema is created and migrated with Alembic when the store opens.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
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
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    event,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateSchema

from approval_svc.model import (
    Approval,
    ArtifactSummary,
    DecisionRecord,
    State,
    SubjectKind,
)
from cabincrew.errors import AlreadyExists

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "approval_alembic_version"

metadata = MetaData()

approvals = Table(
    "approvals",
    metadata,
    Column("approval_id", String(64), primary_key=True),
    Column("request_id", String(128), nullable=False),
    Column("subject_kind", String(32), nullable=False),
    Column("subject_hash", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("required_role", String(64), nullable=False),
    Column("quorum", Integer, nullable=False),
    Column("requester", String(128), nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False),
    Column("decided_us", BigInteger),
    Column("consumed_us", BigInteger),
    Column("consumed_by", String(128), nullable=False, default=""),
    Column("cancelled_by", String(128), nullable=False, default=""),
    Column("cancel_reason", Text, nullable=False, default=""),
    Column("workflow_id", String(128), nullable=False, default=""),
    Column("step_id", String(128), nullable=False, default=""),
    Column("gateway_request_id", String(128), nullable=False, default=""),
    Column("triggered_policies", Text, nullable=False, default="[]"),
    Column("artifacts", Text, nullable=False, default="[]"),
    Index("ix_approvals_state_expires", "state", "expires_us"),
    Index("ix_approvals_created", "created_us", "approval_id"),
    Index("ix_approvals_workflow", "workflow_id"),
    Index("ix_approvals_role", "required_role"),
    Index("ix_approvals_requester", "requester"),
)

decisions = Table(
    "approval_decisions",
    metadata,
    Column("approval_id", String(64), ForeignKey("approvals.approval_id"), primary_key=True),
    # An approver counts once: the primary key refuses a second answer.
    Column("approver", String(128), primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("approved", Boolean, nullable=False),
    Column("reason", Text, nullable=False),
    Column("approver_roles", Text, nullable=False),
    Column("decided_us", BigInteger, nullable=False),
    Column("subject_hash", String(64), nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("key_id", String(64), nullable=False),
)

requests = Table(
    "approval_requests",
    metadata,
    Column("method", String(32), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("approval_id", String(64), nullable=False),
    Column("created_us", BigInteger, nullable=False),
)


@dataclass(frozen=True)
class RequestKey:
    """An idempotency key: the same key with the same fingerprint is a retry."""

    method: str
    request_id: str
    fingerprint: str


@dataclass(frozen=True)
class ListFilter:
    """What ``list`` selects."""

    state: State | None = None
    workflow_id: str = ""
    required_role: str = ""
    requester: str = ""


@dataclass(frozen=True)
class Cursor:
    """Keyset position: list order is (created_at, approval_id)."""

    created_us: int
    approval_id: str


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_us(value: int) -> datetime:
    """Inverse of ``to_us``."""
    return EPOCH + timedelta(microseconds=value)


class ApprovalStore:
    """Approvals in one database (and, on PostgreSQL, one schema)."""

    def __init__(self, url: str, schema: str | None = None) -> None:
        self._sqlite = url.startswith("sqlite")
        self._schema = None if self._sqlite else (schema or "approval")
        self._lock = threading.Lock()
        if self._sqlite:
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            _sqlite_pragmas(engine)
        else:
            engine = create_engine(url, pool_pre_ping=True)
        self._raw_engine = engine
        self._engine: Engine = engine.execution_options(schema_translate_map={None: self._schema})

    @property
    def schema(self) -> str | None:
        """The PostgreSQL schema (None on SQLite)."""
        return self._schema

    def migrate(self) -> None:
        """Create or upgrade the tables (Alembic); safe when replicas start together."""
        with self._raw_engine.begin() as conn:
            if not self._sqlite:
                conn.exec_driver_sql(
                    "SELECT pg_advisory_xact_lock(hashtext('cabincrew.approval.migrate'))"
                )
                conn.execute(CreateSchema(self._schema or "approval", if_not_exists=True))
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
    def _tx(self) -> Iterator[Connection]:
        if self._sqlite:
            with self._lock, self._engine.begin() as conn:
                yield conn
        else:
            with self._engine.begin() as conn:
                yield conn

    # Reads.

    def get(self, approval_id: str) -> Approval | None:
        """One approval with its decisions, or None."""
        with self._tx() as conn:
            return self._load(conn, approval_id, lock=False)

    def list_approvals(
        self, where: ListFilter, limit: int, after: Cursor | None = None
    ) -> list[Approval]:
        """Up to ``limit`` approvals after ``after``, oldest first."""
        query = select(approvals)
        conditions = []
        if where.state is not None:
            conditions.append(approvals.c.state == where.state.value)
        if where.workflow_id:
            conditions.append(approvals.c.workflow_id == where.workflow_id)
        if where.required_role:
            conditions.append(approvals.c.required_role == where.required_role)
        if where.requester:
            conditions.append(approvals.c.requester == where.requester)
        if after is not None:
            conditions.append(
                or_(
                    approvals.c.created_us > after.created_us,
                    and_(
                        approvals.c.created_us == after.created_us,
                        approvals.c.approval_id > after.approval_id,
                    ),
                )
            )
        if conditions:
            query = query.where(and_(*conditions))
        query = query.order_by(approvals.c.created_us, approvals.c.approval_id).limit(limit)
        with self._tx() as conn:
            rows = conn.execute(query).mappings().all()
            records = self._decisions(conn, [row["approval_id"] for row in rows])
        return [_approval(row, records.get(row["approval_id"], ())) for row in rows]

    # Writes.

    def create(self, approval: Approval, key: RequestKey) -> tuple[Approval, bool]:
        """Insert ``approval`` unless ``key`` was seen; returns the stored one and whether
        it is new. A seen key with another fingerprint raises ``AlreadyExists``."""
        for _attempt in range(2):
            try:
                with self._tx() as conn:
                    seen = self._seen(conn, key)
                    if seen is not None:
                        return seen, False
                    conn.execute(approvals.insert().values(**_row(approval)))
                    self._remember(conn, key, approval.approval_id, approval.created_at)
                    return approval, True
            except IntegrityError:
                # A concurrent call with the same key won the insert: answer as a retry.
                continue
        raise AlreadyExists("request_id was used concurrently; retry with the same request")

    def update(
        self,
        approval_id: str,
        transition: Callable[[Approval], Approval],
        key: RequestKey | None = None,
    ) -> tuple[Approval | None, bool]:
        """Apply ``transition`` to the current approval and store the result atomically.

        Returns ``(approval, changed)``; ``(None, False)`` when no such approval exists.
        A refusal raised by ``transition`` rolls back and propagates. With a seen ``key``
        the transition is not applied again and the current approval is returned.
        """
        with self._tx() as conn:
            if key is not None:
                seen = self._seen(conn, key)
                if seen is not None:
                    return seen, False
            current = self._load(conn, approval_id, lock=True)
            if current is None:
                return None, False
            updated = transition(current)
            self._write(conn, current, updated)
            if key is not None:
                self._remember(conn, key, approval_id, updated.decided_at or updated.created_at)
            return updated, True

    def expire_due(self, now: datetime, limit: int = 500) -> list[Approval]:
        """Mark overdue pending/approved approvals expired; returns those it changed."""
        due = (
            select(approvals.c.approval_id)
            .where(
                approvals.c.state.in_([State.PENDING.value, State.APPROVED.value]),
                approvals.c.expires_us <= to_us(now),
            )
            .order_by(approvals.c.expires_us)
            .limit(limit)
        )
        if not self._sqlite:
            due = due.with_for_update(skip_locked=True)
        changed: list[Approval] = []
        with self._tx() as conn:
            ids = list(conn.execute(due).scalars())
            for approval_id in ids:
                current = self._load(conn, approval_id, lock=True)
                if current is None or not current.overdue(now):
                    continue
                expired = current.with_expiry(now)
                self._write(conn, current, expired)
                changed.append(expired)
        return changed

    # Helpers (inside a transaction).

    def _seen(self, conn: Connection, key: RequestKey) -> Approval | None:
        row = (
            conn.execute(
                select(requests).where(
                    requests.c.method == key.method, requests.c.request_id == key.request_id
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            return None
        if row["fingerprint"] != key.fingerprint:
            raise AlreadyExists(
                f"request_id {key.request_id!r} was already used for a different {key.method}"
            )
        return self._load(conn, row["approval_id"], lock=False)

    def _remember(self, conn: Connection, key: RequestKey, approval_id: str, at: datetime) -> None:
        conn.execute(
            requests.insert().values(
                method=key.method,
                request_id=key.request_id,
                fingerprint=key.fingerprint,
                approval_id=approval_id,
                created_us=to_us(at),
            )
        )

    def _load(self, conn: Connection, approval_id: str, *, lock: bool) -> Approval | None:
        query = select(approvals).where(approvals.c.approval_id == approval_id)
        if lock and not self._sqlite:
            query = query.with_for_update()
        row = conn.execute(query).mappings().first()
        if row is None:
            return None
        return _approval(row, self._decisions(conn, [approval_id]).get(approval_id, ()))

    def _decisions(
        self, conn: Connection, ids: Sequence[str]
    ) -> dict[str, tuple[DecisionRecord, ...]]:
        if not ids:
            return {}
        rows = (
            conn.execute(
                select(decisions)
                .where(decisions.c.approval_id.in_(list(ids)))
                .order_by(decisions.c.approval_id, decisions.c.seq)
            )
            .mappings()
            .all()
        )
        found: dict[str, list[DecisionRecord]] = {}
        for row in rows:
            found.setdefault(row["approval_id"], []).append(_record(row))
        return {k: tuple(v) for k, v in found.items()}

    def _write(self, conn: Connection, before: Approval, after: Approval) -> None:
        values = _row(after)
        del values["approval_id"]
        conn.execute(
            update(approvals).where(approvals.c.approval_id == after.approval_id).values(**values)
        )
        known = {d.approver for d in before.decisions}
        for seq, record in enumerate(after.decisions):
            if record.approver in known:
                continue
            conn.execute(
                decisions.insert().values(
                    approval_id=record.approval_id,
                    approver=record.approver,
                    seq=seq,
                    approved=record.approved,
                    reason=record.reason,
                    approver_roles=json.dumps(list(record.approver_roles)),
                    decided_us=to_us(record.decided_at),
                    subject_hash=record.subject_hash,
                    signature=record.signature,
                    key_id=record.key_id,
                )
            )


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE instead of pysqlite's
        # deferred BEGIN, so a read-then-write transaction never fails to upgrade its lock.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _row(approval: Approval) -> dict[str, Any]:
    return {
        "approval_id": approval.approval_id,
        "request_id": approval.request_id,
        "subject_kind": approval.subject_kind.value,
        "subject_hash": approval.subject_hash,
        "reason": approval.reason,
        "required_role": approval.required_role,
        "quorum": approval.quorum,
        "requester": approval.requester,
        "created_by": approval.created_by,
        "state": approval.state.value,
        "created_us": to_us(approval.created_at),
        "expires_us": to_us(approval.expires_at),
        "decided_us": None if approval.decided_at is None else to_us(approval.decided_at),
        "consumed_us": None if approval.consumed_at is None else to_us(approval.consumed_at),
        "consumed_by": approval.consumed_by,
        "cancelled_by": approval.cancelled_by,
        "cancel_reason": approval.cancel_reason,
        "workflow_id": approval.workflow_id,
        "step_id": approval.step_id,
        "gateway_request_id": approval.gateway_request_id,
        "triggered_policies": json.dumps([dict(p) for p in approval.triggered_policies]),
        "artifacts": json.dumps([asdict(a) for a in approval.artifacts]),
    }


def _approval(row: Any, records: tuple[DecisionRecord, ...]) -> Approval:
    return Approval(
        approval_id=row["approval_id"],
        request_id=row["request_id"],
        subject_kind=SubjectKind(row["subject_kind"]),
        subject_hash=row["subject_hash"],
        reason=row["reason"],
        required_role=row["required_role"],
        quorum=row["quorum"],
        requester=row["requester"],
        created_by=row["created_by"],
        state=State(row["state"]),
        created_at=from_us(row["created_us"]),
        expires_at=from_us(row["expires_us"]),
        decided_at=None if row["decided_us"] is None else from_us(row["decided_us"]),
        consumed_at=None if row["consumed_us"] is None else from_us(row["consumed_us"]),
        consumed_by=row["consumed_by"],
        cancelled_by=row["cancelled_by"],
        cancel_reason=row["cancel_reason"],
        workflow_id=row["workflow_id"],
        step_id=row["step_id"],
        gateway_request_id=row["gateway_request_id"],
        triggered_policies=tuple(json.loads(row["triggered_policies"])),
        artifacts=tuple(ArtifactSummary(**a) for a in json.loads(row["artifacts"])),
        decisions=records,
    )


def _record(row: Any) -> DecisionRecord:
    return DecisionRecord(
        approval_id=row["approval_id"],
        approved=bool(row["approved"]),
        reason=row["reason"],
        approver=row["approver"],
        approver_roles=tuple(json.loads(row["approver_roles"])),
        decided_at=from_us(row["decided_us"]),
        subject_hash=row["subject_hash"],
        signature=bytes(row["signature"]),
        key_id=row["key_id"],
    )
