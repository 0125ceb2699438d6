"""Cache-aware picks against fewest-in-flight, side by side, on fake engines with a KV cache.

Endpoints are fake OpenAI servers on loopback that model a prefix cache (tests/fake_openai.py
`KVCache`: an LRU of 16-token blocks, prefill time per uncached prompt token before the
first token, `cached_tokens` in usage, `cache_salt` keeping tenants apart), each cache
holding a third of the working set. The workload (bench/prefix_workload.py) is K system
prompts of a few thousand tokens with Zipf popularity, short user turns, callers without
sessions, tenants with their own prompts; the same calls run through a real gateway once
with `prefix_routing` on and once off (fewest in flight). The first `--warmup` calls fill
the caches (each prompt's first call is a miss whatever the pick) and are not counted in
the share and the latencies; the whole run's share is shown beside.

- share of prompt tokens served from cache (goal >= 85 % with prefix routing),
- P95 time to first token (goal: at most half of fewest-in-flight's),
- calls per endpoint, the busiest over the mean (goal <= 1.3x),
- one endpoint restarted midway (its cache emptied): calls until the share of the last 20
  calls is back within 5 points of the 100 calls before (goal <= 100),
- the pick's cost per call with every endpoint's index full, and the indexes' memory.

Full size (the figures in docs/benchmarks.md; a quiet machine, about a minute):

    .venv/bin/python -m bench.bench_prefix_routing --calls 600 --concurrency 16

A smoke run: `--calls 100 --warmup 20 --prompts 10 --prompt-tokens 500
--pick-iterations 200`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from agentloop.domain import CallContext, ChatMessage, GenerationRequest, Role, SamplingOptions
from agentloop.upstreams.config import PrefixRouting
from agentloop.upstreams.prefix_index import PrefixPicks, prefix_of
from agentloop.v1 import agentloop_pb2 as pb
from bench.bench_pools import gateway
from bench.fleet_sizing import BLOCK_TOKENS, index_blocks_for
from bench.prefix_workload import Call, Workload
from bench.processes import TESTS

sys.path.insert(0, str(TESTS))
from fake_openai import DEFAULT_MODEL, FakeOpenAI, KVCache, Script

RESULTS = Path(__file__).resolve().parent / "results" / "prefix_routing.json"
#: The window the share after a restart is read over, and how close it must come back to
#: the share of the BEFORE calls before the restart.
WINDOW = 20
BEFORE = 100
RECOVERED_WITHIN = 0.05


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


@contextlib.asynccontextmanager
async def caching_endpoints(args: argparse.Namespace, workload: Workload
                            ) -> AsyncIterator[list[FakeOpenAI]]:
    capacity = cache_blocks(workload)
    fakes = []
    try:
        for _ in range(args.endpoints):
            fake = FakeOpenAI(default_script=Script(tokens=[" t"] * args.answer_tokens,
                                                    token_delay=args.token_delay))
            fake.kv_cache = KVCache(capacity, BLOCK_TOKENS, args.prefill_per_token)
            fake.extras = {"cache_salt"}
            await fake.start()
            fakes.append(fake)
        yield fakes
    finally:
        for fake in fakes:
            await fake.stop()


def cache_blocks(workload: Workload) -> int:
    """Each fake engine's cache: a third of the working set, in its 16-token blocks."""
    return math.ceil(workload.working_set_tokens / BLOCK_TOKENS / 3)


def pool_document(fakes: list[FakeOpenAI], args: argparse.Namespace, workload: Workload,
                  enabled: bool) -> dict[str, Any]:
    # The index sized to what an engine's cache holds, as docs/upstreams.md advises.
    index_blocks = args.index_blocks or index_blocks_for(
        workload, cache_blocks(workload) * BLOCK_TOKENS)
    return {"upstreams": {"pool": {
        "kind": "openai", "remote": False, "endpoints": [f.url for f in fakes],
        "max_in_flight": args.slots, "dialect": {"cache_salt": True},
        "prefix_routing": {"enabled": enabled, "load_bound": args.load_bound,
                           "index_blocks": index_blocks}}},
        "routes": [{"models": [DEFAULT_MODEL], "pools": ["pool"]}]}


async def one_call(stub: Any, workload: Workload, call: Call) -> dict[str, Any]:
    message = pb.StreamGenerateRequest(
        system=workload.system(call.prompt),
        messages=[pb.Message(role=pb.ROLE_USER, content=call.turn)])
    started = time.perf_counter()
    first = None
    try:
        async for reply in stub.StreamGenerate(
                message, timeout=120, metadata=(("x-agentloop-cache-key", call.tenant),)):
            if first is None and reply.text:
                first = time.perf_counter() - started
            usage = reply.usage
        return {"ok": True, "ttft": first, "input": usage.input_tokens,
                "cached": usage.cached_input_tokens}
    except grpc.aio.AioRpcError as error:
        return {"ok": False, "code": error.code().name}


async def run_policy(args: argparse.Namespace, workload: Workload, calls: list[Call],
                     enabled: bool, restart_at: int | None) -> dict[str, Any]:
    async with caching_endpoints(args, workload) as fakes, \
            gateway(pool_document(fakes, args, workload, enabled), model=DEFAULT_MODEL,
                    retry_attempts=2) as (running, stub):
        done: list[dict[str, Any]] = []
        pending = iter(range(len(calls)))
        restarted = asyncio.Event()

        async def worker() -> None:
            for index in pending:
                done.append(await one_call(stub, workload, calls[index]))
                if restart_at is not None and len(done) >= restart_at \
                        and not restarted.is_set():
                    restarted.set()
                    await fakes[0].restart()  # its cache is empty

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        seconds = time.perf_counter() - began
        picks = running.backend.pools["pool"].prefixes
        served = [len(f.generation_requests) for f in fakes]
        caches = [f.kv_cache for f in fakes if f.kv_cache is not None]
    steady = [d for d in done[args.warmup:] if d["ok"]]
    ttfts = [d["ttft"] for d in steady if d["ttft"] is not None]
    prompt = sum(c.prompt_tokens for c in caches)
    result = {
        "prefix_routing": enabled, "calls": len(done),
        "failed": sum(not d["ok"] for d in done), "seconds": round(seconds, 2),
        "cached_share": round(share(steady), 4),
        "cached_share_whole_run": round(sum(c.cached_tokens for c in caches) / prompt, 4)
        if prompt else 0.0,
        "ttft_p50": round(percentile(ttfts, 0.5), 4),
        "ttft_p95": round(percentile(ttfts, 0.95), 4),
        "calls_per_endpoint": served,
        "busiest_over_mean": round(max(served) / (sum(served) / len(served)), 3),
        "picks_for_cache": picks.for_cache, "picks_for_load": picks.for_load,
        "index_blocks_corrected": picks.corrected,
    }
    if restart_at is not None:
        result.update(recovery(done, restart_at))
    return result


def share(calls: list[dict[str, Any]]) -> float:
    """Of the prompt tokens of these calls, the share the engines served from cache (as
    the callers were told: the dialect keeps tenants apart with cache_salt)."""
    prompt = sum(d["input"] for d in calls if d["ok"])
    return sum(d["cached"] for d in calls if d["ok"]) / prompt if prompt else 0.0


def recovery(done: list[dict[str, Any]], restart_at: int) -> dict[str, Any]:
    """The share of the BEFORE calls before the restart, the lowest share of WINDOW calls
    after it, and how many calls after it until a WINDOW's share is back within
    RECOVERED_WITHIN of before."""
    before = share(done[max(0, restart_at - BEFORE):restart_at])
    lowest, back = 1.0, None
    for end in range(restart_at + WINDOW, len(done) + 1):
        now = share(done[end - WINDOW:end])
        lowest = min(lowest, now)
        if back is None and now >= before - RECOVERED_WITHIN:
            back = end - restart_at
    return {"restart_at": restart_at, "share_before_restart": round(before, 4),
            "lowest_window_share_after": round(lowest, 4), "calls_to_recover": back}


def pick_cost(workload: Workload, endpoints: int, iterations: int) -> dict[str, Any]:
    """prefix_of + choose per call, every endpoint's index full (the default
    index_blocks), and the indexes' memory."""
    settings = PrefixRouting()

    class Endpoint:
        def __init__(self, key: str) -> None:
            self.key = key

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    picks = PrefixPicks(settings)
    pool = [Endpoint(f"http://10.0.0.{n}:8000/v1") for n in range(endpoints)]
    rng = random.Random(1)
    now = time.monotonic()
    for endpoint in pool:
        index = picks.index(endpoint.key)
        for _ in range(settings.index_blocks // 64):
            index.insert([rng.getrandbits(64) for _ in range(64)], now)
    memory = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    options = SamplingOptions(temperature=0.8, top_p=0.95, top_k=40, max_tokens=16,
                              repeat_penalty=1.0, num_ctx=8192)
    requests = [GenerationRequest(
        model=DEFAULT_MODEL, options=options, system=workload.system(call.prompt),
        messages=(ChatMessage(Role.USER, call.turn),),
        context=CallContext(cache_scope=call.tenant)) for call in workload.calls(iterations)]
    loads = [0.0] * endpoints
    started = time.perf_counter()
    for request in requests:
        prefix = prefix_of(request)
        if prefix is not None:
            picks.choose(pool, loads, prefix)
    per_call = (time.perf_counter() - started) / len(requests)
    return {"endpoints": endpoints, "index_blocks_per_endpoint": settings.index_blocks,
            "blocks_held": picks.blocks, "memory_mb": round(memory / 2**20, 1),
            "prompt_blocks": len(prefix_of(requests[0]).hashes) if requests else 0,  # type: ignore[union-attr]
            "pick_us_per_call": round(per_call * 1e6, 1)}


def table(result: dict[str, Any]) -> str:
    prefix, fewest = result["prefix"], result["fewest"]
    restart, cost = result["restart"], result["pick_cost"]
    ratio = prefix["ttft_p95"] / fewest["ttft_p95"] if fewest["ttft_p95"] else math.nan
    return "\n".join([
        "| figure | prefix routing | fewest in flight | goal |",
        "| --- | ---: | ---: | --- |",
        f"| prompt tokens from cache (after {result['args']['warmup']} calls) | "
        f"{prefix['cached_share']:.1%} | {fewest['cached_share']:.1%} | >= 85 % |",
        f"| prompt tokens from cache (whole run) | {prefix['cached_share_whole_run']:.1%} | "
        f"{fewest['cached_share_whole_run']:.1%} | |",
        f"| TTFT P50 / P95 | {prefix['ttft_p50']:.3f} / {prefix['ttft_p95']:.3f} s | "
        f"{fewest['ttft_p50']:.3f} / {fewest['ttft_p95']:.3f} s | P95 <= half "
        f"({ratio:.2f}x) |",
        f"| busiest endpoint / mean calls | {prefix['busiest_over_mean']:.2f}x "
        f"{prefix['calls_per_endpoint']} | {fewest['busiest_over_mean']:.2f}x "
        f"{fewest['calls_per_endpoint']} | <= 1.3x |",
        f"| picks for cache / overridden for load | {prefix['picks_for_cache']} / "
        f"{prefix['picks_for_load']} | - | |",
        f"| failed calls | {prefix['failed']} | {fewest['failed']} | 0 |",
        f"| restart at call {restart['restart_at']}: share before, lowest {WINDOW} after, "
        f"calls to recover | {restart['share_before_restart']:.1%}, "
        f"{restart['lowest_window_share_after']:.1%}, {restart['calls_to_recover']} | - | "
        "<= 100 calls |",
        f"| pick cost, {cost['endpoints']} endpoints x {cost['index_blocks_per_endpoint']} "
        f"blocks full ({cost['memory_mb']} MB), prompt of {cost['prompt_blocks']} blocks | "
        f"{cost['pick_us_per_call']} us/call | - | |",
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--endpoints", type=int, default=4)
    parser.add_argument("--slots", type=int, default=8, help="max_in_flight per endpoint")
    parser.add_argument("--prompts", type=int, default=30, help="system prompts (K)")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--answer-tokens", type=int, default=20)
    parser.add_argument("--token-delay", type=float, default=0.005)
    parser.add_argument("--prefill-per-token", type=float, default=0.0002,
                        help="seconds per uncached prompt token (2,000 tokens: 0.4 s)")
    parser.add_argument("--load-bound", type=float, default=PrefixRouting().load_bound)
    parser.add_argument("--index-blocks", type=int, default=0,
                        help="prefix_routing.index_blocks (0: sized to a fake's cache)")
    parser.add_argument("--warmup", type=int, default=100,
                        help="first calls not counted in the share and the latencies")
    parser.add_argument("--pick-iterations", type=int, default=2000)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    workload = Workload(prompts=args.prompts, prompt_tokens=args.prompt_tokens,
                        zipf=args.zipf, tenants=args.tenants)
    calls = workload.calls(args.calls)

    async def all_runs() -> dict[str, Any]:
        return {"prefix": await run_policy(args, workload, calls, True, None),
                "fewest": await run_policy(args, workload, calls, False, None),
                "restart": await run_policy(args, workload, calls, True, args.calls // 2)}

    result = asyncio.run(all_runs())
    result["pick_cost"] = pick_cost(workload, args.endpoints, args.pick_iterations)
    result["args"] = vars(args) | {"output": str(args.output)}
    print(table(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
