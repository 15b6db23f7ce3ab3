"""OrchestratorService: restart-safe governed workflows."""
