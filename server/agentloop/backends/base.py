"""The one async interface every engine implements.

The services above only see `Backend`; wire details (HTTP and NDJSON for Ollama,
threads for llama.cpp) stay inside the implementations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from agentloop.domain import (
    BackendHealth,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    ModelInfo,
    StreamItem,
    TokenCount,
    TokenCountRequest,
)


@runtime_checkable
class Backend(Protocol):
    """An engine that generates text.

    `stream` yields text deltas (`str`) as the engine produces them and ends with exactly
    one `GenerationEnd`. It raises `agentloop.errors.AgentLoopError` subclasses for every
    failure it can name. Closing the iterator early (a cancelled client) must stop the
    engine's work on the request at once.
    """

    #: Which engine this is: "ollama" or "embedded" (ListModels, logs, telemetry).
    name: str
    #: Generations the engine runs at once; the default for admission control.
    parallelism: int
    #: max_tokens when neither the request nor --max-tokens sets it: sized so that a
    #: request leaving it unset finishes in reasonable time on this engine.
    default_max_tokens: int

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]: ...

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """One vector per text, in order; raises AgentLoopError (INVALID_ARGUMENT naming
        `texts[i]` for a text over the context when truncation is off, or `dimensions` for a
        model that has no shorter vectors)."""
        ...

    async def count_tokens(self, request: TokenCountRequest) -> TokenCount:
        """The tokens the model would see; raises AgentLoopError."""
        ...

    async def check_health(self, model: str) -> BackendHealth:
        """Is the engine answering and is `model` available? Never raises."""
        ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def start(self) -> None:
        """Open pools, load models: called once before serving."""
        ...

    async def warm_up(self) -> None:
        """Make the default model ready to answer (Ollama: load it, pulling it first if
        allowed; a no-op for engines that load in `start`). The health task runs it before
        the first SERVING and again after the backend comes back; raises AgentLoopError."""
        ...

    async def close(self) -> None:
        """Release every connection, thread and model: called once at shutdown."""
        ...

    @property
    def default_model(self) -> str:
        """The model used when a request leaves `model` empty."""
        ...

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the engine listens (server.address / server.port), None in-process."""
        ...
