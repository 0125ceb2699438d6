"""`make bench`: the gateway against direct calls to the fake Ollama, side by side in one run.

Every figure is measured twice in the same run, once through the gateway (a separate
`agentloop serve` process, gRPC streams from `bench.load` processes on grpc.aio) and once
calling the fake Ollama's HTTP API directly (httpx streaming, the same parsing the
gateway's backend does), so a noisy shared machine hits both alike; the report is the
difference or the ratio.

  ttft        time to first token at 1, 10, 100 and 1,000 concurrent streams, the fake
              producing 20 tokens/s per stream: p50 / p99 direct, through the gateway, added
  throughput  tokens/s one gateway process relays with the fake at full speed, vs direct;
              the gateway's CPU time per relayed token (also at 100 paced streams)
  memory      gateway RSS with 0, 100, 1,000 and 2,000 concurrent streams open, and errors
  embedded    end to end on the embedded engine (bench.bench_embedded), the plan's five
              workloads on it (bench.bench_workloads), and the other bench_*.py of this
              folder when present

Writes bench/results/results.json, bench/results/*.png and the results block of
docs/benchmarks.md (the method and the notes on the results are written by hand there).

    .venv/bin/python -m bench.run_all [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import grpc
import psutil

from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from bench.processes import fake_ollama, stop

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"
GATEWAY_LOG = RESULTS / "processes.log"  # the gateway's and the fake's logs (git-ignored)
BIN = Path(sys.executable).parent
PY = sys.executable

TOKEN_RATE = 20.0  # tokens/s per stream from the fake in the ttft phase
TTFT_LEVELS = (1, 10, 100, 1000)
# Stream length by concurrency: short streams give enough samples at low concurrency; long
# ones keep stream set-up from dominating at high concurrency, as real answers would.
TTFT_TOKENS = {1: 5, 10: 10, 100: 40, 1000: 200}
TTFT_SECONDS = {1: 9.0, 10: 9.0, 100: 9.0, 1000: 12.0}  # measured, per path
TTFT_CHUNKS = 3
MEMORY_LEVELS = (0, 100, 1000, 2000)
STALL = 15.0  # seconds without a new stream streaming that end a memory level's ramp
GOALS = {"ttft_added_p50_ms": 1.0, "ttft_added_p99_ms": 5.0, "tokens_per_s": 20_000,
         "rss_mb_at_2000": 300.0}
BEGIN, END = "<!-- bench:begin (make bench writes this) -->", "<!-- bench:end -->"
PLOTS = ("latency.png", "throughput.png", "memory.png")  # what plots() draws, in order


# --- processes ----------------------------------------------------------------------------


def process_log() -> IO[str]:
    """Where the gateway's and the fake's logs go (appended; git-ignored)."""
    return GATEWAY_LOG.open("a")


@contextmanager
def gateway(ollama_url: str) -> Iterator[tuple[str, psutil.Process]]:
    """`agentloop serve` with its limits raised; yields its address and its process."""
    proc = subprocess.Popen(
        [str(BIN / "agentloop"), "serve", "--listen", "127.0.0.1:0", "--backend", "ollama",
         "--ollama-url", ollama_url, "--max-in-flight", "4096", "--max-queue", "4096",
         "--max-connections", "4096", "--log-level", "warning", "--drain-delay", "0",
         # 1,000 streams share each load process's connection: past the default 256 per
         # connection grpcio's clients race the limit and get REFUSED_STREAM.
         "--max-concurrent-streams", "4096",
         "--shutdown-grace", "1", "--metrics-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=process_log(), text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("agentloop serving on "):
            raise RuntimeError(f"the gateway did not start: {line!r}")
        yield line.split()[3], psutil.Process(proc.pid)
    finally:
        stop(proc)


def load(target: str, address: str, concurrency: int, processes: int = 1,
         **options: Any) -> dict[str, Any]:
    """Run `bench.load` in `processes` processes (concurrency split between them); merge."""
    start_at = time.time() + 1.0  # every process has imported and connected by then
    argv = [PY, "-m", "bench.load", "--target", target, "--address", address,
            "--start-at", str(start_at)]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    procs = [subprocess.Popen([*argv, "--concurrency", str(share)], stdout=subprocess.PIPE,
                              text=True) for share in shares]
    outcomes = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"bench.load failed ({proc.returncode}): {' '.join(argv)}")
        outcomes.append(json.loads(out))
    return {
        "ttft_ms": [v for o in outcomes for v in o["ttft_ms"]],
        "streams": sum(o["streams"] for o in outcomes),
        "tokens": sum(o["tokens"] for o in outcomes),
        "all_tokens": sum(o["all_tokens"] for o in outcomes),
        "errors": sum(o["errors"] for o in outcomes),
        "first_error": next((o["first_error"] for o in outcomes if o["first_error"]), ""),
        "unfinished": sum(o["unfinished"] for o in outcomes),
        "seconds": max(o["seconds"] for o in outcomes),
    }


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def log(message: str) -> None:
    print(message, flush=True)


# --- phases -------------------------------------------------------------------------------


def ttft_phase(quick: bool) -> list[dict[str, Any]]:
    """Time to first token, direct and through the gateway, at each concurrency.

    Each level runs in alternating chunks (direct, gateway, gateway, direct, ...) whose
    samples are pooled, so a burst of load from elsewhere on the machine falls on both."""
    levels = []
    with fake_ollama(max(TTFT_TOKENS.values()), 1 / TOKEN_RATE, stderr=process_log()) as url, \
            gateway(url) as (address, process):
        for concurrency in TTFT_LEVELS:
            tokens = TTFT_TOKENS[concurrency]
            processes = 2 if concurrency >= 1000 else 1
            chunks = 1 if quick or concurrency >= 1000 else TTFT_CHUNKS
            stagger = (tokens - 1) / TOKEN_RATE  # slots start spread over one stream
            window = 2.0 if quick else TTFT_SECONDS[concurrency] / chunks
            common = {"mode": "paced", "seconds": stagger + 1.0 + window,
                      "warmup": stagger + 1.0, "stagger": stagger, "max_tokens": tokens}
            outcomes: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
            cpu, gateway_tokens = 0.0, 0
            for chunk in range(chunks):
                for path in ("direct", "gateway") if chunk % 2 == 0 else ("gateway", "direct"):
                    cpu_before = cpu_seconds(process)
                    if path == "direct":
                        outcome = load("http", url, concurrency, processes, **common)
                    else:
                        outcome = load("grpc", address, concurrency, processes, **common)
                        cpu += cpu_seconds(process) - cpu_before
                        gateway_tokens += outcome["all_tokens"]
                    outcomes[path].append(outcome)
            level: dict[str, Any] = {"concurrency": concurrency, "tokens_per_stream": tokens,
                                     "chunks": chunks}
            for path, runs in outcomes.items():
                level[path] = summarize(merged(runs))
            level["gateway"]["cpu_us_per_token"] = (
                cpu / gateway_tokens * 1e6 if gateway_tokens else None)
            level["added_p50_ms"] = level["gateway"]["p50_ms"] - level["direct"]["p50_ms"]
            level["added_p99_ms"] = level["gateway"]["p99_ms"] - level["direct"]["p99_ms"]
            log(f"ttft c={concurrency}: direct p50 {level['direct']['p50_ms']:.2f} ms "
                f"p99 {level['direct']['p99_ms']:.2f} ms | gateway p50 "
                f"{level['gateway']['p50_ms']:.2f} ms p99 {level['gateway']['p99_ms']:.2f} ms "
                f"| added p50 {level['added_p50_ms']:+.2f} ms p99 {level['added_p99_ms']:+.2f} ms"
                f" | {level['gateway']['streams']} streams | errors "
                f"{level['direct']['errors']}/{level['gateway']['errors']}")
            levels.append(level)
    return levels


def merged(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """Chunks of one path pooled: samples joined, counts and windows added up."""
    return {
        "ttft_ms": [v for o in outcomes for v in o["ttft_ms"]],
        **{key: sum(o[key] for o in outcomes)
           for key in ("streams", "tokens", "all_tokens", "errors", "unfinished", "seconds")},
        "first_error": next((o["first_error"] for o in outcomes if o["first_error"]), ""),
    }


def summarize(outcome: dict[str, Any]) -> dict[str, Any]:
    ttft = outcome["ttft_ms"]
    return {
        "streams": outcome["streams"],
        "p50_ms": percentile(ttft, 50),
        "p99_ms": percentile(ttft, 99),
        "mean_ms": statistics.fmean(ttft) if ttft else float("nan"),
        "tokens_per_s": outcome["tokens"] / outcome["seconds"] if outcome["seconds"] else 0.0,
        "errors": outcome["errors"],
        "first_error": outcome["first_error"],
        "unfinished": outcome["unfinished"],
    }


def throughput_phase(quick: bool) -> dict[str, Any]:
    """Tokens/s with the fake at full speed: the most one gateway process relays."""
    tokens, concurrency, rounds = (1000, 8, 1) if quick else (2000, 16, 3)
    best: dict[str, dict[str, Any]] = {}
    with fake_ollama(tokens, 0.0, stderr=process_log()) as url, gateway(url) as (address, process):
        load("grpc", address, 4, mode="burst", rounds=1, max_tokens=tokens)  # warm up
        for attempt in range(1 if quick else 2):
            order = ("direct", "gateway") if attempt % 2 == 0 else ("gateway", "direct")
            for path in order:
                cpu_before = cpu_seconds(process)
                target, where = ("http", url) if path == "direct" else ("grpc", address)
                outcome = load(target, where, concurrency, mode="burst", rounds=rounds,
                               max_tokens=tokens)
                cpu = cpu_seconds(process) - cpu_before
                rate = outcome["tokens"] / outcome["seconds"]
                run = {"tokens_per_s": rate, "tokens": outcome["tokens"],
                       "errors": outcome["errors"], "first_error": outcome["first_error"]}
                if path == "gateway":
                    run["cpu_us_per_token"] = cpu / outcome["all_tokens"] * 1e6
                    run["gateway_cpu_share"] = cpu / outcome["seconds"]
                log(f"throughput {path}: {rate:,.0f} tokens/s ({outcome['tokens']} tokens,"
                    f" {outcome['errors']} errors)")
                if rate > best.get(path, {}).get("tokens_per_s", 0):
                    best[path] = run
    return {"concurrency": concurrency, "tokens_per_stream": tokens, **best,
            "ratio": best["gateway"]["tokens_per_s"] / best["direct"]["tokens_per_s"]}


async def memory_phase(quick: bool) -> dict[str, Any]:
    """Gateway RSS with N streams open (2 tokens/s each, long), and any error on the way."""
    levels = (0, 100, 200) if quick else MEMORY_LEVELS
    with fake_ollama(100_000, 0.5, poll=0.5, stderr=process_log()) as url, \
            gateway(url) as (address, process):
        points = []
        errors: list[str] = []
        first_tokens = 0
        tasks: list[asyncio.Task[None]] = []
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.AgentLoopServiceStub(channel)
            # One short call first, so "0 streams" is a warm process, not a cold one.
            await stub.ListModels(pb.ListModelsRequest(), timeout=10)

            async def hold() -> None:
                nonlocal first_tokens
                counted = False
                try:
                    async for message in stub.StreamGenerate(
                            pb.StreamGenerateRequest(prompt="hi"), timeout=600):
                        if message.text and not counted:
                            counted = True
                            first_tokens += 1
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.CANCELLED:
                        errors.append(f"{exc.code().name}: {exc.details()}")

            try:
                for level in levels:
                    opened = progress = time.monotonic()
                    # Open them in waves of 100, each streaming before the next, as clients
                    # arriving over time would; give up on a level that stalls.
                    while len(tasks) < level and time.monotonic() < progress + STALL:
                        tasks += [asyncio.create_task(hold())
                                  for _ in range(min(100, level - len(tasks)))]
                        seen = first_tokens
                        while first_tokens < len(tasks) and not errors \
                                and time.monotonic() < progress + STALL:
                            await asyncio.sleep(0.05)
                            if first_tokens > seen:
                                seen, progress = first_tokens, time.monotonic()
                    ramp = time.monotonic() - opened
                    await asyncio.sleep(1.0)  # let allocations settle
                    rss = process.memory_info().rss / 2**20
                    points.append({"streams": level, "rss_mb": rss, "open": first_tokens,
                                   "ramp_seconds": ramp})
                    log(f"memory: {level} streams open ({first_tokens} streaming after "
                        f"{ramp:.1f} s), gateway RSS {rss:.1f} MB, errors {len(errors)}")
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    base = points[0]["rss_mb"]
    top = points[-1]
    return {
        "points": points,
        "errors": len(errors),
        "first_errors": errors[:3],
        "kb_per_stream": (top["rss_mb"] - base) * 1024 / top["open"] if top["open"] else 0,
    }


def other_benchmarks(quick: bool) -> dict[str, Any]:
    """The other bench_*.py modules (embedded engine, telemetry, workers, affinity, tenants,
    workloads, pools, OpenAI backend, embeddings, transport, the one path, cache-aware picks,
    the HTTP door, tool calls) when present: their own JSON."""
    found: dict[str, Any] = {}
    # Small settings: `make bench` must stay within 10 minutes on 2 cores (the embedded
    # engine's own workload: about 4 minutes on a quiet machine).
    runs = {
        "embedded": ["--users", "3", "--requests", "1", "--max-tokens", "16",
                     "--prefix-tokens", "120", "--rounds", "2"] if quick else [],
        "telemetry": ["--requests", "100" if quick else "200", "--rounds", "2" if quick else "3"],
        "workers": ["--seconds", "2" if quick else "3", "--rounds", "1" if quick else "2"],
        "affinity": ["--conversations", "3" if quick else "12", "--turns", "2" if quick else "6",
                     "--max-tokens", "4" if quick else "24"],
        "tenants": ["--flood", "100", "--probes", "10", "--oracle-digits", "2",
                    "--micro-calls", "20000"] if quick else [],
        # The plan's five workloads and the engine's figures under mixed traffic.
        "workloads": ["--quick"] if quick else [],
        # Upstream pools: balancing over endpoints and overflow (fake endpoints).
        "pools": ["--capacity", "4", "--rounds", "2"] if quick else [],
        # The OpenAI-compatible backend: what the gateway adds over calling it directly.
        "openai": ["--quick"] if quick else [],
        "embeddings": ["--batch", "8", "--rounds", "2", "--users", "3", "--embedders", "3",
                       "--requests", "1", "--ollama-calls", "50"] if quick else [],
        "transport": ["--hostile", "20", "--samples", "3"] if quick else [],
        # Background runs: callers that leave, resume, the store's cost, webhooks, a queue.
        "runs": ["--runs", "20", "--tokens", "200", "--queued", "200", "--events", "500"]
        if quick else [],
        # One path for every engine: fairness where the pools are, capacity, the path's cost.
        "one_path": ["--flood", "100", "--probes", "10", "--path-calls", "5000"]
        if quick else [],
        # Cache-aware picks on the caching fake.
        "prefix_routing": ["--calls", "200", "--warmup", "40"] if quick else [],
        # The HTTP door beside the gRPC door.
        "http_door": ["--concurrency", "20", "--seconds", "3", "--rounds", "1"]
        if quick else [],
        # Tool calls on the embedded engine: validity and the grammar's decode speed.
        "tools": ["--prompts", "10", "--rounds", "2", "--max-tokens", "48"] if quick else [],
    }
    # bench_affinity starts three embedded engines and runs 144 generations.
    timeouts = {"affinity": 900, "embedded": 1800, "tenants": 900, "workloads": 2400,
                "embeddings": 900, "transport": 900, "one_path": 900, "tools": 900}
    for name, argv in runs.items():
        if not (ROOT / "bench" / f"bench_{name}.py").exists():
            continue
        log(f"bench_{name}: running")
        started = time.monotonic()
        result = subprocess.run([PY, "-m", f"bench.bench_{name}", *argv], cwd=ROOT,
                                capture_output=True, text=True,
                                timeout=timeouts.get(name, 400))
        out = RESULTS / f"{name}.json"
        if result.returncode != 0:
            log(f"bench_{name} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
            found[name] = {"error": result.stderr.strip()[-500:]}
        elif out.exists():
            found[name] = json.loads(out.read_text())
        log(f"bench_{name}: {time.monotonic() - started:.0f} s")
    return found


# --- report -------------------------------------------------------------------------------


def goals(results: dict[str, Any]) -> dict[str, Any]:
    at_100 = next(level for level in results["ttft"] if level["concurrency"] == 100)
    memory = results["memory"]
    top = memory["points"][-1]
    return {
        "ttft_added_p50_ms_at_100": {"value": at_100["added_p50_ms"],
                                      "goal": f"< {GOALS['ttft_added_p50_ms']}",
                                      "met": at_100["added_p50_ms"] < GOALS["ttft_added_p50_ms"]},
        "ttft_added_p99_ms_at_100": {"value": at_100["added_p99_ms"],
                                      "goal": f"< {GOALS['ttft_added_p99_ms']}",
                                      "met": at_100["added_p99_ms"] < GOALS["ttft_added_p99_ms"]},
        "gateway_tokens_per_s": {
            "value": results["throughput"]["gateway"]["tokens_per_s"],
            "goal": f">= {GOALS['tokens_per_s']}",
            "met": results["throughput"]["gateway"]["tokens_per_s"] >= GOALS["tokens_per_s"]},
        "rss_mb_at_max_streams": {
            "value": top["rss_mb"], "streams": top["streams"],
            "goal": f"< {GOALS['rss_mb_at_2000']} with 2000 streams, no errors",
            "met": top["streams"] >= 2000 and top["rss_mb"] < GOALS["rss_mb_at_2000"]
            and memory["errors"] == 0 and top["open"] == top["streams"]},
    }


def table(results: dict[str, Any]) -> str:
    rows = ["| concurrent streams | direct TTFT p50 / p99 | gateway TTFT p50 / p99 | "
            "added p50 / p99 | tokens/s direct / gateway | errors |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for level in results["ttft"]:
        d, g = level["direct"], level["gateway"]
        rows.append(
            f"| {level['concurrency']:,} | {_ms(d['p50_ms'])} / {_ms(d['p99_ms'])} | "
            f"{_ms(g['p50_ms'])} / {_ms(g['p99_ms'])} | "
            f"{_ms(level['added_p50_ms'], '+')} / {_ms(level['added_p99_ms'], '+')} | "
            f"{d['tokens_per_s']:,.0f} / {g['tokens_per_s']:,.0f} | "
            f"{d['errors'] + g['errors']} |")
    t = results["throughput"]
    memory = results["memory"]
    rss = ", ".join(
        f"{p['streams']:,}: {p['rss_mb']:.0f} MB"
        + (f" ({p['open']:,} streaming)" if p["open"] < p["streams"] else "")
        for p in memory["points"])
    rows += [
        "",
        "| measure | direct | gateway | goal | met |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    g = results["goals"]
    rows += [
        f"| TTFT added at 100 streams, p50 | | {g['ttft_added_p50_ms_at_100']['value']:+.2f} ms |"
        f" < 1 ms | {_yes(g['ttft_added_p50_ms_at_100']['met'])} |",
        f"| TTFT added at 100 streams, p99 | | {g['ttft_added_p99_ms_at_100']['value']:+.2f} ms |"
        f" < 5 ms | {_yes(g['ttft_added_p99_ms_at_100']['met'])} |",
        f"| tokens/s relayed, fake at full speed ({t['concurrency']} streams) | "
        f"{t['direct']['tokens_per_s']:,.0f} | {t['gateway']['tokens_per_s']:,.0f} "
        f"({t['ratio']:.0%}) | >= 20,000 | {_yes(g['gateway_tokens_per_s']['met'])} |",
        f"| gateway CPU per relayed token, full speed / 100 paced streams | | "
        f"{_number(t['gateway']['cpu_us_per_token'])} / "
        f"{_number(_at(results['ttft'], 100)['gateway']['cpu_us_per_token'])} µs | | |",
        f"| gateway RSS by open streams ({memory['kb_per_stream']:.0f} KB per stream) | | "
        f"{rss} | < 300 MB at 2,000, no errors ({memory['errors']} errors) | "
        f"{_yes(g['rss_mb_at_max_streams']['met'])} |",
    ]
    embedded = results["other"].get("embedded", {})
    if "engines" in embedded:
        from bench import bench_embedded  # it imports this module
        rows += ["", "The embedded engine through the gateway, the batched engine beside the "
                 "serial one (one slot, no prefix reuse) in the same run "
                 "(`bench/bench_embedded.py`):",
                 "", bench_embedded.table(embedded), "", f"`{embedded['command']}`"]
    workloads = results["other"].get("workloads", {})
    if "gateway" in workloads:
        from bench import bench_workloads  # it imports this module
        rows += ["", "The plan's five workloads on the embedded engine, requests arriving at "
                 "random moments, and the engine's figures under that traffic "
                 "(`bench/bench_workloads.py`):",
                 "", bench_workloads.tables(workloads), "", f"`{workloads['command']}`"]
    others = [f"`bench/results/{name}.json`" for name, found in results["other"].items()
              if "error" not in found]
    if others:
        rows += ["", f"Also run by `make bench`, with their own results: {', '.join(others)}."]
    return "\n".join(rows)


def _ms(value: float, sign: str = "") -> str:
    """Milliseconds, or "none" when no stream got its first token within the window."""
    return "none" if math.isnan(value) else f"{value:{sign}.2f} ms"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _at(levels: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    return next(level for level in levels if level["concurrency"] == concurrency)


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def plots(results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results["ttft"]
    xs = [level["concurrency"] for level in levels]
    latency, throughput, memory = PLOTS
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for path, color in (("direct", "tab:blue"), ("gateway", "tab:orange")):
        for q, style in (("p50", "-o"), ("p99", "--s")):
            axes.plot(xs, [level[path][f"{q}_ms"] for level in levels], style, color=color,
                      label=f"{path} {q}")
    axes.set(xscale="log", yscale="log", xlabel="concurrent streams",
             ylabel="time to first token (ms)",
             title=f"Time to first token, fake Ollama at {TOKEN_RATE:g} tokens/s per stream")
    axes.set_xticks(xs, [f"{x:,}" for x in xs])
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / latency, dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for path, color in (("direct", "tab:blue"), ("gateway", "tab:orange")):
        # A level where no stream finished in time has no rate (0 would fall off a log axis).
        axes.plot(xs, [level[path]["tokens_per_s"] or math.nan for level in levels], "-o",
                  color=color, label=f"{path}, paced (streams finished in the window)")
        axes.axhline(results["throughput"][path]["tokens_per_s"], color=color, linestyle=":",
                     label=f"{path}, fake at full speed")
    axes.axhline(GOALS["tokens_per_s"], color="grey", linestyle="--", label="goal (gateway)")
    axes.set(xscale="log", yscale="log", xlabel="concurrent streams",
             ylabel="tokens per second delivered", title="Throughput against concurrency")
    axes.set_xticks(xs, [f"{x:,}" for x in xs])
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(RESULTS / throughput, dpi=110)
    plt.close(figure)

    points = results["memory"]["points"]
    figure, axes = plt.subplots(figsize=(7, 4.2))
    axes.plot([p["streams"] for p in points], [p["rss_mb"] for p in points], "-o",
              color="tab:orange", label="gateway RSS")
    axes.axhline(GOALS["rss_mb_at_2000"], color="grey", linestyle="--", label="goal")
    axes.set(xlabel="concurrent streams open", ylabel="RSS (MB)",
             title="Gateway memory against concurrent streams", ylim=(0, None))
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / memory, dpi=110)
    plt.close(figure)
    return list(PLOTS)


def results_block(results: dict[str, Any]) -> str:
    """What `make bench` writes between the markers of docs/benchmarks.md."""
    machine = results["machine"]
    pictures = "\n".join(f"![{name[:-4]}](../bench/results/{name})" for name in PLOTS)
    return "\n".join([
        BEGIN,
        f"Measured by `make bench` on {machine['cpus']} cores ({machine['platform']}, "
        f"Python {machine['python']}) on {results['date']}; the gateway is one `agentloop "
        "serve` process, the load comes from separate processes, and every gateway figure "
        "sits next to the same load sent directly to the fake Ollama in the same run. "
        "Raw numbers: `bench/results/results.json`.",
        "",
        table(results),
        "",
        pictures,
        END,
    ])


def write_results_block(block: str) -> None:
    """Replace the block between the markers of docs/benchmarks.md."""
    text = BENCHMARKS_DOC.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise RuntimeError(f"{BENCHMARKS_DOC} lacks the {BEGIN} and {END} markers")
    head, rest = text.split(BEGIN, 1)
    BENCHMARKS_DOC.write_text(head + block + rest.split(END, 1)[1], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so every `with` stops the processes it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short phases and lower levels (a smoke run; docs untouched)")
    parser.add_argument("--phases", default="ttft,throughput,memory,other",
                        help="comma-separated subset to run (a partial run is a quick run)")
    args = parser.parse_args(argv)
    args.quick = args.quick or args.phases != parser.get_default("phases")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2,000 streams, both ends
    RESULTS.mkdir(parents=True, exist_ok=True)
    GATEWAY_LOG.write_text("")
    started = time.monotonic()

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.machine(),
                    "python": platform.python_version(), "grpcio": grpc.__version__},
    }
    phases = set(args.phases.split(","))
    if "ttft" in phases:
        results["ttft"] = ttft_phase(args.quick)
    if "throughput" in phases:
        results["throughput"] = throughput_phase(args.quick)
    if "memory" in phases:
        results["memory"] = asyncio.run(memory_phase(args.quick))
    results["other"] = other_benchmarks(args.quick) if "other" in phases else {}
    if not args.quick:
        results["goals"] = goals(results)
    results["seconds"] = time.monotonic() - started

    name = "results-quick.json" if args.quick else "results.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2) + "\n")
    if args.quick:
        log(f"quick run written to {RESULTS / name}")
        return 0
    images = plots(results)
    write_results_block(results_block(results))
    log(table(results))
    log(f"\nwritten: {RESULTS / name}, {', '.join(images)}, {BENCHMARKS_DOC.relative_to(ROOT)} "
        f"({results['seconds']:.0f} s)")
    unmet = [name for name, goal in results["goals"].items() if not goal["met"]]
    if unmet:
        log(f"goals not met: {', '.join(unmet)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

