"""Cache-aware picks: real fake OpenAI endpoints that model a KV cache, behind one gateway.

A prompt's prefix goes back to the endpoint whose engine holds it; tenants' scopes never
share an entry; the load bound wins over the cache; an engine that lost its cache says so in
its cached tokens and the index forgets what it no longer holds. The pick itself, unit by
unit: replicas that share nothing agree, and the index stays within its bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from test_upstreams import pooled_gateway

from agentloop.config import SettingsError
from agentloop.domain import (
    CallContext,
    ChatMessage,
    FinishReason,
    GenerationEnd,
    GenerationRequest,
    Role,
    SamplingOptions,
    Timings,
    Usage,
)
from agentloop.rpc.requests import cache_scope
from agentloop.upstreams.config import PrefixRouting, parse_pools
from agentloop.upstreams.prefix_index import (
    BLOCK_BYTES,
    MAX_BLOCKS,
    PrefixIndex,
    PrefixPicks,
    prefix_of,
)
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import wait_until
from fake_openai import DEFAULT_MODEL, FakeOpenAI, KVCache, Script

TOKENS = ["a", " b", " c"]


def system_prompt(name: str, words: int = 300) -> str:
    """A long system prompt (about six blocks of the index, many of the fake's)."""
    return " ".join(f"{name}-{i}" for i in range(words))


@contextlib.asynccontextmanager
async def caching_fakes(count: int, **script: Any) -> AsyncIterator[list[FakeOpenAI]]:
    started = []
    try:
        for _ in range(count):
            fake = FakeOpenAI(default_script=Script(tokens=TOKENS, **script))
            fake.kv_cache = KVCache(capacity=10_000, block_tokens=16)
            fake.extras = {"cache_salt"}
            await fake.start()
            started.append(fake)
        yield started
    finally:
        for fake in started:
            await fake.stop()


def pool_document(fakes: list[FakeOpenAI], **extra: Any) -> dict[str, Any]:
    return {"upstreams": {"vllm": {"kind": "openai", "remote": False,
                                   "endpoints": [f.url for f in fakes], **extra}},
            "routes": [{"models": [DEFAULT_MODEL], "pools": ["vllm"]}]}


def holder(fakes: list[FakeOpenAI], system: str) -> list[int]:
    """Which fakes served a call with this system prompt (each fake's calls together)."""
    return [i for i, fake in enumerate(fakes) for body in fake.generation_requests
            if body["messages"][0]["content"] == system]


def ask(system: str, turn: str = "hi") -> pb.GenerateRequest:
    return pb.GenerateRequest(system=system, messages=[pb.Message(role=pb.ROLE_USER, content=turn)])


async def test_a_prefix_goes_back_to_the_endpoint_that_holds_it(tmp_path):
    # Before: fewest in flight, ties at random: calls one after another went anywhere and
    # every engine prefilled every system prompt.
    async with caching_fakes(3) as fakes:
        async with pooled_gateway(tmp_path, pool_document(fakes, max_in_flight=4),
                                  model=DEFAULT_MODEL) as (running, stub):
            systems = [system_prompt(f"prompt{n}") for n in range(4)]
            for turn in range(5):
                for system in systems:
                    await stub.Generate(ask(system, f"question {turn}"), timeout=10)
            for system in systems:
                served = holder(fakes, system)
                assert len(served) == 5 and len(set(served)) == 1, \
                    f"a prefix moved between endpoints: {served}"
            cache = [f.kv_cache for f in fakes]
            cached = sum(c.cached_tokens for c in cache if c is not None)
            prompt = sum(c.prompt_tokens for c in cache if c is not None)
            assert cached / prompt > 0.7
            picks = running.backend.pools["vllm"].prefixes
            assert picks.for_cache == 16 and picks.for_load == 0
            # The engines' counts reached the pool though the caller is not told them (the
            # dialect keeps no scopes apart).
            assert picks.cached_tokens == cached


async def test_tenants_scopes_never_share_an_entry(tmp_path):
    async with caching_fakes(2) as fakes:
        async with pooled_gateway(tmp_path, pool_document(fakes), model=DEFAULT_MODEL) \
                as (running, stub):
            picks = running.backend.pools["vllm"].prefixes
            system = system_prompt("shared")

            async def call(scope: str) -> None:
                await stub.Generate(ask(system), timeout=10,
                                    metadata=(("x-agentloop-cache-key", scope),))

            await call("tenant-a")
            await call("tenant-a")
            assert picks.for_cache == 1
            # The same text in another scope is another prefix: nothing of tenant-a's
            # entries draws it, until it has been served in its own scope.
            await call("tenant-b")
            assert picks.for_cache == 1
            await call("tenant-b")
            assert picks.for_cache == 2
            assert picks.blocks == 2 * (len(system) // BLOCK_BYTES)


async def test_the_load_bound_wins_over_the_cache(tmp_path):
    # Each call holds its endpoint about 1.5 s: the six are all in flight together.
    async with caching_fakes(2, token_delay=0.5) as fakes:
        document = pool_document(fakes, max_in_flight=4,
                                 prefix_routing={"load_bound": 0.25})
        async with pooled_gateway(tmp_path, document, model=DEFAULT_MODEL) as (running, stub):
            picks = running.backend.pools["vllm"].prefixes
            system = system_prompt("hot")
            await stub.Generate(ask(system), timeout=10)
            [home] = holder(fakes, system)
            await asyncio.gather(*(stub.Generate(ask(system, f"q{n}"), timeout=20)
                                   for n in range(6)))
            served = holder(fakes, system)
            assert len(served) == 7 and set(served) == {0, 1}
            assert picks.for_load >= 1
            # Within the bound the cache held: the home took one more before the load won.
            assert served.count(home) >= 3


async def test_the_cached_share_and_the_picks_are_on_the_metrics(tmp_path):
    async with caching_fakes(2) as fakes:
        async with pooled_gateway(tmp_path, pool_document(fakes), model=DEFAULT_MODEL,
                                  metrics_listen="127.0.0.1:0") as (running, stub):
            system = system_prompt("seen")
            for _ in range(3):
                await stub.Generate(ask(system), timeout=10)
            async with aiohttp.ClientSession() as session, session.get(
                    f"http://127.0.0.1:{running.metrics_port}/metrics") as response:
                text = await response.text()
    series = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("agentloop_upstream_") and 'agentloop_upstream="vllm"' in line}
    prompt = series["agentloop_upstream_prompt_tokens_total"]
    cached = series["agentloop_upstream_prompt_tokens_cached_total"]
    assert prompt == sum(f.kv_cache.prompt_tokens for f in fakes if f.kv_cache)
    assert 0 < cached == sum(f.kv_cache.cached_tokens for f in fakes if f.kv_cache)
    assert series["agentloop_upstream_picks_cache_total"] == 2
    assert series["agentloop_upstream_picks_load_total"] == 0


async def test_an_endpoint_that_leaves_and_comes_back_is_not_expected_to_hold_anything(
        tmp_path):
    # Before: back after a restart, the endpoint was still the prefix's first choice (its
    # index said so, and it is the prefix's home): a miss on an empty cache while the
    # endpoint that served the prefix meanwhile held it.
    async with caching_fakes(2) as fakes:
        async with pooled_gateway(tmp_path, pool_document(fakes), model=DEFAULT_MODEL,
                                  retry_attempts=2) as (running, stub):
            pool = running.backend.pools["vllm"]
            system = system_prompt("away")
            await stub.Generate(ask(system), timeout=10)
            [home] = holder(fakes, system)
            other = 1 - home
            gone = fakes[home]
            endpoint = next(e for e in pool.endpoints if e.key == gone.url)
            await gone.stop()
            await wait_until(lambda: not endpoint.available, timeout=5)
            await stub.Generate(ask(system, "meanwhile"), timeout=10)
            assert holder(fakes, system).count(other) == 1
            gone.kv_cache.clear()  # it restarted
            await gone.start(port=int(gone.url.rsplit(":", 1)[1].split("/")[0]))
            await wait_until(lambda: endpoint.available, timeout=5)
            reply = await stub.Generate(ask(system, "back"), timeout=10)
            assert holder(fakes, system).count(other) == 2, "it went back to an empty cache"
            assert reply.usage.input_tokens > 0


async def test_an_engine_that_lost_its_cache_corrects_the_index(tmp_path):
    # Before: the index kept claiming the restarted engine held every prefix it had served,
    # whatever the engine reported.
    async with caching_fakes(2) as fakes:
        # No health check sees the restart: only the engine's report tells.
        async with pooled_gateway(tmp_path, pool_document(fakes), model=DEFAULT_MODEL,
                                  retry_attempts=2, health_interval=3600) as (running, stub):
            pool = running.backend.pools["vllm"]
            systems = [system_prompt(f"doc{n}") for n in range(3)]
            for system in systems:
                await stub.Generate(ask(system), timeout=10)
            homes = [holder(fakes, s)[0] for s in systems]
            # Two prompts on one endpoint (three prompts, two endpoints).
            first, second = next((a, b) for a in range(3) for b in range(a + 1, 3)
                                 if homes[a] == homes[b])
            home = fakes[homes[first]]
            await stub.Generate(ask(systems[first]), timeout=10)  # a hit: it reports
            await stub.Generate(ask(systems[second]), timeout=10)  # the most recent
            endpoint = next(e for e in pool.endpoints if e.key == home.url)
            index = pool.prefixes.index(endpoint.key)
            older = prefix_of(generation(systems[first]))
            assert older is not None and index.match(older.hashes, _now()) > 0

            await home.restart()  # its engine's cache is empty now
            await wait_until(lambda: home.active_streams == 0, timeout=5)
            before = holder(fakes, systems[second]).count(homes[second])
            await stub.Generate(ask(systems[second]), timeout=10)
            assert holder(fakes, systems[second]).count(homes[second]) == before + 1
            # The engine had none of what the index expected: it lost that block and,
            # under its LRU, everything used before it.
            assert index.match(older.hashes, _now()) == 0
            assert pool.prefixes.corrected > 0


def generation(system: str, scope: str = "", model: str = DEFAULT_MODEL) -> GenerationRequest:
    """The request as the pool sees it (the scope of a caller on loopback without keys)."""
    options = SamplingOptions(temperature=0.8, top_p=0.95, top_k=40, max_tokens=8,
                              repeat_penalty=1.0, num_ctx=2048)
    return GenerationRequest(model=model, options=options, system=system,
                             messages=(ChatMessage(Role.USER, "hi"),),
                             context=CallContext(cache_scope=scope or cache_scope(
                                 "addr:ipv4:127.0.0.1", "")))


def _now() -> float:
    return time.monotonic()


# --- the pick, unit by unit -------------------------------------------------------------


class _Endpoint:
    def __init__(self, key: str) -> None:
        self.key = key


def test_replicas_that_share_nothing_send_a_new_prefix_to_the_same_home():
    endpoints = [_Endpoint(f"http://10.0.0.{n}:8000/v1") for n in range(4)]
    one, two = PrefixPicks(PrefixRouting()), PrefixPicks(PrefixRouting())
    homes = set()
    for n in range(40):
        request = generation(system_prompt(f"p{n}"), scope="s")
        a, b = prefix_of(request), prefix_of(request)
        assert a is not None and b is not None and a.hashes == b.hashes
        # Replica two has seen other traffic first: its history differs.
        two.choose(endpoints, [0.0] * 4, prefix_of(generation(system_prompt(f"x{n}"))))
        picked = one.choose(endpoints, [0.0] * 4, a)
        assert two.choose(endpoints, [0.0] * 4, b) is picked
        homes.add(picked.key)
    assert len(homes) == 4, "new prefixes should spread over every endpoint"


def test_the_index_keeps_its_bound_and_forgets_a_prefix_tail_first():
    index = PrefixIndex(capacity=10, max_age=60.0)
    index.insert(list(range(8)), now=1.0)
    index.insert(list(range(100, 106)), now=2.0)
    assert len(index) == 10
    # The older prompt lost its tail, its head is still held.
    assert index.match(list(range(8)), now=3.0) == 4
    assert index.match(list(range(100, 106)), now=3.0) == 6
    assert index.match(list(range(100, 106)), now=100.0) == 0, "aged out"


def test_a_short_prompt_is_placed_by_load_alone():
    assert prefix_of(generation("short")) is None


@pytest.mark.parametrize(("routing", "complaint"), [
    ({"load_bound": 2}, "load_bound"),
    ({"index_blocks": 0}, "index_blocks"),
    ({"enabled": "yes"}, "enabled"),
    ({"max_age": -1}, "max_age"),
    ({"size": 1}, "unknown keys"),
])
def test_bad_prefix_routing_is_refused_naming_the_key(routing, complaint):
    document = {"upstreams": {"u": {"kind": "ollama", "endpoints": ["http://a:1"],
                                    "prefix_routing": routing}},
                "routes": [{"models": ["m"], "pools": ["u"]}]}
    with pytest.raises(SettingsError, match=complaint):
        parse_pools(document, "test")


def test_prefix_routing_defaults():
    document = {"upstreams": {"u": {"kind": "ollama", "endpoints": ["http://a:1"]}},
                "routes": [{"models": ["m"], "pools": ["u"]}]}
    assert parse_pools(document, "t").upstreams["u"].prefix_routing == PrefixRouting()


def test_a_huge_prompt_is_hashed_only_as_far_as_the_bound():
    small = prefix_of(generation(system_prompt("big", 20_000)))
    huge = prefix_of(generation(system_prompt("big", 2_000_000)))
    assert small is not None and huge is not None
    assert len(huge.hashes) == MAX_BLOCKS and huge.hashes == small.hashes[:MAX_BLOCKS]
    assert huge.size > 100 * small.size


def test_an_engine_that_never_reports_cached_tokens_is_never_corrected():
    # Ollama says nothing of its cache: its zeros are silence, not misses.
    endpoints = [_Endpoint("http://a:1"), _Endpoint("http://b:1")]
    picks = PrefixPicks(PrefixRouting())
    older = prefix_of(generation(system_prompt("older")))
    assert older is not None
    home = picks.choose(endpoints, [0.0, 0.0], older)
    for name in ("one", "two", "three"):
        prefix = prefix_of(generation(system_prompt(name)))
        assert prefix is not None
        picks.choose([home], [0.0], prefix)
        picks.learn(home.key, prefix, _end(1000, cached=0))
    again = prefix_of(generation(system_prompt("three")))
    assert again is not None
    picks.choose([home], [0.0], again)
    picks.learn(home.key, again, _end(1000, cached=0))
    assert picks.corrected == 0
    assert picks.index(home.key).match(older.hashes, _now()) == len(older.hashes)
    # Once it has reported a hit, a zero where a hit was expected is a miss.
    picks.learn(home.key, again, _end(1000, cached=900))
    picks.choose([home], [0.0], again)
    picks.learn(home.key, again, _end(1000, cached=0))
    assert picks.corrected > 0
    assert picks.index(home.key).match(older.hashes, _now()) == 0


def _end(tokens: int, cached: int) -> GenerationEnd:
    return GenerationEnd(FinishReason.STOP, Usage(tokens, 1, 0), Timings(), DEFAULT_MODEL,
                         engine_cached_tokens=cached)


async def test_a_sessions_prompt_draws_calls_without_one_to_its_endpoint(tmp_path):
    # Before: a session's calls were placed by the session alone and the index never
    # heard of them: the same system prompt without a session went to its own home.
    async with caching_fakes(3) as fakes:
        async with pooled_gateway(tmp_path, pool_document(fakes), model=DEFAULT_MODEL) \
                as (running, stub):
            picks = running.backend.pools["vllm"].prefixes
            system = system_prompt("agent")
            for n in range(3):  # sessions land on different endpoints
                await stub.Generate(ask(system, f"turn {n}"), timeout=10,
                                    metadata=(("x-agentloop-session", f"s{n}"),))
            session_homes = set(holder(fakes, system))
            await stub.Generate(ask(system, "no session"), timeout=10)
            assert picks.for_cache == 1
            assert set(holder(fakes, system)) == session_homes
