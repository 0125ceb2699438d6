"""The routing layer: model names -> routes -> pools -> one endpoint per call.

`Router` is a `Backend`, so nothing above it knows there are pools. For each call it finds
the route of the model, walks the route's pools in order (skipping remote ones for a
local-only call), takes an endpoint of the pool (pool.Pool.acquire), and streams from it.
Retries (another endpoint of the same pool, with backoff) and fallback (the next pool)
happen only before the first token: after that a failure is the caller's to see, and
nothing is ever sent twice. Each endpoint has its own circuit breaker; readiness follows
whether the default route can be served. docs/upstreams.md has the whole picture.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from opentelemetry import trace

from agentloop.backends.base import Backend
from agentloop.backends.kinds import backend_for
from agentloop.backends.resilient import (
    CircuitBreaker,
    CircuitState,
    is_backend_failure,
    retry_delay,
)
from agentloop.config import Settings
from agentloop.domain import (
    BackendHealth,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationEnd,
    GenerationRequest,
    ModelInfo,
    StreamItem,
    TokenCount,
    TokenCountRequest,
)
from agentloop.errors import (
    AgentLoopError,
    BackendUnavailable,
    FailedPrecondition,
    ModelNotFound,
    ResourceExhausted,
)
from agentloop.telemetry import tracing
from agentloop.upstreams.config import PoolsConfig, RouteConfig, UpstreamConfig
from agentloop.upstreams.pool import Endpoint, Pool, PoolOverflow, dns_host
from agentloop.upstreams.spec import EndpointSpec

log = logging.getLogger(__name__)

class _MoveOn(Exception):
    """Internal: the pool refused the call before its first token; try the next pool."""

    def __init__(self, error: AgentLoopError) -> None:
        super().__init__(error.message)
        self.error = error


class Router:
    """A Backend over the operator's pools and routes."""

    name = "pools"
    default_max_tokens = 2048

    def __init__(self, config: PoolsConfig, settings: Settings,
                 new_backend: Callable[[EndpointSpec, Settings], Backend] | None = None,
                 rng: random.Random | None = None) -> None:
        self._config = config
        self._settings = settings
        self._new_backend = new_backend or backend_for
        self._random = rng or random.Random()
        self.pools = {name: Pool(upstream, self._endpoint_maker(upstream),
                                 settings.queue_timeout)
                      for name, upstream in config.upstreams.items()}
        self.routes = config.routes
        self.retries = 0
        self._on_change: Callable[[], None] | None = None
        default = self.route_for(settings.model)
        if default is None:
            raise ValueError(f"no route serves the default model {settings.model!r}")
        self._default_route = default

    @property
    def parallelism(self) -> int:
        """Calls every pool's endpoints take at once (after `start`, DNS pools included):
        the replica's admission default, so the pools' own queues decide where calls wait
        and when they spill."""
        return max(1, sum(pool.capacity for pool in self.pools.values()))

    # --- building ------------------------------------------------------------------------

    def _endpoint_maker(self, upstream: UpstreamConfig) -> Callable[[str], Endpoint]:
        def new_endpoint(url: str) -> Endpoint:
            spec = EndpointSpec(
                upstream=upstream.name, kind=upstream.kind, url=url, api_key=upstream.api_key,
                host=dns_host(upstream), tls=upstream.tls,
                connect_timeout=upstream.connect_timeout, read_timeout=upstream.read_timeout,
                max_in_flight=upstream.max_in_flight or 1, dialect=upstream.dialect,
                remote=upstream.remote, propagate_trace=upstream.propagate_trace)
            backend = self._new_backend(spec, self._settings)
            breaker = CircuitBreaker(self._settings.circuit_failure_threshold,
                                     self._settings.circuit_reset_timeout)
            breaker.on_change = self._changed
            cap = upstream.max_in_flight or backend.parallelism
            return Endpoint(url or upstream.kind, backend, breaker, cap)

        return new_endpoint

    @property
    def on_health_change(self) -> Callable[[], None] | None:
        return self._on_change

    @on_health_change.setter
    def on_health_change(self, listener: Callable[[], None] | None) -> None:
        """Hear breakers opening and closing and engines restarting: readiness checks at
        once."""
        self._on_change = listener
        for pool in self.pools.values():
            for endpoint in pool.endpoints:
                if hasattr(endpoint.backend, "on_health_change"):
                    endpoint.backend.on_health_change = listener

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    @property
    def circuit_open(self) -> bool:
        """Some endpoint's breaker fails its calls fast (open, or half-open awaiting its
        probe): the `agentloop.backend.circuit.open` gauge and its alert."""
        return any(e.breaker.state is not CircuitState.CLOSED
                   for pool in self.pools.values() for e in pool.live())

    @property
    def default_model(self) -> str:
        return self._settings.model

    @property
    def address(self) -> None:
        return None  # many: the span names the upstream instead

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        for pool in self.pools.values():
            if pool.config.dns:
                await pool.resolve()
            pool.start_dns()
        await asyncio.gather(*(e.backend.start() for pool in self.pools.values()
                               for e in pool.endpoints))
        self.on_health_change = self._on_change  # endpoints DNS brought

    async def close(self) -> None:
        await asyncio.gather(*(pool.stop() for pool in self.pools.values()))

    async def warm_up(self) -> None:
        """Warm up the endpoints of the default route's local pools; fails only when every
        one of them fails."""
        endpoints = [e for name in self._default_route.pools
                     for e in self.pools[name].live() if not self.pools[name].remote]
        results = await asyncio.gather(*(e.backend.warm_up() for e in endpoints),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if endpoints and len(errors) == len(endpoints):
            first = errors[0]
            raise first if isinstance(first, AgentLoopError) else BackendUnavailable(
                "warming up the default route failed")

    async def check_health(self, model: str) -> BackendHealth:
        """Check every endpoint of every pool; ready when a pool of `model`'s route (the
        default route for the default model) has an available endpoint."""
        timeout = self._settings.health_timeout
        await asyncio.gather(*(pool.check(self._probe_model(pool), timeout)
                               for pool in self.pools.values()))
        route = self.route_for(model)
        if route is None:
            return BackendHealth(False, f"no route serves {model!r}")
        serving = [name for name in route.pools if self.pools[name].any_available()]
        served = tuple(sorted({m for r in self.routes for m in r.models}))
        loaded = tuple(m for name in serving for e in self.pools[name].endpoints
                       for m in e.health.loaded)
        if not serving:
            return BackendHealth(False, f"no endpoint of {', '.join(route.pools)} is available",
                                 served=served)
        return BackendHealth(True, loaded=loaded, served=served)

    def _probe_model(self, pool: Pool) -> str:
        """The model a pool's health checks ask for: the default model where the default
        route uses the pool, else the first model of a route that does."""
        if pool.name in self._default_route.pools:
            return self.upstream_model(pool, self.default_model)
        for route in self.routes:
            if pool.name in route.pools and route.models:
                return self.upstream_model(pool, route.models[0])
        return self.upstream_model(pool, self.default_model)

    async def list_models(self) -> list[ModelInfo]:
        """The models the routes name, each once, as the callers name them; loaded when an
        available endpoint of its route says so."""
        names = dict.fromkeys(m for route in self.routes for m in route.models)
        loaded = {m.name for pool in self.pools.values() for e in pool.endpoints
                  if e.available for m in e.health.loaded}
        return [ModelInfo(name=name, loaded=name in loaded or any(
            self.upstream_model(self.pools[p], name) in loaded
            for p in (self.route_for(name) or self._default_route).pools))
            for name in names]

    # --- routing ------------------------------------------------------------------------

    def route_for(self, model: str) -> RouteConfig | None:
        for route in self.routes:
            if route.matches(model):
                return route
        return None

    def upstream_model(self, pool: Pool, model: str) -> str:
        """The name the pool's upstream knows `model` by."""
        if model in pool.config.models:
            return pool.config.models[model]
        if pool.config.kind == "embedded" and pool.endpoints:
            return pool.endpoints[0].backend.default_model
        return model

    def pools_for(self, model: str, local_only: bool) -> list[Pool]:
        """The pools a call of `model` may use, in order; raises when there are none."""
        route = self.route_for(model)
        if route is None:
            raise ModelNotFound(f"model {model!r} not found: no route serves it",
                                metadata={"model": model})
        pools = [self.pools[name] for name in route.pools]
        if local_only:
            pools = [pool for pool in pools if not pool.remote]
            if not pools:
                raise FailedPrecondition(
                    f"model {model!r} is served only by remote upstreams and the call is "
                    "local-only", reason="LOCAL_ONLY", metadata={"model": model})
        return pools

    # --- calls --------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        pools = self.pools_for(request.model, request.context.local_only)
        for index, pool in enumerate(pools):
            more = index + 1 < len(pools)
            try:
                async for item in self._stream_in_pool(pool, request, may_overflow=more):
                    yield item
                return
            except _MoveOn as move:
                if not more:
                    raise move.error from None
                _note_fallback(pool.name, pools[index + 1].name, move.error)

    async def _stream_in_pool(self, pool: Pool, request: GenerationRequest,
                              may_overflow: bool) -> AsyncIterator[StreamItem]:
        """The call on one endpoint of `pool`, retried on others before its first token;
        raises _MoveOn when the pool refused it and another pool may take it."""
        upstream_request = dataclasses.replace(
            request, model=self.upstream_model(pool, request.model))
        first_token_timeout = pool.config.first_token_timeout
        tried: list[Endpoint] = []
        for attempt in itertools.count():
            endpoint = await self._acquire(pool, request.context.session, request.deadline,
                                           tried, may_overflow)
            delivered = False
            probe = False
            try:
                probe = endpoint.breaker.admit()
                async with aclosing(endpoint.backend.stream(upstream_request)) as items:
                    while True:
                        try:
                            if delivered or first_token_timeout is None:
                                item = await anext(items)
                            else:
                                async with asyncio.timeout(first_token_timeout):
                                    item = await anext(items)
                        except StopAsyncIteration:
                            return
                        except TimeoutError:
                            raise _first_token_timeout(pool.name, first_token_timeout) \
                                from None
                        if isinstance(item, GenerationEnd):
                            endpoint.breaker.record_success()
                            item = dataclasses.replace(item, upstream=pool.name)
                        delivered = True
                        yield item
            except AgentLoopError as exc:
                delay = self._verdict(pool, endpoint, exc, probe, attempt, request.deadline,
                                      delivered)
            except BaseException:
                endpoint.breaker.release_probe(probe)
                raise
            finally:
                pool.release(endpoint)
            self.retries += 1
            await asyncio.sleep(delay)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        return await self._unary(request, lambda backend, r: backend.embed(r))

    async def count_tokens(self, request: TokenCountRequest) -> TokenCount:
        return await self._unary(request, lambda backend, r: backend.count_tokens(r))

    async def _unary(self, request: Any, call: Callable[[Backend, Any], Any]) -> Any:
        """One non-streamed call (embeddings, token counts) with the same routing, retries
        and fallback as a generation."""
        pools = self.pools_for(request.model, request.context.local_only)
        for index, pool in enumerate(pools):
            more = index + 1 < len(pools)
            try:
                return await self._unary_in_pool(pool, request, call, more)
            except _MoveOn as move:
                if not more:
                    raise move.error from None
                _note_fallback(pool.name, pools[index + 1].name, move.error)
        raise AssertionError("a route has at least one pool")

    async def _unary_in_pool(self, pool: Pool, request: Any,
                             call: Callable[[Backend, Any], Any], may_overflow: bool) -> Any:
        upstream_request = dataclasses.replace(
            request, model=self.upstream_model(pool, request.model))
        tried: list[Endpoint] = []
        for attempt in itertools.count():
            endpoint = await self._acquire(pool, request.context.session, request.deadline,
                                           tried, may_overflow)
            probe = False
            try:
                probe = endpoint.breaker.admit()
                result = await call(endpoint.backend, upstream_request)
                endpoint.breaker.record_success()
                return dataclasses.replace(result, upstream=pool.name, model=request.model)
            except AgentLoopError as exc:
                delay = self._verdict(pool, endpoint, exc, probe, attempt, request.deadline,
                                      False)
            except BaseException:
                endpoint.breaker.release_probe(probe)
                raise
            finally:
                pool.release(endpoint)
            self.retries += 1
            await asyncio.sleep(delay)

    async def _acquire(self, pool: Pool, session: str, deadline: float | None,
                       tried: list[Endpoint], may_overflow: bool) -> Endpoint:
        """An endpoint of `pool` for the next attempt (added to `tried`); _MoveOn when the
        pool is full, down or busy past its overflow limits."""
        try:
            endpoint = await pool.acquire(session, tried, deadline, may_overflow)
        except (PoolOverflow, BackendUnavailable, ResourceExhausted) as exc:
            raise _MoveOn(exc) from None
        trace.get_current_span().set_attribute(tracing.UPSTREAM, pool.name)
        tried.append(endpoint)
        return endpoint

    def _verdict(self, pool: Pool, endpoint: Endpoint, exc: AgentLoopError, probe: bool,
                 attempt: int, deadline: float | None, delivered: bool) -> float:
        """A failed attempt, told to its endpoint's breaker: the delay before retrying in the
        pool, or raise: `exc` itself after the first item or when no pool can help, else
        _MoveOn for the route's next pool."""
        if is_backend_failure(exc):
            endpoint.breaker.record_failure()
        else:
            endpoint.breaker.release_probe(probe)
        if delivered:
            raise exc
        time_left = None if deadline is None else deadline - time.monotonic()
        delay = retry_delay(exc, attempt, self._settings, time_left, self._random, False)
        if delay is None:
            if _moves_on(exc):
                raise _MoveOn(exc) from None
            raise exc
        log.info("upstream %s: retry %d in %.2fs after: %s", pool.name, attempt + 1, delay,
                 exc.message)
        return delay


def _moves_on(exc: AgentLoopError) -> bool:
    """Failures the next pool may cure: the pool is busy, down, or timed out before the
    first token. A bad request or an unknown model would fail there too."""
    return isinstance(exc, ResourceExhausted | BackendUnavailable)


def _first_token_timeout(upstream: str, seconds: float) -> BackendUnavailable:
    return BackendUnavailable(f"upstream {upstream!r} sent no first token within {seconds:g}s",
                              retry_after=1.0, metadata={"upstream": upstream})


def _note_fallback(source: str, target: str, error: AgentLoopError) -> None:
    log.info("upstream %s refused a call before its first token (%s); trying %s",
             source, error.reason, target)
    trace.get_current_span().add_event("agentloop.upstream.fallback", {
        "agentloop.upstream.from": source, "agentloop.upstream.to": target,
        "error.type": error.reason})
