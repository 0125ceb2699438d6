"""The OpenAI-compatible backend: what the gateway adds over calling the upstream directly.

One fake OpenAI-compatible server (tests/fake_openai.py, its own process) and one gateway
process on the OpenAI backend in front of it (this module's `gateway` command: the server
started in-process on the backend, on uvloop, as `agentloop serve` runs). Side by side in
one run, the same load (bench.load) calls the fake directly (httpx, each SSE event parsed)
and through the gateway (gRPC StreamGenerate):

  ttft        time to first token at each concurrency (default 100 streams), the fake
              producing 20 tokens/s per stream, in alternating chunks (direct, gateway,
              gateway, direct, ...): p50 / p99 direct, through the gateway, and added
  throughput  tokens/s with the fake at full speed, burst mode, best of two: the gateway's
              rate as a share of direct

Goals (issue 21): added p50 < 1 ms and p99 < 5 ms at 100 streams; throughput >= 90 %.

    .venv/bin/python -m bench.bench_openai [--levels 1,10,100] [--quick]

Writes bench/results/openai.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from bench.processes import fake_openai, stop
from bench.run_all import (
    RESULTS,
    TOKEN_RATE,
    TTFT_CHUNKS,
    cpu_seconds,
    load,
    log,
    merged,
    process_log,
    summarize,
)

MODEL = "gemma3n:e2b"  # what bench.load asks for
TOKENS_AT = {1: 5, 10: 10, 100: 40, 1000: 200}  # tokens per stream by concurrency (run_all's)
WINDOW = 9.0  # measured seconds per path and level
GOALS = {"added_p50_ms": 1.0, "added_p99_ms": 5.0, "throughput_ratio": 0.9}


@contextmanager
def gateway(url: str) -> Iterator[tuple[str, psutil.Process]]:
    """The gateway on the OpenAI backend as its own process; yields its address."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.bench_openai", "gateway", url],
                            stdout=subprocess.PIPE, stderr=process_log(), text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("agentloop serving on "):
            raise RuntimeError(f"the gateway did not start: {line!r}")
        yield line.split()[3], psutil.Process(proc.pid)
    finally:
        stop(proc)


def serve_gateway(url: str) -> None:
    """`python -m bench.bench_openai gateway URL`: serve on the OpenAI backend until SIGTERM,
    with run_all's raised limits."""
    import uvloop

    from agentloop.backends.openai import OpenAIBackend
    from agentloop.config import load_settings
    from agentloop.server import serve
    from agentloop.telemetry.logs import setup_logging
    from agentloop.upstreams.spec import EndpointSpec

    settings = load_settings(
        environ={}, listen="127.0.0.1:0", model=MODEL, max_in_flight=4096, max_queue=4096,
        max_connections=4096, log_level="warning", drain_delay=0.0, shutdown_grace=1.0,
        metrics_listen="127.0.0.1:0", warm_up=False)
    spec = EndpointSpec(upstream="bench", kind="openai", url=url, max_in_flight=4096)
    setup_logging(settings.log_level, 0)
    uvloop.run(serve(settings, OpenAIBackend(spec, settings)))


def ttft_level(url: str, address: str, process: psutil.Process, concurrency: int,
               quick: bool) -> dict[str, Any]:
    """One concurrency: direct and gateway in alternating chunks, samples pooled."""
    tokens = TOKENS_AT.get(concurrency, 40)
    chunks = 1 if quick else TTFT_CHUNKS
    stagger = (tokens - 1) / TOKEN_RATE  # slots start spread over one stream
    window = 2.0 if quick else WINDOW / chunks
    common = {"mode": "paced", "seconds": stagger + 1.0 + window, "warmup": stagger + 1.0,
              "stagger": stagger, "max_tokens": tokens}
    processes = 2 if concurrency >= 1000 else 1
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
    cpu, relayed = 0.0, 0
    for chunk in range(chunks):
        for path in ("direct", "gateway") if chunk % 2 == 0 else ("gateway", "direct"):
            before = cpu_seconds(process)
            target, where = ("openai", url) if path == "direct" else ("grpc", address)
            outcome = load(target, where, concurrency, processes, **common)
            if path == "gateway":
                cpu += cpu_seconds(process) - before
                relayed += outcome["all_tokens"]
            runs[path].append(outcome)
    level: dict[str, Any] = {"concurrency": concurrency, "tokens_per_stream": tokens}
    for path, outcomes in runs.items():
        level[path] = summarize(merged(outcomes))
    level["gateway"]["cpu_us_per_token"] = cpu / relayed * 1e6 if relayed else None
    level["added_p50_ms"] = level["gateway"]["p50_ms"] - level["direct"]["p50_ms"]
    level["added_p99_ms"] = level["gateway"]["p99_ms"] - level["direct"]["p99_ms"]
    log(f"ttft c={concurrency}: direct p50 {level['direct']['p50_ms']:.2f} ms p99 "
        f"{level['direct']['p99_ms']:.2f} ms | gateway p50 {level['gateway']['p50_ms']:.2f} ms "
        f"p99 {level['gateway']['p99_ms']:.2f} ms | added p50 {level['added_p50_ms']:+.2f} ms "
        f"p99 {level['added_p99_ms']:+.2f} ms | errors {level['direct']['errors']}/"
        f"{level['gateway']['errors']}")
    return level


def throughput(quick: bool) -> dict[str, Any]:
    """Tokens/s with the fake at full speed, direct and through the gateway."""
    tokens, concurrency, rounds = (500, 8, 1) if quick else (2000, 16, 3)
    best: dict[str, dict[str, Any]] = {}
    with fake_openai(tokens, 0.0, MODEL, stderr=process_log()) as url, \
            gateway(url) as (address, _):
        load("grpc", address, 4, mode="burst", rounds=1, max_tokens=tokens)  # warm up
        for attempt in range(1 if quick else 2):
            for path in ("direct", "gateway") if attempt % 2 == 0 else ("gateway", "direct"):
                target, where = ("openai", url) if path == "direct" else ("grpc", address)
                outcome = load(target, where, concurrency, mode="burst", rounds=rounds,
                               max_tokens=tokens)
                rate = outcome["tokens"] / outcome["seconds"]
                log(f"throughput {path}: {rate:,.0f} tokens/s ({outcome['errors']} errors)")
                if rate > best.get(path, {}).get("tokens_per_s", 0):
                    best[path] = {"tokens_per_s": rate, "errors": outcome["errors"],
                                  "first_error": outcome["first_error"]}
    return {"concurrency": concurrency, "tokens_per_stream": tokens, **best,
            "ratio": best["gateway"]["tokens_per_s"] / best["direct"]["tokens_per_s"]}


def table(results: dict[str, Any]) -> str:
    rows = ["| streams | direct p50 / p99 | gateway p50 / p99 | added p50 / p99 | errors |",
            "| --- | --- | --- | --- | --- |"]
    for level in results["ttft"]:
        direct, through = level["direct"], level["gateway"]
        rows.append(
            f"| {level['concurrency']} | {direct['p50_ms']:.2f} / {direct['p99_ms']:.2f} ms | "
            f"{through['p50_ms']:.2f} / {through['p99_ms']:.2f} ms | "
            f"{level['added_p50_ms']:+.2f} / {level['added_p99_ms']:+.2f} ms "
            f"(goal < {GOALS['added_p50_ms']:g} / {GOALS['added_p99_ms']:g}) | "
            f"{direct['errors']} / {through['errors']} |")
    speed = results["throughput"]
    rows += ["", f"Full speed: direct {speed['direct']['tokens_per_s']:,.0f} tokens/s, gateway "
             f"{speed['gateway']['tokens_per_s']:,.0f} tokens/s = {speed['ratio']:.0%} of direct "
             f"(goal >= {GOALS['throughput_ratio']:.0%})."]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gateway"]:
        serve_gateway(argv[1])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="100", help="concurrencies, comma-separated")
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke run)")
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.levels.split(",")]
    results: dict[str, Any] = {"ttft": []}
    with fake_openai(max(TOKENS_AT.get(c, 40) for c in levels), 1 / TOKEN_RATE, MODEL,
                     stderr=process_log()) as url, gateway(url) as (address, process):
        for concurrency in levels:
            results["ttft"].append(ttft_level(url, address, process, concurrency, args.quick))
    results["throughput"] = throughput(args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "openai.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
