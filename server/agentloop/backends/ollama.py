"""The Ollama backend: aiohttp to Ollama's HTTP API (the production sidecar).

One `HttpUpstream` (aiohttp, see http_wire) pools connections. `/api/chat` serves chats and
`/api/generate` raw prompts; the NDJSON stream is parsed line by line, the final chunk's
counts and nanosecond durations become `Usage` and `Timings`. Leaving the stream early
(a cancelled or timed-out client) closes the HTTP response at once, which cancels the
request inside Ollama.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any

from agentloop.backends import bounds
from agentloop.backends.bounds import (
    EVENT_SLACK,
    MALFORMED,
    MAX_CONTROL_ANSWER_BYTES,
    PARSE_OFF_LOOP_BYTES,
)
from agentloop.backends.http_wire import (
    HTTP_FAILURES,
    HttpUpstream,
    byte_lines,
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
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationEnd,
    GenerationRequest,
    ModelInfo,
    OutputFormat,
    StreamItem,
    Timings,
    TokenCount,
    TokenCountRequest,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from agentloop.errors import (
    AgentLoopError,
    BackendRejected,
    BackendStreamFailed,
    BackendUnavailable,
    Cancelled,
    InvalidArgument,
    ModelNotFound,
    ResourceExhausted,
    Unimplemented,
    UpstreamProtocolError,
)
from agentloop.tool_calls import (
    MAX_CALL_ID_CHARS,
    MAX_CALLS,
    arguments_text,
    call_names,
    check_calls,
    new_call_id,
    offered_tools,
    tool_definitions_json,
)

log = logging.getLogger(__name__)

_DONE_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}
_NS = 1e-9
#: The longest model name taken from an answer (a longer one: the request's name is kept).
_MAX_NAME_CHARS = 256
#: Concurrent /api/show calls of one ListModels (which models embed, their dimension).
_SHOW_CONCURRENCY = 8


class OllamaBackend:
    """Generates through an Ollama server."""

    name = "ollama"
    # Ollama's OLLAMA_NUM_PARALLEL picks 4 (or 1 on small memory); see --max-in-flight.
    parallelism = 4
    default_max_tokens = 2048

    def __init__(self, settings: Settings, *, remote: bool = False,
                 propagate_trace: bool = True) -> None:
        self._settings = settings
        # Where the operator lets calls carry trace headers (a local sidecar: yes).
        self._trace = (propagate_trace, remote)
        self._model = settings.model
        self._keep_alive = _keep_alive_value(settings.keep_alive)
        self._http = HttpUpstream(
            settings.ollama_url, connections=settings.max_connections,
            connect_timeout=settings.connect_timeout, pool_timeout=settings.pool_timeout,
            read_timeout=settings.read_timeout)
        self._address = url_address(settings.ollama_url)
        #: (name, digest) -> (embeds, dimensions), from /api/show: a model's facts only change
        #: with its digest, so ListModels asks once per model version.
        self._embedding_facts: dict[tuple[str, str], tuple[bool, int]] = {}

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

    async def _fetch(self, path: str, timeout: float | None = None,
                     body: object = None) -> tuple[int, bytes]:
        """A control call's status and body (GET, or POST with a body): an answer of at most
        MAX_CONTROL_ANSWER_BYTES (UpstreamProtocolError beyond), an error's first bytes."""
        method = "POST" if body is not None else "GET"
        async with self._http.request(method, path, body=body, timeout=timeout) as response:
            if response.status != 200:
                return response.status, await read_head(response)
            return response.status, await read_body(response, MAX_CONTROL_ANSWER_BYTES)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        path, body = build_request_body(request, self._keep_alive)
        headers = trace_headers(*self._trace)  # Ollama's side joins the caller's trace
        answered = False
        started = time.monotonic()
        try:
            # Leaving this block before the body's end closes the connection: Ollama stops.
            async with self._http.request("POST", path, body=body, headers=headers) as response:
                answered = True
                if response.status != 200:
                    raise http_error(response.status, await read_head(response), request.model)
                async for item in parse_stream(byte_lines(response.content.iter_any()),
                                               request, started=started):
                    yield item
        except HTTP_FAILURES as exc:
            raise transport_error(exc, before_headers=not answered) from None

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """One /api/embed call for the whole batch. Ollama always returns unit vectors, so
        a call asking for raw ones is refused rather than answered wrongly."""
        if not request.normalize:
            raise BackendRejected("the Ollama backend returns unit vectors only (Ollama "
                                  "normalizes every embedding); leave normalize set",
                                  field="normalize")
        body: dict[str, Any] = {"model": request.model, "input": list(request.texts),
                                "truncate": request.truncate, "keep_alive": self._keep_alive}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        headers = trace_headers(*self._trace)
        answered = False
        try:
            async with self._http.request("POST", "/api/embed", body=body,
                                          headers=headers) as response:
                answered = True
                status = response.status
                content = await (read_head(response) if status != 200 else read_body(
                    response, bounds.embeddings_answer_bytes(request.texts)))
        except HTTP_FAILURES as exc:
            raise transport_error(exc, before_headers=not answered) from None
        if status != 200:
            raise embed_error(status, content, request)
        if len(content) > PARSE_OFF_LOOP_BYTES:
            return await asyncio.to_thread(parse_embeddings, content, request)
        return parse_embeddings(content, request)

    async def count_tokens(self, request: TokenCountRequest) -> TokenCount:
        """Ollama has no tokenizer endpoint, and its prompt_eval_count after a generation
        leaves out the tokens it found in its cache: no honest count can be had."""
        raise Unimplemented("the Ollama backend cannot count tokens: Ollama's API has no "
                            "tokenizer endpoint", metadata={"backend": self.name})

    async def warm_up(self) -> None:
        """Load the default model with keep_alive (an empty generate), pulling it first when
        `pull_model` allows and Ollama lacks it."""
        try:
            if self._settings.pull_model and not (await self.check_health(self._model)).ready:
                await self._pull(self._model)
            status, content = await self._fetch(
                "/api/generate", body={"model": self._model, "keep_alive": self._keep_alive})
        except HTTP_FAILURES as exc:
            raise transport_error(exc) from None
        if status != 200:
            raise http_error(status, content, self._model)

    async def _pull(self, model: str) -> None:
        """Pull `model`, reading Ollama's progress lines until "success"."""
        log.info("pulling %s", model)
        async with self._http.request("POST", "/api/pull", body={"model": model}) as response:
            if response.status != 200:
                raise http_error(response.status, await read_head(response), model)
            async for line in byte_lines(response.content.iter_any(), MAX_CONTROL_ANSWER_BYTES):
                try:
                    progress = json.loads(line) if line else {}
                    if not isinstance(progress, dict):
                        raise ValueError("not an object")
                except (ValueError, RecursionError):
                    raise UpstreamProtocolError(
                        "the backend sent malformed pull progress") from None
                if "error" in progress:
                    why = clean(progress["error"])
                    raise BackendUnavailable(f"pulling {model!r} failed: {why}")
                if progress.get("status") == "success":
                    return
        raise BackendUnavailable(f"pulling {model!r} ended before it succeeded")

    async def is_reachable(self) -> bool:
        """Does an Ollama server answer at the configured URL? (backend auto-selection)"""
        try:
            status, _ = await self._fetch("/api/version", self._settings.health_timeout)
        except (*HTTP_FAILURES, AgentLoopError):
            return False
        return status == 200

    async def check_health(self, model: str) -> BackendHealth:
        timeout = self._settings.health_timeout
        try:
            status, content = await self._fetch("/api/tags", timeout)
        except HTTP_FAILURES as exc:
            return BackendHealth(False, f"Ollama unreachable ({type(exc).__name__})")
        except AgentLoopError as exc:
            return BackendHealth(False, exc.message)
        if status != 200:
            return BackendHealth(False, f"Ollama answered /api/tags with {status}")
        try:
            names = await _parsed(content, _tag_names)
        except MALFORMED:
            return BackendHealth(False, "Ollama sent a malformed model list")
        if not _model_listed(model, names):
            return BackendHealth(False, f"model {model!r} is not pulled")
        return BackendHealth(True, loaded=await self._loaded_models(timeout),
                             served=tuple(sorted(names)))

    async def _loaded_models(self, timeout: float) -> tuple[ModelInfo, ...]:
        """What /api/ps shows (the memory gauges read it); empty when it does not answer."""
        try:
            status, content = await self._fetch("/api/ps", timeout)
            running = (await _parsed(content, _models)) if status == 200 else []
            return tuple(_model_info(m, m) for m in running)
        except (*HTTP_FAILURES, AgentLoopError, *MALFORMED):
            return ()

    async def list_models(self) -> list[ModelInfo]:
        try:
            tags = await self._fetch("/api/tags")
            running = await self._fetch("/api/ps")
        except HTTP_FAILURES as exc:
            raise transport_error(exc) from None
        for status, content in (tags, running):
            if status != 200:
                raise http_error(status, content, "")
        try:
            loaded = {m["name"]: m for m in await _parsed(running[1], _models)}
            tagged = await _parsed(tags[1], _models)
            infos = [_model_info(m, loaded.get(m["name"])) for m in tagged]
        except MALFORMED:
            raise UpstreamProtocolError("the backend sent a malformed model list") from None
        turns = asyncio.Semaphore(_SHOW_CONCURRENCY)
        facts = await asyncio.gather(*(self._embedding_fact(m, turns) for m in tagged))
        return [dataclasses.replace(info, embeds=embeds, embedding_dimensions=dimensions)
                for info, (embeds, dimensions) in zip(infos, facts, strict=True)]

    async def _embedding_fact(self, tag: Mapping[str, Any],
                              turns: asyncio.Semaphore) -> tuple[bool, int]:
        """Does the model embed (its /api/show capabilities) and how long are its vectors
        (`<architecture>.embedding_length`)? (False, 0) when Ollama does not say."""
        key = (str(tag.get("name", "")), str(tag.get("digest", "")))
        known = self._embedding_facts.get(key)
        if known is not None:
            return known
        try:
            async with turns:
                status, content = await self._fetch("/api/show", body={"model": key[0]})
            shown = (await _parsed(content, json.loads)) if status == 200 else {}
            embeds = "embedding" in (shown.get("capabilities") or ())
            info = shown.get("model_info") or {}
            length = info.get(f"{info.get('general.architecture', '')}.embedding_length")
            fact = (embeds, bounds.count(length, bounds.MAX_EMBEDDING_DIMENSIONS)
                    if embeds else 0)
        except (*HTTP_FAILURES, AgentLoopError, *MALFORMED):
            return (False, 0)
        self._embedding_facts[key] = fact
        return fact


def build_request_body(request: GenerationRequest, keep_alive: str | int) -> tuple[str, dict]:
    """The Ollama path and JSON body for a generation."""
    opts = request.options
    options: dict[str, Any] = {
        "temperature": opts.temperature,
        "top_p": opts.top_p,
        "top_k": opts.top_k,
        "num_predict": opts.max_tokens,
        "repeat_penalty": opts.repeat_penalty,
        "num_ctx": opts.num_ctx,
    }
    if opts.seed is not None:
        options["seed"] = opts.seed
    if opts.stop:
        options["stop"] = list(opts.stop)
    body: dict[str, Any] = {
        "model": request.model,
        "stream": True,
        "options": options,
        "keep_alive": keep_alive,
    }
    if request.format.kind is OutputFormat.JSON:
        body["format"] = "json"
    elif request.format.kind is OutputFormat.JSON_SCHEMA:
        body["format"] = request.format.json_schema
    if request.is_chat:
        messages = [] if not request.system else [{"role": "system", "content": request.system}]
        names = call_names(request.messages)
        for message in request.messages:
            item: dict[str, Any] = {"role": str(message.role), "content": message.content}
            if message.images:
                item["images"] = [base64.b64encode(image).decode() for image in message.images]
            if message.tool_calls:
                item["tool_calls"] = [{"function": {
                    "name": call.name, "arguments": json.loads(call.arguments_json)}}
                    for call in message.tool_calls]
            if message.tool_call_id in names:  # Ollama matches a result to its call by name
                item["tool_name"] = names[message.tool_call_id]
            messages.append(item)
        body["messages"] = messages
        if request.forces_tool_call:  # Ollama's chat has no tool_choice: it cannot be held
            raise InvalidArgument([("tool_choice.mode", "Ollama cannot be made to call a "
                                                        "tool: use MODE_AUTO or MODE_NONE")])
        if tools := offered_tools(request):
            body["tools"] = tool_definitions_json(tools)
        return "/api/chat", body
    body["prompt"] = request.prompt
    if request.system:
        body["system"] = request.system
    return "/api/generate", body


async def parse_stream(
    lines: AsyncIterator[bytes], request: GenerationRequest, *, started: float | None = None
) -> AsyncIterator[StreamItem]:
    """Turn Ollama's NDJSON lines into deltas and one final `GenerationEnd`.

    Ollama is held to the request: past num_predict (max_tokens) chunks with text, past
    max_tokens + EVENT_SLACK lines, or past the answer's characters (bounds.answer_chars),
    the answer ends with LENGTH and the caller leaves the response (its connection dropped,
    which stops Ollama). `started` (time.monotonic()) is when the request went out: no
    duration Ollama reports is believed beyond the call's own."""
    started = time.monotonic() if started is None else started
    delta_key = "message" if request.is_chat else "response"
    max_tokens = request.options.max_tokens
    deltas_left, chars_left = max_tokens, bounds.answer_chars(max_tokens)
    lines_left = max_tokens + EVENT_SLACK
    calls: list[ToolCall] = []
    async for line in lines:
        lines_left -= 1
        if lines_left < 0:
            yield _cut(request)
            return
        if not line.strip():
            continue
        try:
            chunk = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: a line nested too deep
            raise UpstreamProtocolError("the backend sent a malformed stream") from None
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError("the backend sent a malformed stream")
        if "error" in chunk:
            raise BackendStreamFailed(
                f"the backend failed mid-stream: {clean(chunk['error'])}",
                metadata={"model": request.model},
            )
        piece = chunk.get(delta_key)
        text = piece.get("content", "") if isinstance(piece, dict) else piece
        if text:
            if not isinstance(text, str):
                raise UpstreamProtocolError("the backend sent a malformed stream")
            deltas_left -= 1
            if deltas_left < 0:
                yield _cut(request)
                return
            if len(text) >= chars_left:
                yield text[:chars_left]
                yield _cut(request)
                return
            chars_left -= len(text)
            yield text
        if isinstance(piece, dict) and piece.get("tool_calls") is not None:
            for call in _tool_calls(piece["tool_calls"], len(calls), request):
                chars_left -= len(call.arguments_json)
                if chars_left < 0:
                    raise UpstreamProtocolError("the backend sent tool calls beyond any size")
                # Ollama sends each call whole: one delta per call.
                yield ToolCallDelta(len(calls), call.id, call.name, call.arguments_json)
                calls.append(call)
        if chunk.get("done"):
            # Read the body's end first: a response read to its end returns its connection
            # to the pool, one closed early costs a new connection on the next request.
            await read_trailer(lines)
            end = _end_of(chunk, request, time.monotonic() - started)
            if calls:
                end = dataclasses.replace(end, finish_reason=FinishReason.TOOL_CALLS,
                                          tool_calls=tuple(calls))
            yield end
            return
    raise BackendStreamFailed(
        "the backend closed the stream before its final chunk", metadata={"model": request.model}
    )


def _tool_calls(raw: object, made: int, request: GenerationRequest) -> tuple[ToolCall, ...]:
    """A chunk's `message.tool_calls` ([{"id"?, "function": {"name", "arguments"}}]),
    checked against the tools the request offered; ids made up where Ollama gives none."""
    if not isinstance(raw, list) or made + len(raw) > MAX_CALLS:
        raise UpstreamProtocolError("the backend sent malformed tool calls")
    calls = []
    for item in raw:
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UpstreamProtocolError("the backend sent malformed tool calls")
        call_id = item.get("id")
        if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_CALL_ID_CHARS:
            call_id = new_call_id()
        calls.append(ToolCall(call_id, function["name"],
                              arguments_text(function.get("arguments", {}))))
    return check_calls(calls, request)


def _end_of(chunk: Mapping[str, Any], request: GenerationRequest,
            wall: float) -> GenerationEnd:
    """The final chunk's report: counts bounded by what the request can have cost,
    nanosecond durations by the call's own time (`wall` seconds)."""
    def seconds(key: str) -> float | None:
        return bounds.seconds(chunk.get(key), _NS, wall)

    reason = chunk.get("done_reason", "stop")
    model = chunk.get("model")
    return GenerationEnd(
        finish_reason=_DONE_REASONS.get(reason, FinishReason.STOP) if isinstance(reason, str)
        else FinishReason.STOP,
        usage=bounds.usage(request, chunk.get("prompt_eval_count"), chunk.get("eval_count")),
        timings=Timings(
            total=seconds("total_duration"),
            load=seconds("load_duration"),
            prompt_eval=seconds("prompt_eval_duration"),
            eval=seconds("eval_duration"),
        ),
        model=model if isinstance(model, str) and model and len(model) <= _MAX_NAME_CHARS
        else request.model,
    )


def _cut(request: GenerationRequest) -> GenerationEnd:
    """The end of an answer the gateway cut at its length bound (Ollama sent more than
    num_predict): LENGTH, and no counts or durations (Ollama's final chunk never came)."""
    return GenerationEnd(finish_reason=FinishReason.LENGTH, usage=Usage(), timings=Timings(),
                         model=request.model)


def http_error(status: int, body: bytes, model: str) -> AgentLoopError:
    """Map an Ollama error status to the design's error table."""
    message = _error_message(body)
    meta = {"model": model, "backend_status": str(status)} if model else {
        "backend_status": str(status)}
    if status == 404:
        return ModelNotFound(f"model {model!r} not found on the backend", metadata=meta)
    if status == 400:
        return BackendRejected(f"the backend rejected the request: {message}", metadata=meta)
    if status == 503:
        return retryable(
            ResourceExhausted("the backend is busy; try again", retry_after=1.0, metadata=meta))
    if status == 499:
        return Cancelled("the backend cancelled the request", metadata=meta)
    return BackendUnavailable(f"the backend failed ({status}): {message}", metadata=meta)


def embed_error(status: int, body: bytes, request: EmbeddingRequest) -> AgentLoopError:
    """Ollama's refusal of an input over the context (truncate off) names no input: the
    field is the text when there is one, else `texts`."""
    message = _error_message(body)
    if status == 400 and "context length" in message:
        field = "texts[0]" if len(request.texts) == 1 else "texts"
        return InvalidArgument([(field, "longer than the model's context (set truncate to "
                                        "cut it); Ollama does not say which text")
                                if field == "texts" else
                                (field, "longer than the model's context (set truncate to "
                                        "cut it)")])
    return http_error(status, body, request.model)


def parse_embeddings(content: bytes, request: EmbeddingRequest) -> EmbeddingResult:
    """/api/embed's answer: `embeddings` (one list of numbers per input) and
    `prompt_eval_count`."""
    try:
        answer = json.loads(content)
        vectors = tuple(tuple(map(float, vector)) for vector in answer["embeddings"])
        if not all(map(bounds.finite, vectors)):
            raise ValueError("numbers beyond a float's range")
        tokens = bounds.count(answer.get("prompt_eval_count"),
                              bounds.texts_tokens(request.texts))
    except MALFORMED:
        raise UpstreamProtocolError("the backend sent malformed embeddings") from None
    if len(vectors) != len(request.texts) or len({len(v) for v in vectors}) != 1:
        raise UpstreamProtocolError("the backend sent another number or shape of embeddings")
    if request.dimensions is not None and len(vectors[0]) != request.dimensions:
        raise InvalidArgument([("dimensions", f"the model's vectors have {len(vectors[0])} "
                                              "dimensions; ask for fewer")])
    model = answer.get("model")
    return EmbeddingResult(vectors=vectors, input_tokens=tokens,
                           model=model if isinstance(model, str) and model
                           and len(model) <= _MAX_NAME_CHARS else request.model)


def _error_message(body: bytes) -> str:
    try:
        return clean(json.loads(body).get("error", ""))
    except (ValueError, AttributeError, RecursionError):
        return "no details"


def _keep_alive_value(text: str) -> str | int:
    """Ollama takes a duration string or a number of seconds."""
    stripped = text.strip()
    return int(stripped) if stripped.lstrip("-").isdigit() else stripped


def _model_listed(model: str, names: set[str]) -> bool:
    return model in names or (":" not in model and f"{model}:latest" in names)


def _timestamp(text: object) -> float | None:
    if not text or not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError):
        return None


async def _parsed(content: bytes, parse: Callable[[bytes], Any]) -> Any:
    """An answer parsed, on a thread when it is large (raises what MALFORMED names)."""
    if len(content) > PARSE_OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse, content)
    return parse(content)


def _models(content: bytes) -> list[Mapping[str, Any]]:
    """The `models` of /api/tags or /api/ps: objects, each with a name."""
    models = json.loads(content).get("models", [])
    if not isinstance(models, list) or not all(
            isinstance(m, dict) and isinstance(m.get("name"), str) for m in models):
        raise ValueError("models: a list of objects with a name")
    return models


def _tag_names(content: bytes) -> set[str]:
    return {m["name"] for m in _models(content)}


def _model_info(tag: Mapping[str, Any], running: Mapping[str, Any] | None) -> ModelInfo:
    details = tag.get("details") or {}
    return ModelInfo(
        name=tag["name"],
        size_bytes=bounds.count(tag.get("size"), bounds.MAX_REPORTED_BYTES),
        loaded=running is not None,
        family=str(details.get("family", "")),
        parameter_size=str(details.get("parameter_size", "")),
        quantization_level=str(details.get("quantization_level", "")),
        modified_at=_timestamp(tag.get("modified_at")),
        expires_at=_timestamp(running.get("expires_at")) if running else None,
        size_vram_bytes=bounds.count(running.get("size_vram"), bounds.MAX_REPORTED_BYTES)
        if running else 0,
    )
