"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    schema = context.config.attributes.get("audit_schema")
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    # The audit log is append-only: no migration removes evidence.
    raise NotImplementedError("audit migrations are forward-only")
