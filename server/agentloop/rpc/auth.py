"""API keys and per-client rate limits, as server interceptors.

`AuthInterceptor` wants `authorization: Bearer <key>` on every call except the exempt
services (health and reflection by default): a missing or unknown key is UNAUTHENTICATED;
a valid key's tenant (agentloop.tenants) becomes the call's RESOLVED_TENANT, which
`rpc.requests.call_context` reads. Keys are held only as SHA-256 digests and compared in
constant time; a key never reaches a log. `RateLimitInterceptor` gives each client (its
API key when keys are on, else its peer address) a token bucket; an empty bucket is
RESOURCE_EXHAUSTED with RetryInfo saying when the next token comes.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from cachetools import TTLCache

from agentloop.config import Settings, SettingsError, env_name, flag_name, parse_list
from agentloop.errors import AgentLoopError, ResourceExhausted, Unauthenticated
from agentloop.rpc.interceptors import (
    Continuation,
    abort_with,
    is_service_method,
    refused,
    wrap_handler,
)
from agentloop.tenants import (
    RESOLVED_TENANT,
    KeysFile,
    Tenant,
    TenantKeys,
    TenantsFileError,
    digest,
)

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
BEARER = "bearer "
# Buckets of clients not seen for burst/rate seconds are full again: dropping them is exact.
MAX_TRACKED_CLIENTS = 100_000

# Looks at a call before it runs: None lets it through, an error refuses it.
Check = Callable[[grpc.aio.ServicerContext], AgentLoopError | None]


class ApiKeys:
    """The accepted API keys (SHA-256 digests), each with its tenant, read again from the
    keys file on `reload` (SIGHUP, or the file watch when it changed)."""

    def __init__(self, keys: Iterable[str], path: str = "") -> None:
        self._file = KeysFile(path, keys)

    def __len__(self) -> int:
        return len(self._file.current)

    @property
    def _digests(self) -> tuple[bytes, ...]:
        return tuple(known for known, _ in self._file.current.keys)

    @property
    def current(self) -> TenantKeys:
        return self._file.current

    @property
    def path(self) -> str:
        return self._file.path

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        """Keys from `api_keys` and `api_keys_file` (one key per line, # starts a comment,
        or the tenants format: see agentloop.tenants)."""
        name = "api_keys_file"
        try:
            keys = cls(parse_list(settings.api_keys), settings.api_keys_file)
        except TenantsFileError as exc:
            raise SettingsError(f"{flag_name(name)} / {env_name(name)}: {exc}") from None
        if settings.api_keys_file and len(keys) == len(parse_list(settings.api_keys)):
            raise SettingsError(f"{flag_name(name)} / {env_name(name)}: no key in "
                                f"{settings.api_keys_file!r}")
        return keys

    def accepts(self, key: str) -> bool:
        return self.tenant_of(key) is not None

    def tenant_of(self, key: str) -> Tenant | None:
        """The key's tenant, or None for a key not accepted (compared in constant time)."""
        return self._file.current.match(key)

    def tenant(self, name: str) -> Tenant:
        """The named tenant's limits as the keys file says now."""
        return self._file.current.tenant(name)

    def changed(self) -> bool:
        return bool(self._file.path) and self._file.changed()

    def reload(self) -> bool:
        return bool(self._file.path) and self._file.reload()


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The key from `authorization: Bearer <key>`, or None."""
    for name, value in metadata or ():
        if name == AUTHORIZATION and isinstance(value, str) and value.lower().startswith(BEARER):
            return value[len(BEARER):].strip()
    return None


def service_of(method: str) -> str:
    """"/grpc.health.v1.Health/Check" -> "grpc.health.v1.Health"."""
    return method.strip("/").partition("/")[0]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for calls without a valid API key, except to exempt services."""

    def __init__(self, keys: ApiKeys, exempt: Iterable[str],
                 refusals: TokenBuckets | None = None) -> None:
        self._keys = keys
        self._exempt = frozenset(exempt)
        self._refusals = RefusalLog()
        # Calls without a valid key per peer address: past them, the peer is refused
        # every call until its bucket refills, so guessing keys goes no faster.
        self._refusal_buckets = refusals

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or service_of(handler_call_details.method) in self._exempt:
            return handler
        # Decided from the metadata alone, before the request is read: a call without a
        # valid key never has its message parsed (millions of messages cost seconds).
        key = bearer_token(handler_call_details.invocation_metadata)
        tenant = self._keys.tenant_of(key) if key is not None else None
        if tenant is not None:
            if self._refusal_buckets is None:
                return with_tenant(handler, tenant)
            return guarded(with_tenant(handler, tenant), self._locked_out)
        why = "missing" if key is None else "invalid"
        method = handler_call_details.method

        def refuse(context: grpc.aio.ServicerContext) -> AgentLoopError:
            if self._refusal_buckets is not None:
                wait = self._refusal_buckets.take(peer_address(context))
                if wait:
                    return _too_many_refusals(wait)
            self._refusals.warn(method, context.peer(), why)
            return Unauthenticated(
                f"{why} API key: send the metadata 'authorization: Bearer <key>'")

        return refused(handler, refuse)

    def _locked_out(self, context: grpc.aio.ServicerContext) -> AgentLoopError | None:
        assert self._refusal_buckets is not None
        wait = self._refusal_buckets.wait(peer_address(context))
        return _too_many_refusals(wait) if wait else None


def peer_address(context: grpc.aio.ServicerContext) -> str:
    """The peer's address without its port (which changes per connection)."""
    return context.peer().rpartition(":")[0]


def _too_many_refusals(wait: float) -> ResourceExhausted:
    return ResourceExhausted(
        f"too many calls without a valid API key from this address; retry in {wait:.2f}s",
        retry_after=wait, metadata={"limit": "refusals"})


class TokenBuckets:
    """One token bucket per client: `rate` tokens a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: TTLCache[str, tuple[float, float]] = TTLCache(
            MAX_TRACKED_CLIENTS, burst / rate, clock)

    def wait(self, client: str) -> float:
        """The seconds until `client` has a token (0.0: it has one), taking none."""
        now = self._clock()
        tokens, last = self._buckets.get(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate

    def take(self, client: str) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there is one."""
        now = self._clock()
        tokens, last = self._buckets.get(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self._rate


class RateLimitInterceptor(grpc.aio.ServerInterceptor):
    """RESOURCE_EXHAUSTED + RetryInfo for a client over its rate (AgentLoopService calls)."""

    def __init__(self, buckets: TokenBuckets, by_api_key: bool) -> None:
        self._buckets = buckets
        self._by_api_key = by_api_key

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not is_service_method(handler_call_details.method):
            return handler
        return guarded(handler, lambda context: self._check(handler_call_details, context))

    def _check(self, details: grpc.HandlerCallDetails,
               context: grpc.aio.ServicerContext) -> AgentLoopError | None:
        client = self._client(details, context)
        wait = self._buckets.take(client)
        if wait == 0.0:
            return None
        return ResourceExhausted(
            f"rate limit exceeded; the next call is allowed in {wait:.2f}s", retry_after=wait,
            metadata={"limit": "rate"})

    def _client(self, details: grpc.HandlerCallDetails,
                context: grpc.aio.ServicerContext) -> str:
        # With keys on, the key was checked first: a client cannot dodge its bucket by
        # inventing keys. Without them, the peer's address (its port changes per connection).
        key = bearer_token(details.invocation_metadata) if self._by_api_key else None
        if key is not None:
            return "key:" + digest(key).hex()
        return "peer:" + peer_address(context)


class RefusalLog:
    """A warning per refused call, but at most one line per `interval` seconds: a flood of
    calls with made-up keys must not flood the log (the next line counts the rest)."""

    def __init__(self, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._quiet_until = float("-inf")
        self._unlogged = 0

    def warn(self, method: str, peer: str, why: str) -> None:
        now = self._clock()
        if now < self._quiet_until:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused since the last line)" if self._unlogged else ""
        log.warning("refused %s from %s: %s API key%s", method, peer, why, more)
        self._unlogged, self._quiet_until = 0, now + self._interval


def with_tenant(handler: grpc.RpcMethodHandler, tenant: Tenant) -> grpc.RpcMethodHandler:
    """The handler, run with `tenant` as the call's RESOLVED_TENANT (read by call_context)."""

    def wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            RESOLVED_TENANT.set(tenant)
            return await behavior(request, context)

        return unary

    def wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            return wrap_unary(behavior)

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            RESOLVED_TENANT.set(tenant)
            async for response in behavior(request, context):
                yield response

        return streaming

    return wrap_handler(handler, wrap_unary, wrap_stream)


def guarded(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """The handler, refusing the call with check's error when it returns one."""

    def wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            error = check(context)
            if error is not None:
                await abort_with(context, error)
            return await behavior(request, context)

        return unary

    def wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            error = check(context)
            if error is not None:
                await abort_with(context, error)
            async for response in behavior(request, context):
                yield response

        return streaming

    return wrap_handler(handler, wrap_unary, wrap_stream)



def security_interceptors(settings: Settings,
                          keys: ApiKeys | None = None) -> list[grpc.aio.ServerInterceptor]:
    """The auth and rate-limit interceptors the settings ask for (auth first)."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    keys = keys if keys is not None else ApiKeys.from_settings(settings)
    if len(keys):
        interceptors.append(AuthInterceptor(
            keys, parse_list(settings.auth_exempt),
            TokenBuckets(settings.refusal_rate, settings.refusal_burst)))
    if settings.rate_limit > 0:
        buckets = TokenBuckets(settings.rate_limit, settings.rate_burst)
        interceptors.append(RateLimitInterceptor(buckets, by_api_key=bool(len(keys))))
    return interceptors
