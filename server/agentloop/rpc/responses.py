"""Domain results -> protobuf responses."""

from __future__ import annotations

import dataclasses

from google.protobuf import duration_pb2, timestamp_pb2

from agentloop.domain import (
    EmbeddingResult,
    FinishReason,
    GenerationEnd,
    GenerationResult,
    ModelInfo,
    Timings,
    TokenCount,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from agentloop.v1 import agentloop_pb2 as pb

#: Trailing metadata: the operator's name of the upstream that served a generation.
UPSTREAM_HEADER = "x-agentloop-upstream"

_FINISH_REASONS = {
    FinishReason.UNSPECIFIED: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
}


def duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def timestamp(unix_seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if unix_seconds is None:
        return None
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(int(unix_seconds * 1e9))
    return value


def usage_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                    cached_input_tokens=usage.cached_input_tokens)


def within_total(timings: Timings) -> Timings:
    """The engine's parts cut to fit the gateway's total, in the order they happen (load,
    prompt evaluation, evaluation): an engine's own clock, a generation joined midway or a
    cached answer replayed in a millisecond would otherwise report parts longer than the
    call."""
    if timings.total is None:
        return timings
    total = left = max(0.0, timings.total)
    parts: dict[str, float] = {}
    for name in ("load", "prompt_eval", "eval"):
        value = getattr(timings, name)
        if value is not None:
            parts[name] = min(max(0.0, value), left)
            left -= parts[name]
    first = timings.time_to_first_token
    if first is not None:
        parts["time_to_first_token"] = min(max(0.0, first), total)
    return dataclasses.replace(timings, total=total, **parts)


def timings_pb(timings: Timings) -> pb.Timings:
    """The timings of one call, whose parts never add up to more than its total."""
    timings = within_total(timings)
    return pb.Timings(
        total_duration=duration(timings.total),
        load_duration=duration(timings.load),
        prompt_eval_duration=duration(timings.prompt_eval),
        eval_duration=duration(timings.eval),
        time_to_first_token=duration(timings.time_to_first_token),
    )


def generate_response(result: GenerationResult) -> pb.GenerateResponse:
    end = result.end
    return pb.GenerateResponse(
        text=result.text,
        model=end.model,
        finish_reason=_FINISH_REASONS[end.finish_reason],
        usage=usage_pb(end.usage),
        timings=timings_pb(end.timings),
        upstream=end.upstream,
        tool_calls=tool_calls_pb(end.tool_calls),
    )


def tool_calls_pb(calls: tuple[ToolCall, ...]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json) for c in calls]


def stream_tool_call_delta(delta: ToolCallDelta) -> pb.StreamGenerateResponse:
    return pb.StreamGenerateResponse(tool_call_deltas=[pb.ToolCallDelta(
        index=delta.index, id=delta.id, name=delta.name, arguments_json=delta.arguments_json)])


def stream_delta(text: str) -> pb.StreamGenerateResponse:
    return pb.StreamGenerateResponse(text=text)


def stream_end(end: GenerationEnd) -> pb.StreamGenerateResponse:
    return pb.StreamGenerateResponse(
        model=end.model,
        finish_reason=_FINISH_REASONS[end.finish_reason],
        usage=usage_pb(end.usage),
        timings=timings_pb(end.timings),
        upstream=end.upstream,
        tool_calls=tool_calls_pb(end.tool_calls),
    )


def upstream_metadata(end: GenerationEnd) -> tuple[tuple[str, str], ...]:
    """Trailing metadata naming the upstream that served the call (none for one engine)."""
    return ((UPSTREAM_HEADER, end.upstream),) if end.upstream else ()


def model_pb(model: ModelInfo) -> pb.Model:
    return pb.Model(
        name=model.name,
        size_bytes=model.size_bytes,
        loaded=model.loaded,
        family=model.family,
        parameter_size=model.parameter_size,
        quantization_level=model.quantization_level,
        modify_time=timestamp(model.modified_at),
        expire_time=timestamp(model.expires_at),
        size_vram_bytes=model.size_vram_bytes,
        embeds=model.embeds,
        embedding_dimensions=model.embedding_dimensions,
    )


def embed_response(result: EmbeddingResult) -> pb.EmbedResponse:
    return pb.EmbedResponse(
        embeddings=[pb.Embedding(values=vector) for vector in result.vectors],
        model=result.model,
        usage=pb.Usage(input_tokens=result.input_tokens),
        dimensions=len(result.vectors[0]) if result.vectors else 0,
    )


def count_tokens_response(count: TokenCount) -> pb.CountTokensResponse:
    return pb.CountTokensResponse(
        counts=count.counts,
        total_tokens=sum(count.counts),
        context_length=count.context_length,
        model=count.model,
    )
