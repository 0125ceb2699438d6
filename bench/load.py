"""The load generator: streams against the gateway (gRPC), the fake Ollama or an
OpenAI-compatible server (HTTP).

One process runs `--concurrency` streams. `run_all` starts several such processes when one
cannot keep up, with a common `--start-at` wall-clock time so their windows line up, and
reads one JSON object from each one's stdout.

Modes:
  paced  every stream slot loops (start a stream, read it to the end, again) for
         `--seconds`; slots start spread over `--stagger` seconds so the load is steady.
         Reports the time to first token of the streams that started after `--warmup`.
  burst  all streams start at once and are read to the end, `--rounds` times: tokens/s is
         every token over the wall time of the slowest stream of the round.

Both paths do the same work per token: the direct client reads NDJSON lines with httpx and
parses each one, as the gateway's Ollama backend does; the gRPC client counts the tokens
of a stream from the final message's usage (the gateway may put several tokens in one
message when its reader falls behind).

    python -m bench.load --target grpc --address 127.0.0.1:50051 --mode paced --concurrency 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import grpc
import httpx

from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc

MODEL = "gemma3n:e2b"
PROMPT = "Tell me a story."


@dataclass
class Stream:
    """One finished stream: when it started, seconds to its first token, its tokens."""

    started: float
    ttft: float
    tokens: int


#: Told (started, seconds to the first token) as soon as a stream's first token arrives.
FirstToken = Callable[[float, float], None]


@dataclass
class Outcome:
    ttft_ms: list[float] = field(default_factory=list)
    streams: int = 0
    tokens: int = 0
    all_tokens: int = 0  # every finished stream's, warm-up included (for CPU per token)
    errors: int = 0
    first_error: str = ""
    unfinished: int = 0  # paced: streams still open GRACE seconds after the window (cut)
    seconds: float = 0.0  # burst: wall time of all rounds; paced: the measured window


StreamFn = Callable[[FirstToken], Awaitable[Stream]]
#: Paced mode waits this long after its window for the streams still open, then cuts them
#: (an overloaded level must not stretch the run).
GRACE = 5.0


async def grpc_stream(stub: pb_grpc.AgentLoopServiceStub, max_tokens: int,
                      first: FirstToken) -> Stream:
    options = pb.GenerationOptions(max_tokens=max_tokens) if max_tokens else None
    request = pb.StreamGenerateRequest(prompt=PROMPT, options=options)
    started = time.perf_counter()
    ttft = 0.0
    tokens = 0
    async for message in stub.StreamGenerate(request, timeout=600):
        if not ttft and message.text:
            ttft = time.perf_counter() - started
            first(started, ttft)
        if message.HasField("usage"):
            tokens = message.usage.output_tokens
    return Stream(started, ttft, tokens)


async def http_stream(client: httpx.AsyncClient, max_tokens: int, first: FirstToken
                      ) -> Stream:
    body: dict[str, object] = {"model": MODEL, "prompt": PROMPT, "stream": True}
    if max_tokens:
        body["options"] = {"num_predict": max_tokens}
    started = time.perf_counter()
    ttft = 0.0
    tokens = 0
    async with client.stream("POST", "/api/generate", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line:
                continue
            chunk = json.loads(line)
            if chunk.get("response"):
                if not ttft:
                    ttft = time.perf_counter() - started
                    first(started, ttft)
                tokens += 1
            # Read on to the body's end (as the gateway does), so the connection is reused.
    return Stream(started, ttft, tokens)


async def openai_stream(client: httpx.AsyncClient, max_tokens: int, first: FirstToken
                        ) -> Stream:
    """A raw prompt streamed from an OpenAI-compatible server's /completions, each event
    parsed as the gateway's OpenAI backend does."""
    body: dict[str, object] = {"model": MODEL, "prompt": PROMPT, "stream": True,
                               "stream_options": {"include_usage": True}}
    if max_tokens:
        body["max_tokens"] = max_tokens
    started = time.perf_counter()
    ttft = 0.0
    tokens = 0
    async with client.stream("POST", "completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choices = json.loads(line[5:]).get("choices")
            if choices and choices[0].get("text"):
                if not ttft:
                    ttft = time.perf_counter() - started
                    first(started, ttft)
                tokens += 1
    return Stream(started, ttft, tokens)


async def paced(stream: StreamFn, concurrency: int, seconds: float, warmup: float,
                stagger: float) -> Outcome:
    outcome = Outcome()
    begin = time.perf_counter()
    measure_from, end = begin + warmup, begin + seconds

    def first(started: float, ttft: float) -> None:
        if started >= measure_from:
            outcome.ttft_ms.append(ttft * 1000)

    async def slot(index: int) -> None:
        await asyncio.sleep(stagger * index / concurrency)
        while time.perf_counter() < end:
            try:
                result = await stream(first)
            except Exception as exc:  # counted and reported, the slot goes on
                outcome.errors += 1
                outcome.first_error = outcome.first_error or f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.05)
                continue
            outcome.all_tokens += result.tokens
            if result.started >= measure_from:
                outcome.streams += 1
                outcome.tokens += result.tokens

    slots = [asyncio.create_task(slot(i)) for i in range(concurrency)]
    _, late = await asyncio.wait(slots, timeout=seconds + GRACE)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    outcome.unfinished = len(late)
    outcome.seconds = end - measure_from
    return outcome


def ignore(started: float, ttft: float) -> None:
    """Burst mode reports throughput only."""


async def burst(stream: StreamFn, concurrency: int, rounds: int) -> Outcome:
    outcome = Outcome()
    for _ in range(rounds):
        begin = time.perf_counter()
        results = await asyncio.gather(*(stream(ignore) for _ in range(concurrency)),
                                       return_exceptions=True)
        outcome.seconds += time.perf_counter() - begin
        for result in results:
            if isinstance(result, BaseException):
                outcome.errors += 1
                outcome.first_error = outcome.first_error or repr(result)
            else:
                outcome.streams += 1
                outcome.tokens += result.tokens
                outcome.all_tokens += result.tokens
    return outcome


async def run(args: argparse.Namespace) -> Outcome:
    delay = args.start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    if args.target == "grpc":
        async with grpc.aio.insecure_channel(args.address) as channel:
            stub = pb_grpc.AgentLoopServiceStub(channel)
            return await drive(lambda first: grpc_stream(stub, args.max_tokens, first), args)
    limits = httpx.Limits(max_connections=args.concurrency * 2,
                          max_keepalive_connections=args.concurrency * 2)
    timeout = httpx.Timeout(600.0, connect=10.0, pool=60.0)
    direct = openai_stream if args.target == "openai" else http_stream
    # A base URL ending in "/" keeps its path (/v1) when a relative path is joined.
    async with httpx.AsyncClient(base_url=args.address.rstrip("/") + "/", limits=limits,
                                 timeout=timeout) as client:
        return await drive(lambda first: direct(client, args.max_tokens, first), args)


async def drive(stream: StreamFn, args: argparse.Namespace) -> Outcome:
    if args.mode == "burst":
        return await burst(stream, args.concurrency, args.rounds)
    return await paced(stream, args.concurrency, args.seconds, args.warmup, args.stagger)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=("grpc", "http", "openai"), required=True,
                        help="the gateway, the fake Ollama, or an OpenAI-compatible server")
    parser.add_argument("--address", required=True,
                        help="HOST:PORT (grpc), URL (http), API base with /v1 (openai)")
    parser.add_argument("--mode", choices=("paced", "burst"), default="paced")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--stagger", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=0,
                        help="tokens per stream (0: the fake's and the gateway's default)")
    parser.add_argument("--start-at", type=float, default=0.0, help="time.time() to start at")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    outcome = asyncio.run(run(parse_args(argv)))
    json.dump(asdict(outcome), sys.stdout)


if __name__ == "__main__":
    main()
