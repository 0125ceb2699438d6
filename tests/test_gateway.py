"""The gateway core through real channels: happy paths, the error table, deadlines,
cancellation, health and graceful shutdown, against the fake Ollama on loopback."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentloop.server import start_server
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import Script, wait_until
from helpers import (
    TOKENS,
    bad_fields,
    client_stub,
    gateway_settings,
    read_to_end,
    rich_details,
    running_gateway,
)


async def health_status(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
    return reply.status


# --- happy paths --------------------------------------------------------------------------

async def test_generate_prompt_returns_text_usage_and_timings(stub, fake_ollama):
    reply = await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
    assert reply.text == "".join(TOKENS)
    assert reply.model == "gemma3n:e2b"
    assert reply.finish_reason == pb.FINISH_REASON_STOP
    assert reply.usage.output_tokens == len(TOKENS)
    assert reply.usage.input_tokens > 0
    assert reply.timings.total_duration.ToNanoseconds() > 0
    assert reply.timings.time_to_first_token.ToNanoseconds() > 0
    path, body = fake_ollama.requests[-1]
    assert path == "/api/generate" and body["prompt"] == "hi" and body["stream"] is True


async def test_unset_options_take_the_server_defaults(stub, fake_ollama):
    await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
    body = fake_ollama.generation_requests[-1]
    assert body["options"] == {
        "temperature": 0.7, "top_p": 0.9, "top_k": 40, "num_predict": 2048,
        "repeat_penalty": 1.1, "num_ctx": 8192,
    }
    assert body["keep_alive"] == "5m"


async def test_set_options_and_json_schema_format_reach_ollama(stub, fake_ollama):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    await stub.Generate(pb.GenerateRequest(
        prompt="hi", system="be brief",
        options=pb.GenerationOptions(temperature=0, top_k=0, max_tokens=3, seed=7, stop=["\n"]),
        format=pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA,
                                 json_schema=json.dumps(schema)),
    ), timeout=5)
    body = fake_ollama.generation_requests[-1]
    assert body["options"]["temperature"] == 0 and body["options"]["top_k"] == 0
    assert body["options"]["num_predict"] == 3 and body["options"]["seed"] == 7
    assert body["options"]["stop"] == ["\n"]
    assert body["format"] == schema and body["system"] == "be brief"


async def test_generate_chat_uses_api_chat_with_system_first(stub, fake_ollama):
    reply = await stub.Generate(pb.GenerateRequest(
        system="sys",
        messages=[pb.Message(role=pb.ROLE_USER, content="hi", images=[b"\x89PNG"])],
    ), timeout=5)
    assert reply.text == "".join(TOKENS)
    path, body = fake_ollama.requests[-1]
    assert path == "/api/chat"
    assert body["messages"][0] == {"role": "system", "content": "sys"}
    assert body["messages"][1]["role"] == "user" and body["messages"][1]["images"] == ["iVBORw=="]


async def test_max_tokens_gives_length_finish_reason(stub):
    reply = await stub.Generate(
        pb.GenerateRequest(prompt="hi", options=pb.GenerationOptions(max_tokens=2)), timeout=5)
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH
    assert reply.usage.output_tokens == 2 and reply.text == "Hello,"


@pytest.mark.parametrize("chat", [False, True])
async def test_stream_generate_streams_deltas_in_order(stub, chat):
    request = (pb.StreamGenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, content="hi")])
               if chat else pb.StreamGenerateRequest(prompt="hi"))
    replies = [r async for r in stub.StreamGenerate(request, timeout=5)]
    assert [r.text for r in replies[:-1]] == TOKENS
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.usage.output_tokens == len(TOKENS)
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in replies[:-1])


async def test_list_models_reports_the_backend_models(stub):
    reply = await stub.ListModels(pb.ListModelsRequest(), timeout=5)
    assert reply.backend == "ollama" and reply.default_model == "gemma3n:e2b"
    assert [m.name for m in reply.models] == ["gemma3n:e2b"]


# --- the error table ---------------------------------------------------------------------

@pytest.mark.parametrize(("request_fields", "field"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "hi", "messages": [pb.Message(role=pb.ROLE_USER, content="x")]}, "prompt"),
    ({"messages": [pb.Message(content="x")]}, "messages[0].role"),
    ({"prompt": "hi", "options": pb.GenerationOptions(temperature=-0.1)}, "options.temperature"),
    ({"prompt": "hi", "options": pb.GenerationOptions(top_p=1.5)}, "options.top_p"),
    ({"prompt": "hi", "options": pb.GenerationOptions(max_tokens=-1)}, "options.max_tokens"),
    ({"prompt": "hi", "options": pb.GenerationOptions(max_tokens=100_000)}, "options.max_tokens"),
    ({"prompt": "x" * 300_000}, "prompt"),
    ({"prompt": "hi", "format": pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA,
                                                  json_schema="not json")}, "format.json_schema"),
    ({"prompt": "hi", "model": "bad model name!"}, "model"),
])
async def test_bad_input_is_invalid_argument_naming_the_field(stub, fake_ollama, request_fields,
                                                              field):
    for call in (stub.Generate(pb.GenerateRequest(**request_fields), timeout=5),
                 stub.StreamGenerate(pb.StreamGenerateRequest(**request_fields), timeout=5)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if isinstance(call, grpc.aio.UnaryStreamCall):
                [r async for r in call]
            else:
                await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in bad_fields(caught.value)
    assert fake_ollama.generation_requests == [], "bad input must not reach the backend"


async def test_all_bad_fields_are_named_at_once(stub):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(pb.GenerateRequest(
            prompt="hi", options=pb.GenerationOptions(temperature=-1, top_p=2)), timeout=5)
    assert bad_fields(caught.value) == {"options.temperature", "options.top_p"}


async def expect_status(call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


@pytest.mark.parametrize(("status", "code", "retry"), [
    (404, grpc.StatusCode.NOT_FOUND, False),
    (503, grpc.StatusCode.RESOURCE_EXHAUSTED, True),
    (400, grpc.StatusCode.INVALID_ARGUMENT, False),
    (500, grpc.StatusCode.UNAVAILABLE, True),
])
async def test_backend_http_errors_map_to_statuses(stub, fake_ollama, gateway, status, code,
                                                   retry):
    fake_ollama.enqueue(Script(status=status, error=f"boom {status} at {fake_ollama.url}"))
    error = await expect_status(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5), code)
    details = rich_details(error)
    assert details["ErrorInfo"].domain == "agentloop.v1"
    assert ("RetryInfo" in details) == retry
    assert fake_ollama.url not in error.details() and "Traceback" not in error.details()


async def test_unknown_model_is_not_found(stub):
    error = await expect_status(
        stub.Generate(pb.GenerateRequest(prompt="hi", model="nope:1b"), timeout=5),
        grpc.StatusCode.NOT_FOUND)
    assert rich_details(error)["ErrorInfo"].metadata["model"] == "nope:1b"


async def test_unreachable_backend_is_unavailable_with_retry_info(stub, fake_ollama):
    await fake_ollama.stop()
    error = await expect_status(
        stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5), grpc.StatusCode.UNAVAILABLE)
    assert rich_details(error)["RetryInfo"].retry_delay.ToNanoseconds() > 0
    assert "127.0.0.1" not in error.details()


@pytest.mark.parametrize(("script", "code"), [
    (Script(tokens=TOKENS, error_after=2), grpc.StatusCode.UNAVAILABLE),
    (Script(tokens=TOKENS, reset_after=2), grpc.StatusCode.UNAVAILABLE),
    (Script(tokens=TOKENS, malformed_after=2), grpc.StatusCode.UNAVAILABLE),
    (Script(tokens=TOKENS, truncate_final=True), grpc.StatusCode.UNAVAILABLE),
])
async def test_mid_stream_failures_end_the_stream_with_a_status(stub, fake_ollama, script, code):
    fake_ollama.enqueue(script)
    call = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=5)
    texts = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for reply in call:
            texts.append(reply.text)
    assert caught.value.code() == code
    assert "ErrorInfo" in rich_details(caught.value)
    expected = TOKENS if script.truncate_final else TOKENS[:2]
    assert "".join(texts) == "".join(expected), "error text must never arrive as tokens"


async def test_reset_before_headers_is_unavailable(stub, fake_ollama):
    fake_ollama.enqueue(Script(reset_after=0))
    await expect_status(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5),
                        grpc.StatusCode.UNAVAILABLE)


# --- deadlines and cancellation ----------------------------------------------------------

async def test_deadline_bounds_the_upstream_call(stub, fake_ollama):
    fake_ollama.enqueue(Script(hang_before_headers=True))
    await expect_status(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=0.5),
                        grpc.StatusCode.DEADLINE_EXCEEDED)
    await wait_until(lambda: fake_ollama.disconnects == 1)
    await wait_until(lambda: fake_ollama.active_streams == 0)


async def test_deadline_mid_stream_closes_the_upstream_response(stub, fake_ollama):
    fake_ollama.enqueue(Script(tokens=TOKENS, hang_after=2))
    call = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in call]
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until(lambda: fake_ollama.disconnects == 1)


async def test_client_cancel_closes_the_upstream_response_at_once(stub, fake_ollama, gateway):
    fake_ollama.enqueue(Script(tokens=["t"] * 1000, token_delay=0.05))
    call = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=30)
    first = await call.read()
    assert first.text == "t"
    call.cancel()
    await wait_until(lambda: fake_ollama.disconnects == 1, timeout=2)
    assert fake_ollama.active_streams == 0
    await wait_until(lambda: gateway.admission.in_flight == 0)
    # The gateway keeps serving.
    reply = await stub.Generate(pb.GenerateRequest(prompt="again"), timeout=5)
    assert reply.text == "".join(TOKENS)


# --- health -------------------------------------------------------------------------------

async def test_readiness_follows_the_backend_and_liveness_stays_serving(gateway, fake_ollama):
    address = gateway.address
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", "agentloop.v1.AgentLoopService", "readiness", "liveness"):
        assert await health_status(address, name) == serving

    async with grpc.aio.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="readiness"))
        assert (await watch.read()).status == serving
        await fake_ollama.stop()
        assert (await asyncio.wait_for(watch.read(), 5)).status == not_serving
        assert await health_status(address, "readiness") == not_serving
        assert await health_status(address, "liveness") == serving
        await fake_ollama.restart()
        assert (await asyncio.wait_for(watch.read(), 5)).status == serving
        watch.cancel()


async def test_readiness_needs_the_model_to_be_pulled(fake_ollama):
    async with running_gateway(gateway_settings(ollama_url=fake_ollama.url, model="other:1b")) \
            as running:
        assert await health_status(running.address, "readiness") == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        assert "not pulled" in running.health.last.reason


# --- graceful shutdown --------------------------------------------------------------------

async def test_graceful_shutdown_lets_a_stream_finish_and_refuses_new_calls(fake_ollama):
    tokens = [f"t{i} " for i in range(20)]
    fake_ollama.enqueue(Script(tokens=tokens, token_delay=0.02))
    running = await start_server(gateway_settings(ollama_url=fake_ollama.url))
    async with client_stub(running.address) as stub:
        call = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=10)
        first = await call.read()
        shutdown = asyncio.create_task(running.shutdown(grace=5, drain_delay=0.3))
        await wait_until(lambda: running.drain_gate.draining)
        assert await health_status(running.address, "readiness") == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        error = await expect_status(stub.Generate(pb.GenerateRequest(prompt="new"), timeout=5),
                                    grpc.StatusCode.UNAVAILABLE)
        assert rich_details(error)["ErrorInfo"].reason == "SHUTTING_DOWN"
        rest = await read_to_end(call)
        await shutdown
    assert first.text + "".join(r.text for r in rest) == "".join(tokens)
    assert rest[-1].finish_reason == pb.FINISH_REASON_STOP
