"""The fake OpenAI server speaks the contract: the official `openai` client parses its
streams, answers and errors, in both dialects."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from fake_openai import DEFAULT_MODEL, FakeOpenAI, Script

TOKENS = ["Hi", " there", "!"]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(default_script=Script(tokens=TOKENS)) as fake:
        yield fake


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake.url, api_key="sk-any", max_retries=0) as client:
        yield client


async def test_the_official_client_streams_a_chat_with_usage(client):
    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hello you"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == TOKENS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.prompt_tokens == 2


async def test_the_official_client_reads_whole_answers_completions_models_embeddings(client):
    answer = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert answer.choices[0].message.content == "Hi there"
    assert answer.choices[0].finish_reason == "length"
    stream = await client.completions.create(model=DEFAULT_MODEL, prompt="Once", stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "".join(TOKENS)
    assert [m.id async for m in client.models.list()] == [DEFAULT_MODEL]
    vectors = await client.embeddings.create(model=DEFAULT_MODEL, input=["a", "b c"],
                                             dimensions=4)
    assert [len(d.embedding) for d in sorted(vectors.data, key=lambda d: d.index)] == [4, 4]
    assert vectors.usage.prompt_tokens == 3


async def test_the_official_client_sees_statuses_and_retry_after(client, fake):
    fake.enqueue(Script(status=429, retry_after="7"))
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.response.headers["retry-after"] == "7"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError):  # unknown fields are refused, as OpenAI does
        await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}],
            extra_body={"top_k": 3})
    fake.schema_style = "json_object"  # llama.cpp's dialect refuses json_schema with a 422
    with pytest.raises(openai.UnprocessableEntityError):
        await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "object"}}})


async def test_an_error_object_mid_stream_reaches_the_official_client(client, fake):
    fake.enqueue(Script(tokens=TOKENS, error_after=1))
    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
