"""The embeddings service: vectors and token counts, with the rules that hold whatever the
engine.

An embedding batch is work like a generation: it counts against the tenant's limits (its
input paid at admission), waits for a slot of its pool (slots of its own, so embedders and
generations never wait for each other; it queues, times out and is refused by the same
rules: upstreams/), and it is observed as one backend call (span, metrics, the request
log). A token count costs no tokens but is a call all the same: the tenant's calls at once
and requests per minute count it, and it waits for a count slot of its pool.
"""

from __future__ import annotations

from agentloop.backends.base import Backend
from agentloop.domain import (
    EmbeddingRequest,
    EmbeddingResult,
    TokenCount,
    TokenCountRequest,
    Usage,
)
from agentloop.errors import BackendProtocolError
from agentloop.services.quotas import Quotas, estimate_tokens
from agentloop.telemetry import Telemetry


class EmbeddingService:
    """Runs Embed and CountTokens calls on a backend within the tenants' limits."""

    def __init__(self, backend: Backend, quotas: Quotas,
                 telemetry: Telemetry | None = None) -> None:
        self.backend = backend
        self.quotas = quotas
        self.telemetry = telemetry or Telemetry.disabled()

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """One vector per text, in order; one observed call. A tenant's tokens per minute
        count embedded tokens too."""
        async with self.quotas.admit(request.context,
                                     lambda: estimate_tokens(*request.texts)) as meter:
            with self.telemetry.embeddings_call(request) as call:
                result = await self.backend.embed(request)
                check_result(request, result)
                call.finish(result)
            meter.settle(Usage(input_tokens=result.input_tokens))
        return result

    async def count_tokens(self, request: TokenCountRequest) -> TokenCount:
        async with self.quotas.admit(request.context, tokens=False):
            count = await self.backend.count_tokens(request)
        expected = len(request.texts) if request.texts else 1
        if len(count.counts) != expected:
            raise BackendProtocolError("the backend counted another number of texts")
        return count


def check_result(request: EmbeddingRequest, result: EmbeddingResult) -> None:
    """A backend that answers another number of vectors, or vectors of several lengths,
    broke its contract: the caller would pair vectors with the wrong texts."""
    if len(result.vectors) != len(request.texts):
        raise BackendProtocolError("the backend returned another number of vectors than texts")
    if len({len(vector) for vector in result.vectors}) > 1 or not result.vectors[0]:
        raise BackendProtocolError("the backend returned vectors of different lengths")
