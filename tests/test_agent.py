"""The agent loop through real channels: RunAgent and StreamRunAgent against the fake Ollama
scripted to answer with action JSON, the server tools, client tools, limits, cancellation,
grpcurl, and one run on the embedded real model."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentloop.services.agent import Action, action_schema, instructions, parse_action
from agentloop.services.tools import (
    Calculator,
    ClientTool,
    CurrentTime,
    ToolError,
    default_tools,
    evaluate,
)
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import FakeOllama, Script, wait_until
from helpers import bad_fields, client_stub, gateway_settings, running_gateway

GOAL = "What is 17*23? Use the calculator."


def action(**fields: Any) -> Script:
    """A fake model reply carrying one action, streamed in small pieces."""
    text = json.dumps(fields)
    return Script(tokens=[text[i:i + 7] for i in range(0, len(text), 7)])


CALCULATE = action(tool="calculator", arguments={"expression": "17*23"},
                   thought="I should multiply.")
ANSWER = action(final_answer="391", thought="The calculator said 391.")


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def gateway(fake_ollama: FakeOllama, settings_overrides):
    settings = gateway_settings(ollama_url=fake_ollama.url, **settings_overrides)
    async with running_gateway(settings) as running:
        yield running


def chat_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    return body["messages"]


def tool_branches(schema: dict[str, Any]) -> dict[str, Any]:
    """{tool name: arguments schema} of the tool-call branches of an action schema."""
    return {
        name: branch["properties"]["arguments"]
        for branch in schema["anyOf"] if "tool" in branch["properties"]
        for name in branch["properties"]["tool"]["enum"]
    }


# --- RunAgent ----------------------------------------------------------------------------


async def test_two_step_calculator_run_reaches_the_answer(stub, fake_ollama):
    fake_ollama.enqueue(CALCULATE, ANSWER)
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL, max_steps=4), timeout=10)

    assert reply.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER
    assert reply.final_answer == "391"
    assert [step.index for step in reply.steps] == [1, 2]
    first, second = reply.steps
    assert first.tool == "calculator" and json.loads(first.arguments_json) == {
        "expression": "17*23"}
    assert first.observation == "391" and not first.error and not first.observation_truncated
    assert first.thought == "I should multiply."
    assert second.tool == "" and second.thought == "The calculator said 391."
    assert all(step.duration.ToNanoseconds() > 0 for step in reply.steps)
    assert reply.model == "gemma3n:e2b" and reply.duration.ToNanoseconds() > 0
    assert reply.usage.output_tokens == len(CALCULATE.tokens) + len(ANSWER.tokens)
    assert reply.usage.input_tokens > 0

    calls = fake_ollama.generation_requests
    assert len(calls) == 2
    assert tool_branches(calls[0]["format"]) == {
        "calculator": Calculator.parameters, "current_time": CurrentTime.parameters}
    assert calls[0]["format"]["anyOf"][-1]["required"] == ["final_answer"]
    system, goal = chat_of(calls[0])
    assert system["role"] == "system" and "calculator" in system["content"]
    assert goal == {"role": "user", "content": GOAL}
    # The second turn shows the model its own action and the tool's result.
    assistant, observation = chat_of(calls[1])[-2:]
    assert assistant["role"] == "assistant" and json.loads(assistant["content"])["tool"] == (
        "calculator")
    assert observation["role"] == "user"
    assert observation["content"].splitlines() == [
        "Result of calculator: 391", "Now give the final answer, using this result."]


async def test_each_model_call_only_appends_to_the_previous_prompt(stub, fake_ollama):
    """Everything constant comes first and stays; a step appends its reply and the result,
    so the engine's prefix cache serves every step after the first."""
    malformed = Script(tokens=['{"thought": "oops", "tool"'])
    unknown = action(thought="search", tool="web_search", arguments={"q": "x"})
    fake_ollama.enqueue(malformed, CALCULATE, unknown, ANSWER)
    reply = await stub.RunAgent(pb.RunAgentRequest(
        goal=GOAL, system="Be brief.", messages=[pb.Message(role=pb.ROLE_USER, content="Hi")],
        max_steps=3), timeout=10)
    assert reply.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER  # repair, tool, error, answer

    calls = fake_ollama.generation_requests
    assert len(calls) == 4
    for previous, current in itertools.pairwise(calls):
        assert {k: v for k, v in current.items() if k not in ("messages", "format")} == {
            k: v for k, v in previous.items() if k not in ("messages", "format")}  # options...
        before, now = chat_of(previous), chat_of(current)
        assert now[:len(before)] == before
        # What follows is the model's own reply, as it wrote it, then the next user turn.
        assert now[len(before)]["role"] == "assistant" and now[-1]["role"] == "user"
    assert chat_of(calls[1])[-2]["content"] == "".join(malformed.tokens)
    # The format only constrains decoding (it is not in the prompt): the last step (3) may
    # only answer.
    assert calls[0]["format"] == calls[1]["format"] == calls[2]["format"]
    assert calls[3]["format"]["required"] == ["final_answer"]


async def test_a_repeated_call_is_not_run_again_and_the_next_step_must_answer(
        stub, fake_ollama):
    fake_ollama.enqueue(CALCULATE, CALCULATE, ANSWER)
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL, max_steps=8), timeout=10)

    assert reply.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER
    assert [(step.tool, step.observation) for step in reply.steps] == [
        ("calculator", "391"), ("calculator", "391"), ("", "")]
    calls = fake_ollama.generation_requests
    assert chat_of(calls[2])[-1]["content"].startswith(
        "calculator was already called with these arguments. Its result: 391\n")
    assert "anyOf" in calls[1]["format"]  # a first call may be followed by any action
    assert calls[2]["format"]["required"] == ["final_answer"]


async def test_system_messages_and_options_reach_every_model_call(stub, fake_ollama):
    fake_ollama.enqueue(CALCULATE, ANSWER)
    await stub.RunAgent(pb.RunAgentRequest(
        goal=GOAL, system="Answer in French.",
        messages=[pb.Message(role=pb.ROLE_USER, content="Hi"),
                  pb.Message(role=pb.ROLE_ASSISTANT, content="Hello")],
        options=pb.GenerationOptions(temperature=0, max_tokens=64, seed=3),
    ), timeout=10)
    for body in fake_ollama.generation_requests:
        messages = chat_of(body)
        assert messages[0]["content"].endswith("Answer in French.")
        assert [m["content"] for m in messages[1:4]] == ["Hi", "Hello", GOAL]
        assert body["options"]["temperature"] == 0 and body["options"]["num_predict"] == 64
        assert body["options"]["seed"] == 3


async def test_a_malformed_action_gets_one_repair_turn(stub, fake_ollama):
    fake_ollama.enqueue(Script(tokens=['{"thought": "oops", "tool"']), ANSWER)
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL), timeout=10)

    assert reply.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER
    assert reply.final_answer == "391" and len(reply.steps) == 1 and not reply.steps[0].error
    bad, repair = chat_of(fake_ollama.generation_requests[1])[-2:]
    assert bad == {"role": "assistant", "content": '{"thought": "oops", "tool"'}
    assert repair["role"] == "user" and "not a valid action" in repair["content"]
    assert "not JSON" in repair["content"]


async def test_an_action_still_invalid_after_repair_is_a_model_error(stub, fake_ollama):
    fake_ollama.enqueue(action(thought="no tool"), action(thought="still no tool"))
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL, max_steps=4), timeout=10)

    assert reply.stop_reason == pb.AGENT_STOP_REASON_MODEL_ERROR
    assert reply.final_answer == "" and len(reply.steps) == 1
    assert "'tool' is a required property" in reply.steps[0].error
    assert len(fake_ollama.generation_requests) == 2


async def test_an_unknown_tool_becomes_an_observation(stub, fake_ollama):
    fake_ollama.enqueue(action(thought="search", tool="web_search", arguments={"q": "x"}),
                        ANSWER)
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL), timeout=10)

    assert reply.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER
    step = reply.steps[0]
    assert step.tool == "web_search" and step.error == step.observation
    assert "no tool named 'web_search'" in step.observation
    assert "calculator, current_time" in step.observation
    observation = chat_of(fake_ollama.generation_requests[1])[-1]["content"]
    assert observation.startswith("Error from web_search:")


async def test_bad_tool_arguments_and_tool_failures_become_observations(stub, fake_ollama):
    fake_ollama.enqueue(
        action(thought="a", tool="calculator", arguments={"expr": "1+1"}),
        action(thought="b", tool="calculator", arguments={"expression": "1/0"}),
        action(thought="c", tool="current_time", arguments={}),
        ANSWER,
    )
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL, max_steps=4), timeout=10)

    assert reply.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER
    missing, zero, clock, _ = reply.steps
    assert "invalid arguments for calculator" in missing.error
    assert "'expression' is a required property" in missing.error
    assert zero.error == zero.observation == "division by zero"
    assert not clock.error and clock.observation.endswith("+00:00")


async def test_allowed_tools_limit_the_schema_and_the_calls(stub, fake_ollama):
    fake_ollama.enqueue(CALCULATE, ANSWER)
    reply = await stub.RunAgent(
        pb.RunAgentRequest(goal=GOAL, tools=["current_time"]), timeout=10)

    assert tool_branches(fake_ollama.generation_requests[0]["format"]) == {
        "current_time": CurrentTime.parameters}
    assert "calculator" not in chat_of(fake_ollama.generation_requests[0])[0]["content"]
    assert "no tool named 'calculator'" in reply.steps[0].observation


async def test_max_steps_stops_a_loop_that_never_answers(stub, fake_ollama):
    fake_ollama.default_script = CALCULATE
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL, max_steps=3), timeout=10)

    assert reply.stop_reason == pb.AGENT_STOP_REASON_MAX_STEPS
    assert reply.final_answer == "" and len(reply.steps) == 3
    assert len(fake_ollama.generation_requests) == 3


@pytest.mark.parametrize("settings_overrides", [{"agent_max_steps": 2,
                                                 "agent_default_steps": 1}])
@pytest.mark.parametrize(("requested", "steps"), [(0, 1), (5, 2)])
async def test_max_steps_defaults_and_is_capped_by_the_server(stub, fake_ollama, requested,
                                                              steps):
    fake_ollama.default_script = CALCULATE
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL, max_steps=requested), timeout=10)
    assert reply.stop_reason == pb.AGENT_STOP_REASON_MAX_STEPS
    assert len(reply.steps) == steps


@pytest.mark.parametrize("settings_overrides", [{"max_observation_bytes": 256}])
async def test_long_observations_are_cut_and_say_so(stub, fake_ollama):
    fake_ollama.enqueue(action(thought="big", tool="calculator",
                               arguments={"expression": "7 ** 1000"}), ANSWER)
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL), timeout=10)

    step = reply.steps[0]
    assert step.observation_truncated
    assert len(step.observation.encode()) <= 256
    assert step.observation.startswith(str(7**1000)[:100]) and "truncated" in step.observation


async def test_the_deadline_ends_the_run_with_its_steps(stub, fake_ollama, gateway):
    fake_ollama.enqueue(CALCULATE, Script(hang_before_headers=True))
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL), timeout=2)

    assert reply.stop_reason == pb.AGENT_STOP_REASON_DEADLINE
    assert [step.tool for step in reply.steps] == ["calculator", ""]
    assert "deadline" in reply.steps[1].error
    await wait_until(lambda: fake_ollama.disconnects == 1)
    assert gateway.admission.in_flight == 0


async def test_no_step_starts_when_the_deadline_leaves_less_than_the_longest_step(
        stub, fake_ollama):
    # Step 1 takes at least 1 s; after it, less than 1 s is left of the 2.2 s deadline.
    slow_calculation = action(thought="slow", tool="calculator", arguments={"expression": "1"})
    slow_calculation.first_token_delay = 1.0
    fake_ollama.enqueue(slow_calculation, ANSWER)
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL), timeout=2.2)

    assert reply.stop_reason == pb.AGENT_STOP_REASON_DEADLINE
    assert len(reply.steps) == 1 and not reply.steps[0].error
    assert len(fake_ollama.generation_requests) == 1


async def test_cancel_mid_run_closes_the_backend_call(stub, fake_ollama, gateway):
    fake_ollama.enqueue(CALCULATE, Script(tokens=["{"], hang_after=1))
    call = stub.RunAgent(pb.RunAgentRequest(goal=GOAL), timeout=10)
    await wait_until(lambda: len(fake_ollama.generation_requests) == 2
                     and fake_ollama.active_streams == 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await wait_until(lambda: fake_ollama.disconnects == 1)
    await wait_until(lambda: gateway.admission.in_flight == 0)


@pytest.mark.parametrize(("fields", "field"), [
    ({"goal": ""}, "goal"),
    ({"goal": "  "}, "goal"),
    ({"goal": "x", "tools": ["calculator", "shell"]}, "tools[1]"),
    ({"goal": "x", "max_steps": -1}, "max_steps"),
    ({"goal": "x", "options": pb.GenerationOptions(temperature=-1)}, "options.temperature"),
    ({"goal": "x", "model": "bad model!"}, "model"),
    ({"goal": "x", "messages": [pb.Message(content="hi")]}, "messages[0].role"),
    ({"goal": "x" * 300_000}, "goal"),
])
async def test_bad_run_agent_requests_are_invalid_argument(stub, fake_ollama, fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RunAgent(pb.RunAgentRequest(**fields), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_fields(caught.value)
    assert fake_ollama.generation_requests == []


async def test_backend_failures_keep_their_status(stub, fake_ollama):
    fake_ollama.enqueue(Script(status=503))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RunAgent(pb.RunAgentRequest(goal=GOAL), timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- StreamRunAgent ----------------------------------------------------------------------

LOOKUP = pb.ClientTool(
    name="lookup_order",
    description="Finds an order's status by its id.",
    parameters_json_schema=json.dumps({
        "type": "object",
        "properties": {"order_id": {"type": "string"}},
        "required": ["order_id"],
    }),
)
CALL_LOOKUP = action(thought="Ask the shop.", tool="lookup_order", arguments={"order_id": "A1"})


def start(**fields: Any) -> pb.StreamRunAgentRequest:
    fields.setdefault("goal", "Where is order A1?")
    return pb.StreamRunAgentRequest(start=pb.StartAgentRun(**fields))


def tool_result(call_id: str, **outcome: str) -> pb.StreamRunAgentRequest:
    return pb.StreamRunAgentRequest(tool_result=pb.ClientToolResult(call_id=call_id, **outcome))


async def test_stream_events_of_a_server_tool_run(stub, fake_ollama):
    fake_ollama.enqueue(CALCULATE, ANSWER)
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(goal=GOAL))
    await call.done_writing()
    events = [event async for event in call]

    assert [e.WhichOneof("event") for e in events] == [
        "step_started", "thought", "tool_call", "tool_result",
        "step_started", "answer_delta", "thought", "finished",
    ]
    assert events[5].answer_delta == pb.AgentAnswerDelta(step=2, text="391")
    tool_call, result = events[2].tool_call, events[3].tool_result
    assert tool_call.tool == "calculator" and not tool_call.client_tool and tool_call.step == 1
    assert result.call_id == tool_call.call_id and result.observation == "391"
    assert not result.is_error and result.duration.ToNanoseconds() >= 0
    finished = events[-1].finished
    assert finished.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER
    assert finished.final_answer == "391" and finished.steps == 2
    assert finished.usage.output_tokens > 0 and finished.model == "gemma3n:e2b"


async def test_client_tool_round_trip(stub, fake_ollama):
    fake_ollama.enqueue(CALL_LOOKUP, action(thought="Done.", final_answer="It shipped."))
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(client_tools=[LOOKUP]))
    events = []
    async for event in call:
        events.append(event)
        if event.WhichOneof("event") == "tool_call":
            assert event.tool_call.client_tool and event.tool_call.tool == "lookup_order"
            assert json.loads(event.tool_call.arguments_json) == {"order_id": "A1"}
            await call.write(tool_result(event.tool_call.call_id, output="shipped on Monday"))

    result = next(e.tool_result for e in events if e.WhichOneof("event") == "tool_result")
    assert result.observation == "shipped on Monday" and not result.is_error
    assert events[-1].finished.final_answer == "It shipped."
    system = chat_of(fake_ollama.generation_requests[0])[0]["content"]
    # The tools the client lends for the run come first (a small model takes the first).
    assert 0 <= system.index("- lookup_order:") < system.index("- calculator:")
    # A plain client tool schema constrains decoding like a server tool's.
    assert tool_branches(fake_ollama.generation_requests[0]["format"]) == {
        "calculator": Calculator.parameters, "current_time": CurrentTime.parameters,
        "lookup_order": json.loads(LOOKUP.parameters_json_schema)}
    observation = chat_of(fake_ollama.generation_requests[1])[-1]["content"]
    assert observation.splitlines()[0] == "Result of lookup_order: shipped on Monday"


def test_a_raw_newline_inside_a_string_is_still_an_action():
    parsed = parse_action('{"thought": "two\nlines", "final_answer": "391"}')
    assert parsed.thought == "two\nlines" and parsed.final_answer == "391"


def test_the_thought_is_optional_and_comes_after_the_decision():
    assert parse_action('{"final_answer": "391"}') == Action("", final_answer="391")
    assert parse_action('{"tool": "calculator", "arguments": {}}') == Action(
        "", tool="calculator", arguments={})
    # Grammars keep the properties' order: a reply starts with its decision.
    schema = action_schema(list(default_tools()), [])
    assert [list(branch["properties"]) for branch in schema["anyOf"]] == [
        ["tool", "arguments", "thought"], ["tool", "arguments", "thought"],
        ["final_answer", "thought"]]


def test_client_tool_schemas_that_are_not_plain_share_a_free_form_branch():
    plain = ClientTool("plain", parameters={"type": "object", "properties": {
        "ids": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}}}})
    fancy = ClientTool("fancy", parameters={"type": "object", "patternProperties": {}})
    deep = ClientTool("deep", parameters=json.loads(
        '{"type": "object", "properties": {"a": ' * 6 + "{}" + "}}" * 6))
    nullable = ClientTool("nullable", parameters={"type": "object", "properties": {
        "name": {"type": ["string", "null"]}}})
    branches = tool_branches(action_schema([], [plain, fancy, deep, nullable]))
    assert branches == {"plain": plain.parameters, "fancy": {"type": "object"},
                        "deep": {"type": "object"}, "nullable": {"type": "object"}}


async def test_a_client_tool_with_a_list_of_types_runs(stub, fake_ollama):
    # A valid schema ({"type": ["string", "null"]}) that is not plain: it used to end
    # the call with INTERNAL.
    nullable = pb.ClientTool(name="lookup_order", parameters_json_schema=json.dumps({
        "type": "object", "properties": {"order_id": {"type": ["string", "null"]}}}))
    fake_ollama.enqueue(ANSWER)
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(client_tools=[nullable]))
    await call.done_writing()
    events = [event async for event in call]
    assert events[-1].finished.final_answer == "391"


async def test_the_answer_streams_as_the_model_writes_it(stub, fake_ollama):
    answer = 'Paris is the capital of France: "la Ville Lumière".\nIts "final_answer": yes.'
    text = json.dumps({"thought": 'I know this; "final_answer" comes next.',
                       "final_answer": answer})
    # Two characters at a time: escapes (\", \n, \u00e8 as written by json.dumps) split.
    # At a model's pace: deltas that pile up faster than the client reads are joined.
    fake_ollama.enqueue(Script(tokens=[text[i:i + 2] for i in range(0, len(text), 2)],
                               token_delay=0.005))
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(goal="What is the capital of France?"))
    await call.done_writing()
    events = [event async for event in call]

    kinds = [e.WhichOneof("event") for e in events]
    deltas = [e.answer_delta for e in events if e.WhichOneof("event") == "answer_delta"]
    assert len(deltas) > 10  # piece by piece, not all at once
    assert all(delta.step == 1 and delta.text for delta in deltas)
    assert "".join(delta.text for delta in deltas) == answer == events[-1].finished.final_answer
    # The deltas come while the model writes: the thought and the end come after them.
    assert kinds == ["step_started", *["answer_delta"] * len(deltas), "thought", "finished"]


async def test_a_tool_call_streams_no_answer(stub, fake_ollama):
    fake_ollama.enqueue(action(thought='no "final_answer": yet', tool="calculator",
                               arguments={"expression": "1+1"}), ANSWER)
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(goal=GOAL))
    await call.done_writing()
    events = [event async for event in call]
    deltas = [(e.answer_delta.step, e.answer_delta.text) for e in events
              if e.WhichOneof("event") == "answer_delta"]
    assert deltas == [(2, "391")]


async def test_a_client_tool_error_is_shown_to_the_model(stub, fake_ollama):
    fake_ollama.enqueue(CALL_LOOKUP, ANSWER)
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(client_tools=[LOOKUP]))
    async for event in call:
        if event.WhichOneof("event") == "tool_call":
            await call.write(tool_result(event.tool_call.call_id, error="database down"))
        if event.WhichOneof("event") == "tool_result":
            assert event.tool_result.is_error
            assert event.tool_result.observation == "database down"
    observation = chat_of(fake_ollama.generation_requests[1])[-1]["content"]
    assert observation.splitlines()[0] == "Error from lookup_order: database down"


@pytest.mark.parametrize("settings_overrides", [{"tool_timeout": 0.3}])
async def test_a_silent_client_times_out_and_a_late_result_is_dropped(stub, fake_ollama):
    # The answer takes a second to start: the late result arrives while the run goes on
    # (once the call has ended, grpc refuses the write on the client's side).
    fake_ollama.enqueue(CALL_LOOKUP, Script(tokens=ANSWER.tokens, first_token_delay=1.0))
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(client_tools=[LOOKUP]))
    events = []
    async for event in call:
        events.append(event)
        if event.WhichOneof("event") == "tool_result":
            # The answer comes after the timeout: the run goes on without it.
            await call.write(tool_result(event.tool_result.call_id, output="too late"))

    result = next(e.tool_result for e in events if e.WhichOneof("event") == "tool_result")
    assert result.is_error and "did not answer within 0.3s" in result.observation
    assert events[-1].finished.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER
    assert await call.code() == grpc.StatusCode.OK


async def test_a_client_that_closed_its_side_cannot_run_tools(stub, fake_ollama):
    fake_ollama.enqueue(CALL_LOOKUP, ANSWER)
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(client_tools=[LOOKUP]))
    await call.done_writing()
    events = [event async for event in call]
    result = next(e.tool_result for e in events if e.WhichOneof("event") == "tool_result")
    assert result.is_error and "closed its stream" in result.observation
    assert events[-1].finished.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER


async def test_invalid_arguments_for_a_client_tool_never_reach_the_client(stub, fake_ollama):
    fake_ollama.enqueue(action(thought="x", tool="lookup_order", arguments={"id": 1}), ANSWER)
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(client_tools=[LOOKUP]))
    events = [event async for event in call]
    tool_call = next(e.tool_call for e in events if e.WhichOneof("event") == "tool_call")
    assert not tool_call.client_tool
    result = next(e.tool_result for e in events if e.WhichOneof("event") == "tool_result")
    assert result.is_error and "invalid arguments for lookup_order" in result.observation


async def expect_invalid(call: grpc.aio.StreamStreamCall) -> set[str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return bad_fields(caught.value)


async def test_a_wrong_call_id_mid_generation_ends_the_call_and_the_backend_call(
        stub, fake_ollama, gateway):
    fake_ollama.enqueue(Script(hang_before_headers=True))
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(client_tools=[LOOKUP]))
    await wait_until(lambda: fake_ollama.active_streams == 1)
    await call.write(tool_result("call_7", output="?"))
    assert await expect_invalid(call) == {"tool_result.call_id"}
    await wait_until(lambda: fake_ollama.disconnects == 1)
    await wait_until(lambda: gateway.admission.in_flight == 0)


async def test_answering_a_call_twice_is_invalid(stub, fake_ollama):
    fake_ollama.enqueue(CALL_LOOKUP, Script(hang_before_headers=True))
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(client_tools=[LOOKUP]))
    async for event in call:
        if event.WhichOneof("event") == "tool_call":
            call_id = event.tool_call.call_id
            await call.write(tool_result(call_id, output="a"))
            break
    await wait_until(lambda: len(fake_ollama.generation_requests) == 2)
    await call.write(tool_result(call_id, output="b"))
    assert await expect_invalid(call) == {"tool_result.call_id"}


@pytest.mark.parametrize(("later", "field"), [
    (pb.StreamRunAgentRequest(tool_result=pb.ClientToolResult(call_id="call_1")),
     "tool_result.outcome"),
    (pb.StreamRunAgentRequest(tool_result=pb.ClientToolResult(output="x")),
     "tool_result.call_id"),
    (start(), "start"),
])
async def test_bad_later_messages_are_invalid_argument(stub, fake_ollama, later, field):
    fake_ollama.enqueue(Script(hang_before_headers=True))
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(client_tools=[LOOKUP]))
    await call.write(later)
    assert field in await expect_invalid(call)


def schema_text(value: Any) -> str:
    return json.dumps(value)


@pytest.mark.parametrize(("first", "field"), [
    (tool_result("call_1", output="x"), "start"),
    (start(goal=""), "start.goal"),
    (start(tools=["nope"]), "start.tools[0]"),
    (start(client_tools=[pb.ClientTool(name="bad name")]), "start.client_tools[0].name"),
    (start(client_tools=[pb.ClientTool(name="calculator")]), "start.client_tools[0].name"),
    (start(client_tools=[pb.ClientTool(name="a"), pb.ClientTool(name="a")]),
     "start.client_tools[1].name"),
    (start(client_tools=[pb.ClientTool(name="a", parameters_json_schema="not json")]),
     "start.client_tools[0].parameters_json_schema"),
    (start(client_tools=[pb.ClientTool(name="a", parameters_json_schema="[1]")]),
     "start.client_tools[0].parameters_json_schema"),
    (start(client_tools=[pb.ClientTool(name="a",
                                       parameters_json_schema=schema_text({"type": "string"}))]),
     "start.client_tools[0].parameters_json_schema"),
    (start(client_tools=[pb.ClientTool(name="a",
                                       parameters_json_schema=schema_text({"type": 5}))]),
     "start.client_tools[0].parameters_json_schema"),
])
async def test_bad_first_messages_are_invalid_argument(stub, fake_ollama, first, field):
    call = stub.StreamRunAgent(timeout=5)
    await call.write(first)
    await call.done_writing()
    assert field in await expect_invalid(call)
    assert fake_ollama.generation_requests == []


async def test_an_empty_stream_is_invalid_argument(stub):
    call = stub.StreamRunAgent(timeout=5)
    await call.done_writing()
    assert await expect_invalid(call) == {"start"}


async def test_cancel_mid_stream_closes_the_backend_call(stub, fake_ollama, gateway):
    fake_ollama.enqueue(CALCULATE, Script(tokens=["{"], hang_after=1))
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(goal=GOAL))
    await wait_until(lambda: fake_ollama.active_streams == 1
                     and len(fake_ollama.generation_requests) == 2)
    call.cancel()
    await wait_until(lambda: fake_ollama.disconnects == 1)
    await wait_until(lambda: gateway.admission.in_flight == 0)


# --- the calculator ----------------------------------------------------------------------


@pytest.mark.parametrize(("expression", "value"), [
    ("17*23", 391), ("(17 * 23) / 4", 97.75), ("2 ** 10", 1024), ("-3 + +2", -1),
    ("7 // 2", 3), ("7 % 4", 3), ("1.5 * 2", 3.0), ("2 ** -1", 0.5),
])
def test_calculator_evaluates_arithmetic(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize(("expression", "message"), [
    ("9 ** 9 ** 9", "exponents are limited"),
    ("10 ** 2000", "exponents are limited"),
    ("99999 ** 1000", "too large"),
    ("1e308 * 10", "too large"),
    ("1 / 0", "division by zero"),
    ("(-8) ** 0.5", "not a real number"),
    ("2 ^ 3", "write **"),
    ("__import__('os').system('true')", "unsupported"),
    ("abs(-1)", "unsupported"),
    ("x + 1", "unsupported"),
    ("True + 1", "unsupported"),
    ("1 +", "not an arithmetic expression"),
    ("1" * 300, "longer than"),
])
def test_calculator_refuses_everything_else(expression, message):
    with pytest.raises(ToolError, match=re.escape(message)):
        evaluate(expression)


# --- the action schema -------------------------------------------------------------------


@pytest.mark.parametrize(("server_tools", "client_tools"), [
    (list(default_tools()), [ClientTool("lookup_order")]),
    ([], []),
])
def test_llama_cpp_converts_the_action_schema_to_a_grammar(server_tools, client_tools):
    llama_grammar = pytest.importorskip("llama_cpp.llama_grammar")
    grammar = llama_grammar.json_schema_to_gbnf(
        json.dumps(action_schema(server_tools, client_tools)))
    assert "thought" in grammar and "final_answer" in grammar
    for tool in [*server_tools, *client_tools]:
        assert tool.name in grammar


# --- grpcurl -----------------------------------------------------------------------------


async def test_grpcurl_run_agent_returns_steps_and_a_stop_reason(gateway, fake_ollama):
    fake_ollama.enqueue(CALCULATE, ANSWER)
    grpcurl = Path(sys.executable).parent / "grpcurl"
    process = await asyncio.create_subprocess_exec(
        str(grpcurl), "-plaintext", "-d", json.dumps({"goal": GOAL, "max_steps": 4}),
        gateway.address, "agentloop.v1.AgentLoopService/RunAgent",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    reply = json.loads(out)
    assert reply["stop_reason"] == "AGENT_STOP_REASON_FINAL_ANSWER"
    assert reply["final_answer"] == "391"
    assert [step.get("tool", "") for step in reply["steps"]] == ["calculator", ""]
    assert reply["steps"][0]["observation"] == "391"


# --- the embedded real model -------------------------------------------------------------


@pytest.mark.real_model
async def test_run_agent_on_the_real_model_keeps_to_the_action_schema():
    from agentloop.backends.embedded import EmbeddedBackend

    settings = gateway_settings(backend="embedded", read_timeout=120.0)
    max_steps = 2
    async with running_gateway(settings, backend=EmbeddedBackend(settings)) as gateway, \
            client_stub(gateway.address) as stub:
        reply = await stub.RunAgent(pb.RunAgentRequest(
            goal=GOAL, max_steps=max_steps,
            options=pb.GenerationOptions(max_tokens=48, temperature=0, seed=1),
        ), timeout=100)

    # A 270M base model is not wise: assert the mechanics, not the answer.
    assert 1 <= len(reply.steps) <= max_steps
    assert reply.stop_reason in (pb.AGENT_STOP_REASON_FINAL_ANSWER,
                                 pb.AGENT_STOP_REASON_MAX_STEPS)
    assert reply.usage.output_tokens > 0
    for step in reply.steps:
        if step.tool:  # a tool call: a known tool and an arguments object
            assert step.tool in ("calculator", "current_time")
            assert isinstance(json.loads(step.arguments_json), dict)
            assert step.observation
        else:  # the final answer
            assert step is reply.steps[-1]
            assert reply.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER
            assert not step.error


# --- the agent suite's copy check (bench/bench_agent_suite.py) ---------------------------


def test_the_agent_suite_counts_copies_of_the_instructions_and_examples():
    from bench.bench_agent_suite import echoes, example_values

    text = instructions(list(default_tools()), "")
    assert {"get_weather", "Lyon", "Tokyo"} <= set(example_values(text))
    assert echoes(["391", "The calculator gave 391."], text, "What is 17*23?") == []
    assert echoes(["Tokyo"], text, "What is 17*23?") == ["tokyo"]
    assert echoes(["Tokyo"], text, "Is Tokyo in Japan?") == []  # the goal names it
    assert echoes(["<your answer>"], text, "") == ["<your answer>"]
    copied = "using a tool when it helps"  # six words of the instructions
    assert echoes([f"I am {copied}."], text, "") == [copied]


async def test_answer_deltas_of_a_reply_that_fails_validation_are_withdrawn(stub, fake_ollama):
    # The answer streams out, then the reply turns out not to be an action (an extra key):
    # the repair turn's answer follows, and the first one's deltas are taken back.
    invalid = json.dumps({"thought": "t", "final_answer": "Lyon", "extra": 1})
    fake_ollama.enqueue(Script(tokens=[invalid[i:i + 5] for i in range(0, len(invalid), 5)]),
                        ANSWER)
    call = stub.StreamRunAgent(timeout=10)
    await call.write(start(goal=GOAL))
    await call.done_writing()
    events = [event async for event in call]

    kinds = [e.WhichOneof("event") for e in events]
    withdrawn = kinds.index("answer_withdrawn")
    before = "".join(e.answer_delta.text for e in events[:withdrawn]
                     if e.WhichOneof("event") == "answer_delta")
    after = "".join(e.answer_delta.text for e in events[withdrawn:]
                    if e.WhichOneof("event") == "answer_delta")
    assert before == "Lyon"
    assert events[withdrawn].answer_withdrawn == pb.AgentAnswerWithdrawn(step=1, chars=4)
    assert after == "391" == events[-1].finished.final_answer
    assert kinds.count("answer_withdrawn") == 1
