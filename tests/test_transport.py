"""The transport edge: callers that never read, never send, or send bombs cannot hold the
replica. Each test plays the hostile caller with a raw HTTP/2 client (tests/raw_h2.py) on a
real loopback connection to the real server."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import h2.errors
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from raw_h2 import RawGrpcConnection, raw_connection
from test_cli_serve import BIN, start_serve, stop

from agentloop.rpc.transport import request_message_cap
from agentloop.server import RunningServer, start_server
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import FakeOllama, Script, wait_until
from helpers import client_stub, gateway_settings, rich_details, running_gateway

SERVICE = "/agentloop.v1.AgentLoopService"
STREAM_GENERATE = f"{SERVICE}/StreamGenerate"
STREAM_RUN_AGENT = f"{SERVICE}/StreamRunAgent"
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def gateway(fake_ollama: FakeOllama, settings_overrides) -> AsyncIterator[RunningServer]:
    """Two admission slots, so a few hostile calls would be enough to take them all."""
    settings = gateway_settings(ollama_url=fake_ollama.url, max_in_flight=2, max_queue=64,
                                **settings_overrides)
    async with running_gateway(settings) as running:
        yield running


def generate(prompt: str = "hi", **options: Any) -> bytes:
    return pb.StreamGenerateRequest(
        prompt=prompt, options=pb.GenerationOptions(**options)).SerializeToString()


def agent_start(goal: str = "What is the capital of France?", **fields: Any) -> bytes:
    return pb.StreamRunAgentRequest(
        start=pb.StartAgentRun(goal=goal, **fields)).SerializeToString()


def long_answer(words: int) -> Script:
    """A final-answer action of `words` words, one token per word."""
    text = json.dumps({"final_answer": "Paris " * words})
    return Script(tokens=[text[:16], *[text[i:i + 6] for i in range(16, len(text), 6)]])


async def never_reading_calls(connection: RawGrpcConnection, method: str, message: bytes,
                              count: int) -> list[int]:
    """`count` calls without a deadline whose answers the caller never reads (window 0)."""
    return [await connection.call(method, message, end=method == STREAM_GENERATE)
            for _ in range(count)]


async def test_never_reading_streams_release_their_slots(gateway, fake_ollama):
    # Before: each stream stopped reading from the engine once its delta buffer filled,
    # so 12 never-reading calls held both slots and queued the rest for good.
    fake_ollama.default_script = Script(tokens=["tok "] * 1100)
    async with raw_connection(gateway.address, window=0, reads=False) as attacker:
        calls = await never_reading_calls(attacker, STREAM_GENERATE, generate(), 12)
        await wait_until(lambda: len(fake_ollama.generation_requests) == 12, timeout=20)
        await wait_until(lambda: gateway.admission.in_flight == 0 == gateway.admission.queued,
                         timeout=20)
        assert not any(attacker.streams[call].ended.is_set() for call in calls)
        fake_ollama.default_script = Script(tokens=["a", "b", "c"])
        async with client_stub(gateway.address) as stub:
            reply = await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
        assert reply.text == "abc"


async def test_never_reading_agent_runs_release_their_slots(gateway, fake_ollama):
    # Before: a run's event queue held one event, so its model call stayed open (with its
    # slot) while the answer's deltas went unread.
    fake_ollama.default_script = long_answer(600)
    async with raw_connection(gateway.address, window=0, reads=False) as attacker:
        calls = await never_reading_calls(attacker, STREAM_RUN_AGENT, agent_start(max_steps=1),
                                          20)
        await wait_until(lambda: len(fake_ollama.generation_requests) == 20, timeout=20)
        await wait_until(lambda: gateway.admission.in_flight == 0 == gateway.admission.queued,
                         timeout=20)
        assert not any(attacker.streams[call].ended.is_set() for call in calls)
        fake_ollama.default_script = long_answer(3)
        async with client_stub(gateway.address) as stub:
            reply = await stub.RunAgent(pb.RunAgentRequest(goal="Capital?", max_steps=1),
                                        timeout=5)
        assert reply.final_answer.strip() == "Paris Paris Paris"


@pytest.mark.parametrize("settings_overrides", [{"send_stall_timeout": 0.5}])
async def test_a_stream_nobody_reads_ends_with_send_stalled(gateway, fake_ollama, caplog):
    fake_ollama.default_script = Script(tokens=["tok "] * 50)
    caplog.set_level(logging.INFO, logger="agentloop.requests")
    async with raw_connection(gateway.address, window=0, reads=False) as attacker:
        stalled = await attacker.call(STREAM_GENERATE, generate())
        # The call ends on the server (its log line says how) while the caller reads nothing;
        # the status waits behind the unread message: the caller sees it once it reads.
        await wait_until(lambda: any("RESOURCE_EXHAUSTED" in r.getMessage()
                                     for r in caplog.records), timeout=10)
        attacker.reads = True
        attacker.h2.increment_flow_control_window(1 << 20)
        attacker.h2.increment_flow_control_window(1 << 20, stalled)
        await attacker.flush()
        state = await attacker.ended(stalled, timeout=10)
    assert state.grpc_status == RESOURCE_EXHAUSTED, state.trailers
    assert "send_stall_timeout" in (state.header("grpc-message") or "")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_client_cutting_a_stalled_stream_logs_no_error(gateway, fake_ollama, caplog):
    # Before: "ExecuteBatchError raised in core by servicer method" with a traceback.
    fake_ollama.default_script = Script(tokens=["tok "] * 50)
    caplog.set_level(logging.DEBUG, logger="grpc")
    async with raw_connection(gateway.address, window=0, reads=False) as attacker:
        calls = await never_reading_calls(attacker, STREAM_GENERATE, generate(), 5)
        await wait_until(lambda: gateway.admission.in_flight == 0 and len(
            fake_ollama.generation_requests) == 5, timeout=10)
        for call in calls:
            attacker.h2.reset_stream(call, h2.errors.ErrorCodes.CANCEL)
        await attacker.flush()
        async with client_stub(gateway.address) as stub:  # the server has moved on
            await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
        await wait_until(lambda: len(cancel_lines(caplog)) >= len(calls), timeout=10)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert len(cancel_lines(caplog)) == len(calls), caplog.text  # one debug line per cancel


def cancel_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "cancel" in r.getMessage().lower()]


@pytest.mark.parametrize("settings_overrides", [{"first_message_timeout": 0.5,
                                                 "max_concurrent_streams": 20}])
async def test_header_only_streams_are_capped_per_connection_and_time_out(gateway):
    async with raw_connection(gateway.address, obey_stream_limit=False) as attacker:
        assert attacker.h2.remote_settings.max_concurrent_streams == 20
        calls = [attacker.start_call(STREAM_RUN_AGENT) for _ in range(50)]
        await attacker.flush()
        states = [await attacker.ended(call, timeout=10) for call in calls]
    refused = [s for s in states if s.reset == h2.errors.ErrorCodes.REFUSED_STREAM]
    timed_out = [s for s in states if s.grpc_status == DEADLINE_EXCEEDED]
    assert len(refused) == 30 and len(timed_out) == 20, [(s.reset, s.grpc_status)
                                                          for s in states]
    assert "first_message_timeout" in (timed_out[0].header("grpc-message") or "")


@pytest.mark.parametrize("settings_overrides", [{"max_request_bytes_in_flight": 1 << 20,
                                                 "max_prompt_bytes": 1 << 20}])
async def test_request_bytes_in_flight_are_budgeted(gateway, fake_ollama):
    fake_ollama.default_script = Script(hang_before_headers=True)
    prompt = "x" * 400_000
    async with client_stub(gateway.address) as stub:
        held = [stub.StreamGenerate(pb.StreamGenerateRequest(prompt=prompt), timeout=20)
                for _ in range(2)]
        await wait_until(lambda: len(fake_ollama.generation_requests) == 2, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(pb.GenerateRequest(prompt=prompt), timeout=5)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        info = rich_details(refused.value)
        assert info["ErrorInfo"].metadata["limit"] == "request_bytes" and "RetryInfo" in info
        for call in held:
            call.cancel()
        fake_ollama.default_script = Script(tokens=["ok"])
        await wait_until(lambda: gateway.admission.in_flight == 0, timeout=10)
        reply = await stub.Generate(pb.GenerateRequest(prompt=prompt), timeout=5)
    assert reply.text == "ok"


# --- memory of a real `agentloop serve` -----------------------------------------------------


@contextlib.asynccontextmanager
async def served(fake: FakeOllama, *args: str) -> AsyncIterator[tuple[psutil.Process, str]]:
    """A real `agentloop serve` child in front of `fake`: its process and address."""
    proc, address = await start_serve("--backend", "ollama", "--ollama-url", fake.url,
                                      "--drain-delay", "0", "--metrics-listen", "", *args)
    try:
        yield psutil.Process(proc.pid), address
    finally:
        await stop(proc)


def mib(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


@contextlib.asynccontextmanager
async def peak_rss(process: psutil.Process) -> AsyncIterator[list[float]]:
    """Sample the process's RSS (MiB) every 20 ms while the block runs."""
    samples = [mib(process)]

    async def sample() -> None:
        while True:
            await asyncio.sleep(0.02)
            samples.append(mib(process))

    sampler = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        samples.append(mib(process))


async def test_ten_thousand_header_only_streams_cost_little_memory(fake_ollama):
    # Before: 10,000 StreamRunAgent calls that never sent their first message were all
    # held for as long as their connection lived: 174-228 MB more, kept after they closed.
    # Its parent reads nothing of the gateway's stderr (asyncio buffers 128 KiB, then stops
    # reading): on a loaded machine more of the calls get past the stream limit, time out
    # and log, and before logs were written by a thread of their own the gateway froze on
    # the full pipe and never stopped (test_a_gateway_whose_stderr_nobody_reads_...).
    async with served(fake_ollama, "--first-message-timeout", "1") as (gateway, address):
        start = mib(gateway)
        async with peak_rss(gateway) as samples:
            async with raw_connection(address, obey_stream_limit=False) as attacker:
                calls = []
                for _ in range(10_000):
                    calls.append(attacker.start_call(STREAM_RUN_AGENT))
                    if len(calls) % 500 == 0:
                        await attacker.flush()
                await attacker.flush()
                states = [await attacker.ended(call, timeout=60) for call in calls]
        after = mib(gateway)
    refused = sum(s.reset == h2.errors.ErrorCodes.REFUSED_STREAM for s in states)
    timed_out = sum(s.grpc_status == DEADLINE_EXCEEDED for s in states)
    assert refused + timed_out == 10_000 and refused > 0
    assert max(samples) - start < 50, (start, max(samples))
    assert after - start < 20, (start, after)


async def test_a_gateway_whose_stderr_nobody_reads_keeps_serving_and_stops(fake_ollama):
    # Before: log lines were written to stderr on the event loop; once its reader stalled
    # (a full pipe: the 10,000-stream test's parent reads nothing past its buffer), the
    # gateway froze, liveness too, and never stopped. Each call logs a line: 300 calls
    # overfill a pipe of 4 KiB that nobody reads.
    unread, stderr = os.pipe()
    fcntl.fcntl(stderr, fcntl.F_SETPIPE_SZ, 4096)
    try:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "agentloop"), "serve", "--listen", "127.0.0.1:0", "--backend", "ollama",
            "--ollama-url", fake_ollama.url, "--drain-delay", "0", "--metrics-listen", "",
            stdout=asyncio.subprocess.PIPE, stderr=stderr)
        os.close(stderr)
        assert proc.stdout is not None
        try:
            banner = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            address = banner.split()[3]
            async with client_stub(address) as stub:
                for _ in range(300):
                    await stub.ListModels(pb.ListModelsRequest(), timeout=10)
            async with grpc.aio.insecure_channel(address) as channel:
                for service in ("liveness", "readiness"):
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=10)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            try:
                code = await stop(proc)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise
        assert code == 0
    finally:
        os.close(unread)


async def test_compressed_bombs_stay_bounded(fake_ollama):
    # Before: 16 gzip requests of 31 KB, each inflating to 31 MiB (under the old 32 MiB
    # cap), took the gateway from about 180 MB to 700-920 MB, and it stayed there.
    bomb = pb.GenerateRequest(prompt="a" * (31 * 2**20)).SerializeToString()

    async def send(address: str) -> int | None:
        async with raw_connection(address) as attacker:
            call = await attacker.call(f"{SERVICE}/Generate", bomb, compress=True)
            return (await attacker.ended(call, timeout=60)).grpc_status

    async with served(fake_ollama) as (gateway, address):
        start = mib(gateway)
        async with peak_rss(gateway) as samples:
            statuses = await asyncio.gather(*[send(address) for _ in range(16)])
    assert statuses == [RESOURCE_EXHAUSTED] * 16
    assert max(samples) < 300 and max(samples) - start < 50, (start, max(samples))


# --- refusals, per peer ----------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"api_keys": "right-key", "refusal_burst": 3,
                                                 "refusal_rate": 2.0}])
async def test_calls_without_a_valid_key_are_rate_limited_per_peer(gateway):
    # Before: a peer could send calls with made-up keys as fast as it liked.
    async def call(key: str) -> grpc.StatusCode:
        async with client_stub(gateway.address) as stub:
            try:
                await stub.ListModels(pb.ListModelsRequest(), timeout=5,
                                      metadata=(("authorization", f"Bearer {key}"),))
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    info = rich_details(exc)
                    assert info["ErrorInfo"].metadata["limit"] == "refusals"
                    assert info["RetryInfo"].retry_delay.ToTimedelta().total_seconds() <= 0.5
                return exc.code()
            return grpc.StatusCode.OK

    assert [await call(f"guess-{n}") for n in range(3)] == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert await call("guess-3") is grpc.StatusCode.RESOURCE_EXHAUSTED
    # While the peer is over its refusals, even the right key is not confirmed.
    assert await call("right-key") is grpc.StatusCode.RESOURCE_EXHAUSTED
    codes: list[grpc.StatusCode] = []

    async def right_key_served() -> bool:
        codes.append(await call("right-key"))
        return codes[-1] is grpc.StatusCode.OK

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not await right_key_served():  # the bucket refills at refusal_rate
        assert loop.time() < deadline, codes


# --- the metrics port ------------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"metrics_listen": "127.0.0.1:0",
                                                 "metrics_threads": 2,
                                                 "metrics_timeout": 0.5}])
async def test_held_metrics_connections_cost_no_threads_and_time_out(gateway):
    # Before: a thread per held connection, kept for as long as the peer liked.
    threads_before = threading.active_count()
    held = [await asyncio.open_connection("127.0.0.1", gateway.metrics_port)
            for _ in range(30)]
    try:
        assert threading.active_count() <= threads_before + 2
        # Each is closed by the server: at once past the thread cap, after the read
        # timeout otherwise.
        closed = await asyncio.wait_for(
            asyncio.gather(*[reader.read() for reader, _ in held]), timeout=5)
        assert closed == [b""] * len(held)
    finally:
        for _, writer in held:
            writer.close()
    # A scraper retries a connection closed at once; the threads come back as they end.
    async with httpx.AsyncClient() as client:
        for attempt in range(5):
            try:
                response = await client.get(
                    f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5)
                break
            except httpx.RemoteProtocolError:
                assert attempt < 4
    assert response.status_code == 200 and "agentloop" in response.text


# --- the end of the shutdown grace ------------------------------------------------------------


async def test_calls_still_running_when_the_grace_ends_get_shutting_down(fake_ollama):
    # Before: gRPC's bare UNAVAILABLE, without the SHUTTING_DOWN details the drain promises.
    fake_ollama.default_script = Script(hang_before_headers=True)
    settings = gateway_settings(ollama_url=fake_ollama.url)
    running = await start_server(settings)
    try:
        async with client_stub(running.address) as stub:
            unary = asyncio.ensure_future(stub.Generate(pb.GenerateRequest(prompt="hi"),
                                                        timeout=30))
            stream = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=30)
            streamed = asyncio.ensure_future(stream.read())
            await wait_until(lambda: len(fake_ollama.generation_requests) == 2, timeout=10)
            await running.shutdown(grace=0.5, drain_delay=0.0)
            for call in (unary, streamed):
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await call
                assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
                info = rich_details(ended.value)
                assert info["ErrorInfo"].reason == "SHUTTING_DOWN" and "RetryInfo" in info
    finally:
        await running.shutdown(grace=0.0, drain_delay=0.0)


# --- the message cap ---------------------------------------------------------------------------


async def test_the_default_message_cap_takes_the_largest_request_the_limits_allow(
        gateway, fake_ollama):
    settings = gateway.settings
    schema = json.dumps({"type": "object", "description": "d" * 32_000})
    largest = pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content="é" * (settings.max_prompt_bytes // 2),
                             images=[b"\x89PNG" + b"\0" * (settings.max_image_bytes // 16 - 4)
                                     ] * 16)],
        format=pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=schema),
        options=pb.GenerationOptions(stop=["€" * 256] * 16))
    assert len(largest.SerializeToString()) <= request_message_cap(settings) < 11 * 2**20
    fake_ollama.default_script = Script(tokens=["{}"])
    async with client_stub(gateway.address) as stub:
        reply = await stub.Generate(largest, timeout=20)
    assert reply.text == "{}"
