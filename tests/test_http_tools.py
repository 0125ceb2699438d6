"""Function calling through the HTTP door (issue 33): OpenAI's `tools`, `tool_choice`,
assistant `tool_calls` and `tool` turns mapped onto Generate's by the gRPC API's own rules,
tool calls answered as `message.tool_calls` and streamed `delta.tool_calls` pieces. Driven
by the official `openai` SDKs (Python and Node) and LangChain's `ChatOpenAI`, against the
real gateway in front of the fake Ollama and the fake OpenAI upstream, both scripted to
call tools."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from agentloop.backends.openai import OpenAIBackend
from agentloop.server import RunningServer
from agentloop.upstreams.spec import EndpointSpec
from fake_ollama import FakeOllama
from fake_ollama import Script as OllamaScript
from fake_openai import DEFAULT_MODEL as OPENAI_MODEL
from fake_openai import FakeOpenAI
from fake_openai import Script as OpenAIScript
from helpers import ROOT, gateway_settings, running_gateway

MODEL = "gemma3n:e2b"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": WEATHER_SCHEMA}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now."}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PARIS = {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}
OSLO = {"id": "call_abc", "name": "get_weather", "arguments": '{"city": "Oslo", "days": 3}'}


@pytest.fixture
async def ollama() -> AsyncIterator[FakeOllama]:
    fake = FakeOllama()
    fake.capabilities[MODEL] = ["completion", "tools"]
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def ollama_door(ollama: FakeOllama) -> AsyncIterator[RunningServer]:
    async with running_gateway(gateway_settings(ollama_url=ollama.url,
                                                http_listen="127.0.0.1:0")) as running:
        yield running


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@contextlib.asynccontextmanager
async def openai_door(fake: FakeOpenAI) -> AsyncIterator[RunningServer]:
    settings = gateway_settings(model=OPENAI_MODEL, http_listen="127.0.0.1:0")
    backend = OpenAIBackend(EndpointSpec(upstream="pool", kind="openai", url=fake.url,
                                         read_timeout=10.0), settings)
    async with running_gateway(settings, backend=backend) as running:
        yield running


def sdk(running: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{running.http_address}/v1", api_key="unused",
                              max_retries=0)


# --- the round trip, on the fake Ollama -------------------------------------------------


async def test_a_tool_round_trip_through_the_sdk(ollama, ollama_door):
    ollama.enqueue(OllamaScript(tokens=[], tool_calls=[PARIS]),
                   OllamaScript(tokens=["It", " is", " sunny."]))
    async with sdk(ollama_door) as client:
        first = await client.chat.completions.create(model=MODEL, messages=ASK,
                                                     tools=[WEATHER, CLOCK])
        [choice] = first.choices
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
        assert first.usage.prompt_tokens > 0
        # The assistant's message goes back as the SDK returned it, then the result.
        second = await client.chat.completions.create(model=MODEL, tools=[WEATHER, CLOCK],
                                                      messages=[
            *ASK, choice.message,
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}])
    assert second.choices[0].message.content == "It is sunny."
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.tool_calls is None
    sent = ollama.generation_requests
    assert sent[0]["tools"] == [WEATHER, {"type": "function", "function": {
        "name": "get_time", "description": "The time now.",
        "parameters": {"type": "object"}}}]
    assert sent[1]["messages"][1]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]
    assert sent[1]["messages"][2] == {"role": "tool", "content": '{"sky": "clear"}',
                                      "tool_name": "get_weather"}


async def test_a_streamed_answer_that_opens_with_calls(ollama, ollama_door):
    ollama.enqueue(OllamaScript(tokens=[], tool_calls=[
        PARIS, {"name": "get_time", "arguments": {}}]))
    async with sdk(ollama_door) as client:
        async with client.chat.completions.stream(
                model=MODEL, messages=ASK, tools=[WEATHER, CLOCK],
                stream_options={"include_usage": True}) as stream:
            chunks = [event.chunk async for event in stream if event.type == "chunk"]
            final = await stream.get_final_completion()
    opening = chunks[0].choices[0].delta
    assert opening.role == "assistant" and opening.tool_calls[0].function.name == "get_weather"
    [choice] = final.choices
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == [("get_weather", {"city": "Paris", "days": 2}),
                                                    ("get_time", {})]
    assert len({c.id for c in choice.message.tool_calls}) == 2
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0


async def test_ollama_cannot_be_made_to_call_and_none_sends_no_tools(ollama, ollama_door):
    async with sdk(ollama_door) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                                 tool_choice="required")
        assert caught.value.param == "tool_choice"
        assert not ollama.generation_requests
        reply = await client.chat.completions.create(model=MODEL, messages=ASK,
                                                     tools=[WEATHER], tool_choice="none")
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content
    assert "tools" not in ollama.generation_requests[-1]


async def test_a_call_of_a_tool_not_offered_is_the_upstreams_fault(ollama, ollama_door):
    ollama.enqueue(OllamaScript(tokens=[], tool_calls=[{"name": "rm_rf", "arguments": {}}]))
    async with sdk(ollama_door) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER])
    assert caught.value.status_code == 503


# --- streamed pieces and tool choices, on the fake OpenAI upstream ----------------------


async def test_streamed_call_pieces_assemble_in_the_sdks_stream_helper(upstream):
    upstream.enqueue(OpenAIScript(tokens=["Let me look."], argument_pieces=4, tool_calls=[
        OSLO, {"name": "get_time", "arguments": "{}"}]))
    async with openai_door(upstream) as running, sdk(running) as client:
        async with client.chat.completions.stream(
                model=OPENAI_MODEL, messages=ASK, tools=[WEATHER, CLOCK],
                tool_choice="required", stream_options={"include_usage": True}) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_completion()
    [choice] = final.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    calls = [(c.id, c.function.name, json.loads(c.function.arguments))
             for c in choice.message.tool_calls]
    assert calls == [("call_abc", "get_weather", {"city": "Oslo", "days": 3}),
                     ("call_1", "get_time", {})]
    assert final.usage is not None and final.usage.completion_tokens > 0
    # Each call's first piece carries its id, type and name; later ones fragments only.
    pieces = [piece for event in events if event.type == "chunk"
              for c in event.chunk.choices for piece in c.delta.tool_calls or ()]
    for index in (0, 1):
        mine = [piece for piece in pieces if piece.index == index]
        assert mine[0].id and mine[0].type == "function" and mine[0].function.name
        assert all(p.id is None and p.function.name is None for p in mine[1:])
    done = [event for event in events if event.type == "tool_calls.function.arguments.done"]
    assert [event.name for event in done] == ["get_weather", "get_time"]
    sent = upstream.generation_requests[-1]
    assert sent["tool_choice"] == "required"
    assert sent["tools"][0] == WEATHER


async def test_a_named_tool_choice_and_a_round_trip_on_an_openai_upstream(upstream):
    upstream.enqueue(OpenAIScript(tokens=[], tool_calls=[OSLO]),
                     OpenAIScript(tokens=["Snow", "."]))
    named = {"type": "function", "function": {"name": "get_weather"}}
    async with openai_door(upstream) as running, sdk(running) as client:
        first = await client.chat.completions.create(
            model=OPENAI_MODEL, messages=ASK, tools=[WEATHER, CLOCK], tool_choice=named)
        [call] = first.choices[0].message.tool_calls
        second = await client.chat.completions.create(
            model=OPENAI_MODEL, tools=[WEATHER, CLOCK], messages=[
                *ASK, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "-4C, snow"}])
        await client.chat.completions.create(model=OPENAI_MODEL, messages=ASK,
                                             tools=[WEATHER], tool_choice="none")
    assert (call.id, call.function.name) == ("call_abc", "get_weather")
    assert second.choices[0].message.content == "Snow."
    first_sent, second_sent, none_sent = upstream.generation_requests
    assert first_sent["tool_choice"] == named
    assert second_sent["messages"][1]["tool_calls"] == [{
        "id": "call_abc", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 3}'}}]
    assert second_sent["messages"][2] == {"role": "tool", "content": "-4C, snow",
                                          "tool_call_id": "call_abc"}
    assert "tools" not in none_sent and "tool_choice" not in none_sent


# --- bad tools: a 400 naming OpenAI's param, nothing sent on ---------------------------

CALLED = {"role": "assistant", "content": None, "tool_calls": [{
    "id": "call_1", "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "array"}}}]}, "tools[0].function.parameters"),
    ({"tools": [WEATHER, {"type": "function", "function": {
        "name": "g", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}]},
     "tools[1].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "paramaters": {}}}]},
     "tools[0].function.paramaters"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0]"),
    ({"tools": [CLOCK] * 65}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [WEATHER], "messages": [*ASK, CALLED,
                                       {"role": "tool", "tool_call_id": "call_1", "content": "5C"},
                                       {"role": "tool", "tool_call_id": "call_9", "content": "?"}]},
     "messages[3].tool_call_id"),
    ({"tools": [WEATHER], "messages": [*ASK, CALLED, {"role": "tool", "content": "5C"}]},
     "messages[2].tool_call_id"),
    ({"tools": [WEATHER], "messages": [*ASK, {**CALLED, "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "get_weather",
                                                    "arguments": "[1]"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"tools": [WEATHER], "messages": [*ASK, {**CALLED, "role": "user", "content": "x"}]},
     "messages[1].tool_calls"),
    # Legacy function calling: refused, its answers have another shape.
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"messages": [*ASK, {"role": "function", "name": "f", "content": "1"}]},
     "messages[1].role"),
])
async def test_bad_tools_are_a_400_naming_the_param(ollama, ollama_door, fields, param):
    async with sdk(ollama_door) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, **{"messages": ASK, **fields})
    assert caught.value.param == param, caught.value.message
    assert caught.value.code == "invalid_argument"
    assert not ollama.generation_requests


# --- LangChain's ChatOpenAI, one agent turn ---------------------------------------------


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}, 21C."


async def test_langchain_chat_openai_calls_a_bound_tool_and_finishes(ollama, ollama_door):
    ollama.enqueue(OllamaScript(tokens=[], tool_calls=[
                       {"name": "get_weather", "arguments": {"city": "Paris"}}]),
                   OllamaScript(tokens=["Sunny", " in", " Paris."]))
    model = ChatOpenAI(model=MODEL, base_url=f"http://{ollama_door.http_address}/v1",
                       api_key="unused", max_retries=0).bind_tools([get_weather])
    chat: list[Any] = [HumanMessage("What is the weather in Paris?")]
    called = await model.ainvoke(chat)
    [call] = called.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    result = await get_weather.ainvoke(call)
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    answer = await model.ainvoke([*chat, called, result])
    assert answer.content == "Sunny in Paris." and not answer.tool_calls
    sent = ollama.generation_requests
    assert sent[0]["tools"][0]["function"]["name"] == "get_weather"
    assert sent[0]["tools"][0]["function"]["parameters"]["required"] == ["city"]
    assert sent[1]["messages"][-1] == {"role": "tool", "content": "Sunny in Paris, 21C.",
                                       "tool_name": "get_weather"}


# --- the Node SDK -----------------------------------------------------------------------

NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_the_node_sdk_makes_a_tool_round_trip(ollama, ollama_door):
    ollama.enqueue(OllamaScript(tokens=[], tool_calls=[PARIS]),
                   OllamaScript(tokens=["It", " is", " sunny."]))
    proc = await asyncio.create_subprocess_exec(
        NODE, str(ROOT / "tests/openai_door_tools.mjs"), f"http://{ollama_door.http_address}/v1",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode() + out.decode()
    assert out.decode().splitlines() == [
        'call: get_weather {"city":"Paris","days":2} [tool_calls]',
        "answer: It is sunny. [stop]"]
    assert ollama.generation_requests[1]["messages"][2]["content"] == "sunny, 21C"
