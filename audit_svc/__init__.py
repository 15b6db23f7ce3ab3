"""AuditService: the tamper-evident, append-only audit log."""
