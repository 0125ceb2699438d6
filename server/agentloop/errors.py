"""Domain errors and their gRPC statuses with rich details (the design's error table).

Services and backends raise `AgentLoopError` subclasses; one server interceptor
(`agentloop.rpc.interceptors.ErrorInterceptor`) turns them into statuses. Messages are
written for clients: no stack traces, no internal URLs. A class named for its status
(InvalidArgument, ResourceExhausted, DeadlineExceeded, ...) reaches Python callers as the
`agentloop_client.errors` class of the same name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "agentloop.v1"
#: The request field of a JSON Schema for the output (Generate, StreamGenerate).
FORMAT_SCHEMA_FIELD = "format.json_schema"
#: The field named when an engine cannot enforce the tools' schemas (function calling).
TOOLS_FIELD = "tools"


class AgentLoopError(Exception):
    """Base of every error a client may see; `code` is the gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"
    #: A backend sets this when the engine never started on the request (connect error,
    #: reset before the response headers, HTTP 503): sending it again is safe.
    retryable_before_first_token: bool = False

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        """The google.rpc detail messages sent with the status."""
        return [_pack(error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata))]

    def to_status(self) -> grpc.Status:
        proto = status_pb2.Status(
            code=_CODE_NUMBERS[self.code], message=self.message, details=self.details()
        )
        return rpc_status.to_status(proto)


class RetryableError(AgentLoopError):
    """An error worth retrying later (or on another replica): carries RetryInfo."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = 1.0,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after = retry_after

    def details(self) -> list[any_pb2.Any]:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_after * 1e9))
        return [*super().details(), _pack(error_details_pb2.RetryInfo(retry_delay=delay))]


class InvalidArgument(AgentLoopError):
    """Bad input: INVALID_ARGUMENT with a BadRequest naming every bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    #: Violations reported at most, and the message's length: both travel in headers,
    #: which gRPC caps (a request with hundreds of bad fields must still get its answer).
    MAX_VIOLATIONS = 20
    MAX_MESSAGE_CHARS = 2000

    def __init__(self, violations: Iterable[tuple[str, str]]) -> None:
        found = list(violations)
        self.violations = [(name[:200], why[:300]) for name, why in found[:self.MAX_VIOLATIONS]]
        if len(found) > self.MAX_VIOLATIONS:
            self.violations.append(("request", f"and {len(found) - self.MAX_VIOLATIONS} more"))
        summary = "; ".join(f"{name}: {why}" for name, why in self.violations)
        super().__init__(f"invalid request: {summary}"[:self.MAX_MESSAGE_CHARS])

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=name, description=why)
            for name, why in self.violations
        ])
        return [_pack(bad_request)]


class BackendRejected(AgentLoopError):
    """The backend refused the request as malformed (Ollama 400). When the backend knows
    which field it refused (a schema its grammar converter cannot take), a BadRequest
    names it beside the ErrorInfo."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "BACKEND_REJECTED_REQUEST"

    def __init__(self, message: str, *, field: str = "",
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message, metadata=metadata)
        self.field = field

    def details(self) -> list[any_pb2.Any]:
        if not self.field:
            return super().details()
        bad_request = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=self.field,
                                                        description=self.message[:300])])
        return [*super().details(), _pack(bad_request)]


class ModelNotFound(AgentLoopError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"


class BackendUnavailable(RetryableError):
    """Backend unreachable, loading, failed, or its circuit is open."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "BACKEND_UNAVAILABLE"


class UpstreamCredentialsRefused(BackendUnavailable):
    """The upstream refused the gateway's own credentials (HTTP 401/403): the operator's
    key is wrong or expired, nothing the caller did or can fix."""

    reason = "UPSTREAM_CREDENTIALS_REFUSED"


class CircuitOpen(BackendUnavailable):
    """The backend failed repeatedly: calls fail fast until a probe finds it back."""

    reason = "CIRCUIT_OPEN"


class BackendStreamFailed(RetryableError):
    """The backend failed after the stream started (error line, reset, timeout)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "BACKEND_STREAM_FAILED"


class BackendProtocolError(AgentLoopError):
    """The backend sent something that breaks its contract (bad JSON, truncated end)."""

    code = grpc.StatusCode.INTERNAL
    reason = "BACKEND_PROTOCOL_ERROR"


class UpstreamProtocolError(BackendProtocolError, RetryableError):
    """An upstream (Ollama, an OpenAI-compatible server) sent what breaks its protocol or
    its bounds (bad JSON, a line or an answer beyond any size). Its answer is not the
    gateway's fault: UNAVAILABLE, as any other failure of the upstream, never INTERNAL."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(RetryableError):
    """Too much in flight here or at the backend: go elsewhere or come back later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"


class QuotaExceeded(ResourceExhausted):
    """A tenant is past one of its limits: a QuotaFailure names the limit, RetryInfo says
    when it frees, ErrorInfo's metadata carries both as `limit` and `tenant`."""

    reason = "QUOTA_EXCEEDED"

    def __init__(self, tenant: str, limit: str, message: str, *, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after,
                         metadata={"limit": limit, "tenant": tenant})
        self.tenant = tenant
        self.limit = limit

    def details(self) -> list[any_pb2.Any]:
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=f"tenant:{self.tenant}", description=self.message)
        if "quota_id" in error_details_pb2.QuotaFailure.Violation.DESCRIPTOR.fields_by_name:
            violation.quota_id = self.limit
        return [*super().details(),
                _pack(error_details_pb2.QuotaFailure(violations=[violation]))]


class Shed(ResourceExhausted):
    """A call was refused (or put out of the queue) to make room for calls that matter
    more, or for tenants that had less service: retry later or elsewhere."""

    reason = "SHED"


class SendStalled(AgentLoopError):
    """The client did not read a stream's next message in time. RESOURCE_EXHAUSTED is the
    code gRPC gives to flow-control limits reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "SEND_STALLED"


class ShuttingDown(RetryableError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"


class EngineRestarting(RetryableError):
    """The embedded engine's process died or hung and is being restarted. Not a
    BackendUnavailable: the engine's supervisor already restarts it and readiness says so,
    so the circuit breaker does not count it (one request that crashes the engine must not
    open the circuit for everyone)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "ENGINE_RESTARTING"


class Unimplemented(AgentLoopError):
    """The backend cannot do what the call asks: no portable API for it (counting tokens on
    Ollama or an OpenAI-compatible server)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNSUPPORTED_BY_BACKEND"


class DeadlineExceeded(AgentLoopError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class FirstMessageTimeout(DeadlineExceeded):
    """A client stream did not send its first message within the server's timeout."""

    reason = "FIRST_MESSAGE_TIMEOUT"


class Cancelled(AgentLoopError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class FailedPrecondition(AgentLoopError):
    """The call cannot be served as asked (e.g. local-only, yet only remote upstreams
    serve the model): sending it again unchanged will not help."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, reason: str = "",
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message, metadata=metadata)
        if reason:
            self.reason = reason


class RunNotFound(AgentLoopError):
    """No run of the caller's tenant has this id (another tenant's run is not found either)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "RUN_NOT_FOUND"


class RunStoreUnavailable(RetryableError):
    """The run store does not answer: no new run is accepted until it does."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "RUN_STORE_UNAVAILABLE"


class RunStoreFull(ResourceExhausted):
    """The run store has no room (a full disk, or its size limit): no new run is accepted."""

    reason = "RUN_STORE_FULL"


class RunLimitReached(ResourceExhausted):
    """Too many runs queued or running (for the tenant or on this replica)."""

    reason = "RUN_LIMIT"


class Unauthenticated(AgentLoopError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


def internal_error() -> AgentLoopError:
    """What a client sees for a bug: a fixed message, the details stay in the server log."""
    return AgentLoopError("internal error")


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


_CODE_NUMBERS = {code: getattr(code_pb2, code.name) for code in grpc.StatusCode}
