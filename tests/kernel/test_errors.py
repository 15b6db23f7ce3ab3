import grpc
from google.rpc import error_details_pb2

from cabincrew.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Violation,
    to_status,
)


def test_invalid_argument_carries_bad_request_field_violations() -> None:
    status = to_status(InvalidArgument("bad", [Violation("event.event_id", "required")]))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    ((_key, value),) = [m for m in status.trailing_metadata if m[0] == "grpc-status-details-bin"]
    from google.rpc import status_pb2

    decoded = status_pb2.Status.FromString(value)
    bad = error_details_pb2.BadRequest()
    decoded.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "event.event_id"


def test_failed_precondition_and_resource_exhausted_map_to_their_codes() -> None:
    assert to_status(FailedPrecondition("no")).code == grpc.StatusCode.FAILED_PRECONDITION
    status = to_status(ResourceExhausted("slow down", retry_after=0.5))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert any(m[0] == "grpc-status-details-bin" for m in status.trailing_metadata)
