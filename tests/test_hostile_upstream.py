"""Hostile upstreams: what an OpenAI-compatible server or an Ollama answers never becomes
INTERNAL, UNKNOWN, unbounded memory or a stuck call.

Through real channels to the real gateway, against the fakes scripted as a broken or
hostile upstream would answer: counts and durations out of any range, streams past
max_tokens, comments after the end, lines and answers beyond any size, model lists and
embeddings of the wrong shape. Each answer is clamped, cut or refused with a precise status
(UNAVAILABLE, BACKEND_PROTOCOL_ERROR), the upstream connection is closed where the gateway
stops reading, and readiness keeps following the upstream.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from agentloop.backends import bounds
from agentloop.backends.openai import OpenAIBackend
from agentloop.server import RunningServer
from agentloop.upstreams.spec import EndpointSpec
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from fake_ollama import FakeOllama, wait_until
from fake_ollama import Script as OllamaScript
from fake_openai import DEFAULT_MODEL, FakeOpenAI, Script
from helpers import TOKENS, client_stub, gateway_settings, rich_details, running_gateway

MAX_TOKENS = 20
#: Huge, negative, fractional, non-numeric and non-finite values an upstream may report.
HOSTILE_COUNTS = [10**30, 2**62, 1e30, -5, 2.5, "12", True, float("nan"), float("inf"),
                  None, [1], {"n": 1}]
HOSTILE_DURATIONS = [1e300, 10**400, 2**62, -1, float("inf"), float("nan"), "7", True]


# --- an OpenAI-compatible upstream --------------------------------------------------------


@contextlib.asynccontextmanager
async def openai_gateway(fake: FakeOpenAI) -> AsyncIterator[RunningServer]:
    settings = gateway_settings(model=DEFAULT_MODEL)
    spec = EndpointSpec(upstream="hostile", kind="openai", url=fake.url, connect_timeout=0.5,
                        read_timeout=10.0, max_in_flight=8)
    async with running_gateway(settings, backend=OpenAIBackend(spec, settings)) as running:
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
async def gateway(fake: FakeOpenAI) -> AsyncIterator[RunningServer]:
    async with openai_gateway(fake) as running:
        yield running


@pytest.fixture
async def stub(gateway: RunningServer) -> AsyncIterator[pb_grpc.AgentLoopServiceStub]:
    async with client_stub(gateway.address) as stub:
        await wait_until(lambda: gateway.health.ready)
        yield stub


def chat(text: str = "Hi there", max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    return {"messages": [pb.Message(role=pb.ROLE_USER, content=text)],
            "options": pb.GenerationOptions(max_tokens=max_tokens)}


async def stream(stub: pb_grpc.AgentLoopServiceStub, timeout: float = 10,
                 **fields: Any) -> list[pb.StreamGenerateResponse]:
    return [reply async for reply in stub.StreamGenerate(
        pb.StreamGenerateRequest(**(fields or chat())), timeout=timeout)]


def assert_protocol_error(error: grpc.aio.AioRpcError) -> None:
    """UNAVAILABLE with ErrorInfo BACKEND_PROTOCOL_ERROR, and no address in the message."""
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert rich_details(error)["ErrorInfo"].reason == "BACKEND_PROTOCOL_ERROR"
    assert "127.0.0.1" not in (error.details() or "")


def assert_usage_bounded(usage: pb.Usage, max_tokens: int = MAX_TOKENS) -> None:
    # The prompt is a few characters: no honest count is past a few hundred tokens.
    assert 0 <= usage.input_tokens <= 512
    assert 0 <= usage.cached_input_tokens <= usage.input_tokens
    assert 0 <= usage.output_tokens <= max_tokens + bounds.OUTPUT_TOKEN_SLACK


def assert_timings_bounded(timings: pb.Timings) -> None:
    """No duration the upstream reports is longer than the call itself."""
    total = timings.total_duration.ToTimedelta()
    for field in ("load_duration", "prompt_eval_duration", "eval_duration"):
        assert timings.HasField("total_duration")
        assert getattr(timings, field).ToTimedelta() <= total, field


@pytest.mark.parametrize("value", HOSTILE_COUNTS, ids=repr)
async def test_counts_an_upstream_reports_are_clamped(stub, fake, value):
    usage = {"prompt_tokens": value, "completion_tokens": value, "total_tokens": value,
             "prompt_tokens_details": {"cached_tokens": value}}
    fake.enqueue(Script(tokens=TOKENS, usage=usage), Script(tokens=TOKENS, usage=usage))
    reply = await stub.Generate(pb.GenerateRequest(**chat()), timeout=10)
    assert reply.text == "".join(TOKENS)
    assert_usage_bounded(reply.usage)
    [*_, last] = await stream(stub)
    assert_usage_bounded(last.usage)
    # The next call of the same caller is served as ever.
    assert (await stub.Generate(pb.GenerateRequest(**chat()), timeout=10)).text == "".join(
        TOKENS)


async def test_plausible_counts_pass_as_reported(stub, fake):
    usage = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11,
             "prompt_tokens_details": {"cached_tokens": 3}}
    fake.enqueue(Script(tokens=TOKENS, usage=usage))
    reply = await stub.Generate(pb.GenerateRequest(**chat()), timeout=10)
    # The cached count is not told: this dialect has no cache_salt, so the upstream's prefix
    # cache is shared across callers (test_upstreams.py has the dialect that tells it).
    assert (reply.usage.input_tokens, reply.usage.output_tokens,
            reply.usage.cached_input_tokens) == (7, 4, 0)


@pytest.mark.parametrize("value", HOSTILE_DURATIONS, ids=repr)
async def test_durations_an_upstream_reports_are_clamped(stub, fake, value):
    timings = {"prompt_ms": value, "predicted_ms": value}
    fake.enqueue(Script(tokens=TOKENS, timings=timings), Script(tokens=TOKENS, timings=timings))
    reply = await stub.Generate(pb.GenerateRequest(**chat()), timeout=10)
    assert reply.text == "".join(TOKENS)
    assert_timings_bounded(reply.timings)
    [*_, last] = await stream(stub)
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert_timings_bounded(last.timings)


async def test_an_upstream_streaming_past_max_tokens_is_cut_and_closed(stub, fake):
    fake.enqueue(Script(tokens=["x"] * 50_000, overrun=True),
                 Script(tokens=["x"] * 50_000, overrun=True))
    replies = await stream(stub)
    assert "".join(reply.text for reply in replies) == "x" * MAX_TOKENS
    assert replies[-1].finish_reason == pb.FINISH_REASON_LENGTH
    reply = await stub.Generate(pb.GenerateRequest(**chat()), timeout=10)
    assert reply.text == "x" * MAX_TOKENS
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH
    # The gateway left both responses: the upstream saw it go and stopped sending.
    await wait_until(lambda: fake.disconnects == 2)
    assert fake.tokens_sent < 2 * 50_000


async def test_one_huge_delta_is_cut_at_the_answers_length(stub, fake):
    fake.enqueue(Script(tokens=["y" * 500_000], overrun=True))
    reply = await stub.Generate(pb.GenerateRequest(**chat(max_tokens=1)), timeout=10)
    assert reply.text == "y" * bounds.answer_chars(1)
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH


async def test_an_endless_run_of_empty_chunks_is_cut(stub, fake):
    empty = b'data: {"choices":[{"index":0,"delta":{}}]}\n\n'
    fake.enqueue(Script(tokens=TOKENS, before_finish=empty * 10_000))
    reply = await stub.Generate(pb.GenerateRequest(**chat()), timeout=10)
    assert reply.text == "".join(TOKENS)
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH


async def test_comments_after_done_do_not_hold_the_call(stub, fake, gateway):
    fake.enqueue(Script(tokens=TOKENS, after_done=b": keep-alive\n\n" * 3, hang_after_done=True),
                 Script(tokens=TOKENS, after_done=b": keep-alive\n\n", hang_after_done=True))
    # The caller's deadline is far: the answer must come long before it.
    [*deltas, last] = await stream(stub, timeout=20)
    assert "".join(reply.text for reply in deltas) == "".join(TOKENS)
    assert last.finish_reason == pb.FINISH_REASON_STOP
    reply = await stub.Generate(pb.GenerateRequest(**chat()), timeout=20)
    assert reply.text == "".join(TOKENS)
    await wait_until(lambda: fake.disconnects == 2)
    assert gateway.health.ready


async def test_comment_lines_without_end_are_skipped(stub, fake):
    # 2 MiB of 32 KiB comment lines, never a blank line: twice the largest event.
    comments = (b": " + b"c" * 32768 + b"\n") * 64
    fake.enqueue(Script(tokens=TOKENS, before_finish=comments))
    reply = await stub.Generate(pb.GenerateRequest(**chat()), timeout=10)
    assert reply.text == "".join(TOKENS)
    assert reply.finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize("line", [
    b"data: " + b"z" * 2 * bounds.MAX_EVENT_BYTES,
    b": " + b"c" * 2 * bounds.MAX_EVENT_BYTES,
], ids=["data", "comment"])
async def test_a_line_beyond_any_size_is_unavailable(stub, fake, line):
    fake.enqueue(Script(tokens=TOKENS, before_finish=line))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(pb.GenerateRequest(**chat()), timeout=10)
    assert_protocol_error(caught.value)


def endless_model_list() -> itertools.chain[bytes]:
    return itertools.chain([b'{"object": "list", "data": ['],
                           itertools.repeat(b'{"id": "m", "object": "model"},' * 1000))


async def test_an_endless_model_list_is_cut_and_the_health_task_lives_on(fake):
    fake.answers["/v1/models"] = endless_model_list()
    async with openai_gateway(fake) as gateway, client_stub(gateway.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert_protocol_error(caught.value)
        await wait_until(lambda: "beyond any size" in gateway.health.last.reason)
        # About MAX_CONTROL_ANSWER_BYTES were read per call, then the connection dropped.
        chunk = len(b'{"id": "m", "object": "model"},' * 1000)
        assert fake.raw_chunks_sent < 64 * bounds.MAX_CONTROL_ANSWER_BYTES // chunk
        fake.answers.clear()
        await wait_until(lambda: gateway.health.ready)
        listed = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert [model.name for model in listed.models] == [DEFAULT_MODEL]


@pytest.mark.parametrize("answer", [
    b" " * (bounds.MAX_CONTROL_ANSWER_BYTES + 1),
    b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"data": [{"id": "m"}, 7, {"name": "no id"}]}',
    b'{"data": {"id": "m"}}',
    b"[1, 2, 3]",
], ids=["too-large", "nested-too-deep", "entries-of-another-shape", "not-a-list",
        "not-an-object"])
async def test_a_model_list_of_the_wrong_shape_is_unavailable(fake, answer):
    fake.answers["/v1/models"] = answer
    async with openai_gateway(fake) as gateway, client_stub(gateway.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert_protocol_error(caught.value)
        await wait_until(lambda: gateway.health.last.reason != "")
        assert not gateway.health.ready
        fake.answers.clear()
        await wait_until(lambda: gateway.health.ready)


@pytest.mark.parametrize("answer", [
    # A vector far beyond what one text can have: refused before it is parsed.
    json.dumps({"data": [{"index": 0, "embedding": [0.5] * 400_000}]}).encode(),
    b'{"data": [{"index": 0, "embedding": [0.5, "x"]}]}',
    b'{"data": [{"index": 0, "embedding": [0.5, 1e999]}]}',
    b'{"data": [{"index": 0, "embedding": [0.5, NaN]}]}',
    b'{"data": [{"index": 0, "embedding": 7}]}',
], ids=["too-large", "not-numbers", "infinite", "nan", "not-a-list"])
async def test_embeddings_beyond_their_bounds_are_unavailable(stub, fake, answer):
    fake.answers["/v1/embeddings"] = answer
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(model=DEFAULT_MODEL, texts=["one text"]), timeout=10)
    assert_protocol_error(caught.value)


async def test_an_embedding_count_out_of_range_is_clamped(stub, fake):
    fake.answers["/v1/embeddings"] = json.dumps(
        {"data": [{"index": 0, "embedding": [0.6, 0.8]}],
         "usage": {"prompt_tokens": 10**30}}).encode()
    reply = await stub.Embed(pb.EmbedRequest(model=DEFAULT_MODEL, texts=["one text"]),
                             timeout=10)
    assert list(reply.embeddings[0].values) == pytest.approx([0.6, 0.8])
    assert 0 <= reply.usage.input_tokens <= bounds.texts_tokens(("one text",))


# --- Ollama --------------------------------------------------------------------------------


@pytest.fixture
async def ollama_stub(fake_ollama: FakeOllama
                      ) -> AsyncIterator[tuple[pb_grpc.AgentLoopServiceStub, RunningServer]]:
    fake_ollama.default_script = OllamaScript(tokens=TOKENS)
    async with running_gateway(gateway_settings(ollama_url=fake_ollama.url)) as running, \
            client_stub(running.address) as stub:
        await wait_until(lambda: running.health.ready)
        yield stub, running


@pytest.mark.parametrize("value", HOSTILE_COUNTS, ids=repr)
async def test_ollama_counts_are_clamped(ollama_stub, fake_ollama, value):
    stub, _ = ollama_stub
    counts = {"prompt_eval_count": value, "eval_count": value}
    fake_ollama.enqueue(OllamaScript(tokens=TOKENS, final_fields=counts),
                        OllamaScript(tokens=TOKENS, final_fields=counts))
    reply = await stub.Generate(pb.GenerateRequest(**chat()), timeout=10)
    assert reply.text == "".join(TOKENS)
    assert_usage_bounded(reply.usage)
    [*_, last] = await stream(stub)
    assert_usage_bounded(last.usage)


async def test_a_tenants_token_budget_survives_an_upstreams_counts(fake_ollama, tmp_path):
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n  meter:\n    keys: [meter-key]\n"
                       "    tokens_per_minute: 100000\n")
    fake_ollama.default_script = OllamaScript(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, api_keys_file=str(tenants))
    key = (("authorization", "Bearer meter-key"),)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        for value in (10**30, 2**62):
            fake_ollama.enqueue(OllamaScript(tokens=TOKENS, final_fields={
                "prompt_eval_count": value, "eval_count": value}))
            reply = await stub.Generate(pb.GenerateRequest(**chat()), metadata=key, timeout=10)
            assert_usage_bounded(reply.usage)
        # The tenant was charged what its calls can have cost: its next calls are served.
        for _ in range(3):
            reply = await stub.Generate(pb.GenerateRequest(**chat()), metadata=key, timeout=10)
            assert reply.text == "".join(TOKENS)


@pytest.mark.parametrize("value", HOSTILE_DURATIONS, ids=repr)
async def test_ollama_durations_are_clamped(ollama_stub, fake_ollama, value):
    stub, _ = ollama_stub
    durations = {key: value for key in ("total_duration", "load_duration",
                                        "prompt_eval_duration", "eval_duration")}
    fake_ollama.enqueue(OllamaScript(tokens=TOKENS, final_fields=durations),
                        OllamaScript(tokens=TOKENS, final_fields=durations))
    reply = await stub.Generate(pb.GenerateRequest(**chat()), timeout=10)
    assert reply.text == "".join(TOKENS)
    [*_, last] = await stream(stub)
    for timings in (reply.timings, last.timings):
        for field in ("total_duration", "load_duration", "prompt_eval_duration",
                      "eval_duration"):
            # The gateway's own clock bounds them: a test's call takes seconds at most.
            assert getattr(timings, field).ToTimedelta().total_seconds() <= 60, field


async def test_ollama_streaming_past_num_predict_is_cut_and_closed(ollama_stub, fake_ollama):
    stub, _ = ollama_stub
    fake_ollama.enqueue(OllamaScript(tokens=["x"] * 50_000, overrun=True),
                        OllamaScript(tokens=["x"] * 50_000, overrun=True))
    replies = await stream(stub)
    assert "".join(reply.text for reply in replies) == "x" * MAX_TOKENS
    assert replies[-1].finish_reason == pb.FINISH_REASON_LENGTH
    reply = await stub.Generate(pb.GenerateRequest(**chat()), timeout=10)
    assert reply.text == "x" * MAX_TOKENS
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH
    await wait_until(lambda: fake_ollama.disconnects == 2)
    assert fake_ollama.tokens_sent < 2 * 50_000


async def test_ollama_lines_after_done_do_not_hold_the_call(ollama_stub, fake_ollama):
    stub, running = ollama_stub
    fake_ollama.enqueue(OllamaScript(tokens=TOKENS, after_done=b"\n" * 3, hang_after_done=True))
    reply = await stub.Generate(pb.GenerateRequest(**chat()), timeout=20)
    assert reply.text == "".join(TOKENS)
    await wait_until(lambda: fake_ollama.disconnects == 1)
    assert running.health.ready


async def test_an_ollama_line_beyond_any_size_is_unavailable(ollama_stub, fake_ollama):
    stub, _ = ollama_stub
    line = json.dumps({"response": "z" * (bounds.MAX_NDJSON_LINE_BYTES + 1),
                       "done": False}).encode() + b"\n"
    fake_ollama.enqueue(OllamaScript(tokens=TOKENS, before_final=line))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(pb.GenerateRequest(prompt="Hi",
                                               options=pb.GenerationOptions(max_tokens=20)),
                            timeout=10)
    assert_protocol_error(caught.value)


@pytest.mark.parametrize("path", ["/api/tags", "/api/ps"])
@pytest.mark.parametrize("answer", [
    b'{"models": [{"name": "gemma3n:e2b", "size": 1e999, "size_vram": 1e999}]}',
    b'{"models": [{"name": 7}]}',
    b'{"models": [{"name": "gemma3n:e2b", "modified_at": 7, "expires_at": "year 99999", '
    b'"details": "none"}]}',
    b'{"models": 7}',
    b" " * (bounds.MAX_CONTROL_ANSWER_BYTES + 1),
], ids=["infinite-sizes", "a-number-for-a-name", "fields-of-another-type", "not-a-list",
        "too-large"])
async def test_ollama_model_lists_of_the_wrong_shape(ollama_stub, fake_ollama, path, answer):
    stub, running = ollama_stub
    fake_ollama.answers[path] = answer
    try:
        listed = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
    except grpc.aio.AioRpcError as error:
        assert_protocol_error(error)
    else:  # read as far as it goes: sizes not believed, fields of another type left out
        for model in listed.models:
            assert 0 <= model.size_bytes <= bounds.MAX_REPORTED_BYTES
    # Health checks read the answer too (every 50 ms), and their task lives on: readiness
    # follows Ollama's model list once it answers well again.
    await wait_until(lambda: fake_ollama.raw_chunks_sent >= 3)
    fake_ollama.answers.clear()
    fake_ollama.models = ["another:1b"]
    await wait_until(lambda: "not pulled" in running.health.last.reason)
    fake_ollama.models = ["gemma3n:e2b"]
    await wait_until(lambda: running.health.ready)
    await stub.ListModels(pb.ListModelsRequest(), timeout=10)


@pytest.mark.parametrize("answer", [
    json.dumps({"model": "gemma3n:e2b", "embeddings": [[0.5] * 400_000]}).encode(),
    b'{"model": "gemma3n:e2b", "embeddings": [[0.5, 1e999]]}',
    b'{"model": "gemma3n:e2b", "embeddings": [[0.5, NaN]]}',
], ids=["too-large", "infinite", "nan"])
async def test_ollama_embeddings_beyond_their_bounds_are_unavailable(ollama_stub, fake_ollama,
                                                                     answer):
    stub, _ = ollama_stub
    fake_ollama.answers["/api/embed"] = answer
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(texts=["one text"]), timeout=10)
    assert_protocol_error(caught.value)


#: An error body of 64 MiB: the gateway reads its first bytes, never the rest.
ERROR_CHUNKS = 1024


async def test_an_error_body_is_read_no_further_than_its_first_bytes(ollama_stub, fake_ollama,
                                                                    fake):
    stub, _ = ollama_stub
    fake_ollama.raw_status = fake.raw_status = 500
    fake_ollama.answers["/api/chat"] = (b"x" * 65536 for _ in range(ERROR_CHUNKS))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(pb.GenerateRequest(**chat()), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    fake.answers["/v1/chat/completions"] = (b"x" * 65536 for _ in range(ERROR_CHUNKS))
    async with openai_gateway(fake) as gateway, client_stub(gateway.address) as openai_stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await openai_stub.Generate(pb.GenerateRequest(**chat()), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # Each side wrote a few chunks before it saw the gateway leave (socket buffers hold some).
    assert fake_ollama.raw_chunks_sent < ERROR_CHUNKS // 4
    assert fake.raw_chunks_sent < ERROR_CHUNKS // 4
