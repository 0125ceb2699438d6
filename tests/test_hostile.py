"""Hostile callers: what one unauthenticated caller sends never costs anyone else.

Through real channels against the fake Ollama: a flood of failing requests leaves the
replica ready, schemas past the limits are refused before any engine sees them, nothing
a caller sends opens a connection or runs a backtracking regex, metric labels stay in the
server's vocabulary, undecodable bytes get INVALID_ARGUMENT, ordinary failed or cancelled
calls log nothing at error level, and a fuzz run ends with the server alive and ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from agentloop.backends.ollama import parse_stream
from agentloop.domain import GenerationRequest, RequestedOptions
from agentloop.errors import BackendProtocolError
from agentloop.schema_limits import MAX_DEPTH, MAX_REPETITION, load_json, parse_schema
from agentloop.server import RunningServer
from agentloop.services.generation import resolve_options
from agentloop.telemetry import OTHER_MODEL
from agentloop.upstreams.resilience import CircuitState
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import FakeOllama, Script, wait_until
from helpers import (
    TOKENS,
    bad_fields,
    client_stub,
    gateway_settings,
    rich_details,
    running_gateway,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
BROKEN_MODEL = "broken:1b"
SERVICE = "/agentloop.v1.AgentLoopService/"


@pytest.fixture
async def gateway(fake_ollama: FakeOllama) -> AsyncIterator[RunningServer]:
    fake_ollama.default_script = Script(tokens=TOKENS)
    fake_ollama.models.append(BROKEN_MODEL)
    # The default breaker (5 failures) and retries: what a replica runs with.
    settings = gateway_settings(ollama_url=fake_ollama.url, retry_attempts=2,
                                retry_backoff=0.01, retry_backoff_max=0.02)
    async with running_gateway(settings) as running:
        yield running


async def health_status(address: str, service: str = "readiness") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


async def status_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# --- 1. a request's failures never change the replica's health --------------------------

async def test_a_flood_of_failing_requests_leaves_the_replica_ready(gateway, stub, fake_ollama):
    fake_ollama.model_scripts[BROKEN_MODEL] = Script(status=500)
    for round_ in range(3):
        # 20 broken-model calls at once, and other callers' calls in between.
        failing = [stub.Generate(pb.GenerateRequest(model=BROKEN_MODEL, prompt="hi"), timeout=5)
                   for _ in range(20)]
        others = [stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5) for _ in range(5)]
        codes = await asyncio.gather(*map(status_of, failing))
        assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
        replies = await asyncio.gather(*others)
        assert all(reply.text == "".join(TOKENS) for reply in replies)
        # Mid-stream error lines for the same model count no more than 500s do.
        fake_ollama.model_scripts[BROKEN_MODEL] = Script(error_after=1) if round_ == 0 \
            else Script(status=500)
    assert gateway.backend.engine_endpoint.breaker.state is CircuitState.CLOSED
    assert await health_status(gateway.address) == SERVING
    assert gateway.health.ready
    reply = await stub.Generate(pb.GenerateRequest(prompt="still here"), timeout=5)
    assert reply.text == "".join(TOKENS)


# --- 2. schema limits, before any engine sees the schema ---------------------------------

HOSTILE_SCHEMAS = {
    "long string": {"type": "string", "maxLength": 100_000},
    "long array": {"type": "array", "items": {"type": "integer"}, "maxItems": 100_000},
    "NUL const": {"const": "\u0000"},
    "NUL enum": {"enum": ["\u0000\u0000"]},
    "huge enum": {"enum": [f"v{i}" for i in range(200_000)]},
    "wide enum": {"enum": list(range(300))},
    "remote ref": {"type": "object", "properties": {"a": {"$ref": "http://127.0.0.1:9/a"}}},
    "missing local ref": {"properties": {"a": {"$ref": "#/$defs/nope"}}},
    "backreference regex": {"type": "string", "pattern": r"^(a)\1$"},
    "many bounds": {"type": "object", "properties": {
        f"p{i}": {"type": "string", "maxLength": MAX_REPETITION} for i in range(600)}},
    "huge range": {"type": "integer", "minimum": 0, "maximum": 10**30},
    "unevaluated with patterns": {"patternProperties": {"^a": {}},
                                  "unevaluatedProperties": False},
    # Two references per level: 2**20 subschemas for a validator to visit.
    "fan-out refs": {"$defs": {"d0": {"type": "string"}, **{
        f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i - 1}"}, {"$ref": f"#/$defs/d{i - 1}"}]}
        for i in range(1, 21)}}, "$ref": "#/$defs/d20"},
    "recursive ref": {"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"},
    # Patterns that compile to grammars a grammar engine cannot run: a NUL (aborts
    # llama.cpp) or other control characters by escape, and ambiguous repetitions that
    # stalled the engine for its whole watchdog period.
    "NUL by escape": {"type": "string", "pattern": "^\\x00$"},
    "control range": {"type": "string", "pattern": "^[\\x01-\\x02]+$"},
    "repeated optional": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "^(a?){300}$"}}, "required": ["a"]},
    "repeated star pair": {"type": "string", "pattern": "^([a-z]*[a-z]*){20}$"},
    "run of optionals": {"type": "string", "pattern": "^" + "a?" * 20 + "$"},
    # A `]` or `}` that opens nothing: regular expressions read it as a literal, while
    # llama-cpp-python's converter loops on it forever (holding a grammar builder).
    "stray bracket": {"type": "string", "pattern": "^]$"},
    "stray brace": {"type": "string", "pattern": "^a}$"},
    "bracket first in a set": {"type": "string", "pattern": "^[^]a]$"},
    # A lone surrogate: no UTF-8 for RE2 (it used to end in INTERNAL).
    "lone surrogate pattern": {"type": "string", "pattern": "^\ud800$"},
    "lone surrogate property pattern": {"type": "object", "patternProperties": {"\ud800": {}}},
    "ref chain too deep": {"$defs": {**{
        f"c{i}": {"properties": {"n": {"$ref": f"#/$defs/c{i + 1}"}}} for i in range(40)},
        "c40": {"type": "string"}}, "$ref": "#/$defs/c0"},
}
RAW_SCHEMAS = {
    "deep": '{"items":' * 990 + "{}" + "}" * 990,
    "NaN": '{"type": "number", "maximum": NaN}',
    "Infinity": '{"type": "number", "minimum": -Infinity}',
    "overflow": '{"type": "number", "maximum": 1e999}',
}


def schema_texts() -> list[Any]:
    cases = [pytest.param(json.dumps(schema), id=name) for name, schema in HOSTILE_SCHEMAS.items()]
    return cases + [pytest.param(text, id=name) for name, text in RAW_SCHEMAS.items()]


@pytest.mark.parametrize("schema", schema_texts())
async def test_hostile_format_schemas_are_refused_before_the_backend(stub, fake_ollama, schema):
    request = pb.GenerateRequest(prompt="hi", format=pb.ResponseFormat(
        type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=schema))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Generate(request, timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(raised.value) == {"format.json_schema"}
    assert fake_ollama.generation_requests == []


@pytest.mark.parametrize("schema", schema_texts())
async def test_hostile_client_tool_schemas_are_refused(stub, fake_ollama, schema):
    call = stub.StreamRunAgent(timeout=5)
    await call.write(pb.StreamRunAgentRequest(start=pb.StartAgentRun(
        goal="go", client_tools=[pb.ClientTool(name="t", parameters_json_schema=schema)])))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(raised.value) == {"start.client_tools[0].parameters_json_schema"}
    assert fake_ollama.generation_requests == []


async def test_schemas_within_the_limits_still_pass(stub, fake_ollama):
    schema = {
        "type": "object",
        "$defs": {"name": {"type": "string", "maxLength": MAX_REPETITION,
                           "pattern": "^[A-Z][a-z]+$"}},
        "properties": {"name": {"$ref": "#/$defs/name"},
                       "tags": {"type": "array", "maxItems": 8, "items": {"enum": ["a", "b"]}}},
        "required": ["name"],
    }
    request = pb.GenerateRequest(prompt="hi", format=pb.ResponseFormat(
        type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=json.dumps(schema)))
    await stub.Generate(request, timeout=5)
    assert fake_ollama.generation_requests[-1]["format"] == schema


@pytest.mark.parametrize("pattern", ["^[A-Z]{3}-\\d{4}$", "^(ab|cd)+$", "^[a-z]{1,50}$",
                                     "^\\d{3}(-\\d{2})?$", "^[^a]+$",
                                     "^[^\\x00-\\x1f]+$", "^\\]$", "^a\\}$",
                                     "^[a\\]]+$"])
async def test_ordinary_patterns_pass(stub, fake_ollama, pattern):
    schema = {"type": "string", "pattern": pattern}
    request = pb.GenerateRequest(prompt="hi", format=pb.ResponseFormat(
        type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=json.dumps(schema)))
    await stub.Generate(request, timeout=5)
    assert fake_ollama.generation_requests[-1]["format"] == schema


# Patterns the limits let through, with escapes, sets and repetitions next to `]` and `}`,
# and patterns refused for a stray one: llama-cpp-python's converter must finish on the
# first (it loops forever on the second), whatever version is installed.
CONVERTER_SAFE = ["^\\]$", "^a\\}$", "^[a\\]]+$", "^a{2}b{1,3}$", "^[}]$", "^(a|b)\\]{2}$",
                  "^[\\]a]*$", "^x{1,}$"]
CONVERTER_LOOPS = ["^]$", "^a}$", "^[^]a]$", "^[]a]$", "^a{2}}$"]


def test_patterns_let_through_are_ones_the_grammar_converter_finishes():
    for pattern in CONVERTER_LOOPS:
        with pytest.raises(ValueError, match="opens nothing"):
            parse_schema(json.dumps({"type": "string", "pattern": pattern}))
    for pattern in CONVERTER_SAFE:
        parse_schema(json.dumps({"type": "string", "pattern": pattern}))
    pytest.importorskip("llama_cpp.llama_grammar")
    script = ("import json, sys\n"
              "from llama_cpp.llama_grammar import json_schema_to_gbnf\n"
              "for pattern in json.loads(sys.argv[1]):\n"
              "    json_schema_to_gbnf(json.dumps({'type': 'string', 'pattern': pattern}))\n")
    # Its own process: a loop there can be killed at the timeout.
    subprocess.run([sys.executable, "-c", script, json.dumps(CONVERTER_SAFE)], check=True,
                   timeout=60)


async def test_hundreds_of_bad_client_tools_get_a_bounded_invalid_argument(stub, fake_ollama):
    call = stub.StreamRunAgent(timeout=10)
    await call.write(pb.StreamRunAgentRequest(start=pb.StartAgentRun(goal="go", client_tools=[
        pb.ClientTool(name=f"t{i}", parameters_json_schema='"x"') for i in range(200)])))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start.client_tools" in bad_fields(raised.value)
    assert len(raised.value.details()) < 4096


async def test_costly_client_tool_schemas_leave_health_checks_answering(stub, gateway):
    # Within the limits, each schema costs the meta-schema check real time. The request is
    # read on a worker thread, so a liveness check sent meanwhile answers long before the
    # request is read (on the event loop, it would wait for the whole read).
    costly = json.dumps({"type": "object", "allOf": [True] * 6000}, separators=(",", ":"))
    call = stub.StreamRunAgent(timeout=120)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await call.write(pb.StreamRunAgentRequest(start=pb.StartAgentRun(goal="go", client_tools=[
        pb.ClientTool(name=f"t{i}", parameters_json_schema=costly) for i in range(12)])))
    reading = asyncio.ensure_future(call.read())
    try:
        assert await health_status(gateway.address, "liveness") == SERVING
        answered = loop.time() - started
        with contextlib.suppress(grpc.aio.AioRpcError):  # an event or a status: either ends it
            await reading
        read = loop.time() - started
        assert answered < read / 2, f"liveness took {answered:.2f}s of the {read:.2f}s read"
    finally:
        call.cancel()
        await asyncio.wait({reading})


def test_json_reader_bounds_depth_and_refuses_non_finite_numbers():
    assert load_json("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    deep_text = "[" * (MAX_DEPTH + 10)
    # Brackets inside strings (escaped quotes too) do not count.
    assert load_json(json.dumps({"a": deep_text, "b": '"[['})) == {"a": deep_text, "b": '"[['}
    for text in ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "[NaN]", "[1e400]"):
        with pytest.raises(ValueError):
            load_json(text)
    with pytest.raises(ValueError):
        parse_schema('{"$id": "x", "properties": {"a": {"$id": "http://127.0.0.1:9/"}}}')


# --- 3. nothing a caller sends opens a connection or runs unbounded on the loop ----------

@pytest.fixture
async def tripwire() -> AsyncIterator[tuple[str, list[str]]]:
    """A local HTTP server that records every request it gets: it must get none."""
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"type": "string", "description": "internal secret"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", hits
    finally:
        await runner.cleanup()


async def test_remote_refs_are_refused_and_never_fetched(stub, fake_ollama, tripwire):
    url, hits = tripwire
    schemas = [
        {"type": "object", "properties": {"a": {"$ref": f"{url}/schema.json"}}},
        {"$id": f"{url}/root.json", "type": "object",
         "properties": {"a": {"$ref": "other.json"}}},
        {"type": "object", "properties": {"a": {"$dynamicRef": f"{url}/d#x"}}},
    ]
    for schema in schemas:
        call = stub.StreamRunAgent(timeout=5)
        await call.write(pb.StreamRunAgentRequest(start=pb.StartAgentRun(goal="go", client_tools=[
            pb.ClientTool(name="t", parameters_json_schema=json.dumps(schema))])))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call.read()
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "secret" not in raised.value.details()
        generate = stub.Generate(pb.GenerateRequest(prompt="hi", format=pb.ResponseFormat(
            type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=json.dumps(schema))), timeout=5)
        assert await status_of(generate) == grpc.StatusCode.INVALID_ARGUMENT
    assert hits == []
    assert fake_ollama.generation_requests == []


def tool_call(tool: str, arguments: dict[str, Any]) -> Script:
    return Script(tokens=[json.dumps({"thought": "t", "tool": tool, "arguments": arguments})])


async def test_a_catastrophic_regex_in_a_client_tool_costs_nothing(stub, fake_ollama, gateway):
    schema = {"type": "object", "properties": {"word": {"type": "string", "pattern": "^(a+)+$"}},
              "patternProperties": {"^(x+)+$": {"type": "integer"}},
              "additionalProperties": False}
    # Python's re would take about 2**40 steps on each of these (the loop frozen for days).
    evil = "a" * 40 + "!"
    fake_ollama.enqueue(tool_call("check", {"word": evil}),
                        tool_call("check", {"x" * 40 + "!": 1}),
                        Script(tokens=[json.dumps({"thought": "t", "final_answer": "done"})]))
    call = stub.StreamRunAgent(timeout=20)
    await call.write(pb.StreamRunAgentRequest(start=pb.StartAgentRun(goal="go", client_tools=[
        pb.ClientTool(name="check", parameters_json_schema=json.dumps(schema))])))
    observations = []
    async for event in call:
        if event.WhichOneof("event") == "tool_result":
            observations.append(event.tool_result)
            # The loop stays free: health answers while the run goes on.
            assert await health_status(gateway.address, "liveness") == SERVING
    assert [o.is_error for o in observations] == [True, True]
    assert "does not match" in observations[0].observation
    assert "not allowed" in observations[1].observation


# --- 4. metric labels come from the server's vocabulary ----------------------------------

async def test_made_up_model_names_share_one_metric_label(fake_ollama, monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, metrics_listen="127.0.0.1:0")
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)

        async def scrape() -> str:
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{running.metrics_port}/metrics")
            return response.text

        for index in range(5):
            await status_of(stub.Generate(pb.GenerateRequest(model=f"made-up-{index}",
                                                             prompt="hi"), timeout=5))
        few = len(await scrape())
        for index in range(5, 300):
            await status_of(stub.Generate(pb.GenerateRequest(model=f"made-up-{index}",
                                                             prompt="hi"), timeout=5))
        text = await scrape()
    assert "made-up" not in text
    assert f'gen_ai_request_model="{OTHER_MODEL}"' in text
    assert 'gen_ai_request_model="gemma3n:e2b"' in text
    assert len(text) < few * 1.1, "300 names grew /metrics like 5 did"


# --- 5. caps on what is forwarded --------------------------------------------------------

@pytest.mark.parametrize(("fields", "field"), [
    ({"options": pb.GenerationOptions(num_ctx=1 << 20)}, "options.num_ctx"),
    ({"options": pb.GenerationOptions(stop=["x" * 1_000_000])}, "options.stop"),
    ({"options": pb.GenerationOptions(stop=["x"] * 17)}, "options.stop"),
    ({"prompt": "", "messages": [pb.Message(role=pb.ROLE_USER, content="hi",
                                            images=[b"x"] * 17)]}, "messages.images"),
    ({"prompt": "", "messages": [pb.Message(role=pb.ROLE_USER, content="hi", images=[b""])]},
     "messages[0].images"),
])
async def test_caps_on_what_is_forwarded(stub, fake_ollama, fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Generate(pb.GenerateRequest(**{"prompt": "hi", **fields}), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_fields(raised.value)
    assert fake_ollama.generation_requests == []


# --- 6. undecodable bytes and deep nesting ------------------------------------------------

GARBAGE = b"\xff\xff\xff\xff\x0f"
METHODS = [
    (SERVICE + "Generate", "unary_unary"),
    (SERVICE + "StreamGenerate", "unary_stream"),
    (SERVICE + "RunAgent", "unary_unary"),
    (SERVICE + "StreamRunAgent", "stream_stream"),
    (SERVICE + "ListModels", "unary_unary"),
    ("/grpc.health.v1.Health/Check", "unary_unary"),
    ("/grpc.health.v1.Health/Watch", "unary_stream"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream"),
]


async def raw_call(channel: grpc.aio.Channel, method: str, kind: str, payload: bytes,
                   timeout: float = 5) -> grpc.StatusCode:
    """Send raw bytes as the request; the status the server answers with."""
    multicallable = getattr(channel, kind)(method)
    try:
        if kind == "unary_unary":
            await multicallable(payload, timeout=timeout)
        elif kind == "unary_stream":
            async for _ in multicallable(payload, timeout=timeout):
                pass
        else:
            call = multicallable(timeout=timeout)
            await call.write(payload)
            await call.done_writing()
            async for _ in call:
                pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("method", "kind"), METHODS)
async def test_undecodable_bytes_are_invalid_argument_on_every_method(gateway, method, kind,
                                                                      caplog):
    caplog.set_level(logging.WARNING)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        assert await raw_call(channel, method, kind, GARBAGE) == \
            grpc.StatusCode.INVALID_ARGUMENT
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_deeply_nested_model_replies_are_invalid_actions_not_errors(stub, fake_ollama):
    deep_arguments = '{"thought": "t", "tool": "calculator", "arguments": ' + \
        '{"a": ' * 3000 + "1" + "}" * 3000 + "}"
    fake_ollama.enqueue(Script(tokens=["[" * 5000]), Script(tokens=[deep_arguments]))
    reply = await stub.RunAgent(pb.RunAgentRequest(goal="go"), timeout=10)
    assert reply.stop_reason == pb.AGENT_STOP_REASON_MODEL_ERROR
    assert "nested" in reply.steps[0].error


# --- 7. no error-level log line for ordinary calls ----------------------------------------

def action(**fields: Any) -> Script:
    text = json.dumps(fields)
    return Script(tokens=[text[i:i + 7] for i in range(0, len(text), 7)])


async def test_agent_calls_and_cancelled_or_refused_calls_log_no_errors(stub, fake_ollama,
                                                                        gateway, caplog):
    caplog.set_level(logging.WARNING)
    calculate = action(thought="t", tool="calculator", arguments={"expression": "2*3"})
    answer = action(thought="t", final_answer="6")
    for _ in range(3):  # server tools, streamed
        fake_ollama.enqueue(calculate, answer)
        call = stub.StreamRunAgent(timeout=10)
        await call.write(pb.StreamRunAgentRequest(start=pb.StartAgentRun(goal="2*3?")))
        await call.done_writing()
        assert [e async for e in call][-1].finished.final_answer == "6"
    fake_ollama.enqueue(calculate, answer)
    assert (await stub.RunAgent(pb.RunAgentRequest(goal="2*3?"), timeout=10)).final_answer == "6"

    # Cancelled mid-generation: a stream, an agent stream, a unary agent run.
    fake_ollama.enqueue(Script(tokens=["a"], hang_after=1), Script(tokens=["{"], hang_after=1),
                        Script(tokens=["{"], hang_after=1))
    stream = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=10)
    await stream.read()
    stream.cancel()
    for _ in range(6):  # agent streams cancelled mid-step: their spans end in a finalizer
        agent = stub.StreamRunAgent(timeout=10)
        await agent.write(pb.StreamRunAgentRequest(start=pb.StartAgentRun(goal="go")))
        await agent.read()  # step_started
        agent.cancel()
        fake_ollama.enqueue(Script(tokens=["{"], hang_after=1))
    run = await stub.RunAgent(pb.RunAgentRequest(goal="go"), timeout=1)
    assert run.stop_reason == pb.AGENT_STOP_REASON_DEADLINE

    # Refused: bad argument, unknown model, bad client tool result.
    assert await status_of(stub.Generate(pb.GenerateRequest(prompt=""), timeout=5)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert await status_of(stub.Generate(pb.GenerateRequest(model="nope", prompt="x"),
                                         timeout=5)) == grpc.StatusCode.NOT_FOUND
    # The cancelled calls have ended on both sides.
    await wait_until(lambda: fake_ollama.active_streams == 0 and gateway.admission.in_flight == 0)
    gc.collect()  # closes what is left of the cancelled streams' generators, now
    for _ in range(20):
        await asyncio.sleep(0)  # lets the loop run the async-generator finalizers
    # The gateway's own loggers (the fake Ollama's aiohttp may note a dropped connection).
    errors = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR
              and r.name.startswith(("agentloop", "opentelemetry", "grpc"))]
    assert errors == []


# --- 8. fuzz: the server stays alive and ready -------------------------------------------

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.DEADLINE_EXCEEDED}
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**12), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(
                                ["type", "enum", "const", "maxLength", "maxItems", "pattern",
                                 "$ref", "properties", "items", "anyOf", "x"]), inner,
                                max_size=4)),
    max_leaves=12)


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(method, kind, request bytes): valid-looking messages with wild fields, or garbage."""
    method, kind = draw(st.sampled_from(METHODS[:5]))
    if draw(st.booleans()):
        return method, kind, draw(st.binary(max_size=64))
    schema = draw(st.one_of(JSONISH.map(json.dumps), st.text(max_size=32)))
    request = pb.GenerateRequest(
        model=draw(st.one_of(st.just(""), st.text(max_size=12))),
        prompt=draw(st.text(max_size=16)),
        options=pb.GenerationOptions(num_ctx=draw(st.integers(0, 1 << 30)),
                                     stop=draw(st.lists(st.text(max_size=4), max_size=3))),
        format=pb.ResponseFormat(type=draw(st.integers(0, 4)), json_schema=schema))
    if method.endswith("RunAgent"):
        start = pb.StartAgentRun(goal=request.prompt, model=request.model, client_tools=[
            pb.ClientTool(name=draw(st.text(max_size=8)), parameters_json_schema=schema)])
        message = start if method.endswith("StreamRunAgent") else pb.RunAgentRequest(
            goal=request.prompt, model=request.model)
        if method.endswith("StreamRunAgent"):
            return method, kind, pb.StreamRunAgentRequest(start=message).SerializeToString()
        return method, kind, message.SerializeToString()
    return method, kind, request.SerializeToString()


@pytest.fixture
async def fuzz_target(fake_ollama: FakeOllama) -> AsyncIterator[tuple[RunningServer,
                                                                      grpc.aio.Channel]]:
    fake_ollama.default_script = Script(
        tokens=[json.dumps({"thought": "t", "final_answer": "ok"})])
    async with running_gateway(gateway_settings(ollama_url=fake_ollama.url)) as running, \
            grpc.aio.insecure_channel(running.address) as channel:
        yield running, channel


@hypothesis_settings(max_examples=120, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=hostile_requests())
async def test_fuzzed_requests_get_defined_statuses_and_the_server_stays_ready(fuzz_target,
                                                                              case):
    running, channel = fuzz_target
    method, kind, payload = case
    code = await raw_call(channel, method, kind, payload)
    assert code in ALLOWED, (method, code)
    assert running.health.ready
    assert await health_status(running.address, "liveness") == SERVING


async def test_a_backend_line_nested_too_deep_is_a_protocol_error():
    async def lines() -> AsyncIterator[bytes]:
        yield b'{"response": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    request = GenerationRequest(model="m", prompt="p",
                                options=resolve_options(RequestedOptions(), gateway_settings()))
    with pytest.raises(BackendProtocolError):
        async for _ in parse_stream(lines(), request):
            pass


async def test_a_number_too_large_for_the_schema_is_an_observation(stub, fake_ollama):
    schema = {"type": "object", "properties": {"n": {"type": "number", "multipleOf": 0.5}}}
    fake_ollama.enqueue(Script(tokens=['{"thought": "t", "tool": "num", "arguments": {"n": 1'
                                       + "0" * 400 + "}}"]),
                        Script(tokens=[json.dumps({"thought": "t", "final_answer": "done"})]))
    call = stub.StreamRunAgent(timeout=10)
    await call.write(pb.StreamRunAgentRequest(start=pb.StartAgentRun(goal="go", client_tools=[
        pb.ClientTool(name="num", parameters_json_schema=json.dumps(schema))])))
    events = [event async for event in call]
    result = next(e.tool_result for e in events if e.WhichOneof("event") == "tool_result")
    assert result.is_error and "too large" in result.observation
    assert events[-1].finished.final_answer == "done"


async def test_counts_past_their_caps_are_refused_without_a_look_at_each(stub, fake_ollama):
    # Millions of messages, images, stop strings or tool names (a few KB compressed) held
    # the event loop for seconds while each was checked: one violation for the count.
    many_messages = pb.GenerateRequest(messages=[pb.Message(role=pb.ROLE_USER)] * 20_000)
    many_images = pb.GenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, content="x",
                                                          images=[b""] * 20_000)])
    many_stops = pb.GenerateRequest(prompt="hi", options=pb.GenerationOptions(stop=[""] * 20_000))
    for request, field in ((many_messages, "messages"), (many_images, "messages.images"),
                           (many_stops, "options.stop")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Generate(request, timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(raised.value) == [field]  # the count, and nothing per item
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.RunAgent(pb.RunAgentRequest(goal="go", tools=["nope"] * 20_000), timeout=10)
    assert violated_fields(raised.value) == ["tools"]
    assert fake_ollama.generation_requests == []


def violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """Every field violation's field, in order (repeats kept)."""
    return [v.field for v in rich_details(error)["BadRequest"].field_violations]


async def test_a_model_name_with_a_final_newline_is_invalid(stub, fake_ollama):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Generate(pb.GenerateRequest(prompt="hi", model="gemma3n:e2b\n"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(raised.value) == {"model"}


async def test_every_watcher_hears_a_change_after_another_watcher_of_it_left(gateway):
    # grpcio's servicer forgot a name's watchers when any one of them ended: a client that
    # cancelled its own Watch kept every other client from hearing of a drain.
    servicer = gateway.health.servicer
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        staying = health.Watch(health_pb2.HealthCheckRequest(service="readiness"))
        leaving = health.Watch(health_pb2.HealthCheckRequest(service="readiness"))
        try:
            assert (await staying.read()).status == SERVING
            assert (await leaving.read()).status == SERVING
            leaving.cancel()
            await wait_until(lambda: servicer._watchers["readiness"] == 1, timeout=10)
            await servicer.set("readiness", health_pb2.HealthCheckResponse.NOT_SERVING)
            reply = await asyncio.wait_for(staying.read(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            staying.cancel()
            await servicer.set("readiness", SERVING)
