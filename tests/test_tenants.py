"""Tenants through the real gateway and channels on the fake Ollama: the keys file's
tenants and limits, their reload, the call context they give, quotas answered with
QuotaFailure and RetryInfo, fair queuing across callers, priorities, the response cache
per tenant, and per-tenant metrics. The engine's prefix cache per tenant is in
test_llama_engine.py (it needs the real model)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentloop.backends.ollama import OllamaBackend
from agentloop.domain import CallContext, GenerationRequest, Priority, StreamItem
from agentloop.errors import ResourceExhausted, Shed
from agentloop.tenants import (
    DEFAULT_TENANT,
    Tenant,
    TenantsFileError,
    parse_keys_text,
)
from agentloop.upstreams.admission import Admission
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import DEFAULT_MODEL, FakeOllama, Script, wait_until
from helpers import TOKENS, client_stub, gateway_settings, rich_details, running_gateway

TENANTS_FILE = """\
# Two teams, a metered one and a narrow one; keys rotate within a tenant.
tenants:
  search:
    keys: [search-key-1, search-key-2]
    max_priority: standard
    allow_remote: false
  batch:
    keys: [batch-key]
    requests_per_minute: 2
  meter:
    keys: [meter-key]
    tokens_per_minute: 5
  narrow:
    keys: [narrow-key]
    max_concurrency: 1
  budget:
    keys: [budget-key]
    tokens_per_minute: 1000
"""


def bearer(key: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"), *extra)


async def expect_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            while await call.read() is not grpc.aio.EOF:
                pass
        else:
            await call
    return caught.value


class RecordingOllama(OllamaBackend):
    """The real Ollama backend, noting the call context of every generation it serves."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts: list[CallContext] = []

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        self.contexts.append(request.context)
        async for item in super().stream(request):
            yield item


@pytest.fixture
def tenants_file(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS_FILE)
    return path


def tenant_settings(fake: FakeOllama, tenants_file: Path, **overrides: Any) -> Any:
    return gateway_settings(ollama_url=fake.url, api_keys="legacy-key",
                            api_keys_file=str(tenants_file), **overrides)


def prompts(fake: FakeOllama) -> list[str]:
    return [body.get("prompt", "") for body in fake.generation_requests]


# --- the file ------------------------------------------------------------------------------

def test_the_old_format_is_the_default_tenant_and_the_new_one_names_tenants():
    old = parse_keys_text("# comment\nkey-1\n  key-2  # rotated\n")
    assert old.match("key-1") is DEFAULT_TENANT and old.match("key-2") is DEFAULT_TENANT
    assert old.match("key-3") is None and not old.tenants

    keys = parse_keys_text(TENANTS_FILE, extra_keys=["legacy-key"])
    search = keys.match("search-key-1")
    assert search is not None and search is keys.match("search-key-2")
    assert search == Tenant("search", max_priority=Priority.STANDARD, allow_remote=False)
    assert keys.match("batch-key") == Tenant("batch", requests_per_minute=2)
    assert keys.match("legacy-key") is DEFAULT_TENANT
    assert keys.tenant("meter").tokens_per_minute == 5 and keys.tenant("gone") is DEFAULT_TENANT


@pytest.mark.parametrize(("text", "problem"), [
    ("tenants:\n  a:\n    keys: [secret-k]\n    weight: 0\n", "'weight'"),
    ("tenants:\n  a:\n    keys: [secret-k]\n    tokens_per_minute: -1\n", "'tokens_per_minute'"),
    ("tenants:\n  a:\n    keys: [secret-k]\n    max_priority: urgent\n", "'max_priority'"),
    ("tenants:\n  a:\n    keys: [secret-k]\n    budget: 3\n", "unknown field 'budget'"),
    ("tenants:\n  a:\n    keys: []\n", "'keys'"),
    ("tenants:\n  a:\n    keys: [secret-k]\n  b:\n    keys: [secret-k]\n", "listed twice"),
    ("tenants:\n  '-a':\n    keys: [secret-k]\n", "tenant name"),
    ("tenants: [secret-k\n", "not valid YAML"),
])
def test_a_bad_tenants_file_is_refused_without_quoting_a_key(text: str, problem: str):
    with pytest.raises(TenantsFileError) as caught:
        parse_keys_text(text)
    assert problem in str(caught.value) and "secret-k" not in str(caught.value)


# --- the call context ----------------------------------------------------------------------

async def test_each_key_gives_its_tenant_priority_scope_and_local_only(fake_ollama,
                                                                       tenants_file):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = tenant_settings(fake_ollama, tenants_file)
    backend = RecordingOllama(settings)
    async with running_gateway(settings, backend=backend) as running, \
            client_stub(running.address) as stub:
        for metadata in (
            bearer("search-key-1", ("x-agentloop-priority", "critical")),  # capped: standard
            bearer("search-key-2"),
            bearer("batch-key", ("x-agentloop-priority", "Sheddable")),
            bearer("legacy-key"),
            bearer("legacy-key", ("x-agentloop-cache-key", "conversation-7")),
            bearer("narrow-key", ("x-agentloop-cache-key", "conversation-7")),
        ):
            await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=metadata, timeout=5)
    search_1, search_2, batch, legacy, legacy_keyed, narrow_keyed = backend.contexts

    assert (search_1.tenant, search_1.caller, search_1.priority) == (
        "search", "search", Priority.STANDARD)
    assert search_1.local_only and not batch.local_only, "allow_remote: false is local-only"
    assert (batch.tenant, batch.priority) == ("batch", Priority.SHEDDABLE)
    # Keys of one tenant share its caches; tenants and addresses do not.
    assert search_1.cache_scope == search_2.cache_scope
    scopes = {search_1.cache_scope, batch.cache_scope, legacy.cache_scope,
              legacy_keyed.cache_scope, narrow_keyed.cache_scope}
    assert len(scopes) == 5 and "" not in scopes
    assert (legacy.tenant, legacy.caller) == ("", "addr:ipv4:127.0.0.1")
    assert "search" not in search_1.cache_scope, "the scope (an upstream's salt) names no one"


async def test_an_unknown_priority_is_invalid_argument_naming_the_header(fake_ollama):
    settings = gateway_settings(ollama_url=fake_ollama.url)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        error = await expect_error(stub.Generate(
            pb.GenerateRequest(prompt="hi"), metadata=(("x-agentloop-priority", "urgent"),),
            timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = rich_details(error)["BadRequest"].field_violations
    assert [v.field for v in violations] == ["x-agentloop-priority"]
    assert fake_ollama.generation_requests == []


async def test_without_keys_callers_are_told_apart_by_address_or_the_proxy_header(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    for shared in (False, True):
        settings = gateway_settings(ollama_url=fake_ollama.url, one_trust_domain=shared,
                                    client_address_header="x-forwarded-for")
        backend = RecordingOllama(settings)
        async with running_gateway(settings, backend=backend) as running, \
                client_stub(running.address) as stub:
            for forwarded in ("10.0.0.1", "6.6.6.6, 10.0.0.1", "10.0.0.2"):
                await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5,
                                    metadata=(("x-forwarded-for", forwarded),))
        first, spoofed, other = backend.contexts
        assert (first.caller, spoofed.caller, other.caller) == (
            "addr:10.0.0.1", "addr:10.0.0.1", "addr:10.0.0.2"), "the proxy's entry is the last"
        if shared:
            assert first.cache_scope == other.cache_scope == ""
        else:
            assert first.cache_scope == spoofed.cache_scope != other.cache_scope


# --- reload --------------------------------------------------------------------------------

async def test_keys_and_limits_reload_when_the_file_changes(fake_ollama, tenants_file, caplog):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = tenant_settings(fake_ollama, tenants_file, api_keys_reload_interval=0.02)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=bearer("batch-key"),
                            timeout=5)
        tenants_file.write_text(TENANTS_FILE.replace("[batch-key]", "[batch-key-2]").replace(
            "requests_per_minute: 2", "requests_per_minute: 1"))
        await wait_until(lambda: running.keys is not None
                         and running.keys.tenant("batch").requests_per_minute == 1)
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"),
                                                 metadata=bearer("batch-key"), timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, "the rotated-out key is gone"
        # The new key is the same tenant: its one request this minute is spent already.
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"),
                                                 metadata=bearer("batch-key-2"), timeout=5))
        assert rich_details(error)["ErrorInfo"].metadata["limit"] == "requests_per_minute"

        caplog.set_level(logging.WARNING)
        tenants_file.write_text("tenants:\n  batch:\n    keys: [broken-secret]\n    weight: 0\n")
        await wait_until(lambda: "not reloaded" in caplog.text)
        assert "broken-secret" not in caplog.text
        await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=bearer("search-key-1"),
                            timeout=5)  # the keys in force stay


# --- quotas --------------------------------------------------------------------------------

async def test_past_requests_per_minute_quota_failure_names_the_limit(fake_ollama,
                                                                      tenants_file):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = tenant_settings(fake_ollama, tenants_file)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        for _ in range(2):
            await stub.Generate(pb.GenerateRequest(prompt="batch"), metadata=bearer("batch-key"),
                                timeout=5)
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="batch"),
                                                 metadata=bearer("batch-key"), timeout=5))
        await stub.Generate(pb.GenerateRequest(prompt="search"),
                            metadata=bearer("search-key-1"), timeout=5)  # others unaffected
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = rich_details(error)
    [violation] = details["QuotaFailure"].violations
    assert violation.subject == "tenant:batch" and violation.quota_id == "requests_per_minute"
    assert details["ErrorInfo"].reason == "QUOTA_EXCEEDED"
    assert details["ErrorInfo"].metadata == {"limit": "requests_per_minute", "tenant": "batch"}
    # One request frees every 30 s at 2 a minute.
    assert 0 < details["RetryInfo"].retry_delay.ToNanoseconds() <= 30e9
    assert prompts(fake_ollama) == ["batch", "batch", "search"]


async def test_a_stream_past_its_token_budget_finishes_and_the_next_call_waits(fake_ollama,
                                                                              tenants_file):
    words = [f"w{i} " for i in range(10)]
    fake_ollama.default_script = Script(tokens=words)
    settings = tenant_settings(fake_ollama, tenants_file)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        replies = [reply async for reply in stub.StreamGenerate(
            pb.StreamGenerateRequest(prompt="count"), metadata=bearer("meter-key"), timeout=5)]
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="count"),
                                                 metadata=bearer("meter-key"), timeout=5))
    assert "".join(reply.text for reply in replies) == "".join(words), "nothing is cut"
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = rich_details(error)
    assert details["QuotaFailure"].violations[0].quota_id == "tokens_per_minute"
    # 10 output tokens and the input past a budget of 5 a minute: over a minute to refill.
    assert details["RetryInfo"].retry_delay.ToNanoseconds() > 60e9
    assert len(fake_ollama.generation_requests) == 1


async def test_past_max_concurrency_the_tenant_is_refused_and_others_run(fake_ollama,
                                                                        tenants_file):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = tenant_settings(fake_ollama, tenants_file)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        fake_ollama.enqueue(Script(tokens=TOKENS, hang_after=1))
        holder = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hold"),
                                     metadata=bearer("narrow-key"), timeout=30)
        await holder.read()
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="more"),
                                                 metadata=bearer("narrow-key"), timeout=5))
        await stub.Generate(pb.GenerateRequest(prompt="other"), metadata=bearer("batch-key"),
                            timeout=5)
        holder.cancel()
        await wait_until(lambda: running.admission.in_flight == 0)
        await stub.Generate(pb.GenerateRequest(prompt="again"), metadata=bearer("narrow-key"),
                            timeout=5)
    assert rich_details(error)["QuotaFailure"].violations[0].quota_id == "max_concurrency"
    assert prompts(fake_ollama) == ["hold", "other", "again"]


async def test_input_is_paid_at_admission_whatever_the_upstream_reports(fake_ollama,
                                                                       tenants_file):
    """Input past the whole budget is refused before it costs work: the same answer from an
    upstream that reports usage and from one that reports none."""
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = tenant_settings(fake_ollama, tenants_file)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        errors = [await expect_error(stub.Generate(pb.GenerateRequest(prompt="x" * 65536),
                                                   metadata=bearer("budget-key"), timeout=5))
                  for _ in range(3)]
    for error in errors:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rich_details(error)["QuotaFailure"].violations[0].quota_id == "tokens_per_minute"
    assert fake_ollama.generation_requests == []


async def test_a_cancelled_call_has_paid_for_its_input(fake_ollama, tenants_file):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = tenant_settings(fake_ollama, tenants_file)
    prompt = "y" * 3600  # about 900 tokens of a budget of 1000
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        fake_ollama.enqueue(Script(tokens=TOKENS, hang_after=1))
        first = stub.StreamGenerate(pb.StreamGenerateRequest(prompt=prompt),
                                    metadata=bearer("budget-key"), timeout=30)
        await first.read()
        first.cancel()
        await wait_until(lambda: running.admission.in_flight == 0)
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt=prompt),
                                                 metadata=bearer("budget-key"), timeout=5))
    assert rich_details(error)["QuotaFailure"].violations[0].quota_id == "tokens_per_minute"
    assert len(fake_ollama.generation_requests) == 1


async def test_embeds_and_counts_count_towards_calls_at_once(fake_ollama, tenants_file):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = tenant_settings(fake_ollama, tenants_file)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        fake_ollama.enqueue(Script(tokens=TOKENS, hang_after=1))
        holder = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hold"),
                                     metadata=bearer("narrow-key"), timeout=30)
        await holder.read()
        refused = [await expect_error(call) for call in (
            stub.Embed(pb.EmbedRequest(texts=["a"]), metadata=bearer("narrow-key"), timeout=5),
            stub.CountTokens(pb.CountTokensRequest(texts=["a"]), metadata=bearer("narrow-key"),
                             timeout=5))]
        holder.cancel()
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rich_details(error)["QuotaFailure"].violations[0].quota_id == "max_concurrency"
    assert fake_ollama.embed_requests == []


# --- fair queuing and priorities ------------------------------------------------------------

@pytest.mark.parametrize("fair", [True, False])
async def test_a_caller_flooding_the_queue_delays_only_itself(fake_ollama, fair: bool):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, max_in_flight=1, max_queue=16,
                                fair_queuing=fair, client_address_header="x-forwarded-for")
    flooder, other = (("x-forwarded-for", "10.0.0.1"),), (("x-forwarded-for", "10.0.0.2"),)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        fake_ollama.enqueue(Script(tokens=TOKENS, hang_after=1))
        holder = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hold"), metadata=flooder,
                                     timeout=30)
        await holder.read()
        flood = [asyncio.ensure_future(stub.Generate(pb.GenerateRequest(prompt=f"a{i}"),
                                                     metadata=flooder, timeout=30))
                 for i in range(4)]
        await wait_until(lambda: running.admission.queued == 4)
        alone = asyncio.ensure_future(stub.Generate(pb.GenerateRequest(prompt="b"),
                                                    metadata=other, timeout=30))
        await wait_until(lambda: running.admission.queued == 5)
        holder.cancel()
        await asyncio.gather(*flood, alone)
    order = prompts(fake_ollama)
    assert order[0] == "hold" and sorted(order[1:]) == ["a0", "a1", "a2", "a3", "b"]
    # Fair: b goes right after the flooder's first waiter (equal tags, a0 came first).
    assert order.index("b") == (2 if fair else 5), order


async def test_critical_goes_first_and_sheddable_is_put_out_when_the_queue_is_full(
        fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, max_in_flight=1, max_queue=2)

    def call(prompt: str, priority: str) -> asyncio.Future[Any]:
        return asyncio.ensure_future(stub.Generate(
            pb.GenerateRequest(prompt=prompt), metadata=(("x-agentloop-priority", priority),),
            timeout=30))

    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        fake_ollama.enqueue(Script(tokens=TOKENS, hang_after=1))
        holder = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hold"), timeout=30)
        await holder.read()
        sheddable = call("sheddable", "sheddable")
        await wait_until(lambda: running.admission.queued == 1)
        standard = call("standard", "standard")
        await wait_until(lambda: running.admission.queued == 2)
        critical = call("critical", "critical")  # the queue is full: the sheddable one goes
        shed = await expect_error(sheddable)
        late = await expect_error(call("late", "sheddable"))  # matters least: refused
        holder.cancel()
        await asyncio.gather(standard, critical)
    assert shed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_details(shed)["ErrorInfo"].reason == "SHED"
    assert rich_details(shed)["RetryInfo"].retry_delay.ToNanoseconds() > 0
    assert late.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert prompts(fake_ollama) == ["hold", "critical", "standard"]


async def test_weights_share_the_slots_and_idle_callers_are_forgotten():
    weights = {"gold": Tenant("gold", weight=2.0), "tin": Tenant("tin")}
    admission = Admission(1, 64, 30, tenants=lambda name: weights[name])
    order: list[str] = []

    async def take(tenant: str) -> None:
        async with admission.slot(context=CallContext(tenant=tenant, caller=tenant)):
            order.append(tenant)

    held = admission.slot(context=CallContext(tenant="tin", caller="tin"))
    await held.__aenter__()
    tasks = [asyncio.create_task(take(tenant)) for tenant in ["tin"] * 12 + ["gold"] * 12]
    await wait_until(lambda: admission.queued == 24)
    await held.__aexit__(None, None, None)
    await asyncio.gather(*tasks)
    assert order[:12].count("gold") == 8, order  # two for one while both wait
    assert admission.in_flight == 0 and admission.queued == 0 and not admission._callers


async def test_a_waiter_put_out_while_a_slot_is_handed_on_leaves_the_counts_right():
    admission = Admission(1, 1, 30)
    held = admission.slot()
    await held.__aenter__()
    low = asyncio.create_task(_hold(admission, Priority.SHEDDABLE))
    await wait_until(lambda: admission.queued == 1)
    high = asyncio.create_task(_hold(admission, Priority.CRITICAL))
    with pytest.raises(Shed):
        await low
    await held.__aexit__(None, None, None)
    await high
    assert admission.in_flight == 0 and admission.queued == 0 and not admission._callers


async def test_a_full_queue_puts_out_the_flooders_newest_call_not_a_newcomer():
    admission = Admission(1, 3, 30)
    held = admission.slot(context=CallContext(caller="a"))
    await held.__aenter__()
    flood = [asyncio.create_task(_hold(admission, Priority.STANDARD, "a")) for _ in range(3)]
    await wait_until(lambda: admission.queued == 3)
    newcomer = asyncio.create_task(_hold(admission, Priority.STANDARD, "b"))
    await wait_until(lambda: admission.queued_by("b") == 1)
    assert admission.queued_by("a") == 2
    with pytest.raises(ResourceExhausted):  # the flooder's next call matters least: refused
        await _hold(admission, Priority.STANDARD, "a")
    await held.__aexit__(None, None, None)
    results = await asyncio.gather(*flood, newcomer, return_exceptions=True)
    assert [type(result).__name__ for result in results] == ["NoneType", "NoneType", "Shed",
                                                             "NoneType"]
    assert admission.in_flight == 0 and admission.queued == 0


async def test_a_reserved_slot_takes_critical_calls_only():
    admission = Admission(2, 8, 30, critical_reserve=1)
    standard = admission.slot(context=CallContext(caller="a"))
    await standard.__aenter__()
    waiting = asyncio.create_task(_hold(admission, Priority.STANDARD))
    await wait_until(lambda: admission.queued == 1)  # the second slot is kept
    async with admission.slot(context=CallContext(priority=Priority.CRITICAL, caller="c")):
        assert admission.in_flight == 2
    assert admission.queued == 1 and admission.in_flight == 1, "not handed to standard"
    await standard.__aexit__(None, None, None)
    await waiting
    assert admission.in_flight == 0 and admission.queued == 0


async def test_a_caller_calling_back_to_back_keeps_its_slot_for_a_moment():
    admission = Admission(1, 8, 30, anticipation=30.0)
    held = admission.slot(context=CallContext(caller="a"))
    await held.__aenter__()
    flood = [asyncio.create_task(_hold(admission, Priority.STANDARD, "a")) for _ in range(3)]
    await wait_until(lambda: admission.queued == 3)
    first = asyncio.create_task(_hold(admission, Priority.STANDARD, "b", release=False))
    await wait_until(lambda: admission.queued == 4)
    await held.__aexit__(None, None, None)
    await wait_until(lambda: first.done())  # a's first waiter, then b (the smaller tag)
    await first.result().__aexit__(None, None, None)
    # b's next call takes the slot it just freed, though a's calls wait: it would have
    # got it anyway had it come in time (a's next tag is no earlier than b's).
    assert admission.queued == 2 and admission._held
    async with admission.slot(context=CallContext(caller="b")):
        assert admission.queued == 2
    # Now a's next tag is the earlier one: the slot b frees goes on at once.
    assert not admission._held and admission.queued == 1
    await asyncio.gather(*flood)
    assert admission.in_flight == 0 and admission.queued == 0 and not admission._callers


async def test_a_freed_slot_goes_on_when_the_caller_does_not_come_back_or_floods():
    admission = Admission(1, 8, 30, anticipation=0.05)
    first = admission.slot(context=CallContext(caller="b"))
    await first.__aenter__()
    other = asyncio.create_task(_hold(admission, Priority.STANDARD, "a"))
    await wait_until(lambda: admission.queued == 1)
    await first.__aexit__(None, None, None)
    await asyncio.wait_for(other, 5)  # b never came back: a got the slot
    # A caller with calls of its own waiting keeps nothing: its waiter competes as usual.
    held = admission.slot(context=CallContext(caller="b"))
    await held.__aenter__()
    mine = asyncio.create_task(_hold(admission, Priority.STANDARD, "b"))
    theirs = asyncio.create_task(_hold(admission, Priority.STANDARD, "a"))
    await wait_until(lambda: admission.queued == 2)
    await held.__aexit__(None, None, None)
    assert admission.queued == 1 and not admission._held
    await asyncio.gather(mine, theirs)
    assert admission.in_flight == 0 and admission.queued == 0 and not admission._callers


async def test_a_kept_slot_goes_to_a_critical_call_and_never_to_a_sheddable_one():
    async def keep_for_b(admission: Admission) -> asyncio.Task[Any]:
        """b's call ends while a waits: the slot is kept for b; a's waiting call."""
        first = admission.slot(context=CallContext(caller="b"))
        await first.__aenter__()
        standard = asyncio.create_task(_hold(admission, Priority.STANDARD, "a"))
        await wait_until(lambda: admission.queued == 1)
        await first.__aexit__(None, None, None)
        assert admission._held
        return standard

    admission = Admission(1, 8, 30, anticipation=30.0)
    standard = await keep_for_b(admission)
    critical = asyncio.create_task(_hold(admission, Priority.CRITICAL, "c", release=False))
    kept = await asyncio.wait_for(critical, 5)  # at once, not after the 30 s
    assert not admission._held and admission.queued == 1
    await kept.__aexit__(None, None, None)
    await standard

    # Half a second: a's own kept slot, once its call is done, times out for b's call.
    admission = Admission(1, 8, 30, anticipation=0.5)
    standard = await keep_for_b(admission)
    sheddable = asyncio.create_task(_hold(admission, Priority.SHEDDABLE, "b", release=False))
    await asyncio.wait_for(standard, 5)  # the standard waiter went first
    held = await asyncio.wait_for(sheddable, 5)
    await held.__aexit__(None, None, None)
    assert admission.in_flight == 0 and admission.queued == 0 and not admission._callers


async def _hold(admission: Admission, priority: Priority, caller: str = "", *,
                release: bool = True) -> Any:
    """Take a slot and give it back (or, with release=False, return it held)."""
    context = CallContext(priority=priority, caller=caller or priority.name)
    slot = admission.slot(context=context)
    await slot.__aenter__()
    if not release:
        return slot
    await asyncio.sleep(0)
    await slot.__aexit__(None, None, None)
    return None


# --- caches and telemetry -------------------------------------------------------------------

async def test_the_response_cache_is_kept_per_tenant(fake_ollama, tenants_file):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = tenant_settings(fake_ollama, tenants_file, cache_entries=16)
    deterministic = pb.GenerationOptions(temperature=0)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        for key in ("search-key-1", "legacy-key", "legacy-key", "search-key-2"):
            reply = await stub.Generate(pb.GenerateRequest(prompt="same", options=deterministic),
                                        metadata=bearer(key), timeout=5)
            assert reply.text == "".join(TOKENS)
        assert running.cache is not None and running.cache.hits == 2
    # search's answer is not the default tenant's: two generations, two hits within a tenant.
    assert prompts(fake_ollama) == ["same", "same"]


async def test_metrics_count_per_tenant(fake_ollama, tenants_file):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = tenant_settings(fake_ollama, tenants_file, metrics_listen="127.0.0.1:0")
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        for key in ("batch-key", "batch-key", "batch-key", "legacy-key"):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=bearer(key),
                                    timeout=5)
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{running.metrics_port}/metrics",
                                     timeout=5)).text
    samples = [sample for family in text_string_to_metric_families(text)
               for sample in family.samples]

    def total(name: str, **labels: str) -> float:
        return sum(s.value for s in samples
                   if s.name == name and labels.items() <= s.labels.items())

    assert total("agentloop_admission_refusals_total", agentloop_tenant="batch",
                 agentloop_refusal_reason="requests_per_minute") == 1
    assert total("agentloop_admission_queue_wait_seconds_count", agentloop_tenant="batch") == 2
    assert total("gen_ai_client_token_usage_sum", agentloop_tenant="_default",
                 gen_ai_token_type="output") == len(TOKENS)
    assert total("rpc_server_call_duration_seconds_count", agentloop_tenant="batch") == 3
    tenants = {s.labels.get("agentloop_tenant") for s in samples} - {None}
    assert tenants == {"batch", "_default"}, "labels are the operator's names only"



# --- remote pools ---------------------------------------------------------------------------

async def test_a_tenant_that_may_not_leave_the_premises_is_never_sent_remote(tmp_path):
    cloud = FakeOllama(default_script=Script(tokens=TOKENS))
    await cloud.start("127.0.0.1", 0)
    try:
        pools = tmp_path / "pools.json"
        pools.write_text(json.dumps({
            "upstreams": {"cloud": {"kind": "ollama", "endpoints": [cloud.url], "remote": True}},
            "routes": [{"models": [DEFAULT_MODEL], "pools": ["cloud"], "allow_remote": True}]}))
        keys = tmp_path / "tenants.yaml"
        keys.write_text("tenants:\n  vault:\n    keys: [vault-key]\n    allow_remote: false\n"
                        "  web:\n    keys: [web-key]\n")
        settings = gateway_settings(upstreams=str(pools), api_keys_file=str(keys))
        async with running_gateway(settings) as running, client_stub(running.address) as stub:
            reply = await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10,
                                        metadata=bearer("web-key"))
            error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"),
                                                     timeout=10, metadata=bearer("vault-key")))
    finally:
        await cloud.stop()
    assert reply.upstream == "cloud"
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rich_details(error)["ErrorInfo"].reason == "LOCAL_ONLY"
    assert len(cloud.generation_requests) == 1
