"""Embed and CountTokens requests -> validated domain requests.

Counts are checked before each text is looked at, and sizes before anything is sent on:
a request of a million texts is refused without reading them.
"""

from __future__ import annotations

from collections.abc import Sequence

from agentloop.config import Settings
from agentloop.domain import EmbeddingRequest, TokenCountRequest
from agentloop.errors import InvalidArgument
from agentloop.rpc.requests import Violations, chat_messages, check_model
from agentloop.v1 import agentloop_pb2 as pb

#: The longest vector a caller may ask for: far beyond any model's, well within a message.
MAX_DIMENSIONS = 65536


def embedding_request(
    message: pb.EmbedRequest, settings: Settings, default_model: str,
    deadline: float | None = None,
) -> EmbeddingRequest:
    """Validate an Embed request: model, texts within the caps, a sane dimension."""
    violations: Violations = []
    check_model(message.model, violations)
    texts = checked_texts(message.texts, settings, violations)
    if message.dimensions < 0 or message.dimensions > MAX_DIMENSIONS:
        violations.append(("dimensions", f"must be in [0, {MAX_DIMENSIONS}] (0 = the model's)"))
    if violations:
        raise InvalidArgument(violations)
    return EmbeddingRequest(
        model=message.model or default_model,
        texts=texts,
        normalize=message.normalize if message.HasField("normalize") else True,
        truncate=message.truncate,
        dimensions=message.dimensions or None,
        deadline=deadline,
    )


def token_count_request(
    message: pb.CountTokensRequest, settings: Settings, default_model: str,
    deadline: float | None = None,
) -> TokenCountRequest:
    """Validate a CountTokens request: texts, or a chat within Generate's limits."""
    violations: Violations = []
    check_model(message.model, violations)
    texts: tuple[str, ...] = ()
    messages = ()
    if message.texts and message.messages:
        violations.append(("texts", "set either texts or messages, not both"))
    elif message.messages:
        messages = chat_messages(message.messages, "messages", settings, violations)
        text_bytes = len(message.system.encode()) + sum(len(m.content.encode())
                                                        for m in messages)
        if text_bytes > settings.max_prompt_bytes:
            violations.append(("messages", f"chat text is {text_bytes} bytes; the limit is "
                                           f"{settings.max_prompt_bytes}"))
    else:
        texts = checked_texts(message.texts, settings, violations)
        if message.system:
            violations.append(("system", "only with messages (count a system text as a text)"))
    if violations:
        raise InvalidArgument(violations)
    return TokenCountRequest(
        model=message.model or default_model,
        texts=texts,
        messages=messages,
        system=message.system,
        deadline=deadline,
    )


def checked_texts(texts: Sequence[str], settings: Settings,
                  violations: Violations) -> tuple[str, ...]:
    """The texts when their count, each one's size and their total are within the caps."""
    if not texts:
        violations.append(("texts", "must hold at least one text"))
        return ()
    if len(texts) > settings.max_texts:
        violations.append(("texts", f"{len(texts)} texts; the limit is {settings.max_texts}"))
        return ()
    total = 0
    for index, text in enumerate(texts):
        size = len(text.encode())
        total += size
        if not text.strip():
            violations.append((f"texts[{index}]", "must not be empty"))
        elif size > settings.max_text_bytes:
            violations.append((f"texts[{index}]", f"{size} bytes; the limit is "
                                                  f"{settings.max_text_bytes}"))
    if total > settings.max_texts_bytes:
        violations.append(("texts", f"{total} bytes in all; the limit is "
                                    f"{settings.max_texts_bytes}"))
    return tuple(texts)
