"""gRPC failures as Python exceptions that carry the status code and the rich details.

The server puts a `google.rpc.Status` in the `grpc-status-details-bin` trailer with
`BadRequest` (which fields are bad), `ErrorInfo` (a machine-readable reason) and
`RetryInfo` (how long to wait before trying again). `error_from_rpc` unpacks them once,
so callers write `except Unavailable as exc: time.sleep(exc.retry_delay or 1)`.

Each class is named for its gRPC status. Where the server has an error class of the same
name (`agentloop.errors`: InvalidArgument, ResourceExhausted, ...), it is the one the
server raised for that status: one name, one meaning, on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


class AgentLoopError(Exception):
    """A failed call: `code`, `message` and whichever rich details the server sent."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        bad_request: error_details_pb2.BadRequest | None = None,
        error_info: error_details_pb2.ErrorInfo | None = None,
        retry_info: error_details_pb2.RetryInfo | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.bad_request = bad_request
        self.error_info = error_info
        self.retry_info = retry_info

    @property
    def retry_delay(self) -> float | None:
        """Seconds the server asks to wait before retrying (RetryInfo), if it said."""
        if self.retry_info is None or not self.retry_info.HasField("retry_delay"):
            return None
        return self.retry_info.retry_delay.ToNanoseconds() / 1e9

    @property
    def reason(self) -> str | None:
        """The ErrorInfo reason, e.g. "MODEL_NOT_FOUND" or "OVERLOADED"."""
        return self.error_info.reason if self.error_info is not None else None

    @property
    def field_violations(self) -> dict[str, str]:
        """Bad request fields named by BadRequest: {"options.top_p": "must be in [0, 1]"}."""
        if self.bad_request is None:
            return {}
        return {v.field: v.description for v in self.bad_request.field_violations}


class InvalidArgument(AgentLoopError):
    """The request is malformed; `field_violations` says which fields and why."""


class NotFound(AgentLoopError):
    """The model is unknown to the backend."""


class Unauthenticated(AgentLoopError):
    """No API key, or a wrong one."""


class ResourceExhausted(AgentLoopError):
    """The replica or its backend is full; retry after `retry_delay`."""


class Unavailable(AgentLoopError):
    """The server or its backend is down, loading or draining; retry after `retry_delay`."""


class Unimplemented(AgentLoopError):
    """The server's backend cannot do this (e.g. CountTokens on Ollama)."""


class DeadlineExceeded(AgentLoopError):
    """The call's deadline passed."""


class Cancelled(AgentLoopError):
    """The call was cancelled."""


_BY_CODE: dict[grpc.StatusCode, type[AgentLoopError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def error_from_rpc(error: grpc.RpcError) -> AgentLoopError:
    """The exception for a failed sync or asyncio call, with its details unpacked."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message: str = error.details() or ""  # type: ignore[attr-defined]
    details = _status_details(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    kinds = {
        "bad_request": error_details_pb2.BadRequest,
        "error_info": error_details_pb2.ErrorInfo,
        "retry_info": error_details_pb2.RetryInfo,
    }
    found = {}
    for detail in details:
        for name, kind in kinds.items():
            if detail.Is(kind.DESCRIPTOR):
                found[name] = kind()
                detail.Unpack(found[name])
    return error_class(code)(code, message, **found)


def error_class(code: grpc.StatusCode) -> type[AgentLoopError]:
    """The exception raised for a status: named like the server's error for that status."""
    return _BY_CODE.get(code, AgentLoopError)


def _status_details(trailers: Sequence[tuple[str, str | bytes]]) -> Sequence:
    for key, value in trailers:
        if key == DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value).details
    return ()
