"""One upstream pool: its endpoints, the pick of one for a call, and its queue.

An endpoint is one `Backend` (one URL, or the in-process engine) with its own circuit
breaker, health and count of calls in flight. A pick takes the available endpoint with the
fewest calls in flight under its cap; a call with a session takes the session's endpoint
(rendezvous hashing: a session moves only when its endpoint leaves). When every endpoint
is at its cap the call waits in the pool's queue, or spills to the route's next pool when
the pool's overflow limits say so.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import random
import socket
import time
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from agentloop.backends.base import Backend
from agentloop.backends.resilient import CircuitBreaker, CircuitState
from agentloop.domain import BackendHealth
from agentloop.errors import BackendUnavailable, DeadlineExceeded, ResourceExhausted
from agentloop.upstreams.config import UpstreamConfig

log = logging.getLogger(__name__)


#: Retired endpoints' backends closing in the background.
_closing: set[asyncio.Task[None]] = set()


class PoolOverflow(ResourceExhausted):
    """The pool's queue is past its overflow limits: the call spills to the next pool."""


class Endpoint:
    """One endpoint of a pool and what the pick needs to know of it."""

    __slots__ = ("backend", "breaker", "cap", "health", "in_flight", "key", "retired")

    def __init__(self, key: str, backend: Backend, breaker: CircuitBreaker, cap: int) -> None:
        #: The endpoint's address (never shown to callers: logs at debug, hashing).
        self.key = key
        self.backend = backend
        self.breaker = breaker
        self.cap = cap
        self.in_flight = 0
        #: Unknown until the first check: taken as healthy, so a call is not refused early.
        self.health = BackendHealth(True, "not checked yet")
        #: DNS no longer lists it: it takes no new calls and closes when idle.
        self.retired = False

    @property
    def available(self) -> bool:
        return (self.health.ready and not self.retired
                and self.breaker.state is not CircuitState.OPEN)

    @property
    def has_room(self) -> bool:
        return self.in_flight < self.cap


class Pool:
    """The endpoints of one upstream and the calls waiting for one of them."""

    def __init__(self, config: UpstreamConfig,
                 new_endpoint: Callable[[str], Endpoint], queue_timeout: float) -> None:
        self.config = config
        self.name = config.name
        self.remote = config.remote
        # The in-process engine is the one endpoint of an `embedded` upstream.
        urls = config.endpoints or (("",) if config.kind == "embedded" else ())
        self.endpoints: list[Endpoint] = [new_endpoint(url) for url in urls]
        self._new_endpoint = new_endpoint
        self._queue_timeout = queue_timeout
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._dns_task: asyncio.Task[None] | None = None
        self._random = random.Random()
        #: Calls that spilled from this pool to the next one of their route.
        self.overflowed = 0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def in_flight(self) -> int:
        return sum(e.in_flight for e in self.endpoints)

    @property
    def capacity(self) -> int:
        return sum(e.cap for e in self.endpoints if not e.retired)

    def live(self) -> list[Endpoint]:
        return [e for e in self.endpoints if not e.retired]

    def any_available(self) -> bool:
        return any(e.available for e in self.endpoints)

    # --- the pick ----------------------------------------------------------------------

    def pick(self, session: str, tried: Iterable[Endpoint] = ()) -> Endpoint | None:
        """An available endpoint with room, or None. Endpoints this call already tried come
        last; a session takes its own endpoint while it is available and has room."""
        skip = set(tried)
        candidates = [e for e in self.endpoints if e.available and e.has_room]
        fresh = [e for e in candidates if e not in skip] or candidates
        if not fresh:
            return None
        if session:
            home = max((e for e in self.endpoints if e.available),
                       key=lambda e: _rendezvous(session, e.key))
            if home in fresh:
                return home
        fewest = min(e.in_flight for e in fresh)
        return self._random.choice([e for e in fresh if e.in_flight == fewest])

    async def acquire(self, session: str, tried: Iterable[Endpoint], deadline: float | None,
                      may_overflow: bool) -> Endpoint:
        """Take an endpoint for one call (release it with `release`). Raises PoolOverflow when
        the call should spill (only when `may_overflow`), BackendUnavailable when no endpoint
        is available, ResourceExhausted or DeadlineExceeded when none frees in time."""
        tried = tuple(tried)
        endpoint = self.pick(session, tried) if not self._waiters else None
        if endpoint is not None:
            endpoint.in_flight += 1
            return endpoint
        if not self.any_available():
            raise BackendUnavailable(f"no endpoint of upstream {self.name!r} is available",
                                     retry_after=1.0, metadata={"upstream": self.name})
        overflow = self.config.overflow
        if may_overflow and overflow.max_queue is not None \
                and len(self._waiters) >= overflow.max_queue:
            self.overflowed += 1
            raise PoolOverflow(f"upstream {self.name!r} is full", retry_after=1.0)
        started = time.monotonic()
        limit = self._queue_timeout
        spill = may_overflow and overflow.max_wait is not None and overflow.max_wait < limit
        if spill:
            limit = overflow.max_wait  # type: ignore[assignment]
        time_left = None if deadline is None else deadline - started
        deadline_first = time_left is not None and time_left < limit
        wait_until = started + (time_left if deadline_first else limit)  # type: ignore[operator]
        while True:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(max(wait_until - time.monotonic(), 0.0)):
                    await waiter
            except BaseException as exc:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake()  # woken as it left: the turn passes on
                if not isinstance(exc, TimeoutError):
                    raise
                if deadline_first:
                    raise DeadlineExceeded("the deadline passed while waiting for an "
                                           "upstream endpoint") from None
                if spill:
                    self.overflowed += 1
                    raise PoolOverflow(f"upstream {self.name!r} is busy", retry_after=1.0) \
                        from None
                raise ResourceExhausted(
                    f"no endpoint of upstream {self.name!r} freed within {limit:.1f}s",
                    retry_after=1.0) from None
            endpoint = self.pick(session, tried)
            if endpoint is not None:
                endpoint.in_flight += 1
                self._wake()  # more room may be left for the next waiter
                return endpoint
            if not self.any_available():
                raise BackendUnavailable(f"no endpoint of upstream {self.name!r} is available",
                                         retry_after=1.0, metadata={"upstream": self.name})

    def release(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        if endpoint.retired and endpoint.in_flight == 0:
            closing = asyncio.get_running_loop().create_task(endpoint.backend.close())
            _closing.add(closing)  # a reference until done: the loop keeps only weak ones
            closing.add_done_callback(_closing.discard)
        self._wake()

    def _wake(self) -> None:
        """Let the first waiter look again (room freed, or an endpoint came back)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # --- health and membership ----------------------------------------------------------

    async def check(self, model: str, timeout: float) -> None:
        """Check every endpoint (concurrently); an endpoint whose breaker is open is not
        asked, a half-open one's check is its probe."""
        await asyncio.gather(*(self._check(e, model, timeout) for e in self.live()))
        self._wake()

    async def _check(self, endpoint: Endpoint, model: str, timeout: float) -> None:
        state = endpoint.breaker.state
        if state is CircuitState.OPEN:
            endpoint.health = BackendHealth(False, "circuit open after repeated failures")
            return
        try:
            async with asyncio.timeout(timeout * 2):
                result = await endpoint.backend.check_health(model)
        except TimeoutError:
            result = BackendHealth(False, "the health check timed out")
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

    async def resolve(self) -> None:
        """Make the endpoints the addresses `dns` names now: new ones join, gone ones retire."""
        host, _, port = self.config.dns.rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("upstream %s: DNS lookup failed (%s); keeping %d endpoints",
                        self.name, type(exc).__name__, len(self.live()))
            return
        urls = {self._url(info[4][0], int(port)) for info in infos}
        known = {e.key: e for e in self.endpoints if not e.retired}
        for url in sorted(urls - set(known)):
            self.endpoints.append(self._new_endpoint(url))
        for key, endpoint in known.items():
            if key not in urls:
                endpoint.retired = True
                if endpoint.in_flight == 0:
                    await endpoint.backend.close()
        self.endpoints = [e for e in self.endpoints if not e.retired or e.in_flight]
        self._wake()

    def _url(self, address: str, port: int) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{self.config.scheme}://{host}:{port}{self.config.path}"

    async def _resolve_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.dns_refresh)
            await self.resolve()


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
