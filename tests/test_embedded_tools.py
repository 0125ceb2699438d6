"""Function calling on the embedded engine with the real Gemma 3 270M, through the real
gateway and channels. The model is a small base model: the tests assert the constraint
(every call names a declared tool and its arguments validate against that tool's schema),
never which tool it picks or what it writes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import jsonschema
import openai
import pytest
import pytest_asyncio
from test_tools import assembled

from agentloop.backends.embedded import EmbeddedBackend
from agentloop.server import RunningServer
from agentloop.v1 import agentloop_pb2 as pb
from helpers import bad_fields, client_stub, gateway_settings, running_gateway

pytestmark = [pytest.mark.real_model, pytest.mark.asyncio(loop_scope="module")]

SCHEMAS = {
    "get_weather": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16},
                       "days": {"enum": [1, 2, 3, 7]}},
        "required": ["city", "days"],
    },
    "convert": {
        "type": "object",
        "properties": {"amount": {"type": "number"},
                       "unit": {"enum": ["km", "mi", "kg", "lb"]}},
        "required": ["amount", "unit"],
    },
}
TOOLS = [pb.ToolDefinition(name=name, description=f"The {name} tool.",
                           parameters_json_schema=json.dumps(schema))
         for name, schema in SCHEMAS.items()]
PROMPTS = ["What is the weather in Paris for three days?", "Convert 12 miles to km.",
           "Is it raining in Oslo?", "How many pounds is 3 kg?"]
REQUIRED = pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway() -> AsyncIterator[RunningServer]:
    settings = gateway_settings(backend="embedded", num_ctx=2048, read_timeout=120.0,
                                http_listen="127.0.0.1:0")
    async with running_gateway(settings, backend=EmbeddedBackend(settings)) as running:
        yield running


def valid(call: pb.ToolCall) -> None:
    assert call.name in SCHEMAS and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments_json), SCHEMAS[call.name])


def ask(prompt: str, seed: int, **fields: object) -> dict[str, object]:
    return {"messages": [pb.Message(role=pb.ROLE_USER, content=prompt)], "tools": TOOLS,
            "options": pb.GenerationOptions(max_tokens=96, temperature=0.8, seed=seed),
            **fields}


async def test_every_required_call_validates_against_its_schema(
        gateway: RunningServer) -> None:
    async with client_stub(gateway.address) as stub:
        for seed, prompt in enumerate(PROMPTS):
            reply = await stub.Generate(pb.GenerateRequest(**ask(prompt, seed,
                                                                 tool_choice=REQUIRED)))
            assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS, reply.text
            assert not reply.text
            [call] = reply.tool_calls
            valid(call)


async def test_a_named_tool_is_the_one_called_and_the_stream_assembles(
        gateway: RunningServer) -> None:
    named = pb.ToolChoice(mode=pb.ToolChoice.MODE_TOOL, name="convert")
    async with client_stub(gateway.address) as stub:
        replies = [reply async for reply in stub.StreamGenerate(pb.StreamGenerateRequest(
            **ask(PROMPTS[0], 3, tool_choice=named)))]
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    [call] = last.tool_calls
    assert call.name == "convert"
    valid(call)
    assert assembled(replies) == [call]
    assert sum(len(r.tool_call_deltas) for r in replies) > 2  # the arguments came in pieces


async def test_auto_answers_text_or_a_valid_call_and_a_round_trip_finishes(
        gateway: RunningServer) -> None:
    async with client_stub(gateway.address) as stub:
        for seed, prompt in enumerate(PROMPTS[:2]):
            reply = await stub.Generate(pb.GenerateRequest(**ask(prompt, seed)))
            if reply.tool_calls:
                assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS and not reply.text
                [call] = reply.tool_calls
                valid(call)
            else:
                assert reply.text and not reply.text.startswith("{")
        first = await stub.Generate(pb.GenerateRequest(**ask(PROMPTS[2], 5,
                                                             tool_choice=REQUIRED)))
        [call] = first.tool_calls
        chat = [pb.Message(role=pb.ROLE_USER, content=PROMPTS[2]),
                pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id=call.id, content="Light rain.")]
        answer = await stub.Generate(pb.GenerateRequest(
            messages=chat, tools=TOOLS, tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_NONE),
            options=pb.GenerationOptions(max_tokens=24, temperature=0, seed=1)))
    assert answer.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert not answer.tool_calls and answer.usage.output_tokens > 0


async def test_a_schema_keyword_the_grammar_cannot_hold_is_refused_naming_the_tool(
        gateway: RunningServer) -> None:
    bounded = pb.ToolDefinition(name="wait", parameters_json_schema=json.dumps({
        "type": "object", "properties": {"seconds": {"type": "integer", "maximum": 9}}}))
    async with client_stub(gateway.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(pb.GenerateRequest(**ask(PROMPTS[0], 1,
                                                         tools=[*TOOLS, bounded])))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == {"tools[2].parameters_json_schema"}
    assert "maximum" in caught.value.details()


async def test_a_required_call_through_the_http_door_validates(gateway: RunningServer) -> None:
    """The official SDK's stream helper assembles the door's `delta.tool_calls` pieces.
    max_tokens as in the gRPC tests above: a call of these tools fits in it."""
    tools = [{"type": "function", "function": {"name": name, "description": f"The {name} "
              "tool.", "parameters": schema}} for name, schema in SCHEMAS.items()]
    async with openai.AsyncOpenAI(base_url=f"http://{gateway.http_address}/v1",
                                  api_key="unused", max_retries=0) as client, \
            client.chat.completions.stream(
                model=gateway.backend.default_model, tools=tools,
                messages=[{"role": "user", "content": PROMPTS[1]}],
                tool_choice="required", max_tokens=96, temperature=0.8, seed=2) as stream:
        final = await stream.get_final_completion()
    [choice] = final.choices
    assert choice.finish_reason == "tool_calls", choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name in SCHEMAS and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


async def test_a_keyword_the_grammar_cannot_hold_names_the_doors_param(
        gateway: RunningServer) -> None:
    bounded = {"type": "function", "function": {"name": "wait", "parameters": {
        "type": "object", "properties": {"seconds": {"type": "integer", "maximum": 9}}}}}
    async with openai.AsyncOpenAI(base_url=f"http://{gateway.http_address}/v1",
                                  api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=gateway.backend.default_model, tools=[bounded], max_tokens=8,
                messages=[{"role": "user", "content": PROMPTS[0]}])
    assert caught.value.param == "tools[0].function.parameters"
    assert "maximum" in caught.value.message
