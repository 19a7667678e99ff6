"""Domain errors. Each names its gRPC status as a string so pure modules stay grpc-free;
the server interceptor is the only place that turns them into a status."""


class CopyfreeError(Exception):
    """Base class; `status` is a grpc.StatusCode member name."""

    status = "INTERNAL"


class InvalidInput(CopyfreeError):
    status = "INVALID_ARGUMENT"


class NotFound(CopyfreeError):
    status = "NOT_FOUND"


class AlreadyExists(CopyfreeError):
    status = "ALREADY_EXISTS"


class FailedPrecondition(CopyfreeError):
    status = "FAILED_PRECONDITION"


class Unavailable(CopyfreeError):
    status = "UNAVAILABLE"


class DeadlineExceeded(CopyfreeError):
    status = "DEADLINE_EXCEEDED"


class ResourceExhausted(CopyfreeError):
    status = "RESOURCE_EXHAUSTED"
