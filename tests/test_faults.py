"""The fault suite: every way Ollama can fail, against the scriptable fake on loopback.

For each fault: the exact gRPC status and reason, the server keeps serving, and nothing
leaks (asyncio tasks, the fake's open streams, requests in the httpx pool, sockets, admission
slots). Then retries, the circuit breaker, warm-up and keep-alive, admission control, a
load test with failing upstream requests and property-based random requests.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from agentloop.errors import CircuitOpen, ResourceExhausted
from agentloop.server import RunningServer
from agentloop.upstreams.admission import Admission
from agentloop.upstreams.resilience import CircuitBreaker, CircuitState
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import FakeOllama, Script, wait_until
from helpers import TOKENS, client_stub, gateway_settings, rich_details, running_gateway

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def fault_settings(fake: FakeOllama, **overrides: Any):
    """Fast retries and a circuit that stays closed unless a test lowers the threshold."""
    values: dict[str, Any] = {
        "ollama_url": fake.url,
        "retry_attempts": 2,
        "retry_backoff": 0.01,
        "retry_backoff_max": 0.05,
        "circuit_failure_threshold": 100,
        "circuit_reset_timeout": 0.5,
        "read_timeout": 5.0,
    }
    values.update(overrides)
    return gateway_settings(**values)


def gateway_tasks() -> int:
    """asyncio tasks, but for the fake's one-per-connection handlers (sockets_to counts those)."""
    return sum(1 for task in asyncio.all_tasks()
               if getattr(task.get_coro(), "__qualname__", "") != "RequestHandler.start")


def sockets_to(port: int) -> int:
    return sum(1 for c in psutil.Process().net_connections("tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


class Leaks:
    """What a fault could leave behind, counted at the start and checked at the end."""

    def __init__(self, running: RunningServer, fake: FakeOllama) -> None:
        self.running = running
        self.fake = fake
        self.tasks = gateway_tasks()

    async def assert_none(self) -> None:
        running, fake = self.running, self.fake
        await wait_until(lambda: fake.active_streams == 0, message="an upstream stream is open")
        await wait_until(lambda: running.admission.in_flight == 0 == running.admission.queued,
                         message="an admission slot is still held")
        await wait_until(lambda: gateway_tasks() <= self.tasks,
                         message="more asyncio tasks than before the fault")
        assert sockets_to(fake.port) <= running.settings.max_connections, "too many sockets"

    async def assert_closed(self) -> None:
        """After the server stopped: a socket the fault took out of the pool would be open."""
        await wait_until(lambda: sockets_to(self.fake.port) == 0,
                         message="a socket to the backend outlived the server")


async def read_stream(call: grpc.aio.UnaryStreamCall
                      ) -> tuple[list[str], grpc.aio.AioRpcError | None]:
    """Every delta of a stream and the error that ended it (None when it finished)."""
    texts: list[str] = []
    try:
        while (reply := await call.read()) is not grpc.aio.EOF:
            texts.append(reply.text)
    except grpc.aio.AioRpcError as exc:
        return texts, exc
    return texts, None


async def readiness(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="readiness"), timeout=2)
    return reply.status


async def wait_readiness(address: str, status: int, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (now := await readiness(address)) != status:
        assert loop.time() < end, f"readiness stayed {now}, wanted {status}"
        await asyncio.sleep(0.02)


def generations(fake: FakeOllama) -> list[dict[str, Any]]:
    """Generation bodies, load (warm-up) requests left out."""
    return [b for b in fake.generation_requests if b.get("prompt") or b.get("messages")]


def loads(fake: FakeOllama) -> list[dict[str, Any]]:
    return [b for b in fake.generation_requests if not (b.get("prompt") or b.get("messages"))]


@pytest.fixture
async def gateway(fake_ollama: FakeOllama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    async with running_gateway(fault_settings(fake_ollama)) as running:
        yield running


# --- one fault at a time: status, reason, retries, leaks ---------------------------------

FAULTS = [
    # (script, times enqueued, status, ErrorInfo reason, upstream calls, tokens kept)
    (Script(status=500), 1, grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", 1, 0),
    (Script(status=503), 3, grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED", 3, 0),
    (Script(status=404), 1, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", 1, 0),
    (Script(status=400), 1, grpc.StatusCode.INVALID_ARGUMENT, "BACKEND_REJECTED_REQUEST", 1, 0),
    (Script(reset_after=0), 3, grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", 3, 0),
    (Script(tokens=TOKENS, reset_after=2), 1, grpc.StatusCode.UNAVAILABLE,
     "BACKEND_STREAM_FAILED", 1, 2),
    (Script(tokens=TOKENS, error_after=2), 1, grpc.StatusCode.UNAVAILABLE,
     "BACKEND_STREAM_FAILED", 1, 2),
    (Script(tokens=TOKENS, malformed_after=2), 1, grpc.StatusCode.UNAVAILABLE,
     "BACKEND_PROTOCOL_ERROR", 1, 2),
    (Script(tokens=TOKENS, truncate_final=True), 1, grpc.StatusCode.UNAVAILABLE,
     "BACKEND_STREAM_FAILED", 1, 4),
    (Script(tokens=TOKENS, hang_after=2), 1, grpc.StatusCode.UNAVAILABLE,
     "BACKEND_STREAM_FAILED", 1, 2),
    (Script(hang_before_headers=True), 1, grpc.StatusCode.UNAVAILABLE,
     "BACKEND_STREAM_FAILED", 1, 0),
]


@pytest.mark.parametrize(("script", "times", "code", "reason", "calls", "kept"), FAULTS,
                         ids=lambda value: repr(value)[:40] if isinstance(value, Script) else None)
async def test_each_fault_gives_its_status_and_leaks_nothing(
        fake_ollama, script, times, code, reason, calls, kept):
    fake_ollama.default_script = Script(tokens=TOKENS)
    # A short read timeout turns the hangs into failures; the client has time to spare.
    async with running_gateway(fault_settings(fake_ollama, read_timeout=0.3)) as running, \
            client_stub(running.address) as stub:
        await stub.Generate(pb.GenerateRequest(prompt="warm the pool"), timeout=5)
        leaks = Leaks(running, fake_ollama)
        before = len(generations(fake_ollama))
        fake_ollama.enqueue(*[script] * times)

        texts, error = await read_stream(
            stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=10))

        assert error is not None and error.code() == code, error
        details = rich_details(error)
        assert details["ErrorInfo"].reason == reason
        assert ("RetryInfo" in details) == (code in (grpc.StatusCode.UNAVAILABLE,
                                                     grpc.StatusCode.RESOURCE_EXHAUSTED))
        assert "".join(texts) == "".join(TOKENS[:kept]), "error text must never arrive as text"
        assert fake_ollama.url not in error.details() and "Traceback" not in error.details()
        assert len(generations(fake_ollama)) - before == calls
        await leaks.assert_none()
        # The server keeps serving.
        reply = await stub.Generate(pb.GenerateRequest(prompt="next"), timeout=5)
        assert reply.text == "".join(TOKENS)
    await leaks.assert_closed()


@pytest.mark.parametrize(("script", "times"), [(Script(reset_after=0), 2),
                                               (Script(status=503), 2)])
async def test_early_failures_are_retried_until_one_succeeds(stub, gateway, fake_ollama, script,
                                                             times):
    fake_ollama.enqueue(*[script] * times)
    texts, error = await read_stream(
        stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=10))
    assert error is None and "".join(texts) == "".join(TOKENS)
    assert len(generations(fake_ollama)) == times + 1
    assert gateway.backend.retries == times


async def test_no_retry_once_a_token_went_out(stub, gateway, fake_ollama):
    fake_ollama.enqueue(Script(tokens=TOKENS, reset_after=1))
    texts, error = await read_stream(
        stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=10))
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    assert texts == TOKENS[:1] and len(generations(fake_ollama)) == 1
    assert gateway.backend.retries == 0


async def test_retries_stay_within_the_client_deadline(fake_ollama):
    # Backoff far beyond the deadline: the gateway gives up instead of sleeping past it.
    settings = fault_settings(fake_ollama, retry_backoff=1000.0, retry_backoff_max=1000.0)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        fake_ollama.enqueue(*[Script(reset_after=0)] * 3)
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=2))
        # Not DEADLINE_EXCEEDED: the gateway answered instead of sleeping past the deadline.
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert rich_details(error)["ErrorInfo"].reason == "BACKEND_UNAVAILABLE"


async def test_hang_before_headers_ends_at_the_client_deadline(stub, gateway, fake_ollama):
    leaks = Leaks(gateway, fake_ollama)
    fake_ollama.enqueue(Script(hang_before_headers=True))
    error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=0.5))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until(lambda: fake_ollama.disconnects == 1)
    assert len(generations(fake_ollama)) == 1
    await leaks.assert_none()


async def test_hang_mid_stream_ends_at_the_client_deadline(stub, gateway, fake_ollama):
    leaks = Leaks(gateway, fake_ollama)
    fake_ollama.enqueue(Script(tokens=TOKENS, hang_after=2))
    texts, error = await read_stream(
        stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=0.5))
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert texts == TOKENS[:2]
    await wait_until(lambda: fake_ollama.disconnects == 1)
    await leaks.assert_none()


async def test_a_very_slow_stream_finishes_while_others_are_served(stub, gateway, fake_ollama):
    tokens = [f"t{i} " for i in range(20)]
    fake_ollama.enqueue(Script(tokens=tokens, token_delay=0.05))
    slow = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="slow"), timeout=30)
    first = await slow.read()
    for _ in range(5):
        reply = await stub.Generate(pb.GenerateRequest(prompt="quick"), timeout=5)
        assert reply.text == "".join(TOKENS)
    rest, error = await read_stream(slow)
    assert error is None and first.text + "".join(rest) == "".join(tokens)


async def test_ollama_going_down_mid_stream(stub, gateway, fake_ollama):
    leaks = Leaks(gateway, fake_ollama)
    fake_ollama.enqueue(Script(tokens=[f"t{i} " for i in range(100)], token_delay=0.02))
    call = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=10)
    first = await call.read()
    await fake_ollama.stop()
    rest, error = await read_stream(call)
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    assert rich_details(error)["ErrorInfo"].reason == "BACKEND_STREAM_FAILED"
    assert (first.text + "".join(rest)).startswith("t0 ")
    await wait_readiness(gateway.address, NOT_SERVING)
    await fake_ollama.restart()
    await wait_readiness(gateway.address, SERVING)
    reply = await stub.Generate(pb.GenerateRequest(prompt="again"), timeout=5)
    assert reply.text == "".join(TOKENS)
    assert len(generations(fake_ollama)) == 2, "a stream that started must not be retried"
    await leaks.assert_none()


async def expect_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# --- warm-up and keep-alive --------------------------------------------------------------

async def test_ollama_down_at_start_then_warm_up_and_serving_when_it_comes_back(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    await fake_ollama.stop()
    settings = fault_settings(fake_ollama, warm_up=True)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        assert await readiness(running.address) == NOT_SERVING
        assert "warm-up failed" in running.health.last.reason
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert rich_details(error)["RetryInfo"].retry_delay.ToNanoseconds() > 0

        await fake_ollama.restart()
        await wait_readiness(running.address, SERVING)
        # Readiness came after the model was loaded by an empty request with keep_alive.
        assert fake_ollama.generation_requests[0] == {"model": "gemma3n:e2b", "keep_alive": "5m"}
        assert "gemma3n:e2b" in fake_ollama.loaded_models()
        reply = await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
        assert reply.text == "".join(TOKENS)


@pytest.mark.parametrize(("keep_alive", "sent"), [("10m", "10m"), ("-1", -1), ("0", 0)])
async def test_keep_alive_setting_goes_with_every_request(fake_ollama, keep_alive, sent):
    settings = fault_settings(fake_ollama, warm_up=True, keep_alive=keep_alive)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
        await stub.Generate(pb.GenerateRequest(
            messages=[pb.Message(role=pb.ROLE_USER, content="hi")]), timeout=5)
        stream = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=5)
        assert (await read_stream(stream))[1] is None
    paths = [path for path, _ in fake_ollama.requests]
    assert paths == ["/api/generate", "/api/generate", "/api/chat", "/api/generate"]
    assert len(loads(fake_ollama)) == 1
    assert [body["keep_alive"] for body in fake_ollama.generation_requests] == [sent] * 4


async def test_warm_up_pulls_a_missing_model_when_allowed(fake_ollama):
    fake_ollama.models = []
    async with running_gateway(fault_settings(fake_ollama, warm_up=True)) as running:
        assert await readiness(running.address) == NOT_SERVING
        assert "warm-up failed" in running.health.last.reason
        assert "/api/pull" not in [path for path, _ in fake_ollama.requests]
    async with running_gateway(fault_settings(fake_ollama, warm_up=True, pull_model=True)) \
            as running:
        assert await readiness(running.address) == SERVING
        paths = [path for path, _ in fake_ollama.requests]
        assert paths[-2:] == ["/api/pull", "/api/generate"]
        assert fake_ollama.requests[-2][1] == {"model": "gemma3n:e2b"}


# --- the circuit breaker -----------------------------------------------------------------

async def test_circuit_opens_fails_fast_and_a_probe_closes_it(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = fault_settings(fake_ollama, circuit_failure_threshold=3, warm_up=True,
                              circuit_reset_timeout=1.5, retry_attempts=0)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        circuit = running.backend.engine_endpoint.breaker
        # Connections dropped before any answer: the backend itself fails, not a request.
        fake_ollama.enqueue(*[Script(reset_after=0)] * 3)
        for _ in range(3):
            error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5))
            assert rich_details(error)["ErrorInfo"].reason == "BACKEND_UNAVAILABLE"
        assert circuit.state is CircuitState.OPEN
        await wait_readiness(running.address, NOT_SERVING)
        assert "circuit open" in running.health.last.reason

        # While open: fail fast, nothing reaches Ollama, RetryInfo says when to come back.
        sent = len(generations(fake_ollama))
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        details = rich_details(error)
        assert details["ErrorInfo"].reason == "CIRCUIT_OPEN"
        assert 0 < details["RetryInfo"].retry_delay.ToNanoseconds() <= 1.5e9
        assert len(generations(fake_ollama)) == sent

        # Half-open after the reset timeout: the health task's probe finds Ollama well.
        await wait_readiness(running.address, SERVING)
        assert circuit.state is CircuitState.CLOSED
        assert len(loads(fake_ollama)) == 2, "a warm-up at start and one after the outage"
        reply = await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
        assert reply.text == "".join(TOKENS)


async def test_outage_opens_the_circuit_and_recovery_closes_it(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = fault_settings(fake_ollama, circuit_failure_threshold=2, warm_up=True,
                              circuit_reset_timeout=1.0, retry_attempts=0)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        leaks = Leaks(running, fake_ollama)
        circuit = running.backend.engine_endpoint.breaker
        changes: list[CircuitState] = []
        tell_health = circuit.on_change
        circuit.on_change = lambda: (changes.append(circuit.state), tell_health())
        await fake_ollama.stop()
        for _ in range(2):
            error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5))
            assert rich_details(error)["ErrorInfo"].reason == "BACKEND_UNAVAILABLE"
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5))
        assert rich_details(error)["ErrorInfo"].reason == "CIRCUIT_OPEN"
        await wait_readiness(running.address, NOT_SERVING)
        # Half-open while Ollama is still away: the health task's probe opens it again.
        await wait_until(lambda: changes[-2:] == [CircuitState.HALF_OPEN, CircuitState.OPEN])
        await fake_ollama.restart()
        await wait_readiness(running.address, SERVING)
        assert circuit.state is CircuitState.CLOSED and changes[-1] is CircuitState.CLOSED
        reply = await stub.Generate(pb.GenerateRequest(prompt="back"), timeout=5)
        assert reply.text == "".join(TOKENS)
        await leaks.assert_none()
    await leaks.assert_closed()


async def test_request_failures_and_busy_answers_do_not_open_the_circuit(fake_ollama):
    settings = fault_settings(fake_ollama, circuit_failure_threshold=2, retry_attempts=0)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        fake_ollama.enqueue(*[Script(status=404), Script(status=400), Script(status=503),
                              Script(status=500), Script(error_after=1),
                              Script(malformed_after=1)] * 2)
        for _ in range(12):
            await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5))
        assert running.backend.engine_endpoint.breaker.state is CircuitState.CLOSED


async def test_one_call_counts_once_towards_the_circuit_however_often_it_is_retried(
        fake_ollama):
    # Three attempts of one call (two server retries), all dropped before any answer: the
    # circuit sees one failure, so a single call (and its client's retries) cannot open it.
    settings = fault_settings(fake_ollama, circuit_failure_threshold=2, retry_attempts=2,
                              retry_backoff=0.01, retry_backoff_max=0.02)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        fake_ollama.enqueue(*[Script(reset_after=0)] * 3)
        await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5))
        assert len(generations(fake_ollama)) == 3
        assert running.backend.engine_endpoint.breaker.state is CircuitState.CLOSED
        fake_ollama.enqueue(*[Script(reset_after=0)] * 3)
        await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5))
        breaker = running.backend.engine_endpoint.breaker
        assert breaker.state is CircuitState.OPEN  # two calls: the threshold


async def test_half_open_lets_one_probe_through_and_its_verdict_decides():
    now = [0.0]
    circuit = CircuitBreaker(failure_threshold=2, reset_timeout=1.0, clock=lambda: now[0])
    changes: list[CircuitState] = []
    circuit.on_change = lambda: changes.append(circuit.state)
    circuit.record_failure()
    assert circuit.state is CircuitState.CLOSED and circuit.admit() is False
    circuit.record_success()  # a success in between: the count starts over
    circuit.record_failure()
    circuit.record_failure()
    assert circuit.state is CircuitState.OPEN and changes == [CircuitState.OPEN]
    with pytest.raises(CircuitOpen) as refused:
        circuit.admit()
    assert refused.value.retry_after == pytest.approx(1.0)
    circuit.record_success()  # a call admitted before the circuit opened: ignored
    assert circuit.state is CircuitState.OPEN

    now[0] = 1.0
    assert circuit.state is CircuitState.HALF_OPEN
    assert circuit.admit() is True  # the probe
    with pytest.raises(CircuitOpen):
        circuit.admit()  # one probe at a time
    circuit.release_probe(True)  # the probe's caller left without a verdict
    assert circuit.admit() is True
    circuit.record_failure()  # the probe failed: open again for the full timeout
    assert circuit.state is CircuitState.OPEN
    now[0] = 2.0
    assert circuit.admit() is True
    circuit.record_success()
    assert circuit.state is CircuitState.CLOSED and circuit.admit() is False
    assert changes[-1] is CircuitState.CLOSED
    circuit.close()


# --- admission control -------------------------------------------------------------------

async def test_admission_limits_in_flight_and_queue_then_refuses_at_once(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = fault_settings(fake_ollama, max_in_flight=2, max_queue=2, queue_timeout=30)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        admission = running.admission
        leaks = Leaks(running, fake_ollama)
        fake_ollama.enqueue(*[Script(tokens=TOKENS, hang_after=1)] * 2)
        holders = [stub.StreamGenerate(pb.StreamGenerateRequest(prompt=f"hold {i}"), timeout=30)
                   for i in range(2)]
        for call in holders:
            assert (await call.read()).text == TOKENS[0]
        waiters = [stub.StreamGenerate(pb.StreamGenerateRequest(prompt=f"wait {i}"), timeout=30)
                   for i in range(2)]
        await wait_until(lambda: admission.queued == 2)
        assert admission.in_flight == 2

        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="over"), timeout=5))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = rich_details(error)
        assert details["ErrorInfo"].reason == "OVERLOADED"
        assert details["RetryInfo"].retry_delay.ToNanoseconds() > 0
        assert len(generations(fake_ollama)) == 2, "refused and queued calls reach no backend"

        # A queued caller that leaves gives its place up; a holder that leaves hands its
        # slot to the first waiter.
        waiters[1].cancel()
        await wait_until(lambda: admission.queued == 1)
        holders[0].cancel()
        texts, error = await read_stream(waiters[0])
        assert error is None and "".join(texts) == "".join(TOKENS)
        holders[1].cancel()
        await leaks.assert_none()
    await leaks.assert_closed()


async def test_queue_timeout_and_deadline_bound_the_wait(fake_ollama):
    settings = fault_settings(fake_ollama, max_in_flight=1, max_queue=4, queue_timeout=0.3)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        fake_ollama.enqueue(Script(tokens=TOKENS, hang_after=1))
        holder = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hold"), timeout=30)
        await holder.read()
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="wait"), timeout=30))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no free slot" in error.details()
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="wait"),
                                                 timeout=0.1))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        holder.cancel()
        await wait_until(lambda: running.admission.in_flight == 0 == running.admission.queued)


async def test_admission_is_first_come_first_served_and_survives_racing_cancels():
    admission = Admission(max_in_flight=1, max_queue=3, queue_timeout=30)
    order: list[str] = []

    async def take(name: str) -> None:
        async with admission.slot():
            order.append(name)

    held = admission.slot()
    await held.__aenter__()
    queued = {name: asyncio.create_task(take(name)) for name in ("b", "c", "d")}
    await wait_until(lambda: admission.queued == 3)
    with pytest.raises(ResourceExhausted):
        async with admission.slot():
            pass
    # The slot goes to "b", which is cancelled in the same tick, before it could run: the
    # slot must pass on to "c", not vanish.
    await held.__aexit__(None, None, None)
    queued["b"].cancel()
    await asyncio.gather(*queued.values(), return_exceptions=True)
    assert order == ["c", "d"]
    assert admission.in_flight == 0 and admission.queued == 0


# --- load: 200 streams, 5% of upstream requests failing ----------------------------------

async def test_200_streams_with_5_percent_upstream_failures_all_end_clearly(fake_ollama):
    tokens = [f"w{i} " for i in range(10)]
    fake_ollama.default_script = Script(tokens=tokens, token_delay=0.005)
    faults = [Script(status=500), Script(reset_after=0), Script(tokens=tokens, error_after=3),
              Script(tokens=tokens, reset_after=5), Script(status=503)]
    scripts = [Script(tokens=tokens, token_delay=0.005)] * 190 + [
        faults[i % len(faults)] for i in range(10)]
    random.Random(7).shuffle(scripts)
    fake_ollama.enqueue(*scripts)
    settings = fault_settings(fake_ollama, max_in_flight=64, max_queue=200, queue_timeout=30)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        leaks = Leaks(running, fake_ollama)

        async def one(i: int) -> tuple[str, grpc.aio.AioRpcError | None]:
            texts, error = await read_stream(stub.StreamGenerate(
                pb.StreamGenerateRequest(prompt=f"stream {i}"), timeout=30))
            return "".join(texts), error

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 50)
        clear = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.INTERNAL}
        failed = [error for _, error in results if error is not None]
        for text, error in results:
            if error is None:
                assert text == "".join(tokens)
            else:
                assert error.code() in clear and rich_details(error)["ErrorInfo"].reason
        assert len(failed) <= 10, [e.code() for e in failed]
        assert len(results) - len(failed) >= 190
        await leaks.assert_none()
    await leaks.assert_closed()


# --- property-based: random requests never end INTERNAL or UNKNOWN -----------------------

WILD_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                        st.sampled_from([0.0, 0.5, 1.0, -1.0]))
WILD_INTS = st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from([0, 1, 8192, 8193]))
TEXT = st.text(max_size=40)
WORDS = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).filter(str.strip)
# Half the examples are well-formed requests (they reach the fake), half anything at all.
OPTION_STRATEGIES = {
    "temperature": (st.floats(0, 2), WILD_FLOATS),
    "top_p": (st.floats(0, 1), WILD_FLOATS),
    "top_k": (st.integers(0, 100), WILD_INTS),
    "max_tokens": (st.integers(1, 64), WILD_INTS),
    "seed": (st.integers(-2**63, 2**63 - 1), st.integers(-2**63, 2**63 - 1)),
    "repeat_penalty": (st.floats(0.01, 2), WILD_FLOATS),
    "num_ctx": (st.integers(1, 8192), WILD_INTS),
}


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    wild = draw(st.booleans())
    options: dict[str, Any] = {}
    for name, (valid, anything) in OPTION_STRATEGIES.items():
        if draw(st.booleans()):
            options[name] = draw(anything if wild else valid)
    options["stop"] = draw(st.lists(TEXT if wild else WORDS, max_size=3))
    role = st.integers(0, 6) if wild else st.integers(1, 4)
    messages = draw(st.lists(st.builds(
        pb.Message, role=role, content=TEXT if wild else WORDS,
        images=st.lists(st.binary(max_size=16), max_size=2)), max_size=3))
    chat = bool(messages) and (wild or draw(st.booleans()))
    kind = draw(st.integers(0, 5) if wild else st.integers(0, 3))
    schema = draw(st.one_of(st.just(""), TEXT, st.just('{"type": "object"}')) if wild else
                  st.just('{"type": "object"}' if kind == 3 else ""))
    model = st.one_of(st.just(""), st.just("gemma3n:e2b"), TEXT)
    return pb.GenerateRequest(
        model=draw(model if wild else st.sampled_from(["", "gemma3n:e2b"])),
        prompt=draw(TEXT if wild else st.just("") if chat else WORDS),
        messages=messages if chat or wild else [],
        system=draw(TEXT),
        options=pb.GenerationOptions(**options),
        format=pb.ResponseFormat(type=kind, json_schema=schema),
    )


@pytest.fixture
async def shared_stub(fake_ollama: FakeOllama):
    """One gateway for every hypothesis example."""
    fake_ollama.default_script = Script(tokens=TOKENS)
    async with running_gateway(fault_settings(fake_ollama)) as running, \
            client_stub(running.address) as stub:
        yield stub


@hypothesis_settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=generate_requests())
async def test_random_requests_never_end_internal_or_unknown(shared_stub, request):
    try:
        await shared_stub.Generate(request, timeout=5)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
            exc.code(), exc.details())
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert rich_details(exc).get("BadRequest") or rich_details(exc).get("ErrorInfo")
