"""Graceful drain under load: `agentloop serve` as a process, SIGTERM with 50 streams in flight.

Every stream finishes within the grace, or ends UNAVAILABLE only once the grace is over;
new calls are refused at once; health says NOT_SERVING while the listener is still open.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from fake_ollama import FakeOllama, Script, wait_until
from helpers import rich_details

AGENTLOOP = str(Path(sys.executable).parent / "agentloop")
STREAMS = 50


async def serve(fake: FakeOllama, *args: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start `agentloop serve` on a free port; its address comes from the ready banner."""
    proc = await asyncio.create_subprocess_exec(
        AGENTLOOP, "serve", "--listen", "127.0.0.1:0", "--backend", "ollama",
        "--ollama-url", fake.url, "--max-in-flight", str(STREAMS), *args,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "AGENTLOOP_LOG_LEVEL": "warning"},
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    assert line.startswith("agentloop serving on "), line
    return proc, line.split()[3]


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def readiness(stub: health_pb2_grpc.HealthStub) -> int:
    reply = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=2)
    return reply.status


async def start_streams(stub: pb_grpc.AgentLoopServiceStub) -> list[grpc.aio.UnaryStreamCall]:
    """STREAMS calls, each past its first delta."""
    calls = [stub.StreamGenerate(pb.StreamGenerateRequest(prompt=f"stream {i}"), timeout=60)
             for i in range(STREAMS)]
    for call in calls:
        assert (await call.read()).text == "t0 "
    return calls


async def rest_of(call: grpc.aio.UnaryStreamCall
                  ) -> tuple[list[str], grpc.aio.AioRpcError | None, float]:
    """The remaining deltas, the error that ended the stream, and when it ended."""
    texts: list[str] = []
    try:
        while (reply := await call.read()) is not grpc.aio.EOF:
            texts.append(reply.text)
    except grpc.aio.AioRpcError as exc:
        return texts, exc, time.monotonic()
    return texts, None, time.monotonic()


async def test_sigterm_with_50_streams_lets_every_stream_finish(fake_ollama: FakeOllama):
    tokens = [f"t{i} " for i in range(40)]
    fake_ollama.default_script = Script(tokens=tokens, token_delay=0.05)
    proc, address = await serve(fake_ollama, "--drain-delay", "1", "--shutdown-grace", "20")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.AgentLoopServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            calls = await start_streams(stub)
            assert fake_ollama.active_streams == STREAMS
            generations = len(fake_ollama.generation_requests)

            proc.send_signal(signal.SIGTERM)
            # NOT_SERVING is reported while the listener still answers health checks...
            while await readiness(health) != health_pb2.HealthCheckResponse.NOT_SERVING:
                await asyncio.sleep(0.01)
            # ...and a new call is refused at once, before it reaches the backend.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Generate(pb.GenerateRequest(prompt="new"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            details = rich_details(caught.value)
            assert details["ErrorInfo"].reason == "SHUTTING_DOWN" and "RetryInfo" in details

            results = await asyncio.gather(*(rest_of(call) for call in calls))
        assert len(fake_ollama.generation_requests) == generations
        for texts, error, _ in results:
            assert error is None, error
            assert "t0 " + "".join(texts) == "".join(tokens)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await wait_until(lambda: fake_ollama.active_streams == 0)
    finally:
        await stop(proc)


async def test_streams_beyond_the_grace_end_unavailable_only_after_it(fake_ollama: FakeOllama):
    drain_delay, grace = 0.5, 1.0
    fake_ollama.default_script = Script(tokens=[f"t{i} " for i in range(2000)],
                                        token_delay=0.05)
    proc, address = await serve(fake_ollama, "--drain-delay", str(drain_delay),
                                "--shutdown-grace", str(grace))
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            calls = await start_streams(pb_grpc.AgentLoopServiceStub(channel))
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*(rest_of(call) for call in calls))
        for texts, error, ended in results:
            assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error
            # With the drain's details, not gRPC's bare cut.
            details = rich_details(error)
            assert details["ErrorInfo"].reason == "SHUTTING_DOWN" and "RetryInfo" in details
            # Cut only after the drain delay and the grace, and streaming all along.
            assert ended - signalled >= drain_delay + grace
            assert len(texts) >= (drain_delay + grace) / 0.05 / 2
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        # The gateway closed every upstream stream on its way out.
        await wait_until(lambda: fake_ollama.active_streams == 0)
        assert fake_ollama.disconnects == STREAMS
    finally:
        await stop(proc)

