"""Telemetry end to end: the spans a real OTLP receiver gets, /metrics scraped over HTTP,
the OTLP metric export, the JSON request log, and a collector that is down."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agentloop.telemetry.logs import REQUEST_LOGGER, JsonFormatter
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from fake_ollama import Script, wait_until
from helpers import TOKENS, client_stub, gateway_settings, running_gateway

SERVICE = "agentloop.v1.AgentLoopService"
MODEL = "gemma3n:e2b"
# A caller's trace: the gateway's server span must continue it.
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = (("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"),)


# --- a real OTLP/gRPC receiver ------------------------------------------------------------

class TraceSink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext
                     ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            self.resources.append(attributes_of(resource_spans.resource.attributes))
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class MetricSink(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.names: set[str] = set()

    async def Export(self, request: metrics_service_pb2.ExportMetricsServiceRequest,
                     context: grpc.aio.ServicerContext
                     ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                self.names.update(metric.name for metric in scope_metrics.metrics)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@dataclass
class Collector:
    endpoint: str
    traces: TraceSink = field(default_factory=TraceSink)
    metrics: MetricSink = field(default_factory=MetricSink)

    async def spans(self, name: str, count: int = 1) -> list[Span]:
        """The spans called `name`, once at least `count` of them have arrived."""
        await wait_until(lambda: len(self._named(name)) >= count, timeout=10,
                         message=f"{count} span(s) named {name!r}")
        return self._named(name)

    def _named(self, name: str) -> list[Span]:
        return [span for span in self.traces.spans if span.name == name]


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    server = grpc.aio.server()
    sink = Collector("")
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink.traces, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(sink.metrics, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sink.endpoint = f"http://127.0.0.1:{port}"
    try:
        yield sink
    finally:
        await server.stop(0)


def otel_environment(monkeypatch: pytest.MonkeyPatch, endpoint: str, **extra: str) -> None:
    """Only the OTEL_* variables a test sets; quick batches so spans arrive soon."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    values = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "20",
        "OTEL_METRIC_EXPORT_INTERVAL": "100",
        "OTEL_SERVICE_NAME": "agentloop-under-test",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",  # every call, not one root in ten
        **extra,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def gateway(monkeypatch, collector, fake_ollama, settings_overrides):
    otel_environment(monkeypatch, collector.endpoint)
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, metrics_listen="127.0.0.1:0",
                                **settings_overrides)
    async with running_gateway(settings) as running:
        yield running


def attributes_of(pairs: list[KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind)


def seconds(span: Span) -> float:
    return (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9


# --- traces -------------------------------------------------------------------------------

async def test_generate_continues_the_callers_trace_down_to_ollama(stub, collector, fake_ollama):
    options = pb.GenerationOptions(temperature=0.25, top_p=0.5, top_k=7, max_tokens=3, seed=11)
    reply = await stub.Generate(pb.GenerateRequest(prompt="a secret prompt", options=options),
                                metadata=TRACEPARENT, timeout=5)
    [server] = await collector.spans(f"{SERVICE}/Generate")
    [client] = await collector.spans(f"text_completion {MODEL}")

    assert server.kind == Span.SPAN_KIND_SERVER
    assert server.trace_id.hex() == TRACE_ID and server.parent_span_id.hex() == CALLER_SPAN_ID
    assert attributes_of(server.attributes).items() >= {
        "rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": "Generate",
        "rpc.grpc.status_code": 0}.items()

    assert client.kind == Span.SPAN_KIND_CLIENT
    assert client.trace_id == server.trace_id and client.parent_span_id == server.span_id
    attributes = attributes_of(client.attributes)
    assert attributes == {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.provider.name": "ollama",
        "gen_ai.request.model": MODEL,
        "gen_ai.request.temperature": 0.25,
        "gen_ai.request.top_p": 0.5,
        "gen_ai.request.top_k": 7,
        "gen_ai.request.max_tokens": 3,
        "gen_ai.request.seed": 11,
        "server.address": "127.0.0.1",
        "server.port": fake_ollama.port,
        "gen_ai.response.model": MODEL,
        "gen_ai.response.finish_reasons": ["length"],
        "gen_ai.usage.input_tokens": reply.usage.input_tokens,
        "gen_ai.usage.output_tokens": 3,
    }  # and no prompt or answer text: trace_content is off
    assert client.status.code == Status.STATUS_CODE_UNSET

    # Ollama was told the client span is its parent, in the caller's trace.
    _, trace_id, parent_id, flags = fake_ollama.headers["traceparent"].split("-")
    assert (trace_id, parent_id, flags) == (TRACE_ID, client.span_id.hex(), "01")
    assert {"service.name": "agentloop-under-test"}.items() <= collector.traces.resources[0].items()


@pytest.mark.parametrize("settings_overrides", [{"http_listen": "127.0.0.1:0"}])
async def test_spans_say_which_door_a_call_came_through(gateway, stub, collector):
    await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"http://{gateway.http_address}/v1/chat/completions",
            headers=dict(TRACEPARENT),
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200
    [grpc_server] = await collector.spans(f"{SERVICE}/Generate")
    [http_server] = await collector.spans("POST /v1/chat/completions")
    [client] = await collector.spans(f"chat {MODEL}")

    assert attributes_of(grpc_server.attributes)["agentloop.door"] == "grpc"
    assert http_server.kind == Span.SPAN_KIND_SERVER
    assert http_server.trace_id.hex() == TRACE_ID
    assert http_server.parent_span_id.hex() == CALLER_SPAN_ID
    assert attributes_of(http_server.attributes).items() >= {
        "agentloop.door": "http", "http.request.method": "POST",
        "http.route": "/v1/chat/completions", "http.response.status_code": 200,
        "agentloop.tenant": "_default"}.items()
    assert client.trace_id == http_server.trace_id
    assert client.parent_span_id == http_server.span_id


async def test_spans_carry_the_callers_tenant(monkeypatch, collector, fake_ollama, tmp_path):
    otel_environment(monkeypatch, collector.endpoint)
    fake_ollama.default_script = Script(tokens=TOKENS)
    keys = tmp_path / "tenants.yaml"
    keys.write_text("tenants:\n  search:\n    keys: [search-key]\n")
    settings = gateway_settings(ollama_url=fake_ollama.url, api_keys="plain-key",
                                api_keys_file=str(keys))
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        for key in ("search-key", "plain-key"):
            await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5,
                                metadata=(("authorization", f"Bearer {key}"),))
        servers = await collector.spans(f"{SERVICE}/Generate", count=2)
        clients = await collector.spans(f"text_completion {MODEL}", count=2)
    assert sorted(attributes_of(s.attributes)["agentloop.tenant"] for s in servers) == [
        "_default", "search"]
    # The backend call names only an operator's tenant: no attribute for the default one.
    assert sorted(attributes_of(s.attributes).get("agentloop.tenant", "") for s in clients) \
        == ["", "search"]


async def test_a_stream_is_one_chat_span_covering_the_whole_stream(stub, collector, fake_ollama):
    fake_ollama.enqueue(Script(tokens=TOKENS, token_delay=0.05))
    request = pb.StreamGenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, content="hi")])
    replies = [reply async for reply in stub.StreamGenerate(request, timeout=5)]
    [server] = await collector.spans(f"{SERVICE}/StreamGenerate")
    [client] = await collector.spans(f"chat {MODEL}")

    assert client.parent_span_id == server.span_id
    assert server.start_time_unix_nano <= client.start_time_unix_nano
    assert client.end_time_unix_nano <= server.end_time_unix_nano
    # The tokens came 50 ms apart: the span lasted at least from the first to the last.
    assert seconds(client) >= 0.05 * (len(TOKENS) - 1) * 0.9
    attributes = attributes_of(client.attributes)
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert attributes["gen_ai.usage.output_tokens"] == replies[-1].usage.output_tokens == 4


async def test_a_tool_call_answer_is_named_in_the_span(stub, collector, fake_ollama):
    fake_ollama.capabilities[fake_ollama.models[0]] = ["completion", "tools"]
    fake_ollama.enqueue(Script(tokens=[], tool_calls=[{"name": "lookup", "arguments": {}}]))
    reply = await stub.Generate(pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content="hi")],
        tools=[pb.ToolDefinition(name="lookup")]), timeout=5)
    assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    [client] = await collector.spans(f"chat {MODEL}")
    assert attributes_of(client.attributes)["gen_ai.response.finish_reasons"] == ["tool_calls"]


async def test_a_backend_failure_mid_stream_sets_error_type(stub, collector, fake_ollama):
    fake_ollama.enqueue(Script(tokens=TOKENS, error_after=2))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    [server] = await collector.spans(f"{SERVICE}/Generate")
    [client] = await collector.spans(f"text_completion {MODEL}")

    assert attributes_of(client.attributes)["error.type"] == "BACKEND_STREAM_FAILED"
    assert client.status.code == Status.STATUS_CODE_ERROR
    assert attributes_of(server.attributes).items() >= {
        "rpc.grpc.status_code": 14, "error.type": "UNAVAILABLE"}.items()
    assert server.status.code == Status.STATUS_CODE_ERROR


async def test_a_cancelled_stream_ends_both_spans_as_cancelled(stub, collector, fake_ollama):
    fake_ollama.enqueue(Script(tokens=TOKENS, hang_after=1))
    call = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=5)
    await call.read()
    call.cancel()
    [server] = await collector.spans(f"{SERVICE}/StreamGenerate")
    [client] = await collector.spans(f"text_completion {MODEL}")

    assert attributes_of(server.attributes)["rpc.grpc.status_code"] == 1  # CANCELLED
    # The client's choice, not the server's fault: the server span's status stays unset.
    assert server.status.code == Status.STATUS_CODE_UNSET
    assert attributes_of(client.attributes)["error.type"] == "CANCELLED"


async def test_a_passed_deadline_is_deadline_exceeded_on_the_server_span(stub, collector,
                                                                         fake_ollama):
    fake_ollama.enqueue(Script(tokens=TOKENS, hang_after=1))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=0.3)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    [server] = await collector.spans(f"{SERVICE}/Generate")
    assert attributes_of(server.attributes)["rpc.grpc.status_code"] == 4
    assert server.status.code == Status.STATUS_CODE_ERROR


def action(**fields: Any) -> Script:
    return Script(tokens=[json.dumps(fields)])


async def test_an_agent_run_nests_model_calls_and_tool_calls(stub, collector, fake_ollama):
    fake_ollama.enqueue(
        action(thought="multiply", tool="calculator", arguments={"expression": "17*23"}),
        action(thought="done", final_answer="391"))
    reply = await stub.RunAgent(pb.RunAgentRequest(goal="What is 17*23?", max_steps=4),
                                timeout=10)
    assert reply.final_answer == "391"
    [server] = await collector.spans(f"{SERVICE}/RunAgent")
    [agent] = await collector.spans("invoke_agent")
    [tool] = await collector.spans("execute_tool calculator")
    first, second = sorted(await collector.spans(f"chat {MODEL}", 2),
                           key=lambda span: span.start_time_unix_nano)

    assert agent.parent_span_id == server.span_id and agent.kind == Span.SPAN_KIND_INTERNAL
    assert {span.parent_span_id for span in (tool, first, second)} == {agent.span_id}
    assert first.end_time_unix_nano <= tool.start_time_unix_nano
    assert tool.end_time_unix_nano <= second.start_time_unix_nano
    assert attributes_of(agent.attributes).items() >= {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.provider.name": "ollama",
        "gen_ai.request.model": MODEL,
        "gen_ai.usage.output_tokens": reply.usage.output_tokens,
        "agentloop.agent.stop_reason": "final_answer", "agentloop.agent.steps": 2}.items()
    assert attributes_of(tool.attributes) == {
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "calculator",
        "gen_ai.tool.call.id": "call_1", "gen_ai.tool.type": "function",
        "agentloop.tool.client": False}


@pytest.mark.parametrize("settings_overrides", [{"trace_content": True}])
async def test_trace_content_puts_prompts_answers_and_tool_io_into_spans(stub, collector,
                                                                         fake_ollama):
    reply = await stub.Generate(pb.GenerateRequest(prompt="a secret prompt", system="be brief"),
                                timeout=5)
    [client] = await collector.spans(f"text_completion {MODEL}")
    attributes = attributes_of(client.attributes)
    assert json.loads(attributes["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "a secret prompt"}]}]
    assert json.loads(attributes["gen_ai.system_instructions"]) == [
        {"type": "text", "content": "be brief"}]
    [output] = json.loads(attributes["gen_ai.output.messages"])
    assert output["parts"][0]["content"] == reply.text and output["finish_reason"] == "stop"

    fake_ollama.enqueue(
        action(thought="multiply", tool="calculator", arguments={"expression": "17*23"}),
        action(thought="done", final_answer="391"))
    await stub.RunAgent(pb.RunAgentRequest(goal="What is 17*23?"), timeout=10)
    [tool] = await collector.spans("execute_tool calculator")
    assert attributes_of(tool.attributes).items() >= {
        "gen_ai.tool.call.arguments": '{"expression": "17*23"}',
        "gen_ai.tool.call.result": "391"}.items()


async def test_by_default_a_sampled_caller_is_always_traced(monkeypatch, collector,
                                                             fake_ollama):
    otel_environment(monkeypatch, collector.endpoint)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER")  # the gateway's default: parent, else 1 in 10
    settings = gateway_settings(ollama_url=fake_ollama.url)
    unsampled = (("traceparent", f"00-{'1' * 32}-{CALLER_SPAN_ID}-00"),)
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=unsampled, timeout=5)
        assert fake_ollama.headers["traceparent"].startswith(f"00-{'1' * 32}-")
        assert fake_ollama.headers["traceparent"].endswith("-00")
        await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=TRACEPARENT, timeout=5)
    # Shut down and flushed: the sampled caller's trace went on, the unsampled one's did not.
    assert {span.trace_id.hex() for span in collector.traces.spans} == {TRACE_ID}
    assert len(collector.traces.spans) == 2


async def test_health_checks_and_reflection_stay_out_of_traces(gateway, collector):
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "readiness", "liveness"):
            await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for _ in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=2):
            pass
        await pb_grpc.AgentLoopServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
    # Spans leave in the order they end: had the health checks made any, they came first.
    await collector.spans(f"{SERVICE}/ListModels")
    assert [span.name for span in collector.traces.spans] == [f"{SERVICE}/ListModels"]


async def test_sdk_disabled_exports_nothing_yet_still_propagates(monkeypatch, collector,
                                                                 fake_ollama):
    otel_environment(monkeypatch, collector.endpoint, OTEL_SDK_DISABLED="true")
    settings = gateway_settings(ollama_url=fake_ollama.url, metrics_listen="127.0.0.1:0")
    async with running_gateway(settings) as gateway:
        assert gateway.metrics_port is None
        async with client_stub(gateway.address) as stub:
            await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=TRACEPARENT, timeout=5)
    # Shut down, so anything there was to export has been flushed: there was nothing.
    assert collector.traces.spans == [] and collector.metrics.names == set()
    assert fake_ollama.headers["traceparent"].split("-")[1] == TRACE_ID


async def test_a_collector_that_is_down_changes_nothing_for_clients(monkeypatch, fake_ollama):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    # Export often; give up a failed export after 1 s so the shutdown flush ends soon.
    otel_environment(monkeypatch, f"http://127.0.0.1:{closed}", OTEL_BSP_SCHEDULE_DELAY="1",
                     OTEL_METRIC_EXPORT_INTERVAL="20", OTEL_EXPORTER_OTLP_TIMEOUT="1")
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url)
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        for _ in range(5):
            # Far below the exporter's 10 s timeout: no call waits on an export.
            reply = await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=2)
            assert reply.text == "".join(TOKENS)
            replies = [r async for r in stub.StreamGenerate(
                pb.StreamGenerateRequest(prompt="hi"), timeout=2)]
            assert replies[-1].usage.output_tokens == len(TOKENS)


# --- metrics ------------------------------------------------------------------------------

async def scrape(port: int | None) -> list[Sample]:
    assert port is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200
    return [sample for family in text_string_to_metric_families(response.text)
            for sample in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sum over the samples called `name` that carry `labels`; None if there is none."""
    values = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(values) if values else None


async def test_metrics_count_rpcs_tokens_and_latencies(gateway, stub):
    for _ in range(2):
        await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
    [_ async for _ in stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=5)]
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Generate(pb.GenerateRequest(prompt=""), timeout=5)
    samples = await scrape(gateway.metrics_port)

    rpcs = "rpc_server_call_duration_seconds_count"
    assert total(samples, rpcs, rpc_method="Generate", rpc_grpc_status_code="0") == 2
    assert total(samples, rpcs, rpc_method="Generate", rpc_grpc_status_code="3") == 1
    assert total(samples, rpcs, rpc_method="StreamGenerate", rpc_grpc_status_code="0") == 1
    genai = {"gen_ai_operation_name": "text_completion", "gen_ai_provider_name": "ollama",
             "gen_ai_request_model": MODEL, "gen_ai_response_model": MODEL}
    usage = "gen_ai_client_token_usage"
    assert total(samples, f"{usage}_count", gen_ai_token_type="output", **genai) == 3
    assert total(samples, f"{usage}_sum", gen_ai_token_type="output") == 3 * len(TOKENS)
    assert total(samples, f"{usage}_sum", gen_ai_token_type="input") >= 3
    for histogram in ("gen_ai_client_operation_duration_seconds",
                      "gen_ai_server_time_to_first_token_seconds",
                      "gen_ai_server_time_per_output_token_seconds"):
        assert total(samples, f"{histogram}_count", **genai) == 3, histogram
        assert total(samples, f"{histogram}_sum") > 0, histogram
    assert total(samples, "agentloop_backend_ready", gen_ai_provider_name="ollama") == 1
    assert total(samples, "agentloop_requests_in_flight") == 0


async def test_cache_lookups_and_retries_are_counted_in_metrics(monkeypatch, collector,
                                                                fake_ollama):
    otel_environment(monkeypatch, collector.endpoint)
    fake_ollama.default_script = Script(tokens=TOKENS)
    fake_ollama.enqueue(Script(status=503))  # the first call fails early: one retry
    settings = gateway_settings(ollama_url=fake_ollama.url, metrics_listen="127.0.0.1:0",
                                cache_entries=8, retry_attempts=1, retry_backoff=0.01)
    greedy = pb.GenerationOptions(temperature=0)
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        for _ in range(2):
            await stub.Generate(pb.GenerateRequest(prompt="hi", options=greedy), timeout=5)
        samples = await scrape(gateway.metrics_port)
    lookups = "agentloop_cache_lookups_total"
    assert total(samples, lookups, agentloop_cache_result="misses") == 1
    assert total(samples, lookups, agentloop_cache_result="hits") == 1
    assert total(samples, lookups, agentloop_cache_result="coalesced") == 0
    assert total(samples, "agentloop_backend_retries_total", gen_ai_provider_name="ollama") == 1
    assert len(fake_ollama.generation_requests) == 2  # the failed call and its retry


async def test_gauges_follow_admission_and_the_loaded_model(monkeypatch, collector,
                                                            fake_ollama):
    otel_environment(monkeypatch, collector.endpoint)
    fake_ollama.default_script = Script(tokens=TOKENS, hang_after=1)
    settings = gateway_settings(ollama_url=fake_ollama.url, metrics_listen="127.0.0.1:0",
                                max_in_flight=1)
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        first = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=10)
        await first.read()
        second = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=10)
        await wait_until(lambda: gateway.admission.queued == 1)
        samples = await scrape(gateway.metrics_port)
        assert total(samples, "agentloop_requests_in_flight") == 1
        assert total(samples, "agentloop_requests_queued") == 1
        # The model got loaded by the generation; the health task reads /api/ps.
        await wait_until(lambda: gateway.health.last.loaded, timeout=5)
        samples = await scrape(gateway.metrics_port)
        memory = "agentloop_backend_model_memory_bytes"
        assert total(samples, memory, gen_ai_request_model=MODEL,
                     agentloop_memory_type="total") > 0
        first.cancel()
        second.cancel()
        await wait_until(lambda: gateway.admission.in_flight == 0)
        samples = await scrape(gateway.metrics_port)
        assert total(samples, "agentloop_requests_in_flight") == 0
        assert total(samples, "agentloop_requests_queued") == 0


async def test_metrics_are_exported_by_otlp_too(stub, collector):
    await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
    expected = {"rpc.server.call.duration", "gen_ai.client.token.usage",
                "gen_ai.client.operation.duration", "gen_ai.server.time_to_first_token",
                "gen_ai.server.time_per_output_token", "agentloop.requests.in_flight",
                "agentloop.requests.queued", "agentloop.backend.ready"}
    await wait_until(lambda: expected <= collector.metrics.names, timeout=10,
                     message=f"OTLP metrics {expected}")


# --- logs ---------------------------------------------------------------------------------

async def test_each_rpc_logs_one_json_line_with_its_trace_ids(stub, collector, caplog):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    reply = await stub.Generate(pb.GenerateRequest(prompt="a secret prompt"),
                                metadata=TRACEPARENT, timeout=5)
    [server] = await collector.spans(f"{SERVICE}/Generate")
    [record] = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    text = JsonFormatter().format(record)
    line = json.loads(text)
    assert line.items() >= {
        "level": "info", "logger": REQUEST_LOGGER, "method": "Generate", "status": "OK",
        "model": MODEL, "input_tokens": reply.usage.input_tokens,
        "output_tokens": reply.usage.output_tokens,
        "trace_id": TRACE_ID, "span_id": server.span_id.hex()}.items()
    assert line["duration_ms"] > 0
    assert "secret" not in text


async def test_serve_writes_json_logs_and_serves_metrics(fake_ollama):
    """`agentloop serve` end to end: JSON lines on stderr, /metrics on --metrics-listen."""
    fake_ollama.default_script = Script(tokens=TOKENS)
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("OTEL_")}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "agentloop"), "serve", "--listen", "127.0.0.1:0",
        "--backend", "ollama", "--ollama-url", fake_ollama.url, "--metrics-listen",
        "127.0.0.1:0", "--drain-delay", "0", "--warm-up", "false",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        banner = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        address = banner.split()[3]
        lines: list[dict[str, Any]] = []
        while not any(line["message"].startswith("Prometheus metrics on") for line in lines):
            lines.append(json.loads(await asyncio.wait_for(proc.stderr.readline(), 30)))
        metrics_url = lines[-1]["message"].split()[-1]
        async with client_stub(address) as stub:
            await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
        async with httpx.AsyncClient() as client:
            exposition = (await client.get(metrics_url, timeout=5)).text
        for histogram in ("gen_ai_client_token_usage", "gen_ai_client_operation_duration_seconds",
                          "gen_ai_server_time_to_first_token_seconds"):
            assert f"{histogram}_count" in exposition, histogram
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), 30)
    lines += [json.loads(text) for text in rest.decode().splitlines()]
    [request] = [line for line in lines if line["logger"] == REQUEST_LOGGER]
    assert request.items() >= {"method": "Generate", "status": "OK", "model": MODEL,
                               "output_tokens": len(TOKENS), "worker": 0}.items()
    assert len(request["trace_id"]) == 32


async def test_an_embed_call_is_an_embeddings_span_metrics_and_a_log_line(
        stub, collector, gateway, fake_ollama, caplog):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    texts = ["a secret text", "another one"]
    reply = await stub.Embed(pb.EmbedRequest(texts=texts), metadata=TRACEPARENT, timeout=5)
    [server] = await collector.spans(f"{SERVICE}/Embed")
    [client] = await collector.spans(f"embeddings {MODEL}")
    assert client.kind == Span.SPAN_KIND_CLIENT and client.parent_span_id == server.span_id
    assert attributes_of(client.attributes) == {
        "gen_ai.operation.name": "embeddings",
        "gen_ai.provider.name": "ollama",
        "gen_ai.request.model": MODEL,
        "agentloop.embeddings.texts": 2,
        "server.address": "127.0.0.1",
        "server.port": fake_ollama.port,
        "gen_ai.response.model": MODEL,
        "gen_ai.usage.input_tokens": reply.usage.input_tokens,
        "gen_ai.embeddings.dimension.count": reply.dimensions,
    }  # and no text of the request
    samples = await scrape(gateway.metrics_port)
    genai = {"gen_ai_operation_name": "embeddings", "gen_ai_provider_name": "ollama",
             "gen_ai_request_model": MODEL, "gen_ai_response_model": MODEL}
    assert total(samples, "gen_ai_client_operation_duration_seconds_count", **genai) == 1
    assert total(samples, "gen_ai_client_token_usage_sum", gen_ai_token_type="input",
                 **genai) == reply.usage.input_tokens
    assert total(samples, "rpc_server_call_duration_seconds_count", rpc_method="Embed",
                 rpc_grpc_status_code="0") == 1
    assert total(samples, "agentloop_embeddings_in_flight") == 0
    assert total(samples, "agentloop_embeddings_queued") == 0
    [record] = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    text = JsonFormatter().format(record)
    assert json.loads(text).items() >= {
        "method": "Embed", "status": "OK", "model": MODEL,
        "input_tokens": reply.usage.input_tokens, "output_tokens": 0}.items()
    assert "secret" not in text
