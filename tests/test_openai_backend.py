"""The OpenAI-compatible backend against the fake OpenAI server, through the real gateway and
real channels: what each request becomes on the wire, both dialects, and every fault the
fake can script as the caller sees it (status and rich details, no upstream text)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import grpc
import pytest
from llama_cpp import llama_grammar
from test_security import Pki

from agentloop.backends.constraints import grammar_for_schema
from agentloop.backends.openai import OpenAIBackend, parse_stream, retry_after, sse_events
from agentloop.domain import (
    CallContext,
    EmbeddingRequest,
    FinishReason,
    GenerationEnd,
    GenerationRequest,
    SamplingOptions,
    TokenCountRequest,
)
from agentloop.errors import (
    BackendProtocolError,
    BackendStreamFailed,
    InvalidArgument,
    Unimplemented,
)
from agentloop.server import RunningServer
from agentloop.upstreams.spec import (
    CompletionsFormat,
    EndpointSpec,
    OpenAIDialect,
    SchemaStyle,
    TlsSpec,
)
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from fake_ollama import wait_until
from fake_openai import DEFAULT_MODEL, FakeOpenAI, Script
from helpers import (
    PERSON_SCHEMA,
    bad_fields,
    client_stub,
    gateway_settings,
    rich_details,
    running_gateway,
)

TOKENS = ["Hello", ",", " world", "!"]
UPSTREAM = "fake-pool"
LLAMA_CPP = OpenAIDialect(schema_style=SchemaStyle.JSON_OBJECT, stream_usage=False,
                          sampling_extras=True, repeat_penalty_field="repeat_penalty",
                          completions_format=CompletionsFormat.GRAMMAR, strict_schema=False,
                          stop_limit=0)


def endpoint(fake: FakeOpenAI, **fields: Any) -> EndpointSpec:
    values: dict[str, Any] = {"upstream": UPSTREAM, "kind": "openai", "url": fake.url,
                              "connect_timeout": 0.5, "read_timeout": 10.0,
                              "max_in_flight": 8}
    values.update(fields)
    return EndpointSpec(**values)


@contextlib.asynccontextmanager
async def gateway_on(fake: FakeOpenAI, **fields: Any) -> AsyncIterator[RunningServer]:
    settings = gateway_settings(model=DEFAULT_MODEL)
    backend = OpenAIBackend(endpoint(fake, **fields), settings)
    async with running_gateway(settings, backend=backend) as running:
        yield running


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(default_script=Script(tokens=TOKENS))
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
def dialect() -> OpenAIDialect:
    return OpenAIDialect()


@pytest.fixture
async def stub(fake: FakeOpenAI, dialect: OpenAIDialect
               ) -> AsyncIterator[pb_grpc.AgentLoopServiceStub]:
    async with gateway_on(fake, dialect=dialect) as gateway, \
            client_stub(gateway.address) as stub:
        await wait_until(lambda: gateway.health.ready)
        yield stub


def chat(text: str = "Hi there", **fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, content=text)], **fields)


def direct_request(**fields: Any) -> GenerationRequest:
    """A resolved request for the backend itself (the gateway's defaults applied)."""
    settings = gateway_settings()
    options = SamplingOptions(temperature=settings.temperature, top_p=settings.top_p,
                              top_k=settings.top_k, max_tokens=64,
                              repeat_penalty=settings.repeat_penalty, num_ctx=settings.num_ctx)
    values: dict[str, Any] = {"model": DEFAULT_MODEL, "options": options, "prompt": "Hi"}
    values.update(fields)
    return GenerationRequest(**values)


# --- what a call becomes -----------------------------------------------------------------


async def test_a_chat_streams_through_chat_completions_with_usage(stub, fake):
    fake.enqueue(Script(tokens=TOKENS, cached_tokens=2))
    replies = [r async for r in stub.StreamGenerate(pb.StreamGenerateRequest(
        system="Be brief.", messages=[pb.Message(role=pb.ROLE_USER, content="Hi there")],
        options=pb.GenerationOptions(temperature=0.2, seed=7, max_tokens=50, stop=["\n\n"]),
    ), timeout=10)]

    assert [r.text for r in replies[:-1]] == TOKENS
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP and last.model == DEFAULT_MODEL
    assert (last.usage.input_tokens, last.usage.output_tokens,
            last.usage.cached_input_tokens) == (4, 4, 0)  # no cache_salt: cached not told
    path, body = fake.requests[-1]
    assert path == "/v1/chat/completions"
    assert body == {
        "model": DEFAULT_MODEL, "stream": True, "stream_options": {"include_usage": True},
        "temperature": pytest.approx(0.2), "top_p": pytest.approx(0.9), "max_tokens": 50,
        "seed": 7, "stop": ["\n\n"],
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi there"}],
    }


async def test_generate_returns_the_whole_text_and_a_length_finish(stub, fake):
    reply = await stub.Generate(chat(options=pb.GenerationOptions(max_tokens=2)), timeout=10)
    assert reply.text == "Hello,"
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH
    assert reply.usage.output_tokens == 2
    assert reply.timings.time_to_first_token.ToNanoseconds() > 0


async def test_a_raw_prompt_goes_to_completions(stub, fake):
    reply = await stub.Generate(pb.GenerateRequest(prompt="Once upon"), timeout=10)
    assert reply.text == "".join(TOKENS)
    path, body = fake.requests[-1]
    assert path == "/v1/completions" and body["prompt"] == "Once upon"
    assert "messages" not in body


async def test_a_prompt_with_a_system_goes_as_a_chat(stub, fake):
    await stub.Generate(pb.GenerateRequest(prompt="Once upon", system="Tell tales."),
                        timeout=10)
    path, body = fake.requests[-1]
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "system", "content": "Tell tales."},
                                {"role": "user", "content": "Once upon"}]


@pytest.mark.parametrize("dialect", [dataclasses.replace(LLAMA_CPP, completions=False)])
async def test_without_completions_a_prompt_is_one_user_turn(stub, fake, dialect):
    fake.completions, fake.extras = False, {"top_k", "repeat_penalty"}
    reply = await stub.Generate(pb.GenerateRequest(prompt="Once upon"), timeout=10)
    assert reply.text == "".join(TOKENS)
    path, body = fake.requests[-1]
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "Once upon"}]


async def test_images_travel_as_data_urls(stub, fake):
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    await stub.Generate(pb.GenerateRequest(messages=[pb.Message(
        role=pb.ROLE_USER, content="What is this?", images=[png])]), timeout=10)
    _, body = fake.requests[-1]
    (message,) = body["messages"]
    text, image = message["content"]
    assert text == {"type": "text", "text": "What is this?"}
    assert image["type"] == "image_url"
    assert image["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")


def schema_format(schema: dict[str, Any]) -> pb.ResponseFormat:
    return pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA,
                             json_schema=json.dumps(schema))


#: A schema OpenAI's strict mode takes: every object closed, every property required.
STRICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"},
                   "tags": {"type": "array", "maxItems": 3, "items": {
                       "type": "object", "properties": {"label": {"type": "string"}},
                       "required": ["label"], "additionalProperties": False}},
                   "age": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]}},
    "required": ["name", "tags", "age"],
    "additionalProperties": False,
}


async def test_json_and_schema_formats_in_the_openai_dialect(stub, fake):
    await stub.Generate(chat(format=pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON)),
                        timeout=10)
    assert fake.requests[-1][1]["response_format"] == {"type": "json_object"}
    await stub.Generate(chat(format=schema_format(STRICT_SCHEMA)), timeout=10)
    assert fake.requests[-1][1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": STRICT_SCHEMA, "strict": True}}


@pytest.mark.parametrize("schema", [
    PERSON_SCHEMA,  # maxLength: a keyword strict mode does not take
    {"anyOf": [STRICT_SCHEMA, {"type": "object", "properties": {}, "required": [],
                               "additionalProperties": False}]},  # not an object root
    {**STRICT_SCHEMA, "required": ["name", "tags"]},  # an optional property
    {**STRICT_SCHEMA, "additionalProperties": True},  # an open object
    {**STRICT_SCHEMA, "properties": {**STRICT_SCHEMA["properties"], "tags": {
        "type": "array", "items": {"type": "object", "properties": {"x": {"type": "string"}},
                                   "required": ["x"]}}}},  # a nested open object
], ids=["unknown-keyword", "anyOf-root", "optional-property", "open-root", "open-nested"])
async def test_strict_is_sent_false_for_a_schema_strict_mode_refuses(stub, fake, schema):
    """OpenAI refuses `strict: true` with these (the agent's action schema is an anyOf):
    the schema goes with `strict: false`, which OpenAI takes."""
    await stub.Generate(chat(format=schema_format(schema)), timeout=10)
    assert fake.requests[-1][1]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": schema,
                                               "strict": False}}


@pytest.mark.parametrize("dialect", [OpenAIDialect(strict_schema=False)])
async def test_strict_is_left_out_where_the_dialect_says(stub, fake, dialect):
    await stub.Generate(chat(format=schema_format(STRICT_SCHEMA)), timeout=10)
    assert fake.requests[-1][1]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": STRICT_SCHEMA}}


# How each dialect's /completions takes a raw prompt's format, and the keys it accepts.
RAW_FORMAT_DIALECTS = {
    "vllm": (OpenAIDialect(completions_format=CompletionsFormat.RESPONSE_FORMAT),
             {"response_format"}),
    "llama.cpp": (dataclasses.replace(LLAMA_CPP, completions_format=CompletionsFormat.JSON_SCHEMA),
                  {"json_schema", "top_k", "repeat_penalty"}),
    "llama-cpp-python": (LLAMA_CPP, {"grammar", "top_k", "repeat_penalty"}),
}


@pytest.mark.parametrize("name", list(RAW_FORMAT_DIALECTS))
async def test_a_raw_prompt_with_a_format_carries_it_to_completions(fake, name):
    """The format reaches /completions in the field the dialect's engine honours there
    (llama-cpp-python's ignores `response_format`: it gets a grammar), never dropped."""
    dialect, fake.extras = RAW_FORMAT_DIALECTS[name]
    async with gateway_on(fake, dialect=dialect) as gateway, \
            client_stub(gateway.address) as stub:
        for form in (schema_format(PERSON_SCHEMA),
                     pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON)):
            await stub.Generate(pb.GenerateRequest(prompt="A person:", format=form), timeout=10)
    (schema_path, schema_body), (json_path, json_body) = fake.requests
    assert schema_path == json_path == "/v1/completions"
    carried = {key: (schema_body.get(key), json_body.get(key))
               for key in ("response_format", "json_schema", "grammar")}
    expected = {
        "vllm": {"response_format": (
            {"type": "json_schema", "json_schema": {"name": "output", "schema": PERSON_SCHEMA,
                                                    "strict": False}},
            {"type": "json_object"})},
        "llama.cpp": {"json_schema": (PERSON_SCHEMA, {})},
        "llama-cpp-python": {"grammar": (grammar_for_schema(json.dumps(PERSON_SCHEMA)),
                                         llama_grammar.JSON_GBNF)},
    }[name]
    assert carried == {key: expected.get(key, (None, None)) for key in carried}
    assert schema_body["prompt"] == "A person:" and "messages" not in schema_body


async def test_a_raw_prompt_with_a_format_is_refused_where_completions_takes_none(stub, fake):
    """OpenAI's legacy Completions has no response_format: the call is refused naming
    `format`, before anything is sent, instead of coming back unconstrained."""
    for form in (schema_format(PERSON_SCHEMA),
                 pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(pb.GenerateRequest(prompt="A person:", format=form),
                                timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(caught.value) == {"format"}
    assert not fake.requests
    # As a chat the same format is honoured.
    await stub.Generate(chat(format=schema_format(PERSON_SCHEMA)), timeout=10)
    assert fake.requests[-1][0] == "/v1/chat/completions"


@pytest.mark.parametrize("dialect", [LLAMA_CPP])
async def test_a_schema_the_grammar_converter_cannot_express_is_refused_naming_it(
        stub, fake, dialect):
    fake.extras = {"grammar", "top_k", "repeat_penalty"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(pb.GenerateRequest(prompt="A person:", format=schema_format(
            {"type": "object", "properties": {"a": {"type": "string", "pattern": "abc"}}})),
            timeout=10)  # the converter takes only patterns anchored with ^ and $
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == {"format.json_schema"}
    assert not fake.requests


async def test_stop_strings_beyond_the_limit_are_cut_by_the_gateway(stub, fake):
    """OpenAI takes 4 stop strings: the first 4 go to the upstream, the gateway cuts the
    stream at the others itself (one split across two deltas here) and closes the
    upstream's request there."""
    stops = ["<a>", "<b>", "<c>", "<d>", "STOP", "<f>"]
    fake.enqueue(Script(tokens=["one", " two", " ST", "OP", " three"] + [" more"] * 200,
                        token_delay=0.01))
    replies = [r async for r in stub.StreamGenerate(pb.StreamGenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content="Count")],
        options=pb.GenerationOptions(stop=stops)), timeout=10)]
    assert "".join(r.text for r in replies) == "one two "
    assert replies[-1].finish_reason == pb.FINISH_REASON_STOP
    assert fake.requests[-1][1]["stop"] == stops[:4]
    await wait_until(lambda: fake.disconnects == 1 and fake.active_streams == 0)


@pytest.mark.parametrize("dialect", [OpenAIDialect(stop_limit=0)])
async def test_every_stop_string_goes_where_the_upstream_has_no_limit(stub, fake, dialect):
    fake.stop_limit = 0
    stops = [f"<{n}>" for n in range(16)]
    reply = await stub.Generate(chat(options=pb.GenerationOptions(stop=stops)), timeout=10)
    assert reply.text == "".join(TOKENS)
    assert fake.requests[-1][1]["stop"] == stops


def action_text(tool: str, **arguments: Any) -> str:
    return json.dumps({"thought": "look it up", "tool": tool, "arguments": arguments})


async def test_a_tool_turn_answers_the_call_of_the_turn_before_it(stub, fake):
    """A tool result carries the id of the assistant turn's call (the agent's action form
    read as `tool_calls`), as OpenAI requires; ids follow the turns' places."""
    call = action_text("calculator", expression="17*23")
    messages = [pb.Message(role=pb.ROLE_USER, content="What is 17*23?"),
                pb.Message(role=pb.ROLE_ASSISTANT, content=call),
                pb.Message(role=pb.ROLE_TOOL, content="391")]
    await stub.Generate(pb.GenerateRequest(messages=messages), timeout=10)
    assert fake.requests[-1][1]["messages"] == [
        {"role": "user", "content": "What is 17*23?"},
        {"role": "assistant", "content": call, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression": "17*23"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "391"},
    ]


async def test_a_tool_turn_that_answers_no_call(stub, fake):
    """After free text there is no call to answer: the tool turn still gets an id of its
    own (llama-cpp-python requires one), and OpenAI's refusal of it is the caller's
    INVALID_ARGUMENT."""
    messages = [pb.Message(role=pb.ROLE_USER, content="Hi"),
                pb.Message(role=pb.ROLE_ASSISTANT, content="Let me check."),
                pb.Message(role=pb.ROLE_TOOL, content="391")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(pb.GenerateRequest(messages=messages), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fake.tool_pairing = False
    await stub.Generate(pb.GenerateRequest(messages=messages), timeout=10)
    assert fake.requests[-1][1]["messages"][1:] == [
        {"role": "assistant", "content": "Let me check."},
        {"role": "tool", "tool_call_id": "call_2", "content": "391"}]


@pytest.mark.parametrize("dialect", [LLAMA_CPP])
async def test_llama_cpp_dialect_schema_extras_and_no_stream_usage(stub, fake, dialect):
    fake.schema_style, fake.stream_usage = "json_object", False
    fake.extras = {"top_k", "repeat_penalty"}
    reply = await stub.Generate(chat(
        options=pb.GenerationOptions(top_k=5, repeat_penalty=1.3),
        format=pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA,
                                 json_schema=json.dumps(PERSON_SCHEMA))), timeout=10)

    assert reply.text == "".join(TOKENS)
    # The upstream's streams report no usage: the counts stay unset, never invented.
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (0, 0)
    _, body = fake.requests[-1]
    assert body["response_format"] == {"type": "json_object", "schema": PERSON_SCHEMA}
    assert body["top_k"] == 5 and body["repeat_penalty"] == pytest.approx(1.3)
    assert "stream_options" not in body


@pytest.mark.parametrize("option", ["top_k", "repeat_penalty"])
async def test_an_option_the_upstream_lacks_is_refused_when_the_caller_sets_it(
        stub, fake, option):
    value = {"top_k": 5, "repeat_penalty": 1.3}[option]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(chat(options=pb.GenerationOptions(**{option: value})), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == {f"options.{option}"}
    assert not fake.generation_requests  # refused before any upstream work
    # Left unset, the server's defaults are not the caller's: dropped, not sent.
    await stub.Generate(chat(options=pb.GenerationOptions(num_ctx=4096)), timeout=10)
    assert not {"top_k", "repeat_penalty", "repetition_penalty", "num_ctx"} & set(
        fake.requests[-1][1])


async def test_the_agent_loop_runs_unchanged(stub, fake):
    def action(**fields: Any) -> Script:
        text = json.dumps(fields)
        return Script(tokens=[text[i:i + 7] for i in range(0, len(text), 7)])

    fake.enqueue(action(tool="calculator", arguments={"expression": "17*23"}, thought="x"),
                 action(final_answer="391", thought="done"))
    reply = await stub.RunAgent(pb.RunAgentRequest(goal="What is 17*23?", max_steps=4),
                                timeout=10)
    assert reply.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER
    assert reply.final_answer == "391" and reply.steps[0].observation == "391"
    first = fake.generation_requests[0]
    assert first["response_format"]["type"] == "json_schema"
    assert "anyOf" in first["response_format"]["json_schema"]["schema"]
    # OpenAI refuses `strict: true` for an anyOf root.
    assert first["response_format"]["json_schema"]["strict"] is False


async def test_list_models_and_readiness_follow_the_model_list(fake):
    async with gateway_on(fake) as gateway, client_stub(gateway.address) as stub:
        await wait_until(lambda: gateway.health.ready)
        listed = await stub.ListModels(pb.ListModelsRequest(), timeout=5)
        assert [m.name for m in listed.models] == [DEFAULT_MODEL]
        assert listed.backend == "openai" and listed.default_model == DEFAULT_MODEL
        fake.models = ["another-model"]
        await wait_until(lambda: not gateway.health.ready)
        assert "not served" in gateway.health.last.reason


async def test_the_key_and_the_host_name_are_sent(fake):
    fake.api_key = "sk-test-key"
    async with gateway_on(fake, api_key="sk-test-key", host="engine.internal") as gateway, \
            client_stub(gateway.address) as stub:
        await stub.Generate(chat(), timeout=10)
    assert fake.headers["Authorization"] == "Bearer sk-test-key"
    assert fake.headers["Host"] == "engine.internal"


async def test_a_refused_key_is_unavailable_and_not_the_callers_fault(fake):
    fake.api_key = "sk-right"
    async with gateway_on(fake, api_key="sk-wrong") as gateway, \
            client_stub(gateway.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(chat(), timeout=10)
        assert not gateway.health.ready
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert rich_details(error)["ErrorInfo"].reason == "UPSTREAM_CREDENTIALS_REFUSED"
    assert "sk-" not in error.details() and "Incorrect" not in error.details()


async def test_cache_salt_carries_the_cache_scope_where_the_dialect_has_it(fake):
    backend = OpenAIBackend(endpoint(fake, dialect=OpenAIDialect(cache_salt=True)),
                            gateway_settings(model=DEFAULT_MODEL))
    fake.extras = {"cache_salt"}
    try:
        request = direct_request(context=CallContext(cache_scope="team-a"))
        items = [item async for item in backend.stream(request)]
    finally:
        await backend.close()
    assert fake.requests[-1][1]["cache_salt"] == "team-a"
    end = items[-1]
    assert isinstance(end, GenerationEnd) and end.upstream == UPSTREAM
    assert end.finish_reason is FinishReason.STOP


async def test_crlf_events_and_unknown_finish_reasons(fake):
    fake.crlf = True
    fake.enqueue(Script(tokens=TOKENS, finish_reason="content_filter"))
    backend = OpenAIBackend(endpoint(fake), gateway_settings(model=DEFAULT_MODEL))
    try:
        items = [item async for item in backend.stream(direct_request())]
    finally:
        await backend.close()
    assert items[:-1] == TOKENS
    assert items[-1].finish_reason is FinishReason.UNSPECIFIED


# --- embeddings and token counts ---------------------------------------------------------


async def test_embeddings_come_back_in_order_normalized_with_their_tokens(fake):
    backend = OpenAIBackend(endpoint(fake), gateway_settings(model=DEFAULT_MODEL))
    try:
        texts = ("first text", "the second one", "3")
        result = await backend.embed(EmbeddingRequest(model=DEFAULT_MODEL, texts=texts))
        raw = await backend.embed(EmbeddingRequest(model=DEFAULT_MODEL, texts=texts[:1],
                                                   normalize=False))
        short = await backend.embed(EmbeddingRequest(model=DEFAULT_MODEL, texts=texts[:1],
                                                     dimensions=4))
        fake.matryoshka = False  # an upstream that ignores `dimensions`
        with pytest.raises(InvalidArgument) as caught:
            await backend.embed(EmbeddingRequest(model=DEFAULT_MODEL, texts=texts[:1],
                                                 dimensions=4))
        with pytest.raises(Unimplemented):
            await backend.count_tokens(TokenCountRequest(model=DEFAULT_MODEL, texts=("a",)))
    finally:
        await backend.close()
    from fake_openai import embedding_of

    assert len(result.vectors) == 3 and result.input_tokens == 6
    assert result.upstream == UPSTREAM
    for text, vector in zip(texts, result.vectors, strict=True):
        assert math.hypot(*vector) == pytest.approx(1.0)
        expected = embedding_of(text, 8)
        assert vector == pytest.approx([x / math.hypot(*expected) for x in expected])
    assert raw.vectors[0] == pytest.approx(embedding_of(texts[0], 8))
    assert len(short.vectors[0]) == 4 and fake.requests[2][1]["dimensions"] == 4
    assert caught.value.violations[0][0] == "dimensions"


async def test_per_token_embeddings_are_mean_pooled(fake):
    from fake_openai import embedding_of

    fake.per_token = True
    backend = OpenAIBackend(endpoint(fake), gateway_settings(model=DEFAULT_MODEL))
    try:
        result = await backend.embed(EmbeddingRequest(model=DEFAULT_MODEL, texts=("a b",),
                                                      normalize=False))
    finally:
        await backend.close()
    a, b = embedding_of("a", 8), embedding_of("b", 8)
    assert result.vectors[0] == pytest.approx([(x + y) / 2 for x, y in zip(a, b, strict=True)])


# --- faults, as the caller sees them -------------------------------------------------------


def _http_date(seconds: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds), usegmt=True)


@pytest.mark.parametrize(("script", "code", "reason", "retry"), [
    (Script(status=429, retry_after="3"), grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED", 3.0),
    (Script(status=429, retry_after="in 30 s as an HTTP date"), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "OVERLOADED", 30.0),
    (Script(status=503, retry_after="2"), grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE",
     2.0),
    (Script(status=500), grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", 1.0),
    (Script(status=400), grpc.StatusCode.INVALID_ARGUMENT, "BACKEND_REJECTED_REQUEST", None),
    (Script(status=422), grpc.StatusCode.INVALID_ARGUMENT, "BACKEND_REJECTED_REQUEST", None),
    (Script(status=403), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_CREDENTIALS_REFUSED", 1.0),
    (Script(status=404), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", None),
    (Script(tokens=TOKENS, error_after=2), grpc.StatusCode.UNAVAILABLE,
     "BACKEND_STREAM_FAILED", 1.0),
    (Script(tokens=TOKENS, malformed_after=2), grpc.StatusCode.UNAVAILABLE,
     "BACKEND_PROTOCOL_ERROR", 1.0),
    (Script(tokens=TOKENS, reset_after=2), grpc.StatusCode.UNAVAILABLE,
     "BACKEND_STREAM_FAILED", 1.0),
    (Script(tokens=TOKENS, truncate=True), grpc.StatusCode.UNAVAILABLE,
     "BACKEND_STREAM_FAILED", 1.0),
    (Script(reset_after=0), grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", 1.0),
], ids=["429-seconds", "429-date", "503", "500", "400", "422", "403", "404", "error-event",
        "malformed", "reset", "truncated", "reset-before-headers"])
async def test_each_fault_maps_to_a_status_with_details(stub, fake, script, code, reason,
                                                         retry):
    script.error = "secret upstream text at http://10.0.0.7:8000/v1"
    if script.retry_after and "HTTP date" in script.retry_after:
        script.retry_after = _http_date(30)  # from now, not from when the tests were collected
    fake.enqueue(script)
    call = stub.StreamGenerate(pb.StreamGenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content="Hi")]), timeout=10)
    texts = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for reply in call:
            texts.append(reply.text)
    error = caught.value
    assert error.code() == code, error.details()
    details = rich_details(error)
    assert details["ErrorInfo"].reason == reason
    if retry is None:
        assert "RetryInfo" not in details
    else:
        assert details["RetryInfo"].retry_delay.ToNanoseconds() / 1e9 == pytest.approx(
            retry, abs=1.5)
    assert "secret" not in error.details() and "10.0.0.7" not in error.details()
    assert fake.url not in error.details()
    if script.error_after or script.malformed_after or script.reset_after:
        assert "".join(texts) == "Hello,"  # what had streamed stays streamed
    if script.truncate:
        assert "".join(texts) == "".join(TOKENS)


async def test_an_unreachable_upstream_is_unavailable(fake):
    async with gateway_on(fake) as gateway, client_stub(gateway.address) as stub:
        await fake.stop()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(chat(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        await wait_until(lambda: not gateway.health.ready)
        await fake.restart()  # the endpoint comes back
        await wait_until(lambda: gateway.health.ready)
        assert (await stub.Generate(chat(), timeout=10)).text == "".join(TOKENS)


def test_retry_after_reads_seconds_and_dates_and_stays_bounded():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after("7") == 7.0 and retry_after(" 1.5 ") == 1.5
    assert retry_after(format_datetime(now + timedelta(seconds=20), usegmt=True),
                       now=now.timestamp()) == pytest.approx(20.0)
    assert retry_after(None) == retry_after("soon") == retry_after("nan") == 1.0
    assert retry_after("-5") == 0.1 and retry_after("99999999") == 3600.0


# --- cancellation and deadlines close the upstream request ---------------------------------


async def test_a_cancelled_stream_closes_the_upstream_request(stub, fake):
    fake.enqueue(Script(tokens=TOKENS, hang_after=2))
    call = stub.StreamGenerate(pb.StreamGenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content="Hi")]), timeout=10)
    assert (await call.read()).text == "Hello"
    await wait_until(lambda: fake.active_streams == 1)
    call.cancel()
    await wait_until(lambda: fake.disconnects == 1 and fake.active_streams == 0)


async def test_a_deadline_closes_the_upstream_request_before_the_first_token(stub, fake):
    fake.enqueue(Script(tokens=TOKENS, first_token_delay=30))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(chat(), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until(lambda: fake.disconnects == 1 and fake.active_streams == 0)


async def test_concurrent_streams_all_arrive_whole(stub, fake):
    fake.default_script = Script(tokens=TOKENS * 20, token_delay=0.001)

    async def one() -> str:
        return "".join([r.text async for r in stub.StreamGenerate(
            pb.StreamGenerateRequest(prompt="Hi"), timeout=20)])

    texts = await asyncio.gather(*(one() for _ in range(8)))
    assert texts == ["".join(TOKENS * 20)] * 8


# --- the event reader ----------------------------------------------------------------------


async def _items(body: bytes, cut: int) -> list[Any]:
    async def chunks() -> AsyncIterator[bytes]:
        yield body[:cut]
        yield body[cut:]

    return [item async for item in parse_stream(sse_events(chunks()), direct_request(),
                                                UPSTREAM)]


async def test_events_read_alike_wherever_the_body_is_cut():
    """CRLF and LF line ends, comments, other fields, data over two lines, a chunk with no
    content: the same deltas and end, cut between any two bytes."""
    def chunk(text: str) -> str:
        return json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})

    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    body = (": ping\r\n\r\n"
            f"id: 1\r\ndata: {chunk('Hel')}\r\n\r\n"
            'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n'
            f"event: message\ndata: {chunk('lo')[:12]}\ndata: {chunk('lo')[12:]}\n\n"
            'data:{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\r\n\r\n'
            f"data: {usage}\n\ndata: [DONE]\n\n").encode()
    for cut in range(len(body) + 1):
        items = await _items(body, cut)
        assert items[:-1] == ["Hel", "lo"], cut
        end = items[-1]
        assert end.finish_reason is FinishReason.LENGTH
        assert (end.usage.input_tokens, end.usage.output_tokens) == (3, 2)


async def test_an_error_event_fails_the_stream():
    body = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n' \
           b'event: error\ndata: {"message": "overloaded"}\n\n'
    with pytest.raises(BackendStreamFailed):
        await _items(body, 10)


# --- TLS: the CA, the client certificate, the name checked ---------------------------------


@pytest.fixture(scope="module")
def upstream_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def tls_fake(upstream_pki: Pki) -> AsyncIterator[FakeOpenAI]:
    """The fake over mutual TLS: a server certificate for localhost and 127.0.0.1, client
    certificates of the test CA required."""
    pki = upstream_pki
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.directory / "server.pem", pki.directory / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    fake = FakeOpenAI(default_script=Script(tokens=TOKENS))
    await fake.start(tls=context)
    try:
        yield fake
    finally:
        await fake.stop()


def client_tls(pki: Pki, client: str | None = "client") -> TlsSpec:
    if client is None:
        return TlsSpec(ca_file=str(pki.ca))
    return TlsSpec(ca_file=str(pki.ca), client_cert=str(pki.directory / f"{client}.pem"),
                   client_key=str(pki.directory / f"{client}.key"))


async def test_mutual_tls_checks_the_host_name_against_the_certificate(tls_fake, upstream_pki):
    async with gateway_on(tls_fake, host="localhost", tls=client_tls(upstream_pki)) as gateway, \
            client_stub(gateway.address) as stub:
        assert (await stub.Generate(chat(), timeout=10)).text == "".join(TOKENS)
    assert tls_fake.headers["Host"] == "localhost"


@pytest.mark.parametrize(("host", "client"), [("elsewhere.example", "client"),
                                              ("localhost", None), ("localhost", "stranger")],
                         ids=["a-name-the-certificate-lacks", "no-client-certificate",
                              "a-stranger's-certificate"])
async def test_tls_that_does_not_check_out_is_unavailable(tls_fake, upstream_pki, host,
                                                          client):
    async with gateway_on(tls_fake, host=host, tls=client_tls(upstream_pki, client)) as gateway, \
            client_stub(gateway.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(chat(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not tls_fake.generation_requests


async def test_an_event_without_end_is_bounded():
    async def endless() -> AsyncIterator[bytes]:
        yield b"data: "
        for _ in range(64):
            yield b"x" * 65536  # 4 MiB and never a blank line

    with pytest.raises(BackendProtocolError):
        async for _ in sse_events(endless()):
            pass
