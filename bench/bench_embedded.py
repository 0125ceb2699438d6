"""Streaming through the gateway vs calling llama-cpp-python directly, in one process.

Every path runs the same GGUF with the same settings (context, threads, sampling, seed) on
the same prompt, streaming: "direct" is `Llama.create_completion(stream=True)` on a model
opened exactly as the embedded engine opens it, called on a fresh thread per run like the
engine's generations (see `on_fresh_thread`); "gateway" is StreamGenerate over a real
gRPC channel to a gateway on the embedded engine in this process; "engine" is that
engine's own stream without gRPC (what the gRPC layer costs on its own). Runs alternate
(direct, engine, gateway, then gateway, engine, direct, ...) after one warm-up round, so
drift on a shared machine hits every path alike. The same seed gives the same text on
every path, which the run checks. The headline ratio is the median over rounds of
gateway/direct tokens/s, each pair measured in the same round; the medians and the best
run of each path are reported too.

tokens/s is end to end: output tokens / (last token - request sent), so it includes the
time to first token. "steady tokens/s" is 1 / the median time between two deltas over all
runs of a path: on a shared machine, bursts of load from other processes move it much less
than they move whole runs, while a per-token cost of the gateway would still show in it.

    .venv/bin/python -m bench.bench_embedded [--rounds 16] [--max-tokens 128]

Writes bench/results/embedded.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import llama_cpp

from agentloop.backends.embedded import EmbeddedBackend
from agentloop.backends.llama_engine import open_llama
from agentloop.config import load_settings
from agentloop.domain import GenerationRequest, RequestedOptions
from agentloop.server import RunningServer, start_server
from agentloop.services.generation import resolve_options
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Once upon a time, in a small village by the sea, there lived"


@dataclass
class Run:
    path: str
    seed: int
    tokens: int
    seconds: float
    ttft: float
    finish: str
    text: str
    gaps: list[float] = field(default_factory=list, repr=False)  # between text arrivals

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.tokens - 1) / max(self.seconds - self.ttft, 1e-9)


def on_fresh_thread(function: Callable[..., Run], *args: object) -> Run:
    """Run `function` on a new thread, as the engine runs each generation.

    llama.cpp's OpenMP threads spin or sleep between tokens depending on how many OpenMP
    threads the process has. On the main thread of this process, under load from other
    processes, the direct path spun itself down to 3-10 tokens/s where the engine's worker
    threads kept 30-40; the same thread layout on both paths compares the paths, not that.
    """
    results: list[Run] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(function(*args))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="bench-direct")
    thread.start()
    thread.join()  # the gateway is idle meanwhile: blocking its loop costs nothing
    if errors:
        raise errors[0]
    return results[0]


def direct_run(llm: llama_cpp.Llama, settings, prompt: str, max_tokens: int, seed: int) -> Run:
    """llama-cpp-python's own streaming API, sampling exactly as the engine does."""
    sampled = 0

    def count(_ids: object, _logits: object) -> bool:  # called once per sampled token
        nonlocal sampled
        sampled += 1
        return False

    llm.reset()  # the engine evaluates the whole prompt every time, so does this path
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    pieces: list[str] = []
    arrivals: list[float] = []
    finish = ""
    started = time.perf_counter()
    for chunk in llm.create_completion(
        tokens, max_tokens=max_tokens, temperature=settings.temperature,
        top_p=settings.top_p, top_k=settings.top_k, min_p=0.0,
        repeat_penalty=settings.repeat_penalty, seed=seed, stream=True,
        stopping_criteria=llama_cpp.StoppingCriteriaList([count]),
    ):
        choice = chunk["choices"][0]
        if choice["text"]:
            arrivals.append(time.perf_counter())
            pieces.append(choice["text"])
        finish = choice["finish_reason"] or finish
    ended = time.perf_counter()
    # create_completion asks the criteria once more after its loop; an end-of-turn token
    # is sampled but not part of the output.
    produced = sampled - 1 - (finish == "stop")
    return finished_run("direct", seed, produced, started, ended, arrivals, finish, pieces)


async def gateway_run(stub: pb_grpc.AgentLoopServiceStub, prompt: str, max_tokens: int,
                      seed: int) -> Run:
    request = pb.StreamGenerateRequest(
        prompt=prompt, options=pb.GenerationOptions(max_tokens=max_tokens, seed=seed))
    pieces: list[str] = []
    arrivals: list[float] = []
    last = None
    started = time.perf_counter()
    async for message in stub.StreamGenerate(request, timeout=600):
        if message.text:
            arrivals.append(time.perf_counter())
            pieces.append(message.text)
        last = message
    ended = time.perf_counter()
    assert last is not None
    finish = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    return finished_run("gateway", seed, last.usage.output_tokens, started, ended, arrivals,
                        finish, pieces)


async def engine_run(engine: EmbeddedBackend, settings, prompt: str, max_tokens: int,
                     seed: int) -> Run:
    """The engine's own stream, in process: the gateway's path without gRPC and admission."""
    request = GenerationRequest(
        model=engine.default_model, prompt=prompt,
        options=resolve_options(RequestedOptions(max_tokens=max_tokens, seed=seed), settings))
    pieces: list[str] = []
    arrivals: list[float] = []
    end = None
    started = time.perf_counter()
    async with aclosing(engine.stream(request)) as items:
        async for item in items:
            if isinstance(item, str):
                arrivals.append(time.perf_counter())
                pieces.append(item)
            else:
                end = item
    ended = time.perf_counter()
    assert end is not None
    return finished_run("engine", seed, end.usage.output_tokens, started, ended, arrivals,
                        end.finish_reason.name.lower(), pieces)


def finished_run(path: str, seed: int, tokens: int, started: float, ended: float,
                 arrivals: list[float], finish: str, pieces: list[str]) -> Run:
    first = arrivals[0] if arrivals else ended
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return Run(path, seed, tokens, ended - started, first - started, finish, "".join(pieces),
               gaps)


def summarize(runs: list[Run]) -> dict[str, float]:
    return {
        "runs": len(runs),
        "tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
        "best_tokens_per_s": max(r.tokens_per_s for r in runs),
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
        "ttft_ms": statistics.median(r.ttft for r in runs) * 1000,
        # The typical time between two deltas over every run: bursts of load from other
        # processes move it far less than they move a whole run.
        "steady_tokens_per_s": 1 / statistics.median(g for r in runs for g in r.gaps),
        "tokens": statistics.median(r.tokens for r in runs),
    }


LABELS = {
    "direct": "llama-cpp-python direct (create_completion, stream=True)",
    "engine": "embedded engine in process (no gRPC)",
    "gateway": "gateway StreamGenerate (real channel)",
}


def paired_ratio(rounds: list[dict[str, Run]], path: str, base: str) -> float:
    """The median over rounds of path/base tokens/s, each pair measured back to back."""
    return statistics.median(r[path].tokens_per_s / r[base].tokens_per_s for r in rounds)


def table(result: dict[str, object]) -> str:
    summary: dict[str, dict[str, float]] = result["summary"]  # type: ignore[assignment]
    ratios: dict[str, dict[str, float]] = result["ratios"]  # type: ignore[assignment]
    rows = [
        "| path | tokens/s (median run) | tokens/s (best run) | steady tokens/s | "
        "time to first token (ms) | tokens/run |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in LABELS.items():
        s = summary[name]
        rows.append(f"| {label} | {s['tokens_per_s']:.1f} | {s['best_tokens_per_s']:.1f} | "
                    f"{s['steady_tokens_per_s']:.1f} | {s['ttft_ms']:.1f} | {s['tokens']:.0f} |")
    for name in ("direct", "engine"):
        r = ratios[f"gateway/{name}"]
        rows.append(
            f"| gateway / {name} | {r['paired_median']:.1%} (paired rounds) | {r['best']:.1%} | "
            f"{r['steady']:.1%} | {r['ttft_ms_difference']:+.1f} ms | |")
    return "\n".join(rows)


async def bench(rounds: int, max_tokens: int, prompt: str) -> dict[str, object]:
    settings = load_settings(environ={}, listen="127.0.0.1:0", backend="embedded",
                             drain_delay=0.0, warm_up=False, log_level="warning")
    engine = EmbeddedBackend(settings)
    running: RunningServer = await start_server(settings, backend=engine)
    try:
        llm = open_llama(engine.model_path, engine.context_size, os.cpu_count() or 1)
        rounds_done: list[dict[str, Run]] = []
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = pb_grpc.AgentLoopServiceStub(channel)
            for index in range(rounds + 1):  # round 0 warms every path up and is dropped
                seed = index + 1
                order = list(LABELS) if index % 2 == 0 else list(reversed(LABELS))
                done: dict[str, Run] = {}
                for path in order:
                    if path == "direct":
                        done[path] = on_fresh_thread(
                            direct_run, llm, settings, prompt, max_tokens, seed)
                    elif path == "engine":
                        done[path] = await engine_run(engine, settings, prompt, max_tokens, seed)
                    else:
                        done[path] = await gateway_run(stub, prompt, max_tokens, seed)
                if index:
                    rounds_done.append(done)
                print(f"round {index}{' (warm-up)' if not index else ''}: " + ", ".join(
                    f"{path} {done[path].tokens_per_s:.1f} tok/s" for path in LABELS)
                    + f"; same text: {len({r.text for r in done.values()}) == 1}", flush=True)
        llm.close()
    finally:
        await running.shutdown(grace=1.0, drain_delay=0.0)
    summary = {path: summarize([done[path] for done in rounds_done]) for path in LABELS}
    ratios = {
        f"gateway/{base}": {
            "paired_median": paired_ratio(rounds_done, "gateway", base),
            "of_medians": summary["gateway"]["tokens_per_s"] / summary[base]["tokens_per_s"],
            "best": summary["gateway"]["best_tokens_per_s"] / summary[base]["best_tokens_per_s"],
            "decode_median": summary["gateway"]["decode_tokens_per_s"]
            / summary[base]["decode_tokens_per_s"],
            "steady": summary["gateway"]["steady_tokens_per_s"]
            / summary[base]["steady_tokens_per_s"],
            "ttft_ms_difference": summary["gateway"]["ttft_ms"] - summary[base]["ttft_ms"],
        }
        for base in ("direct", "engine")
    }
    return {
        "benchmark": "embedded engine: gateway StreamGenerate vs llama-cpp-python direct",
        "model": engine.default_model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "settings": {"num_ctx": engine.context_size, "threads": os.cpu_count(),
                     "temperature": settings.temperature, "top_p": settings.top_p,
                     "top_k": settings.top_k, "repeat_penalty": settings.repeat_penalty},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "llama_cpp_python": llama_cpp.__version__},
        "summary": summary,
        # The figure: gateway tokens/s over direct llama-cpp-python tokens/s.
        "ratio_tokens_per_s": ratios["gateway/direct"]["paired_median"],
        "ratios": ratios,
        "same_text_every_round": all(
            len({r.text for r in done.values()}) == 1 for done in rounds_done),
        "runs": [{**asdict(r), "tokens_per_s": r.tokens_per_s}
                 for done in rounds_done for r in done.values()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args()
    result = asyncio.run(bench(args.rounds, args.max_tokens, args.prompt))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "embedded.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(result))
    print(f"\nratio (tokens/s, gateway / direct, median of paired rounds): "
          f"{result['ratio_tokens_per_s']:.1%}; same text on every path: "
          f"{result['same_text_every_round']}; written to {out}")


if __name__ == "__main__":
    main()
