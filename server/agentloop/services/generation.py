"""The generation service: one request in, a stream of deltas and a final report out.

It applies the business rules that hold whatever the engine: the tenant's limits (its
tokens counted as they are used), the time to first token as the gateway sees it, the
gateway's own total duration, and a deterministic close of the backend stream when the
caller goes away. Where the call waits for capacity is the router's (upstreams/).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TypeVar

from agentloop.backends.base import Backend
from agentloop.config import Settings
from agentloop.domain import (
    GenerationRequest,
    GenerationResult,
    RequestedOptions,
    SamplingOptions,
    StreamItem,
    ToolCallDelta,
)
from agentloop.errors import BackendProtocolError
from agentloop.services.cache import ResponseCache, is_deterministic
from agentloop.services.quotas import Quotas, estimate_tokens
from agentloop.telemetry import Telemetry

T = TypeVar("T")


class GenerationService:
    """Runs generations on a backend within the tenants' limits."""

    def __init__(
        self, backend: Backend, quotas: Quotas, cache: ResponseCache | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.backend = backend
        self.quotas = quotas
        self.cache = cache
        self.telemetry = telemetry or Telemetry.disabled()

    @property
    def default_model(self) -> str:
        return self.backend.default_model

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        """Yield text deltas, then one `GenerationEnd` with gateway-measured timings.

        Deterministic requests go through the response cache when there is one."""
        started = time.monotonic()
        first_token_at: float | None = None
        if self.cache is not None and is_deterministic(request):
            source = self.cache.stream(request, self._from_backend)
        else:
            source = self._from_backend(request)
        async with aclosing(source) as items:
            async for item in items:
                if isinstance(item, str | ToolCallDelta):
                    if first_token_at is None:
                        first_token_at = time.monotonic()
                    yield item
                    continue
                now = time.monotonic()
                end = dataclasses.replace(item, timings=item.timings.as_measured(
                    now - started, (first_token_at or now) - started))
                self.telemetry.generation_done(request, end)
                yield end
                return
        raise BackendProtocolError("the backend ended without a final report")

    async def _from_backend(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        """The backend's items, within the tenant's limits; one observed call."""
        def estimate() -> int:  # only where the tenant counts tokens
            return estimate_tokens(request.system, request.prompt or "",
                                   messages=request.messages)

        async with self.quotas.admit(request.context, estimate) as meter:
            with self.telemetry.backend_call(request) as call:
                async with aclosing(self.backend.stream(request)) as items:
                    async for item in items:
                        if isinstance(item, str):
                            meter.add_output(1)  # about one token per delta
                            if call.output is not None:  # trace_content: answer into the span
                                call.output.append(item)
                        elif isinstance(item, ToolCallDelta):
                            meter.add_output(1)
                        else:
                            call.finish(item)
                            meter.settle(item.usage)  # the end report's counts
                        yield item

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """The whole generation at once."""
        pieces: list[str] = []
        async with aclosing(self.stream(request)) as items:
            async for item in items:
                if isinstance(item, str):
                    pieces.append(item)
                elif not isinstance(item, ToolCallDelta):  # the end repeats the calls whole
                    return GenerationResult(text="".join(pieces), end=item)
        raise BackendProtocolError("the backend ended without a final report")


def resolve_options(requested: RequestedOptions, settings: Settings) -> SamplingOptions:
    """Fill every option the request left unset with the server's default."""

    return SamplingOptions(
        temperature=pick(requested.temperature, settings.temperature),
        top_p=pick(requested.top_p, settings.top_p),
        top_k=pick(requested.top_k, settings.top_k),
        max_tokens=pick(requested.max_tokens, settings.max_tokens),
        repeat_penalty=pick(requested.repeat_penalty, settings.repeat_penalty),
        num_ctx=pick(requested.num_ctx, settings.num_ctx),
        seed=requested.seed,
        stop=requested.stop,
    )


def pick(value: T | None, default: T) -> T:
    return default if value is None else value
