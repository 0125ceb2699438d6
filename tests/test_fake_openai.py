"""The fake OpenAI server speaks the contract: the official `openai` client parses its
streams, answers and errors, in both dialects."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from fake_openai import DEFAULT_MODEL, FakeOpenAI, KVCache, Script

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


async def test_the_official_client_reads_tool_calls_streamed_and_whole(client, fake):
    """Scripted calls reach the SDK as OpenAI sends them: streamed `delta.tool_calls` pieces
    by index (id and name first, then the arguments), whole `message.tool_calls`, finish
    reason tool_calls; the SDK's round trip (the call, then a tool turn) is taken."""
    call = {"id": "call_7", "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    fake.enqueue(Script(tokens=[], tool_calls=[call]), Script(tokens=[], tool_calls=[call]),
                 Script(tokens=["Snow."]))
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object",
                                              "properties": {"city": {"type": "string"}}}}}]
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    stream = await client.chat.completions.create(model=DEFAULT_MODEL, messages=ask,
                                                  tools=tools, tool_choice="required",
                                                  stream=True)
    pieces = [p for chunk in [c async for c in stream] if chunk.choices
              for p in chunk.choices[0].delta.tool_calls or ()]
    assert pieces[0].id == "call_7" and pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in pieces) == call["arguments"]
    whole = await client.chat.completions.create(model=DEFAULT_MODEL, messages=ask,
                                                 tools=tools)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    [made] = choice.message.tool_calls or ()
    answer = await client.chat.completions.create(model=DEFAULT_MODEL, tools=tools, messages=[
        *ask, choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": made.id, "content": "-3C"}])
    assert answer.choices[0].message.content == "Snow."
    with pytest.raises(openai.BadRequestError):  # a named tool that is not declared
        await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=ask, tools=tools,
            tool_choice={"type": "function", "function": {"name": "other"}})


async def test_the_kv_cache_model_reports_cached_prefixes_per_salt_and_forgets_on_restart(
        client, fake):
    fake.kv_cache = KVCache(capacity=8, block_tokens=4)
    fake.extras = {"cache_salt"}
    system = " ".join(f"w{i}" for i in range(16))  # 4 blocks

    async def cached(turn: str, salt: str = "a") -> int:
        answer = await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "system", "content": system},
                                           {"role": "user", "content": turn}],
            extra_body={"cache_salt": salt})
        assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
        return answer.usage.prompt_tokens_details.cached_tokens or 0

    assert await cached("one two") == 0
    assert await cached("three four") == 16, "the shared system prompt is cached"
    assert await cached("three four", salt="b") == 0, "another salt shares nothing"
    assert len(fake.kv_cache) == 8  # two salts' 4 blocks fill it
    assert await cached("five six", salt="c") == 0  # evicts salt a's blocks, tail first
    assert await cached("one two") == 0
    await fake.restart()
    assert await cached("one two") == 0, "a restarted engine's cache is empty"
    assert fake.kv_cache.hits == 1
