"""The embedded engine's process isolation, on the real model through the real gateway.

The engine runs in a child process. Killing that child (SIGSEGV, as a llama.cpp crash
would) or stopping it (SIGSTOP, as a hang would) must cost only the generations running
in it: they get UNAVAILABLE (ENGINE_RESTARTING, RetryInfo), the gateway answers liveness
throughout, readiness is NOT_SERVING until a new child has loaded the model, and the next
request succeeds. Every wait is on a condition; no test asserts wall-clock figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator

import grpc
import psutil
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_cli_serve import start_serve
from test_embedded import engine_of
from test_telemetry import scrape, total

from agentloop.backends.embedded import EmbeddedBackend
from agentloop.backends.engine_wire import (
    CHILD_MESSAGES,
    HEADER_SIZE,
    decode_error,
    decode_frame,
    encode_error,
    encode_frame,
    frame_size,
)
from agentloop.config import SettingsError
from agentloop.domain import (
    GenerationEnd,
    GenerationRequest,
    OutputFormat,
    ResponseFormat,
    SamplingOptions,
)
from agentloop.errors import (
    AgentLoopError,
    BackendRejected,
    DeadlineExceeded,
    EngineRestarting,
    InvalidArgument,
    ShuttingDown,
)
from agentloop.server import RunningServer, start_server
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import wait_until
from helpers import bad_fields, client_stub, gateway_settings, rich_details, running_gateway

pytestmark = [pytest.mark.real_model, pytest.mark.asyncio(loop_scope="module")]

PROMPT = "Once upon a time"
LONG_TOKENS = 2000  # such streams are always cancelled or killed long before the end
STALL_TIMEOUT = 5.0
SLOTS = 3
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway() -> AsyncIterator[RunningServer]:
    """One gateway on the embedded engine (3 slots, admission following them), with a
    short stall timeout and /metrics."""
    settings = gateway_settings(backend="embedded", num_ctx=2048, read_timeout=120.0,
                                embedded_slots=SLOTS, embedded_stall_timeout=STALL_TIMEOUT,
                                metrics_listen="127.0.0.1:0")
    async with running_gateway(settings, backend=EmbeddedBackend(settings)) as running:
        yield running


def long_request() -> pb.StreamGenerateRequest:
    return pb.StreamGenerateRequest(prompt=PROMPT, options=pb.GenerationOptions(
        max_tokens=LONG_TOKENS, temperature=0, seed=3))


async def started_stream(stub) -> grpc.aio.UnaryStreamCall:
    """A long stream that has sent its first text (so the engine is decoding it)."""
    call = stub.StreamGenerate(long_request(), timeout=120)
    async for message in call:
        if message.text:
            return call
    raise AssertionError("the stream ended before any text")


async def read_rest(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError:
    """Read a stream to its end, which must be an error: the error."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    return caught.value


@contextlib.asynccontextmanager
async def liveness_watch(address: str) -> AsyncIterator[list[object]]:
    """Ask for liveness every 50 ms in the background; yields what each answer was."""
    answers: list[object] = []

    async def ask_forever(health: health_pb2_grpc.HealthStub) -> None:
        while True:
            try:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
                answers.append(reply.status)
            except grpc.aio.AioRpcError as exc:
                answers.append(exc.code())
            await asyncio.sleep(0.05)

    async with grpc.aio.insecure_channel(address) as channel:
        task = asyncio.create_task(ask_forever(health_pb2_grpc.HealthStub(channel)))
        try:
            yield answers
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def readiness_changes(address: str) -> AsyncIterator[list[int]]:
    """Every readiness status the server reports while the block runs (health Watch)."""
    seen: list[int] = []

    async def watch(health: health_pb2_grpc.HealthStub) -> None:
        async for reply in health.Watch(health_pb2.HealthCheckRequest(service="readiness")):
            seen.append(reply.status)

    async with grpc.aio.insecure_channel(address) as channel:
        task = asyncio.create_task(watch(health_pb2_grpc.HealthStub(channel)))
        try:
            await wait_until(lambda: bool(seen), timeout=10)
            yield seen
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def assert_serves_again(running: RunningServer, old_pid: int) -> None:
    """A new child serves, the old one is gone, and a request through the gateway works."""
    engine = engine_of(running)
    await wait_until(lambda: engine.engine_pid not in (None, old_pid), timeout=120)
    await wait_until(lambda: running.health.ready, timeout=30)
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == "zombie"
    async with client_stub(running.address) as stub:
        reply = await stub.Generate(pb.GenerateRequest(
            prompt="The capital of France is",
            options=pb.GenerationOptions(max_tokens=4, temperature=0)), timeout=120)
    assert reply.usage.output_tokens >= 1


def assert_engine_restarting(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    details = rich_details(error)
    assert details["ErrorInfo"].reason == "ENGINE_RESTARTING"
    assert details["RetryInfo"].retry_delay.ToNanoseconds() > 0


async def test_a_crashed_engine_fails_its_streams_and_comes_back(gateway, caplog):
    engine = engine_of(gateway)
    pid = engine.engine_pid
    assert pid is not None and pid != os.getpid()
    restarts = engine.restarts
    caplog.set_level(logging.DEBUG, logger="agentloop.engine.output")
    async with liveness_watch(gateway.address) as liveness, \
            readiness_changes(gateway.address) as readiness, \
            client_stub(gateway.address) as stub:
        # Two generations decoding in the engine's slots at the moment of the crash.
        streams = [await started_stream(stub) for _ in range(2)]
        os.kill(pid, signal.SIGSEGV)
        errors = [await read_rest(call) for call in streams]
        await assert_serves_again(gateway, pid)
        await wait_until(lambda: readiness[-1] == SERVING, timeout=30)

    for error in errors:
        assert_engine_restarting(error)
    assert NOT_SERVING in readiness, "readiness never said the engine was down"
    assert liveness and set(liveness) == {SERVING}, liveness
    assert engine.restarts == restarts + 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and r.name == "agentloop.backends.embedded"]
    assert len(warnings) == 1, warnings
    assert "SIGSEGV" in warnings[0].getMessage()
    assert "2 generation(s) failed" in warnings[0].getMessage()
    # The new child's llama.cpp lines came through the logger, at debug level only.
    raw = [r for r in caplog.records if r.name == "agentloop.engine.output"]
    assert raw and {r.levelno for r in raw} == {logging.DEBUG}


async def test_a_hung_engine_is_killed_and_restarted(gateway, caplog):
    engine = engine_of(gateway)
    pid = engine.engine_pid
    assert pid is not None
    async with liveness_watch(gateway.address) as liveness, \
            client_stub(gateway.address) as stub:
        call = await started_stream(stub)
        os.kill(pid, signal.SIGSTOP)
        try:
            error = await read_rest(call)
        finally:
            if engine.engine_pid == pid:  # the watchdog never came: do not leave it stopped
                os.kill(pid, signal.SIGKILL)
        await assert_serves_again(gateway, pid)

    assert_engine_restarting(error)
    assert liveness and set(liveness) == {SERVING}, liveness
    assert any("no heartbeat" in r.getMessage() or "no progress" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING), caplog.text


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 100000},
    {"const": "\u0000"},
], ids=["long-string", "nul-const"])
async def test_schemas_that_break_llama_cpp_cost_only_their_request(gateway, schema):
    # Straight to the engine: whatever validation sits in front, the engine must survive.
    engine = engine_of(gateway)
    await wait_until(lambda: gateway.health.ready, timeout=120)
    request = GenerationRequest(
        model="", prompt="A value, as JSON:",
        options=SamplingOptions(temperature=0, top_p=0.9, top_k=40, max_tokens=16,
                                repeat_penalty=1.1, num_ctx=2048, seed=1),
        format=ResponseFormat(OutputFormat.JSON_SCHEMA, json.loads(json.dumps(schema))))
    async with liveness_watch(gateway.address) as liveness:
        try:
            items = [item async for item in engine.stream(request)]
            assert isinstance(items[-1], GenerationEnd)
        except AgentLoopError as exc:
            assert exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE)
            if exc.code is grpc.StatusCode.UNAVAILABLE:
                assert isinstance(exc, EngineRestarting), exc
        await wait_until(lambda: engine.engine_pid is not None, timeout=120)
        await wait_until(lambda: gateway.health.ready, timeout=30)
        async with client_stub(gateway.address) as stub:
            reply = await stub.Generate(pb.GenerateRequest(
                prompt="The capital of France is",
                options=pb.GenerationOptions(max_tokens=4, temperature=0)), timeout=120)

    assert reply.usage.output_tokens >= 1
    assert liveness and set(liveness) == {SERVING}, liveness


async def test_a_request_that_holds_the_engine_without_progress_is_cut(gateway, caplog):
    # A 200,000-value enum takes llama.cpp minutes to compile: no text and no decoding step
    # while the heartbeats go on. Straight to the engine, as above.
    engine = engine_of(gateway)
    await wait_until(lambda: gateway.health.ready, timeout=120)
    pid = engine.engine_pid
    assert pid is not None
    schema = {"enum": [f"value{index}" for index in range(200_000)]}
    request = GenerationRequest(
        model="", prompt="A value, as JSON:",
        options=SamplingOptions(temperature=0, top_p=0.9, top_k=40, max_tokens=16,
                                repeat_penalty=1.1, num_ctx=2048, seed=1),
        format=ResponseFormat(OutputFormat.JSON_SCHEMA, schema))
    with pytest.raises(EngineRestarting):
        async for _ in engine.stream(request):
            pass
    await assert_serves_again(gateway, pid)

    assert any("no progress" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING), caplog.text


async def test_a_grammar_build_that_never_ends_restarts_the_engine(gateway, caplog):
    # llama-cpp-python's converter loops forever on a stray `]` (the gateway refuses such
    # patterns; straight to the engine here). The build holds a builder thread for good,
    # even once its request is gone (here: its deadline passed): the watchdog replaces
    # the child.
    engine = engine_of(gateway)
    await wait_until(lambda: gateway.health.ready, timeout=120)
    pid = engine.engine_pid
    assert pid is not None
    request = GenerationRequest(
        model="", prompt="A value, as JSON:",
        options=SamplingOptions(temperature=0, top_p=0.9, top_k=40, max_tokens=16,
                                repeat_penalty=1.1, num_ctx=2048, seed=1),
        format=ResponseFormat(OutputFormat.JSON_SCHEMA, {"type": "string", "pattern": "^]$"}),
        deadline=time.monotonic() + 1.0)
    with pytest.raises(DeadlineExceeded):
        async for _ in engine.stream(request):
            pass
    await assert_serves_again(gateway, pid)

    assert any("grammar build" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING), caplog.text


async def test_a_schema_the_converter_refuses_names_the_field(gateway):
    # Within the gateway's limits, but not what llama.cpp's converter takes (a pattern
    # must be anchored there): INVALID_ARGUMENT naming the field, not only an ErrorInfo.
    await wait_until(lambda: gateway.health.ready, timeout=120)
    schema = {"type": "string", "pattern": "[a-z]+"}
    async with client_stub(gateway.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(pb.GenerateRequest(prompt="hi", format=pb.ResponseFormat(
                type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=json.dumps(schema))),
                timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(raised.value) == {"format.json_schema"}


async def test_a_client_tool_schema_the_converter_refuses_names_the_client_tools(gateway):
    # A plain schema goes into the action schema's grammar; one the converter refuses
    # (an empty enum) is the client's: INVALID_ARGUMENT naming its tools.
    await wait_until(lambda: gateway.health.ready, timeout=120)
    tool = pb.ClientTool(name="pick", parameters_json_schema=json.dumps(
        {"type": "object", "properties": {"choice": {"enum": []}}}))
    async with client_stub(gateway.address) as stub:
        call = stub.StreamRunAgent(timeout=60)
        await call.write(pb.StreamRunAgentRequest(start=pb.StartAgentRun(
            goal="Pick one.", client_tools=[tool])))
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in call:
                pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(raised.value) == {"start.client_tools"}


async def test_parallelism_is_the_engine_slot_count(gateway):
    engine = engine_of(gateway)
    assert engine.parallelism == SLOTS
    assert gateway.admission.max_in_flight == engine.parallelism  # --max-in-flight 0


async def test_engine_load_is_exported_as_metrics(gateway):
    engine = engine_of(gateway)
    await wait_until(lambda: engine.engine_stats is not None, timeout=30)
    async with client_stub(gateway.address) as stub:
        call = await started_stream(stub)
        try:
            await wait_until(lambda: engine.engine_stats is not None
                             and engine.engine_stats.running == 1, timeout=30)
            busy = await scrape(gateway.metrics_port)
        finally:
            call.cancel()
    await wait_until(lambda: engine.engine_stats is not None
                     and engine.engine_stats.slots_in_use == 0, timeout=30)
    idle = await scrape(gateway.metrics_port)

    provider = {"gen_ai_provider_name": "llama.cpp"}
    assert total(busy, "agentloop_engine_sequences_running", **provider) == 1
    assert total(busy, "agentloop_engine_slots_usage", **provider) == 1
    assert total(busy, "agentloop_engine_slots_limit", **provider) == engine.parallelism
    assert total(busy, "agentloop_engine_cache_usage", **provider) > 0
    assert total(busy, "agentloop_engine_cache_limit", **provider) >= engine.context_size > 0
    assert total(idle, "agentloop_engine_sequences_running", **provider) == 0
    assert total(idle, "agentloop_engine_slots_usage", **provider) == 0
    assert total(idle, "agentloop_engine_requests_waiting", **provider) == 0


async def test_close_leaves_no_process_and_no_thread():
    threads_before = set(threading.enumerate())
    settings = gateway_settings(backend="embedded", num_ctx=1024, read_timeout=120.0)
    backend = EmbeddedBackend(settings)
    running = await start_server(settings, backend=backend)
    try:
        pid = backend.engine_pid
        assert pid is not None
        async with client_stub(running.address) as stub:
            call = await started_stream(stub)
            # Shut down with the stream still running: it ends, and the child with it.
            await running.shutdown(grace=0.5, drain_delay=0.0)
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for _ in call:
                    pass
    finally:
        if backend.engine_pid is not None:  # the test failed before the shutdown
            await running.shutdown(grace=0.5, drain_delay=0.0)

    assert backend.engine_pid is None
    assert not psutil.pid_exists(pid), "the engine's process outlived close()"
    await wait_until(lambda: set(threading.enumerate()) <= threads_before, timeout=10)


async def test_a_model_that_cannot_load_is_a_settings_error(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    children_before = {child.pid for child in psutil.Process().children()}
    backend = EmbeddedBackend(gateway_settings(backend="embedded", gguf=str(broken)))
    with pytest.raises(SettingsError, match="cannot load"):
        await backend.start()
    await backend.close()

    assert backend.engine_pid is None
    assert {child.pid for child in psutil.Process().children()} <= children_before


async def test_the_engine_process_ends_with_a_killed_gateway_and_stays_out_of_its_log():
    # The gateway is SIGKILLed while its engine is stopped: the kernel ends the engine
    # (parent-death signal), so not even a hung engine outlives the gateway.
    proc, address = await start_serve("--backend", "embedded", "--num-ctx", "1024",
                                      "--metrics-listen", "", "--drain-delay", "0")
    try:
        [engine] = psutil.Process(proc.pid).children()
        assert "agentloop.backends.engine_child" in engine.cmdline()
        async with client_stub(address) as stub:
            reply = await stub.Generate(pb.GenerateRequest(
                prompt="The capital of France is",
                options=pb.GenerationOptions(max_tokens=2, temperature=0)), timeout=120)
        assert reply.usage.output_tokens >= 1
        engine.suspend()  # as if stuck in llama.cpp: it cannot notice its socket closing
    finally:
        proc.kill()  # no drain, no close(): the child must go on its own
        await proc.wait()
    assert proc.stderr is not None
    log_lines = (await proc.stderr.read()).decode().splitlines()

    def gone() -> bool:
        return not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
    try:
        await wait_until(gone, timeout=30)
    finally:
        if not gone():
            engine.kill()
    # llama.cpp printed while loading, but only through the logger (at debug: not shown).
    records = [json.loads(line) for line in log_lines]
    assert records and not any("llama_kv_cache" in line for line in log_lines), log_lines
    assert "agentloop.engine.output" not in {record["logger"] for record in records}


@pytest.mark.parametrize("error", [
    InvalidArgument([("format.json_schema", "too large")]),
    BackendRejected("the schema is not supported", metadata={"model": "m"}),
    ShuttingDown("closing", retry_after=2.5),
], ids=lambda error: type(error).__name__)
async def test_engine_errors_cross_the_process_boundary_whole(error):
    frame = encode_frame([("error", 1, encode_error(error))])
    assert frame_size(frame[:HEADER_SIZE]) == len(frame) - HEADER_SIZE
    [(_, _, encoded)] = decode_frame(frame[HEADER_SIZE:], CHILD_MESSAGES)
    crossed = decode_error(encoded)

    assert type(crossed) is type(error)
    assert crossed.message == error.message and str(crossed) == str(error)
    assert crossed.to_status().details == error.to_status().details  # BadRequest, RetryInfo


async def test_readiness_follows_a_restart_at_once_not_at_the_next_check():
    # Background checks an hour apart: only the engine's own signal can move readiness.
    settings = gateway_settings(backend="embedded", num_ctx=1024, health_interval=3600.0)
    backend = EmbeddedBackend(settings)
    async with running_gateway(settings, backend=backend) as running, \
            readiness_changes(running.address) as readiness:
        assert readiness == [SERVING]
        pid = backend.engine_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
        await wait_until(lambda: NOT_SERVING in readiness, timeout=30)
        await wait_until(lambda: readiness[-1] == SERVING, timeout=120)

    assert readiness == [SERVING, NOT_SERVING, SERVING]
    assert backend.restarts == 1


async def test_a_step_longer_than_the_stall_timeout_is_progress_not_a_hang(caplog):
    # One decoding step over a ~3,500-token prompt takes seconds on a few cores (as one
    # step of a bigger model does): llama.cpp's graph nodes count as progress meanwhile.
    settings = gateway_settings(backend="embedded", num_ctx=4096, embedded_slots=1,
                                embedded_batch_tokens=4096, embedded_stall_timeout=2.0,
                                read_timeout=300.0)
    backend = EmbeddedBackend(settings)
    prompt = " ".join(f"word{i}" for i in range(900))
    async with running_gateway(settings, backend=backend) as running, \
            client_stub(running.address) as stub:
        reply = await stub.Generate(pb.GenerateRequest(
            prompt=prompt, options=pb.GenerationOptions(max_tokens=2, temperature=0)),
            timeout=300)

    assert reply.usage.input_tokens > 3000 and reply.usage.output_tokens >= 1
    assert backend.restarts == 0, "the watchdog killed an engine in a long step"


async def test_a_request_in_flight_at_two_crashes_is_refused_and_healthy_work_resets_backoff(
        gateway):
    engine = engine_of(gateway)
    payload = pb.StreamGenerateRequest(
        prompt=f"Crash payload {time.monotonic_ns()}: once upon a time",
        options=pb.GenerationOptions(max_tokens=LONG_TOKENS, temperature=0))
    delays = []
    async with client_stub(gateway.address) as stub:
        for _ in range(2):
            pid = engine.engine_pid
            assert pid is not None
            await assert_serves_again(gateway, -1)  # healthy work on this child first
            call = stub.StreamGenerate(payload, timeout=120)
            async for message in call:
                if message.text:
                    break
            os.kill(pid, signal.SIGSEGV)
            error = await read_rest(call)
            assert_engine_restarting(error)
            delays.append(rich_details(error)["RetryInfo"].retry_delay.ToNanoseconds() / 1e9)
            await assert_serves_again(gateway, pid)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(pb.GenerateRequest(prompt=payload.prompt,
                                                   options=payload.options), timeout=30)
        other = await stub.Generate(pb.GenerateRequest(
            prompt="A different request", options=pb.GenerationOptions(max_tokens=2)),
            timeout=120)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "in flight when the embedded engine's process died 2 times" in (
        refused.value.details() or "")
    assert other.usage.output_tokens >= 1
    # Each crash came after healthy work: the backoff started over (0.5 s, +1 s of margin).
    assert delays == [1.5, 1.5], delays
