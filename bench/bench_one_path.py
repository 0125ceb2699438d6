"""One path for every engine, side by side in one run: fairness where the pools are, a flooded
route beside an idle one, arrival order, capacity that follows DNS, and the path's own cost.

- fairness on a pool: `agentloop serve` (its own process) with a pools file of one pool of
  4 slots on the fake Ollama, and, beside it, the same engine without a pools file. Tenant B
  sends `--probes` calls one after another, alone, then while tenant A's `--flood` calls
  wait; tenant C's critical calls the same way with `--critical-reserve 1`. Reported: B's
  p95 under the flood / p95 alone (goal <= 1.5x on the pool), C's (goal <= 1.3x).
- two routes: pools x and y (4 slots each, one fake Ollama each); route y's probes alone,
  then while route x is flooded with long calls: p95 under the flood / alone (goal <= 1.2x).
- arrival order: ten waiters on one endpoint of cap 1 (beside a larger pool of another
  route) are served in the order they came.
- DNS: a `dns:` pool that resolves to nothing, then to three addresses (three fake Ollamas on
  127.0.0.1-3): its slots before and after one refresh, and whether 6 calls then all stream
  at once.
- a hostile upstream: `agentloop serve` before an OpenAI-compatible upstream that streams
  `--overrun` deltas whatever `max_tokens` asks; `--hostile-calls` unary Generates of
  max_tokens 20 at once: the longest answer and the gateway's peak memory growth (goal
  < +50 MB).
- the path's cost: one generation admitted and routed (before: the replica's admission and
  the resilience wrapper; after: the tenant's quotas and the router's pool of one with its
  queue) over an in-process engine that answers at once, microseconds per call, tenants off
  and on; and, as context, the whole generation service around it (telemetry and the other
  features of each tree included); in this tree and in the tree of `--before` (a git
  revision, run in a subprocess from a temporary worktree).

    .venv/bin/python -m bench.bench_one_path [--flood 400] [--probes 20] [--before bc5df12]

Writes bench/results/one_path.json and prints a Markdown table. A smoke run:
`--flood 40 --probes 5 --path-calls 2000`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from bench.bench_pools import gateway
from bench.bench_tenants import TENANTS, p95, serve, under_flood
from bench.processes import TESTS, fake_ollama, free_port, stop

sys.path.insert(0, str(TESTS))
from fake_ollama import DEFAULT_MODEL, FakeOllama, Script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "one_path.json"


def pools_file(folder: Path, document: dict[str, Any]) -> str:
    path = folder / "pools.json"
    path.write_text(json.dumps(document))
    return str(path)


# --- fairness on a pool, and two routes ------------------------------------------------------

async def fairness(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    keys = folder / "tenants.yaml"
    keys.write_text(TENANTS)
    common = ["--max-queue", str(args.flood + 16), "--queue-timeout", "600",
              "--api-keys-file", str(keys), "--warm-up", "false", "--fair-queuing", "true"]
    results: dict[str, Any] = {}
    with fake_ollama(tokens=args.tokens * 2, token_delay=args.token_delay) as url:
        document = {"upstreams": {"local": {"kind": "ollama", "endpoints": [url],
                                            "max_in_flight": 4}},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["local"]}]}
        layouts = {"pool": ["--upstreams", pools_file(folder, document)],
                   "single": ["--backend", "ollama", "--ollama-url", url, "--max-in-flight", "4"]}
        for name, layout in layouts.items():
            proc, address = serve(*common, *layout)
            try:
                results[name] = await under_flood(address, args, "b-key")
            finally:
                stop(proc)
            proc, address = serve(*common, *layout, "--critical-reserve", "1")
            try:
                results[f"{name}_critical"] = await under_flood(
                    address, args, "c-key", ("x-agentloop-priority", "critical"))
            finally:
                stop(proc)
    return results


async def two_routes(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    with fake_ollama(tokens=args.tokens * 20, token_delay=args.token_delay) as x_url, \
            fake_ollama(tokens=args.tokens * 2, token_delay=args.token_delay) as y_url:
        document = {"upstreams": {"x": {"kind": "ollama", "endpoints": [x_url],
                                        "max_in_flight": 4},
                                  "y": {"kind": "ollama", "endpoints": [y_url],
                                        "max_in_flight": 4,
                                        "models": {"other": DEFAULT_MODEL}}},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["x"]},
                               {"models": ["other"], "pools": ["y"]}]}
        proc, address = serve("--upstreams", pools_file(folder, document), "--max-queue",
                               str(args.flood + 16), "--queue-timeout", "600",
                               "--warm-up", "false")
        try:
            async with grpc.aio.insecure_channel(address) as probe_channel, \
                    grpc.aio.insecure_channel(address, options=[
                        ("grpc.use_local_subchannel_pool", 1)]) as flood_channel:
                y = pb_grpc.AgentLoopServiceStub(probe_channel)
                x = pb_grpc.AgentLoopServiceStub(flood_channel)
                alone = await route_probe(y, args)
                flood = [asyncio.ensure_future(x.Generate(pb.GenerateRequest(
                    prompt=f"flood {i}", options=pb.GenerationOptions(
                        max_tokens=args.tokens * 20)), timeout=600)) for i in range(args.flood)]
                await asyncio.sleep(0.2)  # the flood is in route x's queue
                loaded = await route_probe(y, args)
                for call in flood:
                    call.cancel()
                await asyncio.gather(*flood, return_exceptions=True)
        finally:
            stop(proc)
    return {"alone_p95": p95(alone), "flood_p95": p95(loaded),
            "ratio_p95": p95(loaded) / p95(alone)}


async def route_probe(stub: pb_grpc.AgentLoopServiceStub, args: argparse.Namespace
                      ) -> list[float]:
    latencies = []
    for i in range(args.probes):
        started = time.perf_counter()
        await stub.Generate(pb.GenerateRequest(prompt=f"probe {i}", model="other",
                                               options=pb.GenerationOptions(
                                                   max_tokens=args.tokens)), timeout=600)
        latencies.append(time.perf_counter() - started)
    return latencies


# --- arrival order and DNS, in process -------------------------------------------------------

async def until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)


async def arrival_order() -> dict[str, Any]:
    small, big = FakeOllama(), FakeOllama(models=["other:latest"])
    for fake in (small, big):
        await fake.start("127.0.0.1", 0)
    try:
        small.enqueue(Script(tokens=["a"], hang_after=1))
        document = {"upstreams": {"small": {"kind": "ollama", "endpoints": [small.url],
                                            "max_in_flight": 1},
                                  "big": {"kind": "ollama", "endpoints": [big.url],
                                          "max_in_flight": 8}},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["small"]},
                               {"models": ["other"], "pools": ["big"]}]}
        async with gateway(document, fair_queuing=False) as (running, stub):
            holder = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hold"), timeout=60)
            await holder.read()
            waiters = []
            for i in range(10):
                waiters.append(asyncio.ensure_future(stub.Generate(
                    pb.GenerateRequest(prompt=f"w{i}"), timeout=60)))
                await until(lambda n=i + 1: running.backend.pools["small"].queued == n)
            holder.cancel()
            await asyncio.gather(*waiters)
        order = [body["prompt"] for body in small.generation_requests[1:]]
    finally:
        for fake in (small, big):
            await fake.stop()
    return {"served": order, "in_arrival_order": order == [f"w{i}" for i in range(10)]}


async def dns_capacity() -> dict[str, Any]:
    port = free_port()
    fakes = [FakeOllama(default_script=Script(tokens=["t"] * 20, token_delay=0.05))
             for _ in range(3)]
    addresses = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    for fake, address in zip(fakes, addresses, strict=True):
        await fake.start(address, port)
    answers: list[str] = []
    try:
        document = {"upstreams": {"local": {"kind": "ollama", "dns": f"models.invalid:{port}",
                                            "max_in_flight": 2, "dns_refresh": 3600}},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["local"]}]}
        async with gateway(document) as (running, stub):
            pool = running.backend.pools["local"]

            async def resolver(_host: str, _port: int) -> list[str]:
                return list(answers)

            pool.resolver = resolver
            await pool.resolve()
            before = pool.capacity()
            answers[:] = addresses
            await pool.resolve()  # one refresh
            after = pool.capacity()
            calls = [asyncio.ensure_future(stub.Generate(pb.GenerateRequest(prompt="hi"),
                                                         timeout=60)) for _ in range(6)]
            await until(lambda: sum(f.active_streams for f in fakes) == 6)
            all_at_once = running.admission.queued == 0
            await asyncio.gather(*calls)
    finally:
        for fake in fakes:
            await fake.stop()
    return {"slots_before": before, "slots_after_one_refresh": after,
            "six_calls_at_once": all_at_once}


# --- a hostile upstream: memory stays bounded ------------------------------------------------

def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


async def hostile_upstream(folder: Path, calls: int, overrun: int) -> dict[str, Any]:
    """`agentloop serve` (its own process, so its memory is its own) before an
    OpenAI-compatible upstream that streams `overrun` deltas whatever `max_tokens` says:
    what unary Generates of max_tokens 20 get, and the gateway's peak memory before and
    after."""
    from fake_openai import DEFAULT_MODEL as OPENAI_MODEL
    from fake_openai import FakeOpenAI
    from fake_openai import Script as OpenAIScript

    fake = FakeOpenAI(default_script=OpenAIScript(tokens=["x"] * overrun, overrun=True))
    await fake.start()
    try:
        document = {"upstreams": {"hostile": {"kind": "openai", "endpoints": [fake.url],
                                              "remote": False, "max_in_flight": 4}},
                    "routes": [{"models": [OPENAI_MODEL], "pools": ["hostile"]}]}
        # On a thread: the fake upstream answers the gateway's checks from this loop.
        proc, address = await asyncio.to_thread(
            serve, "--upstreams", pools_file(folder, document), "--model", OPENAI_MODEL,
            "--warm-up", "false")
        try:
            before = peak_rss_mb(proc.pid)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.AgentLoopServiceStub(channel)
                replies = await asyncio.gather(*(stub.Generate(pb.GenerateRequest(
                    prompt="hi", options=pb.GenerationOptions(max_tokens=20)), timeout=120)
                    for _ in range(calls)))
            after = peak_rss_mb(proc.pid)
        finally:
            stop(proc)
    finally:
        await fake.stop()
    return {"calls": calls, "deltas_offered_per_call": overrun,
            "longest_answer_chars": max(len(r.text) for r in replies),
            "all_cut_at_length": all(r.finish_reason == pb.FINISH_REASON_LENGTH
                                     for r in replies),
            "peak_rss_before_mb": before, "peak_rss_after_mb": after,
            "growth_mb": after - before}


# --- the path's own cost ---------------------------------------------------------------------

PATH_COST = r'''
import asyncio, json, sys, time
from contextlib import aclosing
from agentloop.config import load_settings
from agentloop.domain import (BackendHealth, CallContext, FinishReason, GenerationEnd,
    GenerationRequest, SamplingOptions, Timings, Usage)
from agentloop.services.generation import GenerationService
from agentloop.tenants import Tenant

class Engine:
    name, parallelism, default_max_tokens, address = "ollama", 4, 256, None
    default_model = "m"
    async def stream(self, request):
        yield "x"
        yield GenerationEnd(FinishReason.STOP, Usage(5, 1), Timings(), "m")
    async def start(self): pass
    async def close(self): pass
    async def warm_up(self): pass
    async def check_health(self, model): return BackendHealth(True)
    async def list_models(self): return []

settings = load_settings(environ={}, listen="127.0.0.1:0", model="m")
limits = Tenant("team", weight=2.0, max_concurrency=1000, tokens_per_minute=10**11,
                requests_per_minute=10**11)
tenants = lambda _name: limits

try:  # the one path: the tenant's quotas, then the router over the engine's pool of one
    from agentloop.services.quotas import Quotas
    from agentloop.upstreams.router import Router

    def build(named):
        router = Router.for_engine(Engine(), settings)
        if named:
            router.tenants = tenants
        return router, Quotas(tenants if named else None)

    async def admitted_and_routed(parts, request):
        router, quotas = parts
        async with quotas.admit(request.context, lambda: 3) as meter:
            async with aclosing(router.stream(request)) as items:
                async for item in items:
                    if isinstance(item, str):
                        meter.add_output(1)
                    else:
                        meter.settle(item.usage)

    def service(parts):
        return GenerationService(*parts)
except ImportError:  # before: the replica's admission, then the resilience wrapper
    from agentloop.admission import Admission
    from agentloop.backends.resilient import ResilientBackend

    def build(named):
        return (ResilientBackend(Engine(), settings),
                Admission(4, 64, 30, tenants=tenants if named else None))

    async def admitted_and_routed(parts, request):
        backend, admission = parts
        context, streamed = request.context, 0
        async with admission.slot(request.deadline, context=context):
            async with aclosing(backend.stream(request)) as items:
                async for item in items:
                    if isinstance(item, str):
                        streamed += 1
                        admission.count_tokens(context, 1)
                    else:
                        admission.count_tokens(context, item.usage.input_tokens
                                               + item.usage.output_tokens - streamed)

    def service(parts):
        return GenerationService(*parts)

async def best_of(rounds, calls, one):
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            await one()
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    return best

async def main(calls):
    options = SamplingOptions(0.7, 0.9, 40, 16, 1.1, 2048)
    results = {}
    for named in (False, True):
        context = CallContext(tenant="team", caller="team") if named else CallContext()
        request = GenerationRequest(model="m", options=options, prompt="hello there",
                                    context=context)
        parts = build(named)
        generation = service(parts)
        key = "tenants_on_us" if named else "tenants_off_us"

        async def whole():
            async for _item in generation.stream(request):
                pass

        results[key] = await best_of(3, calls, lambda: admitted_and_routed(parts, request))
        results["service_" + key] = await best_of(3, calls, whole)
    print(json.dumps(results))

asyncio.run(main(int(sys.argv[1])))
'''


def path_cost(server: Path, calls: int) -> dict[str, float]:
    """The in-process path's µs per call, with `server` (a tree's server/) first on the path."""
    env = {**os.environ, "PYTHONPATH": str(server)}
    out = subprocess.run([sys.executable, "-c", PATH_COST, str(calls)], env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def path_costs(before: str, calls: int) -> dict[str, Any]:
    results: dict[str, Any] = {"before_revision": before}
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                        before], check=True, capture_output=True)
        try:
            for _ in range(2):  # alternated, the second of each reported
                results["before"] = path_cost(tree / "server", calls)
                results["after"] = path_cost(ROOT / "server", calls)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           check=False, capture_output=True)
    return results


# --- report ------------------------------------------------------------------------------------

def table(results: dict[str, Any]) -> str:
    rows = ["| figure | measured | goal |", "| --- | --- | --- |"]
    fair = results.get("fairness")
    if fair:
        for layout in ("pool", "single"):
            rows.append(f"| {layout}: B's p95 under A's flood / alone | "
                        f"{fair[layout]['ratio_p95']:.2f}x | "
                        f"{'<= 1.5x' if layout == 'pool' else 'reference'} |")
            rows.append(f"| {layout}: critical p95 under the flood / alone | "
                        f"{fair[layout + '_critical']['ratio_p95']:.2f}x | "
                        f"{'<= 1.3x' if layout == 'pool' else 'reference'} |")
    routes = results.get("two_routes")
    if routes:
        rows.append(f"| route y's p95 while route x is flooded / alone | "
                    f"{routes['ratio_p95']:.2f}x | <= 1.2x |")
    order = results.get("arrival_order")
    if order:
        rows.append(f"| ten waiters on cap 1 served in arrival order | "
                    f"{order['in_arrival_order']} | True |")
    hostile = results.get("hostile_upstream")
    if hostile:
        rows.append(f"| {hostile['calls']} unary calls of max_tokens 20 before an upstream "
                    f"streaming {hostile['deltas_offered_per_call']:,} deltas: longest answer, "
                    f"gateway's peak memory growth | {hostile['longest_answer_chars']} chars, "
                    f"+{hostile['growth_mb']:.0f} MB | 20 tokens, < +50 MB |")
    dns = results.get("dns")
    if dns:
        rows.append(f"| dns pool slots: nothing resolved -> one refresh after 3 addresses | "
                    f"{dns['slots_before']} -> {dns['slots_after_one_refresh']} "
                    f"(6 calls at once: {dns['six_calls_at_once']}) | 0 -> 6 |")
    cost = results.get("path_cost")
    if cost:
        for key, what, goal in (
                ("tenants_off_us", "admission + routing, no tenant", "no more than before"),
                ("tenants_on_us", "admission + routing, a named tenant with quotas",
                 "no more than before"),
                ("service_tenants_off_us", "the whole generation service, no tenant", ""),
                ("service_tenants_on_us", "the whole generation service, a named tenant", "")):
            rows.append(f"| {what} (µs per call, before -> after) | {cost['before'][key]:.1f} "
                        f"-> {cost['after'][key]:.1f} | {goal} |")
    return "\n".join(rows)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"args": vars(args), "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version()}}
    results["path_cost"] = path_costs(args.before, args.path_calls)
    results["arrival_order"] = await arrival_order()
    results["dns"] = await dns_capacity()
    with tempfile.TemporaryDirectory() as folder:
        results["fairness"] = await fairness(args, Path(folder))
        results["two_routes"] = await two_routes(args, Path(folder))
        results["hostile_upstream"] = await hostile_upstream(Path(folder), args.hostile_calls,
                                                             args.overrun)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flood", type=int, default=400, help="the flood's calls at once")
    parser.add_argument("--probes", type=int, default=20, help="probe calls in sequence")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per probe generation")
    parser.add_argument("--token-delay", type=float, default=0.01,
                        help="the fake Ollama's seconds per token")
    parser.add_argument("--path-calls", type=int, default=20_000)
    parser.add_argument("--hostile-calls", type=int, default=8)
    parser.add_argument("--overrun", type=int, default=200_000,
                        help="deltas the hostile upstream streams per call")
    parser.add_argument("--before", default="bc5df12",
                        help="the revision whose path cost is measured beside this tree's")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
