"""Embed's figures, side by side in one run: the gateway against calling the engine directly.

  throughput   the embedded engine: texts/s for batches of B short texts (about 16 tokens
               each) through the gateway (`agentloop serve --backend embedded`, Embed over
               a real channel) vs llama-cpp-python's own `Llama(embedding=True,
               pooling_type=1).embed` on the same texts in this process (same GGUF, threads
               and batch of tokens), alternating, paired per round: gateway / direct
  interference U users generating (StreamGenerate, T tokens, R requests each) alone, then
               again while E callers embed batches of B texts without pause: generation
               latency P95 with embedders / without, minus one (the slowdown)
  ollama       Embed of one text through the gateway in front of the fake Ollama (its own
               process) vs the same /api/embed request sent to the fake directly (httpx,
               keep-alive), alternating, sequential: the gateway's added p50 (ms)

    .venv/bin/python -m bench.bench_embeddings [--batch 32] [--rounds 20] [--users 10]
        [--embedders 10] [--max-tokens 64] [--requests 2] [--ollama-calls 400]

Writes bench/results/embeddings.json and prints a Markdown table with each figure's goal
(docs/benchmarks.md). Run it on a quiet machine: llama.cpp slows down a lot when other
processes compete for the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import llama_cpp

from agentloop.backends.embedded import cache_dir, ensure_packaged_model, usable_cpus
from agentloop.config import load_settings
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from bench.bench_embedded import gateway as embedded_gateway
from bench.bench_embedded import on_fresh_thread, one_stream
from bench.bench_workers import wait_serving
from bench.processes import fake_ollama, stop
from bench.run_all import percentile

RESULTS = Path(__file__).resolve().parent / "results"
AGENTLOOP = str(Path(sys.executable).parent / "agentloop")
GOALS = {"gateway_over_direct": 0.90, "generation_p95_slowdown": 0.20, "ollama_added_p50_ms": 1.0}
#: Short texts of about 16 tokens each (Gemma's tokenizer), cycled to fill a batch.
SENTENCES = [
    "The quarterly report shows a steady rise in revenue across all three regions this year.",
    "A small cat slept on the warm windowsill while the rain kept falling outside the house.",
    "Please remember to submit the signed tax forms before the filing deadline next Monday.",
    "The new train line connects the airport with the city centre in about twenty minutes.",
    "Our team fixed the login bug, and the release is planned for early next week again.",
    "Fresh tomatoes, basil and olive oil make a simple sauce that goes well with pasta.",
    "The museum opens a new exhibition about ancient maps and the history of navigation.",
    "Heavy snow closed the mountain pass, so the trucks had to take the longer route today.",
]
PROMPT = "Once upon a time, in a small village by the sea, there lived"


def texts(batch: int, offset: int = 0) -> list[str]:
    """`batch` distinct short texts (a counter keeps them apart: nothing is cached)."""
    return [f"{SENTENCES[(offset + n) % len(SENTENCES)]} ({offset + n})" for n in range(batch)]


def log(message: str) -> None:
    print(f"[bench_embeddings] {message}", file=sys.stderr, flush=True)


# --- the embedded engine: gateway vs Llama.embed ------------------------------------------

def direct_texts_per_s(llm: llama_cpp.Llama, batch: list[str]) -> float:
    started = time.perf_counter()
    llm.embed(batch, normalize=True)
    return len(batch) / (time.perf_counter() - started)


async def gateway_texts_per_s(stub: pb_grpc.AgentLoopServiceStub, batch: list[str]) -> float:
    started = time.perf_counter()
    reply = await stub.Embed(pb.EmbedRequest(texts=batch), timeout=600)
    assert len(reply.embeddings) == len(batch)
    return len(batch) / (time.perf_counter() - started)


async def throughput(stub: pb_grpc.AgentLoopServiceStub, args: argparse.Namespace
                     ) -> dict[str, Any]:
    settings = load_settings(environ={})
    path = ensure_packaged_model(cache_dir(settings))
    # llama-cpp-python's default batch (512 tokens: a batch of 32 texts is two decodes),
    # the engine's threads.
    llm = llama_cpp.Llama(model_path=str(path), embedding=True, pooling_type=1, n_ctx=512,
                          n_batch=512, n_threads=usable_cpus(), n_threads_batch=usable_cpus(),
                          verbose=False)
    tokens = [len(llm.tokenize(text.encode())) for text in texts(args.batch)]
    try:
        pairs: list[tuple[float, float]] = []
        for index in range(args.rounds + 1):  # round 0 warms both paths up and is dropped
            batch = texts(args.batch, index * args.batch)
            if index % 2 == 0:
                direct = on_fresh_thread(direct_texts_per_s, llm, batch)
                through = await gateway_texts_per_s(stub, batch)
            else:
                through = await gateway_texts_per_s(stub, batch)
                direct = on_fresh_thread(direct_texts_per_s, llm, batch)
            if index:
                pairs.append((direct, through))
    finally:
        llm.close()
    return {
        "tokens_per_text": statistics.mean(tokens),
        "direct_texts_per_s": statistics.median(d for d, _ in pairs),
        "gateway_texts_per_s": statistics.median(g for _, g in pairs),
        "ratio": statistics.median(g / d for d, g in pairs),
    }


async def generation_p95(stub: pb_grpc.AgentLoopServiceStub, args: argparse.Namespace) -> float:
    async def user(index: int) -> list[float]:
        return [(await one_stream(stub, PROMPT, args.max_tokens, seed=index * 100 + n + 1)
                 ).latency for n in range(args.requests)]

    latencies = [x for done in await asyncio.gather(*(user(i) for i in range(args.users)))
                 for x in done]
    return percentile(latencies, 95)


async def interference(stub: pb_grpc.AgentLoopServiceStub, args: argparse.Namespace
                       ) -> dict[str, Any]:
    alone = await generation_p95(stub, args)
    stopping = asyncio.Event()
    embedded = 0

    async def embedder(index: int) -> None:
        nonlocal embedded
        round_ = 0
        while not stopping.is_set():
            await stub.Embed(pb.EmbedRequest(texts=texts(args.batch, (index * 1000 + round_)
                                                         * args.batch)), timeout=600)
            embedded += args.batch
            round_ += 1

    tasks = [asyncio.create_task(embedder(i)) for i in range(args.embedders)]
    try:
        started = time.perf_counter()
        shared = await generation_p95(stub, args)
        seconds = time.perf_counter() - started
    finally:
        stopping.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"generation_p95_s_alone": alone, "generation_p95_s_with_embedders": shared,
            "slowdown": shared / alone - 1, "texts_per_s_meanwhile": embedded / seconds}


async def embedded_figures(address: str, args: argparse.Namespace) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AgentLoopServiceStub(channel)
        await stub.Embed(pb.EmbedRequest(texts=texts(2)), timeout=600)  # makes its context
        await one_stream(stub, PROMPT, 4, seed=1)
        log("throughput: gateway vs Llama.embed")
        result = {"throughput": await throughput(stub, args)}
        log(f"interference: {args.users} users generating, {args.embedders} embedding")
        result["interference"] = await interference(stub, args)
    return result


# --- Ollama: the gateway's added latency --------------------------------------------------

@contextmanager
def ollama_gateway(ollama_url: str) -> Iterator[str]:
    proc = subprocess.Popen(
        [AGENTLOOP, "serve", "--listen", "127.0.0.1:0", "--backend", "ollama", "--ollama-url",
         ollama_url, "--log-level", "warning", "--drain-delay", "0", "--shutdown-grace", "1",
         "--metrics-listen", "", "--warm-up", "false"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("agentloop serving on "):
            raise RuntimeError(f"the gateway did not start: {line!r}")
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        address = line.split()[3]
        wait_serving(address, proc, timeout=60)
        yield address
    finally:
        stop(proc)


def ollama_figures(args: argparse.Namespace) -> dict[str, Any]:
    with fake_ollama(tokens=4, token_delay=0.0) as url, ollama_gateway(url) as address, \
            grpc.insecure_channel(address) as channel, httpx.Client(base_url=url) as http:
        stub = pb_grpc.AgentLoopServiceStub(channel)
        text = SENTENCES[0]
        body = {"model": "gemma3n:e2b", "input": [text], "truncate": False, "keep_alive": "5m"}

        def direct() -> float:
            started = time.perf_counter()
            response = http.post("/api/embed", json=body)
            assert len(response.json()["embeddings"]) == 1
            return time.perf_counter() - started

        def through() -> float:
            started = time.perf_counter()
            reply = stub.Embed(pb.EmbedRequest(texts=[text]), timeout=10)
            assert len(reply.embeddings) == 1
            return time.perf_counter() - started

        for _ in range(20):  # warm both paths (connections, the fake's vector cache)
            direct(), through()
        directs, throughs = [], []
        for index in range(args.ollama_calls):
            if index % 2 == 0:
                directs.append(direct())
                throughs.append(through())
            else:
                throughs.append(through())
                directs.append(direct())
    return {"calls": args.ollama_calls, "direct_p50_ms": percentile(directs, 50) * 1e3,
            "gateway_p50_ms": percentile(throughs, 50) * 1e3,
            "added_p50_ms": (percentile(throughs, 50) - percentile(directs, 50)) * 1e3}


# --- the run ------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    log("the embedded engine")
    with embedded_gateway([]) as address:
        embedded = asyncio.run(embedded_figures(address, args))
    log("the Ollama path (the fake Ollama)")
    ollama = ollama_figures(args)
    settings = load_settings(environ={})
    return {
        "benchmark": "Embed: the gateway vs the engine called directly",
        "command": ".venv/bin/python -m bench.bench_embeddings "
                   + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "workload": vars(args),
        "settings": {"embedded_batch_tokens": settings.embedded_batch_tokens,
                     "embedded_embed_share": settings.embedded_embed_share,
                     "embedded_slots": settings.embedded_slots},
        "machine": {"cpus": usable_cpus(), "python": platform.python_version(),
                    "llama_cpp_python": llama_cpp.__version__},
        "goals": GOALS,
        "embedded": embedded,
        "ollama": ollama,
    }


def table(result: dict[str, Any]) -> str:
    workload, embedded = result["workload"], result["embedded"]
    speed, shared, ollama = embedded["throughput"], embedded["interference"], result["ollama"]
    rows = [
        (f"embedded: texts/s, batches of {workload['batch']} texts of "
         f"~{speed['tokens_per_text']:.0f} tokens: gateway / Llama.embed direct",
         f"{speed['gateway_texts_per_s']:.0f} / {speed['direct_texts_per_s']:.0f} = "
         f"{speed['ratio']:.0%}", f">= {GOALS['gateway_over_direct']:.0%}"),
        (f"embedded: {workload['users']} users generating ({workload['max_tokens']} tokens x "
         f"{workload['requests']}) while {workload['embedders']} callers embed: latency P95 "
         "slowdown", f"{shared['generation_p95_s_alone']:.1f} s -> "
         f"{shared['generation_p95_s_with_embedders']:.1f} s = {shared['slowdown']:+.0%} "
         f"({shared['texts_per_s_meanwhile']:.0f} texts/s embedded meanwhile)",
         f"<= +{GOALS['generation_p95_slowdown']:.0%}"),
        ("ollama (fake): Embed of one text, gateway p50 - direct /api/embed p50",
         f"{ollama['gateway_p50_ms']:.2f} - {ollama['direct_p50_ms']:.2f} = "
         f"{ollama['added_p50_ms']:.2f} ms", f"< {GOALS['ollama_added_p50_ms']:g} ms"),
    ]
    lines = ["| figure | measured | goal |", "| --- | ---: | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="texts per Embed call")
    parser.add_argument("--rounds", type=int, default=20, help="paired gateway/direct batches")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--embedders", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="generations per user")
    parser.add_argument("--ollama-calls", type=int, default=400)
    args = parser.parse_args()
    result = run(args)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "embeddings.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\n{result['command']}\nwritten to {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
