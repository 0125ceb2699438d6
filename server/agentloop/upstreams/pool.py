"""One upstream pool: its endpoints, the queues where calls wait for them, and the pick.

An endpoint is one `Backend` (one URL, or the in-process engine) with its own circuit
breaker, health and calls in flight, and slots per kind of work (`admission.Work`). The
pool's capacity of a kind is the slots of its available endpoints, and calls wait for it
in that kind's fair queue (`admission.Admission`: tenants' weights, priorities, the critical
reserve, shedding, anticipation), which the pool resizes whenever an endpoint joins, leaves,
fails or comes back. A call holds one slot of the pool for all its attempts; each attempt
picks an endpoint with room: the session's endpoint (rendezvous hashing: a session moves
only when its endpoint leaves), else for a generation the one whose engine is expected to
hold the longest prefix of its prompt unless the load says otherwise (prefix_index.py),
else the one with the fewest calls in flight. When the pool has no available endpoint
left, its waiters learn it at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from agentloop.backends.base import Backend
from agentloop.domain import BackendHealth, CallContext, GenerationEnd, GenerationRequest
from agentloop.errors import AgentLoopError, BackendUnavailable, ResourceExhausted
from agentloop.upstreams.admission import Admission, QueueTimeout, Work
from agentloop.upstreams.config import UpstreamConfig
from agentloop.upstreams.prefix_index import Prefix, PrefixPicks, prefix_of
from agentloop.upstreams.resilience import CircuitBreaker, CircuitState

log = logging.getLogger(__name__)


#: Retired endpoints' backends closing in the background.
_closing: set[asyncio.Task[None]] = set()


class PoolOverflow(ResourceExhausted):
    """The pool's queue is past its overflow limits: the call spills to the next pool."""


class Endpoint:
    """One endpoint of a pool and what the pick needs to know of it."""

    __slots__ = ("backend", "breaker", "busy", "caps", "gated", "health", "key", "retired")

    def __init__(self, key: str, backend: Backend, breaker: CircuitBreaker,
                 caps: dict[Work, int], gated: bool = True) -> None:
        #: The endpoint's address (never shown to callers: logs at debug, hashing).
        self.key = key
        self.backend = backend
        self.breaker = breaker
        #: Calls of each kind it serves at once, and serves now.
        self.caps = caps
        self.busy = dict.fromkeys(Work, 0)
        #: Whether a failed health check takes it out of the pick (a single engine is
        #: always tried: its own error says more than "unavailable").
        self.gated = gated
        #: Unknown until the first check: taken as healthy, so a call is not refused early.
        self.health = BackendHealth(True, "not checked yet")
        #: DNS no longer lists it: it takes no new calls and closes when idle.
        self.retired = False

    @property
    def cap(self) -> int:
        return self.caps[Work.GENERATE]

    @property
    def in_flight(self) -> int:
        return sum(self.busy.values())

    @property
    def available(self) -> bool:
        return ((self.health.ready or not self.gated) and not self.retired
                and (self.breaker.closed or self.breaker.state is not CircuitState.OPEN))

    def has_room(self, work: Work) -> bool:
        return self.busy[work] < self.caps[work]


class Pool:
    """The endpoints of one upstream and the calls waiting for them."""

    def __init__(self, config: UpstreamConfig, new_endpoint: Callable[[str], Endpoint],
                 new_queue: Callable[[Work], Admission]) -> None:
        self.config = config
        self.name = config.name
        self.remote = config.remote
        # The in-process engine is the one endpoint of an `embedded` upstream.
        urls = config.endpoints or (("",) if config.kind == "embedded" else ())
        self.endpoints: list[Endpoint] = [new_endpoint(url) for url in urls]
        self._new_endpoint = new_endpoint
        #: Where calls of each kind wait for this pool's slots of that kind.
        self.queues = {work: new_queue(work) for work in Work}
        self._dns_task: asyncio.Task[None] | None = None
        #: The addresses a name has now (the system's resolver; a test may name its own).
        self.resolver: Callable[[str, int], Awaitable[list[str]]] = _addresses
        self._random = random.Random()
        #: Where each prompt's prefix is cached, per endpoint, and what the picks did.
        self.prefixes = PrefixPicks(config.prefix_routing)
        #: Calls that spilled from this pool to the next one of their route.
        self.overflowed = 0
        self.refresh()

    @property
    def queued(self) -> int:
        return sum(queue.queued for queue in self.queues.values())

    @property
    def in_flight(self) -> int:
        return sum(e.in_flight for e in self.endpoints)

    def capacity(self, work: Work = Work.GENERATE) -> int:
        """The slots of `work` the pool's available endpoints have."""
        return sum(e.caps[work] for e in self.endpoints if e.available)

    def live(self) -> list[Endpoint]:
        return [e for e in self.endpoints if not e.retired]

    def any_available(self) -> bool:
        if len(self.endpoints) == 1:  # a pool of one: every call asks
            return self.endpoints[0].available
        return any(e.available for e in self.endpoints)

    def refresh(self) -> None:
        """Capacity follows the endpoints: resize every queue; an endpoint out of the pick
        forgets where prefixes are cached; with none available, every waiter hears it now
        (and moves on to the next pool or fails)."""
        for work, queue in self.queues.items():
            queue.resize(self.capacity(work))
        for endpoint in self.endpoints:
            # Out of the pick (down, circuit open): when it comes back its engine has most
            # likely restarted, its cache empty, and its prefixes went elsewhere meanwhile.
            if not endpoint.available:
                self.prefixes.forget(endpoint.key)
        if not self.any_available():
            for queue in self.queues.values():
                queue.fail_waiters(self.unavailable)

    def unavailable(self) -> AgentLoopError:
        """Why no call can be served here: a breaker's own error when one is open, else
        the endpoints' health (reasons the backends give: no URL, no secret)."""
        live = self.live()
        open_breakers = [e.breaker for e in live if e.breaker.state is CircuitState.OPEN]
        if live and len(open_breakers) == len(live):
            return min((b.open_error() for b in open_breakers), key=lambda e: e.retry_after)
        reasons = sorted({e.health.reason for e in live if not e.health.ready and
                          e.health.reason})
        why = f": {'; '.join(reasons)}" if reasons else (
            ": it has no endpoints" if not live else "")
        return BackendUnavailable(f"no endpoint of upstream {self.name!r} is available{why}",
                                  retry_after=1.0, metadata={"upstream": self.name})

    # --- a call's slot ---------------------------------------------------------------------

    def try_enter(self, work: Work, context: CallContext) -> object | None:
        """A slot of `work` for one call when one is free for it now (no one it must not
        pass is waiting), else None: then `enter` waits for one."""
        if not self.any_available():
            return None
        return self.queues[work].try_acquire(context)

    async def enter(self, work: Work, context: CallContext, deadline: float | None,
                    may_overflow: bool) -> object:
        """Take one of the pool's slots of `work` for one call (give it back with `leave`).
        Raises PoolOverflow when the call should spill (only when `may_overflow`),
        BackendUnavailable when no endpoint is available, ResourceExhausted (or
        DeadlineExceeded, Shed) when none frees in time."""
        if not self.any_available():
            raise self.unavailable()
        queue = self.queues[work]
        ticket = queue.try_acquire(context)
        if ticket is not None:
            return ticket
        overflow = self.config.overflow
        if may_overflow and overflow.max_queue is not None \
                and queue.queued >= overflow.max_queue:
            self.overflowed += 1
            raise PoolOverflow(f"upstream {self.name!r} is full", retry_after=1.0)
        max_wait = overflow.max_wait if may_overflow else None
        try:
            return await queue.acquire(deadline, context, max_wait)
        except QueueTimeout:
            if max_wait is None or max_wait >= queue.queue_timeout:
                raise
            self.overflowed += 1
            raise PoolOverflow(f"upstream {self.name!r} is busy", retry_after=1.0) from None

    def leave(self, work: Work, ticket: object) -> None:
        self.queues[work].release(ticket)  # type: ignore[arg-type]

    def prefix_of(self, work: Work, request: GenerationRequest) -> Prefix | None:
        """A generation's prompt blocks where the pick weighs them (several endpoints,
        `prefix_routing` on), else None."""
        if work is not Work.GENERATE or len(self.endpoints) < 2 \
                or not self.config.prefix_routing.enabled:
            return None
        return prefix_of(request)

    def learn(self, endpoint: Endpoint, prefix: Prefix | None, end: GenerationEnd) -> None:
        """What the engine said of a generation it served: the cached share, and the index
        corrected where it had less of the prompt than expected."""
        self.prefixes.learn(endpoint.key, prefix, end)

    def pick(self, work: Work, session: str, tried: Iterable[Endpoint] = (),
             prefix: Prefix | None = None) -> Endpoint | None:
        """An available endpoint with room for `work`, or None. Endpoints this call already
        tried come last; a session takes its own endpoint while it is available and has
        room; a prompt with a `prefix` goes where it is cached, within the load bound."""
        if len(self.endpoints) == 1:  # a pool of one (the single engine): nothing to weigh
            [only] = self.endpoints
            return only if only.available and only.has_room(work) else None
        skip = set(tried)
        candidates = [e for e in self.endpoints if e.available and e.has_room(work)]
        fresh = [e for e in candidates if e not in skip] or candidates
        if not fresh:
            return None
        if session:
            home = max((e for e in self.endpoints if e.available),
                       key=lambda e: _rendezvous(session, e.key))
            if home in fresh:
                if prefix is not None:  # its engine holds the prompt too
                    self.prefixes.placed(home.key, prefix)
                return home
        if prefix is not None:  # even with one left: the index learns where it went
            loads = [e.busy[work] / max(1, e.caps[work]) for e in fresh]
            return self.prefixes.choose(fresh, loads, prefix)
        fewest = min(e.busy[work] for e in fresh)
        return self._random.choice([e for e in fresh if e.busy[work] == fewest])

    def take(self, work: Work, session: str, tried: Iterable[Endpoint],
             prefix: Prefix | None = None) -> Endpoint:
        """An endpoint for one attempt of a call holding a slot (give it back with
        `give_back`); BackendUnavailable when the endpoints went away meanwhile."""
        endpoint = self.pick(work, session, tried, prefix)
        if endpoint is None:
            raise self.unavailable()
        endpoint.busy[work] += 1
        return endpoint

    def give_back(self, work: Work, endpoint: Endpoint) -> None:
        endpoint.busy[work] -= 1
        if endpoint.retired and endpoint.in_flight == 0:
            closing = asyncio.get_running_loop().create_task(endpoint.backend.close())
            _closing.add(closing)  # a reference until done: the loop keeps only weak ones
            closing.add_done_callback(_closing.discard)

    # --- health and membership ----------------------------------------------------------

    async def check(self, models: tuple[str, ...], timeout: float) -> None:
        """Check every endpoint (concurrently) against the models of the routes that use
        the pool; an endpoint whose breaker is open is not asked, a half-open one's check is
        its probe. Nothing an upstream answers stops the check."""
        results = await asyncio.gather(*(self._check(e, models, timeout) for e in self.live()),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            if isinstance(result, Exception):
                log.warning("upstream %s: a health check failed: %s", self.name,
                            type(result).__name__)
        self.refresh()

    async def _check(self, endpoint: Endpoint, models: tuple[str, ...],
                     timeout: float) -> None:
        state = endpoint.breaker.state
        if state is CircuitState.OPEN:
            endpoint.health = BackendHealth(False, "circuit open after repeated failures")
            return
        result = BackendHealth(False, "no model to check")
        try:
            async with asyncio.timeout(timeout * 2):
                for model in models:  # ready when it serves one of its routes' models
                    result = await endpoint.backend.check_health(model)
                    if result.ready:
                        break
        except TimeoutError:
            result = BackendHealth(False, "the health check timed out")
        except Exception as exc:
            result = BackendHealth(False, f"the health check failed ({type(exc).__name__})")
        if result.ready != endpoint.health.ready:
            log.info("upstream %s: an endpoint is %s%s", self.name,
                     "available" if result.ready else "unavailable",
                     f" ({result.reason})" if result.reason else "")
        endpoint.health = result
        if state is CircuitState.HALF_OPEN:
            if result.ready:
                endpoint.breaker.record_success()
            else:
                endpoint.breaker.record_failure()

    def start_dns(self) -> None:
        if self.config.dns:
            self._dns_task = asyncio.create_task(self._resolve_forever(),
                                                 name=f"upstream-dns-{self.name}")

    async def stop(self) -> None:
        if self._dns_task is not None:
            self._dns_task.cancel()
            await asyncio.gather(self._dns_task, return_exceptions=True)
        for endpoint in self.endpoints:
            endpoint.breaker.close()
        await asyncio.gather(*(e.backend.close() for e in self.endpoints),
                             return_exceptions=True)

    async def resolve(self) -> list[Endpoint]:
        """Make the endpoints the addresses `dns` names now: new ones join (returned, to be
        started), gone ones retire."""
        host, _, port = self.config.dns.rpartition(":")
        try:
            addresses = await self.resolver(host, int(port))
        except OSError as exc:
            log.warning("upstream %s: DNS lookup failed (%s); keeping %d endpoints",
                        self.name, type(exc).__name__, len(self.live()))
            return []
        urls = {self._url(address, int(port)) for address in addresses}
        known = {e.key: e for e in self.endpoints if not e.retired}
        joined = [self._new_endpoint(url) for url in sorted(urls - set(known))]
        self.endpoints.extend(joined)
        for key, endpoint in known.items():
            if key not in urls:
                endpoint.retired = True
                if endpoint.in_flight == 0:
                    await endpoint.backend.close()
        self.endpoints = [e for e in self.endpoints if not e.retired or e.in_flight]
        self.prefixes.drop({e.key for e in self.endpoints})
        self.refresh()
        return joined

    def _url(self, address: str, port: int) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{self.config.scheme}://{host}:{port}{self.config.path}"

    async def _resolve_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.dns_refresh)
            try:
                for endpoint in await self.resolve():
                    await endpoint.backend.start()
            except Exception:
                log.exception("upstream %s: refreshing the endpoints failed", self.name)


async def _addresses(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def dns_host(config: UpstreamConfig) -> str:
    """The name a DNS-resolved endpoint is asked for (Host header, TLS SNI)."""
    return config.dns.rpartition(":")[0] if config.dns else ""


def endpoint_host(url: str) -> str:
    return urlsplit(url).hostname or ""


def _rendezvous(session: str, key: str) -> int:
    """Highest random weight hashing: each session ranks every endpoint; it takes its top
    one, and only the sessions of an endpoint that leaves move."""
    digest = hashlib.blake2b(f"{session}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
