"""The OpenAI-compatible backend: aiohttp to one endpoint of an upstream that speaks the
OpenAI HTTP API (vLLM, SGLang, TGI, llama.cpp's server, llama-cpp-python's server, a cloud).

`/chat/completions` serves chats, `/completions` raw prompts where the endpoint's dialect
has it. Every generation streams: the Server-Sent Events body is split into lines here (no
text decoding layer) and each event's data parsed once. Where engines differ (how a JSON
Schema is asked for in a chat and for a raw prompt, `strict`, how many stop strings they
take, whether streams report usage, sampling extras, `cache_salt`) the endpoint's
`OpenAIDialect` says; a constraint an upstream cannot take is enforced here (stop strings)
or refused, never dropped. Leaving the stream early closes the HTTP response at once,
which makes vLLM abort the request. Nothing an upstream sends as text (error messages,
bodies) reaches a caller or an info log line: statuses and our own words only.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email.utils
import functools
import json
import logging
import math
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any

import aiohttp

from agentloop.backends import bounds
from agentloop.backends.bounds import (
    EVENT_SLACK,
    MALFORMED,
    MAX_CONTROL_ANSWER_BYTES,
    MAX_EVENT_BYTES,
    PARSE_OFF_LOOP_BYTES,
)
from agentloop.backends.constraints import grammar_for_schema, json_grammar, split_on_stops
from agentloop.backends.http_wire import (
    HTTP_FAILURES,
    HttpUpstream,
    clean,
    read_body,
    read_head,
    read_trailer,
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
    ResponseFormat,
    Role,
    StreamItem,
    Timings,
    TokenCount,
    TokenCountRequest,
    ToolCall,
    ToolCallDelta,
    ToolChoiceMode,
    Usage,
)
from agentloop.errors import (
    FORMAT_SCHEMA_FIELD,
    AgentLoopError,
    BackendRejected,
    BackendStreamFailed,
    BackendUnavailable,
    FailedPrecondition,
    InvalidArgument,
    ModelNotFound,
    ResourceExhausted,
    Unimplemented,
    UpstreamCredentialsRefused,
    UpstreamProtocolError,
)
from agentloop.schema_limits import load_json
from agentloop.tool_calls import (
    MAX_CALL_ID_CHARS,
    MAX_CALLS,
    check_calls,
    new_call_id,
    offered_tools,
    tool_definitions_json,
)
from agentloop.upstreams.spec import (
    CompletionsFormat,
    EndpointSpec,
    OpenAIDialect,
    SchemaStyle,
    TlsSpec,
)

log = logging.getLogger(__name__)

#: Connections kept beside the generations' for health checks, model lists and embeddings.
CONTROL_CONNECTIONS = 2
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
#: An open event larger than this is cleared of its comment lines before it grows further.
_COMMENTS_SHED_AT = 64 << 10
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
        dialect = self.spec.dialect
        grammar = None
        if dialect.completions_format is CompletionsFormat.GRAMMAR \
                and request.format.kind is not OutputFormat.TEXT \
                and takes_completions(request, dialect):
            grammar = await completion_grammar(request.format)
        path, body = build_request_body(request, dialect, self._settings, grammar)
        local_stops = request.options.stop[len(body.get("stop", ())):]
        # W3C traceparent where the operator allows it: vLLM and TGI join the caller's trace.
        headers = trace_headers(self.spec.propagate_trace, self.spec.remote)
        answered = False
        started = time.monotonic()
        try:
            # Leaving this block before the body's end closes the connection: vLLM aborts.
            async with self._http.request("POST", path, body=body,
                                          headers=headers) as response:
                answered = True
                if response.status != 200:
                    raise await self._refusal(response, request.model)
                items = parse_stream(sse_events(response.content.iter_any()), request,
                                     self.spec.upstream, chat=path != "/completions",
                                     started=started)
                if local_stops:  # those beyond the upstream's limit
                    items = cut_at_stops(items, local_stops, request, self.spec.upstream)
                async for item in items:
                    # Cached tokens would tell a caller about other scopes' prompts unless
                    # the upstream keeps its prefix cache apart per scope (the salt we send).
                    yield item if self.spec.dialect.cache_salt else without_cached_tokens(item)
        except HTTP_FAILURES as exc:
            raise transport_error(exc, before_headers=not answered) from None

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        body: dict[str, Any] = {"model": request.model, "input": list(request.texts)}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        answer = await self._call("POST", "/embeddings", request.model, body=body,
                                  limit=bounds.embeddings_answer_bytes(request.texts))
        try:  # a batch of long vectors is milliseconds of parsing: off the event loop
            vectors, tokens = await asyncio.to_thread(
                parse_embeddings, answer, len(request.texts), request.normalize)
        except MALFORMED:
            raise UpstreamProtocolError("the upstream sent malformed embeddings") from None
        if request.dimensions is not None and any(len(v) != request.dimensions
                                                  for v in vectors):
            raise InvalidArgument([("dimensions", "the upstream's model has no vectors of "
                                                  f"{request.dimensions} dimensions")])
        return EmbeddingResult(vectors=tuple(vectors), model=request.model,
                               input_tokens=bounds.count(tokens,
                                                         bounds.texts_tokens(request.texts)),
                               upstream=self.spec.upstream)

    async def count_tokens(self, request: TokenCountRequest) -> TokenCount:
        """The OpenAI API has no tokenizer endpoint, and the engines' own differ (vLLM's and
        llama.cpp's /tokenize, llama-cpp-python's /extras/tokenize): not portable."""
        raise Unimplemented(
            "counting tokens is not available on an OpenAI-compatible upstream",
            metadata={"upstream": self.spec.upstream, "model": request.model})

    async def check_health(self, model: str) -> BackendHealth:
        try:
            names = await self._model_names(timeout=self._settings.health_timeout)
        except AgentLoopError as exc:
            return BackendHealth(False, exc.message)
        if model not in names:
            return BackendHealth(False, f"model {model!r} is not served by the upstream")
        return BackendHealth(True, served=tuple(sorted(names)))

    async def list_models(self) -> list[ModelInfo]:
        names = await self._model_names()
        # What an OpenAI-compatible server lists, it serves: loaded.
        return [ModelInfo(name=name, loaded=True) for name in names]

    async def _model_names(self, timeout: float | None = None) -> list[str]:
        """GET /models, bounded, parsed off the event loop when large."""
        answer = await self._call("GET", "/models", "", timeout=timeout,
                                  limit=MAX_CONTROL_ANSWER_BYTES)
        try:
            if len(answer) > PARSE_OFF_LOOP_BYTES:
                return await asyncio.to_thread(model_names, answer)
            return model_names(answer)
        except MALFORMED:
            raise UpstreamProtocolError("the upstream sent a malformed model list") from None

    async def _call(self, method: str, path: str, model: str, *, body: object = None,
                    timeout: float | None = None, limit: int) -> bytes:
        """One request's whole answer (at most `limit` bytes); a refusal or failure raises
        AgentLoopError."""
        answered = False
        try:
            async with self._http.request(method, path, body=body,
                                          timeout=timeout) as response:
                answered = True
                if response.status != 200:
                    raise await self._refusal(response, model)
                return await read_body(response, limit)
        except HTTP_FAILURES as exc:
            raise transport_error(exc, before_headers=not answered) from None

    async def _refusal(self, response: aiohttp.ClientResponse, model: str) -> AgentLoopError:
        """The error for a non-200 answer, its body read (capped) for the debug log only."""
        body = await read_head(response)
        error = http_error(response.status, response.headers, model, self.spec.upstream)
        log.debug("upstream %s answered %d: %s", self.spec.upstream, response.status,
                  clean(body.decode(errors="replace")))
        return error


def without_cached_tokens(item: StreamItem) -> StreamItem:
    """The item, its end's `cached_input_tokens` reported as 0 (kept for the pool's prefix
    index alone, in `engine_cached_tokens`)."""
    if not isinstance(item, GenerationEnd) or not item.usage.cached_input_tokens:
        return item
    cached = item.usage.cached_input_tokens
    return dataclasses.replace(item, usage=dataclasses.replace(item.usage,
                                                               cached_input_tokens=0),
                               engine_cached_tokens=cached)


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


def takes_completions(request: GenerationRequest, dialect: OpenAIDialect) -> bool:
    """Does the request go to `/completions` (a raw prompt, no system, the dialect has it)?"""
    return request.prompt is not None and dialect.completions and not request.system


def build_request_body(request: GenerationRequest, dialect: OpenAIDialect, settings: Settings,
                       grammar: str | None = None) -> tuple[str, dict[str, Any]]:
    """The path and JSON body for a generation; raises InvalidArgument for what the
    upstream cannot take (see sampling_fields, completion_format). `grammar` is the GBNF
    of the request's format where the dialect's `/completions` takes one."""
    body: dict[str, Any] = {"model": request.model, "stream": True,
                            **sampling_fields(request, dialect, settings)}
    if dialect.stream_usage:
        body["stream_options"] = {"include_usage": True}
    if dialect.cache_salt and request.context.cache_scope:
        body["cache_salt"] = request.context.cache_scope
    if takes_completions(request, dialect):
        body["prompt"] = request.prompt
        body.update(completion_format(request.format, dialect, grammar))
        return "/completions", body
    if request.format.kind is not OutputFormat.TEXT:
        body["response_format"] = response_format(request.format, dialect)
    if request.tools:
        body.update(tool_fields(request, dialect))
    # A chat, or a prompt the upstream only takes as one user turn (Completions has no
    # system either).
    turns = request.messages if request.is_chat else (
        ChatMessage(Role.USER, request.prompt or ""),)
    messages = [{"role": "system", "content": request.system}] if request.system else []
    messages += chat_messages(turns)
    body["messages"] = messages
    return "/chat/completions", body


def tool_fields(request: GenerationRequest, dialect: OpenAIDialect) -> dict[str, Any]:
    """`tools` and `tool_choice` as the upstream takes them; with tool choice none the
    tools are not sent (nothing to call, and a prompt the shorter)."""
    tools = offered_tools(request)
    if not tools:
        return {}
    mode = request.tool_choice.mode
    named = request.tool_choice.name if mode is ToolChoiceMode.TOOL else ""
    if mode is ToolChoiceMode.REQUIRED and not dialect.tool_choice_required:
        if len(tools) > 1:
            raise InvalidArgument([("tool_choice.mode", "this model's upstream cannot be made "
                                                        "to call one of several tools: name "
                                                        "one (MODE_TOOL), or use MODE_AUTO")])
        named = tools[0].name
    if named:
        choice: object = {"type": "function", "function": {"name": named}}
    else:
        choice = "required" if mode is ToolChoiceMode.REQUIRED else "auto"
    # Every declared tool goes (a named choice picks among them), as OpenAI takes it.
    return {"tools": tool_definitions_json(request.tools), "tool_choice": choice}


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
    if opts.stop:  # those beyond the upstream's limit are cut here (cut_at_stops)
        fields["stop"] = list(opts.stop[:dialect.stop_limit or None])
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


def response_format(form: ResponseFormat, dialect: OpenAIDialect) -> dict[str, Any]:
    """`response_format` for JSON mode or a JSON Schema, as the upstream takes it."""
    if form.kind is OutputFormat.JSON:
        return {"type": "json_object"}
    schema = form.json_schema or {}
    if dialect.schema_style is SchemaStyle.JSON_OBJECT:
        return {"type": "json_object", "schema": schema}
    wrapper: dict[str, Any] = {"name": SCHEMA_NAME, "schema": schema}
    if dialect.strict_schema:
        wrapper["strict"] = strict_mode_takes(schema)
    return {"type": "json_schema", "json_schema": wrapper}


def completion_format(form: ResponseFormat, dialect: OpenAIDialect,
                      grammar: str | None) -> dict[str, Any]:
    """The fields that carry a raw prompt's format to `/completions`, per the dialect; a
    format the upstream would ignore there is refused rather than dropped."""
    if form.kind is OutputFormat.TEXT:
        return {}
    style = dialect.completions_format
    if style is CompletionsFormat.RESPONSE_FORMAT:
        return {"response_format": response_format(form, dialect)}
    if style is CompletionsFormat.JSON_SCHEMA:  # llama.cpp's server: {} is any JSON value
        schema = form.json_schema if form.kind is OutputFormat.JSON_SCHEMA else None
        return {"json_schema": schema or {}}
    if style is CompletionsFormat.GRAMMAR and grammar is not None:
        return {"grammar": grammar}
    raise InvalidArgument([("format", "this model's upstream cannot constrain a raw prompt's "
                                      "output: send the prompt as `messages`, or leave "
                                      "`format` unset")])


#: Keywords OpenAI's strict mode takes (its "supported schemas"); any other one in a schema
#: makes it refuse `strict: true`.
_STRICT_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "anyOf", "enum",
    "const", "description", "title", "$ref", "$defs", "definitions", "pattern", "format",
    "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum", "minItems",
    "maxItems",
})


def strict_mode_takes(schema: Mapping[str, Any]) -> bool:
    """Does OpenAI's strict mode take this schema? An object at the root (not `anyOf`),
    every object closed (`additionalProperties: false`) with all its properties required,
    and only the keywords it knows. Walked without recursion: schemas are bounded, but a
    caller's nesting is not this function's to trust."""
    if schema.get("type") != "object" or "anyOf" in schema:
        return False
    pending: list[Any] = [schema]
    while pending:
        node = pending.pop()
        if not isinstance(node, Mapping) or not set(node) <= _STRICT_KEYWORDS:
            return False
        properties = node.get("properties")
        if properties is not None or node.get("type") == "object":
            if not isinstance(properties, Mapping) or node.get("additionalProperties") \
                    is not False or not isinstance(node.get("required"), list) \
                    or set(node["required"]) != set(properties):
                return False
            pending += properties.values()
        for key in ("$defs", "definitions"):
            if isinstance(node.get(key), Mapping):
                pending += node[key].values()
        if isinstance(node.get("anyOf"), list):
            pending += node["anyOf"]
        if "items" in node:
            pending.append(node["items"])
    return True


async def completion_grammar(form: ResponseFormat) -> str:
    """The GBNF for a format, written on a thread (a large schema is milliseconds of
    converting, and the converter's first use imports llama-cpp-python); a schema the
    converter cannot express is refused naming it."""
    text = "" if form.kind is OutputFormat.JSON else json.dumps(form.json_schema or {})
    try:
        return await asyncio.to_thread(_grammar_of, text)
    except ImportError:  # a pools file is checked for it at start; a spec made in code not
        raise FailedPrecondition("this model's upstream takes a grammar, and the gateway "
                                 "has no grammar converter (llama-cpp-python)") from None
    except RecursionError:
        raise BackendRejected("this model's upstream cannot enforce this JSON schema: it has "
                              "too many parts for the grammar converter",
                              field=FORMAT_SCHEMA_FIELD) from None
    except Exception as exc:  # the converter raises plain Exceptions
        raise BackendRejected(f"this model's upstream cannot enforce this JSON schema: "
                              f"{clean(exc)}", field=FORMAT_SCHEMA_FIELD) from None


@functools.lru_cache(maxsize=32)
def _grammar_of(schema: str) -> str:
    """GBNF for a schema's text ("" for JSON mode); the agent loop sends one schema per
    step of a run, so recent ones are kept."""
    return grammar_for_schema(schema) if schema else json_grammar()


def chat_messages(turns: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The turns as OpenAI's messages. A tool result carries a `tool_call_id`: the turn
    before it, where that is a tool call in the agent's action form (`{"tool": ...,
    "arguments": {...}}`), gets it as its `tool_calls`; ids follow the turns' places, so a
    conversation's earlier turns read the same on every call (the upstream's prefix cache)."""
    messages: list[dict[str, Any]] = []
    for index, turn in enumerate(turns):
        message = chat_message(turn)
        if turn.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.name, "arguments": call.arguments_json}} for call in turn.tool_calls]
        if turn.tool_call_id:  # function calling: the caller's own id
            message["tool_call_id"] = turn.tool_call_id
        elif turn.role is Role.TOOL:
            call_id = f"call_{index}"
            earlier = turns[index - 1] if index else None
            call = tool_call(earlier.content) if earlier is not None \
                and earlier.role is Role.ASSISTANT else None
            if call is not None and "tool_calls" not in messages[-1]:
                call_id = f"call_{index - 1}"
                messages[-1]["tool_calls"] = [{"id": call_id, "type": "function",
                                               "function": {"name": call[0],
                                                            "arguments": call[1]}}]
            message["tool_call_id"] = call_id
        messages.append(message)
    return messages


#: A function's name as OpenAI takes it in `tool_calls`.
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def tool_call(content: str) -> tuple[str, str] | None:
    """The tool's name and its arguments as JSON, where `content` is a tool call in the
    agent's action form; None otherwise."""
    if not content.lstrip().startswith("{"):
        return None
    try:
        action = load_json(content)
    except ValueError:
        return None
    if not isinstance(action, dict):
        return None
    name, arguments = action.get("tool"), action.get("arguments")
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name) \
            or not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)


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
    ends made LF: one step per event rather than per line, no text decoding. An event
    still open past MAX_EVENT_BYTES sheds its comment lines (keep-alives an upstream may
    send without end); one still beyond that fails the stream."""
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
        if len(pending) > _COMMENTS_SHED_AT:
            pending = without_comments(pending)
            if len(pending) > MAX_EVENT_BYTES:
                raise UpstreamProtocolError(
                    "the upstream sent an event beyond any answer's size")
        for event in events:
            yield event
    pending = pending.replace(b"\r", b"\n")
    if pending.strip():
        yield pending


def without_comments(pending: bytes) -> bytes:
    """An open event without its whole comment lines (the last line may still be growing)."""
    *lines, last = pending.split(b"\n")
    return b"\n".join([line for line in lines if not line.startswith(b":")] + [last])


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
                       *, chat: bool = True, started: float | None = None
                       ) -> AsyncIterator[StreamItem]:
    """Turn Server-Sent Events into deltas and one final `GenerationEnd`: `[DONE]` ends the
    stream, an error object (or an `event: error`) fails it.

    The upstream is held to the request: past max_tokens deltas with text, past
    max_tokens + EVENT_SLACK events (with data, or without), or past the answer's
    characters (bounds.answer_chars),
    the answer ends with LENGTH and the caller leaves the response (its connection
    dropped). `started` (time.monotonic()) is when the request went out: no duration the
    upstream reports is believed beyond the call's own."""
    end = _EndReport(request, time.monotonic() if started is None else started)
    max_tokens = request.options.max_tokens
    deltas_left, chars_left = max_tokens, bounds.answer_chars(max_tokens)
    # Events with data and events without (comments, keep-alives), each bounded.
    data_left = quiet_left = max_tokens + EVENT_SLACK
    async for event in events:
        if event.startswith(_DATA) and b"\n" not in event:  # one data line: most events
            data: bytes | None = event[5:].strip()
            failed = False
        else:
            data, failed = event_data(event)
            if data is None:
                quiet_left -= 1
                if quiet_left < 0:
                    yield end.report(request, upstream, cut=True)
                    return
                continue
            data = data.strip()
        data_left -= 1
        if data_left < 0:
            yield end.report(request, upstream, cut=True)
            return
        if data == _DONE:
            await read_trailer(events)  # the body's end: the connection goes back to the pool
            yield end.report(request, upstream)
            return
        text = end.take(data, chat, failed, request.model, upstream)
        for delta in end.deltas:
            chars_left -= len(delta.arguments_json) + len(delta.name) + len(delta.id)
            if chars_left < 0:
                raise UpstreamProtocolError("the upstream sent tool calls beyond any size")
            yield delta
        end.deltas.clear()
        if text:
            deltas_left -= 1
            if deltas_left < 0:
                yield end.report(request, upstream, cut=True)
                return
            if len(text) >= chars_left:
                yield text[:chars_left]
                yield end.report(request, upstream, cut=True)
                return
            chars_left -= len(text)
            yield text
    if end.reason is not None:  # finished, and only the [DONE] is missing
        yield end.report(request, upstream)
        return
    raise BackendStreamFailed("the upstream closed the stream before its end",
                              metadata={"model": request.model, "upstream": upstream})


class _EndReport:
    """What a stream's chunks said about its end: the finish reason, usage, timings (each
    bounded by what the request can have cost)."""

    __slots__ = ("calls", "deltas", "offered", "reason", "request", "started", "timings",
                 "usage")

    def __init__(self, request: GenerationRequest, started: float) -> None:
        self.reason: str | None = None
        #: The tool calls so far, by index: [id, name, arguments] (`delta.tool_calls`).
        self.calls: dict[int, list[str]] = {}
        #: The tool-call deltas of the last chunk taken, for the stream to send.
        self.deltas: list[ToolCallDelta] = []
        self.offered = {tool.name for tool in offered_tools(request)}
        self.request = request
        self.started = started
        self.usage = Usage()
        self.timings = Timings()

    def take(self, data: bytes, chat: bool, failed: bool, model: str, upstream: str) -> str:
        """One event's data: its text delta ("" for none); the end's parts are kept."""
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: a chunk nested too deep
            raise UpstreamProtocolError("the upstream sent a malformed stream") from None
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError("the upstream sent a malformed stream")
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
                calls = (choice.get("delta") or {}).get("tool_calls") if chat else None
            except (TypeError, AttributeError, KeyError, IndexError):
                raise UpstreamProtocolError("the upstream sent a malformed stream") from None
            if calls:
                self._take_calls(calls)
            if reason:
                self.reason = str(reason)
            if text and not isinstance(text, str):
                raise UpstreamProtocolError("the upstream sent a malformed stream")
        usage = chunk.get("usage")
        if usage:
            self.usage = usage_of(usage, self.request)
        timings = chunk.get("timings")  # llama.cpp's server: its own measures
        if timings:
            self.timings = timings_of(timings, time.monotonic() - self.started)
        return text or ""

    def _take_calls(self, calls: object) -> None:
        """`delta.tool_calls`: pieces of calls by index (the first of a call has its id
        and name, the rest pieces of its arguments), kept and passed on as deltas."""
        if not isinstance(calls, list):
            raise UpstreamProtocolError("the upstream sent malformed tool calls")
        for piece in calls:
            index = piece.get("index", 0) if isinstance(piece, dict) else None
            function = piece.get("function") or {} if isinstance(piece, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index \
                    < MAX_CALLS or not isinstance(function, dict):
                raise UpstreamProtocolError("the upstream sent malformed tool calls")
            call_id, name = piece.get("id") or "", function.get("name") or ""
            arguments = function.get("arguments") or ""
            if not all(isinstance(part, str) for part in (call_id, name, arguments)):
                raise UpstreamProtocolError("the upstream sent malformed tool calls")
            known = self.calls.get(index)
            if known is None:  # a call's first piece: its id (made up where none came, or
                # one too long for a tool turn to send back)
                if not 0 < len(call_id) <= MAX_CALL_ID_CHARS:
                    call_id = new_call_id()
                known = self.calls[index] = [call_id, "", ""]
                call_id = known[0]
            else:
                call_id = ""  # an id or a name said once counts
            name = name if not known[1] else ""
            if name and name not in self.offered:  # before any piece of it reaches a caller
                raise UpstreamProtocolError(
                    f"the upstream called a tool the request did not offer ({name[:64]!r})")
            known[1] = known[1] or name
            known[2] += arguments
            if call_id or name or arguments:
                self.deltas.append(ToolCallDelta(index, call_id, name, arguments))

    def report(self, request: GenerationRequest, upstream: str,
               cut: bool = False) -> GenerationEnd:
        """The end; `cut`: the gateway ended the answer at its length bound. Tool calls
        assembled from the stream are checked (the tools offered, object arguments)."""
        reason = FinishReason.LENGTH if cut else FinishReason.STOP if self.reason is None \
            else _FINISH_REASONS.get(self.reason, FinishReason.UNSPECIFIED)
        calls: tuple[ToolCall, ...] = ()
        if self.calls and not cut:
            calls = check_calls([ToolCall(call_id, name, arguments or "{}")
                                 for _, (call_id, name, arguments) in sorted(self.calls.items())],
                                request)
            reason = FinishReason.TOOL_CALLS
        return GenerationEnd(finish_reason=reason, usage=self.usage, timings=self.timings,
                             model=request.model, upstream=upstream, tool_calls=calls)


async def cut_at_stops(items: AsyncGenerator[StreamItem], stops: Sequence[str],
                       request: GenerationRequest, upstream: str
                       ) -> AsyncIterator[StreamItem]:
    """The stream cut at the first of `stops` (those the upstream could not take): text
    that may begin one is held back until it does not. At a stop the upstream's request is
    closed at once, and the end reports no usage (the upstream's never came)."""
    pending = ""
    async with aclosing(items):
        async for item in items:
            if isinstance(item, ToolCallDelta):
                yield item
                continue
            if not isinstance(item, str):
                if pending:
                    yield pending
                yield item
                return
            pending += item
            end, stopped = split_on_stops(pending, stops)
            if end:
                yield pending[:end]
            pending = pending[end:]
            if stopped:
                yield GenerationEnd(finish_reason=FinishReason.STOP, usage=Usage(),
                                    timings=Timings(), model=request.model, upstream=upstream)
                return


def usage_of(usage: object, request: GenerationRequest) -> Usage:
    """OpenAI's usage, cached prompt tokens where the upstream reports them; each count
    bounded by what the request can have cost (bounds.usage)."""
    if not isinstance(usage, dict):
        return Usage()
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return bounds.usage(request, usage.get("prompt_tokens"), usage.get("completion_tokens"),
                        cached)


def timings_of(timings: object, most: float) -> Timings:
    """llama.cpp's server's milliseconds for the prompt and the generation, each at most
    `most` seconds (the call's own time so far)."""
    if not isinstance(timings, dict):
        return Timings()
    return Timings(prompt_eval=bounds.seconds(timings.get("prompt_ms"), 1e-3, most),
                   eval=bounds.seconds(timings.get("predicted_ms"), 1e-3, most))


# --- models and embeddings ----------------------------------------------------------------


def model_names(raw: bytes) -> list[str]:
    """The ids of GET /models."""
    return [str(entry["id"]) for entry in json.loads(raw)["data"]]


def parse_embeddings(raw: bytes, expected: int, normalize: bool
                     ) -> tuple[list[tuple[float, ...]], object]:
    """The vectors of POST /embeddings in input order, and the prompt tokens as reported.

    An upstream serving a model without pooling (llama-cpp-python's server) answers one
    vector per token: those are averaged, as llama.cpp's mean pooling does."""
    answer = json.loads(raw)
    entries = sorted(answer["data"], key=lambda entry: entry["index"])
    if [entry["index"] for entry in entries] != list(range(expected)):
        raise ValueError("one vector per text, indexed in order")
    vectors = [pooled(entry["embedding"]) for entry in entries]
    if not all(map(bounds.finite, vectors)):
        raise ValueError("numbers beyond a float's range")
    if normalize:
        vectors = [unit_vector(vector) for vector in vectors]
    return vectors, (answer.get("usage") or {}).get("prompt_tokens")


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
