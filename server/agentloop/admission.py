"""Admission control: a per-replica limit on generations in flight and a bounded FIFO queue.

Ollama often queues silently instead of answering 503, so the gateway keeps its own
limits: a request beyond the queue, or one that waits longer than the queue timeout,
gets RESOURCE_EXHAUSTED with RetryInfo at once so the client (or its balancer) can try
another replica.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agentloop.errors import DeadlineExceeded, ResourceExhausted


class Admission:
    """Counts slots; waiters are served first come, first served."""

    def __init__(self, max_in_flight: int, max_queue: int, queue_timeout: float) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self, deadline: float | None = None) -> AsyncIterator[None]:
        """Hold one slot for the body; raise ResourceExhausted if none comes in time."""
        await self._acquire(deadline)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, deadline: float | None) -> None:
        if self._in_flight < self.max_in_flight and not self._waiters:
            self._in_flight += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise ResourceExhausted(
                f"too many requests: {self._in_flight} in flight and {len(self._waiters)} queued",
                retry_after=1.0,
            )
        time_left = None if deadline is None else deadline - time.monotonic()
        # The caller's deadline, when it comes first, makes the wait DEADLINE_EXCEEDED.
        deadline_first = time_left is not None and time_left < self.queue_timeout
        wait = time_left if deadline_first else self.queue_timeout
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                await waiter
        except BaseException as exc:
            # Timed out or cancelled: if the slot was handed over meanwhile, pass it on.
            if waiter.done() and not waiter.cancelled():
                self._release()
            if isinstance(exc, TimeoutError) and deadline_first:
                raise DeadlineExceeded("the deadline passed while waiting for a slot") from None
            if isinstance(exc, TimeoutError):
                raise ResourceExhausted(
                    f"no free slot within {wait:.1f}s ({self._in_flight} in flight)",
                    retry_after=1.0,
                ) from None
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _release(self) -> None:
        # Hand the slot straight to the next live waiter, else free it.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_flight -= 1
