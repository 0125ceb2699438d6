"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from agentloop.testing.fake_ollama import FakeOllama


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    """A fake Ollama on 127.0.0.1, a free port; stopped after the test."""
    fake = FakeOllama()
    await fake.start("127.0.0.1", 0)
    try:
        yield fake
    finally:
        await fake.stop()
