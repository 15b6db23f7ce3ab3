"""The write-ahead log, materialised workflows and steps, plan-tokens, keys and batches.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the tables, and the triggers that keep the log append-only."""
    schema = context.config.attributes.get("schema")
    op.create_table(
        "orchestrator_wal",
        sa.Column(
            "sequence",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("workflow_id", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("timestamp_us", sa.BigInteger, nullable=False),
        sa.Column("entry_type", sa.String(64), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.UniqueConstraint("workflow_id", "position", name="uq_orchestrator_wal_position"),
        schema=schema,
    )
    op.create_table(
        "orchestrator_workflows",
        sa.Column("workflow_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("requester", sa.String(128), nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
        sa.Column("terminal", sa.Boolean, nullable=False),
        sa.Column("held", sa.Boolean, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("audited_position", sa.Integer, nullable=False),
        sa.Column("owner", sa.String(128)),
        sa.Column("lease_expires_us", sa.BigInteger, nullable=False),
        sa.Column("command", sa.Text),
        sa.Column("summary", sa.Text, nullable=False),
        schema=schema,
    )
    for name, columns in (
        ("ix_orchestrator_workflows_created", ["created_us", "workflow_id"]),
        ("ix_orchestrator_workflows_state", ["state"]),
        ("ix_orchestrator_workflows_batch", ["batch_id"]),
        ("ix_orchestrator_workflows_claim", ["terminal", "held", "lease_expires_us"]),
    ):
        op.create_index(name, "orchestrator_workflows", columns, schema=schema)
    op.create_table(
        "orchestrator_steps",
        sa.Column("workflow_id", sa.String(64), primary_key=True),
        sa.Column("step_id", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
        sa.Column("document", sa.Text, nullable=False),
        schema=schema,
    )
    op.create_table(
        "orchestrator_plan_tokens",
        sa.Column("workflow_id", sa.String(64), primary_key=True),
        sa.Column("step_id", sa.String(64), primary_key=True),
        sa.Column("token", sa.String(64), primary_key=True),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("envelope", sa.Text, nullable=False),
        schema=schema,
    )
    op.create_table(
        "orchestrator_requests",
        sa.Column("method", sa.String(32), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("result_id", sa.String(64), nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        schema=schema,
    )
    op.create_table(
        "orchestrator_batches",
        sa.Column("batch_id", sa.String(64), primary_key=True),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
        sa.Column("done", sa.Boolean, nullable=False),
        sa.Column("document", sa.Text, nullable=False),
        schema=schema,
    )
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER orchestrator_wal_no_{verb.lower()} BEFORE {verb} "
                "ON orchestrator_wal BEGIN "
                "SELECT RAISE(ABORT, 'orchestrator_wal is append-only'); END"
            )
    else:
        table = f'"{schema}".orchestrator_wal' if schema else "orchestrator_wal"
        function = (
            f'"{schema}".orchestrator_wal_append_only'
            if schema
            else ("orchestrator_wal_append_only")
        )
        op.execute(
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'orchestrator_wal is append-only'; END $$"
        )
        op.execute(
            f"CREATE TRIGGER orchestrator_wal_append_only BEFORE UPDATE OR DELETE "
            f"ON {table} FOR EACH ROW EXECUTE FUNCTION {function}()"
        )
        op.execute(
            f"CREATE TRIGGER orchestrator_wal_no_truncate BEFORE TRUNCATE "
            f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        )
