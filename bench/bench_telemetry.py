"""What telemetry costs: the gateway's CPU time per request with OpenTelemetry off and on.

Three `agentloop serve` processes run side by side in front of one fake Ollama (its own
process, answering at full speed):

  off     OTEL_SDK_DISABLED=true
  on      the defaults, as deployed: spans and metrics exported by OTLP/gRPC to a receiver
          in this process, the Prometheus endpoint scraped once per run, one root request
          in ten traced (the gateway's default sampler)
  all     like `on`, every request traced (OTEL_TRACES_SAMPLER=parentbased_always_on)

All three write the JSON request log (the same work in each, so not in the difference).
A round runs the same calls against each in turn (the order rotates from round to round);
a run's cost is the gateway's CPU time (user + system, every thread, from psutil) until
its spans have reached the receiver, divided by its requests. The machine is shared and
noisy, so the overhead reported is the median over rounds of each round's ratio to `off`.

    .venv/bin/python -m bench.bench_telemetry [--requests 400] [--rounds 5]

Writes bench/results/telemetry.json and bench/results/telemetry.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from bench.processes import fake_ollama, free_port, stop

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
AGENTLOOP = str(Path(PY).parent / "agentloop")
#: (RPC, tokens per answer); the fake streams up to 256 and max_tokens cuts it.
WORKLOADS = (("Generate", 64), ("StreamGenerate", 64), ("StreamGenerate", 256))
CONFIGS = ("off", "on", "all")
FAKE_TOKENS = 256


class Receiver(trace_service_pb2_grpc.TraceServiceServicer,
               metrics_service_pb2_grpc.MetricsServiceServicer):
    """An OTLP sink that counts what it gets (one Export serves both services)."""

    def __init__(self) -> None:
        self.spans = 0
        self.metric_exports = 0

    async def Export(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            self.spans += sum(len(scope.spans) for resource in request.resource_spans
                              for scope in resource.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()
        self.metric_exports += 1
        return metrics_service_pb2.ExportMetricsServiceResponse()


@contextmanager
def process(argv: list[str], env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """Start a server process; yield the first line it prints and its pid; stop it."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline(), proc.pid
    finally:
        stop(proc)


def environment(config: str, otlp_endpoint: str) -> dict[str, str]:
    """This process's environment with the OTEL_* variables of `config` only."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    if config == "off":
        env["OTEL_SDK_DISABLED"] = "true"
    else:
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=otlp_endpoint, OTEL_BSP_SCHEDULE_DELAY="200",
                   OTEL_METRIC_EXPORT_INTERVAL="5000", OTEL_SERVICE_NAME="agentloop-bench")
    if config == "all":
        env["OTEL_TRACES_SAMPLER"] = "parentbased_always_on"
    return env


@contextmanager
def gateway(config: str, ollama_url: str, otlp_endpoint: str,
            metrics_port: int) -> Iterator[tuple[str, psutil.Process, int]]:
    env = environment(config, otlp_endpoint)
    argv = [AGENTLOOP, "serve", "--listen", "127.0.0.1:0", "--backend", "ollama",
            "--ollama-url", ollama_url, "--max-in-flight", "256", "--max-queue", "1024",
            "--metrics-listen", f"127.0.0.1:{metrics_port}", "--drain-delay", "0",
            "--shutdown-grace", "1", "--log-level", "info"]
    with process(argv, env) as (banner, pid):
        if not banner.startswith("agentloop serving on "):
            raise RuntimeError(f"the {config} gateway did not start: {banner!r}")
        yield banner.split()[3], psutil.Process(pid), metrics_port


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


async def calls(stub: pb_grpc.AgentLoopServiceStub, rpc: str, tokens: int, requests: int,
                concurrency: int) -> int:
    """Make `requests` calls, `concurrency` at a time; return the tokens received."""
    remaining = requests
    received = 0
    options = pb.GenerationOptions(max_tokens=tokens)

    async def caller() -> None:
        nonlocal remaining, received
        while remaining > 0:
            remaining -= 1
            if rpc == "Generate":
                reply = await stub.Generate(
                    pb.GenerateRequest(prompt="Tell me a story.", options=options), timeout=30)
                received += reply.usage.output_tokens
            else:
                async for message in stub.StreamGenerate(pb.StreamGenerateRequest(
                        prompt="Tell me a story.", options=options), timeout=30):
                    received += message.usage.output_tokens

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return received


async def exported(receiver: Receiver, at_least: int, quiet: float = 0.6,
                   timeout: float = 30.0) -> None:
    """Wait until the receiver has `at_least` spans and no more came for `quiet` seconds
    (the batch processor exports every 200 ms): the round's export is over."""
    deadline = time.monotonic() + timeout
    count, since = receiver.spans, time.monotonic()
    while receiver.spans < at_least or time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{receiver.spans} spans reached the receiver, expected "
                               f"{at_least}")
        await asyncio.sleep(0.05)
        if receiver.spans != count:
            count, since = receiver.spans, time.monotonic()


def label(rpc: str, tokens: int) -> str:
    return f"{rpc}, {tokens} tokens"


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    receiver = Receiver()
    sink = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, sink)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(receiver, sink)
    endpoint = f"http://127.0.0.1:{sink.add_insecure_port('127.0.0.1:0')}"
    await sink.start()
    cpu_us: dict[str, dict[str, list[float]]] = {
        label(*w): {c: [] for c in CONFIGS} for w in WORKLOADS}
    try:
        with fake_ollama(FAKE_TOKENS, 0.0, stderr=subprocess.DEVNULL) as url, \
                ExitStack() as stack:
            gateways = {c: stack.enter_context(gateway(c, url, endpoint, free_port()))
                        for c in CONFIGS}
            channels = {c: grpc.aio.insecure_channel(gateways[c][0]) for c in CONFIGS}
            stubs = {c: pb_grpc.AgentLoopServiceStub(channels[c]) for c in CONFIGS}
            async with httpx.AsyncClient() as scraper:
                for config in CONFIGS:  # warm up: connections, imports, first allocations
                    for rpc, tokens in WORKLOADS:
                        await calls(stubs[config], rpc, tokens, 100, args.concurrency)
                await exported(receiver, 0)
                for round_number in range(args.rounds):
                    for rpc, tokens in WORKLOADS:
                        requests = args.requests
                        shift = round_number % len(CONFIGS)
                        for config in CONFIGS[shift:] + CONFIGS[:shift]:
                            proc, port = gateways[config][1], gateways[config][2]
                            spans_before = receiver.spans
                            before = cpu_seconds(proc)
                            received = await calls(stubs[config], rpc, tokens, requests,
                                                   args.concurrency)
                            # The round's export is part of its cost: wait for it (every
                            # configuration waits alike, so idle work cancels out).
                            await exported(receiver, spans_before + (
                                2 * requests if config == "all" else 0))
                            if config != "off":
                                response = await scraper.get(
                                    f"http://127.0.0.1:{port}/metrics", timeout=10)
                                response.raise_for_status()
                            per_request = (cpu_seconds(proc) - before) / requests * 1e6
                            cpu_us[label(rpc, tokens)][config].append(per_request)
                            print(f"round {round_number + 1} {label(rpc, tokens):>26} "
                                  f"{config:>7}: {per_request:7.1f} µs CPU per request "
                                  f"({received / requests:.0f} tokens)", flush=True)
            for channel in channels.values():
                await channel.close()
        own_work = await fixed_costs(endpoint)
    finally:
        await sink.stop(0)
    summary: dict[str, Any] = {}
    for workload, runs in cpu_us.items():
        row: dict[str, Any] = {"off_us_per_request": round(statistics.median(runs["off"]), 1)}
        for config in CONFIGS[1:]:
            row[f"{config}_us_per_request"] = round(statistics.median(runs[config]), 1)
            row[f"{config}_overhead"] = round(statistics.median(
                [on / off - 1 for on, off in zip(runs[config], runs["off"], strict=True)]), 4)
        row["runs_us"] = runs
        summary[workload] = row
    return {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
            "requests_per_run": args.requests, "rounds": args.rounds,
            "concurrency": args.concurrency, "spans_received": receiver.spans,
            "metric_exports": receiver.metric_exports, "workloads": summary,
            "own_work_us_per_call": own_work}


async def fixed_cost(calls_made: int = 3000) -> float:
    """Telemetry's own work for one Generate call, in this process, in CPU µs (every thread:
    the span export included): the server interceptor around a handler that opens a backend
    call, finishes it and reports the generation, as the generation service does. The
    OTEL_* environment says which configuration."""
    from agentloop.config import load_settings
    from agentloop.domain import (
        BackendHealth,
        FinishReason,
        GenerationEnd,
        GenerationRequest,
        RequestedOptions,
        Timings,
        Usage,
    )
    from agentloop.rpc.telemetry_interceptor import ServerTelemetry
    from agentloop.services.generation import resolve_options
    from agentloop.telemetry import start_telemetry
    from agentloop.upstreams.admission import Admission

    class Engine:
        name, address = "ollama", ("127.0.0.1", 11434)

    class Health:
        ready, last = True, BackendHealth(True)
        served = frozenset({"gemma3n:e2b"})  # the model the calls below name: a real label

    class Context:  # what the interceptor asks of a grpc.aio.ServicerContext
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("user-agent", "bench"),)

        def code(self) -> None:
            return None

    settings = load_settings(environ={}, metrics_listen="")
    telemetry = start_telemetry(settings, Engine(), Admission(4, 4, 1.0), Health())
    request = GenerationRequest(model="gemma3n:e2b", prompt="Tell me a story.",
                                options=resolve_options(RequestedOptions(), settings))
    end = GenerationEnd(FinishReason.STOP, Usage(12, 64), Timings(0.1, time_to_first_token=0.01),
                        "gemma3n:e2b")

    async def generate(_request: Any, _context: Any) -> None:
        with telemetry.backend_call(request) as call:
            call.finish(end)
        telemetry.generation_done(request, end)

    async def continuation(_details: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(generate)

    class Details:
        method = "/agentloop.v1.AgentLoopService/Generate"

    interceptor = ServerTelemetry(telemetry.tracer, telemetry.instruments.rpc_duration)
    handler = await interceptor.intercept_service(continuation, Details())  # type: ignore[arg-type]
    logging.getLogger("agentloop.requests").setLevel(logging.WARNING)  # same in every config
    context = Context()
    for _ in range(200):  # warm up
        await handler.unary_unary(None, context)
    started = time.process_time()
    for _ in range(calls_made):
        await handler.unary_unary(None, context)
    await telemetry.shutdown()  # exports what is left: the export is part of the cost
    return (time.process_time() - started) / calls_made * 1e6


async def fixed_costs(endpoint: str) -> dict[str, float]:
    """`fixed_cost` per configuration, each in a process of its own."""
    costs = {}
    for config in CONFIGS:
        proc = await asyncio.create_subprocess_exec(
            PY, "-m", "bench.bench_telemetry", "--fixed-cost", stdout=asyncio.subprocess.PIPE,
            env=environment(config, endpoint), cwd=ROOT)
        out, _ = await proc.communicate()
        costs[config] = round(json.loads(out), 1)
        print(f"telemetry's own work per call, {config:>3}: {costs[config]:6.1f} µs", flush=True)
    return costs


def table(result: dict[str, Any]) -> str:
    rows = ["| workload | telemetry off | on (default: 1 root call in 10 traced) | "
            "on, every call traced |", "| --- | ---: | ---: | ---: |"]
    for workload, row in result["workloads"].items():
        cells = [f"{row['off_us_per_request']:.0f} µs"]
        for config in CONFIGS[1:]:
            cells.append(f"{row[f'{config}_us_per_request']:.0f} µs "
                         f"({row[f'{config}_overhead']:+.1%})")
        rows.append(f"| {workload} | {' | '.join(cells)} |")
    own = result["own_work_us_per_call"]
    rows.append("| telemetry's own work per call, measured in-process | "
                + " | ".join(f"{own[config]:.0f} µs" for config in CONFIGS) + " |")
    return "\n".join(rows)


def plot(result: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(result["workloads"])
    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    width = 0.27
    colors = {"off": "tab:blue", "on": "tab:orange", "all": "tab:red"}
    for offset, config in enumerate(CONFIGS):
        values = [result["workloads"][w][f"{config}_us_per_request"] for w in workloads]
        bars = axes.bar([i + (offset - 1) * width for i in range(len(workloads))], values,
                        width, color=colors[config], label=f"telemetry {config}")
        axes.bar_label(bars, fmt="%.0f", fontsize="small")
    axes.set_xticks(range(len(workloads)), [w.replace(", ", "\n") for w in workloads])
    axes.set(ylabel="gateway CPU per request (µs)",
             title="Gateway CPU per request: telemetry off, on (default), every call traced")
    axes.legend()
    figure.tight_layout()
    path = RESULTS / "telemetry.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="calls per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--fixed-cost", action="store_true",
                        help="only measure telemetry's own work per call, in this process")
    args = parser.parse_args(argv)
    if args.fixed_cost:
        print(json.dumps(asyncio.run(fixed_cost())))
        return {}
    result = asyncio.run(measure(args))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "telemetry.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"written: {RESULTS / 'telemetry.json'}, {plot(result)}")
    return result


if __name__ == "__main__":
    main()
