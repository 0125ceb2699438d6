"""Server interceptors for the AgentLoopService methods (health and reflection pass through).

`ErrorInterceptor` is the one place where exceptions become gRPC statuses: domain errors
keep their code and rich details, anything else becomes a bare INTERNAL (the traceback
goes to the server log, never to the client). `DrainInterceptor` refuses new calls once
the server is draining, so a balancer moves them to another replica at once.
`UndecodableRequestGuard` answers request bytes that do not parse as the method's message
with INVALID_ARGUMENT, on every method (health and reflection too), where grpc itself
would answer UNKNOWN and log a traceback.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from agentloop.errors import AgentLoopError, InvalidArgument, ShuttingDown, internal_error
from agentloop.health import SERVICE_NAME

log = logging.getLogger(__name__)

SERVICE_PREFIX = f"/{SERVICE_NAME}/"

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def is_service_method(method: str) -> bool:
    """True for AgentLoopService RPCs; False for health, reflection and the like."""
    return method.startswith(SERVICE_PREFIX)


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap_unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    wrap_stream: Callable[[Callable[..., Any]], Callable[..., Any]],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """Rebuild a method handler with its behaviour wrapped (unary or streaming response)."""
    codecs = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **codecs)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **codecs)


async def abort_with(context: grpc.aio.ServicerContext, error: AgentLoopError) -> None:
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


def _unread(_data: bytes) -> None:
    """The request deserializer of a refused call: its bytes are never parsed."""
    return None


def refused(
    handler: grpc.RpcMethodHandler,
    refuse: Callable[[grpc.aio.ServicerContext], AgentLoopError],
) -> grpc.RpcMethodHandler:
    """The handler of a call refused before it is read: refuse's error, nothing received,
    decompressed or parsed (a request of millions of messages costs seconds to parse, a
    compressed one inflates). A unary request is received before its handler runs, so the
    refusal takes the request-stream form, which reads only what it asks for: nothing."""

    async def unary(_requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort_with(context, refuse(context))

    async def streaming(_requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort_with(context, refuse(context))
        yield  # pragma: no cover (abort raises): makes this an async generator

    codecs = {"request_deserializer": _unread,
              "response_serializer": handler.response_serializer}
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **codecs)
    return grpc.stream_unary_rpc_method_handler(unary, **codecs)


def _as_domain_error(exc: Exception, method: str) -> AgentLoopError:
    if isinstance(exc, AgentLoopError):
        return exc
    log.exception("unexpected error in %s", method)
    return internal_error()


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turn exceptions raised by the servicer into statuses with rich details."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not is_service_method(method):
            return handler

        def wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behavior(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await abort_with(context, _as_domain_error(exc, method))

            return unary

        def wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    async for response in behavior(request, context):
                        yield response
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await abort_with(context, _as_domain_error(exc, method))

            return streaming

        return wrap_handler(handler, wrap_unary, wrap_stream)


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """Refuse new AgentLoopService calls with UNAVAILABLE + RetryInfo while draining."""

    def __init__(self) -> None:
        self.draining = False

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not self.draining or not is_service_method(
            handler_call_details.method
        ):
            return handler
        return refused(handler, lambda _context: _shutting_down())


class CallsInFlight(grpc.aio.ServerInterceptor):
    """Tracks the AgentLoopService calls running, so that the ones still running when the
    shutdown grace ends get UNAVAILABLE with SHUTTING_DOWN (and RetryInfo), as the drain
    promises, rather than gRPC's bare cancel. Put it first: it sees every call's task."""

    def __init__(self) -> None:
        self._running: dict[asyncio.Task[Any], grpc.aio.ServicerContext] = {}
        self._cut: set[asyncio.Task[Any]] = set()

    # No __len__: grpc takes an interceptor that tests false for the end of the chain.
    @property
    def running(self) -> int:
        return len(self._running)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not is_service_method(handler_call_details.method):
            return handler

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behavior):
                return behavior  # streams are coroutines once the send-stall guard wrote them

            async def tracked(request: Any, context: grpc.aio.ServicerContext) -> Any:
                task = asyncio.current_task()
                assert task is not None
                self._running[task] = context
                try:
                    return await behavior(request, context)
                except asyncio.CancelledError:
                    if task not in self._cut:
                        raise
                    await abort_with(context, _shutting_down())
                finally:
                    self._running.pop(task, None)
                    self._cut.discard(task)

            return tracked

        return wrap_handler(handler, wrap, wrap)

    async def cut(self, within: float) -> None:
        """End every call still running with SHUTTING_DOWN; wait up to `within` seconds for
        them to have sent it."""
        tasks = list(self._running)
        for task, context in self._running.items():
            context.set_code(grpc.StatusCode.UNAVAILABLE)  # what telemetry inside records
            self._cut.add(task)
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=within)


def _shutting_down() -> ShuttingDown:
    return ShuttingDown("the server is shutting down; retry on another replica", retry_after=0.1)


class UndecodableRequest(InvalidArgument):
    """The request bytes are not the method's message in the protobuf binary format."""

    def __init__(self) -> None:
        super().__init__([("request", "not a valid protobuf message of the method's request "
                                      "type (undecodable bytes)")])


class _Undecodable:
    """What the guarded deserializer hands on in place of a message it could not parse."""


_UNDECODABLE = _Undecodable()


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, or whatever a parser raises on garbage
            return _UNDECODABLE

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if request is _UNDECODABLE:
            raise UndecodableRequest()
        yield request


class UndecodableRequestGuard(grpc.aio.ServerInterceptor):
    """Undecodable request bytes -> INVALID_ARGUMENT (BadRequest field `request`), no log."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        streaming_requests = handler.request_streaming

        def request_of(request: Any) -> Any:
            if streaming_requests:
                return _checked(request)
            if request is _UNDECODABLE:
                raise UndecodableRequest()
            return request

        def wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behavior(request_of(request), context)
                except UndecodableRequest as exc:
                    await abort_with(context, exc)

            return unary

        def wrap_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if not inspect.isasyncgenfunction(behavior):
                return wrap_unary(behavior)  # it streams with context.write (health Watch)

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    async for response in behavior(request_of(request), context):
                        yield response
                except UndecodableRequest as exc:
                    await abort_with(context, exc)

            return streaming

        return wrap_handler(handler, wrap_unary, wrap_stream,
                            request_deserializer=_lenient(handler.request_deserializer))
