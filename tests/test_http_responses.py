"""`/v1/responses` on the HTTP door (issue 33): agent runs through the official `openai` SDK,
backed by the background runs, against the real gateway in front of the fake Ollama
scripted with the agent's JSON actions. In the foreground (whole, and streamed with the
Responses API's events) and in the background (retrieve, resume the stream after any
sequence number, cancel); tools by name and MCP servers by label; other tenants' runs not
found; what is refused names its param; the same run through the gRPC door."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from agentloop.server import RunningServer
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import FakeOllama, Script, wait_until
from helpers import ROOT, client_stub, gateway_settings, running_gateway

GOAL = "What is 17*23? Use the calculator."
MODEL = "gemma3n:e2b"
CALCULATOR = {"type": "function", "name": "calculator"}
MCP_SERVER = str(Path(__file__).with_name("mcp_tool_server.py"))


def action(delay: float = 0.0, **fields: Any) -> Script:
    text = json.dumps(fields)
    return Script(tokens=[text[i:i + 7] for i in range(0, len(text), 7)], token_delay=delay)


CALCULATE = action(tool="calculator", arguments={"expression": "17*23"}, thought="multiply")
ANSWER = action(final_answer="The product is 391.", thought="done")


@pytest.fixture
async def door(fake_ollama: FakeOllama) -> AsyncIterator[RunningServer]:
    async with running_gateway(gateway_settings(ollama_url=fake_ollama.url,
                                                http_listen="127.0.0.1:0")) as running:
        yield running


def sdk(running: RunningServer, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{running.http_address}/v1", api_key=key,
                              max_retries=0)


def item_types(response: Any) -> list[str]:
    return [item.type for item in response.output]


async def ended(client: openai.AsyncOpenAI, response_id: str, timeout: float = 10.0) -> Any:
    """The response once its run ended (polled: a run ends after its engine call closes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        response = await client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        assert loop.time() < deadline, f"{response_id} stayed {response.status}"
        await asyncio.sleep(0.02)


# --- the foreground: a run the request waits on -----------------------------------------


async def test_a_response_runs_the_agent_with_a_server_tool(door, fake_ollama):
    fake_ollama.enqueue(CALCULATE, ANSWER)
    async with sdk(door) as client:
        response = await client.responses.create(
            model=MODEL, input=GOAL, instructions="Be exact.", tools=[CALCULATOR],
            max_output_tokens=200, temperature=0.25, top_p=0.5, max_tool_calls=2)
        again = await client.responses.retrieve(response.id)
    assert response.object == "response" and response.status == "completed"
    assert response.output_text == "The product is 391."
    assert item_types(response) == ["function_call", "function_call_output", "message"]
    call, result, message = response.output
    assert call.name == "calculator" and json.loads(call.arguments) == {"expression": "17*23"}
    assert result.call_id == call.call_id and result.output == "391"
    assert message.status == "completed" and message.role == "assistant"
    assert response.usage.output_tokens > 0 and response.error is None
    assert response.instructions == "Be exact." and response.max_tool_calls == 2
    # The request reached every model call of the run as the gRPC StartAgentRun's would.
    first = fake_ollama.generation_requests[0]
    assert first["options"] | {"num_predict": 200, "temperature": 0.25, "top_p": 0.5} \
        == first["options"]
    assert "Be exact." in first["messages"][0]["content"]
    assert (first["messages"][-1]["role"], first["messages"][-1]["content"]) == ("user", GOAL)
    tools = [b["properties"]["tool"]["enum"] for b in first["format"]["anyOf"]
             if "tool" in b["properties"]]
    assert tools == [["calculator"]]
    # GET says the same; the run is one the gRPC door knows under the same id.
    assert again.model_dump(exclude={"completed_at"}) \
        == response.model_dump(exclude={"completed_at"}) | {"background": None}
    async with client_stub(door.address) as stub:
        run = (await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=response.id), timeout=5)).run
    assert run.status == pb.AGENT_RUN_STATUS_COMPLETED
    assert run.final_answer == "The product is 391." and run.steps[0].tool == "calculator"


async def test_a_streamed_response_sends_the_responses_events(door, fake_ollama):
    # Tokens apart by more than run_event_flush_interval: the answer's deltas are not all
    # joined into one event.
    fake_ollama.enqueue(CALCULATE, action(0.06, final_answer="The product is 391.",
                                          thought="done"))
    async with sdk(door) as client:
        async with client.responses.stream(model=MODEL, input=GOAL,
                                           tools=[CALCULATOR]) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
        fetched = await client.responses.retrieve(final.id)
    kinds = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert kinds.index("response.function_call_arguments.done") \
        < kinds.index("response.output_text.delta")
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["function_call", "function_call_output", "message"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == "The product is 391."
    assert final.output_text == "The product is 391." and final.status == "completed"
    assert [item.id for item in fetched.output] == [item.id for item in final.output]



async def test_a_failed_run_is_a_failed_response(door, fake_ollama):
    broken = Script(tokens=["no JSON here"])
    fake_ollama.enqueue(broken, broken, broken, broken)  # a reply and its repair, twice
    async with sdk(door) as client:
        response = await client.responses.create(model=MODEL, input=GOAL, tools=[])
        stream = await client.responses.create(model=MODEL, input=GOAL, tools=[], stream=True)
        events = [event async for event in stream]
    assert response.status == "failed" and response.error.code == "model_error"
    assert "no valid action" in response.error.message and response.output == []
    assert events[-1].type == "response.failed"
    assert events[-1].response.error.code == "model_error"

async def test_no_tools_or_tool_choice_none_leave_the_agent_only_its_answer(door, fake_ollama):
    fake_ollama.enqueue(ANSWER, ANSWER)
    async with sdk(door) as client:
        for extra in ({"tools": []}, {"tool_choice": "none"}):
            response = await client.responses.create(model=MODEL, input="Hi", **extra)
            assert response.output_text == "The product is 391."
            assert response.tools == [] and response.tool_choice == "none"
    for sent in fake_ollama.generation_requests:
        assert "anyOf" not in sent["format"]  # the final-answer form only


async def test_previous_response_id_goes_on_with_the_conversation(door, fake_ollama):
    fake_ollama.enqueue(ANSWER, action(final_answer="782", thought="doubled"))
    async with sdk(door) as client:
        first = await client.responses.create(model=MODEL, input=GOAL, tools=[])
        second = await client.responses.create(
            model=MODEL, previous_response_id=first.id, tools=[],
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Doubled?"}]}])
    assert second.output_text == "782"
    turns = fake_ollama.generation_requests[-1]["messages"][1:]
    assert [(t["role"], t["content"]) for t in turns] == [
        ("user", GOAL), ("assistant", "The product is 391."), ("user", "Doubled?")]


async def test_a_client_that_leaves_cancels_its_foreground_run(door, fake_ollama):
    fake_ollama.enqueue(Script(hang_before_headers=True))
    async with httpx.AsyncClient() as raw:
        with pytest.raises(httpx.ReadTimeout):
            await raw.post(f"http://{door.http_address}/v1/responses", timeout=1.0,
                           json={"model": MODEL, "input": GOAL})
    # The engine call closes: its run is cancelled, nobody waits for it.
    await wait_until(lambda: fake_ollama.disconnects > 0, timeout=10)
    async with client_stub(door.address) as stub:
        [run] = (await stub.ListAgentRuns(pb.ListAgentRunsRequest(), timeout=5)).runs
    async with sdk(door) as client:
        assert (await ended(client, run.id)).status == "cancelled"


async def test_a_dropped_foreground_stream_cancels_its_run(door, fake_ollama):
    fake_ollama.enqueue(Script(hang_before_headers=True))
    async with sdk(door) as client:
        stream = await client.responses.create(model=MODEL, input=GOAL, stream=True)
        created = await anext(aiter(stream))
        await stream.close()
        response_id = created.response.id
        await wait_until(lambda: fake_ollama.disconnects > 0, timeout=10)
        fetched = await ended(client, response_id)
    assert created.type == "response.created" and fetched.status == "cancelled"



async def test_a_waiting_request_holds_no_request_bytes(door, fake_ollama):
    """The body is in the run store once the run starts: a request waiting on a long run
    gives its bytes back to the budget both doors share."""
    fake_ollama.enqueue(Script(hang_before_headers=True))
    async with httpx.AsyncClient() as raw:
        waiting = asyncio.create_task(raw.post(
            f"http://{door.http_address}/v1/responses", timeout=30,
            json={"model": MODEL, "input": GOAL, "instructions": "x" * 50_000}))
        await wait_until(lambda: fake_ollama.generation_requests, timeout=10)
        assert door.http.budget.in_flight == 0
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

# --- the background: retrieve, resume, cancel -------------------------------------------


async def test_a_background_response_is_retrieved_and_its_stream_resumed(door, fake_ollama):
    fake_ollama.enqueue(action(0.02, tool="calculator", arguments={"expression": "17*23"}),
                        action(0.02, final_answer="The product is 391.", thought="done"))
    async with sdk(door) as client:
        started = await client.responses.create(model=MODEL, input=GOAL, tools=[CALCULATOR],
                                                background=True)
        assert started.status in ("queued", "in_progress") and started.background is True
        # Read the first events, then drop the stream.
        seen = []
        stream = await client.responses.retrieve(started.id, stream=True)
        async for event in stream:
            seen.append(event)
            if event.type == "response.output_item.added":
                break
        await stream.close()
        last = seen[-1].sequence_number
        resumed = [e async for e in await client.responses.retrieve(
            started.id, stream=True, starting_after=last)]
        whole = [e async for e in await client.responses.retrieve(started.id, stream=True)]
        # The SDK's own helper (it filters after starting_after itself).
        async with client.responses.stream(response_id=started.id,
                                           starting_after=last) as helper:
            helped = [e async for e in helper]
            final = await helper.get_final_response()
        done = await client.responses.retrieve(started.id)
    assert resumed[0].sequence_number == last + 1
    assert [e.model_dump() for e in seen + resumed][:-1] \
        == [e.model_dump() for e in whole][:-1]  # one order, one numbering
    assert resumed[-1].type == whole[-1].type == "response.completed"
    assert [e.sequence_number for e in helped] == [e.sequence_number for e in resumed]
    assert final.output_text == done.output_text == "The product is 391."
    assert done.status == "completed" and item_types(done) == item_types(final)


async def test_a_background_response_is_cancelled(door, fake_ollama):
    fake_ollama.enqueue(Script(hang_before_headers=True))
    async with sdk(door) as client:
        started = await client.responses.create(model=MODEL, input=GOAL, background=True)
        await wait_until(lambda: fake_ollama.generation_requests, timeout=5)
        cancelled = await client.responses.cancel(started.id)
        await wait_until(lambda: fake_ollama.disconnects > 0, timeout=5)
        events = [e async for e in await client.responses.retrieve(started.id, stream=True)]
        again = await client.responses.cancel(started.id)  # idempotent
    assert cancelled.status == again.status == "cancelled"
    assert events[-1].type == "response.failed" and events[-1].response.status == "cancelled"


async def test_a_background_stream_that_drops_leaves_its_run_going(door, fake_ollama):
    fake_ollama.enqueue(action(0.05, final_answer="The product is 391.", thought="done"))
    async with sdk(door) as client:
        stream = await client.responses.create(model=MODEL, input=GOAL, background=True,
                                               stream=True, tools=[])
        created = await anext(aiter(stream))
        await stream.close()
        done = await ended(client, created.response.id)
    assert done.status == "completed" and done.output_text == "The product is 391."



async def test_a_run_started_over_grpc_reads_as_a_response(door, fake_ollama):
    fake_ollama.enqueue(CALCULATE, ANSWER)
    async with client_stub(door.address) as stub:
        started = (await stub.StartAgentRun(pb.StartAgentRunRequest(
            run=pb.StartAgentRun(goal=GOAL, tools=["calculator"])), timeout=5)).run
    async with sdk(door) as client:
        done = await ended(client, started.id)
        events = [e async for e in await client.responses.retrieve(started.id, stream=True)]
    assert done.id == started.id and done.status == "completed"
    assert item_types(done) == ["function_call", "function_call_output", "message"]
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == done.output_text == "The product is 391."

# --- tenants, errors ----------------------------------------------------------------------


async def test_another_tenants_response_is_not_found(fake_ollama, tmp_path):
    keys = tmp_path / "tenants.yaml"
    keys.write_text("tenants:\n  a:\n    keys: [key-a]\n  b:\n    keys: [key-b]\n")
    fake_ollama.enqueue(ANSWER)
    settings = gateway_settings(ollama_url=fake_ollama.url, http_listen="127.0.0.1:0",
                                api_keys_file=str(keys))
    async with running_gateway(settings) as running:
        async with sdk(running, key="key-a") as owner, sdk(running, key="key-b") as other:
            response = await owner.responses.create(model=MODEL, input="Hi", tools=[])
            for attempt in (other.responses.retrieve(response.id),
                            other.responses.cancel(response.id),
                            other.responses.create(model=MODEL, input="Hi",
                                                   previous_response_id=response.id)):
                with pytest.raises(openai.NotFoundError) as caught:
                    await attempt
                assert caught.value.code == "run_not_found"
            assert (await owner.responses.retrieve(response.id)).status == "completed"


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"),
    ({"input": GOAL, "tools": [{"type": "function", "name": "nope"}]}, "tools[0].name"),
    ({"input": GOAL, "tools": [CALCULATOR, {"type": "web_search"}]}, "tools[1].type"),
    ({"input": GOAL, "tools": [{"type": "mcp", "server_label": "x",
                                "server_url": "https://example.com/mcp"}]},
     "tools[0].server_url"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]},
     "input[0].type"),
    ({"input": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "input[1].role"),
    ({"input": GOAL, "temperature": -1}, "temperature"),
    ({"input": GOAL, "top_p": 2}, "top_p"),
    ({"input": GOAL, "max_output_tokens": -1}, "max_output_tokens"),
    ({"input": GOAL, "max_tool_calls": -1}, "max_tool_calls"),
    ({"input": GOAL, "tool_choice": "required"}, "tool_choice"),
    ({"input": GOAL, "store": False}, "store"),
    ({"input": GOAL, "text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"input": GOAL, "conversation": "conv_1"}, "conversation"),
    ({"input": GOAL, "model": "bad model!"}, "model"),
])
async def test_what_the_door_refuses_names_its_param(door, body, param):
    async with httpx.AsyncClient() as raw:
        reply = await raw.post(f"http://{door.http_address}/v1/responses",
                               json={"model": MODEL, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


async def test_unknown_responses_and_routes(door):
    async with sdk(door) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.responses.retrieve("run_nope")
        assert caught.value.code == "run_not_found"
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model=MODEL, input=GOAL,
                                          previous_response_id="run_nope")
    base = f"http://{door.http_address}/v1/responses"
    async with httpx.AsyncClient() as raw:
        deleted = await raw.delete(f"{base}/run_x")
        listed = await raw.get(f"{base}/run_x/input_items")
        bad = await raw.get(f"{base}/run_x", params={"stream": "yes", "starting_after": "-1"})
    assert deleted.status_code == 405 and deleted.headers["allow"] == "GET"
    assert listed.status_code == 404
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream"


# --- MCP servers by label -------------------------------------------------------------------


async def test_an_mcp_server_by_label_is_an_mcp_call(fake_ollama, tmp_path):
    servers = tmp_path / "mcp.yaml"
    servers.write_text(json.dumps({"servers": {"local": {
        "command": sys.executable, "args": [MCP_SERVER, "stdio"], "timeout": 5}}}))
    fake_ollama.enqueue(action(tool="local__add", arguments={"a": 2, "b": 3}, thought="add"),
                        action(final_answer="5", thought="done"))
    settings = gateway_settings(ollama_url=fake_ollama.url, http_listen="127.0.0.1:0",
                                mcp_servers=str(servers))
    async with running_gateway(settings) as running:
        [server] = running.mcp.servers
        await asyncio.wait_for(server.listed.wait(), 30)
        async with sdk(running) as client:
            response = await client.responses.create(
                model=MODEL, input="What is 2 + 3?",
                tools=[{"type": "mcp", "server_label": "local", "allowed_tools": ["add"],
                        "require_approval": "never"}])
            with pytest.raises(openai.BadRequestError) as caught:
                await client.responses.create(
                    model=MODEL, input="Hi",
                    tools=[{"type": "mcp", "server_label": "elsewhere"}])
    assert caught.value.param == "tools[0].server_label"
    call, message = response.output
    assert call.type == "mcp_call" and call.server_label == "local" and call.name == "add"
    assert call.output == "5" and call.status == "completed"
    assert message.type == "message" and response.output_text == "5"
    offered = [b["properties"]["tool"]["enum"]
               for b in fake_ollama.generation_requests[0]["format"]["anyOf"]
               if "tool" in b["properties"]]
    assert offered == [["local__add"]]


# --- the Node SDK ----------------------------------------------------------------------------

NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_the_node_sdk_runs_responses(door, fake_ollama):
    fake_ollama.enqueue(CALCULATE, ANSWER, CALCULATE, ANSWER, ANSWER,
                        Script(hang_before_headers=True))
    proc = await asyncio.create_subprocess_exec(
        NODE, str(ROOT / "tests/openai_door_responses.mjs"), f"http://{door.http_address}/v1",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode() + out.decode()
    assert out.decode().splitlines() == [
        "foreground: completed function_call,function_call_output,message The product is 391.",
        "stream: The product is 391. [response.completed, numbered in order: true]",
        "background: true, resumed at 2, completed The product is 391.",
        "cancel: cancelled",
    ]


async def test_a_withdrawn_answer_ends_its_message_incomplete(door, fake_ollama):
    # A reply that begins an answer and breaks off (not JSON): the agent withdraws it and
    # asks again.
    fake_ollama.enqueue(Script(tokens=['{"final_answer": ', '"Three hundred', ' and']),
                        action(0.06, final_answer="391", thought="done"))
    async with sdk(door) as client:
        async with client.responses.stream(model=MODEL, input=GOAL, tools=[]) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [(item.type, item.status) for item in done] == [("message", "incomplete"),
                                                           ("message", "completed")]
    assert done[0].content[0].text.startswith("Three hundred")
    assert done[0].id != done[1].id
    assert item_types(final) == ["message"] and final.output_text == "391"
