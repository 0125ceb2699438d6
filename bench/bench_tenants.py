"""Tenants, side by side in one run: fair queuing on and off, priorities under a flood, cache
isolation and the digit oracle on the embedded engine, and the admission path's cost.

- fairness: `agentloop serve` on the fake Ollama (its own process) with admission at 4
  slots and three tenants (keys file). Tenant B sends `--probes` calls one after another,
  alone, then while tenant A's `--flood` calls (sent at once, lengths varied so the slots do
  not finish in step) wait; the same with `--fair-queuing false` (first come, first
  served). Reported: B's latency p50 / p95 / max, and p95 under the flood / p95 alone.
- priorities: the same flood with `--critical-reserve` slots kept for critical calls;
  tenant C sends `x-agentloop-priority: critical` calls one after another, alone and under
  the flood: p95 under the flood / p95 alone.
- cache isolation (embedded engine): A sends a prompt, then B the same prompt twice: the
  cached input tokens of each (B's first must be 0, its repeat all but one token).
- digit oracle (embedded engine): a victim's prompt carries "vault code: 58213"; a prober
  sends the known prefix plus each guessed digit (the victim calling again before every
  guess, which keeps its prefix in a slot) and keeps the digit that reads the most cached
  tokens, position by position. Run as another tenant (isolated) and, as the control, with
  a key of the victim's own tenant (one cache scope): digits recovered, calls, seconds.
- admission cost (in process): `Admission.slot` entered and left, free slot, with tenants
  off (no tenant) and on (a named tenant with a weight, requests and tokens per minute, a
  concurrency limit, input paid at admission, output counted and settled), plus
  `call_context` off and on and the edge's handler that carries the tenant; microseconds
  per call.

    .venv/bin/python -m bench.bench_tenants [--flood 400] [--probes 20] [--rounds 1]

Writes bench/results/tenants.json and prints a Markdown table. A smoke run:
`--flood 40 --probes 5 --micro-calls 2000 --oracle-digits 2`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from agentloop.domain import CallContext, Usage
from agentloop.rpc.edge import admitted
from agentloop.rpc.requests import call_context
from agentloop.services.quotas import Quotas
from agentloop.tenants import RESOLVED_TENANT, Tenant
from agentloop.upstreams.admission import Admission
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from bench.bench_workers import wait_serving
from bench.processes import fake_ollama, free_port, stop

RESULTS = Path(__file__).resolve().parent / "results"
AGENTLOOP = str(Path(sys.executable).parent / "agentloop")
TENANTS = """\
tenants:
  a:
    keys: [a-key]
  b:
    keys: [b-key]
  c:
    keys: [c-key]
  victim:
    keys: [victim-key, victim-colleague-key]
  prober:
    keys: [prober-key]
"""
SECRET = "58213"
MEMO = ("Internal memo for the night shift. Lock the loading dock at ten and check the "
        "cameras twice. The vault code: ")


def metadata(key: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"), *extra)


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[94] if len(values) > 1 \
        else values[0]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "p95": p95(values), "max": max(values),
            "n": len(values)}


def serve(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = subprocess.Popen([AGENTLOOP, "serve", "--listen", address, "--metrics-listen", "",
                             "--drain-delay", "0", "--log-level", "warning", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(address, proc, timeout=120)
    except BaseException:
        stop(proc)
        raise
    return proc, address


# --- fairness and priorities on the fake Ollama ---------------------------------------------

async def probe(stub: pb_grpc.AgentLoopServiceStub, key: str, count: int, max_tokens: int,
                *extra: tuple[str, str]) -> list[float]:
    """`count` calls one after another: each one's latency in seconds."""
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        await stub.Generate(pb.GenerateRequest(
            prompt=f"probe {i}", options=pb.GenerationOptions(max_tokens=max_tokens)),
            metadata=metadata(key, *extra), timeout=600)
        latencies.append(time.perf_counter() - started)
    return latencies


async def under_flood(address: str, args: argparse.Namespace, key: str,
                      *extra: tuple[str, str]) -> dict[str, Any]:
    """Probes alone, then while A's flood waits; the flood's unfinished calls are cancelled
    once the probes are done."""
    # Four connections (channels with the same target share one unless told not to): the
    # flood stays under the server's streams per connection (--max-concurrent-streams).
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(4)]
    try:
        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        stubs = [pb_grpc.AgentLoopServiceStub(channel) for channel in channels]
        alone = await probe(stubs[0], key, args.probes, args.tokens, *extra)
        lengths = random.Random(7)
        flood = [asyncio.ensure_future(stubs[1 + i % 3].Generate(pb.GenerateRequest(
            prompt=f"flood {i}", options=pb.GenerationOptions(
                max_tokens=lengths.randint(args.tokens // 2, args.tokens * 3 // 2))),
            metadata=metadata("a-key"), timeout=600)) for i in range(args.flood)]
        await asyncio.sleep(0.2)  # the flood is in the queue
        loaded = await probe(stubs[0], key, args.probes, args.tokens, *extra)
        finished = sum(1 for call in flood if call.done() and not call.exception())
        for call in flood:
            call.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
    finally:
        for channel in channels:
            await channel.close()
    return {"alone": summary(alone), "flood": summary(loaded), "flood_done_meanwhile": finished,
            "ratio_p95": p95(loaded) / p95(alone)}


async def fake_ollama_part(args: argparse.Namespace, keys: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    common = ["--backend", "ollama", "--max-in-flight", "4", "--max-queue",
              str(args.flood + 16), "--queue-timeout", "600", "--api-keys-file", keys,
              "--warm-up", "false"]
    with fake_ollama(tokens=args.tokens * 2, token_delay=args.token_delay) as url:
        for name, extra in (("fair", ["--fair-queuing", "true"]),
                            ("fcfs", ["--fair-queuing", "false"])):
            proc, address = serve(*common, "--ollama-url", url, *extra)
            try:
                results[name] = await under_flood(address, args, "b-key")
            finally:
                stop(proc)
        proc, address = serve(*common, "--ollama-url", url, "--fair-queuing", "true",
                              "--critical-reserve", str(args.critical_reserve))
        try:
            results["critical"] = await under_flood(
                address, args, "c-key", ("x-agentloop-priority", "critical"))
        finally:
            stop(proc)
    return results


# --- the embedded engine: cache isolation and the digit oracle -----------------------------

async def cached(stub: pb_grpc.AgentLoopServiceStub, key: str, prompt: str) -> int:
    reply = await stub.Generate(pb.GenerateRequest(
        prompt=prompt, options=pb.GenerationOptions(max_tokens=1, temperature=0)),
        metadata=metadata(key), timeout=600)
    return reply.usage.cached_input_tokens


async def oracle(stub: pb_grpc.AgentLoopServiceStub, prober: str, digits: int
                 ) -> dict[str, Any]:
    """Recover the code digit by digit from cached_input_tokens; stop at a tie."""
    victim_prompt = MEMO + SECRET + ". Do not share it with anyone."
    known, calls, started = "", 0, time.perf_counter()
    counts_seen: list[dict[str, int]] = []
    await cached(stub, "victim-key", victim_prompt)
    for _ in range(digits):
        # The prober's own last guess is what every guess finds of its own: send one first,
        # so the first guess of a position finds as much as the others.
        await cached(stub, prober, MEMO + known + "9 please")
        calls += 2
        counts = {}
        for digit in "0123456789":
            await cached(stub, "victim-key", victim_prompt)
            # A word after the guess: the prompt's last token is always evaluated again.
            counts[digit] = await cached(stub, prober, MEMO + known + digit + " please")
            calls += 2
        counts_seen.append(counts)
        best = max(counts.values())
        winners = [digit for digit, count in counts.items() if count == best]
        if len(winners) != 1:
            break
        known += winners[0]
    return {"recovered": known, "correct": SECRET.startswith(known) and bool(known),
            "calls": calls, "seconds": time.perf_counter() - started,
            "distinct_counts_per_position": [len(set(c.values())) for c in counts_seen],
            "counts": counts_seen}


async def embedded_part(args: argparse.Namespace, keys: str) -> dict[str, Any]:
    proc, address = serve("--backend", "embedded", "--api-keys-file", keys, "--num-ctx", "1024")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.AgentLoopServiceStub(channel)
            prompt = "A list of fruits: apple, banana, cherry, date, elderberry, fig, grape,"
            a_first = await cached(stub, "a-key", prompt)
            b_first = await cached(stub, "b-key", prompt)
            b_repeat = await cached(stub, "b-key", prompt)
            reply = await stub.Generate(pb.GenerateRequest(
                prompt=prompt, options=pb.GenerationOptions(max_tokens=1, temperature=0)),
                metadata=metadata("a-key"), timeout=600)
            isolation = {"a_first": a_first, "b_after_a": b_first, "b_repeat": b_repeat,
                         "input_tokens": reply.usage.input_tokens}
            other = await oracle(stub, "prober-key", args.oracle_digits)
            control = await oracle(stub, "victim-colleague-key", args.oracle_digits)
    finally:
        stop(proc)
    return {"isolation": isolation, "oracle_other_tenant": other,
            "oracle_same_tenant_control": control}


# --- the admission path's cost --------------------------------------------------------------

async def per_call(admission: Admission, quotas: Quotas, context: CallContext, calls: int,
                   tokens: bool) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        async with quotas.admit(context, 20 if tokens else 0) as meter, \
                admission.slot(None, context=context):
            if tokens:
                meter.add_output(1)
                meter.settle(Usage(input_tokens=20, output_tokens=1))
    return (time.perf_counter() - started) / calls * 1e6


def timed(function: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls * 1e6


async def admission_cost(calls: int) -> dict[str, float]:
    limits = Tenant("team", weight=2.0, max_concurrency=1000, tokens_per_minute=10**11,
                    requests_per_minute=10**11)
    off = Admission(4, 64, 30)
    on = Admission(4, 64, 30, tenants=lambda _name: limits)
    named = CallContext(tenant="team", caller="team")
    results = {}
    for _ in range(2):  # the second round is the one reported (warm)
        results = {"slot_off_us": await per_call(off, Quotas(), CallContext(), calls,
                                                 tokens=False),
                   "slot_on_us": await per_call(on, Quotas(lambda _name: limits), named, calls,
                                                tokens=True)}
    metadata = [("authorization", "Bearer x"), ("x-agentloop-priority", "critical"),
                ("user-agent", "grpc-python")]
    results["call_context_off_us"] = timed(
        lambda: call_context(metadata, "ipv4:127.0.0.1:5555"), calls)
    token = RESOLVED_TENANT.set(limits)
    try:
        results["call_context_on_us"] = timed(
            lambda: call_context(metadata, "ipv4:127.0.0.1:5555"), calls)
    finally:
        RESOLVED_TENANT.reset(token)
    # With keys, the edge hands the call's tenant on in the handler it wraps per call.
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: None)
    results["tenant_handler_us"] = timed(
        lambda: admitted(handler, lambda _context: None, limits, None), calls)
    results["added_us"] = (results["slot_on_us"] - results["slot_off_us"]
                           + results["call_context_on_us"] - results["call_context_off_us"]
                           + results["tenant_handler_us"])
    return results


# --- report ---------------------------------------------------------------------------------

def table(results: dict[str, Any]) -> str:
    rows = ["| figure | measured | target |", "| --- | --- | --- |"]
    fake = results.get("fake_ollama")
    if fake:
        for mode, label in (("fair", "fair queuing"), ("fcfs", "first come, first served")):
            r = fake[mode]
            rows.append(f"| B's latency p95, {label}: alone / under A's flood | "
                        f"{r['alone']['p95']:.3f} s / {r['flood']['p95']:.3f} s "
                        f"(**{r['ratio_p95']:.2f}x**) | {'<= 1.5x' if mode == 'fair' else ''} |")
        r = fake["critical"]
        rows.append(f"| critical latency p95: alone / under the flood "
                    f"(reserve {results['args']['critical_reserve']}) | {r['alone']['p95']:.3f} s"
                    f" / {r['flood']['p95']:.3f} s (**{r['ratio_p95']:.2f}x**) | <= 1.3x |")
    embedded = results.get("embedded")
    if embedded:
        iso = embedded["isolation"]
        rows.append(f"| cached tokens: A first / B after A / B's repeat (of {iso['input_tokens']})"
                    f" | {iso['a_first']} / **{iso['b_after_a']}** / {iso['b_repeat']} | "
                    "B after A: 0 |")
        for name, label in (("oracle_other_tenant", "another tenant"),
                            ("oracle_same_tenant_control", "the victim's tenant (control)")):
            o = embedded[name]
            rows.append(f"| digit oracle from {label}: recovered (distinct counts per "
                        f"position) | '{o['recovered']}' in {o['calls']} calls, "
                        f"{o['seconds']:.1f} s ({o['distinct_counts_per_position']}) | "
                        f"{'nothing' if name == 'oracle_other_tenant' else ''} |")
    cost = results["admission"]
    rows.append(f"| admission path per call, tenants off / on (slot, call_context, the "
                f"tenant's handler) | {cost['slot_off_us'] + cost['call_context_off_us']:.1f} / "
                f"{cost['slot_on_us'] + cost['call_context_on_us'] + cost['tenant_handler_us']:.1f}"
                f" us "
                f"(**+{cost['added_us']:.1f} us**) | < 20 us added |")
    return "\n".join(rows)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"args": vars(args), "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version()}}
    results["admission"] = await admission_cost(args.micro_calls)
    with tempfile.TemporaryDirectory() as folder:
        keys = Path(folder) / "tenants.yaml"
        keys.write_text(TENANTS)
        if not args.skip_fake:
            results["fake_ollama"] = await fake_ollama_part(args, str(keys))
        if not args.skip_embedded:
            results["embedded"] = await embedded_part(args, str(keys))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flood", type=int, default=400, help="tenant A's calls at once")
    parser.add_argument("--probes", type=int, default=20, help="B's (and C's) calls in sequence")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per probe generation")
    parser.add_argument("--token-delay", type=float, default=0.01,
                        help="the fake Ollama's seconds per token")
    parser.add_argument("--critical-reserve", type=int, default=1,
                        help="slots kept for critical calls in the priorities run")
    parser.add_argument("--oracle-digits", type=int, default=5)
    parser.add_argument("--micro-calls", type=int, default=100_000)
    parser.add_argument("--skip-fake", action="store_true")
    parser.add_argument("--skip-embedded", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tenants.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
