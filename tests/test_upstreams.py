"""Upstream pools and routes: several real fake-Ollama endpoints on loopback behind one gateway.

The pick (fewest in flight, never over an endpoint's cap, sessions stick), fallback and
overflow before the first token only, local-only calls, the upstream named in every
response, readiness over the default route, and the pools file's checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentloop.config import SettingsError
from agentloop.upstreams.config import parse_pools
from agentloop.upstreams.spec import CompletionsFormat, OpenAIDialect
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import DEFAULT_MODEL, FakeOllama, Script, wait_until
from fake_openai import DEFAULT_MODEL as OPENAI_MODEL
from fake_openai import FakeOpenAI
from fake_openai import Script as OpenAIScript
from helpers import client_stub, gateway_settings, rich_details, running_gateway

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TOKENS = ["a", " b", " c"]


@contextlib.asynccontextmanager
async def fakes(count: int, **script: Any) -> AsyncIterator[list[FakeOllama]]:
    started = []
    try:
        for _ in range(count):
            fake = FakeOllama(default_script=Script(tokens=TOKENS, **script))
            await fake.start("127.0.0.1", 0)
            started.append(fake)
        yield started
    finally:
        for fake in started:
            await fake.stop()


def pools_file(tmp_path: Path, document: dict[str, Any]) -> str:
    path = tmp_path / "pools.json"
    path.write_text(json.dumps(document))
    return str(path)


def ollama_upstream(*endpoints: FakeOllama, **extra: Any) -> dict[str, Any]:
    return {"kind": "ollama", "endpoints": [f.url for f in endpoints], **extra}


@contextlib.asynccontextmanager
async def pooled_gateway(tmp_path: Path, document: dict[str, Any], **settings: Any):
    values = {"upstreams": pools_file(tmp_path, document), "retry_attempts": 0,
              "retry_backoff": 0.01, "retry_backoff_max": 0.02, **settings}
    async with running_gateway(gateway_settings(**values)) as running, \
            client_stub(running.address) as stub:
        yield running, stub


def served_by(fake: FakeOllama) -> int:
    return len(fake.generation_requests)


async def test_load_spreads_by_calls_in_flight_and_never_passes_a_cap(tmp_path):
    async with fakes(2, token_delay=0.02) as (one, two):
        document = {"upstreams": {"local": ollama_upstream(one, two, max_in_flight=2)},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["local"]}]}
        async with pooled_gateway(tmp_path, document) as (_running, stub):
            peak = {id(one): 0, id(two): 0}

            async def watch() -> None:
                while True:
                    for fake in (one, two):
                        peak[id(fake)] = max(peak[id(fake)], fake.active_streams)
                    await asyncio.sleep(0.002)

            watcher = asyncio.create_task(watch())
            replies = await asyncio.gather(*(
                stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=20) for _ in range(12)))
            watcher.cancel()
            assert {r.upstream for r in replies} == {"local"}
            assert served_by(one) + served_by(two) == 12
            assert min(served_by(one), served_by(two)) >= 4, "one endpoint took nearly all"
            assert max(peak.values()) <= 2, f"an endpoint ran over its cap: {peak}"


async def test_a_session_sticks_to_its_endpoint_and_moves_only_when_it_leaves(tmp_path):
    async with fakes(3) as endpoints:
        document = {"upstreams": {"local": ollama_upstream(*endpoints, max_in_flight=4)},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["local"]}]}
        async with pooled_gateway(tmp_path, document, retry_attempts=2) as (running, stub):
            async def turn(session: str) -> FakeOllama:
                before = [served_by(f) for f in endpoints]
                await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10,
                                    metadata=(("x-agentloop-session", session),))
                return next(f for f, n in zip(endpoints, before, strict=True)
                            if served_by(f) > n)

            homes = {}
            for session in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta"):
                homes[session] = {await turn(session) for _ in range(4)}
                assert len(homes[session]) == 1, f"session {session} moved between endpoints"
            gone = next(iter(homes["alpha"]))
            await gone.stop()
            await wait_until(lambda: not running.health.ready or _available(running) == 2,
                             timeout=5)
            moved = await turn("alpha")
            assert moved is not gone
            for session, home in homes.items():
                if home != {gone}:
                    assert await turn(session) in home, f"{session} moved though its " \
                                                        "endpoint stayed"


def _available(running) -> int:
    return sum(e.available for e in running.backend.pools["local"].endpoints)


async def test_a_dead_endpoint_costs_no_call_and_readiness_holds(tmp_path):
    async with fakes(3) as endpoints:
        document = {"upstreams": {"local": ollama_upstream(*endpoints)},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["local"]}]}
        async with pooled_gateway(tmp_path, document, retry_attempts=2,
                                  circuit_failure_threshold=1) as (running, stub):
            await endpoints[1].stop()
            replies = await asyncio.gather(*(
                stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10) for _ in range(9)))
            assert all(r.text == "".join(TOKENS) for r in replies)
            async with grpc.aio.insecure_channel(running.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                answer = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))
                assert answer.status == SERVING
                for fake in (endpoints[0], endpoints[2]):
                    await fake.stop()
                await wait_until(lambda: not running.health.ready, timeout=5)
                answer = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))
                assert answer.status == NOT_SERVING


async def test_a_busy_pool_falls_back_to_the_next_and_the_response_says_where(tmp_path):
    async with fakes(2) as (first, second):
        first.default_script = Script(status=503)
        document = {"upstreams": {"near": ollama_upstream(first), "far": ollama_upstream(second)},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["near", "far"]}]}
        async with pooled_gateway(tmp_path, document) as (_running, stub):
            call = stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
            reply = await call
            assert reply.upstream == "far" and reply.text == "".join(TOKENS)
            assert ("x-agentloop-upstream", "far") in tuple(await call.trailing_metadata())
            last = None
            async for message in stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"),
                                                     timeout=10):
                last = message
            assert last is not None and last.upstream == "far"


async def test_a_call_that_streamed_is_never_moved(tmp_path):
    async with fakes(2) as (first, second):
        first.default_script = Script(tokens=TOKENS, error_after=2)
        document = {"upstreams": {"near": ollama_upstream(first), "far": ollama_upstream(second)},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["near", "far"]}]}
        async with pooled_gateway(tmp_path, document, retry_attempts=2) as (_running, stub):
            texts = []
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                async for message in stub.StreamGenerate(
                        pb.StreamGenerateRequest(prompt="hi"), timeout=10):
                    texts.append(message.text)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "".join(texts) == "a b"
            assert served_by(second) == 0, "a call that had streamed was sent again"


async def test_no_first_token_in_time_moves_to_the_next_pool(tmp_path):
    async with fakes(2) as (slow, quick):
        slow.default_script = Script(tokens=TOKENS, first_token_delay=3.0)
        document = {"upstreams": {"slow": ollama_upstream(slow, first_token_timeout=0.2),
                                  "quick": ollama_upstream(quick)},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["slow", "quick"]}]}
        async with pooled_gateway(tmp_path, document) as (_running, stub):
            reply = await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
            assert reply.upstream == "quick"
            await wait_until(lambda: slow.disconnects == 1, timeout=3,
                             message="the slow upstream's request was not closed")


async def test_overflow_spills_past_the_queue_depth_and_local_only_never_leaves(tmp_path):
    async with fakes(2, token_delay=0.2) as (local, cloud):
        # The gateway admits the sum of the pools' caps (18): the whole burst reaches them.
        document = {
            "upstreams": {
                "local": ollama_upstream(local, max_in_flight=2, overflow={"max_queue": 2}),
                "cloud": ollama_upstream(cloud, remote=True, max_in_flight=16),
            },
            "routes": [{"models": [DEFAULT_MODEL], "pools": ["local", "cloud"],
                        "allow_remote": True}]}
        async with pooled_gateway(tmp_path, document) as (running, stub):
            replies = await asyncio.gather(*(
                stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=20) for _ in range(10)))
            where = [r.upstream for r in replies]
            # 2 in flight and 2 queued stay local; the other 6 spill.
            assert where.count("local") == 4 and where.count("cloud") == 6, where
            assert running.backend.pools["local"].overflowed == 6
            local_only = (("x-agentloop-local-only", "true"),)
            replies = await asyncio.gather(*(
                stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=20, metadata=local_only)
                for _ in range(10)))
            assert {r.upstream for r in replies} == {"local"}
            assert served_by(cloud) == 6


async def test_local_only_is_refused_where_only_remote_upstreams_serve(tmp_path):
    async with fakes(1) as (cloud,):
        cloud.models.append("big:latest")
        document = {
            "upstreams": {"cloud": ollama_upstream(cloud, remote=True)},
            "routes": [{"models": [DEFAULT_MODEL, "big"], "pools": ["cloud"],
                        "allow_remote": True}]}
        async with pooled_gateway(tmp_path, document) as (_running, stub):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(pb.GenerateRequest(prompt="hi", model="big"), timeout=10,
                                    metadata=(("x-agentloop-local-only", "1"),))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert rich_details(refused.value)["ErrorInfo"].reason == "LOCAL_ONLY"
            assert served_by(cloud) == 0
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.Generate(pb.GenerateRequest(prompt="hi", model="nope"), timeout=10)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


LOCAL_ONLY = "x-agentloop-local-only"


@pytest.mark.parametrize("metadata", [
    ((LOCAL_ONLY, "on"),), ((LOCAL_ONLY, "y"),), ((LOCAL_ONLY, "yes"),),
    ((LOCAL_ONLY, "enabled"),), ((LOCAL_ONLY, "t"),), ((LOCAL_ONLY, "true,true"),),
    ((LOCAL_ONLY, ""),), ((LOCAL_ONLY, "true"), (LOCAL_ONLY, "false")),
    ((LOCAL_ONLY, "false"), (LOCAL_ONLY, "false")),
])
async def test_an_unclear_local_only_header_is_refused_and_nothing_leaves(tmp_path, metadata):
    # Before: anything but 1, true or yes read as "not local-only" (the last of repeated
    # headers won): `on`, `y`, `enabled`... sent the call to the remote pool.
    async with fakes(1) as (cloud,):
        document = {
            "upstreams": {"cloud": ollama_upstream(cloud, remote=True)},
            "routes": [{"models": [DEFAULT_MODEL], "pools": ["cloud"], "allow_remote": True}]}
        async with pooled_gateway(tmp_path, document) as (_running, stub):
            for call in (stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10,
                                       metadata=metadata),
                         stub.RunAgent(pb.RunAgentRequest(goal="hi"), timeout=10,
                                       metadata=metadata)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                [violation] = rich_details(refused.value)["BadRequest"].field_violations
                assert violation.field == LOCAL_ONLY
            assert served_by(cloud) == 0


@pytest.mark.parametrize(("value", "local_only"), [
    ("true", True), (" TRUE ", True), ("1", True), ("false", False), ("False", False),
    ("0", False)])
async def test_the_local_only_header_takes_exactly_its_documented_values(
        tmp_path, value, local_only):
    async with fakes(1) as (cloud,):
        document = {
            "upstreams": {"cloud": ollama_upstream(cloud, remote=True)},
            "routes": [{"models": [DEFAULT_MODEL], "pools": ["cloud"], "allow_remote": True}]}
        async with pooled_gateway(tmp_path, document) as (_running, stub):
            call = stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10,
                                 metadata=((LOCAL_ONLY, value),))
            if local_only:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert rich_details(refused.value)["ErrorInfo"].reason == "LOCAL_ONLY"
            else:
                assert (await call).upstream == "cloud"
            assert served_by(cloud) == (0 if local_only else 1)


CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACED = (("traceparent", f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"),
          ("baggage", "user=alice,case=4711"))


@pytest.mark.parametrize(("remote", "propagate_trace", "traced", "baggage"), [
    (False, None, True, True),   # local: what the process's propagators carry
    (False, False, False, False),
    (True, None, False, False),  # remote: nothing unless the operator says so
    (True, True, True, False),   # ... and then the trace context, never the baggage
])
async def test_upstreams_get_trace_headers_as_the_operator_says(
        tmp_path, remote, propagate_trace, traced, baggage):
    # Before: every upstream, a remote one too, got the caller's trace and baggage.
    openai = FakeOpenAI(default_script=OpenAIScript(tokens=TOKENS))
    await openai.start()
    try:
        async with fakes(1) as (ollama,):
            extra = {} if propagate_trace is None else {"propagate_trace": propagate_trace}
            document = {
                "upstreams": {
                    "ollama": ollama_upstream(ollama, remote=remote, **extra),
                    "openai": {"kind": "openai", "endpoints": [openai.url], "remote": remote,
                               **extra}},
                "routes": [{"models": [DEFAULT_MODEL], "pools": ["ollama"],
                            "allow_remote": remote},
                           {"models": [OPENAI_MODEL], "pools": ["openai"],
                            "allow_remote": remote}]}
            async with pooled_gateway(tmp_path, document) as (_running, stub):
                for model in (DEFAULT_MODEL, OPENAI_MODEL):
                    await stub.Generate(pb.GenerateRequest(prompt="hi", model=model),
                                        metadata=TRACED, timeout=10)
            got = [{k.lower(): v for k, v in ollama.headers.items()},
                   {k.lower(): v for k, v in openai.generation_headers[-1].items()}]
    finally:
        await openai.stop()
    for headers in got:
        assert ("traceparent" in headers) is traced, headers
        if traced:
            assert headers["traceparent"].split("-")[1] == CALLER_TRACE
        assert ("baggage" in headers) is baggage, headers


@pytest.mark.parametrize(("dialect", "cached"), [
    ({}, 0), ({"cache_salt": False, "schema_style": "json_object"}, 0),
    ({"cache_salt": True}, 3)])
async def test_cached_tokens_are_told_only_where_the_upstream_keeps_scopes_apart(
        tmp_path, dialect, cached):
    # Before: an upstream sharing one prefix cache across callers (llama.cpp's server,
    # llama-cpp-python's, any dialect without cache_salt) told each caller how much of
    # its prompt another caller had sent: an oracle for the others' prompts.
    openai = FakeOpenAI(default_script=OpenAIScript(tokens=TOKENS, cached_tokens=3))
    openai.extras = {"cache_salt"}
    await openai.start()
    try:
        document = {
            "upstreams": {"openai": {"kind": "openai", "endpoints": [openai.url],
                                     "remote": False, "dialect": dialect}},
            "routes": [{"models": [OPENAI_MODEL], "pools": ["openai"]}]}
        async with pooled_gateway(tmp_path, document, model=OPENAI_MODEL) as (_running, stub):
            # A prompt of more tokens than the cached count (the gateway bounds a cached
            # count by the prompt's).
            prompt = "a shared prefix of several words"
            reply = await stub.Generate(pb.GenerateRequest(prompt=prompt), timeout=10)
            streamed = [r async for r in stub.StreamGenerate(
                pb.StreamGenerateRequest(prompt=prompt), timeout=10)]
    finally:
        await openai.stop()
    assert reply.usage.input_tokens >= 3
    assert reply.usage.cached_input_tokens == streamed[-1].usage.cached_input_tokens == cached
    assert ("cache_salt" in openai.generation_requests[-1]) is bool(cached)


async def test_routes_map_names_aliases_and_patterns_to_upstream_names(tmp_path):
    async with fakes(1) as (fake,):
        fake.models.append("qwen3:8b")
        document = {
            "upstreams": {"local": ollama_upstream(fake, models={"small": DEFAULT_MODEL})},
            "routes": [{"models": [DEFAULT_MODEL, "small"], "pools": ["local"]},
                       {"pattern": "qwen3:.*", "pools": ["local"]}]}
        async with pooled_gateway(tmp_path, document) as (_running, stub):
            reply = await stub.Generate(pb.GenerateRequest(prompt="hi", model="small"),
                                        timeout=10)
            await stub.Generate(pb.GenerateRequest(prompt="hi", model="qwen3:8b"), timeout=10)
            sent = [body["model"] for body in fake.generation_requests]
            assert sent == [DEFAULT_MODEL, "qwen3:8b"]
            # The upstream's name for it stays the upstream's: the caller's comes back.
            assert reply.model == "small" and reply.upstream == "local"
            streamed = [r async for r in stub.StreamGenerate(pb.StreamGenerateRequest(
                prompt="hi", model="small"), timeout=10)]
            assert streamed[-1].model == "small"
            models = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert [m.name for m in models.models] == [DEFAULT_MODEL, "small"]


async def test_dns_names_every_address_as_an_endpoint(tmp_path):
    async with fakes(1) as (fake,):
        document = {"upstreams": {"local": {"kind": "ollama", "dns": f"localhost:{fake.port}"}},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["local"]}]}
        async with pooled_gateway(tmp_path, document, retry_attempts=2) as (running, stub):
            keys = [e.key for e in running.backend.pools["local"].endpoints]
            assert f"http://127.0.0.1:{fake.port}" in keys
            reply = await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
            assert reply.upstream == "local"


@pytest.mark.parametrize(("document", "complaint"), [
    ({"upstreams": {"a": {"kind": "vllm", "endpoints": ["http://x"]}}, "routes": []},
     "`kind` must be one of"),
    ({"upstreams": {"a": {"kind": "openai", "endpoints": ["http://x/v1"]}},
      "routes": [{"models": ["m"], "pools": ["a"]}]}, "`remote: true` or"),
    ({"upstreams": {"a": {"kind": "ollama", "endpoints": ["http://x"], "remote": True}},
      "routes": [{"models": ["m"], "pools": ["a"]}]}, "without `allow_remote: true`"),
    ({"upstreams": {"a": {"kind": "ollama", "endpoints": ["http://x"]}},
      "routes": [{"models": ["m"], "pools": ["b"]}]}, "which is not an upstream"),
    ({"upstreams": {"a": {"kind": "ollama", "endpoints": ["ftp://x"]}},
      "routes": [{"models": ["m"], "pools": ["a"]}]}, "http:// or https://"),
    ({"upstreams": {"a": {"kind": "ollama", "endpoints": ["http://x"], "colour": 1}},
      "routes": [{"models": ["m"], "pools": ["a"]}]}, "unknown keys ['colour']"),
    ({"upstreams": {"a": {"kind": "openai", "remote": False, "endpoints": ["http://x/v1"],
                          "api_key_env": "AGENTLOOP_TEST_UNSET_KEY"}},
      "routes": [{"models": ["m"], "pools": ["a"]}]}, "is not set"),
    ({"upstreams": {"a": {"kind": "ollama", "endpoints": ["http://x"],
                          "tls": {"verify": False}}},
      "routes": [{"models": ["m"], "pools": ["a"]}]}, "are for `openai` upstreams"),
    ({"upstreams": {"a": {"kind": "ollama", "endpoints": ["http://x"]}},
      "routes": [{"pattern": "(", "pools": ["a"]}]}, "not a valid RE2"),
    ({"upstreams": {"a": {"kind": "openai", "remote": False, "endpoints": ["http://x/v1"],
                          "dialect": {"completions_format": "regex"}}},
      "routes": [{"models": ["m"], "pools": ["a"]}]}, "`dialect.completions_format` must be"),
    ({"upstreams": {"a": {"kind": "openai", "remote": False, "endpoints": ["http://x/v1"],
                          "dialect": {"stop_limit": -1}}},
      "routes": [{"models": ["m"], "pools": ["a"]}]}, "`dialect.stop_limit` must be"),
])
def test_a_bad_pools_file_is_refused_naming_what_is_wrong(document, complaint):
    with pytest.raises(SettingsError) as refused:
        parse_pools(document, "pools")
    assert complaint in str(refused.value)


def test_a_dialect_spells_how_completions_take_a_format_and_how_many_stops():
    config = parse_pools({"upstreams": {"a": {
        "kind": "openai", "remote": False, "endpoints": ["http://x/v1"],
        "dialect": {"completions_format": "grammar", "stop_limit": 0,
                    "strict_schema": False}}},
        "routes": [{"models": ["m"], "pools": ["a"]}]}, "pools")
    assert config.upstreams["a"].dialect == OpenAIDialect(
        completions_format=CompletionsFormat.GRAMMAR, stop_limit=0, strict_schema=False)


def test_an_api_key_never_appears_in_the_parsed_config(monkeypatch):
    monkeypatch.setenv("AGENTLOOP_TEST_KEY", "sk-secret-123")
    config = parse_pools({"upstreams": {"a": {"kind": "openai", "remote": False,
                                              "endpoints": ["http://x/v1"],
                                              "api_key_env": "AGENTLOOP_TEST_KEY"}},
                          "routes": [{"models": ["m"], "pools": ["a"]}]}, "pools")
    assert config.upstreams["a"].api_key == "sk-secret-123"
    assert "sk-secret" not in repr(config)


@pytest.mark.real_model
async def test_the_embedded_engine_is_a_pool_and_overflow_never_takes_local_only_calls(
        tmp_path):
    """The in-process engine (the packaged Gemma 3 270M) as the local pool, a fake Ollama
    as the remote one: a call of the route's name runs on the engine under its own model
    name; with the engine's one slot busy, calls spill, but a local-only call waits."""
    async with fakes(1) as (cloud,):
        document = {
            "upstreams": {"local": {"kind": "embedded", "max_in_flight": 1,
                                    "overflow": {"max_queue": 0}},
                          "cloud": ollama_upstream(cloud, remote=True, max_in_flight=8)},
            "routes": [{"models": [DEFAULT_MODEL], "pools": ["local", "cloud"],
                        "allow_remote": True}]}
        async with pooled_gateway(tmp_path, document, num_ctx=2048,
                                  read_timeout=120.0) as (running, stub):
            reply = await stub.Generate(pb.GenerateRequest(
                prompt="The capital of France is",
                options=pb.GenerationOptions(max_tokens=4, temperature=0)), timeout=120)
            assert reply.upstream == "local" and reply.usage.output_tokens > 0
            assert reply.model != DEFAULT_MODEL, "the engine's own model name comes back"
            long = stub.StreamGenerate(pb.StreamGenerateRequest(
                prompt="Once upon a time", options=pb.GenerationOptions(max_tokens=2000)),
                timeout=120)
            await anext(aiter(long))  # the engine's one slot is busy now
            spilled = await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=30)
            assert spilled.upstream == "cloud"
            kept = asyncio.ensure_future(stub.Generate(
                pb.GenerateRequest(prompt="hi", options=pb.GenerationOptions(max_tokens=2)),
                timeout=120, metadata=(("x-agentloop-local-only", "true"),)))
            await wait_until(lambda: running.backend.pools["local"].queued == 1, timeout=30)
            long.cancel()
            assert (await kept).upstream == "local"
            assert served_by(cloud) == 1


async def test_embeddings_take_the_same_routes_and_fall_back_before_an_answer(tmp_path):
    async with fakes(2) as (busy, spare):
        busy.embed_scripts.extend([Script(status=503)] * 3)
        document = {"upstreams": {"near": ollama_upstream(busy), "far": ollama_upstream(spare)},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["near", "far"]}]}
        async with pooled_gateway(tmp_path, document) as (_running, stub):
            reply = await stub.Embed(pb.EmbedRequest(texts=["a cat", "a dog"]), timeout=10)
            assert len(reply.embeddings) == 2
            assert len(busy.embed_requests) == 1 and len(spare.embed_requests) == 1
            local_only = (("x-agentloop-local-only", "true"),)
            reply = await stub.Embed(pb.EmbedRequest(texts=["a cat"]), timeout=10,
                                     metadata=local_only)
            assert len(reply.embeddings) == 1 and len(spare.embed_requests) == 2


async def test_an_embedded_upstream_with_several_workers_is_refused(tmp_path):
    document = {"upstreams": {"local": {"kind": "embedded"}},
                "routes": [{"models": [DEFAULT_MODEL], "pools": ["local"]}]}
    settings = gateway_settings(upstreams=pools_file(tmp_path, document), workers=2,
                                listen="127.0.0.1:50999")
    with pytest.raises(SettingsError, match="--workers 1"):
        async with running_gateway(settings):
            pass


# --- one path: calls wait in the pool's own fair queue ---------------------------------------

def prompts(fake: FakeOllama) -> list[str]:
    return [body.get("prompt", "") for body in fake.generation_requests]


def caller(address: str) -> tuple[tuple[str, str], ...]:
    return (("x-forwarded-for", address),)


async def test_a_flooded_route_never_holds_what_another_route_needs(tmp_path):
    async with fakes(2) as (x, y):
        x.enqueue(Script(tokens=TOKENS, hang_after=1))
        document = {"upstreams": {"x": ollama_upstream(x, max_in_flight=1),
                                  "y": ollama_upstream(y, max_in_flight=1)},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["x"]},
                               {"models": ["other"], "pools": ["y"]}]}
        y.models.append("other:latest")
        async with pooled_gateway(tmp_path, document, queue_timeout=60) as (running, stub):
            holder = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hold"), timeout=60)
            await holder.read()
            flood = [asyncio.ensure_future(stub.Generate(
                pb.GenerateRequest(prompt=f"x{i}"), timeout=60)) for i in range(6)]
            await wait_until(lambda: running.backend.pools["x"].queued == 6)
            # Route y's pool is idle: its call is served while route x's holder still hangs.
            reply = await stub.Generate(pb.GenerateRequest(prompt="y", model="other"),
                                        timeout=10)
            assert reply.upstream == "y" and x.active_streams == 1
            holder.cancel()
            await asyncio.gather(*flood)
        assert prompts(x) == ["hold", *(f"x{i}" for i in range(6))], "first come, first served"


async def test_waiters_of_a_full_endpoint_are_served_in_arrival_order(tmp_path):
    """One endpoint of cap 1 beside a larger pool of another route: the larger pool's slots
    never let more calls past than the endpoint takes, and its waiters keep their order."""
    async with fakes(2) as (small, big):
        small.enqueue(Script(tokens=TOKENS, hang_after=1))
        big.models.append("other:latest")
        document = {"upstreams": {"small": ollama_upstream(small, max_in_flight=1),
                                  "big": ollama_upstream(big, max_in_flight=8)},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["small"]},
                               {"models": ["other"], "pools": ["big"]}]}
        async with pooled_gateway(tmp_path, document, fair_queuing=False) as (running, stub):
            holder = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hold"), timeout=60)
            await holder.read()
            waiters = []
            for i in range(10):  # each queued before the next arrives
                waiters.append(asyncio.ensure_future(stub.Generate(
                    pb.GenerateRequest(prompt=f"w{i}"), timeout=60)))
                await wait_until(lambda n=i + 1: running.backend.pools["small"].queued == n)
            holder.cancel()
            await asyncio.gather(*waiters)
        assert prompts(small) == ["hold", *(f"w{i}" for i in range(10))]


async def test_a_tenant_flooding_a_pool_delays_only_itself(tmp_path):
    async with fakes(1) as (fake,):
        fake.enqueue(*[Script(tokens=TOKENS, hang_after=1)] * 4)
        document = {"upstreams": {"local": ollama_upstream(fake, max_in_flight=4)},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["local"]}]}
        async with pooled_gateway(tmp_path, document, queue_timeout=60,
                                  client_address_header="x-forwarded-for") as (running, stub):
            holders = [stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hold"),
                                           metadata=caller("10.0.0.1"), timeout=60)
                       for _ in range(4)]
            for held in holders:
                await held.read()
            flood = [asyncio.ensure_future(stub.Generate(pb.GenerateRequest(prompt=f"a{i}"),
                                                         metadata=caller("10.0.0.1"),
                                                         timeout=60)) for i in range(20)]
            await wait_until(lambda: running.admission.queued == 20)
            other = asyncio.ensure_future(stub.Generate(pb.GenerateRequest(prompt="b"),
                                                        metadata=caller("10.0.0.2"),
                                                        timeout=60))
            await wait_until(lambda: running.admission.queued == 21)
            holders[0].cancel()  # one slot frees: it goes to the caller with less service
            await other
            for held in holders[1:]:
                held.cancel()
            await asyncio.gather(*flood)
        order = prompts(fake)
        # b waits behind one of the flood's twenty (a0's tag equals its own, and came first).
        assert order.index("b") == 5, order


async def test_a_pool_that_loses_its_last_endpoint_tells_its_waiters_at_once(tmp_path):
    async with fakes(2) as (local, backup):
        local.enqueue(Script(tokens=TOKENS, hang_after=1))
        document = {"upstreams": {"local": ollama_upstream(local, max_in_flight=1),
                                  "backup": ollama_upstream(backup, max_in_flight=1)},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["local"]},
                               {"models": ["spill"], "pools": ["local", "backup"]}]}
        backup.models.append("spill:latest")
        local.models.append("spill:latest")
        async with pooled_gateway(tmp_path, document, queue_timeout=120) as (running, stub):
            holder = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hold"), timeout=120)
            await holder.read()
            stays = asyncio.ensure_future(stub.Generate(pb.GenerateRequest(prompt="stays"),
                                                        timeout=120))
            moves = asyncio.ensure_future(stub.Generate(
                pb.GenerateRequest(prompt="moves", model="spill"), timeout=120))
            await wait_until(lambda: running.backend.pools["local"].queued == 2)
            local.models.clear()  # the next health check finds its models gone
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await asyncio.wait_for(stays, timeout=10)  # not the queue's 120 s
            assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "is not pulled" in lost.value.details(), lost.value.details()
            assert "127.0.0.1" not in lost.value.details()
            reply = await asyncio.wait_for(moves, timeout=10)
            assert reply.upstream == "backup"
            assert local.active_streams == 1, "the call in flight goes on"
            holder.cancel()


async def test_a_dns_pool_capacity_follows_its_endpoints(tmp_path):
    """From no address to three: the pool's slots are there at the next refresh."""
    port = free_port()
    answers: list[str] = []
    started: list[FakeOllama] = []
    try:
        for address in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            fake = FakeOllama(default_script=Script(tokens=TOKENS, token_delay=0.2))
            await fake.start(address, port)
            started.append(fake)
        document = {"upstreams": {"local": {"kind": "ollama", "dns": f"models.invalid:{port}",
                                            "max_in_flight": 2, "dns_refresh": 3600}},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["local"]}]}
        async with pooled_gateway(tmp_path, document) as (running, stub):
            pool = running.backend.pools["local"]

            async def resolver(_host: str, _port: int) -> list[str]:
                return list(answers)

            pool.resolver = resolver
            await pool.resolve()
            assert pool.capacity() == 0 and running.admission.max_in_flight == 0
            with pytest.raises(grpc.aio.AioRpcError) as none:
                await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
            assert none.value.code() == grpc.StatusCode.UNAVAILABLE
            answers[:] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            await pool.resolve()  # one refresh
            assert pool.capacity() == 6 and running.admission.max_in_flight == 6
            calls = [asyncio.ensure_future(stub.Generate(pb.GenerateRequest(prompt="hi"),
                                                         timeout=30)) for _ in range(6)]
            await wait_until(lambda: sum(f.active_streams for f in started) == 6)
            assert running.admission.queued == 0
            await asyncio.gather(*calls)
            answers[:] = ["127.0.0.1"]
            await pool.resolve()
            assert pool.capacity() == 2
    finally:
        for fake in started:
            await fake.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_embeddings_and_counts_have_slots_of_their_own(tmp_path):
    async with fakes(1) as (fake,):
        fake.enqueue(Script(tokens=TOKENS, hang_after=1))
        fake.embed_scripts.append(Script(hang_before_headers=True))
        document = {"upstreams": {"local": ollama_upstream(fake, max_in_flight=1)},
                    "routes": [{"models": [DEFAULT_MODEL], "pools": ["local"]}]}
        async with pooled_gateway(tmp_path, document, max_embed_in_flight=1) as (running,
                                                                                 stub):
            embedding = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(texts=["slow"]),
                                                         timeout=60))
            await wait_until(lambda: running.embed_admission.in_flight == 1)
            holder = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hold"), timeout=60)
            await holder.read()  # the embedding's slot is not a generation's
            second = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(texts=["later"]),
                                                      timeout=60))
            await wait_until(lambda: running.embed_admission.queued == 1)
            assert running.admission.queued == 0
            embedding.cancel()
            await second
            holder.cancel()


async def test_models_are_listed_by_the_callers_names_with_the_upstreams_facts(tmp_path):
    async with fakes(1) as (fake,):
        document = {"upstreams": {"local": ollama_upstream(fake, models={"small": DEFAULT_MODEL})},
                    "routes": [{"models": ["small", DEFAULT_MODEL], "pools": ["local"]}]}
        async with pooled_gateway(tmp_path, document) as (_running, stub):
            listed = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
        async with running_gateway(gateway_settings(ollama_url=fake.url)) as one, \
                client_stub(one.address) as alone:
            direct = await alone.ListModels(pb.ListModelsRequest(), timeout=10)
    [engine] = [m for m in direct.models if m.name.startswith(DEFAULT_MODEL)]
    small, default = listed.models
    assert (small.name, default.name) == ("small", DEFAULT_MODEL)
    for model in (small, default):  # one engine's facts, under the route's names
        assert model.size_bytes == engine.size_bytes > 0
        assert (model.family, model.embeds, model.embedding_dimensions) == (
            engine.family, engine.embeds, engine.embedding_dimensions)


async def test_an_endpoint_is_judged_by_the_models_of_the_routes_that_use_it(tmp_path):
    """A pool that only another route's model uses is checked against that model, not the
    default one; when none of its models is there, its callers hear why."""
    async with fakes(2) as (local, cloud):
        cloud.models[:] = ["big:latest"]
        document = {
            "upstreams": {"local": ollama_upstream(local),
                          "cloud": ollama_upstream(cloud, remote=True)},
            "routes": [{"models": [DEFAULT_MODEL], "pools": ["local", "cloud"],
                        "allow_remote": True},
                       {"models": ["big"], "pools": ["cloud"], "allow_remote": True}]}
        async with pooled_gateway(tmp_path, document) as (running, stub):
            cloud_pool = running.backend.pools["cloud"]
            await wait_until(lambda: cloud_pool.endpoints[0].health.reason != "not checked yet")
            assert cloud_pool.any_available(), cloud_pool.endpoints[0].health
            reply = await stub.Generate(pb.GenerateRequest(prompt="hi", model="big"), timeout=10)
            assert reply.upstream == "cloud"
            cloud.models.clear()
            await wait_until(lambda: not cloud_pool.any_available())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(pb.GenerateRequest(prompt="hi", model="big"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    details = refused.value.details()
    assert "upstream 'cloud'" in details and "is not pulled" in details, details
    assert cloud.url not in details and "127.0.0.1" not in details


async def test_an_openai_upstream_without_a_cap_serves_the_default_at_once(tmp_path):
    """Left out, `max_in_flight` is 4 per endpoint for every HTTP kind (it was 1 for
    `openai`: a vLLM pool served one call at a time)."""
    openai = FakeOpenAI(default_script=OpenAIScript(tokens=TOKENS, token_delay=0.5))
    await openai.start()
    try:
        document = {"upstreams": {"openai": {"kind": "openai", "endpoints": [openai.url],
                                             "remote": False}},
                    "routes": [{"models": [OPENAI_MODEL], "pools": ["openai"]}]}
        async with pooled_gateway(tmp_path, document, model=OPENAI_MODEL) as (running, stub):
            assert running.admission.max_in_flight == 4
            calls = [asyncio.ensure_future(stub.Generate(pb.GenerateRequest(prompt="hi"),
                                                         timeout=30)) for _ in range(5)]
            await wait_until(lambda: openai.active_streams == 4 and running.admission.queued == 1)
            await asyncio.gather(*calls)
    finally:
        await openai.stop()
