"""The OpenAI-compatible backend: aiohttp to one endpoint of an upstream that speaks the
OpenAI HTTP API (vLLM, SGLang, TGI, llama.cpp's server, llama-cpp-python's server, a cloud).

`/chat/completions` serves chats, `/completions` raw prompts where the endpoint's dialect
has it. Every generation streams: the Server-Sent Events body is split into lines here (no
text decoding layer) and each event's data parsed once. Where engines differ (how a JSON
Schema is asked for, whether streams report usage, sampling extras, `cache_salt`) the
endpoint's `OpenAIDialect` says. Leaving the stream early closes the HTTP response at once,
which makes vLLM abort the request. Nothing an upstream sends as text (error messages,
bodies) reaches a caller or an info log line: statuses and our own words only.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email.utils
import json
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from agentloop.backends.http_wire import (
    HTTP_FAILURES,
    HttpUpstream,
    clean,
    retryable,
    trace_headers,
    transport_error,
    url_address,
)
from agentloop.config import Settings
from agentloop.domain import (
    BackendHealth,
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationEnd,
    GenerationRequest,
    ModelInfo,
    OutputFormat,
    Role,
    StreamItem,
    Timings,
    TokenCount,
    TokenCountRequest,
    Usage,
)
from agentloop.errors import (
    AgentLoopError,
    BackendProtocolError,
    BackendRejected,
    BackendStreamFailed,
    BackendUnavailable,
    InvalidArgument,
    ModelNotFound,
    ResourceExhausted,
    Unimplemented,
    UpstreamCredentialsRefused,
)
from agentloop.upstreams.spec import EndpointSpec, OpenAIDialect, SchemaStyle, TlsSpec

log = logging.getLogger(__name__)

#: Connections kept beside the generations' for health checks, model lists and embeddings.
CONTROL_CONNECTIONS = 2
#: The most of an error body read (its text is only logged at debug level).
ERROR_BODY_BYTES = 16384
#: The longest Server-Sent Event, and the largest whole answer (a model list, a batch of
#: embeddings), read from an upstream: beyond them it breaks its protocol.
MAX_EVENT_BYTES = 1 << 20
MAX_ANSWER_BYTES = 64 << 20
#: Bounds on a Retry-After the upstream sends (RetryInfo): "now" invites a busy loop.
RETRY_AFTER_MIN, RETRY_AFTER_MAX, RETRY_AFTER_DEFAULT = 0.1, 3600.0, 1.0
#: The name a JSON Schema travels under in `response_format` (OpenAI requires one).
SCHEMA_NAME = "output"

_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "eos": FinishReason.STOP,
    "tool_calls": FinishReason.STOP,
    "function_call": FinishReason.STOP,
    "length": FinishReason.LENGTH,
}
_DATA = b"data:"
_DONE = b"[DONE]"
_IMAGE_TYPES = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
                (b"GIF8", "image/gif"), (b"RIFF", "image/webp"))


class OpenAIBackend:
    """Generates through one endpoint of an OpenAI-compatible upstream."""

    name = "openai"
    default_max_tokens = 2048

    def __init__(self, spec: EndpointSpec, settings: Settings) -> None:
        self.spec = spec
        self.parallelism = spec.max_in_flight
        self._settings = settings
        self._model = settings.model
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        if spec.host:  # `url` holds a resolved address: the name is the Host and the SNI
            headers["Host"] = spec.host
        self._http = HttpUpstream(
            spec.url, connections=max(1, spec.max_in_flight) + CONTROL_CONNECTIONS,
            connect_timeout=spec.connect_timeout, pool_timeout=settings.pool_timeout,
            read_timeout=spec.read_timeout, headers=headers, server_hostname=spec.host,
            tls=tls_context(spec.tls) if spec.url.startswith("https:") else None)
        self._address = url_address(spec.url)

    @property
    def default_model(self) -> str:
        return self._model

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    async def start(self) -> None:
        """Nothing to open: the pool connects lazily."""

    async def close(self) -> None:
        await self._http.close()

    async def warm_up(self) -> None:
        """A no-op: an OpenAI-compatible server loads its models at its own start, and the
        health check (GET /models) already says whether the model is there."""

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        path, body = build_request_body(request, self.spec.dialect, self._settings)
        # W3C traceparent where the operator allows it: vLLM and TGI join the caller's trace.
        headers = trace_headers(self.spec.propagate_trace, self.spec.remote)
        answered = False
        try:
            # Leaving this block before the body's end closes the connection: vLLM aborts.
            async with self._http.request("POST", path, body=body,
                                          headers=headers) as response:
                answered = True
                if response.status != 200:
                    raise await self._refusal(response, request.model)
                async for item in parse_stream(sse_events(response.content.iter_any()),
                                               request, self.spec.upstream,
                                               chat=path != "/completions"):
                    # Cached tokens would tell a caller about other scopes' prompts unless
                    # the upstream keeps its prefix cache apart per scope (the salt we send).
                    yield item if self.spec.dialect.cache_salt else without_cached_tokens(item)
        except HTTP_FAILURES as exc:
            raise transport_error(exc, before_headers=not answered) from None

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        body: dict[str, Any] = {"model": request.model, "input": list(request.texts)}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        answer = await self._call("POST", "/embeddings", request.model, body=body)
        try:  # a batch of long vectors is milliseconds of parsing: off the event loop
            vectors, tokens = await asyncio.to_thread(
                parse_embeddings, answer, len(request.texts), request.normalize)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise BackendProtocolError("the upstream sent malformed embeddings") from None
        if request.dimensions is not None and any(len(v) != request.dimensions
                                                  for v in vectors):
            raise InvalidArgument([("dimensions", "the upstream's model has no vectors of "
                                                  f"{request.dimensions} dimensions")])
        return EmbeddingResult(vectors=tuple(vectors), model=request.model,
                               input_tokens=tokens, upstream=self.spec.upstream)

    async def count_tokens(self, request: TokenCountRequest) -> TokenCount:
        """The OpenAI API has no tokenizer endpoint, and the engines' own differ (vLLM's and
        llama.cpp's /tokenize, llama-cpp-python's /extras/tokenize): not portable."""
        raise Unimplemented(
            "counting tokens is not available on an OpenAI-compatible upstream",
            metadata={"upstream": self.spec.upstream, "model": request.model})

    async def check_health(self, model: str) -> BackendHealth:
        try:
            answer = await self._call("GET", "/models", "",
                                      timeout=self._settings.health_timeout)
            names = model_names(json.loads(answer))
        except AgentLoopError as exc:
            return BackendHealth(False, exc.message)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return BackendHealth(False, "the upstream sent a malformed model list")
        if model not in names:
            return BackendHealth(False, f"model {model!r} is not served by the upstream")
        return BackendHealth(True, served=tuple(sorted(names)))

    async def list_models(self) -> list[ModelInfo]:
        answer = await self._call("GET", "/models", "")
        try:
            names = model_names(json.loads(answer))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise BackendProtocolError("the upstream sent a malformed model list") from None
        # What an OpenAI-compatible server lists, it serves: loaded.
        return [ModelInfo(name=name, loaded=True) for name in names]

    async def _call(self, method: str, path: str, model: str, *, body: object = None,
                    timeout: float | None = None) -> bytes:
        """One request's whole answer (bounded); a refusal or failure raises AgentLoopError."""
        answered = False
        try:
            async with self._http.request(method, path, body=body,
                                          timeout=timeout) as response:
                answered = True
                if response.status != 200:
                    raise await self._refusal(response, model)
                body = bytearray()
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise BackendProtocolError("the upstream's answer is beyond any size")
                return bytes(body)
        except HTTP_FAILURES as exc:
            raise transport_error(exc, before_headers=not answered) from None

    async def _refusal(self, response: aiohttp.ClientResponse, model: str) -> AgentLoopError:
        """The error for a non-200 answer, its body read (capped) for the debug log only."""
        body = b""
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) >= ERROR_BODY_BYTES:
                break
        error = http_error(response.status, response.headers, model, self.spec.upstream)
        log.debug("upstream %s answered %d: %s", self.spec.upstream, response.status,
                  clean(body[:ERROR_BODY_BYTES].decode(errors="replace")))
        return error


def without_cached_tokens(item: StreamItem) -> StreamItem:
    """The item, its end's `cached_input_tokens` reported as 0."""
    if isinstance(item, str) or not item.usage.cached_input_tokens:
        return item
    return dataclasses.replace(item, usage=dataclasses.replace(item.usage,
                                                               cached_input_tokens=0))


def tls_context(tls: TlsSpec) -> ssl.SSLContext:
    """Verification against `ca_file` or the system's roots, and a client certificate for
    mutual TLS."""
    context = ssl.create_default_context(cafile=tls.ca_file or None)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.client_cert:
        context.load_cert_chain(tls.client_cert, tls.client_key or None)
    return context


# --- the request ------------------------------------------------------------------------


def build_request_body(request: GenerationRequest, dialect: OpenAIDialect,
                       settings: Settings) -> tuple[str, dict[str, Any]]:
    """The path and JSON body for a generation; raises InvalidArgument for what the
    upstream cannot take (see sampling_fields)."""
    body: dict[str, Any] = {"model": request.model, "stream": True,
                            **sampling_fields(request, dialect, settings)}
    if dialect.stream_usage:
        body["stream_options"] = {"include_usage": True}
    if request.format.kind is OutputFormat.JSON:
        body["response_format"] = {"type": "json_object"}
    elif request.format.kind is OutputFormat.JSON_SCHEMA:
        body["response_format"] = schema_format(request.format.json_schema or {},
                                                dialect.schema_style)
    if dialect.cache_salt and request.context.cache_scope:
        body["cache_salt"] = request.context.cache_scope
    if request.prompt is not None and dialect.completions and not request.system:
        body["prompt"] = request.prompt
        return "/completions", body
    # A chat, or a prompt the upstream only takes as one user turn (Completions has no
    # system either).
    turns = request.messages if request.is_chat else (
        ChatMessage(Role.USER, request.prompt or ""),)
    messages = [{"role": "system", "content": request.system}] if request.system else []
    messages += [chat_message(turn) for turn in turns]
    body["messages"] = messages
    return "/chat/completions", body


def sampling_fields(request: GenerationRequest, dialect: OpenAIDialect,
                    settings: Settings) -> dict[str, Any]:
    """The sampling options as OpenAI's fields.

    The request carries resolved options, so an option equal to the server's default is
    one the caller left unset (or set to the default, which asks for nothing else). `top_k`
    and the repeat penalty go to upstreams that take them (`dialect.sampling_extras`);
    elsewhere a value the caller chose is refused, since dropping it would change the
    answer, and the server's default is dropped. `num_ctx` is never sent: an
    OpenAI-compatible server fixes its context at start and refuses a prompt beyond it."""
    opts = request.options
    fields: dict[str, Any] = {"temperature": opts.temperature, "top_p": opts.top_p,
                              "max_tokens": opts.max_tokens}
    if opts.seed is not None:
        fields["seed"] = opts.seed
    if opts.stop:
        fields["stop"] = list(opts.stop)
    if dialect.sampling_extras:
        fields["top_k"] = opts.top_k
        fields[dialect.repeat_penalty_field] = opts.repeat_penalty
        return fields
    refused = [(f"options.{name}", "this model's upstream has no such option; leave it unset")
               for name, value, default in (
                   ("top_k", opts.top_k, settings.top_k),
                   ("repeat_penalty", opts.repeat_penalty, settings.repeat_penalty))
               if value != default]
    if refused:
        raise InvalidArgument(refused)
    return fields


def schema_format(schema: Mapping[str, Any], style: SchemaStyle) -> dict[str, Any]:
    """`response_format` for a JSON Schema, as the upstream takes it."""
    if style is SchemaStyle.JSON_OBJECT:
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": True}}


def chat_message(message: ChatMessage) -> dict[str, Any]:
    """One turn; images travel as data URLs in content parts."""
    if not message.images:
        return {"role": str(message.role), "content": message.content}
    parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}]
    parts += [{"type": "image_url", "image_url": {"url": data_url(image)}}
              for image in message.images]
    return {"role": str(message.role), "content": parts}


def data_url(image: bytes) -> str:
    kind = next((mime for magic, mime in _IMAGE_TYPES if image.startswith(magic)),
                "application/octet-stream")
    return f"data:{kind};base64,{base64.b64encode(image).decode()}"


# --- the stream -------------------------------------------------------------------------


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Split a Server-Sent Events body into events (the lines between blank lines), line
    ends made LF: one step per event rather than per line, no text decoding."""
    pending = b""
    async for chunk in chunks:
        buffer = pending + chunk
        carry = b""
        if b"\r" in buffer:  # CRLF or CR line ends (sse-starlette writes CRLF)
            if buffer.endswith(b"\r"):  # perhaps half of a CRLF: decide with the next chunk
                buffer, carry = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *events, pending = buffer.split(b"\n\n")
        pending += carry
        if len(pending) > MAX_EVENT_BYTES:
            raise BackendProtocolError("the upstream sent an event beyond any answer's size")
        for event in events:
            yield event
    pending = pending.replace(b"\r", b"\n")
    if pending.strip():
        yield pending


def event_data(event: bytes) -> tuple[bytes | None, bool]:
    """An event's data (its data lines joined; None when it has none) and whether it is an
    `event: error`. Comment lines and the other fields are skipped."""
    data: bytes | None = None
    failed = False
    for line in event.split(b"\n"):
        if line.startswith(_DATA):
            piece = line[6:] if line[5:6] == b" " else line[5:]
            data = piece if data is None else data + b"\n" + piece
        elif line.startswith(b"event:"):
            failed = line[6:].strip() == b"error"
    return data, failed


async def parse_stream(events: AsyncIterator[bytes], request: GenerationRequest, upstream: str,
                       *, chat: bool = True) -> AsyncIterator[StreamItem]:
    """Turn Server-Sent Events into deltas and one final `GenerationEnd`: `[DONE]` ends the
    stream, an error object (or an `event: error`) fails it."""
    end = _EndReport()
    async for event in events:
        if event.startswith(_DATA) and b"\n" not in event:  # one data line: most events
            data: bytes | None = event[5:].strip()
            failed = False
        else:
            data, failed = event_data(event)
            if data is None:
                continue
            data = data.strip()
        if data == _DONE:
            async for _ in events:  # read to the end: the connection goes back to the pool
                pass
            yield end.report(request, upstream)
            return
        text = end.take(data, chat, failed, request.model, upstream)
        if text:
            yield text
    if end.reason is not None:  # finished, and only the [DONE] is missing
        yield end.report(request, upstream)
        return
    raise BackendStreamFailed("the upstream closed the stream before its end",
                              metadata={"model": request.model, "upstream": upstream})


class _EndReport:
    """What a stream's chunks said about its end: the finish reason, usage, timings."""

    __slots__ = ("reason", "timings", "usage")

    def __init__(self) -> None:
        self.reason: str | None = None
        self.usage = Usage()
        self.timings = Timings()

    def take(self, data: bytes, chat: bool, failed: bool, model: str, upstream: str) -> str:
        """One event's data: its text delta ("" for none); the end's parts are kept."""
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: a chunk nested too deep
            raise BackendProtocolError("the upstream sent a malformed stream") from None
        if not isinstance(chunk, dict):
            raise BackendProtocolError("the upstream sent a malformed stream")
        if failed or "error" in chunk:
            raise BackendStreamFailed("the upstream failed mid-stream",
                                      metadata={"model": model, "upstream": upstream})
        text = ""
        choices = chunk.get("choices")
        if choices:
            try:
                choice = choices[0]
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                reason = choice.get("finish_reason")
            except (TypeError, AttributeError, KeyError, IndexError):
                raise BackendProtocolError("the upstream sent a malformed stream") from None
            if reason:
                self.reason = str(reason)
            if text and not isinstance(text, str):
                raise BackendProtocolError("the upstream sent a malformed stream")
        usage = chunk.get("usage")
        if usage:
            self.usage = usage_of(usage)
        timings = chunk.get("timings")  # llama.cpp's server: its own measures
        if timings:
            self.timings = timings_of(timings)
        return text or ""

    def report(self, request: GenerationRequest, upstream: str) -> GenerationEnd:
        reason = FinishReason.STOP if self.reason is None else _FINISH_REASONS.get(
            self.reason, FinishReason.UNSPECIFIED)
        return GenerationEnd(finish_reason=reason, usage=self.usage, timings=self.timings,
                             model=request.model, upstream=upstream)


def usage_of(usage: object) -> Usage:
    """OpenAI's usage; cached prompt tokens where the upstream reports them."""
    if not isinstance(usage, dict):
        return Usage()
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return Usage(input_tokens=_count(usage.get("prompt_tokens")),
                 output_tokens=_count(usage.get("completion_tokens")),
                 cached_input_tokens=_count(cached))


def timings_of(timings: object) -> Timings:
    """llama.cpp's server's milliseconds for the prompt and the generation."""
    if not isinstance(timings, dict):
        return Timings()
    return Timings(prompt_eval=_seconds(timings.get("prompt_ms")),
                   eval=_seconds(timings.get("predicted_ms")))


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _seconds(milliseconds: object) -> float | None:
    if isinstance(milliseconds, int | float) and not isinstance(milliseconds, bool) \
            and math.isfinite(milliseconds) and milliseconds >= 0:
        return milliseconds / 1000
    return None


# --- models and embeddings ----------------------------------------------------------------


def model_names(listing: Any) -> list[str]:
    """The ids of GET /models."""
    return [str(entry["id"]) for entry in listing["data"]]


def parse_embeddings(raw: bytes, expected: int, normalize: bool
                     ) -> tuple[list[tuple[float, ...]], int]:
    """The vectors of POST /embeddings in input order, and the prompt tokens.

    An upstream serving a model without pooling (llama-cpp-python's server) answers one
    vector per token: those are averaged, as llama.cpp's mean pooling does."""
    answer = json.loads(raw)
    entries = sorted(answer["data"], key=lambda entry: entry["index"])
    if [entry["index"] for entry in entries] != list(range(expected)):
        raise ValueError("one vector per text, indexed in order")
    vectors = [pooled(entry["embedding"]) for entry in entries]
    if normalize:
        vectors = [unit_vector(vector) for vector in vectors]
    return vectors, _count((answer.get("usage") or {}).get("prompt_tokens"))


def pooled(embedding: list[Any]) -> tuple[float, ...]:
    """One vector, or the mean of one vector per token."""
    if embedding and isinstance(embedding[0], list):
        if len({len(row) for row in embedding}) != 1:
            raise ValueError("token vectors of different lengths")
        return tuple(math.fsum(column) / len(embedding) for column in zip(*embedding,
                                                                          strict=True))
    return tuple(float(x) for x in embedding)


def unit_vector(vector: tuple[float, ...]) -> tuple[float, ...]:
    """Scaled to length 1 (engines differ in whether they normalize)."""
    length = math.hypot(*vector)
    return vector if not length else tuple(x / length for x in vector)


# --- errors -------------------------------------------------------------------------------


def http_error(status: int, headers: Mapping[str, str], model: str,
               upstream: str) -> AgentLoopError:
    """Map an upstream's error status to the design's error table (our words only)."""
    meta = {"backend_status": str(status), "upstream": upstream}
    if model:
        meta["model"] = model
    if status in (400, 413, 422):
        return BackendRejected(f"the upstream rejected the request (HTTP {status})",
                               metadata=meta)
    if status in (401, 403):
        return UpstreamCredentialsRefused(
            "the upstream refused the gateway's credentials: the operator must fix them",
            metadata=meta)
    if status == 404:
        return ModelNotFound(f"model {model!r} not found on the upstream", metadata=meta)
    delay = retry_after(headers.get("retry-after"))
    if status == 429:
        return retryable(ResourceExhausted("the upstream is busy or rate-limited; try again",
                                           retry_after=delay, metadata=meta))
    error = BackendUnavailable(f"the upstream failed (HTTP {status})", retry_after=delay,
                               metadata=meta)
    # A proxy's or an overloaded engine's answer: the engine never started on the request.
    # Others (500) may be the request's own doing: not retried, not counted by the circuit.
    return retryable(error) if status in (502, 503, 504) else error


def retry_after(value: str | None, now: float | None = None) -> float:
    """Retry-After as seconds: a number of seconds or an HTTP date, bounded."""
    if not value:
        return RETRY_AFTER_DEFAULT
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return RETRY_AFTER_DEFAULT
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return RETRY_AFTER_DEFAULT
    return min(max(seconds, RETRY_AFTER_MIN), RETRY_AFTER_MAX)
