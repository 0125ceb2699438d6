"""Upstream pools: balancing over endpoints and overflow to a second pool, side by side.

Endpoints are fake Ollamas on loopback that stream at a fixed token rate and serve at most
C streams at once (more wait inside the fake, unseen, as in Ollama with NUM_PARALLEL).
Requests differ in length (a random number of tokens), the case a round-robin pick loses.

- balancing: C closed-loop users on a pool of one endpoint, then 2C users on a pool of two;
  the P95 latency of the second over the first (goal <= 1.2x), and each endpoint's peak
  streams (never over C).
- overflow: a local pool of capacity C with an overflow limit and a remote pool; a burst of
  3C calls at once. The P95 of the calls the local pool kept over its unloaded P95 (C calls
  at once, no burst), goal <= 1.5x; failed calls (goal 0).

    .venv/bin/python -m bench.bench_pools --capacity 8 --rounds 6
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from agentloop.config import load_settings
from agentloop.server import RunningServer, start_server
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from bench.processes import TESTS

sys.path.insert(0, str(TESTS))
from fake_ollama import FakeOllama, Script

RESULTS = Path(__file__).resolve().parent / "results" / "pools.json"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.asynccontextmanager
async def endpoints(count: int, capacity: int, token_delay: float
                    ) -> AsyncIterator[list[FakeOllama]]:
    fakes = []
    try:
        for _ in range(count):
            fake = FakeOllama(default_script=Script(tokens=[" t"] * 1000, token_delay=token_delay))
            fake.max_streams = capacity
            await fake.start("127.0.0.1", 0)
            fakes.append(fake)
        yield fakes
    finally:
        for fake in fakes:
            await fake.stop()


@contextlib.asynccontextmanager
async def gateway(document: dict[str, Any], **extra: Any
                  ) -> AsyncIterator[tuple[RunningServer, Any]]:
    """A gateway in this process on the pools file `document` (`extra`: other settings)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
        json.dump(document, handle)
        handle.flush()
        values: dict[str, Any] = {
            "listen": "127.0.0.1:0", "upstreams": handle.name, "metrics_listen": "",
            "health_interval": 0.5, "warm_up": False, "drain_delay": 0.0,
            "queue_timeout": 120.0, "max_queue": 10_000, "cache_entries": 0, **extra}
        settings = load_settings(environ={}, **values)
        running = await start_server(settings)
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                yield running, pb_grpc.AgentLoopServiceStub(channel)
        finally:
            await running.shutdown(grace=1.0, drain_delay=0.0)


def request(rng: random.Random, shortest: int, longest: int) -> tuple[pb.GenerateRequest, int]:
    tokens = rng.randint(shortest, longest)
    return pb.GenerateRequest(prompt="hi", options=pb.GenerationOptions(max_tokens=tokens)), \
        tokens


async def timed(stub: Any, message: pb.GenerateRequest) -> tuple[float, str]:
    started = time.perf_counter()
    reply = await stub.Generate(message, timeout=300)
    return time.perf_counter() - started, reply.upstream


async def closed_loop(stub: Any, users: int, rounds: int, args: argparse.Namespace,
                      seed: int) -> list[float]:
    rng = random.Random(seed)
    latencies: list[float] = []

    async def user() -> None:
        for _ in range(rounds):
            message, _ = request(rng, args.shortest, args.longest)
            latency, _ = await timed(stub, message)
            latencies.append(latency)

    await asyncio.gather(*(user() for _ in range(users)))
    return latencies


def pool(fakes: list[FakeOllama], capacity: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "ollama", "endpoints": [f.url for f in fakes], "max_in_flight": capacity,
            **extra}


async def balancing(args: argparse.Namespace) -> dict[str, Any]:
    c = args.capacity
    # Tokens per request cycle through the same seeds in both runs.
    async with endpoints(1, c, args.token_delay) as (one,):
        document = {"upstreams": {"local": pool([one], c)},
                    "routes": [{"models": ["gemma3n:e2b"], "pools": ["local"]}]}
        async with gateway(document) as (_, stub):
            alone = await closed_loop(stub, c, args.rounds, args, seed=1)
    async with endpoints(2, c, args.token_delay) as (first, second):
        document = {"upstreams": {"local": pool([first, second], c)},
                    "routes": [{"models": ["gemma3n:e2b"], "pools": ["local"]}]}
        async with gateway(document) as (_, stub):
            pair = await closed_loop(stub, 2 * c, args.rounds, args, seed=1)
        peaks = [first.peak_streams, second.peak_streams]
        served = [len(first.generation_requests), len(second.generation_requests)]
    ratio = percentile(pair, 0.95) / percentile(alone, 0.95)
    return {"capacity": c, "p95_one_endpoint_c_users": percentile(alone, 0.95),
            "p95_two_endpoints_2c_users": percentile(pair, 0.95), "p95_ratio": ratio,
            "peak_streams_per_endpoint": peaks, "calls_per_endpoint": served,
            "met": ratio <= 1.2 and max(peaks) <= c}


async def overflow(args: argparse.Namespace) -> dict[str, Any]:
    c = args.capacity
    async with endpoints(2, 10 * c, args.token_delay) as (local, cloud):
        document = {
            "upstreams": {"local": pool([local], c, overflow={"max_queue": args.max_queue}),
                          "cloud": pool([cloud], 4 * c, remote=True)},
            "routes": [{"models": ["gemma3n:e2b"], "pools": ["local", "cloud"],
                        "allow_remote": True}]}
        async with gateway(document) as (_, stub):
            rng = random.Random(2)
            unloaded: list[float] = []
            for _ in range(args.rounds):
                batch = [request(rng, args.shortest, args.longest)[0] for _ in range(c)]
                unloaded += [lat for lat, _ in await asyncio.gather(
                    *(timed(stub, m) for m in batch))]
            kept: list[float] = []
            spilled = failed = 0
            for _ in range(args.rounds):
                batch = [request(rng, args.shortest, args.longest)[0] for _ in range(3 * c)]
                outcomes = await asyncio.gather(*(timed(stub, m) for m in batch),
                                                return_exceptions=True)
                for outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        failed += 1
                    elif outcome[1] == "local":
                        kept.append(outcome[0])
                    else:
                        spilled += 1
    ratio = percentile(kept, 0.95) / percentile(unloaded, 0.95)
    return {"capacity": c, "burst": 3 * c, "max_queue": args.max_queue,
            "p95_local_unloaded": percentile(unloaded, 0.95),
            "p95_local_kept_in_burst": percentile(kept, 0.95), "p95_ratio": ratio,
            "kept_local": len(kept), "spilled": spilled, "failed": failed,
            "met": ratio <= 1.5 and failed == 0}


def table(result: dict[str, Any]) -> str:
    b, o = result["balancing"], result["overflow"]
    return "\n".join([
        "| figure | measured | goal |",
        "| --- | ---: | --- |",
        f"| balancing: P95, 2 endpoints x {2 * b['capacity']} users / 1 endpoint x "
        f"{b['capacity']} users | {b['p95_ratio']:.2f}x ({b['p95_two_endpoints_2c_users']:.2f} s"
        f" / {b['p95_one_endpoint_c_users']:.2f} s) | <= 1.2x |",
        f"| balancing: peak streams per endpoint (cap {b['capacity']}) | "
        f"{b['peak_streams_per_endpoint']} | <= cap |",
        f"| overflow: P95 of calls kept local in a burst of {o['burst']} / unloaded | "
        f"{o['p95_ratio']:.2f}x ({o['p95_local_kept_in_burst']:.2f} s / "
        f"{o['p95_local_unloaded']:.2f} s) | <= 1.5x |",
        f"| overflow: kept local / spilled / failed | {o['kept_local']} / {o['spilled']} / "
        f"{o['failed']} | 0 failed |",
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=8, help="streams per endpoint (C)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--token-delay", type=float, default=0.01)
    parser.add_argument("--shortest", type=int, default=10)
    parser.add_argument("--longest", type=int, default=60)
    parser.add_argument("--max-queue", type=int, default=0,
                        help="the local pool's overflow.max_queue")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    async def both() -> dict[str, Any]:
        return {"balancing": await balancing(args), "overflow": await overflow(args)}

    result = asyncio.run(both())
    print(table(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
