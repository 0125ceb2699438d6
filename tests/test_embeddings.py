"""Embed and CountTokens through the real gateway and channels, on the fake Ollama's
/api/embed: the request caps, the Ollama mapping, admission, cancellation, errors.

The embedded engine's own embeddings run on the real model in test_embedded_embeddings.py.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import grpc
import pytest

from agentloop.server import RunningServer
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import EMBEDDING_LENGTH, FakeOllama, Script, wait_until
from helpers import bad_fields, client_stub, gateway_settings, rich_details, running_gateway

MODEL = "gemma3n:e2b"
TEXTS = ["a cat sat on the mat", "a kitten sat on the rug", "quarterly tax filing deadline"]


@pytest.fixture
async def gateway(fake_ollama: FakeOllama) -> AsyncIterator[RunningServer]:
    """Small caps, so that the tests can go past them; one call at a time, one waiting."""
    settings = gateway_settings(ollama_url=fake_ollama.url, max_texts=4, max_text_bytes=64,
                                max_texts_bytes=160, max_in_flight=1, max_embed_in_flight=1,
                                max_queue=1, queue_timeout=0.5)
    async with running_gateway(settings) as running:
        yield running


def norm(values: list[float]) -> float:
    return math.sqrt(sum(x * x for x in values))


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_embed_returns_one_unit_vector_per_text_in_order(stub, fake_ollama):
    reply = await stub.Embed(pb.EmbedRequest(texts=TEXTS), timeout=5)
    assert reply.model == MODEL and reply.dimensions == EMBEDDING_LENGTH
    assert len(reply.embeddings) == len(TEXTS)
    assert reply.usage.input_tokens == sum(len(text.split()) for text in TEXTS)
    vectors = [list(e.values) for e in reply.embeddings]
    assert all(abs(norm(v) - 1) < 1e-5 for v in vectors)
    # In order: each vector is the one the text gets alone.
    for text, vector in zip(TEXTS, vectors, strict=True):
        [alone] = (await stub.Embed(pb.EmbedRequest(texts=[text]), timeout=5)).embeddings
        assert list(alone.values) == vector
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])
    # One /api/embed call for the whole batch, truncation off unless asked, keep_alive set.
    body = fake_ollama.embed_requests[0]
    assert body == {"model": MODEL, "input": TEXTS, "truncate": False, "keep_alive": "5m"}


async def test_dimensions_go_to_ollama_and_a_longer_one_is_refused(stub, fake_ollama):
    reply = await stub.Embed(pb.EmbedRequest(texts=TEXTS[:1], dimensions=256), timeout=5)
    assert reply.dimensions == 256 and len(reply.embeddings[0].values) == 256
    assert abs(norm(list(reply.embeddings[0].values)) - 1) < 1e-5
    assert fake_ollama.embed_requests[-1]["dimensions"] == 256
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(texts=TEXTS[:1], dimensions=4096), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == {"dimensions"}


@pytest.mark.parametrize(("texts", "dimensions", "fields"), [
    ([], 0, {"texts"}),
    (["a"] * 5, 0, {"texts"}),  # over max_texts: refused without a look at each
    (["ok", "x" * 65], 0, {"texts[1]"}),  # over max_text_bytes
    (["x" * 60, "y" * 60, "z" * 60], 0, {"texts"}),  # over max_texts_bytes in all
    (["ok", " "], 0, {"texts[1]"}),
    (["ok"], -1, {"dimensions"}),
])
async def test_bad_embed_requests_name_the_field_and_send_nothing(stub, fake_ollama, texts,
                                                                  dimensions, fields):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(texts=texts, dimensions=dimensions), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == fields
    assert fake_ollama.embed_requests == []


async def test_a_text_over_the_context_is_refused_or_cut_as_asked(stub, fake_ollama):
    fake_ollama.embed_context = 3
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(texts=[TEXTS[0]]), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == {"texts[0]"}
    reply = await stub.Embed(pb.EmbedRequest(texts=[TEXTS[0]], truncate=True), timeout=5)
    assert reply.usage.input_tokens == 3 and fake_ollama.embed_requests[-1]["truncate"] is True


async def test_ollama_cannot_give_raw_vectors_so_normalize_off_is_refused(stub, fake_ollama):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(texts=TEXTS, normalize=False), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == {"normalize"}
    assert fake_ollama.embed_requests == []


async def test_an_unknown_model_and_a_busy_or_gone_ollama_map_like_generation(
        stub, fake_ollama, gateway):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(model="absent:1b", texts=TEXTS), timeout=5)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    fake_ollama.embed_scripts.append(Script(status=503))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(texts=TEXTS), timeout=5)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "RetryInfo" in rich_details(caught.value)
    await fake_ollama.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(texts=TEXTS), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert rich_details(caught.value)["ErrorInfo"].reason == "BACKEND_UNAVAILABLE"


async def test_an_embedding_takes_an_admission_slot_and_a_cancel_frees_it(
        stub, fake_ollama, gateway):
    """Embed's slots are apart from generations' (max_in_flight=1, max_queue=1 each): a
    hanging Embed holds its slot, the next waits and times out, a third is refused, while a
    generation runs at once; cancelling the Embed closes its upstream request and frees
    the slot."""
    fake_ollama.embed_scripts.append(Script(hang_before_headers=True))
    hanging = stub.Embed(pb.EmbedRequest(texts=TEXTS), timeout=30)
    admission = gateway.embed_admission
    await wait_until(lambda: admission.in_flight == 1)
    queued = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(texts=TEXTS), timeout=5))
    await wait_until(lambda: admission.queued == 1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Embed(pb.EmbedRequest(texts=TEXTS), timeout=5)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)).text
    with pytest.raises(grpc.aio.AioRpcError) as waited:
        await queued
    assert waited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # the queue timeout
    hanging.cancel()
    await wait_until(lambda: admission.in_flight == 0)
    await wait_until(lambda: fake_ollama.disconnects == 1)  # the upstream request is closed
    assert (await stub.Embed(pb.EmbedRequest(texts=TEXTS), timeout=5)).embeddings
    assert gateway.admission.in_flight == 0


async def test_count_tokens_on_ollama_is_refused_plainly(stub, fake_ollama):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CountTokens(pb.CountTokensRequest(texts=TEXTS), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    info = rich_details(caught.value)["ErrorInfo"]
    assert info.reason == "UNSUPPORTED_BY_BACKEND" and info.metadata["backend"] == "ollama"
    assert fake_ollama.requests == [] or all(path != "/api/embed"
                                             for path, _ in fake_ollama.requests)


@pytest.mark.parametrize(("request_fields", "fields"), [
    ({}, {"texts"}),
    ({"texts": ["a"], "messages": [pb.Message(role=pb.ROLE_USER, content="a")]}, {"texts"}),
    ({"texts": ["a"], "system": "be brief"}, {"system"}),
    ({"texts": ["a"] * 5}, {"texts"}),
    ({"messages": [pb.Message(content="a")]}, {"messages[0].role"}),
    ({"texts": ["a"], "model": "bad model"}, {"model"}),
])
async def test_bad_count_requests_name_the_field(stub, request_fields, fields):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CountTokens(pb.CountTokensRequest(**request_fields), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == fields


async def test_list_models_says_which_models_embed_and_their_dimension(stub, fake_ollama):
    fake_ollama.models.append("embeddinggemma:latest")
    fake_ollama.capabilities["embeddinggemma:latest"] = ["embedding"]
    reply = await stub.ListModels(pb.ListModelsRequest(), timeout=5)
    by_name = {model.name: model for model in reply.models}
    assert by_name["embeddinggemma:latest"].embeds
    assert by_name["embeddinggemma:latest"].embedding_dimensions == EMBEDDING_LENGTH
    assert not by_name[MODEL].embeds and by_name[MODEL].embedding_dimensions == 0
    shows = sum(1 for path, _ in fake_ollama.requests if path == "/api/show")
    await stub.ListModels(pb.ListModelsRequest(), timeout=5)  # the facts are kept per digest
    assert sum(1 for path, _ in fake_ollama.requests if path == "/api/show") == shows


async def test_rate_limits_count_embed_calls(fake_ollama):
    settings = gateway_settings(ollama_url=fake_ollama.url, rate_limit=0.001, rate_burst=2)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        for _ in range(2):
            await stub.Embed(pb.EmbedRequest(texts=TEXTS), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbedRequest(texts=TEXTS), timeout=5)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED



async def test_embed_is_retried_early_and_counts_towards_the_circuit(fake_ollama):
    """A connection dropped before Ollama answered is sent again; an Ollama that stays
    unreachable opens the circuit for Embed as for generations."""
    settings = gateway_settings(ollama_url=fake_ollama.url, retry_attempts=1,
                                circuit_failure_threshold=2, circuit_reset_timeout=60)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        fake_ollama.embed_scripts.append(Script(reset_after=0))
        reply = await stub.Embed(pb.EmbedRequest(texts=TEXTS), timeout=5)
        assert len(reply.embeddings) == 3 and len(fake_ollama.embed_requests) == 2
        await fake_ollama.stop()
        reasons = []
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Embed(pb.EmbedRequest(texts=TEXTS), timeout=5)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            reasons.append(rich_details(caught.value)["ErrorInfo"].reason)
    # The second call's failure opens the circuit: its retry already fails fast.
    assert reasons == ["BACKEND_UNAVAILABLE", "CIRCUIT_OPEN", "CIRCUIT_OPEN"]
