"""The server interceptor: a SERVER span, the RPC duration metric and one log line per RPC.

Written here rather than taken from opentelemetry-instrumentation-grpc because that
interceptor reports a cancelled or timed-out call as OK (it only learns codes from
`abort`), and the metric and the log line need the same final status anyway. So one
wrapper does all three: the caller's W3C `traceparent` (and baggage) from the metadata
becomes the span's parent, the status comes from `abort` (ErrorInterceptor, inside this
one), from the deadline, or from the cancellation, and health and reflection calls pass
through untouched. Streams pay one async-generator hop per message, nothing more.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.metrics import Histogram
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from agentloop.rpc.interceptors import Continuation, is_service_method, wrap_handler
from agentloop.telemetry import logs
from agentloop.telemetry.metrics import DOOR
from agentloop.tenants import resolved_tenant, tenant_label
from agentloop_client.channel import SESSION_HEADER

request_log = logging.getLogger(logs.REQUEST_LOGGER)
GRPC_DOOR = "grpc"
# A session id is the caller's text: kept this long in the span and the log line, no longer.
MAX_SESSION_CHARS = 128

# Codes that are the server's fault; the others (bad argument, not found, ...) leave a
# server span's status unset, as the RPC semantic conventions ask.
_SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})


class ServerTelemetry(grpc.aio.ServerInterceptor):
    """Observe every AgentLoopService call; put it first so it sees every outcome."""

    def __init__(self, tracer: Tracer, rpc_duration: Histogram) -> None:
        self._tracer = tracer
        self._rpc_duration = rpc_duration

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not is_service_method(handler_call_details.method):
            return handler  # health checks and reflection stay out of traces
        service, method = handler_call_details.method.lstrip("/").split("/", 1)

        def wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                rpc = _ObservedRpc(self._tracer, self._rpc_duration, service, method, context)
                try:
                    return await behavior(request, context)
                except BaseException as exc:
                    rpc.failed(exc)
                    raise
                finally:
                    rpc.end()

            return unary

        def wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                rpc = _ObservedRpc(self._tracer, self._rpc_duration, service, method, context)
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as exc:
                    rpc.failed(exc)
                    raise
                finally:
                    rpc.end()

            return streaming

        return wrap_handler(handler, wrap_unary, wrap_stream)


class _ObservedRpc:
    """One call in progress: its span (current while it runs), start time and log entry."""

    __slots__ = ("_context", "_context_token", "_duration", "_log", "_log_token", "_started",
                 "code", "method", "service", "session", "span")

    def __init__(self, tracer: Tracer, duration: Histogram, service: str, method: str,
                 context: grpc.aio.ServicerContext) -> None:
        self._duration = duration
        self._context = context
        self._started = time.perf_counter()
        self.service = service
        self.method = method
        self.code: grpc.StatusCode | None = None
        metadata = dict(context.invocation_metadata() or ())
        parent = propagate.extract(metadata)
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
                      DOOR: GRPC_DOOR}
        # The conversation affinity key (balancers hash it): which replica served which
        # session shows in traces and logs. Never a metric label: the caller chooses it.
        session = metadata.get(SESSION_HEADER)
        self.session = str(session)[:MAX_SESSION_CHARS] if session else None
        if self.session:
            attributes["session.id"] = self.session
        self.span = tracer.start_span(f"{service}/{method}", context=parent,
                                      kind=SpanKind.SERVER, attributes=attributes)
        self._context_token = otel_context.attach(trace.set_span_in_context(self.span, parent))
        self._log, self._log_token = logs.begin_request()

    def failed(self, exc: BaseException) -> None:
        """Name the status of a call that ended by an exception."""
        if isinstance(exc, grpc.aio.AbortError):
            self.code = self._context.code() or grpc.StatusCode.UNKNOWN
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            if self._context.code() not in (None, grpc.StatusCode.OK):
                self.code = self._context.code()  # closed by a guard outside that set it
                return
            remaining = self._context.time_remaining()
            self.code = (grpc.StatusCode.DEADLINE_EXCEEDED
                         if remaining is not None and remaining <= 0
                         else grpc.StatusCode.CANCELLED)
        else:
            self.code = grpc.StatusCode.UNKNOWN

    def end(self) -> None:
        duration = time.perf_counter() - self._started
        code = self.code or self._context.code() or grpc.StatusCode.OK
        status = code.value[0]
        span = self.span
        tenant = tenant_label(resolved_tenant().name)  # resolved by the edge (rpc.edge)
        span.set_attribute("agentloop.tenant", tenant)
        span.set_attribute("rpc.grpc.status_code", status)
        if code is not grpc.StatusCode.OK:
            span.set_attribute("error.type", code.name)
            if code in _SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()
        self._duration.record(duration, {
            "rpc.system": "grpc", "rpc.service": self.service, "rpc.method": self.method,
            "rpc.grpc.status_code": status, "agentloop.tenant": tenant, DOOR: GRPC_DOOR,
        })
        if request_log.isEnabledFor(logging.INFO):
            self._write_log(code, duration, tenant)
        logs.end_request(self._log_token)
        _detach(self._context_token)

    def _write_log(self, code: grpc.StatusCode, duration: float, tenant: str) -> None:
        fields = logs.request_fields(self.method, code.name, duration, tenant, self._log,
                                     self.session, self.span)
        request_log.info("%s %s %.1fms", self.method, code.name, duration * 1e3,
                         extra={"fields": fields})


def _detach(token: object) -> None:
    """Restore the context that was current before the call. A cancelled stream may be
    closed later by the event loop's async-generator finalizer, in another Context, where
    the token means nothing: there is nothing to restore there, and OpenTelemetry's own
    detach would log an error with a traceback for every such call."""
    if not isinstance(token, contextvars.Token):  # another runtime context than contextvars
        otel_context.detach(token)
        return
    try:
        token.var.reset(token)
    except ValueError:
        pass
