"""Alembic migrations of the approval service's tables (run by ``ApprovalStore.migrate``)."""
