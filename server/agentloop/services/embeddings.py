"""The embeddings service: vectors and token counts, with the rules that hold whatever the
engine.

An embedding batch is work like a generation: it takes an admission slot (the server gives
Embed an `Admission` of its own, so embedders and generations never wait for each other;
it queues, times out and is refused by the same rules), and it is observed as one backend
call (span, metrics, the request log). A token count is tokenization, not a model pass: it takes
no slot, so a caller checking whether a prompt fits does not wait behind generations.
"""

from __future__ import annotations

from agentloop.admission import Admission
from agentloop.backends.base import Backend
from agentloop.domain import EmbeddingRequest, EmbeddingResult, TokenCount, TokenCountRequest
from agentloop.errors import BackendProtocolError
from agentloop.telemetry import Telemetry


class EmbeddingService:
    """Runs Embed and CountTokens calls on a backend within the replica's admission limits."""

    def __init__(self, backend: Backend, admission: Admission,
                 telemetry: Telemetry | None = None) -> None:
        self.backend = backend
        self.admission = admission
        self.telemetry = telemetry or Telemetry.disabled()

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """One vector per text, in order, within an admission slot; one observed call."""
        async with self.admission.slot(request.deadline, context=request.context):
            with self.telemetry.embeddings_call(request) as call:
                result = await self.backend.embed(request)
                check_result(request, result)
                call.finish(result)
            # A tenant's tokens per minute count embedded tokens too.
            self.admission.count_tokens(request.context, result.input_tokens)
        return result

    async def count_tokens(self, request: TokenCountRequest) -> TokenCount:
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
