"""The approval service's errors: one base, each also a kernel error so that the one
mapping in ``cabincrew.errors.to_status`` gives its gRPC status.

Every refusal carries a short machine-readable ``refusal`` code; the audit event of the
refusal names it (``approval.refused`` with reason ``subject_mismatch: ...``).
"""

from __future__ import annotations

from cabincrew.errors import (
    CabinCrewError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)


class ApprovalError(CabinCrewError):
    """Base of the errors this package raises on purpose."""

    refusal = "refused"


class ApprovalNotFound(ApprovalError, NotFound):
    """No approval has this id."""

    refusal = "not_found"

    def remedy(self) -> str:
        return "check the id with `cabincrew approvals list`"


class NotAuthenticated(ApprovalError, Unauthenticated):
    """Approvals need an identity: anonymous callers are refused even where the server
    admits them."""

    refusal = "unauthenticated"

    def remedy(self) -> str:
        return "set CABINCREW_TOKEN to a token from `cabincrew auth issue`"


class SubjectMismatch(ApprovalError, FailedPrecondition):
    """The caller named another subject hash than the approval is bound to."""

    refusal = "subject_mismatch"

    def remedy(self) -> str:
        return "review the approval again (`cabincrew approvals show ID`): what you saw changed"


class MissingRole(ApprovalError, PermissionDenied):
    """The approver does not hold the required role."""

    refusal = "wrong_role"

    def remedy(self) -> str:
        return "ask someone who holds the required role, or an admin"


class SelfApproval(ApprovalError, PermissionDenied):
    """The requester (or whoever created the request for them) tried to answer it."""

    refusal = "self_approval"

    def remedy(self) -> str:
        return "another person must approve a request you made"


class NotAllowed(ApprovalError, PermissionDenied):
    """The caller may not do this to the approval (cancel, consume, act for another)."""

    refusal = "not_allowed"


class AlreadyResponded(ApprovalError, FailedPrecondition):
    """This approver already answered; an approver counts once."""

    refusal = "already_responded"


class Expired(ApprovalError, FailedPrecondition):
    """The approval expired before it was decided or used."""

    refusal = "expired"

    def remedy(self) -> str:
        return "request a new approval"


class AlreadyConsumed(ApprovalError, FailedPrecondition):
    """The approval was already used once."""

    refusal = "double_consume"


class NotApproved(ApprovalError, FailedPrecondition):
    """The approval is not in the state the operation needs (for example not approved)."""

    refusal = "wrong_state"
