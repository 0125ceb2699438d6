"""The fake Ollama is honest: the official client parses it, and each scripted fault behaves
as specified, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ollama
import pytest

import fake_ollama
from fake_ollama import (
    DEFAULT_TOKENS,
    FakeOllama,
    Script,
    parse_keep_alive,
    split_words,
    wait_until,
)

MODEL = "gemma3n:e2b"
DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


def assert_final(chunk: Any, reason: str, eval_count: int, prompt_count: int) -> None:
    assert chunk.done is True
    assert chunk.done_reason == reason
    assert chunk.eval_count == eval_count
    assert chunk.prompt_eval_count == prompt_count
    for field in DURATIONS:
        value = getattr(chunk, field)
        assert isinstance(value, int) and value > 0, (field, value)
    assert chunk.total_duration >= chunk.eval_duration


async def post_lines(fake: FakeOllama, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST and return the parsed NDJSON lines."""
    async with httpx.AsyncClient(base_url=fake.url) as client:
        response = await client.post(path, json=body)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in response.text.splitlines()]


def generate_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "say hi to me", **extra}


@pytest.fixture
async def client(fake_ollama: FakeOllama) -> AsyncIterator[ollama.AsyncClient]:
    """The official client pointed at the fake (it has no `async with`: close it here)."""
    official = ollama.AsyncClient(host=fake_ollama.url)
    try:
        yield official
    finally:
        await official.close()


# ------------------------------------------------------------ the official client parses it


async def test_ollama_client_parses_a_streamed_generate(
    fake_ollama: FakeOllama, client: ollama.AsyncClient
) -> None:
    chunks = [c async for c in await client.generate(model=MODEL, prompt="one two three",
                                                     stream=True)]
    assert "".join(c.response for c in chunks) == "".join(DEFAULT_TOKENS)
    assert all(c.done is False and c.created_at.endswith("Z") for c in chunks[:-1])
    assert_final(chunks[-1], "stop", len(DEFAULT_TOKENS), 3)
    assert chunks[-1].response == ""
    assert chunks[-1].context and all(isinstance(i, int) for i in chunks[-1].context)
    assert fake_ollama.completed == 1


async def test_ollama_client_parses_a_streamed_chat(
    fake_ollama: FakeOllama, client: ollama.AsyncClient
) -> None:
    fake_ollama.enqueue(Script(response_text="Hello there, friend."))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi you"}]
    chunks = [c async for c in await client.chat(model=MODEL, messages=messages, stream=True)]
    assert "".join(c.message.content for c in chunks) == "Hello there, friend."
    assert {c.message.role for c in chunks} == {"assistant"}
    assert_final(chunks[-1], "stop", 3, 4)
    assert "context" not in json.dumps(chunks[-1].model_dump())
    path, body = fake_ollama.requests[-1]
    assert path == "/api/chat" and body["messages"] == messages


async def test_ollama_client_sends_tools_and_parses_tool_calls(
    fake_ollama: FakeOllama, client: ollama.AsyncClient
) -> None:
    """The official client's own tool types go out as the fake takes them, and the calls the
    fake scripts come back parsed, streamed and whole; a model without tool support is 400."""
    def get_weather(city: str) -> str:
        """The weather in a city.

        Args:
          city: the city
        """
        return "sunny"

    paris = {"name": "get_weather", "arguments": {"city": "Paris"}}
    messages = [{"role": "user", "content": "weather in Paris?"}]
    with pytest.raises(ollama.ResponseError) as raised:
        await client.chat(model=MODEL, messages=messages, tools=[get_weather])
    assert raised.value.status_code == 400 and "does not support tools" in raised.value.error
    fake_ollama.capabilities[MODEL] = ["completion", "tools"]
    call_script = Script(tokens=[], tool_calls=[paris])
    fake_ollama.enqueue(call_script, call_script, Script(tokens=["Sunny."]))
    chunks = [c async for c in await client.chat(model=MODEL, messages=messages,
                                                 tools=[get_weather], stream=True)]
    calls = [call for chunk in chunks for call in chunk.message.tool_calls or ()]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    whole = await client.chat(model=MODEL, messages=messages, tools=[get_weather])
    [call] = whole.message.tool_calls or ()
    assert call.function.name == "get_weather"
    answer = await client.chat(model=MODEL, tools=[get_weather], messages=[
        *messages, whole.message, {"role": "tool", "content": "sunny", "tool_name": "get_weather"}])
    assert answer.message.content == "Sunny."
    sent = fake_ollama.generation_requests[-1]
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


async def test_ollama_client_parses_non_streamed_answers(
    fake_ollama: FakeOllama, client: ollama.AsyncClient
) -> None:
    fake_ollama.enqueue(Script(tokens=["a", "b"]), Script(tokens=["c", "d", "e"]))
    generated = await client.generate(model=MODEL, prompt="x y")
    assert generated.response == "ab"
    assert_final(generated, "stop", 2, 2)
    chatted = await client.chat(model="gemma3n:e2b", messages=[{"role": "user", "content": "q"}])
    assert chatted.message.content == "cde"
    assert_final(chatted, "stop", 3, 1)
    assert fake_ollama.completed == 2


async def test_ollama_client_reads_tags_ps_show_and_pull(
    fake_ollama: FakeOllama, client: ollama.AsyncClient
) -> None:
    listed = await client.list()
    assert [m.model for m in listed.models] == [MODEL]
    assert listed.models[0].size and listed.models[0].details.format == "gguf"
    assert (await client.ps()).models == []

    await client.generate(model=MODEL, prompt="load me")
    running = (await client.ps()).models
    assert [m.model for m in running] == [MODEL]
    assert running[0].expires_at is not None and running[0].size_vram

    shown = await client.show(MODEL)
    assert shown.capabilities == ["completion"] and shown.modelinfo

    progress = [p async for p in await client.pull("llama3.2", stream=True)]
    assert progress[-1].status == "success"
    assert any(p.total and p.completed == p.total for p in progress)
    assert "llama3.2:latest" in [m.model for m in (await client.list()).models]
    assert (await client.generate(model="llama3.2", prompt="hi")).done


async def test_unknown_model_is_a_404_response_error(
    fake_ollama: FakeOllama, client: ollama.AsyncClient
) -> None:
    with pytest.raises(ollama.ResponseError) as raised:
        await client.generate(model="nope:1b", prompt="hi")
    assert raised.value.status_code == 404
    assert raised.value.error == 'model "nope:1b" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as raised:
        await client.show("nope:1b")
    assert raised.value.status_code == 404


# ------------------------------------------------------------ plain HTTP details


async def test_small_endpoints_and_content_types(fake_ollama: FakeOllama) -> None:
    async with httpx.AsyncClient(base_url=fake_ollama.url) as client:
        root = await client.get("/")
        assert root.text == "Ollama is running"
        version = await client.get("/api/version")
        assert version.headers["content-type"] == "application/json"
        assert version.json()["version"]
        whole = await client.post("/api/generate", json=generate_body(stream=False))
        assert whole.headers["content-type"] == "application/json"
        assert whole.json()["response"] == "".join(DEFAULT_TOKENS)
        assert (await client.post("/api/generate", content=b"{oops")).status_code == 400
        assert (await client.post("/api/chat", json={"messages": []})).status_code == 400


async def test_chunk_fields_are_exactly_the_contract(fake_ollama: FakeOllama) -> None:
    fake_ollama.enqueue(Script(tokens=["x"]), Script(tokens=["y"]))
    lines = await post_lines(fake_ollama, "/api/generate", generate_body())
    assert set(lines[0]) == {"model", "created_at", "response", "done"}
    assert set(lines[-1]) == {"model", "created_at", "response", "done", "done_reason",
                              "total_duration", "load_duration", "prompt_eval_count",
                              "prompt_eval_duration", "eval_count", "eval_duration", "context"}
    chat = await post_lines(fake_ollama, "/api/chat", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert chat[0]["message"] == {"role": "assistant", "content": "y"}
    assert set(chat[-1]) == set(lines[-1]) - {"response", "context"} | {"message"}


async def test_untagged_names_mean_latest(fake_ollama: FakeOllama) -> None:
    fake_ollama.models = ["llama3.2"]
    lines = await post_lines(fake_ollama, "/api/generate", {"model": "llama3.2:latest",
                                                            "prompt": "hi"})
    assert lines[-1]["done"] is True and lines[-1]["model"] == "llama3.2:latest"


async def test_scripts_are_fifo_then_the_default(fake_ollama: FakeOllama) -> None:
    fake_ollama.default_script = Script(tokens=["d"])
    fake_ollama.enqueue(Script(tokens=["1"]), Script(tokens=["2"]))
    texts = []
    for _ in range(3):
        lines = await post_lines(fake_ollama, "/api/generate", generate_body())
        texts.append("".join(line["response"] for line in lines))
    assert texts == ["1", "2", "d"]
    assert len(fake_ollama.generation_requests) == 3
    assert split_words("Hi  big world ") == ["Hi", "  big", " world", " "]


async def test_headers_of_the_last_generation_are_kept(fake_ollama: FakeOllama) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with httpx.AsyncClient(base_url=fake_ollama.url) as client:
        await client.post("/api/generate", json=generate_body(),
                          headers={"traceparent": traceparent})
    assert fake_ollama.headers["Traceparent"] == traceparent


async def test_load_and_unload_requests(fake_ollama: FakeOllama) -> None:
    async with httpx.AsyncClient(base_url=fake_ollama.url) as client:
        loaded = await client.post("/api/generate", json={"model": MODEL})
        assert loaded.json()["done_reason"] == "load" and "eval_count" not in loaded.json()
        ps = (await client.get("/api/ps")).json()["models"]
        assert [m["name"] for m in ps] == [MODEL]
        unloaded = await client.post("/api/chat", json={"model": MODEL, "messages": [],
                                                        "keep_alive": 0})
        assert unloaded.json()["done_reason"] == "unload"
        assert unloaded.json()["message"] == {"role": "assistant", "content": ""}
        assert (await client.get("/api/ps")).json()["models"] == []
        await client.post("/api/generate", json=generate_body(keep_alive="0s"))
        assert (await client.get("/api/ps")).json()["models"] == []
    assert fake_ollama.completed == 1, "load requests are not generations"
    assert parse_keep_alive("1h30m") == 5400 and parse_keep_alive(-1) == float("inf")


async def test_tools_on_a_model_without_the_capability_is_400(fake_ollama: FakeOllama) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    async with httpx.AsyncClient(base_url=fake_ollama.url) as client:
        response = await client.post("/api/chat", json=body)
    assert response.status_code == 400 and "does not support tools" in response.json()["error"]


# ------------------------------------------------------------ scripted faults


@pytest.mark.parametrize(("status", "message"), [
    (500, "boom"), (503, "server busy, please try again.  maximum pending requests exceeded"),
    (400, "bad thing"),
])
async def test_status_scripts_answer_an_error_body(fake_ollama: FakeOllama, status: int,
                                                   message: str) -> None:
    fake_ollama.enqueue(Script(status=status, error=message))
    async with httpx.AsyncClient(base_url=fake_ollama.url) as client:
        response = await client.post("/api/generate", json=generate_body())
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": message}


async def test_error_after_sends_tokens_then_an_error_line(
    fake_ollama: FakeOllama, client: ollama.AsyncClient
) -> None:
    fake_ollama.enqueue(Script(tokens=["a", "b", "c"], error_after=2, error="it broke"))
    lines = await post_lines(fake_ollama, "/api/generate", generate_body())
    assert [line.get("response") for line in lines[:2]] == ["a", "b"]
    assert lines[2:] == [{"error": "it broke"}]
    fake_ollama.enqueue(Script(error_after=1))
    with pytest.raises(ollama.ResponseError):
        async for _ in await client.generate(model=MODEL, prompt="x", stream=True):
            pass


async def test_reset_before_headers_is_a_connection_error(fake_ollama: FakeOllama) -> None:
    fake_ollama.enqueue(Script(reset_after=0))
    async with httpx.AsyncClient(base_url=fake_ollama.url) as client:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await client.post("/api/generate", json=generate_body())
        # The server itself lives on.
        assert (await client.get("/api/version")).status_code == 200
    assert fake_ollama.active_streams == 0


async def test_reset_mid_stream_raises_after_the_tokens(fake_ollama: FakeOllama) -> None:
    fake_ollama.enqueue(Script(tokens=["a", "b", "c", "d"], reset_after=2))
    seen: list[str] = []
    async with httpx.AsyncClient(base_url=fake_ollama.url) as client:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            async with client.stream("POST", "/api/generate", json=generate_body()) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    seen.append(json.loads(line)["response"])
    assert seen == ["a", "b"]


async def test_malformed_after_sends_a_line_that_is_not_json(fake_ollama: FakeOllama) -> None:
    fake_ollama.enqueue(Script(tokens=["a", "b"], malformed_after=1))
    async with httpx.AsyncClient(base_url=fake_ollama.url) as client:
        response = await client.post("/api/generate", json=generate_body())
    lines = response.text.splitlines()
    assert json.loads(lines[0])["response"] == "a" and len(lines) == 2
    with pytest.raises(ValueError):
        json.loads(lines[1])


async def test_truncate_final_ends_without_done(fake_ollama: FakeOllama) -> None:
    fake_ollama.enqueue(Script(tokens=["a", "b"], truncate_final=True))
    lines = await post_lines(fake_ollama, "/api/chat", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert [line["message"]["content"] for line in lines] == ["a", "b"]
    assert not any(line["done"] for line in lines)
    assert fake_ollama.completed == 0


async def test_hang_before_headers_counts_the_disconnect(fake_ollama: FakeOllama) -> None:
    fake_ollama.enqueue(Script(hang_before_headers=True))
    async with httpx.AsyncClient(base_url=fake_ollama.url, timeout=httpx.Timeout(5, read=0.2)) \
            as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/api/generate", json=generate_body())
    await wait_until(lambda: fake_ollama.disconnects == 1)
    await wait_until(lambda: fake_ollama.active_streams == 0)


async def test_hang_after_and_abandoned_streams_count_disconnects(fake_ollama: FakeOllama) -> None:
    fake_ollama.enqueue(Script(tokens=["a", "b", "c"], hang_after=1),
                        Script(tokens=["t"] * 1000, token_delay=0.01))
    async with httpx.AsyncClient(base_url=fake_ollama.url) as client:
        for expected in (1, 2):
            async with client.stream("POST", "/api/generate", json=generate_body()) as response:
                async for line in response.aiter_lines():
                    assert json.loads(line)["response"] in ("a", "t")
                    break  # leaving the block closes the response: the client goes away
            await wait_until(lambda n=expected: fake_ollama.disconnects == n)
    await wait_until(lambda: fake_ollama.active_streams == 0)
    assert fake_ollama.completed == 0


async def test_num_predict_cuts_with_done_reason_length(fake_ollama: FakeOllama) -> None:
    lines = await post_lines(fake_ollama, "/api/generate",
                             generate_body(options={"num_predict": 2}))
    assert [line["response"] for line in lines[:-1]] == list(DEFAULT_TOKENS[:2])
    assert lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 2
    fake_ollama.enqueue(Script(tokens=["a"], done_reason="stop"))
    unbounded = await post_lines(fake_ollama, "/api/generate",
                                 generate_body(options={"num_predict": -1}))
    assert unbounded[-1]["done_reason"] == "stop"


async def test_token_delay_paces_the_stream_and_durations_follow(fake_ollama: FakeOllama) -> None:
    fake_ollama.enqueue(Script(tokens=["t"] * 6, token_delay=0.02, first_token_delay=0.05))
    began = time.monotonic()
    lines = await post_lines(fake_ollama, "/api/generate", generate_body())
    elapsed = time.monotonic() - began
    assert elapsed >= 0.05 + 5 * 0.02 - 0.005
    final = lines[-1]
    assert final["prompt_eval_duration"] >= 45_000_000
    assert final["eval_duration"] >= 95_000_000
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]


async def test_concurrent_full_speed_streams(fake_ollama: FakeOllama) -> None:
    fake_ollama.default_script = Script(tokens=["tok"] * 300)
    async with httpx.AsyncClient(base_url=fake_ollama.url,
                                 limits=httpx.Limits(max_connections=50)) as client:
        async def one() -> int:
            response = await client.post("/api/generate", json=generate_body())
            return json.loads(response.text.splitlines()[-1])["eval_count"]

        counts = await asyncio.gather(*(one() for _ in range(50)))
    assert counts == [300] * 50
    assert fake_ollama.completed == 50 and fake_ollama.active_streams == 0


# ------------------------------------------------------------ going down and coming back


async def test_stop_refuses_and_restart_serves_on_the_same_port(fake_ollama: FakeOllama) -> None:
    port = fake_ollama.port
    fake_ollama.enqueue(Script(tokens=["t"] * 1000, token_delay=0.01))
    async with httpx.AsyncClient(base_url=fake_ollama.url) as client:
        async with client.stream("POST", "/api/generate", json=generate_body()) as response:
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                async for _ in response.aiter_lines():
                    if fake_ollama.running:
                        await fake_ollama.stop()  # mid-stream: the connection is aborted
        assert fake_ollama.active_streams == 0
        with pytest.raises(httpx.ConnectError):
            await client.get("/api/version")
        await fake_ollama.restart()
        assert fake_ollama.port == port
        assert (await client.get("/api/version")).status_code == 200
        lines = await post_lines(fake_ollama, "/api/generate", generate_body())
        assert lines[-1]["done"] is True


async def test_wait_until_times_out_with_a_clear_message() -> None:
    with pytest.raises(TimeoutError, match="never"):
        await wait_until(lambda: False, timeout=0.02, message="never")


async def test_cli_prints_its_url_and_serves() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, fake_ollama.__file__, "--port", "0",
        "--tokens", "3", "--model", "tiny:1b",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=15)).decode()
        prefix = "fake-ollama listening on "
        assert line.startswith(prefix), line
        url = line[len(prefix):].strip()
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/api/version")).json()["version"]
            answer = await client.post("/api/generate", json={"model": "tiny:1b", "prompt": "x",
                                                              "stream": False})
            assert answer.json()["eval_count"] == 3
    finally:
        proc.terminate()
        assert await proc.wait() == 0
