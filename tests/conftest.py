"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from agentloop.testing.fake_ollama import FakeOllama
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from helpers import client_stub


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
async def stub(gateway) -> AsyncIterator[pb_grpc.AgentLoopServiceStub]:
    """A client stub on a real channel to the test module's `gateway` fixture."""
    async with client_stub(gateway.address) as stub:
        yield stub
