"""The audit service's errors: one base, each also a kernel error so ``to_status`` maps it."""

from __future__ import annotations

from collections.abc import Sequence

from cabincrew.errors import (
    AlreadyExists,
    CabinCrewError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    Violation,
)


class AuditError(CabinCrewError):
    """Base of every error the audit service raises on purpose."""


class InvalidEvent(AuditError, InvalidArgument):
    """An event that does not validate (required fields, sizes, enum values)."""

    def __init__(self, message: str, violations: Sequence[Violation] = ()) -> None:
        InvalidArgument.__init__(self, message, violations)

    def remedy(self) -> str:
        return "correct the listed fields; AuditEvent is defined in the protocol's schema.json"


class EventConflict(AuditError, AlreadyExists):
    """An event_id already stored with different content."""

    def remedy(self) -> str:
        return "an event_id names one event forever; give a different event a new id"


class LogOverloaded(AuditError, ResourceExhausted):
    """The append queue is full; retry after the hinted delay."""

    def __init__(self, message: str, retry_after: float = 0.2) -> None:
        ResourceExhausted.__init__(self, message, retry_after)


class LogClosed(AuditError, Unavailable):
    """The log is shutting down or its store failed; the caller may retry elsewhere or later."""


class LogCorrupted(AuditError, FailedPrecondition):
    """The stored log does not verify; appends are refused until an operator looks at it."""

    def __init__(self, message: str, sequence: int) -> None:
        FailedPrecondition.__init__(self, message, "INTEGRITY", f"sequence {sequence}")
        self.sequence = sequence

    def remedy(self) -> str:
        return "run `cabincrew audit verify` and restore the log from a verified export"


class BadRequest(AuditError, InvalidArgument):
    """A read request with an invalid argument (page token, range, tree size)."""

    def __init__(self, message: str, field: str) -> None:
        InvalidArgument.__init__(self, message, [Violation(field, message)])
