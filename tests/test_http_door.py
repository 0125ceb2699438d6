"""The HTTP door (issue 33): the official `openai` SDKs against the OpenAI-compatible API,
served by the real gateway in front of the fake Ollama (and the fake OpenAI upstream), with
the gRPC port's keys, refusals, limits, errors and telemetry."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_security import Pki

from agentloop.backends.openai import OpenAIBackend
from agentloop.http.door import body_cap
from agentloop.server import RunningServer
from agentloop.upstreams.spec import EndpointSpec
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import EMBEDDING_LENGTH, FakeOllama, Script, wait_until
from fake_openai import DEFAULT_MODEL as OPENAI_MODEL
from fake_openai import FakeOpenAI
from fake_openai import Script as OpenAIScript
from helpers import ROOT, TOKENS, client_stub, gateway_settings, running_gateway

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture
async def door(fake_ollama: FakeOllama) -> AsyncIterator[RunningServer]:
    """A gateway with the HTTP door on, in front of the fake Ollama."""
    fake_ollama.default_script = Script(tokens=TOKENS)
    async with running_gateway(gateway_settings(ollama_url=fake_ollama.url,
                                                http_listen="127.0.0.1:0")) as running:
        yield running


def sdk(running: RunningServer, key: str = "unused", **kwargs: Any) -> openai.AsyncOpenAI:
    """The official SDK on the door; no retries unless asked (a retry would hide a status)."""
    return openai.AsyncOpenAI(base_url=f"http://{running.http_address}/v1", api_key=key,
                              max_retries=kwargs.pop("max_retries", 0), **kwargs)


# --- what maps -------------------------------------------------------------------------


async def test_chat_completion_through_the_sdk(door, fake_ollama):
    async with sdk(door) as client:
        reply = await client.chat.completions.create(
            model="gemma3n:e2b", temperature=0.25, top_p=0.5, max_completion_tokens=9, seed=11,
            stop=["END"], extra_body={"top_k": 7, "repeat_penalty": 1.2},
            messages=[{"role": "developer", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    [choice] = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello, world!"
    assert choice.finish_reason == "stop"
    assert reply.usage.completion_tokens == 4
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 4
    sent = fake_ollama.generation_requests[-1]
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    assert sent["messages"][1]["content"] == "Hi"
    assert sent["options"] | {"temperature": 0.25, "top_p": 0.5, "num_predict": 9, "seed": 11,
                              "stop": ["END"], "top_k": 7, "repeat_penalty": 1.2} \
        == sent["options"]


async def test_streamed_chat_with_usage(door, fake_ollama):
    async with sdk(door) as client:
        stream = await client.chat.completions.create(
            model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}], stream=True,
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    texts = [c.choices[0].delta.content for c in chunks if c.choices and
             c.choices[0].delta.content]
    assert "".join(texts) == "Hello, world!"
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert all(c.usage is None for c in body)


async def test_streamed_chat_without_usage_has_none(door):
    async with sdk(door) as client:
        stream = await client.chat.completions.create(
            model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}], stream=True)
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


async def test_json_schema_and_json_object_reach_the_engine(door, fake_ollama):
    fake_ollama.default_script = Script(tokens=['{"city": ', '"Paris"}'])
    async with sdk(door) as client:
        reply = await client.chat.completions.create(
            model="gemma3n:e2b", messages=[{"role": "user", "content": "Where?"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "city", "schema": CITY, "strict": True}})
        assert json.loads(reply.choices[0].message.content) == {"city": "Paris"}
        assert fake_ollama.generation_requests[-1]["format"] == CITY
        await client.chat.completions.create(
            model="gemma3n:e2b", messages=[{"role": "user", "content": "Where?"}],
            response_format={"type": "json_object"})
        assert fake_ollama.generation_requests[-1]["format"] == "json"


async def test_text_completion_streamed_and_whole(door, fake_ollama):
    async with sdk(door) as client:
        reply = await client.completions.create(model="gemma3n:e2b", prompt="Say hi",
                                                max_tokens=3)
        assert reply.choices[0].text == "Hello, world"
        assert reply.choices[0].finish_reason == "length"
        assert fake_ollama.generation_requests[-1]["prompt"] == "Say hi"
        stream = await client.completions.create(model="gemma3n:e2b", prompt="Say hi",
                                                 stream=True)
        texts = [chunk.choices[0].text async for chunk in stream]
    assert "".join(texts) == "Hello, world!"


async def test_embeddings_as_floats_and_base64(door, fake_ollama):
    async with sdk(door) as client:
        floats = await client.embeddings.create(model="gemma3n:e2b", input=["a cat", "a dog"],
                                                encoding_format="float")
        # The SDK asks for base64 when no format is given, and decodes it.
        decoded = await client.embeddings.create(model="gemma3n:e2b", input="a cat")
    assert [item.index for item in floats.data] == [0, 1]
    assert len(floats.data[0].embedding) == EMBEDDING_LENGTH
    assert decoded.data[0].embedding == pytest.approx(floats.data[0].embedding, rel=1e-6)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    assert fake_ollama.embed_requests[0]["input"] == ["a cat", "a dog"]
    async with httpx.AsyncClient() as raw:
        answer = (await raw.post(f"http://{door.http_address}/v1/embeddings", json={
            "model": "gemma3n:e2b", "input": "a cat", "encoding_format": "base64",
            "dimensions": 8})).json()
    vector = base64.b64decode(answer["data"][0]["embedding"])
    assert len(struct.unpack(f"<{len(vector) // 4}f", vector)) == 8
    assert fake_ollama.embed_requests[-1]["dimensions"] == 8


async def test_models_list_the_engines_models(door, fake_ollama):
    async with sdk(door) as client:
        models = [model async for model in client.models.list()]
    assert {model.id for model in models} == set(fake_ollama.models)
    assert {model.owned_by for model in models} == {"agentloop"}


async def test_an_openai_compatible_upstream_behind_the_door():
    async with FakeOpenAI(default_script=OpenAIScript(tokens=["Bon", "jour"])) as upstream:
        endpoint = EndpointSpec(upstream="fake-pool", kind="openai", url=upstream.url,
                                connect_timeout=0.5, read_timeout=10.0, max_in_flight=8)
        settings = gateway_settings(model=OPENAI_MODEL, http_listen="127.0.0.1:0")
        backend = OpenAIBackend(endpoint, settings)
        async with running_gateway(settings, backend=backend) as running, \
                sdk(running) as client:
            stream = await client.chat.completions.create(
                model=OPENAI_MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True,
                stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            models = [model.id async for model in client.models.list()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Bonjour"
    assert chunks[-1].usage.completion_tokens == 2
    assert OPENAI_MODEL in models


# --- errors: the one table, in OpenAI's shape --------------------------------------------


async def test_a_bad_option_is_a_400_naming_the_param(door):
    async with sdk(door) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}],
                temperature=-1, max_completion_tokens=5)
    error = caught.value
    assert error.status_code == 400 and error.param == "temperature"
    assert error.body["type"] == "invalid_request_error"
    assert error.code == "invalid_argument"


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "Hi"}], "stop": 3}, "stop"),
    ({"messages": [{"role": "user", "content": "Hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "Hi"}], "frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "Hi"}],
      "response_format": {"type": "json_schema", "json_schema": {
          "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format.json_schema.schema"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.invalid/cat.png"}}]}]},
     "messages[0].content[0].image_url"),
    # Function calling maps (test_http_tools.py): by Generate's rules, or refused.
    ({"messages": [{"role": "user", "content": "Hi"}],
      "functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"messages": [{"role": "user", "content": "Hi"}], "tool_choice": "required"},
     "tool_choice"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]},
     "messages[0].tool_call_id"),
])
async def test_what_the_door_refuses_names_its_param(door, body, param):
    async with httpx.AsyncClient() as raw:
        answer = await raw.post(f"http://{door.http_address}/v1/chat/completions",
                                json={"model": "gemma3n:e2b", **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


async def test_asking_for_no_tool_call_without_tools_is_answered(door):
    async with sdk(door) as client:
        reply = await client.chat.completions.create(
            model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}],
            tool_choice="none", parallel_tool_calls=False, user="u-1")
    assert reply.choices[0].message.content == "Hello, world!"


async def test_an_unknown_model_is_a_404(door):
    async with sdk(door) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.code == "model_not_found"


async def test_the_rate_limit_is_a_429_with_retry_after_the_sdk_waits(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, http_listen="127.0.0.1:0",
                                rate_limit=2.0, rate_burst=1)
    async with running_gateway(settings) as running:
        async with sdk(running) as client:
            await client.models.list()
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(
                    model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}])
        headers = caught.value.response.headers
        assert int(headers["retry-after"]) >= 1 and 0 < int(headers["retry-after-ms"]) <= 500
        assert caught.value.body["type"] == "rate_limit_error"
        # With retries on, the SDK waits what the door said and then gets its answer.
        async with sdk(running, max_retries=2) as client:
            reply = await client.chat.completions.create(
                model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content == "Hello, world!"


async def test_an_unreachable_engine_is_a_503_with_retry_after(door, fake_ollama):
    await fake_ollama.stop()
    async with sdk(door) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(
                model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}],
                stream=True)
    assert caught.value.status_code == 503
    assert int(caught.value.response.headers["retry-after"]) >= 1


async def test_an_engine_failing_mid_stream_ends_the_stream_with_an_error_event(door,
                                                                               fake_ollama):
    fake_ollama.enqueue(Script(tokens=TOKENS, error_after=2))
    async with sdk(door) as client:
        stream = await client.chat.completions.create(
            model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}], stream=True)
        texts = []
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                texts.append(chunk.choices[0].delta.content)
    assert texts[:2] == ["Hello", ","]
    assert caught.value.body["code"] == "backend_stream_failed"


# --- keys, tenants, refusals: the gRPC port's edge ---------------------------------------


async def test_keys_refusals_and_lock_out_are_one_for_both_doors(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, http_listen="127.0.0.1:0",
                                api_keys="good-key", refusal_burst=2, refusal_rate=0.01)
    async with running_gateway(settings) as running:
        async with sdk(running, key="good-key") as client:
            reply = await client.chat.completions.create(
                model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}])
            assert reply.choices[0].message.content == "Hello, world!"
        async with httpx.AsyncClient() as raw:
            missing = await raw.get(f"http://{running.http_address}/v1/models")
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        async with sdk(running, key="bad-key") as client:
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
            # Past the burst, the address is locked out, a valid key or not ...
            with pytest.raises(openai.RateLimitError):
                await client.models.list()
        async with sdk(running, key="good-key") as client:
            with pytest.raises(openai.RateLimitError):
                await client.models.list()
        # ... on the gRPC port too: one edge, one peer address.
        async with client_stub(running.address) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ListModels(pb.ListModelsRequest(), timeout=5,
                                      metadata=(("authorization", "Bearer good-key"),))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_headers_mirror_the_grpc_metadata(door, fake_ollama):
    async with sdk(door) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}],
                extra_headers={"x-agentloop-local-only": "maybe"})
        assert caught.value.param == "x-agentloop-local-only"
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}],
                extra_headers={"x-agentloop-priority": "urgent"})
        assert caught.value.param == "x-agentloop-priority"
        reply = await client.chat.completions.create(
            model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}],
            extra_headers={"x-agentloop-priority": "critical", "x-agentloop-session": "s1",
                           "x-agentloop-local-only": "true"})
    assert reply.choices[0].message.content == "Hello, world!"


async def test_a_tenants_quota_is_one_whichever_door(fake_ollama, tmp_path):
    fake_ollama.default_script = Script(tokens=TOKENS)
    keys = tmp_path / "tenants.yaml"
    keys.write_text("tenants:\n  batch:\n    keys: [batch-key]\n    requests_per_minute: 1\n")
    settings = gateway_settings(ollama_url=fake_ollama.url, http_listen="127.0.0.1:0",
                                api_keys_file=str(keys))
    async with running_gateway(settings) as running:
        async with sdk(running, key="batch-key") as client:
            await client.chat.completions.create(
                model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}])
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(
                    model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}])
        assert caught.value.code == "quota_exceeded"
        assert int(caught.value.response.headers["retry-after"]) >= 1
        async with client_stub(running.address) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5,
                                    metadata=(("authorization", "Bearer batch-key"),))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(fake_ollama.generation_requests) == 1


async def test_unknown_routes_and_methods(door):
    async with httpx.AsyncClient(base_url=f"http://{door.http_address}") as raw:
        unknown = await raw.post("/v1/audio/speech", json={})
        wrong_method = await raw.get("/v1/chat/completions")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"


async def test_tls_with_the_grpc_ports_certificate(fake_ollama, tmp_path):
    fake_ollama.default_script = Script(tokens=TOKENS)
    pki = Pki(tmp_path)
    settings = gateway_settings(ollama_url=fake_ollama.url, http_listen="127.0.0.1:0",
                                tls_cert=str(tmp_path / "server.pem"),
                                tls_key=str(tmp_path / "server.key"))
    async with running_gateway(settings) as running:
        verified = ssl.create_default_context(cafile=str(pki.ca))
        async with openai.AsyncOpenAI(
                base_url=f"https://{running.http_address}/v1", api_key="unused", max_retries=0,
                http_client=openai.DefaultAsyncHttpxClient(verify=verified)) as client:
            reply = await client.chat.completions.create(
                model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content == "Hello, world!"
        async with sdk(running) as plaintext:
            with pytest.raises(openai.APIConnectionError):
                await plaintext.models.list()


async def test_a_draining_door_refuses_new_requests_with_503(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, http_listen="127.0.0.1:0")
    async with running_gateway(settings) as running, sdk(running) as client:
        draining = asyncio.create_task(running.shutdown(grace=0.5, drain_delay=5.0))
        await wait_until(lambda: running.drain_gate.draining)
        with pytest.raises(openai.InternalServerError) as caught:
            await client.models.list()
        draining.cancel()
        await asyncio.gather(draining, return_exceptions=True)
    assert caught.value.status_code == 503 and caught.value.code == "shutting_down"
    assert caught.value.response.headers["retry-after"] == "1"


# --- bounded like the gRPC edge ----------------------------------------------------------


@pytest.fixture
async def tight_door(fake_ollama: FakeOllama) -> AsyncIterator[RunningServer]:
    """A door with short timeouts and two connections per peer."""
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, http_listen="127.0.0.1:0",
                                http_idle_timeout=0.3, http_body_timeout=0.3,
                                http_connections_per_peer=2, send_stall_timeout=0.5)
    async with running_gateway(settings) as running:
        yield running


async def raw_connection(running: RunningServer, receive_buffer: int | None = None,
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    if receive_buffer is not None:  # before connecting: the window is agreed then
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", running.http.port))
    return await asyncio.open_connection(sock=sock)


async def test_a_body_over_the_cap_is_413_before_it_is_read(door):
    cap = body_cap(door.settings)
    reader, writer = await raw_connection(door)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: " + str(cap + 1).encode() + b"\r\n\r\n")
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status.startswith(b"HTTP/1.1 413")
    assert door.http.budget.in_flight == 0


async def test_a_compressed_body_is_refused_unread(door):
    async with httpx.AsyncClient() as raw:
        answer = await raw.post(f"http://{door.http_address}/v1/chat/completions",
                                content=b"\x1f\x8b" + b"\0" * 64,
                                headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 415
    assert answer.json()["error"]["param"] == "content-encoding"


async def test_json_nested_past_the_limit_is_refused(door):
    deep = "[" * 200 + "]" * 200
    async with httpx.AsyncClient() as raw:
        answer = await raw.post(f"http://{door.http_address}/v1/chat/completions",
                                content=f'{{"messages": {deep}}}')
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "body"


async def test_bodies_arriving_hold_the_request_byte_budget_of_both_doors(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    budget = 1024 * 1024
    settings = gateway_settings(ollama_url=fake_ollama.url, http_listen="127.0.0.1:0",
                                max_request_bytes_in_flight=budget, http_body_timeout=30)
    async with running_gateway(settings) as running:
        _reader, writer = await raw_connection(running)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: " + str(2 * budget).encode() + b"\r\n\r\n"
                     + b" " * (budget - 100))
        await writer.drain()
        await wait_until(lambda: running.http.budget.in_flight >= budget - 100)
        async with sdk(running) as client:
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(
                    model="gemma3n:e2b", messages=[{"role": "user", "content": "x" * 200}])
        assert "request bytes" in caught.value.message
        async with client_stub(running.address) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(pb.GenerateRequest(prompt="x" * 200), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        writer.close()
        # The slow body's bytes are given back when its call ends.
        await wait_until(lambda: running.http.budget.in_flight == 0)


async def test_a_slow_body_is_408(tight_door):
    reader, writer = await raw_connection(tight_door)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 100\r\n\r\n{\"messages\"")
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status.startswith(b"HTTP/1.1 408")


async def test_a_silent_or_slow_headed_connection_is_closed(tight_door):
    silent = await raw_connection(tight_door)
    slow_reader, slow_writer = await raw_connection(tight_door)
    slow_writer.write(b"GET /v1/models HTTP/1.1\r\n")  # and never the rest of its head
    for reader, _ in (silent, (slow_reader, slow_writer)):
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    # The connections freed, a new client is served.
    async with sdk(tight_door) as client:
        assert [m.id async for m in client.models.list()]


async def test_connections_past_the_per_peer_limit_get_429(tight_door):
    held = [await raw_connection(tight_door) for _ in range(2)]
    reader, writer = await raw_connection(tight_door)
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 429")
    writer.close()
    for _, held_writer in held:
        held_writer.close()


async def test_a_client_that_goes_away_cancels_the_engine_call(door, fake_ollama):
    fake_ollama.enqueue(Script(tokens=TOKENS, hang_after=2))
    async with sdk(door) as client:
        stream = await client.chat.completions.create(
            model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}], stream=True)
        async for chunk in stream:
            if chunk.choices[0].delta.content == ",":
                break
        await stream.close()
    await wait_until(lambda: fake_ollama.disconnects == 1)
    await wait_until(lambda: door.admission.in_flight == 0)


async def test_a_waiting_client_that_goes_away_cancels_the_engine_call(door, fake_ollama):
    fake_ollama.enqueue(Script(hang_before_headers=True))
    async with sdk(door, timeout=0.3) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}])
    await wait_until(lambda: fake_ollama.disconnects == 1)
    await wait_until(lambda: door.admission.in_flight == 0)


async def test_a_stream_nobody_reads_is_dropped_and_its_generation_closed(tight_door,
                                                                        fake_ollama):
    # Far more than the socket buffers hold (a control character is six bytes as JSON),
    # as fast as the fake can send it.
    fake_ollama.enqueue(Script(tokens=["\x01" * 64] * 8192))
    _unread, writer = await raw_connection(tight_door, receive_buffer=4096)
    body = json.dumps({"model": "gemma3n:e2b", "stream": True, "max_tokens": 8192,
                       "messages": [{"role": "user", "content": "Hi"}]}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    # Nothing is read: the door gives up on the client, and the admission slot is free.
    await wait_until(lambda: tight_door.admission.in_flight == 0, timeout=20)
    await wait_until(lambda: tight_door.http.connections == 0, timeout=20)
    writer.close()


# --- telemetry: which door ----------------------------------------------------------------


async def test_metrics_say_which_door_a_call_came_through(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, http_listen="127.0.0.1:0",
                                metrics_listen="127.0.0.1:0")
    async with running_gateway(settings) as running:
        async with sdk(running) as client:
            await client.chat.completions.create(
                model="gemma3n:e2b", messages=[{"role": "user", "content": "Hi"}])
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(model="gemma3n:e2b", messages=[])
        async with client_stub(running.address) as stub:
            await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
        async with httpx.AsyncClient() as raw:
            text = (await raw.get(f"http://127.0.0.1:{running.metrics_port}/metrics")).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def count(name: str, **labels: str) -> float:
        return sum(s.value for s in samples
                   if s.name == name and labels.items() <= s.labels.items())

    http = "http_server_request_duration_seconds_count"
    assert count(http, agentloop_door="http", http_route="/v1/chat/completions",
                 http_response_status_code="200") == 1
    assert count(http, agentloop_door="http", http_response_status_code="400") == 1
    assert count("rpc_server_call_duration_seconds_count", agentloop_door="grpc") == 1
    first_token = "gen_ai_server_time_to_first_token_seconds_count"
    assert count(first_token, agentloop_door="http") == 1
    assert count(first_token, agentloop_door="grpc") == 1


# --- the Node SDK -------------------------------------------------------------------------

NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_the_node_sdk_chats_and_streams(door):
    proc = await asyncio.create_subprocess_exec(
        NODE, str(ROOT / "tests/openai_door.mjs"), f"http://{door.http_address}/v1", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode() + out.decode()
    assert out.decode().splitlines() == ["chat: Hello, world! [stop, 4 tokens]",
                                         "stream: Hello, world! [4 tokens]"]
