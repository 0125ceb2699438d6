"""The response cache: deterministic requests only, LRU + TTL, single flight, streamed hits."""

from __future__ import annotations

import grpc
import pytest

from agentloop.domain import (
    FinishReason,
    GenerationEnd,
    GenerationRequest,
    SamplingOptions,
    Timings,
    Usage,
)
from agentloop.services.cache import ResponseCache, cache_key
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import FakeOllama, Script, wait_until
from helpers import TOKENS, client_stub, gateway_settings, rich_details, running_gateway

GREEDY = pb.GenerationOptions(temperature=0)


@pytest.fixture
async def gateway(fake_ollama: FakeOllama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, cache_entries=16)
    async with running_gateway(settings) as running:
        yield running


async def stream_texts(stub, **fields) -> list[str]:
    call = stub.StreamGenerate(pb.StreamGenerateRequest(**fields), timeout=10)
    texts = []
    while (reply := await call.read()) is not grpc.aio.EOF:
        texts.append(reply.text)
    return texts


async def test_the_cache_is_off_by_default(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    async with running_gateway(gateway_settings(ollama_url=fake_ollama.url)) as running, \
            client_stub(running.address) as stub:
        for _ in range(2):
            await stub.Generate(pb.GenerateRequest(prompt="hi", options=GREEDY), timeout=5)
        assert running.cache is None
    assert len(fake_ollama.generation_requests) == 2


async def test_a_hit_streams_the_same_deltas_without_the_backend(stub, gateway, fake_ollama):
    first = await stream_texts(stub, prompt="hi", options=GREEDY)
    second = await stream_texts(stub, prompt="hi", options=GREEDY)
    assert first == second == [*TOKENS, ""], "a hit streams delta by delta, then the end"
    # Across RPCs too: Generate and StreamGenerate ask the same question.
    reply = await stub.Generate(pb.GenerateRequest(prompt="hi", options=GREEDY), timeout=5)
    assert reply.text == "".join(TOKENS) and reply.usage.output_tokens == len(TOKENS)
    assert reply.finish_reason == pb.FINISH_REASON_STOP
    assert len(fake_ollama.generation_requests) == 1
    assert (gateway.cache.hits, gateway.cache.misses) == (2, 1)


@pytest.mark.parametrize(("options", "cached"), [
    (pb.GenerationOptions(temperature=0), True),
    (pb.GenerationOptions(seed=42), True),
    (pb.GenerationOptions(temperature=0.9, seed=42), True),
    (pb.GenerationOptions(), False),
    (pb.GenerationOptions(temperature=0.2), False),
])
async def test_only_deterministic_requests_are_cached(stub, fake_ollama, options, cached):
    for _ in range(2):
        await stub.Generate(pb.GenerateRequest(prompt="hi", options=options), timeout=5)
    assert len(fake_ollama.generation_requests) == (1 if cached else 2)


@pytest.mark.parametrize("change", [
    {"prompt": "other"},
    {"system": "be brief"},
    {"model": "other:1b"},
    {"options": pb.GenerationOptions(temperature=0, max_tokens=3)},
    {"options": pb.GenerationOptions(temperature=0, stop=["!"])},
    {"format": pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON)},
])
async def test_anything_that_shapes_the_answer_is_in_the_key(stub, fake_ollama, change):
    fake_ollama.models.append("other:1b")
    base = {"prompt": "hi", "options": GREEDY}
    await stub.Generate(pb.GenerateRequest(**base), timeout=5)
    await stub.Generate(pb.GenerateRequest(**{**base, **change}), timeout=5)
    assert len(fake_ollama.generation_requests) == 2


async def test_chat_messages_and_images_are_in_the_key(stub, fake_ollama):
    def chat(content: str, image: bytes) -> pb.GenerateRequest:
        return pb.GenerateRequest(options=GREEDY, messages=[
            pb.Message(role=pb.ROLE_USER, content=content, images=[image])])

    for request in (chat("hi", b"a"), chat("hi", b"b"), chat("ho", b"a"), chat("hi", b"a")):
        await stub.Generate(request, timeout=5)
    assert len(fake_ollama.generation_requests) == 3


async def test_failures_are_not_cached(stub, fake_ollama):
    fake_ollama.enqueue(Script(status=500))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(pb.GenerateRequest(prompt="hi", options=GREEDY), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    reply = await stub.Generate(pb.GenerateRequest(prompt="hi", options=GREEDY), timeout=5)
    assert reply.text == "".join(TOKENS)
    assert len(fake_ollama.generation_requests) == 2


async def test_a_hit_needs_no_admission_slot(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, cache_entries=4, max_in_flight=1,
                                max_queue=0)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        await stub.Generate(pb.GenerateRequest(prompt="hi", options=GREEDY), timeout=5)
        fake_ollama.enqueue(Script(tokens=TOKENS, hang_after=1))
        holder = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hold"), timeout=10)
        await holder.read()
        assert running.admission.in_flight == 1
        reply = await stub.Generate(pb.GenerateRequest(prompt="hi", options=GREEDY), timeout=5)
        assert reply.text == "".join(TOKENS)
        holder.cancel()


# --- single flight ------------------------------------------------------------------------

async def test_identical_concurrent_requests_share_one_backend_call(stub, gateway, fake_ollama):
    tokens = [f"t{i} " for i in range(20)]
    fake_ollama.enqueue(Script(tokens=tokens, token_delay=0.1))
    calls = [stub.StreamGenerate(pb.StreamGenerateRequest(prompt="same", options=GREEDY),
                                 timeout=10) for _ in range(10)]
    # Every caller gets the first delta while the shared generation is still running.
    firsts = [await call.read() for call in calls]
    assert all(first.text == "t0 " for first in firsts)
    assert fake_ollama.active_streams == 1
    for call in calls:
        rest = []
        while (reply := await call.read()) is not grpc.aio.EOF:
            rest.append(reply.text)
        assert "t0 " + "".join(rest) == "".join(tokens)
    assert len(fake_ollama.generation_requests) == 1
    assert gateway.cache.coalesced == 9 and gateway.cache.in_flight == 0


async def test_the_first_caller_leaving_does_not_end_the_shared_call(stub, gateway, fake_ollama):
    tokens = [f"t{i} " for i in range(20)]
    fake_ollama.enqueue(Script(tokens=tokens, token_delay=0.05))
    leader = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="same", options=GREEDY),
                                 timeout=10)
    await leader.read()
    follower = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="same", options=GREEDY),
                                   timeout=10)
    await follower.read()
    leader.cancel()
    rest = []
    while (reply := await follower.read()) is not grpc.aio.EOF:
        rest.append(reply.text)
    assert "t0 " + "".join(rest) == "".join(tokens)
    assert fake_ollama.disconnects == 0 and len(fake_ollama.generation_requests) == 1
    assert gateway.cache.coalesced == 1


async def test_the_last_caller_leaving_cancels_the_upstream_call(stub, gateway, fake_ollama):
    fake_ollama.enqueue(Script(tokens=["t"] * 1000, token_delay=0.02))
    calls = [stub.StreamGenerate(pb.StreamGenerateRequest(prompt="same", options=GREEDY),
                                 timeout=10) for _ in range(3)]
    for call in calls:
        await call.read()
    for call in calls:
        call.cancel()
    await wait_until(lambda: fake_ollama.disconnects == 1)
    await wait_until(lambda: gateway.cache.in_flight == 0 and gateway.admission.in_flight == 0)
    assert len(gateway.cache) == 0, "an abandoned answer is not an answer"


async def test_a_shared_failure_reaches_every_caller(stub, gateway, fake_ollama):
    fake_ollama.enqueue(Script(tokens=["t"] * 1000, token_delay=0.02))
    calls = [stub.StreamGenerate(pb.StreamGenerateRequest(prompt="same", options=GREEDY),
                                 timeout=10) for _ in range(4)]
    for call in calls:
        assert (await call.read()).text == "t"
    assert gateway.cache.coalesced == 3
    await fake_ollama.stop()  # Ollama dies under the shared generation
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert rich_details(caught.value)["ErrorInfo"].reason == "BACKEND_STREAM_FAILED"
    assert len(fake_ollama.generation_requests) == 1 and len(gateway.cache) == 0


# --- LRU and TTL --------------------------------------------------------------------------

def request(prompt: str) -> GenerationRequest:
    return GenerationRequest(
        model="m", prompt=prompt,
        options=SamplingOptions(temperature=0, top_p=1, top_k=1, max_tokens=8,
                                repeat_penalty=1, num_ctx=64))


def answer(text: str):
    end = GenerationEnd(FinishReason.STOP, Usage(1, 1), Timings(), "m")

    async def produce(_request: GenerationRequest):
        yield text
        yield end

    return produce


async def drain(stream) -> list[object]:
    return [item async for item in stream]


async def test_entries_expire_after_the_ttl_and_the_least_recent_goes_first():
    now = [0.0]
    cache = ResponseCache(max_entries=2, ttl=10.0, timer=lambda: now[0])
    for prompt in ("a", "b"):
        await drain(cache.stream(request(prompt), answer(prompt)))
    await drain(cache.stream(request("a"), answer("unused")))  # "a" is now the most recent
    await drain(cache.stream(request("c"), answer("c")))  # evicts "b"
    assert (cache.hits, cache.misses) == (1, 3)
    assert (await drain(cache.stream(request("a"), answer("new a"))))[0] == "a"
    assert (await drain(cache.stream(request("b"), answer("new b"))))[0] == "new b"
    now[0] = 10.5
    assert (await drain(cache.stream(request("a"), answer("fresh a"))))[0] == "fresh a"


def test_the_key_is_canonical():
    assert cache_key(request("a")) == cache_key(request("a"))
    assert cache_key(request("a")) != cache_key(request("b"))
    assert len(cache_key(request("a"))) == 64


async def test_answers_with_tools_offered_are_never_shared_and_tool_turns_are_in_the_key(
        stub, fake_ollama):
    """Each answer that may carry tool calls has ids of its own: never replayed. A chat's
    earlier calls and tool results shape the answer: in the key."""
    fake_ollama.capabilities[fake_ollama.models[0]] = ["completion", "tools"]
    ask = pb.Message(role=pb.ROLE_USER, content="weather?")
    tool = pb.ToolDefinition(name="get_weather")
    for _ in range(2):
        await stub.Generate(pb.GenerateRequest(messages=[ask], tools=[tool], options=GREEDY),
                            timeout=5)
    assert len(fake_ollama.generation_requests) == 2

    def answered(result: str) -> pb.GenerateRequest:
        call = pb.ToolCall(id="c1", name="get_weather", arguments_json="{}")
        return pb.GenerateRequest(options=GREEDY, messages=[
            ask, pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="c1", content=result)])

    for request in (answered("sunny"), answered("rain"), answered("sunny")):
        await stub.Generate(request, timeout=5)
    assert len(fake_ollama.generation_requests) == 4
