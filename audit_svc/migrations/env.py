"""Alembic environment of the audit service, run programmatically by ``SqlAuditStore.migrate``.

The caller passes an open connection (inside its transaction) and the schema (``audit`` on
PostgreSQL, none on SQLite) through ``config.attributes``; no ini file, no logging setup.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
schema = context.config.attributes.get("audit_schema")

context.configure(
    connection=connection,
    # Prefixed, so that services sharing one SQLite file keep separate histories.
    version_table="audit_alembic_version",
    version_table_schema=schema,
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
