"""A response cache for deterministic generations, with single flight.

A request is deterministic when it samples greedily (temperature 0) or with a fixed seed:
the same model, prompt or messages, options and format then give the same answer, so a
finished answer is kept (bounded LRU with a TTL) and replayed as a stream. Identical
requests that arrive while the first is still generating join it: one backend call, every
caller sees every delta as it comes (single flight). The shared call runs in a task of
its own so a leaving caller does not end it for the others; the last one to leave
cancels it, which closes the upstream request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from cachetools import TTLCache

from agentloop.domain import GenerationEnd, GenerationRequest, StreamItem
from agentloop.errors import Cancelled

Producer = Callable[[GenerationRequest], AsyncIterator[StreamItem]]


def is_deterministic(request: GenerationRequest) -> bool:
    """Whether an identical request may share the answer. Not when tools may be called:
    each answer's tool calls carry ids of their own, which a replay would repeat."""
    if request.offers_tools:
        return False
    return request.options.temperature == 0 or request.options.seed is not None


def cache_key(request: GenerationRequest) -> str:
    """SHA-256 of the canonical request: everything that shapes the answer, nothing else."""
    canonical = {
        # Answers are shared only within one cache scope (a tenant, an address or a
        # caller's cache key): a hit must tell a caller nothing about anyone else's prompts.
        "scope": request.context.cache_scope,
        "model": request.model,
        "prompt": request.prompt,
        "system": request.system,
        "messages": [
            [m.role.value, m.content, [hashlib.sha256(image).hexdigest() for image in m.images],
             [[c.id, c.name, c.arguments_json] for c in m.tool_calls], m.tool_call_id]
            for m in request.messages
        ],
        "options": dataclasses.asdict(request.options),
        "format": [request.format.kind.value, request.format.json_schema],
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class ResponseCache:
    """Finished answers by cache key, plus the generations still in flight."""

    def __init__(
        self, max_entries: int, ttl: float, timer: Callable[[], float] = time.monotonic
    ) -> None:
        self._answers: TTLCache[str, tuple[StreamItem, ...]] = TTLCache(max_entries, ttl, timer)
        self._flights: dict[str, _Flight] = {}
        # Exported as the agentloop.cache.lookups counter (telemetry.metrics).
        self.hits = 0
        self.misses = 0
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._answers)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def stream(self, request: GenerationRequest, produce: Producer) -> AsyncIterator[StreamItem]:
        """The answer from the cache, from an identical generation in flight, or from
        `produce` (shared with the identical requests that come meanwhile)."""
        key = cache_key(request)
        answer = self._answers.get(key)
        if answer is not None:
            self.hits += 1
            return _replay(answer)
        flight = self._flights.get(key)
        if flight is None:
            self.misses += 1
            flight = self._flights[key] = _Flight(key, produce(request), self._landed)
        else:
            self.coalesced += 1
        return flight.subscribe()

    def _landed(self, flight: _Flight) -> None:
        """A flight ended (or lost its last caller): keep its answer if it finished."""
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        if flight.error is None and flight.items and isinstance(flight.items[-1], GenerationEnd):
            self._answers[flight.key] = tuple(flight.items)


async def _replay(items: tuple[StreamItem, ...]) -> AsyncIterator[StreamItem]:
    for item in items:
        yield item


class _Flight:
    """One backend generation shared by every caller that subscribed to it."""

    def __init__(self, key: str, source: AsyncIterator[StreamItem],
                 landed: Callable[[_Flight], None]) -> None:
        self.key = key
        self.items: list[StreamItem] = []
        self.error: BaseException | None = None
        self.done = False
        self._landed = landed
        self._changed = asyncio.Event()
        self._subscribers = 0
        self._task = asyncio.create_task(self._run(source), name="cache-flight")

    async def subscribe(self) -> AsyncIterator[StreamItem]:
        self._subscribers += 1
        try:
            index = 0
            while True:
                if index < len(self.items):
                    index += 1
                    yield self.items[index - 1]
                elif self.done:
                    if self.error is not None:
                        raise self.error
                    return
                else:
                    await self._changed.wait()
        finally:
            self._subscribers -= 1
            if self._subscribers == 0 and not self.done:
                # Nobody wants the answer any more: stop the backend call.
                self._task.cancel()
                self._landed(self)

    async def _run(self, source: AsyncIterator[StreamItem]) -> None:
        try:
            async with aclosing(source) as items:
                async for item in items:
                    self.items.append(item)
                    self._notify()
        except asyncio.CancelledError:
            self.error = Cancelled("the shared generation was cancelled")
            raise
        except Exception as exc:  # every subscriber re-raises it
            self.error = exc
        finally:
            self.done = True
            self._notify()
            self._landed(self)

    def _notify(self) -> None:
        # Wake the current waiters; later waiters wait on a fresh event.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
