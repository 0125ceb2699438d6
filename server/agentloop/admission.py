"""Admission control: generations in flight per replica, a bounded queue served fairly
across tenants and by priority, and each tenant's quotas.

Ollama often queues silently instead of answering 503, so the gateway keeps its own
limits: a request beyond the queue, or one that waits longer than the queue timeout,
gets RESOURCE_EXHAUSTED with RetryInfo at once so the client (or its balancer) can try
another replica.

Who waits next is decided by start-time fair queuing (SFQ): a waiting call gets a virtual
start tag, max(the queue's virtual time, its caller's last finish tag), and its caller's
finish tag moves on by 1/weight. A free slot goes to the smallest tag, so the caller that
had the least service recently (weighted) goes first and a caller that floods the queue
delays only itself: its tags run far ahead. Callers are tenants (`CallContext.caller`:
the tenant, else the caller's address). Priorities come before tags: a critical call never
waits behind a standard or sheddable one, and when the queue is full the least important,
most served waiter is put out (sheddable first) to make room for a call that matters more.
With `fair=False` the tags are arrival order: first come, first served within a priority.

A caller that calls back to back (an agent's steps, a script's loop) frees its slot a
moment before its next call arrives, and in that moment the slot goes to another caller's
waiter: it then waits for the next slot to free, however little service it had. With
`anticipation`, when such a caller's next call would get the slot anyway (its tag would be
no later than the first waiter's), the slot stays its own for that many seconds
(anticipatory scheduling): its next call takes it at once; if none comes, the slot goes to
the next waiter then.

Quotas (a named tenant's limits from the keys file) are checked before a call queues:
generations at once (in flight or waiting), requests per minute, tokens per minute. Tokens
are counted as they happen (`count_tokens`), so a stream may run past the budget (it
finishes, nothing is cut); the tenant's next call is refused until the bucket refills.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from agentloop.domain import CallContext, Priority
from agentloop.errors import DeadlineExceeded, QuotaExceeded, ResourceExhausted, Shed
from agentloop.tenants import DEFAULT_TENANT, Tenant

_NO_CONTEXT = CallContext()
#: Dispatch order: every critical waiter before any standard one, standard before sheddable.
_CLASSES = (Priority.CRITICAL, Priority.STANDARD, Priority.SHEDDABLE)


class AdmissionObserver(Protocol):
    """Where admission reports per tenant (telemetry): labels are operator tenant names."""

    def waited(self, tenant: str, priority: Priority, seconds: float) -> None: ...

    def refused(self, tenant: str, reason: str) -> None: ...


@dataclass(slots=True, eq=False)
class _Caller:
    """A caller with calls queued or in flight (forgotten when it has none)."""

    key: str
    finish: float = 0.0  # the virtual finish tag of its last queued call
    in_flight: int = 0
    queued: int = 0


@dataclass(slots=True, eq=False)
class _Waiter:
    caller: _Caller
    priority: Priority
    start: float
    seq: int
    future: asyncio.Future[None]
    label: str
    gone: bool = False  # out of the queue: handed a slot, timed out, cancelled or put out


@dataclass(slots=True)
class _Quota:
    """A named tenant's request and token buckets (each refills to its cap in a minute;
    the token bucket may go below zero while a stream runs past it)."""

    limits: Tenant
    stamp: float
    tokens: float = field(init=False)
    requests: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.limits.tokens_per_minute)
        self.requests = float(self.limits.requests_per_minute)

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.stamp)
        self.stamp = now
        tpm, rpm = self.limits.tokens_per_minute, self.limits.requests_per_minute
        if tpm:
            self.tokens = min(float(tpm), self.tokens + elapsed * tpm / 60.0)
        if rpm:
            self.requests = min(float(rpm), self.requests + elapsed * rpm / 60.0)

    def resize(self, limits: Tenant) -> None:
        """New limits from a reloaded keys file: what was spent stays spent."""
        old, self.limits = self.limits, limits
        self.tokens = _carried(self.tokens, old.tokens_per_minute, limits.tokens_per_minute)
        self.requests = _carried(self.requests, old.requests_per_minute,
                                 limits.requests_per_minute)


def _carried(level: float, old_cap: int, new_cap: int) -> float:
    spent = old_cap - level if old_cap else 0.0
    return min(float(new_cap), new_cap - spent)


class Admission:
    """Slots per replica; waiters served fairly across callers, by priority; quotas."""

    def __init__(self, max_in_flight: int, max_queue: int, queue_timeout: float, *,
                 fair: bool = True, critical_reserve: int = 0,
                 tenants: Callable[[str], Tenant] | None = None,
                 quotas: Admission | None = None, anticipation: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.max_in_flight = max_in_flight
        #: Slots only critical calls may take: a critical call finds one free at once
        #: under a flood, instead of waiting for the next generation to end.
        self.critical_reserve = min(critical_reserve, max_in_flight - 1)
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.fair = fair
        self.anticipation = anticipation if fair else 0.0
        #: Slots held for callers' next calls (anticipation): caller key -> its timer.
        self._held: dict[str, asyncio.TimerHandle] = {}
        #: The named tenant's current limits (the keys file, reloaded).
        self.tenants: Callable[[str], Tenant] = tenants or (lambda _name: DEFAULT_TENANT)
        self.observer: AdmissionObserver | None = None
        self._clock = clock
        self._in_flight = 0
        self._queued = 0
        self._critical_waiting = 0
        self._seq = 0
        self._virtual = 0.0
        self._callers: dict[str, _Caller] = {}
        self._heaps: dict[Priority, list[tuple[float, int, _Waiter]]] = {
            priority: [] for priority in Priority}
        #: Each tenant's spending: shared with `quotas`' when given (Embed's slots are their
        #: own, but a tenant's tokens and requests per minute are one budget).
        self._quotas: dict[str, _Quota] = quotas._quotas if quotas is not None else {}

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return self._queued

    def queued_by(self, caller: str) -> int:
        state = self._callers.get(caller)
        return state.queued if state is not None else 0

    @asynccontextmanager
    async def slot(self, deadline: float | None = None, *,
                   context: CallContext = _NO_CONTEXT) -> AsyncIterator[None]:
        """Hold one slot for the body; raise ResourceExhausted (QuotaExceeded past a
        tenant's limit, Shed when put out for a more important call) if none comes in time."""
        caller = await self._acquire(deadline, context)
        try:
            yield
        finally:
            self._release(caller)

    def count_tokens(self, context: CallContext, tokens: int) -> None:
        """Spend a named tenant's tokens per minute as they happen (input and output)."""
        if context.tenant:
            quota = self._quotas.get(context.tenant)
            if quota is not None and quota.limits.tokens_per_minute:
                quota.refill(self._clock())
                quota.tokens -= tokens

    # --- taking a slot --------------------------------------------------------------------

    async def _acquire(self, deadline: float | None, context: CallContext) -> _Caller:
        tenant = self.tenants(context.tenant) if context.tenant else DEFAULT_TENANT
        caller = self._callers.get(context.caller)
        if tenant.has_quota:
            self._check_quota(tenant, caller)
        if caller is None:
            caller = self._callers[context.caller] = _Caller(context.caller)
        if caller.key in self._held and context.priority is Priority.SHEDDABLE:
            # Kept for a standard call: a sheddable one does not pass the standard waiters.
            self._end_hold(caller)
            caller = self._callers.setdefault(caller.key, caller)
        held = self._held.pop(caller.key, None)
        if held is not None:  # its slot, kept since its last call ended
            held.cancel()
            start = max(self._virtual, caller.finish)
            self._virtual, caller.finish = start, start + 1.0 / tenant.weight
            caller.in_flight += 1
            if self.observer is not None:
                self.observer.waited(tenant.label, context.priority, 0.0)
            return caller
        if self._free_for(context.priority):
            self._in_flight += 1
            caller.in_flight += 1
            if self.observer is not None:
                self.observer.waited(tenant.label, context.priority, 0.0)
            return caller
        await self._wait(deadline, context, tenant, caller)
        return caller

    def _free_for(self, priority: Priority) -> bool:
        """A slot is free for a call of this priority and nobody it must not pass waits."""
        if priority is Priority.CRITICAL:
            return self._in_flight < self.max_in_flight and not self._critical_waiting
        return self._in_flight < self.max_in_flight - self.critical_reserve \
            and not self._queued

    async def _wait(self, deadline: float | None, context: CallContext, tenant: Tenant,
                    caller: _Caller) -> None:
        self._seq += 1
        start = max(self._virtual, caller.finish) if self.fair else float(self._seq)
        waiter = _Waiter(caller, context.priority, start, self._seq,
                         asyncio.get_running_loop().create_future(), tenant.label)
        if self._queued >= self.max_queue and not self._make_room(waiter):
            self._forget_if_idle(caller)
            self._refused(tenant.label, "queue_full")
            raise ResourceExhausted(
                f"too many requests: {self._in_flight} in flight and {self._queued} queued",
                retry_after=1.0)
        if self.fair:
            caller.finish = start + 1.0 / tenant.weight
        caller.queued += 1
        self._queued += 1
        self._critical_waiting += waiter.priority is Priority.CRITICAL
        heap = self._heaps[waiter.priority]
        heapq.heappush(heap, (start, waiter.seq, waiter))
        if waiter.priority is Priority.CRITICAL:  # a critical call waits behind no kept slot
            for key in list(self._held):
                self._end_hold(self._callers[key])
        if len(heap) > 2 * self.max_queue + 16:  # entries of waiters gone meanwhile
            heap[:] = [entry for entry in heap if not entry[2].gone]
            heapq.heapify(heap)
        time_left = None if deadline is None else deadline - time.monotonic()
        # The caller's deadline, when it comes first, makes the wait DEADLINE_EXCEEDED.
        deadline_first = time_left is not None and time_left < self.queue_timeout
        wait = time_left if deadline_first else self.queue_timeout
        queued_at = time.perf_counter()
        try:
            async with asyncio.timeout(max(wait or 0.0, 0.0)):
                await waiter.future
        except BaseException as exc:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(caller)  # handed a slot meanwhile: pass it on
            self._leave(waiter)
            self._forget_if_idle(caller)
            if isinstance(exc, TimeoutError) and deadline_first:
                self._refused(tenant.label, "deadline")
                raise DeadlineExceeded("the deadline passed while waiting for a slot") from None
            if isinstance(exc, TimeoutError):
                self._refused(tenant.label, "queue_timeout")
                raise ResourceExhausted(
                    f"no free slot within {wait:.1f}s ({self._in_flight} in flight)",
                    retry_after=1.0,
                ) from None
            raise
        if self.observer is not None:
            self.observer.waited(tenant.label, context.priority, time.perf_counter() - queued_at)

    def _make_room(self, newcomer: _Waiter) -> bool:
        """The queue is full: put out the least important, most served waiter if the
        newcomer matters more (priority, then the smaller tag); False if it does not."""
        worst: _Waiter | None = None
        for priority in reversed(_CLASSES):
            # Not gone and not done: a waiter timed out but not yet woken has a done future.
            live = [entry[2] for entry in self._heaps[priority]
                    if not entry[2].gone and not entry[2].future.done()]
            if live:
                worst = max(live, key=lambda waiter: (waiter.start, waiter.seq))
                break
        if worst is None or (newcomer.priority, -newcomer.start) <= (worst.priority,
                                                                     -worst.start):
            return False
        self._leave(worst)
        self._refused(worst.label, "shed")
        worst.future.set_exception(Shed(
            "put out of the queue for a more important call (or a tenant with less "
            "service); retry later or on another replica", retry_after=1.0))
        return True

    def _check_quota(self, tenant: Tenant, caller: _Caller | None) -> None:
        """Refuse a named tenant past a limit, most immediate first; count the request."""
        name = tenant.name
        if tenant.max_concurrency and caller is not None \
                and caller.in_flight + caller.queued >= tenant.max_concurrency:
            self._over(tenant, "max_concurrency", 1.0,
                       f"{tenant.max_concurrency} generations at once")
        now = self._clock()
        quota = self._quotas.get(name)
        if quota is None:
            quota = self._quotas[name] = _Quota(tenant, now)
        elif quota.limits is not tenant:  # a reload made new limits
            quota.resize(tenant)
        quota.refill(now)
        rpm, tpm = tenant.requests_per_minute, tenant.tokens_per_minute
        if rpm and quota.requests < 1.0:
            self._over(tenant, "requests_per_minute", (1.0 - quota.requests) * 60.0 / rpm,
                       f"{rpm} requests per minute")
        if tpm and quota.tokens <= 0.0:
            self._over(tenant, "tokens_per_minute", (1.0 - quota.tokens) * 60.0 / tpm,
                       f"{tpm} tokens per minute")
        if rpm:
            quota.requests -= 1.0

    def _over(self, tenant: Tenant, limit: str, retry_after: float, what: str) -> None:
        self._refused(tenant.label, limit)
        raise QuotaExceeded(
            tenant.name, limit,
            f"tenant {tenant.name} is past its limit of {what} ({limit}); retry in "
            f"{retry_after:.2f}s", retry_after=retry_after)

    def _refused(self, label: str, reason: str) -> None:
        if self.observer is not None:
            self.observer.refused(label, reason)

    # --- giving a slot back ---------------------------------------------------------------

    def _release(self, caller: _Caller) -> None:
        """Keep the slot for the caller's next call (anticipation), or pass it on."""
        caller.in_flight -= 1
        if self.anticipation and not caller.queued and self._queued \
                and caller.key not in self._held and self._would_win(caller):
            self._held[caller.key] = asyncio.get_running_loop().call_later(
                self.anticipation, self._end_hold, caller)
            return
        self._pass_on(caller)

    def _would_win(self, caller: _Caller) -> bool:
        """Would the caller's next call (a standard one) take the slot before the first
        waiter: its tag no later than theirs, no critical call waiting, and the slot not
        one kept for critical calls?"""
        if self._critical_waiting or \
                self._in_flight > self.max_in_flight - self.critical_reserve:
            return False
        heap = self._heaps[Priority.STANDARD]
        while heap and (heap[0][2].gone or heap[0][2].future.done()):
            heapq.heappop(heap)  # entries of waiters gone meanwhile
        first = heap[0][0] if heap else float("inf")
        return max(self._virtual, caller.finish) <= first

    def _end_hold(self, caller: _Caller) -> None:
        """The caller's next call did not come in time (or a critical call came): the kept
        slot goes on."""
        held = self._held.pop(caller.key, None)
        if held is not None:
            held.cancel()
            self._pass_on(caller)

    def _pass_on(self, caller: _Caller) -> None:
        """Hand the slot straight to the next waiter (priority, then the smallest tag),
        else free it."""
        self._forget_if_idle(caller)
        for priority in _CLASSES:
            if priority is not Priority.CRITICAL and \
                    self._in_flight > self.max_in_flight - self.critical_reserve:
                break  # the slot that freed is one kept for critical calls
            heap = self._heaps[priority]
            while heap:
                _, _, waiter = heapq.heappop(heap)
                if waiter.gone or waiter.future.done():
                    continue
                self._leave(waiter)
                waiter.caller.in_flight += 1
                self._virtual = max(self._virtual, waiter.start)
                waiter.future.set_result(None)
                return
        self._in_flight -= 1

    def _leave(self, waiter: _Waiter) -> None:
        """Take a waiter out of the counts, once (its heap entry is skipped when popped)."""
        if not waiter.gone:
            waiter.gone = True
            waiter.caller.queued -= 1
            self._queued -= 1
            self._critical_waiting -= waiter.priority is Priority.CRITICAL

    def _forget_if_idle(self, caller: _Caller) -> None:
        # A caller with nothing queued starts again at the queue's virtual time: service
        # long past does not count, and callers (addresses) do not pile up.
        if caller.in_flight == 0 and caller.queued == 0 and caller.key not in self._held \
                and self._callers.get(caller.key) is caller:
            del self._callers[caller.key]
