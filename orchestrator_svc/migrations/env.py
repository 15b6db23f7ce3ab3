"""Alembic environment: migrations run on the connection ``WorkflowStore.migrate`` passes in."""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes["connection"]

context.configure(
    connection=connection,
    target_metadata=None,
    version_table=config.attributes["version_table"],
    version_table_schema=config.attributes.get("schema"),
)
with context.begin_transaction():
    context.run_migrations()
