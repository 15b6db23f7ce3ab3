"""Approvals, their signed decisions and the idempotency keys of calls.

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
    """Create the three tables."""
    schema = context.config.attributes.get("schema")
    op.create_table(
        "approvals",
        sa.Column("approval_id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("subject_kind", sa.String(32), nullable=False),
        sa.Column("subject_hash", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("required_role", sa.String(64), nullable=False),
        sa.Column("quorum", sa.Integer, nullable=False),
        sa.Column("requester", sa.String(128), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("expires_us", sa.BigInteger, nullable=False),
        sa.Column("decided_us", sa.BigInteger),
        sa.Column("consumed_us", sa.BigInteger),
        sa.Column("consumed_by", sa.String(128), nullable=False),
        sa.Column("cancelled_by", sa.String(128), nullable=False),
        sa.Column("cancel_reason", sa.Text, nullable=False),
        sa.Column("workflow_id", sa.String(128), nullable=False),
        sa.Column("step_id", sa.String(128), nullable=False),
        sa.Column("gateway_request_id", sa.String(128), nullable=False),
        sa.Column("triggered_policies", sa.Text, nullable=False),
        sa.Column("artifacts", sa.Text, nullable=False),
        schema=schema,
    )
    for name, columns in (
        ("ix_approvals_state_expires", ["state", "expires_us"]),
        ("ix_approvals_created", ["created_us", "approval_id"]),
        ("ix_approvals_workflow", ["workflow_id"]),
        ("ix_approvals_role", ["required_role"]),
        ("ix_approvals_requester", ["requester"]),
    ):
        op.create_index(name, "approvals", columns, schema=schema)
    target = f"{schema}.approvals.approval_id" if schema else "approvals.approval_id"
    op.create_table(
        "approval_decisions",
        sa.Column("approval_id", sa.String(64), sa.ForeignKey(target), primary_key=True),
        sa.Column("approver", sa.String(128), primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("approved", sa.Boolean, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("approver_roles", sa.Text, nullable=False),
        sa.Column("decided_us", sa.BigInteger, nullable=False),
        sa.Column("subject_hash", sa.String(64), nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        schema=schema,
    )
    op.create_table(
        "approval_requests",
        sa.Column("method", sa.String(32), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("approval_id", sa.String(64), nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        schema=schema,
    )


def downgrade() -> None:
    """Drop the three tables."""
    schema = context.config.attributes.get("schema")
    op.drop_table("approval_requests", schema=schema)
    op.drop_table("approval_decisions", schema=schema)
    op.drop_table("approvals", schema=schema)
