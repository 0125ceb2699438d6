"""The transport edge: what one connection, one stream and all calls together may hold.

A caller can use HTTP/2 as the protocol allows and still try to hold the replica: never
read what it asked for, never send the message it announced, open streams by the
thousand, or send small compressed messages that inflate to the message cap. This module
keeps each of those bounded:

- `server_transport_options`: streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS) and
  the message cap, which applies to the decompressed message; by default the cap is the
  largest request the other limits allow (`request_message_cap`).
- `SendStallGuard`: a stream's next message may wait `send_stall_timeout` for the client to
  read (HTTP/2 flow control), then the call ends with RESOURCE_EXHAUSTED (SEND_STALLED).
  The generation never waits for the client in the first place (`rpc.coalesce`): this
  only bounds how long a stream that nobody reads is kept.
- `RequestBytes`: decompressed request bytes held by all calls together stay within
  `max_request_bytes_in_flight`; the edge (`rpc.edge`) counts each AgentLoopService
  message against it before parsing it, until its call ends; a call past it gets
  RESOURCE_EXHAUSTED, its bytes unparsed. gRPC inflates a compressed message before any
  handler sees it, stopping at the message cap: the cap bounds what one message inflates
  to, the budget what all calls hold after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc
from grpc._cython import cygrpc  # ExecuteBatchError: grpc.aio exports no name for it

from agentloop.config import Settings
from agentloop.errors import ResourceExhausted, SendStalled
from agentloop.rpc.agent_requests import MAX_CLIENT_TOOLS, MAX_TOOL_NAMES
from agentloop.rpc.interceptors import Continuation, abort_with, is_service_method, wrap_handler
from agentloop.rpc.requests import MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from agentloop.schema_limits import MAX_SCHEMA_BYTES

log = logging.getLogger(__name__)

#: Framing and the short fields (model name, options, ids, tool names) of one request.
_REQUEST_OVERHEAD = 64 * 1024
#: Protobuf framing of one repeated item (tag, length, nested message header).
_ITEM_OVERHEAD = 16
#: UTF-8 takes at most this many bytes per character.
_UTF8_MAX = 4


def request_message_cap(settings: Settings) -> int:
    """The largest request message the other limits allow, in bytes: the text limit
    (prompt, system, messages, goal, tools' descriptions), the images, the schemas (the
    output's and each client tool's, as sent), the stop strings, and framing. A bigger
    message could only be refused after it was inflated and parsed."""
    if settings.max_message_bytes:
        return settings.max_message_bytes
    schemas = (1 + MAX_CLIENT_TOOLS) * MAX_SCHEMA_BYTES
    stops = MAX_STOP_SEQUENCES * (MAX_STOP_CHARS * _UTF8_MAX + _ITEM_OVERHEAD)
    framing = (settings.max_messages + settings.max_images + MAX_CLIENT_TOOLS
               + MAX_TOOL_NAMES) * _ITEM_OVERHEAD
    return (settings.max_prompt_bytes + settings.max_image_bytes + schemas + stops + framing
            + _REQUEST_OVERHEAD)


def server_transport_options(settings: Settings) -> list[tuple[str, int]]:
    """grpc server options for the transport bounds."""
    return [
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # gRPC checks the message cap on the decompressed message.
        ("grpc.max_receive_message_length", request_message_cap(settings)),
    ]


# --- send stalls ---------------------------------------------------------------------------


class SendStallGuard(grpc.aio.ServerInterceptor):
    """Every AgentLoopService stream writes each message within `timeout` seconds or ends
    with SendStalled. Put it first: it turns the stream into the reader-writer form, which
    the interceptors inside it need not know."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming or not is_service_method(
                handler_call_details.method):
            return handler

        def wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
            if not inspect.isasyncgenfunction(behavior):
                return behavior

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> None:
                await self._relay(behavior(request, context), context)

            return streaming

        return wrap_handler(handler, lambda behavior: behavior, wrap_stream)

    async def _relay(self, responses: AsyncIterator[Any],
                     context: grpc.aio.ServicerContext) -> None:
        try:
            headers_sent = False
            async with aclosing(responses):
                async for response in responses:
                    if not headers_sent:
                        # Alone, before the first message: headers are not flow-controlled,
                        # and a status sent after a stalled first write must not send them
                        # a second time (gRPC would refuse the whole status).
                        with contextlib.suppress(cygrpc.UsageError):
                            # (unless the handler sent headers of its own: a run's id)
                            await context.send_initial_metadata(())
                        headers_sent = True
                    if not await self._write(response, context):
                        # The code for telemetry inside, which sees the stream closed.
                        context.set_code(SendStalled.code)
                        break
                else:
                    return
            # The stream is closed (the generation with it): now the status, which the
            # client reads only if it ever reads again.
            await abort_with(context, SendStalled(
                f"the client read nothing for {self._timeout:g}s (send_stall_timeout)"))
        except cygrpc.ExecuteBatchError:
            # The client cut the stream or its connection while a message or the status
            # was on its way: an ordinary cancel (grpc logs one debug line for it), not
            # the server's fault (grpc would log a traceback at error level).
            raise asyncio.CancelledError from None

    async def _write(self, response: Any, context: grpc.aio.ServicerContext) -> bool:
        """Write one message; False when the client did not take it within the timeout.
        A timer cancels the write where it waits: no task per message."""
        try:
            async with asyncio.timeout(self._timeout):
                await context.write(response)
        except TimeoutError:
            return False
        return True


# --- decompressed request bytes --------------------------------------------------------------


class RequestBytes:
    """Decompressed request bytes held by calls in progress, within one budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.in_flight = 0

    def take(self, size: int) -> bool:
        if self.in_flight + size > self.budget:
            return False
        self.in_flight += size
        return True

    def give_back(self, size: int) -> None:
        self.in_flight -= size


def over_budget(budget: RequestBytes) -> ResourceExhausted:
    return ResourceExhausted(
        f"the server holds too many request bytes at once ({budget.budget} in flight at "
        "most); retry shortly", retry_after=1.0, metadata={"limit": "request_bytes"})
