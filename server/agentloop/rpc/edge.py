"""The edge: whether a call is let in, and what it may hold, decided in one place.

Every call passes `Edge` before any servicer work. From the call's metadata and peer
alone, before a byte of its request is read, in this order:

1. its key (with keys on, except to `--auth-exempt` services): missing or unknown is
   UNAUTHENTICATED, and counts against the peer address's refusals;
2. the refusal lock-out: a peer address past `--refusal-burst` calls without a valid key
   is refused every call, a valid key or not, until its bucket refills;
3. the rate limit (AgentLoopService calls): the key's bucket, else the address's;
4. then each request message as it arrives, before it is parsed: an AgentLoopService
   call counts its bytes against `--max-request-bytes-in-flight` until it ends; health
   and reflection are never refused by that budget (a probe must answer while callers
   hold it all) and take messages of at most `PROBE_MESSAGE_BYTES` instead, held by
   nobody;
5. the tenant the key names becomes the call's RESOLVED_TENANT (agentloop.tenants).

Each call runs here in the request-streaming form, whatever its method's kind, so the
decision comes before anything is received or parsed, and what the call took from the
budget is given back in one `finally` on every path: a refusal, an error, a
cancellation, the stream's end.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from agentloop.config import Settings, parse_list
from agentloop.errors import AgentLoopError, InvalidArgument, ResourceExhausted, Unauthenticated
from agentloop.rpc.auth import (
    ApiKeys,
    RefusalLog,
    TokenBuckets,
    bearer_token,
    peer_address,
    service_of,
    too_many_refusals,
)
from agentloop.rpc.interceptors import Continuation, abort_with, is_service_method
from agentloop.rpc.transport import RequestBytes, over_budget
from agentloop.tenants import RESOLVED_TENANT, Tenant, digest

#: The largest request message of a health or reflection call (a service name, a symbol):
#: those calls are outside the byte budget, so each must be small.
PROBE_MESSAGE_BYTES = 4096

#: Looks at a call before anything of it is read: None lets it in, an error refuses it.
Refusal = Callable[[grpc.aio.ServicerContext], AgentLoopError | None]


class Edge(grpc.aio.ServerInterceptor):
    """Keys, refusals, rate limits, the request byte budget and the tenant, for every call."""

    def __init__(self, budget: RequestBytes, keys: ApiKeys | None = None,
                 exempt: Iterable[str] = (), refusals: TokenBuckets | None = None,
                 rate: TokenBuckets | None = None) -> None:
        self.budget = budget
        self._keys = keys if keys is not None and len(keys) else None
        self._exempt = frozenset(exempt)
        # Calls without a valid key, per peer address: past them, the address is refused
        # every call until its bucket refills, so guessing keys goes no faster.
        self._refusals = refusals
        self._rate = rate
        self._refusal_log = RefusalLog()

    @classmethod
    def from_settings(cls, settings: Settings, keys: ApiKeys, budget: RequestBytes) -> Edge:
        return cls(
            budget, keys, parse_list(settings.auth_exempt),
            TokenBuckets(settings.refusal_rate, settings.refusal_burst),
            TokenBuckets(settings.rate_limit, settings.rate_burst)
            if settings.rate_limit > 0 else None)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        service_call = is_service_method(method)
        checks_key = self._keys is not None and service_of(method) not in self._exempt
        key = bearer_token(handler_call_details.invocation_metadata)
        tenant = self.tenant_of(key) if checks_key else None

        def refusal(context: grpc.aio.ServicerContext) -> AgentLoopError | None:
            return self.refusal(peer_address(context), context.peer(), method, key, tenant,
                                checks_key=checks_key, service_call=service_call)

        return admitted(handler, refusal, tenant, self.budget if service_call else None)

    def tenant_of(self, key: str | None) -> Tenant | None:
        """The tenant of a key when keys are on and it is accepted, else None."""
        return self._keys.tenant_of(key) if self._keys is not None and key is not None \
            else None

    @property
    def checks_keys(self) -> bool:
        return self._keys is not None

    def refusal(self, address: str, peer: str, method: str, key: str | None,
                tenant: Tenant | None, *, checks_key: bool,
                service_call: bool = True) -> AgentLoopError | None:
        """Whether a call is refused, decided from its key and its peer alone (every door
        asks this, so a peer's refusals and buckets are one whichever door it uses):
        `address` is the peer without its port (`ipv4:10.0.0.5`), `peer` as logged, and
        `tenant` is `tenant_of(key)`."""
        if checks_key:
            if tenant is None:
                return self._unauthenticated(address, peer, method, key)
            if self._refusals is not None:
                wait = self._refusals.wait(address)
                if wait:
                    return too_many_refusals(wait)
        if service_call and self._rate is not None:
            # A valid key's bucket, else the address's: an invented key earns no bucket.
            client = ("key:" + digest(key).hex() if tenant is not None and key is not None
                      else "peer:" + address)
            wait = self._rate.take(client)
            if wait:
                return ResourceExhausted(
                    f"rate limit exceeded; the next call is allowed in {wait:.2f}s",
                    retry_after=wait, metadata={"limit": "rate"})
        return None

    def _unauthenticated(self, address: str, peer: str, method: str,
                         key: str | None) -> AgentLoopError:
        if self._refusals is not None:
            wait = self._refusals.take(address)
            if wait:
                return too_many_refusals(wait)
        why = "missing" if key is None else "invalid"
        self._refusal_log.warn(method, peer, why)
        return Unauthenticated(f"{why} API key: send the metadata 'authorization: Bearer <key>'")


def admitted(handler: grpc.RpcMethodHandler, refusal: Refusal, tenant: Tenant | None,
             budget: RequestBytes | None) -> grpc.RpcMethodHandler:
    """The handler in the request-streaming form: `refusal` decides before anything is
    read; each message then counts against `budget` (None: at most PROBE_MESSAGE_BYTES)
    before it is parsed, until the call ends; the behaviour runs with `tenant`."""
    behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                or handler.stream_stream)
    parse = handler.request_deserializer or _as_is
    streaming_requests = handler.request_streaming

    async def enter(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext,
                    intake: _Intake) -> Any:
        error = refusal(context)
        if error is not None:
            await abort_with(context, error)
        if tenant is not None:
            RESOLVED_TENANT.set(tenant)
        return intake.each(requests) if streaming_requests else await intake.one(requests)

    async def unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        intake = _Intake(budget, parse)
        try:
            return await behavior(await enter(requests, context, intake), context)
        except AgentLoopError as exc:
            if exc is not intake.refused:
                raise
            await abort_with(context, exc)
        finally:
            intake.release()

    async def streaming(requests: AsyncIterator[bytes],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        intake = _Intake(budget, parse)
        try:
            async for response in behavior(await enter(requests, context, intake), context):
                yield response
        except AgentLoopError as exc:
            if exc is not intake.refused:
                raise
            await abort_with(context, exc)
        finally:
            intake.release()

    # grpc hands the raw bytes on (no deserializer): they are parsed here, once counted.
    codecs = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if not handler.response_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **codecs)
    # A stream written with context.write (health Watch) stays a coroutine.
    wrapper = streaming if inspect.isasyncgenfunction(behavior) else unary
    return grpc.stream_stream_rpc_method_handler(wrapper, **codecs)


def _as_is(data: bytes) -> bytes:
    return data


class _Intake:
    """The request messages of one call, counted before they are parsed; `release` gives
    the budget back, and nothing is counted after it."""

    __slots__ = ("_budget", "_closed", "_parse", "refused", "size")

    def __init__(self, budget: RequestBytes | None, parse: Callable[[bytes], Any]) -> None:
        self._budget = budget
        self._parse = parse
        self._closed = False
        self.size = 0
        #: The error this intake refused a message with (the call ends with it).
        self.refused: AgentLoopError | None = None

    async def one(self, requests: AsyncIterator[bytes]) -> Any:
        """The one message of a unary-request call."""
        data = await anext(aiter(requests), None)
        if data is None:  # the client closed its side without sending the message
            raise self._refuse(InvalidArgument([("request", "no request message was sent")]))
        return self._take(data)

    async def each(self, requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for data in requests:
            if self._closed:
                return
            yield self._take(data)

    def _take(self, data: bytes) -> Any:
        size = len(data)
        if self._budget is None:
            if size > PROBE_MESSAGE_BYTES:
                raise self._refuse(ResourceExhausted(
                    f"a health or reflection request is at most {PROBE_MESSAGE_BYTES} bytes",
                    retry_after=1.0, metadata={"limit": "probe_message_bytes"}))
        elif not self._budget.take(size):
            raise self._refuse(over_budget(self._budget))
        else:
            self.size += size
        return self._parse(data)

    def _refuse(self, error: AgentLoopError) -> AgentLoopError:
        self.refused = error
        return error

    def release(self) -> None:
        self._closed = True
        if self._budget is not None:
            self._budget.give_back(self.size)
        self.size = 0
