"""ApprovalService: human sign-off bound to the exact plan."""
