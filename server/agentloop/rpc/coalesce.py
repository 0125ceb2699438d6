"""Coalescing text deltas for a stream whose consumer falls behind (StreamGenerate).

A reader task pulls the generation's items as fast as the backend sends them; the stream
sends what has piled up since its last message. Normally that is one delta per message.
When the gRPC send path cannot keep up with the backend (a fast engine, a slow client),
deltas pile up and go out joined as one message: sending a gRPC message costs far more than
relaying a token, so fewer, larger messages are what lets one process relay tens of
thousands of tokens per second. A backlog under `min_backlog` deltas is normal jitter and
still goes out one delta per message. The reader stops at `max_backlog` pending items, so a
slow client still pushes back on the backend.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TypeVar

End = TypeVar("End")

MIN_BACKLOG = 8
MAX_BACKLOG = 1024


async def coalesced(
    items: AsyncIterator[str | End], *, min_backlog: int = MIN_BACKLOG,
    max_backlog: int = MAX_BACKLOG,
) -> AsyncIterator[str | End]:
    """The items of `items` in order, text deltas that piled up joined into one.

    Errors of `items` are raised after the deltas that came before them; leaving early
    cancels the reader (which closes `items`) before returning."""
    backlog: deque[str | End] = deque()
    arrived = asyncio.Event()  # the reader added an item or finished
    drained = asyncio.Event()  # the writer took an item

    async def read() -> None:
        try:
            async with aclosing(items) as source:  # type: ignore[type-var]
                async for item in source:
                    backlog.append(item)
                    arrived.set()
                    while len(backlog) >= max_backlog:
                        drained.clear()
                        await drained.wait()
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
                drained.set()
                yield item
            if reader.done():
                reader.result()  # the reader's error, after the deltas that preceded it
                return
    finally:
        reader.cancel()
        # Wait for the reader to close `items`; its outcome was raised above if it counted.
        await asyncio.gather(reader, return_exceptions=True)
