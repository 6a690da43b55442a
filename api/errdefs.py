"""Error categories, as containerd's errdefs package defines them.

Code raises the category where the failure is known (``raise NotFound(f"content {dgst}")``);
the gRPC and ttrpc edges map categories to status codes once, with :func:`to_status`, and
clients map status codes back with :func:`from_status`. The message format follows
containerd's: the category's text is appended after a colon (``content sha256:…: not found``),
which is what the Go client strips and re-appends in ``errdefs.FromGRPC``.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """gRPC status codes (the numbers are the wire contract)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ContainerdError(Exception):
    """Base of every categorised error; ``grpc_status`` is read by the ttrpc and gRPC edges."""

    grpc_status: int = Code.UNKNOWN
    suffix: str = "unknown"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        if not self.message:
            return self.suffix
        if self.message.endswith(": " + self.suffix):
            return self.message
        return f"{self.message}: {self.suffix}"


class Unknown(ContainerdError):
    grpc_status = Code.UNKNOWN
    suffix = "unknown"

    def __str__(self) -> str:
        # containerd never decorates an unknown error: it is shown as it was raised.
        return self.message or self.suffix


class InvalidArgument(ContainerdError):
    grpc_status = Code.INVALID_ARGUMENT
    suffix = "invalid argument"


class NotFound(ContainerdError):
    grpc_status = Code.NOT_FOUND
    suffix = "not found"


class AlreadyExists(ContainerdError):
    grpc_status = Code.ALREADY_EXISTS
    suffix = "already exists"


class FailedPrecondition(ContainerdError):
    grpc_status = Code.FAILED_PRECONDITION
    suffix = "failed precondition"


class Unavailable(ContainerdError):
    grpc_status = Code.UNAVAILABLE
    suffix = "unavailable"


class NotImplementedErr(ContainerdError):
    grpc_status = Code.UNIMPLEMENTED
    suffix = "not implemented"


class Canceled(ContainerdError):
    grpc_status = Code.CANCELLED
    suffix = "context canceled"


class DeadlineExceeded(ContainerdError):
    grpc_status = Code.DEADLINE_EXCEEDED
    suffix = "context deadline exceeded"


class ResourceExhausted(ContainerdError):
    grpc_status = Code.RESOURCE_EXHAUSTED
    suffix = "resource exhausted"


class OutOfRange(ContainerdError):
    grpc_status = Code.OUT_OF_RANGE
    suffix = "out of range"


class DataLoss(ContainerdError):
    grpc_status = Code.DATA_LOSS
    suffix = "data loss"


class PermissionDenied(ContainerdError):
    grpc_status = Code.PERMISSION_DENIED
    suffix = "permission denied"


_BY_CODE: dict[int, type[ContainerdError]] = {
    cls.grpc_status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unavailable,
        NotImplementedErr,
        Canceled,
        DeadlineExceeded,
        ResourceExhausted,
        OutOfRange,
        DataLoss,
        PermissionDenied,
    )
}


def to_status(exc: BaseException) -> tuple[int, str]:
    """The (code, message) pair sent on the wire for an exception raised by a handler.

    Only categorised errors get a specific code; anything else is UNKNOWN with its text, exactly
    as containerd reports a plain Go error. ``OSError`` is never mapped blanket-wise.
    """
    if isinstance(exc, ContainerdError):
        return int(exc.grpc_status), str(exc)
    return int(Code.UNKNOWN), str(exc) or type(exc).__name__


def from_status(code: int, message: str) -> ContainerdError:
    """Rebuild a categorised error from a status received by a client."""
    cls = _BY_CODE.get(code, Unknown)
    if cls is not Unknown and message.endswith(": " + cls.suffix):
        message = message[: -len(cls.suffix) - 2]
    elif cls is not Unknown and message == cls.suffix:
        message = ""
    return cls(message)
