"""Where each prompt's prefix lives: the pool's guess of what each engine's KV cache holds.

Engines (vLLM, SGLang, llama.cpp's server, the embedded engine) keep the keys and values of
the prompts they served and skip the prefill of a prompt that starts like one of them. A
pool that spreads calls by load alone sends the same long system prompt to every endpoint,
each engine's cache holds a fraction of the working set and most calls pay the whole
prefill again. So each endpoint has a `PrefixIndex`: the blocks of the prompts it served
recently, and the pick (`choose`) sends a call to the endpoint with the longest expected
cached prefix unless that endpoint is busier than the least-loaded one by more than the
pool's `load_bound`; a prefix no endpoint holds goes to its "home", chosen by rendezvous
hashing on its first block among the endpoints within the bound, so replicas that share
nothing still send one prefix to one endpoint.

A prompt is rendered (the system text, each turn's role and content, or the raw prompt) and
cut into blocks of `BLOCK_BYTES`; each block's hash is that of the whole prompt up to the
block's end, keyed by the call's cache scope and model, so a hash names a whole prefix and
tenants never share an entry. Hashes are blake2b: the same on every replica, whatever
each one saw. An index is a least-recently-used map of block hashes, bounded by
`index_blocks` and aging out after `max_age` seconds, as the engines' caches age.

What an engine reports beats the guess (`learn`): its `cached_tokens` tell how much of the
prompt it really had. Where it had less than half of what the index expected, the engine
evicted (or lost, restarted) that block, and under its LRU every block used before it too:
those are forgotten, so the pick stops sending their prefixes to it for a cache it lacks.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from agentloop.domain import GenerationEnd, GenerationRequest
from agentloop.upstreams.config import PrefixRouting

#: Bytes of rendered prompt per block: about 64 tokens, the granularity of the guess.
BLOCK_BYTES = 256
#: Blocks hashed per call at most (128 KB of prompt): the pick's work stays bounded.
MAX_BLOCKS = 512
#: A report of cached tokens below this share of what the index expected is a miss.
MISS_SHARE = 0.5


class Keyed(Protocol):
    """What the pick reads of an endpoint (pool.Endpoint): its address."""

    @property
    def key(self) -> str: ...


E = TypeVar("E", bound=Keyed)


@dataclass(slots=True)
class Prefix:
    """A call's prompt as the index sees it, and what the pick expected of its endpoint."""

    #: Chained block hashes, the first block first (only whole blocks).
    hashes: tuple[int, ...]
    #: Bytes of the whole rendered prompt (to turn reported tokens into blocks).
    size: int
    #: Blocks the picked endpoint was expected to hold, and when each was last used there.
    expected: int = 0
    stamps: list[float] = field(default_factory=list)


def prefix_of(request: GenerationRequest) -> Prefix | None:
    """The prompt's blocks, None when it has no whole block (nothing worth placing)."""
    text, size = render(request, MAX_BLOCKS * BLOCK_BYTES)
    if len(text) < BLOCK_BYTES:
        return None
    scope = hashlib.blake2b(f"{request.context.cache_scope}\0{request.model}".encode(),
                            digest_size=16).digest()
    # One running hash keyed by the scope: block i's hash is that of every byte up to its
    # end, so it names the whole prefix (one update and one copy a block).
    running = hashlib.blake2b(digest_size=8, key=scope)
    view = memoryview(text)
    hashes: list[int] = []
    for start in range(0, min(len(text) // BLOCK_BYTES, MAX_BLOCKS) * BLOCK_BYTES,
                       BLOCK_BYTES):
        running.update(view[start:start + BLOCK_BYTES])
        hashes.append(int.from_bytes(running.copy().digest(), "big"))
    return Prefix(tuple(hashes), size)


def render(request: GenerationRequest, most: int) -> tuple[bytes, int]:
    """The prompt as the engine reads it, near enough: the system text, then each turn's
    role and content (images by their count: their bytes are not worth hashing here). Its
    first `most` bytes only are encoded (a caller's prompt may be megabytes), and the
    whole one's size (the rest counted in characters)."""
    texts = [("system", request.system, 0)] if request.system else []
    if request.prompt is not None:
        texts.append(("prompt", request.prompt, 0))
    texts += [(m.role.value, m.content, len(m.images)) for m in request.messages]
    parts: list[bytes] = []
    encoded = size = 0
    for role, content, images in texts:
        if encoded >= most:
            size += len(role) + len(content) + images + 2
            continue
        head = content[:most - encoded]  # characters: at least as many bytes
        part = b"".join((role.encode(), b"\x1f", head.encode(), b"\x1d" * images, b"\x1e"))
        parts.append(part)
        encoded += len(part)
        size += len(part) + len(content) - len(head)
    return b"".join(parts)[:most], size


class PrefixIndex:
    """One endpoint's remembered blocks: hash -> when last used, least recent first."""

    __slots__ = ("_blocks", "capacity", "max_age", "reports")

    def __init__(self, capacity: int, max_age: float) -> None:
        self._blocks: OrderedDict[int, float] = OrderedDict()
        self.capacity = capacity
        self.max_age = max_age
        #: The engine has reported cached tokens at least once: its zeros are misses (an
        #: engine that never says, like Ollama, is never corrected).
        self.reports = False

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int], now: float) -> int:
        """How many leading blocks of a prompt it holds, fresh."""
        blocks, oldest = self._blocks, now - self.max_age
        count = 0
        for digest in hashes:
            used = blocks.get(digest)
            if used is None or used < oldest:
                break
            count += 1
        return count

    def stamps(self, hashes: Sequence[int]) -> list[float]:
        return [self._blocks[digest] for digest in hashes]

    def insert(self, hashes: Sequence[int], now: float) -> None:
        """The endpoint now holds the prompt's blocks: the first ones most recent, so that
        a prefix loses its tail before its head, as an engine's LRU does."""
        blocks = self._blocks
        for digest in reversed(hashes):
            blocks[digest] = now
            blocks.move_to_end(digest)
        oldest = now - self.max_age
        while blocks and (len(blocks) > self.capacity or next(iter(blocks.values())) < oldest):
            blocks.popitem(last=False)

    def forget_until(self, stamp: float) -> int:
        """Forget every block last used at `stamp` or before (what an LRU cache that lost a
        block of that age lost too); how many."""
        blocks = self._blocks
        forgotten = 0
        while blocks and next(iter(blocks.values())) <= stamp:
            blocks.popitem(last=False)
            forgotten += 1
        return forgotten

    def clear(self) -> None:
        self._blocks.clear()


class PrefixPicks:
    """A pool's indexes, one per endpoint, and what its picks did (its metrics)."""

    def __init__(self, settings: PrefixRouting,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._indexes: dict[str, PrefixIndex] = {}
        #: Picks that went where the prefix was cached, and those where the load overrode
        #: an endpoint holding more of it.
        self.for_cache = 0
        self.for_load = 0
        #: Prompt tokens of the calls the pool served, and those the engines said they
        #: served from their caches.
        self.prompt_tokens = 0
        self.cached_tokens = 0
        #: Blocks forgotten because an engine reported less than the index expected.
        self.corrected = 0

    def index(self, key: str) -> PrefixIndex:
        index = self._indexes.get(key)
        if index is None:
            index = self._indexes[key] = PrefixIndex(self.settings.index_blocks,
                                                     self.settings.max_age)
        return index

    def forget(self, key: str) -> None:
        """An endpoint's engine holds nothing we know of (it went away)."""
        index = self._indexes.get(key)
        if index is not None:
            index.clear()

    def drop(self, keys: set[str]) -> None:
        """Endpoints that left the pool: their indexes go with them."""
        for key in set(self._indexes) - keys:
            del self._indexes[key]

    @property
    def blocks(self) -> int:
        return sum(len(index) for index in self._indexes.values())

    def choose(self, candidates: Sequence[E], loads: Sequence[float],
               prefix: Prefix) -> E:
        """The endpoint for a call among `candidates` (available, with room), `loads` their
        calls in flight over their slots. Records it as holding the prompt."""
        now = self._clock()
        bound = self.settings.load_bound
        least = min(loads)
        matched = [self.index(e.key).match(prefix.hashes, now) for e in candidates]
        within = [i for i, load in enumerate(loads) if load <= least + bound + 1e-9]
        best = max(matched[i] for i in within)
        if best:
            # The longest cached prefix within the bound; among equals the least loaded,
            # then the prefix's rendezvous order (the same on every replica).
            chosen = max((i for i in within if matched[i] == best), key=lambda i: (
                -loads[i], _rendezvous(prefix.hashes[0], candidates[i].key)))
            self.for_cache += 1
        else:
            chosen = max(within, key=lambda i: _rendezvous(prefix.hashes[0],
                                                           candidates[i].key))
        if max(matched) > best:
            self.for_load += 1
        endpoint = candidates[chosen]
        self._place(endpoint.key, prefix, matched[chosen], now)
        return endpoint

    def placed(self, key: str, prefix: Prefix) -> None:
        """A call went to that endpoint for another reason (its session's): the engine
        holds its prompt from now on all the same."""
        now = self._clock()
        self._place(key, prefix, self.index(key).match(prefix.hashes, now), now)

    def _place(self, key: str, prefix: Prefix, matched: int, now: float) -> None:
        """The prompt goes to that endpoint, which was expected to hold `matched` blocks."""
        index = self.index(key)
        prefix.expected = matched
        prefix.stamps = index.stamps(prefix.hashes[:matched])
        index.insert(prefix.hashes, now)

    def learn(self, key: str, prefix: Prefix | None, end: GenerationEnd) -> None:
        """An engine's report of a call it served: the pool's counts, and the index
        corrected where the engine had less of the prompt than expected."""
        usage = end.usage
        cached = max(usage.cached_input_tokens, end.engine_cached_tokens)
        self.prompt_tokens += usage.input_tokens
        self.cached_tokens += cached
        index = self._indexes.get(key)
        if index is None or prefix is None or not usage.input_tokens:
            return
        if cached:
            index.reports = True
        if not index.reports or not prefix.expected:
            return
        held = int(cached * prefix.size / usage.input_tokens) // BLOCK_BYTES
        if held >= prefix.expected * MISS_SHARE:
            return
        # The engine no longer had block `held`: under its LRU, nor anything used before.
        self.corrected += index.forget_until(prefix.stamps[min(held, prefix.expected - 1)])


def _rendezvous(first_block: int, key: str) -> int:
    """Highest random weight hashing of a prefix over endpoints: the prefix's home."""
    digest = hashlib.blake2b(f"{first_block}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
