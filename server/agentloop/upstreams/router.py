"""The routing layer: model names -> routes -> pools -> one endpoint per call.

`Router` is a `Backend`, so nothing above it knows there are pools, and it is the one path
every call takes: without a pools file the single engine (`--backend`, `--ollama-url`, the
embedded engine) is a route table of one pool of one endpoint (`Router.for_engine`). For
each call it finds the route of the model, walks the route's pools in order (skipping
remote ones for a local-only call), waits for a slot in the pool's fair queue (the slots
follow the pool's live endpoints: upstreams/pool.py), and streams from an endpoint.
Retries (another endpoint of the same pool, with backoff) and fallback (the next pool)
happen only before the first token: after that a failure is the caller's to see, and
nothing is ever sent twice. Each endpoint has its own circuit breaker (one failing call
counts once however often it is retried); readiness follows whether the default route can
be served. docs/upstreams.md has the whole picture.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from typing import Any

from opentelemetry import trace

from agentloop.backends.base import Backend
from agentloop.backends.kinds import backend_for
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
    ToolCallDelta,
)
from agentloop.errors import (
    AgentLoopError,
    BackendUnavailable,
    FailedPrecondition,
    ModelNotFound,
    ResourceExhausted,
)
from agentloop.telemetry import tracing
from agentloop.tenants import DEFAULT_TENANT, Tenant
from agentloop.upstreams.admission import (
    Admission,
    AdmissionObserver,
    AdmissionTotals,
    QueueBudget,
    Work,
)
from agentloop.upstreams.config import PoolsConfig, RouteConfig, UpstreamConfig
from agentloop.upstreams.pool import Endpoint, Pool, dns_host
from agentloop.upstreams.resilience import (
    CircuitBreaker,
    CircuitState,
    is_backend_failure,
    retry_delay,
)
from agentloop.upstreams.spec import DEFAULT_MAX_IN_FLIGHT, EndpointSpec

log = logging.getLogger(__name__)

#: Every model name: the single engine's route takes them all, and the engine says which
#: it serves (NOT_FOUND for the others), as it did before there were pools.
_ANY_MODEL = "(?s).*"


class _MoveOn(Exception):
    """Internal: the pool refused the call before its first token; try the next pool."""

    def __init__(self, error: AgentLoopError) -> None:
        super().__init__(error.message)
        self.error = error


class Router:
    """A Backend over the operator's pools and routes (or the one engine's pool of one)."""

    def __init__(self, config: PoolsConfig, settings: Settings,
                 new_backend: Callable[[EndpointSpec, Settings], Backend] | None = None,
                 rng: random.Random | None = None, *, engine: Backend | None = None) -> None:
        self._config = config
        self._settings = settings
        self._new_backend = new_backend or backend_for
        self._random = rng or random.Random()
        #: The single engine when there is no pools file: responses then name no upstream
        #: and its health is the engine's own.
        self._engine = engine
        self.name = engine.name if engine is not None else "pools"
        self.default_max_tokens = engine.default_max_tokens if engine is not None else 2048
        #: Waiters of every queue together: the replica's guard on memory (--max-queue).
        self.budget = QueueBudget(settings.max_queue)
        self._tenants: Callable[[str], Tenant] = lambda _name: DEFAULT_TENANT
        self._observer: AdmissionObserver | None = None
        self.pools = {name: Pool(upstream, self._endpoint_maker(upstream), self._queue_maker())
                      for name, upstream in config.upstreams.items()}
        self.routes = config.routes
        self.retries = 0
        self._on_change: Callable[[], None] | None = None
        self._engine_pools = list(self.pools.values()) if engine is not None else []
        default = self.route_for(settings.model)
        if default is None:
            raise ValueError(f"no route serves the default model {settings.model!r}")
        self._default_route = default

    @classmethod
    def for_engine(cls, engine: Backend, settings: Settings) -> Router:
        """The single engine as a route table of one pool of one endpoint: its slots are
        --max-in-flight (else the engine's parallelism) and --max-embed-in-flight."""
        upstream = UpstreamConfig(name=engine.name, kind=engine.name, endpoints=("",),
                                  max_in_flight=settings.max_in_flight or engine.parallelism)
        route = RouteConfig(models=(settings.model,), pools=(engine.name,), pattern=_ANY_MODEL)
        return cls(PoolsConfig({engine.name: upstream}, (route,)), settings,
                   new_backend=lambda _spec, _settings: engine, engine=engine)

    @property
    def engine(self) -> Backend | None:
        """The single engine when there is no pools file."""
        return self._engine

    @property
    def engine_endpoint(self) -> Endpoint | None:
        """The single engine's endpoint (its breaker, its health), None with a pools file."""
        return next(iter(self.pools.values())).endpoints[0] if self._engine is not None \
            else None

    @property
    def parallelism(self) -> int:
        """Generations every pool's available endpoints take at once."""
        return max(1, sum(pool.capacity() for pool in self.pools.values()))

    # --- admission: the pools' queues --------------------------------------------------

    def admission(self, work: Work = Work.GENERATE) -> AdmissionTotals:
        """Every pool's queue of `work` read as one (the replica's gauges)."""
        return AdmissionTotals(lambda: (pool.queues[work] for pool in self.pools.values()),
                               self.budget)

    def queues(self) -> Iterable[Admission]:
        return (queue for pool in self.pools.values() for queue in pool.queues.values())

    @property
    def tenants(self) -> Callable[[str], Tenant]:
        return self._tenants

    @tenants.setter
    def tenants(self, tenants: Callable[[str], Tenant]) -> None:
        """The named tenants' current limits (their weights in every queue)."""
        self._tenants = tenants
        for queue in self.queues():
            queue.tenants = tenants

    @property
    def observer(self) -> AdmissionObserver | None:
        return self._observer

    @observer.setter
    def observer(self, observer: AdmissionObserver | None) -> None:
        self._observer = observer
        for queue in self.queues():
            queue.observer = observer

    def _queue_maker(self) -> Callable[[Work], Admission]:
        settings = self._settings

        def new_queue(work: Work) -> Admission:
            queue = Admission(
                0, self.budget, settings.queue_timeout, fair=settings.fair_queuing,
                critical_reserve=settings.critical_reserve if work is Work.GENERATE else 0,
                tenants=self._tenants, anticipation=settings.fair_anticipation)
            queue.observer = self._observer
            return queue

        return new_queue

    # --- building ------------------------------------------------------------------------

    def _endpoint_maker(self, upstream: UpstreamConfig) -> Callable[[str], Endpoint]:
        settings = self._settings

        def new_endpoint(url: str) -> Endpoint:
            spec = EndpointSpec(
                upstream=upstream.name, kind=upstream.kind, url=url, api_key=upstream.api_key,
                host=dns_host(upstream), tls=upstream.tls,
                connect_timeout=upstream.connect_timeout, read_timeout=upstream.read_timeout,
                max_in_flight=upstream.max_in_flight or DEFAULT_MAX_IN_FLIGHT,
                dialect=upstream.dialect, remote=upstream.remote,
                propagate_trace=upstream.propagate_trace)
            backend = self._new_backend(spec, settings)
            breaker = CircuitBreaker(settings.circuit_failure_threshold,
                                     settings.circuit_reset_timeout)
            breaker.on_change = self._changed
            if hasattr(backend, "on_health_change"):
                backend.on_health_change = self._changed
            generate = upstream.max_in_flight or backend.parallelism
            caps = {Work.GENERATE: generate, Work.COUNT: generate,
                    Work.EMBED: settings.max_embed_in_flight or backend.parallelism}
            return Endpoint(url or upstream.kind, backend, breaker, caps,
                            gated=self._engine is None)

        return new_endpoint

    @property
    def on_health_change(self) -> Callable[[], None] | None:
        return self._on_change

    @on_health_change.setter
    def on_health_change(self, listener: Callable[[], None] | None) -> None:
        """Hear breakers opening and closing and engines restarting: readiness checks at
        once."""
        self._on_change = listener

    def _changed(self) -> None:
        for pool in self.pools.values():
            pool.refresh()
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
        return self._engine.default_model if self._engine is not None else self._settings.model

    @property
    def address(self) -> tuple[str, int] | None:
        # One engine: where it listens; many: the span names the upstream instead.
        return self._engine.address if self._engine is not None else None

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        for pool in self.pools.values():
            if pool.config.dns:
                await pool.resolve()
            pool.start_dns()
        await asyncio.gather(*(e.backend.start() for pool in self.pools.values()
                               for e in pool.endpoints))
        for pool in self.pools.values():  # the engines' own slots are known once started
            pool.refresh()

    async def close(self) -> None:
        await asyncio.gather(*(pool.stop() for pool in self.pools.values()))

    async def warm_up(self) -> None:
        """Warm up the endpoints of the default route's local pools; fails only when every
        one of them fails."""
        endpoints = [e for name in self._default_route.pools
                     for e in self.pools[name].live() if not self.pools[name].remote]
        results = await asyncio.gather(*(_warm_up(e) for e in endpoints),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if endpoints and len(errors) == len(endpoints):
            first = errors[0]
            raise first if isinstance(first, AgentLoopError) else BackendUnavailable(
                "warming up the default route failed")

    async def check_health(self, model: str) -> BackendHealth:
        """Check every endpoint of every pool against the models of the routes that use it;
        ready when a pool of `model`'s route (the default route for the default model) has
        an available endpoint. One engine's health is its own answer."""
        timeout = self._settings.health_timeout
        await asyncio.gather(*(pool.check(self._probe_models(pool, model), timeout)
                               for pool in self.pools.values()))
        if self.engine_endpoint is not None:
            return self.engine_endpoint.health
        route = self.route_for(model)
        if route is None:
            return BackendHealth(False, f"no route serves {model!r}")
        serving = [name for name in route.pools if self.pools[name].any_available()]
        served = tuple(sorted({m for r in self.routes for m in r.models}))
        loaded = tuple(m for name in serving for e in self.pools[name].endpoints
                       for m in e.health.loaded)
        if not serving:
            return BackendHealth(False, "; ".join(
                self.pools[name].unavailable().message for name in route.pools),
                served=served)
        return BackendHealth(True, loaded=loaded, served=served)

    def _probe_models(self, pool: Pool, model: str) -> tuple[str, ...]:
        """The models a pool's health checks ask for: those of the routes that use the pool
        (the default model first where the default route does), as the upstream names them.
        An endpoint serving any of them is available."""
        if self._engine is not None:
            return (model,)
        names = [self.default_model] if pool.name in self._default_route.pools else []
        names += [m for route in self.routes if pool.name in route.pools for m in route.models]
        probes = dict.fromkeys(self.upstream_model(pool, name) for name in names)
        return tuple(probes) or (self.upstream_model(pool, self.default_model),)

    async def list_models(self) -> list[ModelInfo]:
        """The models the routes name, each once, as the callers name them, with what the
        upstream that serves each says of it (size, loaded, embeddings and their length),
        from the first pool of its route that lists it. One engine lists its own."""
        if self._engine is not None:
            return await self._engine.list_models()
        used = list(dict.fromkeys(name for route in self.routes for name in route.pools))
        listed = dict(zip(used, await asyncio.gather(*(self._listed(self.pools[name])
                                                       for name in used)), strict=True))
        models = []
        for name in dict.fromkeys(m for route in self.routes for m in route.models):
            route = self.route_for(name) or self._default_route
            found = next((info for pool in route.pools
                          if (info := _find_model(listed[pool],
                                                  self.upstream_model(self.pools[pool], name)))),
                         None)
            models.append(dataclasses.replace(found, name=name) if found else ModelInfo(name))
        return models

    async def _listed(self, pool: Pool) -> dict[str, ModelInfo]:
        """What one available endpoint of `pool` lists (nothing when none answers in time)."""
        for endpoint in pool.live():
            if not endpoint.available:
                continue
            try:
                async with asyncio.timeout(self._settings.health_timeout * 2):
                    return {m.name: m for m in await endpoint.backend.list_models()}
            except (AgentLoopError, TimeoutError):
                continue
        return {}

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
        if self._engine is None and pool.config.kind == "embedded" and pool.endpoints:
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

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        return self._serve(Work.GENERATE, request, _generation)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        return await _only(self._serve(Work.EMBED, request, _embedding))

    async def count_tokens(self, request: TokenCountRequest) -> TokenCount:
        return await _only(self._serve(Work.COUNT, request, _token_count))

    def _serve(self, work: Work, request: Any, call: _Call) -> AsyncIterator[Any]:
        """The call on its route's pools in order: the next pool only when one refused it
        before anything reached the caller. (No route, or none for a local-only call,
        raises here.)"""
        # The single engine takes every name and is local: its pool, without a look-up.
        pools = self._engine_pools or self.pools_for(request.model, request.context.local_only)
        if len(pools) == 1:
            return self._serve_in_pool(pools[0], work, request, call, more=False)
        return self._fall_back(pools, work, request, call)

    async def _fall_back(self, pools: list[Pool], work: Work, request: Any,
                         call: _Call) -> AsyncIterator[Any]:
        for index, pool in enumerate(pools):
            more = index + 1 < len(pools)
            try:
                async with aclosing(self._serve_in_pool(pool, work, request, call, more)) \
                        as items:
                    async for item in items:
                        yield item
                return
            except _MoveOn as move:
                _note_fallback(pool.name, pools[index + 1].name, move.error)

    async def _serve_in_pool(self, pool: Pool, work: Work, request: Any, call: _Call,
                             more: bool) -> AsyncIterator[Any]:
        """The call within one slot of `pool`, on one endpoint, retried on others before its
        first item; raises _MoveOn when the pool refused it and `more` pools may take it."""
        if self._engine is None:
            model = self.upstream_model(pool, request.model)
            upstream_request = request if model == request.model else dataclasses.replace(
                request, model=model)
        else:  # the single engine takes every name as it is
            upstream_request = request
        first_item_timeout = pool.config.first_token_timeout if work is Work.GENERATE else None
        ticket = pool.try_enter(work, request.context)  # a free slot: no wait, no task
        if ticket is None:
            try:
                ticket = await pool.enter(work, request.context, request.deadline, more)
            except (BackendUnavailable, ResourceExhausted) as exc:
                raise _move_on(exc, more) from None
        end: Any = None
        try:
            tried: list[Endpoint] = []  # a call counts once towards each one's breaker
            attempt = 0
            prefix = pool.prefix_of(work, upstream_request) if len(pool.endpoints) > 1 \
                else None
            while True:
                try:
                    endpoint = pool.take(work, request.context.session, tried, prefix)
                except BackendUnavailable as exc:
                    raise _move_on(exc, more) from None
                if self._engine is None:
                    trace.get_current_span().set_attribute(tracing.UPSTREAM, pool.name)
                delivered = probe = False
                try:
                    probe = endpoint.breaker.admit()
                    items = call(endpoint.backend, upstream_request)
                    if first_item_timeout is not None:
                        items = _first_within(items, first_item_timeout, pool.name)
                    async with aclosing(items):
                        async for item in items:
                            if isinstance(item, str | ToolCallDelta):
                                if end is None:
                                    delivered = True
                                    yield item
                                continue
                            if end is None:  # the call's end: it succeeded
                                endpoint.breaker.record_success()
                                if isinstance(item, GenerationEnd):
                                    pool.learn(endpoint, prefix, item)
                                end = item if self._engine is not None \
                                    else self._served(pool, request, item)
                    break
                except AgentLoopError as exc:
                    if end is not None:
                        break  # it failed after its end: the call itself succeeded
                    delay = self._verdict(pool, endpoint, exc, probe, attempt, request,
                                          delivered, tried, more)
                except BaseException:  # cancelled or closed by the caller: no verdict
                    endpoint.breaker.release_probe(probe)
                    raise
                finally:
                    pool.give_back(work, endpoint)
                    tried.append(endpoint)
                self.retries += 1
                attempt += 1
                await asyncio.sleep(delay)
        finally:
            pool.leave(work, ticket)
        # The end goes out once the slot and the endpoint are given back: the next waiter
        # starts at once, and a caller that stops reading here leaves nothing to unwind.
        if end is not None:
            yield end

    def _served(self, pool: Pool, request: Any, result: Any) -> Any:
        """The end of a call as the caller sees it (with a pools file: the single engine's
        is its own): the upstream that served it and the model by the caller's name for it,
        unless an engine stood in for it under an alias (an `embedded` upstream): then its
        own."""
        model = result.model if pool.config.kind == "embedded" else request.model
        return dataclasses.replace(result, upstream=pool.name, model=model)

    def _verdict(self, pool: Pool, endpoint: Endpoint, exc: AgentLoopError, probe: bool,
                 attempt: int, request: Any, delivered: bool, tried: list[Endpoint],
                 more: bool) -> float:
        """A failed attempt, told to its endpoint's breaker (once per call, however often it
        is retried: one call's retries must not open the circuit by themselves): the delay
        before retrying in the pool, or raise: `exc` itself after the first item or when no
        pool can help, else _MoveOn for the route's next pool."""
        if is_backend_failure(exc) and (probe or endpoint not in tried):
            endpoint.breaker.record_failure()
        else:
            endpoint.breaker.release_probe(probe)
        if delivered:
            raise exc
        time_left = None if request.deadline is None else request.deadline - time.monotonic()
        delay = retry_delay(exc, attempt, self._settings, time_left, self._random, False)
        if delay is None:
            raise _move_on(exc, more) if _moves_on(exc) else exc
        log.info("upstream %s: retry %d in %.2fs after: %s", pool.name, attempt + 1, delay,
                 exc.message)
        return delay


#: One attempt of a call on one backend: its items (a generation's deltas and end, or a
#: unary call's one result).
_Call = Callable[[Backend, Any], AsyncIterator[Any]]


async def _first_within(items: AsyncIterator[Any], seconds: float,
                        upstream: str) -> AsyncIterator[Any]:
    """`items`, failing over (UNAVAILABLE, before anything reached the caller) when the
    first takes longer than `seconds`."""
    async with aclosing(items):  # type: ignore[type-var]
        try:
            async with asyncio.timeout(seconds):
                first = await anext(items)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _first_token_timeout(upstream, seconds) from None
        yield first
        async for item in items:
            yield item


def _generation(backend: Backend, request: GenerationRequest) -> AsyncIterator[Any]:
    return backend.stream(request)


async def _embedding(backend: Backend, request: EmbeddingRequest) -> AsyncIterator[Any]:
    yield await backend.embed(request)


async def _token_count(backend: Backend, request: TokenCountRequest) -> AsyncIterator[Any]:
    yield await backend.count_tokens(request)


async def _only(items: AsyncIterator[Any]) -> Any:
    """The one result of a unary call."""
    async with aclosing(items) as results:
        async for result in results:
            return result
    raise AssertionError("a unary call yields its result or raises")


async def _warm_up(endpoint: Endpoint) -> None:
    """Warm an endpoint under its breaker: refused while open; a half-open one's warm-up is
    its probe."""
    state = endpoint.breaker.state
    if state is CircuitState.OPEN:
        raise endpoint.breaker.open_error()
    try:
        await endpoint.backend.warm_up()
    except AgentLoopError as exc:
        if state is CircuitState.HALF_OPEN and is_backend_failure(exc):
            endpoint.breaker.record_failure()
        raise


def _find_model(listed: dict[str, ModelInfo], name: str) -> ModelInfo | None:
    """`name` among an upstream's models; Ollama's names carry a tag (`:latest` unsaid)."""
    return listed.get(name) or (listed.get(f"{name}:latest") if ":" not in name else None)


def _move_on(exc: AgentLoopError, more: bool) -> Exception:
    """What a pool's refusal raises: _MoveOn while the route has more pools, else itself."""
    return _MoveOn(exc) if more else exc


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
