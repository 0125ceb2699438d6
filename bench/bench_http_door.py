"""The HTTP door beside the gRPC door: one gateway, one fake upstream, both doors in one run.

Issue 33's figures for the OpenAI-compatible door, each measured through both doors of the
same gateway process (`agentloop serve --http-listen`), in front of the fake Ollama (its
own process), by clients in this process that do the same work per event (the gRPC stub
reads messages; the HTTP client reads Server-Sent Events and parses each one, as the
SDKs do). Rounds alternate which door goes first, so drift favours neither:

- added time to first token: `--concurrency` streams (100) kept open for `--seconds`, the
  fake sending `--tokens` tokens `--token-delay` apart; the figure is the door's median
  time to first token minus gRPC's (goal: under 1 ms);
- relay tokens/s: `--concurrency` streams started at once, `--burst-tokens` tokens each as
  fast as the fake sends them; the figure is the door's tokens/s over gRPC's (goal: 0.9
  or more).

Both doors call the same `POST /v1/completions` / `StreamGenerate` with a prompt, so the
fake does the same work for each.

    .venv/bin/python -m bench.bench_http_door                 # the full run
    .venv/bin/python -m bench.bench_http_door --concurrency 4 --seconds 2 --warmup 0.5 \\
        --rounds 1 --burst-tokens 50 --out /tmp/http_door.json  # a smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from bench.load import (
    MODEL,
    PROMPT,
    FirstToken,
    Outcome,
    Stream,
    StreamFn,
    burst,
    grpc_stream,
    paced,
)
from bench.processes import fake_ollama, free_port, stop

RESULTS = Path(__file__).resolve().parent / "results" / "http_door.json"
AGENTLOOP = str(Path(sys.executable).parent / "agentloop")
DOORS = ("grpc", "http")


@contextmanager
def gateway(ollama_url: str) -> Iterator[tuple[str, str]]:
    """`agentloop serve` with both doors and its limits raised: (gRPC address, API base)."""
    http = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [AGENTLOOP, "serve", "--listen", "127.0.0.1:0", "--http-listen", http,
         "--backend", "ollama", "--ollama-url", ollama_url, "--max-in-flight", "4096",
         "--max-queue", "4096", "--max-connections", "4096",
         "--http-connections-per-peer", "4096", "--max-concurrent-streams", "4096",
         "--log-level", "warning", "--drain-delay", "0", "--shutdown-grace", "1",
         "--metrics-listen", ""],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("agentloop serving on "):
            raise RuntimeError(f"the gateway did not start: {line!r}")
        yield line.split()[3], f"http://{http}/v1"
    finally:
        stop(proc)


async def door_stream(session: aiohttp.ClientSession, url: str, max_tokens: int,
                      first: FirstToken) -> Stream:
    """One streamed completion through the HTTP door; tokens from its usage chunk (the door
    joins deltas when the client falls behind, as StreamGenerate does)."""
    body = {"model": MODEL, "prompt": PROMPT, "stream": True, "max_tokens": max_tokens,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft = 0.0
    tokens = 0
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            choices = event["choices"]
            if not ttft and choices and choices[0]["text"]:
                ttft = time.perf_counter() - started
                first(started, ttft)
    return Stream(started, ttft, tokens)


async def measure(door: str, stream: StreamFn, args: argparse.Namespace,
                  phase: str) -> Outcome:
    if phase == "ttft":
        return await paced(stream, args.concurrency, args.seconds, args.warmup, args.stagger)
    return await burst(stream, args.concurrency, 1)


async def run_rounds(address: str, api: str, args: argparse.Namespace, phase: str,
                     max_tokens: int) -> dict[str, Outcome]:
    outcomes = {door: Outcome() for door in DOORS}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with grpc.aio.insecure_channel(address) as channel, \
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        stub = pb_grpc.AgentLoopServiceStub(channel)
        streams: dict[str, StreamFn] = {
            "grpc": lambda first: grpc_stream(stub, max_tokens, first),
            "http": lambda first: door_stream(session, f"{api}/completions", max_tokens,
                                              first),
        }
        for round_ in range(args.rounds):
            for door in (DOORS if round_ % 2 == 0 else DOORS[::-1]):
                merge(outcomes[door], await measure(door, streams[door], args, phase))
    return outcomes


def merge(into: Outcome, outcome: Outcome) -> None:
    into.ttft_ms += outcome.ttft_ms
    into.streams += outcome.streams
    into.tokens += outcome.tokens
    into.errors += outcome.errors
    into.first_error = into.first_error or outcome.first_error
    into.seconds += outcome.seconds


def summary(ttft: dict[str, Outcome], relay: dict[str, Outcome]) -> dict[str, Any]:
    doors: dict[str, Any] = {}
    for door in DOORS:
        times = ttft[door].ttft_ms
        doors[door] = {
            "ttft_p50_ms": statistics.median(times) if times else None,
            "ttft_p99_ms": statistics.quantiles(times, n=100)[98] if len(times) > 1 else None,
            "ttft_streams": ttft[door].streams,
            "relay_tokens_per_s": relay[door].tokens / relay[door].seconds
            if relay[door].seconds else None,
            "errors": ttft[door].errors + relay[door].errors,
            "first_error": ttft[door].first_error or relay[door].first_error,
        }
    grpc_, http = doors["grpc"], doors["http"]
    added = (http["ttft_p50_ms"] - grpc_["ttft_p50_ms"]
             if http["ttft_p50_ms"] is not None and grpc_["ttft_p50_ms"] is not None else None)
    ratio = (http["relay_tokens_per_s"] / grpc_["relay_tokens_per_s"]
             if http["relay_tokens_per_s"] and grpc_["relay_tokens_per_s"] else None)
    return {"doors": doors, "added_ttft_p50_ms": added, "relay_ratio": ratio}


def table(result: dict[str, Any]) -> str:
    rows = ["| door | TTFT p50 (ms) | TTFT p99 (ms) | relay tokens/s | errors |",
            "| --- | --- | --- | --- | --- |"]
    for door, figures in result["doors"].items():
        rows.append(f"| {door} | {_num(figures['ttft_p50_ms'])} | "
                    f"{_num(figures['ttft_p99_ms'])} | {_num(figures['relay_tokens_per_s'], 0)} "
                    f"| {figures['errors']} |")
    rows.append("")
    rows.append(f"HTTP door's added TTFT p50: {_num(result['added_ttft_p50_ms'])} ms "
                "(goal < 1 ms); relay tokens/s HTTP / gRPC: "
                f"{_num(result['relay_ratio'], 3)} (goal >= 0.9)")
    return "\n".join(rows)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with fake_ollama(args.tokens, args.token_delay) as url, gateway(url) as (address, api):
        ttft = await run_rounds(address, api, args, "ttft", args.tokens)
    # The relay: tokens as fast as the fake sends them (a fake of its own: another count).
    with fake_ollama(args.burst_tokens, 0.0) as url, gateway(url) as (address, api):
        relay = await run_rounds(address, api, args, "relay", args.burst_tokens)
    result = summary(ttft, relay)
    result["arguments"] = vars(args)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="each TTFT phase's length (per door and round)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--stagger", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per TTFT stream")
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--burst-tokens", type=int, default=1000,
                        help="tokens per relay stream, sent as fast as the fake can")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(table(result))


if __name__ == "__main__":
    main()
