"""Where calls wait for engine capacity: one fair queue per pool and kind of work.

`Admission` is one fair queue over a number of slots: the slots of one kind of work
(generations, embeddings, token counts) of one upstream pool, whose number follows the
pool's live endpoints (`resize`). A single engine is a pool of one, so every call waits in
a queue that sits beside what knows the capacity (upstreams/pool.py owns the queues). Each
tenant's limits are checked once per call before it queues anywhere (services/quotas.py).
What stays replica-wide is a guard on memory: `QueueBudget` caps the waiters of every queue
together (`--max-queue`); request bytes and streams are the edge's (rpc/transport.py).

Ollama often queues silently instead of answering 503, so the gateway keeps its own
limits: a request beyond the queue, or one that waits longer than the queue timeout,
gets RESOURCE_EXHAUSTED with RetryInfo at once so the client (or its balancer) can try
another replica.

Who waits next is decided by start-time fair queuing (SFQ): a waiting call gets a virtual
start tag, max(the queue's virtual time, its caller's last finish tag), and its caller's
finish tag moves on by 1/weight. A free slot goes to the smallest tag, so the caller that
had the least service recently (weighted) goes first and a caller that floods the queue
delays only itself: its tags run far ahead. Within one caller the tags grow with arrival,
so a caller's own calls are served first come, first served. Callers are tenants
(`CallContext.caller`: the tenant, else the caller's address). Priorities come before tags:
a critical call never waits behind a standard or sheddable one, and when the queue is full
the least important, most served waiter is put out (sheddable first) to make room for a
call that matters more. With `fair=False` the tags are arrival order: first come, first
served within a priority. A freed slot is handed to the waiter it goes to (never "woken to
look again"), so nobody who arrives later passes a waiter.

A caller that calls back to back (an agent's steps, a script's loop) frees its slot a
moment before its next call arrives, and in that moment the slot goes to another caller's
waiter: it then waits for the next slot to free, however little service it had. With
`anticipation`, when such a caller's next call would get the slot anyway (its tag would be
no later than the first waiter's), the slot stays its own for that many seconds
(anticipatory scheduling): its next call takes it at once; if none comes, the slot goes to
the next waiter then.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from agentloop.domain import CallContext, Priority
from agentloop.errors import AgentLoopError, DeadlineExceeded, ResourceExhausted, Shed
from agentloop.tenants import DEFAULT_TENANT, Tenant, tenant_label

_NO_CONTEXT = CallContext()
#: Dispatch order: every critical waiter before any standard one, standard before sheddable.
_CLASSES = (Priority.CRITICAL, Priority.STANDARD, Priority.SHEDDABLE)


class Work(enum.StrEnum):
    """The kinds of call that cost engine time, each with slots of its own in a pool: an
    embedding batch or a token count never waits behind generations, nor they behind it."""

    GENERATE = "generate"
    EMBED = "embed"
    COUNT = "count"


class AdmissionObserver(Protocol):
    """Where admission reports per tenant (telemetry): labels are operator tenant names."""

    def waited(self, tenant: str, priority: Priority, seconds: float) -> None: ...

    def refused(self, tenant: str, reason: str) -> None: ...


class QueueTimeout(ResourceExhausted):
    """No slot came within the queue's time (or the caller's `max_wait`)."""


class QueueBudget:
    """The waiters every queue of the replica may hold together (`--max-queue`): a guard on
    memory, not on capacity."""

    __slots__ = ("max_queue", "queued")

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.queued = 0

    @property
    def full(self) -> bool:
        return self.queued >= self.max_queue


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


class Admission:
    """A number of slots (`resize` follows the capacity); waiters served fairly across
    callers, by priority."""

    def __init__(self, max_in_flight: int, max_queue: int | QueueBudget, queue_timeout: float,
                 *, fair: bool = True, critical_reserve: int = 0,
                 tenants: Callable[[str], Tenant] | None = None, anticipation: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_in_flight < 0:
            raise ValueError("max_in_flight must be >= 0")
        self.max_in_flight = max_in_flight
        #: Slots only critical calls may take (at most all but one): a critical call finds
        #: one free at once under a flood, instead of waiting for the next call to end.
        self.critical_reserve = critical_reserve
        self.budget = max_queue if isinstance(max_queue, QueueBudget) else QueueBudget(max_queue)
        self.queue_timeout = queue_timeout
        self.fair = fair
        self.anticipation = anticipation if fair else 0.0
        #: Slots held for callers' next calls (anticipation): caller key -> its timer.
        self._held: dict[str, asyncio.TimerHandle] = {}
        #: The named tenant's current limits (the keys file, reloaded): its weight here.
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

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def max_queue(self) -> int:
        return self.budget.max_queue

    @property
    def _reserve(self) -> int:
        return max(0, min(self.critical_reserve, self.max_in_flight - 1))

    def queued_by(self, caller: str) -> int:
        state = self._callers.get(caller)
        return state.queued if state is not None else 0

    @asynccontextmanager
    async def slot(self, deadline: float | None = None, *, context: CallContext = _NO_CONTEXT,
                   max_wait: float | None = None) -> AsyncIterator[None]:
        """Hold one slot for the body (see `acquire`)."""
        caller = await self.acquire(deadline, context, max_wait)
        try:
            yield
        finally:
            self.release(caller)

    # --- capacity -------------------------------------------------------------------------

    def resize(self, slots: int) -> None:
        """The capacity changed (endpoints joined, left, came back): more slots go to the
        waiters at once; fewer are taken back as calls end."""
        self.max_in_flight = max(0, slots)
        self._fill()

    def fail_waiters(self, error: Callable[[], AgentLoopError]) -> None:
        """Every waiter learns at once that no slot will come (the pool lost its last
        endpoint), instead of after the queue timeout."""
        for heap in self._heaps.values():
            for _, _, waiter in heap:
                if not waiter.gone and not waiter.future.done():
                    self._leave(waiter)
                    waiter.future.set_exception(error())
            heap.clear()

    # --- taking a slot --------------------------------------------------------------------

    async def acquire(self, deadline: float | None, context: CallContext = _NO_CONTEXT,
                      max_wait: float | None = None) -> _Caller:
        """Take one slot (give it back with `release`); raise QueueTimeout (or Shed when put
        out for a more important call, ResourceExhausted when the queue is full,
        DeadlineExceeded at the caller's deadline) if none comes in time. `max_wait` shortens
        the queue timeout (a pool's overflow)."""
        caller = self.try_acquire(context)
        if caller is None:
            caller = self._callers.setdefault(context.caller, _Caller(context.caller))
            await self._wait(deadline, context, self._tenant(context), caller, max_wait)
        return caller

    def try_acquire(self, context: CallContext = _NO_CONTEXT) -> _Caller | None:
        """A slot without waiting (the caller's kept one, or a free one nobody waits for),
        else None."""
        caller = self._callers.get(context.caller)
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
            self._virtual = start
            caller.finish = start + 1.0 / self._tenant(context).weight
            caller.in_flight += 1
            self._waited(context, 0.0)
            return caller
        if self._free_for(context.priority):
            self._in_flight += 1
            caller.in_flight += 1
            self._waited(context, 0.0)
            return caller
        self._forget_if_idle(caller)
        return None

    def _tenant(self, context: CallContext) -> Tenant:
        """The caller's tenant's current limits (its weight here)."""
        return self.tenants(context.tenant) if context.tenant else DEFAULT_TENANT

    def _waited(self, context: CallContext, seconds: float) -> None:
        if self.observer is not None:  # the label is the tenant's name: no look-up
            self.observer.waited(tenant_label(context.tenant), context.priority, seconds)

    def _free_for(self, priority: Priority) -> bool:
        """A slot is free for a call of this priority and nobody it must not pass waits."""
        if priority is Priority.CRITICAL:
            return self._in_flight < self.max_in_flight and not self._critical_waiting
        return self._in_flight < self.max_in_flight - self._reserve and not self._queued

    async def _wait(self, deadline: float | None, context: CallContext, tenant: Tenant,
                    caller: _Caller, max_wait: float | None) -> None:
        self._seq += 1
        start = max(self._virtual, caller.finish) if self.fair else float(self._seq)
        waiter = _Waiter(caller, context.priority, start, self._seq,
                         asyncio.get_running_loop().create_future(), tenant.label)
        if self.budget.full and not self._make_room(waiter):
            self._forget_if_idle(caller)
            self._refused(tenant.label, "queue_full")
            raise ResourceExhausted(
                f"too many requests: {self._in_flight} in flight and {self.budget.queued} "
                "queued", retry_after=1.0)
        if self.fair:
            caller.finish = start + 1.0 / tenant.weight
        caller.queued += 1
        self._queued += 1
        self.budget.queued += 1
        self._critical_waiting += waiter.priority is Priority.CRITICAL
        heap = self._heaps[waiter.priority]
        heapq.heappush(heap, (start, waiter.seq, waiter))
        if waiter.priority is Priority.CRITICAL:  # a critical call waits behind no kept slot
            for key in list(self._held):
                self._end_hold(self._callers[key])
        if len(heap) > 2 * self.max_queue + 16:  # entries of waiters gone meanwhile
            heap[:] = [entry for entry in heap if not entry[2].gone]
            heapq.heapify(heap)
        limit = self.queue_timeout if max_wait is None else min(max_wait, self.queue_timeout)
        time_left = None if deadline is None else deadline - time.monotonic()
        # The caller's deadline, when it comes first, makes the wait DEADLINE_EXCEEDED.
        deadline_first = time_left is not None and time_left < limit
        wait = time_left if deadline_first else limit
        queued_at = time.perf_counter()
        try:
            async with asyncio.timeout(max(wait or 0.0, 0.0)):
                await waiter.future
        except BaseException as exc:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(caller)  # handed a slot meanwhile: pass it on
            self._leave(waiter)
            self._forget_if_idle(caller)
            if isinstance(exc, TimeoutError) and deadline_first:
                self._refused(tenant.label, "deadline")
                raise DeadlineExceeded("the deadline passed while waiting for a slot") from None
            if isinstance(exc, TimeoutError):
                self._refused(tenant.label, "queue_timeout")
                raise QueueTimeout(
                    f"no free slot within {wait:.1f}s ({self._in_flight} in flight)",
                    retry_after=1.0,
                ) from None
            raise
        self._waited(context, time.perf_counter() - queued_at)

    def _make_room(self, newcomer: _Waiter) -> bool:
        """The queue is full: put out the least important, most served waiter of this queue
        if the newcomer matters more (priority, then the smaller tag); False if it does not."""
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

    def _refused(self, label: str, reason: str) -> None:
        if self.observer is not None:
            self.observer.refused(label, reason)

    # --- giving a slot back ---------------------------------------------------------------

    def release(self, caller: _Caller) -> None:
        """Keep the slot for the caller's next call (anticipation), or pass it on."""
        caller.in_flight -= 1
        if self.anticipation and not caller.queued and self._queued \
                and caller.key not in self._held and self._would_win(caller):
            self._held[caller.key] = asyncio.get_running_loop().call_later(
                self.anticipation, self._end_hold, caller)
            return
        self._free(caller)

    def _would_win(self, caller: _Caller) -> bool:
        """Would the caller's next call (a standard one) take the slot before the first
        waiter: its tag no later than theirs, no critical call waiting, and the slot not
        one kept for critical calls (nor one the capacity no longer has)?"""
        if self._critical_waiting or \
                self._in_flight > self.max_in_flight - self._reserve:
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
            self._free(caller)

    def _free(self, caller: _Caller) -> None:
        self._forget_if_idle(caller)
        self._in_flight -= 1
        self._fill()

    def _fill(self) -> None:
        """Hand free slots straight to the next waiters (priority, then the smallest tag)."""
        while self._queued and (waiter := self._next_waiter()) is not None:
            self._leave(waiter)
            waiter.caller.in_flight += 1
            self._in_flight += 1
            self._virtual = max(self._virtual, waiter.start)
            waiter.future.set_result(None)

    def _next_waiter(self) -> _Waiter | None:
        for priority in _CLASSES:
            limit = self.max_in_flight if priority is Priority.CRITICAL \
                else self.max_in_flight - self._reserve
            if self._in_flight >= limit:
                if priority is Priority.CRITICAL:
                    return None
                continue
            heap = self._heaps[priority]
            while heap:
                waiter = heap[0][2]
                if waiter.gone or waiter.future.done():
                    heapq.heappop(heap)
                    continue
                heapq.heappop(heap)
                return waiter
        return None

    def _leave(self, waiter: _Waiter) -> None:
        """Take a waiter out of the counts, once (its heap entry is skipped when popped)."""
        if not waiter.gone:
            waiter.gone = True
            waiter.caller.queued -= 1
            self._queued -= 1
            self.budget.queued -= 1
            self._critical_waiting -= waiter.priority is Priority.CRITICAL

    def _forget_if_idle(self, caller: _Caller) -> None:
        # A caller with nothing queued starts again at the queue's virtual time: service
        # long past does not count, and callers (addresses) do not pile up.
        if caller.in_flight == 0 and caller.queued == 0 and caller.key not in self._held \
                and self._callers.get(caller.key) is caller:
            del self._callers[caller.key]


class AdmissionTotals:
    """Several queues read as one (every pool's generation slots): what the replica-wide
    gauges and the tests read."""

    def __init__(self, queues: Callable[[], Iterable[Admission]], budget: QueueBudget) -> None:
        self._queues = queues
        self._budget = budget

    @property
    def in_flight(self) -> int:
        return sum(queue.in_flight for queue in self._queues())

    @property
    def queued(self) -> int:
        return sum(queue.queued for queue in self._queues())

    @property
    def max_in_flight(self) -> int:
        return sum(queue.max_in_flight for queue in self._queues())

    @property
    def max_queue(self) -> int:
        return self._budget.max_queue
