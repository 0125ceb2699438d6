"""Calls per second of one gateway with 1 and with 2 worker processes, in one run.

The fake Ollama answers at full speed with a few tokens, so the gateway's own CPU is the
bottleneck. Load comes from separate client processes (each with its own connections) so
that the load generator is not the limit. Runs alternate (1, 2, 1, 2, ...) and the best of
each is kept, which cancels most of the noise of a shared machine.

    .venv/bin/python -m bench.bench_workers [--seconds 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.processes import fake_ollama, free_port, stop

RESULTS = Path(__file__).resolve().parent / "results"
AGENTLOOP = str(Path(sys.executable).parent / "agentloop")


def start_gateway(workers: int, port: int, ollama_url: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [AGENTLOOP, "serve", "--listen", f"127.0.0.1:{port}", "--backend", "ollama",
         "--ollama-url", ollama_url, "--workers", str(workers), "--max-in-flight", "256",
         "--max-queue", "1024", "--drain-delay", "0", "--log-level", "warning",
         "--metrics-listen", ""],
        stdout=subprocess.DEVNULL)
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
    except BaseException:
        stop(proc)
        raise
    return proc


def wait_serving(address: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Poll gRPC health until the gateway reports SERVING (or give up)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"the gateway at {address} did not become ready")


def client_process(address: str, seconds: float, concurrency: int, queue: multiprocessing.Queue
                   ) -> None:
    """One load-generating process: `concurrency` callers on their own connection."""
    import grpc

    from agentloop.v1 import agentloop_pb2 as pb
    from agentloop.v1 import agentloop_pb2_grpc as pb_grpc

    async def run() -> int:
        channel = grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)])
        stub = pb_grpc.AgentLoopServiceStub(channel)
        await stub.Generate(pb.GenerateRequest(prompt="warm"), timeout=10)
        stop_at = time.monotonic() + seconds
        request = pb.GenerateRequest(prompt="hi")

        async def caller() -> int:
            calls = 0
            while time.monotonic() < stop_at:
                await stub.Generate(request, timeout=10)
                calls += 1
            return calls

        counts = await asyncio.gather(*(caller() for _ in range(concurrency)))
        await channel.close()
        return sum(counts)

    queue.put(asyncio.run(run()))


def measure(address: str, seconds: float, clients: int, concurrency: int) -> float:
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = context.Queue()
    procs = [context.Process(target=client_process, args=(address, seconds, concurrency, queue))
             for _ in range(clients)]
    for proc in procs:
        proc.start()
    total = sum(queue.get(timeout=seconds + 60) for _ in procs)
    for proc in procs:
        proc.join(30)
    return total / seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2, help="load-generating processes")
    parser.add_argument("--concurrency", type=int, default=16, help="callers per process")
    parser.add_argument("--tokens", type=int, default=5, help="tokens per answer")
    args = parser.parse_args(argv)

    best: dict[int, float] = {1: 0.0, 2: 0.0}
    with fake_ollama(args.tokens, 0.0) as url:
        for _ in range(args.rounds):
            for workers in (1, 2):
                port = free_port()
                gateway = start_gateway(workers, port, url)
                try:
                    rate = measure(f"127.0.0.1:{port}", args.seconds, args.clients,
                                   args.concurrency)
                finally:
                    stop(gateway)
                best[workers] = max(best[workers], rate)
                print(f"workers={workers}: {rate:,.0f} calls/s", flush=True)
    result = {
        "cpu_count": os.cpu_count(),
        "calls_per_second": {str(k): round(v, 1) for k, v in best.items()},
        "ratio_2_over_1": round(best[2] / best[1], 3) if best[1] else None,
        "settings": vars(args),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "workers.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"| workers | calls/s |\n| --- | --- |\n| 1 | {best[1]:,.0f} |\n| 2 | {best[2]:,.0f} |")
    print(f"ratio 2 workers / 1 worker: {result['ratio_2_over_1']}")
    return result


if __name__ == "__main__":
    main()
