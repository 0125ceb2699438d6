"""A normal caller's first token with never-reading callers on the embedded engine.

Never-reading callers open StreamRunAgent calls (max_steps 1) on one HTTP/2 connection
that advertises a flow-control window of 0 and never reads, as the hostile caller of
issue 22 did; then a normal caller asks for a short StreamGenerate again and again. The
figure is the ratio of its median time to first token with the hostile calls open to the
median on the idle gateway, measured in the same run (the issue's bar: within 2x). Before
the fix the hostile calls held every admission slot and the normal caller waited for the
queue timeout.

    .venv/bin/python -m bench.bench_transport [--hostile 20] [--samples 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from bench.bench_workers import wait_serving
from bench.processes import free_port, stop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from raw_h2 import raw_connection  # the tests' raw HTTP/2 client

RESULTS = Path(__file__).resolve().parent / "results"
AGENTLOOP = str(Path(sys.executable).parent / "agentloop")
STREAM_RUN_AGENT = "/agentloop.v1.AgentLoopService/StreamRunAgent"


def start_gateway(port: int, metrics_port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [AGENTLOOP, "serve", "--listen", f"127.0.0.1:{port}", "--backend", "embedded",
         "--drain-delay", "0", "--log-level", "warning",
         "--metrics-listen", f"127.0.0.1:{metrics_port}"],
        stdout=subprocess.DEVNULL)
    try:
        wait_serving(f"127.0.0.1:{port}", proc, timeout=180)
    except BaseException:
        stop(proc)
        raise
    return proc


async def first_token_times(address: str, samples: int, max_tokens: int,
                            first: int = 0) -> list[float]:
    """Seconds to the first delta of `samples` short generations, one after another; each
    prompt is new (numbered from `first`), so no phase gains from the prefix cache."""
    times = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AgentLoopServiceStub(channel)
        for i in range(first, first + samples):
            started = time.perf_counter()
            call = stub.StreamGenerate(pb.StreamGenerateRequest(
                prompt=f"Count from {i} to ten:",
                options=pb.GenerationOptions(max_tokens=max_tokens, temperature=0)), timeout=120)
            first = await call.read()
            assert first is not grpc.aio.EOF
            times.append(time.perf_counter() - started)
            while await call.read() is not grpc.aio.EOF:
                pass
    return times


async def in_flight(metrics_port: int) -> float:
    """The gateway's generations in flight, from its /metrics."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "agentloop_requests_in_flight")


async def measure(address: str, metrics_port: int, hostile: int, samples: int,
                  max_tokens: int) -> dict[str, float]:
    await first_token_times(address, 2, max_tokens)  # warm the engine and the prefix cache
    idle = await first_token_times(address, samples, max_tokens, first=1000)
    start = pb.StreamRunAgentRequest(start=pb.StartAgentRun(
        goal="Tell me a long story about Paris.", max_steps=1)).SerializeToString()
    async with raw_connection(address, window=0, reads=False) as attacker:
        for _ in range(hostile):
            await attacker.call(STREAM_RUN_AGENT, start, end=False)
        # Their engine work is theirs to have; what they must not hold is the slots after
        # it, while nobody reads: measure once the engine is done with them.
        while await in_flight(metrics_port) > 0:
            await asyncio.sleep(0.2)
        assert not any(state.ended.is_set() for state in attacker.streams.values())
        loaded = await first_token_times(address, samples, max_tokens, first=2000)
    idle_median, loaded_median = statistics.median(idle), statistics.median(loaded)
    return {"hostile_calls": hostile, "samples": samples,
            "idle_first_token_s": round(idle_median, 4),
            "loaded_first_token_s": round(loaded_median, 4),
            "ratio": round(loaded_median / idle_median, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hostile", type=int, default=20)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    port, metrics_port = free_port(), free_port()
    proc = start_gateway(port, metrics_port)
    try:
        result = asyncio.run(measure(f"127.0.0.1:{port}", metrics_port, args.hostile,
                                     args.samples, args.max_tokens))
    finally:
        stop(proc)
    print(f"| never-reading calls | first token idle | with them | ratio |\n"
          f"| --- | --- | --- | --- |\n"
          f"| {result['hostile_calls']} | {result['idle_first_token_s'] * 1e3:.0f} ms | "
          f"{result['loaded_first_token_s'] * 1e3:.0f} ms | {result['ratio']}x |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transport.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
