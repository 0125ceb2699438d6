"""Function calling in Generate and StreamGenerate, through the real gateway and real
channels: against the fake Ollama (its `tools` and `message.tool_calls`) and the fake
OpenAI server (`tools`, `tool_choice`, streamed `delta.tool_calls`); what bad tools, tool
choices and tool turns become (INVALID_ARGUMENT naming the field); a round trip where the
model calls a tool, the test answers it, and the model finishes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc
import pytest

from agentloop.backends.openai import OpenAIBackend
from agentloop.domain import ToolCallDelta
from agentloop.rpc.coalesce import coalesced
from agentloop.server import RunningServer
from agentloop.tool_calls import CallReader
from agentloop.upstreams.spec import EndpointSpec, OpenAIDialect
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from fake_ollama import FakeOllama
from fake_ollama import Script as OllamaScript
from fake_openai import DEFAULT_MODEL, FakeOpenAI
from fake_openai import Script as OpenAIScript
from helpers import bad_fields, client_stub, gateway_settings, running_gateway

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"],
}
WEATHER = pb.ToolDefinition(name="get_weather", description="The weather in a city.",
                            parameters_json_schema=json.dumps(WEATHER_SCHEMA))
CLOCK = pb.ToolDefinition(name="get_time", description="The time now.")
ASK = [pb.Message(role=pb.ROLE_USER, content="What is the weather in Paris?")]


def generate(**fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"messages": ASK, "tools": [WEATHER, CLOCK], **fields})


def streamed(**fields: Any) -> pb.StreamGenerateRequest:
    return pb.StreamGenerateRequest(**{"messages": ASK, "tools": [WEATHER, CLOCK], **fields})


def assembled(replies: list[pb.StreamGenerateResponse]) -> list[pb.ToolCall]:
    """The calls the stream's deltas make, joined by index."""
    calls: dict[int, pb.ToolCall] = {}
    for reply in replies:
        for delta in reply.tool_call_deltas:
            call = calls.setdefault(delta.index, pb.ToolCall())
            call.id = call.id or delta.id
            call.name = call.name or delta.name
            call.arguments_json += delta.arguments_json
    return [calls[index] for index in sorted(calls)]


# --- the fake Ollama ---------------------------------------------------------------------

@pytest.fixture
async def ollama() -> AsyncIterator[FakeOllama]:
    fake = FakeOllama()
    fake.capabilities[fake.models[0]] = ["completion", "tools"]
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def ollama_stub(ollama: FakeOllama) -> AsyncIterator[pb_grpc.AgentLoopServiceStub]:
    async with running_gateway(gateway_settings(ollama_url=ollama.url)) as running, \
            client_stub(running.address) as stub:
        yield stub


PARIS = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}


async def test_ollama_tool_calls_come_back_with_ids_and_finish_reason(
        ollama: FakeOllama, ollama_stub: pb_grpc.AgentLoopServiceStub) -> None:
    ollama.enqueue(OllamaScript(tokens=[], tool_calls=[PARIS]))
    reply = await ollama_stub.Generate(generate())
    assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    [call] = reply.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.arguments_json) == {"city": "Paris", "days": 2}
    sent = ollama.generation_requests[-1]
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "get_time"]
    assert sent["tools"][0]["function"]["parameters"] == WEATHER_SCHEMA


async def test_ollama_stream_sends_call_deltas_and_the_calls_at_the_end(
        ollama: FakeOllama, ollama_stub: pb_grpc.AgentLoopServiceStub) -> None:
    ollama.enqueue(OllamaScript(tokens=["Let", " me", " look."], tool_calls=[
        PARIS, {"name": "get_time", "arguments": {}}]))
    replies = [reply async for reply in ollama_stub.StreamGenerate(streamed())]
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert "".join(reply.text for reply in replies) == "Let me look."
    assert [call.name for call in last.tool_calls] == ["get_weather", "get_time"]
    assert assembled(replies) == list(last.tool_calls)
    assert len({call.id for call in last.tool_calls}) == 2


async def test_round_trip_a_tool_result_goes_back_by_call_id(
        ollama: FakeOllama, ollama_stub: pb_grpc.AgentLoopServiceStub) -> None:
    ollama.enqueue(OllamaScript(tokens=[], tool_calls=[PARIS]),
                   OllamaScript(tokens=["It", " is", " sunny."]))
    first = await ollama_stub.Generate(generate())
    [call] = first.tool_calls
    chat = [*ASK, pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id=call.id, content='{"sky": "clear"}')]
    second = await ollama_stub.Generate(generate(messages=chat))
    assert second.finish_reason == pb.FINISH_REASON_STOP
    assert second.text == "It is sunny." and not second.tool_calls
    sent = ollama.generation_requests[-1]["messages"]
    assert sent[1]["tool_calls"] == [{"function": {"name": "get_weather",
                                                   "arguments": {"city": "Paris", "days": 2}}}]
    assert sent[2] == {"role": "tool", "content": '{"sky": "clear"}', "tool_name": "get_weather"}


async def test_ollama_cannot_be_made_to_call_a_tool(
        ollama: FakeOllama, ollama_stub: pb_grpc.AgentLoopServiceStub) -> None:
    for choice in (pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED),
                   pb.ToolChoice(mode=pb.ToolChoice.MODE_TOOL, name="get_time")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ollama_stub.Generate(generate(tool_choice=choice))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(caught.value) == {"tool_choice.mode"}
    assert not ollama.generation_requests


async def test_tool_choice_none_sends_no_tools(
        ollama: FakeOllama, ollama_stub: pb_grpc.AgentLoopServiceStub) -> None:
    reply = await ollama_stub.Generate(generate(
        tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_NONE)))
    assert reply.finish_reason == pb.FINISH_REASON_STOP
    assert "tools" not in ollama.generation_requests[-1]


async def test_a_call_of_an_undeclared_tool_is_the_upstreams_fault(
        ollama: FakeOllama, ollama_stub: pb_grpc.AgentLoopServiceStub) -> None:
    ollama.enqueue(OllamaScript(tokens=[], tool_calls=[{"name": "rm_rf", "arguments": {}}]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ollama_stub.Generate(generate())
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


# --- bad input -----------------------------------------------------------------------------

CALL = pb.ToolCall(id="call_1", name="get_weather", arguments_json='{"city": "Oslo"}')


@pytest.mark.parametrize(("fields", "expected"), [
    ({"tools": [WEATHER, pb.ToolDefinition(name="x", parameters_json_schema="{not json")]},
     {"tools[1].parameters_json_schema"}),
    ({"tools": [WEATHER, CLOCK, pb.ToolDefinition(
        name="y", parameters_json_schema='{"type": "array"}')]},
     {"tools[2].parameters_json_schema"}),
    ({"tools": [WEATHER, pb.ToolDefinition(name="get_weather")]}, {"tools[1].name"}),
    ({"tools": [pb.ToolDefinition(name="bad name!")]}, {"tools[0].name"}),
    ({"tool_choice": pb.ToolChoice(mode=pb.ToolChoice.MODE_TOOL, name="get_news")},
     {"tool_choice.name"}),
    ({"tool_choice": pb.ToolChoice(mode=pb.ToolChoice.MODE_AUTO, name="get_time")},
     {"tool_choice.name"}),
    ({"tools": [], "tool_choice": pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)},
     {"tool_choice.mode"}),
    ({"messages": [*ASK, pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[CALL]),
                   pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="5C"),
                   pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_9", content="?")]},
     {"messages[3].tool_call_id"}),
    ({"messages": [*ASK, pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[CALL]),
                   pb.Message(role=pb.ROLE_TOOL, content="5C")]},
     {"messages[2].tool_call_id"}),
    ({"messages": [*ASK, pb.Message(role=pb.ROLE_USER, content="x", tool_calls=[CALL])]},
     {"messages[1].tool_calls"}),
    ({"messages": [*ASK, pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(
        id="c", name="get_weather", arguments_json="[1]")])]},
     {"messages[1].tool_calls[0].arguments_json"}),
    ({"messages": [], "prompt": "Weather?"}, {"tools"}),
    ({"format": pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON)}, {"format"}),
])
async def test_bad_tools_are_invalid_argument_naming_the_field(
        ollama: FakeOllama, ollama_stub: pb_grpc.AgentLoopServiceStub,
        fields: dict[str, Any], expected: set[str]) -> None:
    for call in (ollama_stub.Generate(generate(**fields)),
                 _first(ollama_stub.StreamGenerate(streamed(**fields)))):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(caught.value) == expected, caught.value.details()
    assert not ollama.generation_requests


async def _first(call: Any) -> Any:
    return await call.read()


async def test_too_many_tools_are_refused_unread(
        ollama_stub: pb_grpc.AgentLoopServiceStub) -> None:
    tools = [pb.ToolDefinition(name=f"t{index}") for index in range(65)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ollama_stub.Generate(generate(tools=tools))
    assert bad_fields(caught.value) == {"tools"}


# --- the fake OpenAI server ---------------------------------------------------------------

@contextlib.asynccontextmanager
async def openai_gateway(fake: FakeOpenAI, dialect: OpenAIDialect | None = None
                         ) -> AsyncIterator[RunningServer]:
    settings = gateway_settings(model=DEFAULT_MODEL)
    backend = OpenAIBackend(EndpointSpec(upstream="pool", kind="openai", url=fake.url,
                                         dialect=dialect or OpenAIDialect(),
                                         read_timeout=10.0), settings)
    async with running_gateway(settings, backend=backend) as running:
        yield running


@pytest.fixture
async def openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


OSLO = {"id": "call_abc", "name": "get_weather", "arguments": '{"city": "Oslo", "days": 3}'}


async def test_openai_streamed_call_pieces_assemble(openai: FakeOpenAI) -> None:
    openai.enqueue(OpenAIScript(tokens=[], tool_calls=[OSLO, {
        "name": "get_time", "arguments": "{}"}], argument_pieces=4))
    async with openai_gateway(openai) as running, client_stub(running.address) as stub:
        replies = [reply async for reply in stub.StreamGenerate(streamed(
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)))]
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert [(c.id, c.name) for c in last.tool_calls] == [("call_abc", "get_weather"),
                                                         ("call_1", "get_time")]
    assert json.loads(last.tool_calls[0].arguments_json) == {"city": "Oslo", "days": 3}
    assert assembled(replies) == list(last.tool_calls)  # however the pieces were joined
    sent = openai.generation_requests[-1]
    assert sent["tool_choice"] == "required"
    assert sent["tools"][0] == {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": WEATHER_SCHEMA}}


async def test_openai_round_trip_with_a_named_tool(openai: FakeOpenAI) -> None:
    openai.enqueue(OpenAIScript(tokens=[], tool_calls=[OSLO]),
                   OpenAIScript(tokens=["Snow", "."]))
    async with openai_gateway(openai) as running, client_stub(running.address) as stub:
        first = await stub.Generate(generate(tool_choice=pb.ToolChoice(
            mode=pb.ToolChoice.MODE_TOOL, name="get_weather")))
        assert first.finish_reason == pb.FINISH_REASON_TOOL_CALLS
        [call] = first.tool_calls
        chat = [*ASK, pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id=call.id, content="-4C, snow")]
        second = await stub.Generate(generate(messages=chat))
    assert (second.text, second.finish_reason) == ("Snow.", pb.FINISH_REASON_STOP)
    assert openai.generation_requests[0]["tool_choice"] == {
        "type": "function", "function": {"name": "get_weather"}}
    sent = openai.generation_requests[1]["messages"]
    assert sent[1]["tool_calls"] == [{"id": "call_abc", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo", "days": 3}'}}]
    assert sent[2] == {"role": "tool", "content": "-4C, snow", "tool_call_id": "call_abc"}


async def test_a_dialect_without_required_sends_one_tool_by_name(openai: FakeOpenAI) -> None:
    dialect = OpenAIDialect(tool_choice_required=False)
    openai.enqueue(OpenAIScript(tokens=[], tool_calls=[OSLO]))
    required = pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)
    async with openai_gateway(openai, dialect) as running, \
            client_stub(running.address) as stub:
        reply = await stub.Generate(generate(tools=[WEATHER], tool_choice=required))
        assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS
        assert openai.generation_requests[-1]["tool_choice"] == {
            "type": "function", "function": {"name": "get_weather"}}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(generate(tool_choice=required))
    assert bad_fields(caught.value) == {"tool_choice.mode"}
    assert len(openai.generation_requests) == 1


async def test_openai_arguments_that_are_not_an_object_are_the_upstreams_fault(
        openai: FakeOpenAI) -> None:
    openai.enqueue(OpenAIScript(tokens=[], tool_calls=[{**OSLO, "arguments": "[1, 2"}]))
    async with openai_gateway(openai) as running, client_stub(running.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(generate())
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


# --- the call reader (the embedded engine's answers under the call grammar) -------------

def test_call_reader_streams_arguments_and_holds_the_closing_brace() -> None:
    reader = CallReader("call_x")
    text = '{"tool": "get_weather", "arguments": {"city": "Rome", "n": {"a": 1}}} '
    out: list[object] = []
    for char in text:
        out += reader.feed(char)
    rest, calls = reader.finish()
    deltas = [*out, *rest]
    assert all(isinstance(delta, ToolCallDelta) for delta in deltas)
    assert deltas[0] == ToolCallDelta(0, id="call_x", name="get_weather")
    joined = "".join(delta.arguments_json for delta in deltas)  # type: ignore[union-attr]
    assert joined == '{"city": "Rome", "n": {"a": 1}}' == calls[0].arguments_json
    assert calls[0].name == "get_weather"


def test_call_reader_passes_text_through_and_a_cut_call_is_no_call() -> None:
    reader = CallReader()
    assert reader.feed("Hello {") == ["Hello {"]
    assert reader.finish() == ([], ())
    cut = CallReader()
    cut.feed('{"tool": "get_weather", "arguments": {"city": "Ro')
    assert cut.finish() == ([], ())


# --- a reader that falls behind -----------------------------------------------------------

async def test_a_lagging_reader_gets_a_calls_pieces_joined() -> None:
    """Pieces of one call's arguments pile up joined (as text deltas do), never one message
    per piece for a reader that falls behind; a new call's first piece stays apart."""
    pieces = [ToolCallDelta(0, "call_a", "get_weather")] + [
        ToolCallDelta(0, arguments_json=str(n % 10)) for n in range(2000)] + [
        ToolCallDelta(1, "call_b", "get_time", "{}")]

    async def source() -> AsyncIterator[object]:
        for piece in pieces:
            yield piece

    out = []
    async with aclosing(coalesced(source(), max_backlog=64)) as items:
        async for item in items:
            out.append(item)
            await asyncio.sleep(0.001)  # a slow reader: the rest piles up meanwhile
    assert len(out) < 200
    assert (out[0].id, out[0].name) == ("call_a", "get_weather") and out[-1] == pieces[-1]
    assert sum(1 for d in out if d.id) == 2
    assert "".join(d.arguments_json for d in out if d.index == 0) == "".join(
        str(n % 10) for n in range(2000))


async def test_an_undeclared_call_fails_before_any_piece_of_it_is_sent(openai: FakeOpenAI) -> None:
    openai.enqueue(OpenAIScript(tokens=["Sure."], tool_calls=[{**OSLO, "name": "rm_rf"}]))
    async with openai_gateway(openai) as running, client_stub(running.address) as stub:
        call = stub.StreamGenerate(streamed())
        replies = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for reply in call:
                replies.append(reply)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "".join(r.text for r in replies) == "Sure."
    assert not any(r.tool_call_deltas for r in replies)


async def test_an_upstream_id_too_long_to_send_back_is_replaced(openai: FakeOpenAI) -> None:
    openai.enqueue(OpenAIScript(tokens=[], tool_calls=[{**OSLO, "id": "x" * 65}]))
    async with openai_gateway(openai) as running, client_stub(running.address) as stub:
        reply = await stub.Generate(generate())
        [call] = reply.tool_calls
        assert call.id.startswith("call_") and len(call.id) <= 64
        # The round trip takes it back.
        chat = [*ASK, pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id=call.id, content="ok")]
        await stub.Generate(generate(messages=chat))
