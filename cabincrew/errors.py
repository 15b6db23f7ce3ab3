"""The kernel's exception base and the one mapping from domain errors to gRPC status.

Every service raises subclasses of ``CabinCrewError`` from domain code; the service layer
turns them into a ``grpc.Status`` with rich details exactly once, in ``to_status``. No
internal text (tracebacks, validation dumps) reaches the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class Violation:
    """One invalid field of a request."""

    field: str
    description: str


class CabinCrewError(Exception):
    """Base of every error CabinCrew raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return ""

    def details(self) -> list[any_pb2.Any]:
        """Rich status details for the wire."""
        return []


class InvalidArgument(CabinCrewError):
    """Input that does not validate; carries field violations."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, violations: Sequence[Violation] = ()) -> None:
        super().__init__(message)
        self.violations = tuple(violations)

    def details(self) -> list[any_pb2.Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        return [packed]


class NotFound(CabinCrewError):
    """The named thing does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CabinCrewError):
    """An idempotency key was reused with a different payload."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CabinCrewError):
    """A transition the state machine forbids."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, violation_type: str = "STATE", subject: str = "") -> None:
        super().__init__(message)
        self.violation_type = violation_type
        self.subject = subject

    def details(self) -> list[any_pb2.Any]:
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=self.violation_type, subject=self.subject, description=self.message
                )
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        return [packed]


class PermissionDenied(CabinCrewError):
    """The authenticated principal may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(CabinCrewError):
    """No valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(CabinCrewError):
    """A dependency is down; the caller may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(CabinCrewError):
    """Back-pressure: the caller should retry after ``retry_after`` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float = 0.1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def details(self) -> list[any_pb2.Any]:
        seconds = int(self.retry_after)
        nanos = int((self.retry_after - seconds) * 1e9)
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos)
        )
        packed = any_pb2.Any()
        packed.Pack(retry)
        return [packed]


class DeadlineExceeded(CabinCrewError):
    """An operation ran past its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def to_status(error: CabinCrewError) -> grpc.Status:
    """Map a domain error to a gRPC status with rich details (the one mapping)."""
    status = status_pb2.Status(
        code=_CODE_VALUES[error.code], message=error.message, details=error.details()
    )
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def field_violations(error: grpc.RpcError) -> list[Violation]:
    """Extract BadRequest field violations from a received gRPC error."""
    status = rpc_status.from_call(error)
    if status is None:
        return []
    found: list[Violation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.extend(Violation(v.field, v.description) for v in bad.field_violations)
    return found


_CODE_VALUES = {code: code.value[0] for code in grpc.StatusCode}
assert _CODE_VALUES[grpc.StatusCode.INVALID_ARGUMENT] == code_pb2.INVALID_ARGUMENT
