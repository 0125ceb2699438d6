"""The one error table, as HTTP statuses and OpenAI's error shape.

Every domain error already has its gRPC code (agentloop.errors); here that code becomes the
HTTP status OpenAI's clients act on: they retry 429 and 5xx, wait what `Retry-After` (and
the SDKs' `retry-after-ms`) says, and show `param` for a 400. The body is
`{"error": {"message", "type", "param", "code"}}`, `code` being the error's reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc

from agentloop.errors import AgentLoopError, BackendRejected, InvalidArgument, RetryableError

#: gRPC code -> HTTP status. 499 is the status proxies log for a client that went away.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
#: HTTP status -> OpenAI's error type.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "invalid_request_error",
               408: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 429: "rate_limit_error",
               501: "invalid_request_error"}
SERVER_ERROR = "server_error"


def http_status(error: AgentLoopError) -> int:
    return HTTP_STATUS.get(error.code, 500)


def error_body(error: AgentLoopError, rename: Callable[[str], str] = str,
               status: int | None = None) -> dict[str, Any]:
    """OpenAI's error object for a domain error; `param` names the first bad field."""
    status = http_status(error) if status is None else status
    param: str | None = None
    if isinstance(error, InvalidArgument) and error.violations:
        param = rename(error.violations[0][0])
    elif isinstance(error, BackendRejected) and error.field:
        param = rename(error.field)
    return {"error": {"message": error.message, "type": ERROR_TYPES.get(status, SERVER_ERROR),
                      "param": param, "code": error.reason.lower()}}


def error_headers(error: AgentLoopError) -> dict[str, str]:
    """When to come back: Retry-After in whole seconds (HTTP's unit, rounded up so a
    client never comes back early) and the exact retry-after-ms the SDKs read first."""
    if not isinstance(error, RetryableError):
        return {}
    return {"Retry-After": str(max(1, math.ceil(error.retry_after))),
            "retry-after-ms": str(max(1, round(error.retry_after * 1000)))}
