"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from postgres_server import pg_server  # noqa: F401 (a fixture: one server per session)

from agentloop.server import RunningServer
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from fake_ollama import FakeOllama, Script
from helpers import TOKENS, client_stub, gateway_settings, running_gateway


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    """A fake Ollama on 127.0.0.1, a free port; stopped after the test."""
    fake = FakeOllama()
    await fake.start("127.0.0.1", 0)
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def gateway(fake_ollama: FakeOllama) -> AsyncIterator[RunningServer]:
    """The real gateway in front of `fake_ollama` streaming TOKENS; modules may override."""
    fake_ollama.default_script = Script(tokens=TOKENS)
    async with running_gateway(gateway_settings(ollama_url=fake_ollama.url)) as running:
        yield running


@pytest.fixture
async def stub(gateway) -> AsyncIterator[pb_grpc.AgentLoopServiceStub]:
    """A client stub on a real channel to the test module's `gateway` fixture."""
    async with client_stub(gateway.address) as stub:
        yield stub
