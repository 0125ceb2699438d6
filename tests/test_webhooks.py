"""Webhooks at a run's end, checked by a real receiver on loopback that verifies every
delivery with `standardwebhooks` (the spec's own library): retried through a 500, a reset
and a timeout with the same webhook-id, several signatures while secrets rotate, 410 that
disables, redirects not followed, URLs outside the allowed prefixes refused, addresses
outside the allowed networks refused, and every attempt visible on the run."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook
from test_telemetry import scrape, total

from agentloop.config import SettingsError
from agentloop.services.webhooks import address_problem, sign
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import FakeOllama, Script, wait_until
from helpers import ROOT, bad_fields, client_stub, gateway_settings, running_gateway

OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"n" * 32).decode()
ANSWER = Script(tokens=[json.dumps({"final_answer": "391"})])


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 answering each attempt as `plan` says (then 200)."""

    secret: str
    plan: list[str] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    redirected_hits: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        Webhook(self.secret).verify(body, headers)  # raises (a 500) when the signature is bad
        self.received.append({"headers": headers, "body": json.loads(body)})
        step = self.plan.pop(0) if self.plan else "200"
        if step == "reset":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)
        if step == "hang":
            await asyncio.sleep(3600)
        if step == "302":
            raise web.HTTPFound(location=self.url.rsplit("/", 1)[0] + "/elsewhere")
        return web.Response(status=int(step))

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.redirected_hits += 1
        return web.Response(status=200)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hooks = Receiver(NEW_SECRET)
    app = web.Application()
    app.router.add_post("/hooks/run", hooks.handle)
    app.router.add_post("/hooks/elsewhere", hooks.elsewhere)
    runner = web.AppRunner(app, shutdown_timeout=0.1)  # the hanging handlers end at once
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hooks.url = f"http://127.0.0.1:{port}/hooks/run"
    try:
        yield hooks
    finally:
        await runner.cleanup()


def webhook_settings(fake: FakeOllama, receiver: Receiver, **overrides: Any):
    values: dict[str, Any] = {
        "webhook_url_prefixes": receiver.url.rsplit("/", 1)[0] + "/",
        "webhook_secrets": f"{OLD_SECRET},{NEW_SECRET}",
        "webhook_allowed_networks": "127.0.0.0/8",
        "webhook_backoff": 0.05, "webhook_backoff_max": 0.2, "webhook_timeout": 0.5,
    }
    values.update(overrides)
    return gateway_settings(ollama_url=fake.url, **values)


async def start(stub, url: str) -> str:
    request = pb.StartAgentRunRequest(run=pb.StartAgentRun(goal="17*23?"), webhook_url=url)
    return (await stub.StartAgentRun(request, timeout=5)).run.id


async def deliveries(stub, run_id: str) -> list[pb.WebhookDelivery]:
    run = (await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=run_id), timeout=5)).run
    return list(run.webhook_deliveries)


async def settled(stub, run_id: str) -> pb.WebhookDelivery:
    """The run's one delivery, once it is no longer pending."""
    found: list[pb.WebhookDelivery] = []

    async def check() -> bool:
        found[:] = await deliveries(stub, run_id)
        return bool(found) and found[0].state != pb.WEBHOOK_DELIVERY_STATE_PENDING

    loop = asyncio.get_running_loop()
    end = loop.time() + 15
    while not await check():
        assert loop.time() < end, f"still pending: {found}"
        await asyncio.sleep(0.02)
    (delivery,) = found
    return delivery


async def test_a_failing_receiver_gets_the_same_message_until_it_takes_it(fake_ollama,
                                                                          receiver):
    receiver.plan = ["500", "reset", "hang"]
    fake_ollama.enqueue(ANSWER)
    settings = webhook_settings(fake_ollama, receiver, metrics_listen="127.0.0.1:0")
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        run_id = await start(stub, receiver.url)
        delivery = await settled(stub, run_id)
        samples = await scrape(gateway.metrics_port)
    attempts = next(s.name for s in samples if s.name.startswith("agentloop_webhook_attempts"))
    assert total(samples, attempts, agentloop_webhook_outcome="retry") == 3
    assert total(samples, attempts, agentloop_webhook_outcome="delivered") == 1
    assert delivery.state == pb.WEBHOOK_DELIVERY_STATE_DELIVERED
    assert delivery.attempts == 4 and delivery.last_status_code == 200
    assert delivery.event_type == "agent_run.completed"
    assert len(receiver.received) == 4
    ids = {r["headers"]["webhook-id"] for r in receiver.received}
    assert ids == {delivery.webhook_id}
    body = receiver.received[-1]["body"]
    assert body["type"] == "agent_run.completed"
    assert body["data"]["id"] == run_id and body["data"]["final_answer"] == "391"
    # Two secrets, two signatures in the one header: a receiver with either verifies.
    signatures = receiver.received[-1]["headers"]["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    raw = json.dumps(body, ensure_ascii=False).encode()
    headers = receiver.received[-1]["headers"]
    Webhook(OLD_SECRET).verify(raw, headers)


async def test_410_disables_the_url_for_the_run(fake_ollama, receiver):
    receiver.plan = ["410"]
    fake_ollama.enqueue(ANSWER)
    async with running_gateway(webhook_settings(fake_ollama, receiver)) as gateway, \
            client_stub(gateway.address) as stub:
        delivery = await settled(stub, await start(stub, receiver.url))
    assert delivery.state == pb.WEBHOOK_DELIVERY_STATE_DISABLED and delivery.attempts == 1


async def test_redirects_are_not_followed_and_retries_end(fake_ollama, receiver):
    receiver.plan = ["302"] * 100
    fake_ollama.enqueue(ANSWER)
    settings = webhook_settings(fake_ollama, receiver, webhook_retry_for=0.3)
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        delivery = await settled(stub, await start(stub, receiver.url))
    assert delivery.state == pb.WEBHOOK_DELIVERY_STATE_FAILED
    assert delivery.last_status_code == 302 and "redirect" in delivery.last_error
    assert delivery.attempts >= 2 and receiver.redirected_hits == 0


async def test_an_address_outside_the_allowed_networks_is_refused(fake_ollama, receiver):
    fake_ollama.enqueue(ANSWER)
    localhost_url = receiver.url.replace("127.0.0.1", "localhost")
    settings = webhook_settings(fake_ollama, receiver, webhook_allowed_networks="",
                                webhook_url_prefixes="http://127.0.0.1:,http://localhost:",
                                webhook_retry_for=0.2)
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        literal = await settled(stub, await start(stub, receiver.url))
        fake_ollama.enqueue(ANSWER)
        named = await settled(stub, await start(stub, localhost_url))
    for delivery in (literal, named):
        assert delivery.state == pb.WEBHOOK_DELIVERY_STATE_FAILED
        assert "not a public address" in delivery.last_error, delivery.last_error
    assert receiver.received == []


async def test_a_url_outside_the_prefixes_is_invalid(fake_ollama, receiver):
    async with running_gateway(webhook_settings(fake_ollama, receiver)) as gateway, \
            client_stub(gateway.address) as stub:
        for url in ("http://203.0.113.9/hooks/run", "ftp://127.0.0.1/hooks/",
                    receiver.url.replace("/hooks/", "/other/")):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await start(stub, url)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad_fields(raised.value) == {"webhook_url"}
    # Without prefixes the server sends no webhooks at all.
    async with running_gateway(gateway_settings(ollama_url=fake_ollama.url)) as gateway, \
            client_stub(gateway.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await start(stub, receiver.url)
        assert "webhook_url_prefixes" in raised.value.details()


async def test_a_cancelled_run_is_announced(fake_ollama, receiver):
    fake_ollama.enqueue(Script(hang_before_headers=True))
    async with running_gateway(webhook_settings(fake_ollama, receiver)) as gateway, \
            client_stub(gateway.address) as stub:
        run_id = await start(stub, receiver.url)
        await wait_until(lambda: fake_ollama.generation_requests, timeout=5)
        await stub.CancelAgentRun(pb.CancelAgentRunRequest(run_id=run_id), timeout=5)
        delivery = await settled(stub, run_id)
    assert delivery.event_type == "agent_run.cancelled"
    assert receiver.received[0]["body"]["data"]["status"] == "cancelled"


def test_signatures_follow_the_spec_and_secrets_stay_out_of_messages():
    body = b'{"a": 1}'
    header = sign([b"n" * 32], "msg_1", 1700000000, body)
    when = datetime.datetime.fromtimestamp(1700000000, tz=datetime.UTC)
    expected = Webhook(NEW_SECRET).sign("msg_1", when, body)
    assert header == expected
    with pytest.raises(SettingsError) as raised:
        gateway_settings(webhook_secrets="whsec_" + base64.b64encode(b"s" * 8).decode())
    assert "shorter than 24 bytes" in str(raised.value)
    assert base64.b64encode(b"s" * 8).decode() not in str(raised.value)
    with pytest.raises(SettingsError):
        gateway_settings(webhook_url_prefixes="https://hooks.example/")  # no secret


@pytest.mark.parametrize(("address", "allowed"), [
    ("10.1.2.3", False), ("127.0.0.1", False), ("169.254.169.254", False), ("::1", False),
    ("::ffff:10.0.0.1", False), ("fe80::1", False), ("100.64.0.1", False),
    ("203.0.113.9", False), ("8.8.8.8", True), ("2001:4860:4860::8888", True),
])
def test_only_public_addresses_pass_by_default(address, allowed):
    assert (address_problem(ipaddress.ip_address(address), []) is None) is allowed


async def test_the_receiver_in_the_docs_verifies_and_takes_a_delivery(fake_ollama):
    text = (ROOT / "docs/agent.md").read_text(encoding="utf-8")
    (source,) = re.findall(r"^```python webhook-receiver\n(.*?)^```", text, re.S | re.M)
    source = source.replace('"whsec_..."', repr(NEW_SECRET))
    source = source.replace("web.run_app(app, port=8080)\n", "")
    namespace: dict[str, Any] = {}
    exec(compile(source, "docs/agent.md receiver", "exec"), namespace)
    runner = web.AppRunner(namespace["app"], shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        url = f"http://127.0.0.1:{port}/hooks/agentloop"
        receiver = Receiver(NEW_SECRET, url=url)
        fake_ollama.enqueue(ANSWER)
        async with running_gateway(webhook_settings(fake_ollama, receiver)) as gateway, \
                client_stub(gateway.address) as stub:
            delivery = await settled(stub, await start(stub, url))
        assert delivery.state == pb.WEBHOOK_DELIVERY_STATE_DELIVERED
        assert delivery.last_status_code == 204
        assert namespace["seen"] == {delivery.webhook_id}
    finally:
        await runner.cleanup()


async def test_each_step_can_have_its_webhook_and_410_stops_the_rest(fake_ollama, receiver):
    calculate = Script(tokens=[json.dumps({"tool": "calculator",
                                           "arguments": {"expression": "17*23"}})])
    fake_ollama.enqueue(calculate, ANSWER, calculate, ANSWER)
    async with running_gateway(webhook_settings(fake_ollama, receiver)) as gateway, \
            client_stub(gateway.address) as stub:
        request = pb.StartAgentRunRequest(run=pb.StartAgentRun(goal="17*23?"),
                                          webhook_url=receiver.url, webhook_each_step=True)
        run_id = (await stub.StartAgentRun(request, timeout=5)).run.id
        await wait_until(lambda: len(receiver.received) == 2, timeout=10)
        types = [r["body"]["type"] for r in receiver.received]
        assert types == ["agent_run.step", "agent_run.completed"]
        step = receiver.received[0]["body"]["data"]
        assert (step["id"], step["step"], step["tool"], step["observation"]) == (
            run_id, 1, "calculator", "391")
        # A receiver answering 410 to the step's message gets nothing more for the run.
        receiver.received.clear()
        receiver.plan = ["410"]
        second = (await stub.StartAgentRun(request, timeout=5)).run.id
        found: list[pb.WebhookDelivery] = []

        async def both_settled() -> bool:
            found[:] = await deliveries(stub, second)
            return len(found) == 2 and all(
                d.state != pb.WEBHOOK_DELIVERY_STATE_PENDING for d in found)

        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while not await both_settled():
            assert loop.time() < end, found
            await asyncio.sleep(0.02)
    assert [(d.event_type, d.state, d.attempts) for d in found] == [
        ("agent_run.step", pb.WEBHOOK_DELIVERY_STATE_DISABLED, 1),
        ("agent_run.completed", pb.WEBHOOK_DELIVERY_STATE_DISABLED, 0)]
    assert len(receiver.received) == 1


async def test_each_step_needs_a_webhook_url(fake_ollama, receiver):
    async with running_gateway(webhook_settings(fake_ollama, receiver)) as gateway, \
            client_stub(gateway.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.StartAgentRun(pb.StartAgentRunRequest(
                run=pb.StartAgentRun(goal="x"), webhook_each_step=True), timeout=5)
        assert bad_fields(raised.value) == {"webhook_each_step"}
