"""The OpenAI-compatible backend against a real third-party server: llama-cpp-python's own
(`python -m llama_cpp.server`) on the packaged Gemma 3 270M GGUF, started once for the
module as a child on 127.0.0.1, through the real gateway and real channels.

Its dialect (openai-contract.md): JSON Schemas as `json_object` + `schema` in chats and as
a GBNF `grammar` for a raw prompt (its `/completions` ignores `response_format`), no usage
in streams, `top_k` and `repeat_penalty` accepted. It serves one request at a time, and is
started with `--interrupt_requests false` so that a later request never cuts an earlier
one: only a closed connection does. A 270M base model writes plain, repetitive text: the
tests assert mechanics, never wisdom.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import jsonschema
import pytest
import pytest_asyncio

from agentloop.backends.embedded import cache_dir, ensure_packaged_model
from agentloop.backends.openai import OpenAIBackend
from agentloop.domain import EmbeddingRequest
from agentloop.server import RunningServer
from agentloop.upstreams.spec import CompletionsFormat, EndpointSpec, OpenAIDialect, SchemaStyle
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from bench.processes import free_port, stop
from fake_ollama import wait_until
from helpers import PERSON_SCHEMA, client_stub, gateway_settings, running_gateway

pytestmark = [pytest.mark.real_model, pytest.mark.asyncio(loop_scope="module")]

ALIAS = "gemma-3-270m"
KEY = "sk-local-test"
LLAMA_CPP_PYTHON = OpenAIDialect(schema_style=SchemaStyle.JSON_OBJECT, stream_usage=False,
                                 completions=True, sampling_extras=True,
                                 repeat_penalty_field="repeat_penalty",
                                 completions_format=CompletionsFormat.GRAMMAR,
                                 strict_schema=False, stop_limit=0,
                                 tool_choice_required=False)
START_TIMEOUT = 120.0
#: Runs llama-cpp-python's server with llama.cpp's weight repacking off: on CPUs with AMX
#: (Sapphire Rapids and later) the repacked Q4_K weights crash the first decode
#: (ggml-org/llama.cpp#20824), so without this the server dies on its first answer there.
#: The repacking only lays out weights for speed; the answers' mechanics are the same.
SERVER_WITHOUT_REPACKING = """
import runpy
import llama_cpp.llama_cpp as native

default_params = native.llama_model_default_params

def without_repacking():
    params = default_params()
    params.use_extra_bufts = False
    return params

native.llama_model_default_params = without_repacking
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


@contextlib.contextmanager
def llama_cpp_server(log: Path, *extra: str) -> Iterator[str]:
    """llama-cpp-python's server on a free loopback port, its output into `log` (unbuffered:
    the tests read it); yields its API base (with /v1)."""
    gguf = ensure_packaged_model(cache_dir(gateway_settings()))
    port = free_port()
    with log.open("w") as output:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_WITHOUT_REPACKING, "--model", str(gguf),
             "--model_alias", ALIAS, "--chat_format", "gemma", "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", "2048", "--interrupt_requests", "false",
             "--api_key", KEY, *extra],
            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(base):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("llama-cpp-python's server did not start")
            time.sleep(0.2)
        yield base
    finally:
        stop(proc)


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {KEY}"},
                         timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def spec(base: str) -> EndpointSpec:
    return EndpointSpec(upstream="local-llama", kind="openai", url=base, api_key=KEY,
                        read_timeout=120.0, max_in_flight=1, dialect=LLAMA_CPP_PYTHON)


@pytest.fixture(scope="module")
def upstream_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llama-cpp-server") / "server.log"


@pytest.fixture(scope="module")
def upstream(upstream_log: Path) -> Iterator[str]:
    with llama_cpp_server(upstream_log) as base:
        yield base


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(upstream: str) -> AsyncIterator[RunningServer]:
    settings = gateway_settings(model=ALIAS, read_timeout=120.0, max_in_flight=1)
    async with running_gateway(settings, backend=OpenAIBackend(spec(upstream), settings)) \
            as running:
        await wait_until(lambda: running.health.ready, timeout=10)
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def stub(gateway: RunningServer) -> AsyncIterator[pb_grpc.AgentLoopServiceStub]:
    async with client_stub(gateway.address) as stub:
        yield stub


def options(max_tokens: int) -> pb.GenerationOptions:
    return pb.GenerationOptions(max_tokens=max_tokens, temperature=0, seed=7)


def user(text: str) -> list[pb.Message]:
    return [pb.Message(role=pb.ROLE_USER, content=text)]


async def test_generate_answers_a_chat(stub):
    reply = await stub.Generate(pb.GenerateRequest(
        messages=user("Name three colours."), options=options(8)), timeout=60)
    assert reply.text.strip()
    assert reply.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert reply.model == ALIAS
    # Its streams carry no usage: the counts stay unset rather than invented.
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (0, 0)


async def test_stream_generate_streams_deltas_then_the_end(stub):
    replies = [r async for r in stub.StreamGenerate(pb.StreamGenerateRequest(
        messages=user("Count: one, two,"), options=options(12)), timeout=60)]
    assert len([r for r in replies if r.text]) >= 2
    last = replies[-1]
    assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert last.timings.time_to_first_token.ToNanoseconds() > 0


async def test_a_raw_prompt_goes_through_completions(stub):
    reply = await stub.Generate(pb.GenerateRequest(
        prompt="The capital of France is", options=options(6)), timeout=60)
    assert reply.text and reply.finish_reason in (pb.FINISH_REASON_STOP,
                                                  pb.FINISH_REASON_LENGTH)


async def test_a_json_schema_constrains_the_answer(stub):
    reply = await stub.Generate(pb.GenerateRequest(
        messages=user("Describe a person as JSON."), options=options(64),
        format=pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA,
                                 json_schema=json.dumps(PERSON_SCHEMA))), timeout=60)
    assert reply.finish_reason == pb.FINISH_REASON_STOP, reply.text
    jsonschema.validate(json.loads(reply.text), PERSON_SCHEMA)


#: A person with a code no prompt mentions: only the grammar makes the model write it.
BADGE_SCHEMA = {**PERSON_SCHEMA, "properties": {**PERSON_SCHEMA["properties"],
                                                "badge": {"const": "zx-41"}},
                "required": ["name", "age", "badge"]}


async def test_a_raw_prompt_keeps_to_its_schema_through_a_grammar(stub):
    """llama-cpp-python's /v1/completions ignores `response_format`: the schema reaches it
    as a GBNF `grammar`, and the text validates (its `badge` proves the grammar arrived)."""
    reply = await stub.Generate(pb.GenerateRequest(
        prompt="A person as JSON:", options=options(96),  # beyond the schema's longest
        format=pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA,
                                 json_schema=json.dumps(BADGE_SCHEMA))), timeout=60)
    assert reply.finish_reason == pb.FINISH_REASON_STOP, reply.text
    jsonschema.validate(json.loads(reply.text), BADGE_SCHEMA)


#: A tool whose arguments only the server's grammar makes the model write.
LOOKUP_SCHEMA = {"type": "object", "properties": {"code": {"const": "zx-41"},
                                                   "count": {"type": "integer"}},
                 "required": ["code", "count"]}


async def test_a_required_tool_call_streams_and_validates(stub):
    """Its chat handler holds a call only to a named function: a call required of one tool
    goes by name; the call streams as `delta.tool_calls`, assembled into the same call."""
    tool = pb.ToolDefinition(name="lookup", description="Looks a code up.",
                             parameters_json_schema=json.dumps(LOOKUP_SCHEMA))
    replies = [r async for r in stub.StreamGenerate(pb.StreamGenerateRequest(
        messages=user("Look the code up."), options=options(64), tools=[tool],
        tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)), timeout=60)]
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    [call] = last.tool_calls
    assert call.name == "lookup" and call.id
    jsonschema.validate(json.loads(call.arguments_json), LOOKUP_SCHEMA)
    assert "".join(d.arguments_json for r in replies for d in r.tool_call_deltas) \
        == call.arguments_json


async def test_an_agent_run_keeps_to_the_action_schema(stub):
    """Every reply is an action by construction (the schema reaches the server's grammar),
    given room to finish one: which words the model picks differs from CPU to CPU (AVX2
    and AVX-512 builds round differently), and a reply cut at `max_tokens` is not JSON."""
    max_steps = 2
    reply = await stub.RunAgent(pb.RunAgentRequest(
        goal="What is 17*23? Use the calculator.", max_steps=max_steps,
        options=pb.GenerationOptions(max_tokens=160, temperature=0, seed=1)), timeout=240)
    assert 1 <= len(reply.steps) <= max_steps
    assert reply.stop_reason in (pb.AGENT_STOP_REASON_FINAL_ANSWER,
                                 pb.AGENT_STOP_REASON_MAX_STEPS)
    for step in reply.steps:
        assert not step.error, step.error
        if step.tool:
            assert step.tool in ("calculator", "current_time")
            assert isinstance(json.loads(step.arguments_json), dict)


async def test_list_models_names_the_alias(stub, gateway):
    listed = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [m.name for m in listed.models] == [ALIAS]
    assert listed.backend == "openai"
    # The server answers one request at a time: a health check behind a long one may time
    # out, so readiness is waited for, not read once.
    await wait_until(lambda: gateway.health.ready, timeout=30)


async def test_a_cancelled_stream_closes_the_upstream_request(stub, upstream_log):
    """The server says when a client went away; it runs one request at a time and never
    cuts one for the next, so the next call is answered only after the first one ended."""
    call = stub.StreamGenerate(pb.StreamGenerateRequest(
        messages=user("Write a very long story."),
        options=pb.GenerationOptions(max_tokens=1500, temperature=1.0, seed=3)), timeout=120)
    assert (await call.read()).text is not None
    assert "Disconnected from client" not in upstream_log.read_text()
    call.cancel()
    await wait_until(lambda: "Disconnected from client" in upstream_log.read_text(),
                     timeout=30)
    reply = await stub.Generate(pb.GenerateRequest(messages=user("Hi"), options=options(4)),
                                timeout=60)
    assert reply.text


async def test_a_wrong_key_is_unavailable_for_the_operator_to_fix(upstream):
    settings = gateway_settings(model=ALIAS)
    wrong = EndpointSpec(upstream="local-llama", kind="openai", url=upstream,
                         api_key="sk-wrong", dialect=LLAMA_CPP_PYTHON)
    async with running_gateway(settings, backend=OpenAIBackend(wrong, settings)) as running, \
            client_stub(running.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(pb.GenerateRequest(prompt="Hi", options=options(2)),
                                timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "sk-" not in caught.value.details()


async def test_embeddings_from_a_server_started_for_them(tmp_path):
    """One text per call: llama-cpp-python 0.3.36's server slices a batch of unpooled (per
    token) embeddings wrongly, so every text after the first gets another's numbers."""
    settings = gateway_settings(model=ALIAS)
    texts = ("a red apple", "a green pear", "a red apple")
    with llama_cpp_server(tmp_path / "server.log", "--embedding", "true") as base:
        backend = OpenAIBackend(spec(base), settings)
        try:
            results = [await backend.embed(EmbeddingRequest(model=ALIAS, texts=(text,)))
                       for text in texts]
        finally:
            await backend.close()
    vectors = [result.vectors[0] for result in results]
    assert {len(vector) for vector in vectors} == {640}  # Gemma 3 270M's width
    assert all(math.hypot(*vector) == pytest.approx(1.0) for vector in vectors)
    assert vectors[0] == pytest.approx(vectors[2]) and vectors[0] != vectors[1]
    assert results[0].input_tokens > 0 and results[0].upstream == "local-llama"


async def test_a_pools_file_routes_to_the_real_server_and_falls_back_when_it_is_full(
        upstream, tmp_path, monkeypatch):
    """The pools file as an operator writes it: the real server as a local `openai`
    upstream (its key from the environment, its dialect spelled out, the callers' name
    mapped to its alias), one call at a time, a fake Ollama after it with `overflow`."""
    from fake_ollama import FakeOllama, Script

    monkeypatch.setenv("AGENTLOOP_TEST_LLAMA_KEY", KEY)
    fallback = FakeOllama(default_script=Script(tokens=["from", " Ollama"]))
    await fallback.start("127.0.0.1", 0)
    pools = {
        "upstreams": {
            "llama": {"kind": "openai", "remote": False, "endpoints": [upstream],
                      "api_key_env": "AGENTLOOP_TEST_LLAMA_KEY", "max_in_flight": 1,
                      "read_timeout": 120, "overflow": {"max_queue": 0},
                      "models": {"gemma3n:e2b": ALIAS},
                      "dialect": {"schema_style": "json_object", "stream_usage": False,
                                  "sampling_extras": True,
                                  "repeat_penalty_field": "repeat_penalty",
                                  "completions_format": "grammar", "strict_schema": False,
                                  "stop_limit": 0}},
            "spare": {"kind": "ollama", "endpoints": [fallback.url]}},
        "routes": [{"models": ["gemma3n:e2b"], "pools": ["llama", "spare"]}]}
    path = tmp_path / "pools.yaml"
    path.write_text(json.dumps(pools))
    settings = gateway_settings(upstreams=str(path), read_timeout=120.0)
    try:
        async with running_gateway(settings) as running, client_stub(running.address) as stub:
            await wait_until(lambda: running.health.ready, timeout=10)
            reply = await stub.Generate(pb.GenerateRequest(
                messages=[pb.Message(role=pb.ROLE_USER, content="Say hi")],
                options=pb.GenerationOptions(max_tokens=4, temperature=0)), timeout=120)
            assert reply.upstream == "llama" and reply.text  # its streams report no usage
            assert reply.model == "gemma3n:e2b"  # the caller's name, not the alias sent
            held = stub.StreamGenerate(pb.StreamGenerateRequest(
                prompt="Once upon a time", options=pb.GenerationOptions(max_tokens=500)),
                timeout=120)
            await anext(aiter(held))  # the real server's one slot is taken
            spilled = await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=30)
            assert (spilled.upstream, spilled.text) == ("spare", "from Ollama")
            held.cancel()
    finally:
        await fallback.stop()
