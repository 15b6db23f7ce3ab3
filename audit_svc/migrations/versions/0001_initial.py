"""Append-only events and checkpoints, with triggers that refuse UPDATE and DELETE.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TABLES = ("audit_events", "audit_checkpoints")


def upgrade() -> None:
    schema = context.config.attributes.get("audit_schema")
    sequence = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "audit_events",
        sa.Column("sequence", sequence, primary_key=True, autoincrement=False),
        sa.Column("event_id", sa.String(128), nullable=False),
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
        sa.UniqueConstraint("event_id", name="audit_events_event_id_key"),
        schema=schema,
    )
    op.create_index(
        "audit_events_workflow_id", "audit_events", ["workflow_id", "sequence"], schema=schema
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("tree_size", sa.BigInteger, nullable=False),
        sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("verifier_key", sa.Text, nullable=False),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
        schema=schema,
    )
    if op.get_bind().dialect.name == "postgresql":
        _postgresql_triggers(schema or "public")
    else:
        _sqlite_triggers()


def _sqlite_triggers() -> None:
    for table in _TABLES:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_refuse_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {action} refused'); END"
            )


def _postgresql_triggers(schema: str) -> None:
    op.execute(
        f"""
        CREATE FUNCTION "{schema}".audit_refuse_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END
        $$
        """
    )
    for table in _TABLES:
        op.execute(
            f'CREATE TRIGGER {table}_refuse_change BEFORE UPDATE OR DELETE ON "{schema}".{table} '
            f'FOR EACH ROW EXECUTE FUNCTION "{schema}".audit_refuse_change()'
        )
        op.execute(
            f'CREATE TRIGGER {table}_refuse_truncate BEFORE TRUNCATE ON "{schema}".{table} '
            f'FOR EACH STATEMENT EXECUTE FUNCTION "{schema}".audit_refuse_change()'
        )


def downgrade() -> None:
    # The audit log is append-only: no migration removes evidence.
    raise NotImplementedError("audit migrations are forward-only")
