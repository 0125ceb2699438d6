"""Domain results -> OpenAI's JSON: completions, their stream chunks, embeddings, models.

A generation's tool calls become `message.tool_calls` (finish_reason `tool_calls`); a
stream's ToolCallDeltas become the chunks' `delta.tool_calls` pieces, by index: the
first piece of a call carries its id, type and name, the next ones argument fragments.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any

from agentloop.domain import (
    EmbeddingResult,
    FinishReason,
    GenerationEnd,
    GenerationResult,
    ModelInfo,
    ToolCall,
    ToolCallDelta,
    Usage,
)

Json = dict[str, Any]

FINISH_REASONS = {FinishReason.UNSPECIFIED: "stop", FinishReason.STOP: "stop",
                  FinishReason.LENGTH: "length", FinishReason.TOOL_CALLS: "tool_calls"}
OWNER = "agentloop"


class Answer:
    """What every object of one completion shares: its id, creation time and model."""

    __slots__ = ("chat", "created", "id", "model")

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def whole(self, result: GenerationResult) -> Json:
        """The non-streamed answer."""
        end = result.end
        reason = FINISH_REASONS[end.finish_reason]
        choice: Json = (
            {"index": 0, "message": _message(result), "logprobs": None, "finish_reason": reason}
            if self.chat else
            {"index": 0, "text": result.text, "logprobs": None, "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": end.model or self.model,
                "choices": [choice], "usage": usage_json(end.usage)}

    def chunk(self, text: str | ToolCallDelta | None, reason: str | None = None,
              with_usage: bool = False, first: bool = False) -> Json:
        """One streamed chunk: a text or tool-call delta, or the end (`reason`). With
        include_usage, every chunk carries `usage: null`, as OpenAI's do, and
        `usage_chunk` the counts."""
        if self.chat:
            if isinstance(text, ToolCallDelta):
                delta: Json = {"tool_calls": [_call_piece(text)]}
                if first:  # the answer opens with a call: the role comes with it
                    delta = {"role": "assistant", "content": None, **delta}
            else:
                delta = {"role": "assistant", "content": text or ""} if first else (
                    {"content": text} if text is not None else {})
            choice: Json = {"index": 0, "delta": delta, "logprobs": None,
                            "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        chunk: Json = {"id": self.id, "object": self.chunk_object, "created": self.created,
                       "model": self.model, "choices": [choice]}
        if with_usage:
            chunk["usage"] = None
        return chunk

    def end_chunk(self, end: GenerationEnd, with_usage: bool) -> Json:
        if end.model:
            self.model = end.model
        return self.chunk(None, FINISH_REASONS[end.finish_reason], with_usage)

    def usage_chunk(self, end: GenerationEnd) -> Json:
        return {"id": self.id, "object": self.chunk_object, "created": self.created,
                "model": self.model, "choices": [], "usage": usage_json(end.usage)}


def _message(result: GenerationResult) -> Json:
    calls = result.end.tool_calls
    message: Json = {"role": "assistant", "content": result.text or (None if calls else ""),
                     "refusal": None}
    if calls:
        message["tool_calls"] = [tool_call_json(call) for call in calls]
    return message


def tool_call_json(call: ToolCall) -> Json:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments_json}}


def _call_piece(delta: ToolCallDelta) -> Json:
    """One piece of a streamed call: its first (the one with the id) names it."""
    if delta.id:
        return {"index": delta.index, "id": delta.id, "type": "function",
                "function": {"name": delta.name, "arguments": delta.arguments_json}}
    return {"index": delta.index, "function": {"arguments": delta.arguments_json}}


def usage_json(usage: Usage) -> Json:
    return {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens}}


def embeddings_json(result: EmbeddingResult, as_base64: bool) -> Json:
    """OpenAI's list of embeddings; base64 is the vector's little-endian float32 bytes."""
    data = [{"object": "embedding", "index": index,
             "embedding": _base64_floats(vector) if as_base64 else list(vector)}
            for index, vector in enumerate(result.vectors)]
    return {"object": "list", "data": data, "model": result.model,
            "usage": {"prompt_tokens": result.input_tokens,
                      "total_tokens": result.input_tokens}}


def _base64_floats(vector: tuple[float, ...]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def models_json(models: list[ModelInfo]) -> Json:
    return {"object": "list", "data": [
        {"id": model.name, "object": "model",
         "created": int(model.modified_at) if model.modified_at else 0, "owned_by": OWNER}
        for model in models]}
