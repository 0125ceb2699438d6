"""The embedded engine on the real Gemma 3 270M GGUF, through the real gateway and channels.

The model loads once for the module. A 270M base model writes plain, repetitive text:
the tests assert mechanics (token counts, streaming, grammars, cancellation, queueing),
never wisdom. Timing checks compare against the engine's own per-token time, never
against wall-clock constants.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import jsonschema
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentloop.backends.embedded import EmbeddedBackend, cache_dir, ensure_packaged_model
from agentloop.backends.llama_engine import split_on_stops
from agentloop.backends.ollama import OllamaBackend
from agentloop.server import RunningServer, select_backend
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import FakeOllama, wait_until
from helpers import (
    PERSON_SCHEMA,
    client_stub,
    gateway_settings,
    rich_details,
    running_gateway,
)

pytestmark = [pytest.mark.real_model, pytest.mark.asyncio(loop_scope="module")]

PROMPT = "The capital of France is"
LONG_TOKENS = 2000  # far more than any test waits for: such streams are always cancelled


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway() -> AsyncIterator[RunningServer]:
    """One gateway on the embedded engine for the module: one generation at a time
    (max_in_flight=1, whatever the engine's slots) and one queue place (max_queue=1)."""
    settings = gateway_settings(backend="embedded", max_in_flight=1, max_queue=1,
                                num_ctx=4096, read_timeout=120.0)
    async with running_gateway(settings, backend=EmbeddedBackend(settings)) as running:
        yield running


def options(max_tokens: int, **extra: object) -> pb.GenerationOptions:
    return pb.GenerationOptions(max_tokens=max_tokens, temperature=0, seed=7, **extra)


def engine_of(running: RunningServer) -> EmbeddedBackend:
    """The embedded engine behind the server's router (a pool of one)."""
    backend = running.backend.engine
    assert isinstance(backend, EmbeddedBackend), backend
    return backend


async def engine_idle(engine: EmbeddedBackend) -> None:
    """Wait until the engine's own report (its heartbeat) shows no generation at all."""
    def idle() -> bool:
        stats = engine.engine_stats
        return stats is not None and stats.running == stats.waiting == stats.slots_in_use == 0
    await wait_until(idle, timeout=30)


async def first_text(call: grpc.aio.UnaryStreamCall) -> str:
    """Read a stream until its first non-empty delta."""
    async for message in call:
        if message.text:
            return message.text
    raise AssertionError("the stream ended without text")


async def test_generate_returns_text_with_real_token_counts(gateway: RunningServer):
    async with client_stub(gateway.address) as stub:
        reply = await stub.Generate(
            pb.GenerateRequest(prompt=PROMPT, options=options(16)), timeout=60)

    assert reply.text.strip()
    assert 1 <= reply.usage.output_tokens <= 16
    assert reply.usage.input_tokens > 0
    assert reply.model == gateway.backend.default_model
    assert reply.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    if reply.finish_reason == pb.FINISH_REASON_LENGTH:
        assert reply.usage.output_tokens == 16
    timings = reply.timings
    assert timings.eval_duration.ToNanoseconds() > 0
    assert timings.prompt_eval_duration.ToNanoseconds() > 0
    # The model loaded before the call (this module's first): no load inside it, and the
    # parts add up to no more than the total.
    assert timings.load_duration.ToNanoseconds() == 0
    assert (timings.prompt_eval_duration.ToNanoseconds() + timings.eval_duration.ToNanoseconds()
            <= timings.total_duration.ToNanoseconds())
    await engine_idle(engine_of(gateway))


async def test_stream_deltas_add_up_to_the_generated_text(gateway: RunningServer):
    request = dict(prompt=PROMPT, options=options(24))
    async with client_stub(gateway.address) as stub:
        whole = await stub.Generate(pb.GenerateRequest(**request), timeout=60)
        messages = [m async for m in stub.StreamGenerate(
            pb.StreamGenerateRequest(**request), timeout=60)]

    assert "".join(m.text for m in messages) == whole.text
    assert sum(1 for m in messages if m.text) > 1, "the text came in one piece, not streamed"
    last = messages[-1]
    assert last.finish_reason == whole.finish_reason
    assert last.usage == whole.usage
    assert last.timings.time_to_first_token.ToNanoseconds() > 0


async def test_chat_messages_use_the_gemma_turns(gateway: RunningServer):
    async with client_stub(gateway.address) as stub:
        plain = await stub.Generate(pb.GenerateRequest(
            prompt="Name three colors.", options=options(8)), timeout=60)
        chat = await stub.Generate(pb.GenerateRequest(
            system="Answer in one word.",
            messages=[pb.Message(role=pb.ROLE_USER, content="Name three colors.")],
            options=options(8)), timeout=60)

    # The turn markers and the folded system text count as input the model saw.
    assert chat.usage.input_tokens > plain.usage.input_tokens + 6
    assert chat.usage.output_tokens <= 8
    assert chat.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


async def test_a_json_schema_constrains_the_output(gateway: RunningServer):
    async with client_stub(gateway.address) as stub:
        reply = await stub.Generate(pb.GenerateRequest(
            prompt="A person, as JSON:",
            options=options(96),
            format=pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA,
                                     json_schema=json.dumps(PERSON_SCHEMA)),
        ), timeout=60)

    assert reply.finish_reason == pb.FINISH_REASON_STOP, reply.text
    jsonschema.validate(json.loads(reply.text), PERSON_SCHEMA)


async def test_a_json_schema_keeps_its_property_order(gateway: RunningServer):
    # An agent's action schema puts "thought" before "tool" and "arguments" on purpose.
    schema = {"type": "object", "additionalProperties": False, "required": ["zeta", "alpha"],
              "properties": {"zeta": {"type": "string", "maxLength": 8},
                             "alpha": {"type": "string", "maxLength": 8}}}
    async with client_stub(gateway.address) as stub:
        reply = await stub.Generate(pb.GenerateRequest(
            prompt="Two words, as JSON:", options=options(48),
            format=pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA,
                                     json_schema=json.dumps(schema)),
        ), timeout=60)
    assert list(json.loads(reply.text)) == ["zeta", "alpha"], reply.text


async def test_stop_strings_end_the_text_before_them(gateway: RunningServer):
    async with client_stub(gateway.address) as stub:
        free = await stub.Generate(pb.GenerateRequest(prompt=PROMPT, options=options(16)),
                                   timeout=60)
        word = free.text.split()[1]  # a word the model is known to write
        stopped = await stub.Generate(pb.GenerateRequest(
            prompt=PROMPT, options=options(16, stop=[word])), timeout=60)

    assert stopped.finish_reason == pb.FINISH_REASON_STOP
    assert word not in stopped.text
    assert free.text.startswith(stopped.text)


async def test_the_packaged_model_is_assembled_once_under_a_temporary_name(tmp_path):
    target = await asyncio.to_thread(ensure_packaged_model, tmp_path)
    assert target.parent == tmp_path and target.stat().st_size > 200_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name], "a partial file stayed"
    modified = target.stat().st_mtime_ns
    assert await asyncio.to_thread(ensure_packaged_model, tmp_path) == target
    assert target.stat().st_mtime_ns == modified, "assembled again although present"


async def test_the_cache_directory_follows_the_setting_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir(gateway_settings()) == tmp_path / "xdg" / "agentloop"
    assert cache_dir(gateway_settings(model_cache_dir=str(tmp_path / "m"))) == tmp_path / "m"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir(gateway_settings()) == Path.home() / ".cache" / "agentloop"
    backend = EmbeddedBackend(gateway_settings(gguf=str(tmp_path / "My Model.Q8_0.gguf")))
    assert backend.default_model == "My-Model.Q8_0"


async def test_split_on_stops_holds_back_a_possible_stop_start():
    assert split_on_stops("hello wor", ("world",)) == (6, False)
    assert split_on_stops("hello world!", ("world",)) == (6, True)
    assert split_on_stops("abc", ()) == (3, False)
    assert split_on_stops("xx<en", ("<end>", "<e")) == (2, True)


async def test_cancelling_a_stream_frees_the_engine_at_once(gateway: RunningServer):
    engine = engine_of(gateway)
    async with client_stub(gateway.address) as stub:
        long = stub.StreamGenerate(pb.StreamGenerateRequest(
            prompt="Once upon a time", options=options(LONG_TOKENS)), timeout=120)
        seen = 0
        async for message in long:
            seen += len(message.text) > 0
            if seen >= 3:
                break
        assert gateway.admission.in_flight == 1
        cancelled_at = time.monotonic()
        long.cancel()
        # The admission slot (one here) passes on only when the engine has ended the job.
        short = await stub.Generate(pb.GenerateRequest(prompt=PROMPT, options=options(8)),
                                    timeout=120)
        waited = time.monotonic() - cancelled_at

    assert await long.code() == grpc.StatusCode.CANCELLED
    assert short.usage.output_tokens >= 1
    # The short request did not wait for the long one's ~2000 tokens: compared in the
    # engine's own time per token.
    per_token = short.timings.eval_duration.ToNanoseconds() / 1e9 / max(
        short.usage.output_tokens - 1, 1)
    assert waited < (LONG_TOKENS - seen) * per_token / 4, (waited, per_token)
    # And the cancelled generation stopped in the engine, not only in the gateway.
    await engine_idle(engine)


async def test_requests_beyond_the_queue_are_refused_with_retry_info(gateway: RunningServer):
    request = pb.StreamGenerateRequest(prompt="Once upon a time", options=options(LONG_TOKENS))
    async with client_stub(gateway.address) as stub:
        calls = [stub.StreamGenerate(request, timeout=120) for _ in range(3)]
        firsts = [asyncio.ensure_future(first_text(call)) for call in calls]
        try:
            # One runs, one waits in the queue (max_queue=1), one is refused at once.
            await wait_until(lambda: sum(f.done() for f in firsts) == 2
                             and gateway.admission.queued == 1, timeout=60)
            refused = [f for f in firsts if f.done() and f.exception() is not None]
            running = [f for f in firsts if f.done() and f.exception() is None]
            assert len(refused) == 1 and len(running) == 1
            error = refused[0].exception()
            assert isinstance(error, grpc.aio.AioRpcError)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = rich_details(error)
            assert details["RetryInfo"].retry_delay.ToNanoseconds() > 0
            assert details["ErrorInfo"].reason == "OVERLOADED"
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*firsts, return_exceptions=True)

        await wait_until(lambda: gateway.admission.in_flight == 0
                         and gateway.admission.queued == 0, timeout=30)
        again = await stub.Generate(pb.GenerateRequest(prompt=PROMPT, options=options(4)),
                                    timeout=60)
    assert again.usage.output_tokens >= 1
    await engine_idle(engine_of(gateway))


async def test_an_unknown_model_is_not_found(gateway: RunningServer):
    async with client_stub(gateway.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(pb.GenerateRequest(
                model="llama3:8b", prompt=PROMPT, options=options(4)), timeout=30)

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert rich_details(caught.value)["ErrorInfo"].reason == "MODEL_NOT_FOUND"
    assert caught.value.details() == ("model 'llama3:8b' not found; the embedded engine serves "
                                      "'gemma-3-270m-q4_k_m' (also as 'gemma3n:e2b')")


async def test_the_production_model_name_is_served_by_the_gguf(gateway: RunningServer):
    """A caller written against production (`gemma3n:e2b`, the --model default) runs
    unchanged; every reply names the model that served."""
    served = "gemma-3-270m-q4_k_m"
    async with client_stub(gateway.address) as stub:
        reply = await stub.Generate(pb.GenerateRequest(
            model="gemma3n:e2b", prompt=PROMPT, options=options(2)), timeout=60)
        last = [message async for message in stub.StreamGenerate(pb.StreamGenerateRequest(
            model="gemma3n:e2b", prompt=PROMPT, options=options(2)), timeout=60)][-1]
        counted = await stub.CountTokens(pb.CountTokensRequest(
            model="gemma3n:e2b", texts=[PROMPT]), timeout=60)
        embedded = await stub.Embed(pb.EmbedRequest(model="gemma3n:e2b", texts=[PROMPT]),
                                    timeout=60)

    assert reply.text and reply.usage.output_tokens >= 1
    assert (reply.model, last.model, counted.model, embedded.model) == (served,) * 4
    assert counted.total_tokens > 0 and embedded.dimensions > 0
    await engine_idle(engine_of(gateway))


async def test_list_models_reports_the_gguf(gateway: RunningServer):
    backend = engine_of(gateway)
    async with client_stub(gateway.address) as stub:
        listed = await stub.ListModels(pb.ListModelsRequest(), timeout=30)
        named = await stub.Generate(pb.GenerateRequest(
            model=listed.default_model, prompt=PROMPT, options=options(2)), timeout=60)

    assert listed.backend == "embedded"
    assert listed.default_model == "gemma-3-270m-q4_k_m"
    # The GGUF, then --model's name for it, with the same facts.
    model, alias = listed.models
    assert model.name == listed.default_model
    assert alias.name == "gemma3n:e2b"
    alias.name = model.name
    assert alias == model
    assert model.size_bytes == backend.model_path.stat().st_size > 200_000_000
    assert model.loaded
    assert model.family == "gemma3"
    assert model.quantization_level == "Q4_K_M"
    assert named.model == listed.default_model


async def test_readiness_follows_the_loaded_model(gateway: RunningServer):
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"),
                                   timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- backend auto-selection ------------------------------------------------------------------


async def test_auto_picks_the_embedded_engine_when_no_ollama_answers(caplog):
    # A bound socket that does not listen: connections to it are refused at once.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        settings = gateway_settings(backend="auto", ollama_url=url, num_ctx=512, warm_up=True)
        with caplog.at_level(logging.INFO, logger="agentloop.server"):
            async with running_gateway(settings) as running, \
                    client_stub(running.address) as stub:
                listed = await stub.ListModels(pb.ListModelsRequest(), timeout=30)
                reply = await stub.Generate(pb.GenerateRequest(
                    prompt=PROMPT, options=options(2)), timeout=60)

    engine_of(running)
    assert listed.backend == "embedded"
    assert reply.usage.output_tokens >= 1
    assert "no Ollama answers" in caplog.text


async def test_auto_picks_ollama_when_it_answers(caplog):
    async with FakeOllama() as fake:
        settings = gateway_settings(backend="auto", ollama_url=fake.url)
        with caplog.at_level(logging.INFO, logger="agentloop.server"):
            backend = await select_backend(settings)
        try:
            assert isinstance(getattr(backend, "inner", backend), OllamaBackend)
        finally:
            await backend.close()
        async with running_gateway(settings) as running, client_stub(running.address) as stub:
            listed = await stub.ListModels(pb.ListModelsRequest(), timeout=30)

    assert listed.backend == "ollama"
    assert "Ollama answers" in caplog.text
