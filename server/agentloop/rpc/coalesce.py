"""What a stream holds for a consumer that falls behind: deltas joined, never a paused engine.

Two streams send what a generation produces to a client that may read slowly or never:

- `coalesced` (StreamGenerate): a reader task pulls the generation's items as fast as the
  backend sends them; the stream sends what has piled up since its last message. Normally
  that is one delta per message. When the gRPC send path cannot keep up with the backend
  (a fast engine, a slow client), deltas pile up and go out joined as one message: sending
  a gRPC message costs far more than relaying a token, so fewer, larger messages are what
  lets one process relay tens of thousands of tokens per second. A backlog under
  `min_backlog` deltas is normal jitter and still goes out one delta per message.
- `Backlog` (StreamRunAgent's events): a producer task puts events; the ones that come
  while a model call is open never wait (consecutive ones are joined), the others wait
  until the consumer took what came before.

Neither ever pauses the generation for the client: the engine's work, not the client's
reading speed, decides how long a generation holds its admission slot. What a lagging
client leaves behind is the generation's own text (bounded by max_tokens), joined into a
few pieces; a client that stops reading altogether is ended by the send-stall timeout
(`rpc.transport.SendStallGuard`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import aclosing
from typing import Generic, TypeVar

from agentloop.domain import ToolCallDelta

End = TypeVar("End")
T = TypeVar("T")

MIN_BACKLOG = 8
#: Pending items at which the backlog's deltas are joined into one (a client that lags).
MAX_BACKLOG = 256


async def coalesced(
    items: AsyncIterator[str | End], *, min_backlog: int = MIN_BACKLOG,
    max_backlog: int = MAX_BACKLOG,
) -> AsyncIterator[str | End]:
    """The items of `items` in order, text deltas that piled up joined into one.

    The reader never waits for the consumer: past `max_backlog` pending items, the
    backlog's deltas are joined. Errors of `items` are raised after the deltas that came
    before them; leaving early cancels the reader (which closes `items`) before returning."""
    backlog: deque[str | End] = deque()
    arrived = asyncio.Event()  # the reader added an item or finished

    async def read() -> None:
        try:
            async with aclosing(items) as source:  # type: ignore[type-var]
                async for item in source:
                    backlog.append(item)
                    arrived.set()
                    if len(backlog) >= max_backlog:
                        _join_texts(backlog)
        finally:
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            await arrived.wait()
            arrived.clear()
            while backlog:
                item = backlog.popleft()
                if isinstance(item, str) and len(backlog) + 1 >= min_backlog:
                    texts = [item]
                    while backlog and isinstance(backlog[0], str):
                        texts.append(backlog.popleft())  # type: ignore[arg-type]
                    item = "".join(texts)
                elif isinstance(item, ToolCallDelta) and len(backlog) + 1 >= min_backlog:
                    while backlog and _continues(item, backlog[0]):
                        item = _joined(item, backlog.popleft())  # type: ignore[arg-type]
                yield item
            if reader.done():
                reader.result()  # the reader's error, after the deltas that preceded it
                return
    finally:
        reader.cancel()
        # Wait for the reader to close `items`; its outcome was raised above if it counted.
        await asyncio.gather(reader, return_exceptions=True)


def _continues(delta: ToolCallDelta, item: object) -> bool:
    """`item` is a later piece of the same tool call's arguments (no id or name of its own)."""
    return isinstance(item, ToolCallDelta) and item.index == delta.index \
        and not item.id and not item.name


def _joined(delta: ToolCallDelta, more: ToolCallDelta) -> ToolCallDelta:
    return ToolCallDelta(delta.index, delta.id, delta.name,
                         delta.arguments_json + more.arguments_json)


def _join_texts(backlog: deque[str | End]) -> None:
    """Join each run of consecutive deltas in `backlog` into one (text deltas, and pieces of
    one tool call's arguments), in place."""
    joined: list[str | End] = []
    texts: list[str] = []
    for item in backlog:
        if isinstance(item, str):
            texts.append(item)
            continue
        if texts:
            joined.append("".join(texts))
            texts = []
        if joined and isinstance(joined[-1], ToolCallDelta) and _continues(joined[-1], item):
            joined[-1] = _joined(joined[-1], item)  # type: ignore[arg-type]
            continue
        joined.append(item)
    if texts:
        joined.append("".join(texts))
    backlog.clear()
    backlog.extend(joined)


class Backlog(Generic[T]):
    """Events from one producer task to one consumer, bounded without pausing a model call.

    An event with a `key` (one that comes while a model call is open, a piece of the
    answer) never waits, and consecutive events of the same key are merged (`merge`) once
    `MIN_BACKLOG` of them wait (as `coalesced` joins deltas). An event whose key is None
    waits until the consumer took everything before it, so the producer is held between
    model calls, never inside one."""

    def __init__(self, key: Callable[[T], Hashable | None],
                 merge: Callable[[list[T]], T]) -> None:
        self._key = key
        self._merge = merge
        self._groups: deque[tuple[Hashable | None, list[T]]] = deque()
        self._changed = asyncio.Event()  # an event was put or taken

    def __len__(self) -> int:
        return len(self._groups)

    async def put(self, event: T) -> None:
        key = self._key(event)
        while key is None and self._groups:
            self._changed.clear()
            await self._changed.wait()
        if key is not None and self._groups and self._groups[-1][0] == key:
            group = self._groups[-1][1]
            group.append(event)
            if len(group) >= MAX_BACKLOG:
                group[:] = [self._merge(group)]
        else:
            self._groups.append((key, [event]))
        self._changed.set()

    async def get(self) -> T:
        while not self._groups:
            self._changed.clear()
            await self._changed.wait()
        _, events = self._groups[0]
        if len(events) < MIN_BACKLOG:
            event = events.pop(0)  # a short backlog is jitter: one event per message
            if not events:
                self._groups.popleft()
        else:
            self._groups.popleft()
            event = self._merge(events)
        self._changed.set()
        return event
