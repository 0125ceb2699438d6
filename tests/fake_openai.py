"""A scriptable fake OpenAI-compatible server: a real aiohttp server on loopback.

It speaks the subset of the OpenAI HTTP API in `openai-contract.md` (`/v1/models`,
`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, Server-Sent Events streams
ending in `data: [DONE]`), in either dialect an upstream may have: JSON Schemas as
`json_schema` (OpenAI, vLLM) or as `json_object` + `schema` (llama.cpp's servers), usage in
streams or not. Like OpenAI it refuses body keys it does not know (400), so a test sees
what the backend sends. Each generation can be scripted (`Script`) for the faults a real
server will not produce on demand: statuses with Retry-After, a slow first token, an error
object mid-stream, resets, hangs, malformed events, truncated streams; it records the
clients that went away.

    async with FakeOpenAI() as fake:
        fake.enqueue(Script(status=429, retry_after="3"))
        ...  # point the code under test at fake.url (the base, with /v1)

Run standalone (other processes read the URL from the single stdout line):

    python tests/fake_openai.py --port 0 --tokens 100 --token-delay 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import ssl
import struct
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from fake_ollama import (
    DEFAULT_TOKENS,
    YIELD_EVERY,
    ClientGone,
    _abort,
    _client_gone,
    _dumps,
    _flush,
    _json_str,
    _sleep_until,
    _until_gone,
    raw_answers,
)

__all__ = ["DEFAULT_MODEL", "FakeOpenAI", "KVCache", "Script", "main"]

DEFAULT_MODEL = "gemma-3-270m"
#: Keys every generation may carry (OpenAI's own); anything else must be allowed in `extras`.
CHAT_KEYS = frozenset({
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens",
    "max_completion_tokens", "seed", "stop", "response_format", "n", "user", "tools",
    "tool_choice",
})
COMPLETION_KEYS = (CHAT_KEYS - {"messages", "response_format", "tools", "tool_choice"}) | {
    "prompt"}
EMBEDDING_KEYS = frozenset({"model", "input", "dimensions", "encoding_format", "user"})
MID_STREAM_ERROR = {"message": "the engine failed", "type": "server_error", "code": 500}
MALFORMED_EVENT = b'data: {"choices": this is not JSON\n\n'
EMBEDDING_DIMENSIONS = 8


@dataclass
class Script:
    """How the fake answers one generation (every field optional).

    The `*_after` faults send that many tokens first; set at most one of them."""

    tokens: list[str] | None = None  # None: DEFAULT_TOKENS
    token_delay: float = 0.0  # seconds between tokens, on a fixed schedule
    first_token_delay: float = 0.0  # before the headers and the first token
    status: int | None = None  # answer this status with an error object
    error: str = "scripted failure"  # its message
    retry_after: str | None = None  # the Retry-After header sent with `status`
    error_after: int | None = None  # N tokens, then an error object in the stream
    reset_after: int | None = None  # N tokens, then abort the connection (0: before headers)
    hang_before_headers: bool = False  # never answer; wait until the client goes away
    hang_after: int | None = None  # N tokens, then hang until the client goes away
    malformed_after: int | None = None  # N tokens, then an event that is not JSON, then end
    truncate: bool = False  # end the stream without its finish chunk and [DONE]
    finish_reason: str | None = None  # override the finish reason
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    # A hostile upstream's answers:
    overrun: bool = False  # stream every token, whatever max_tokens asks
    usage: dict[str, Any] | None = None  # the usage object sent instead of the fake's count
    timings: dict[str, Any] | None = None  # llama.cpp's `timings`, on the finish chunk
    before_finish: bytes = b""  # raw bytes written before the finish chunk
    after_done: bytes = b""  # raw bytes written after `data: [DONE]`
    hang_after_done: bool = False  # then keep the response open until the client goes away
    # Function calling: after the tokens, these calls ({"name", "arguments": JSON text,
    # "id"?}), streamed as `delta.tool_calls` pieces (the id and name, then the arguments in
    # `argument_pieces` pieces); finish_reason "tool_calls".
    tool_calls: list[dict[str, Any]] | None = None
    argument_pieces: int = 3

    def token_list(self) -> list[str]:
        return list(DEFAULT_TOKENS if self.tokens is None else self.tokens)


def _error(status: int, message: str, kind: str = "invalid_request_error",
           headers: Mapping[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.Response(status=status, body=_dumps(body), content_type="application/json",
                        headers=headers)


def _json(obj: Any) -> web.Response:
    return web.Response(body=_dumps(obj), content_type="application/json")


def _prompt_tokens(body: Mapping[str, Any]) -> int:
    """A deterministic prompt token count: whitespace words of the text the model reads."""
    return max(1, len(_prompt_words(body)))


def _prompt_words(body: Mapping[str, Any]) -> list[str]:
    """The prompt's tokens, as the fake counts them: its words, in order."""
    texts: list[str] = [body["prompt"]] if isinstance(body.get("prompt"), str) else []
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [part.get("text", "") for part in content if isinstance(part, Mapping)]
    return [word for text in texts for word in text.split()]


class KVCache:
    """An engine's prefix cache, modelled: an LRU of `capacity` blocks of `block_tokens`
    prompt tokens (words), each block's hash chained on the blocks before it and seeded
    with the model and the request's `cache_salt` (vLLM's scheme). A prompt's cached part
    is its longest run of leading blocks held; its prefill takes `prefill_per_token`
    seconds per token not cached before the first token. Observed: `prompt_tokens` and
    `cached_tokens` served, `hits` (calls with any cached token)."""

    def __init__(self, capacity: int, block_tokens: int = 16,
                 prefill_per_token: float = 0.0) -> None:
        self.capacity = capacity
        self.block_tokens = block_tokens
        self.prefill_per_token = prefill_per_token
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.hits = 0
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        """The engine restarted: nothing cached."""
        self._blocks.clear()

    def serve(self, body: Mapping[str, Any]) -> tuple[int, int]:
        """The prompt's (tokens, cached tokens); its blocks are cached from now on."""
        words = _prompt_words(body)
        seed = f"{body.get('model')}\0{body.get('cache_salt', '')}".encode()
        digest = hashlib.blake2b(seed, digest_size=16).digest()
        hashes = []
        for start in range(0, len(words) - self.block_tokens + 1, self.block_tokens):
            block = " ".join(words[start:start + self.block_tokens]).encode()
            digest = hashlib.blake2b(block, digest_size=16, key=digest).digest()
            hashes.append(digest)
        held = 0
        while held < len(hashes) and hashes[held] in self._blocks:
            held += 1
        for digest in reversed(hashes):  # the head most recent: a prefix loses its tail first
            self._blocks[digest] = None
            self._blocks.move_to_end(digest)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
        tokens, cached = max(1, len(words)), held * self.block_tokens
        self.prompt_tokens += tokens
        self.cached_tokens += cached
        self.hits += cached > 0
        return tokens, cached


def embedding_of(text: str, dimensions: int) -> list[float]:
    """A deterministic vector (not of length 1: the gateway normalizes when asked)."""
    digest = hashlib.sha256(text.encode()).digest() * (1 + dimensions * 2 // 32)
    values = struct.unpack(f"<{dimensions}h", digest[:dimensions * 2])
    return [3.0 * value / 32768 for value in values]


class FakeOpenAI:
    """The fake server. Settable: `models`, `default_script`, `schema_style`
    ("json_schema" or "json_object"), `stream_usage` (streams end with a usage chunk when
    asked), `completions` (serves /v1/completions), `extras` (extra body keys accepted, e.g.
    {"top_k", "repeat_penalty"}), `api_key` (required as a bearer token when set),
    `matryoshka` (honours `dimensions`; without it `dimensions` is ignored, as
    llama-cpp-python does), `crlf` (CRLF line ends, as sse-starlette writes them),
    `per_token` (embeddings as one vector per word, as a model without pooling gives),
    `stop_limit` (the most stop strings taken, 4 as at OpenAI; 0: no limit), `tool_pairing`
    (a `tool` turn must name, in `tool_call_id`, a call of an earlier assistant turn's
    `tool_calls`, as OpenAI requires; off: any `tool_call_id` will do, as llama-cpp-python),
    `kv_cache` (a `KVCache`: prompts' prefixes cached, their prefill timed and their cached
    tokens reported in usage; `restart` empties it).

    A hostile upstream: `answers` {path: RawAnswer} answers those paths (e.g. "/v1/models")
    with raw bytes and the status `raw_status`.

    Observed: `requests` [(path, body)] for every POST, `generation_requests` [body] and
    `generation_headers` [headers], `headers` of the last request, `disconnects`
    (generations the client abandoned), `active_streams`, `completed` (generations that
    sent [DONE]), `tokens_sent` (token events written, every generation), `raw_chunks_sent`
    (chunks of `answers` written)."""

    def __init__(self, models: Iterable[str] | None = None,
                 default_script: Script | None = None) -> None:
        self.models: list[str] = list(models) if models is not None else [DEFAULT_MODEL]
        self.default_script = default_script or Script()
        self.schema_style = "json_schema"
        self.stream_usage = True
        self.completions = True
        self.extras: set[str] = set()
        self.api_key = ""
        self.matryoshka = True
        self.crlf = False
        self.per_token = False
        self.answers: dict[str, bytes | Iterable[bytes]] = {}
        self.raw_status = 200
        self.raw_chunks_sent = 0
        self.tokens_sent = 0
        self.stop_limit = 4
        self.tool_pairing = True
        self.kv_cache: KVCache | None = None
        self.requests: list[tuple[str, Any]] = []
        self.generation_requests: list[dict[str, Any]] = []
        self.generation_headers: list[dict[str, str]] = []
        self.headers: Mapping[str, str] = {}
        self.disconnects = 0
        self.active_streams = 0
        self.completed = 0
        self._queue: deque[Script] = deque()
        self._host = "127.0.0.1"
        self._port = 0
        self._tls: ssl.SSLContext | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    tls: ssl.SSLContext | None = None) -> None:
        """Listen on host:port (0 picks a free port), over TLS with a server context."""
        if self._runner is not None:
            raise RuntimeError("FakeOpenAI is already running")
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[raw_answers(self)])
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_post("/v1/embeddings", self._embeddings)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024,
                           ssl_context=tls)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._site = runner, site
        self._host, self._port, self._tls = host, runner.addresses[0][1], tls

    async def stop(self) -> None:
        """Close the listener and abort every open connection, like a crashed server."""
        runner, site = self._runner, self._site
        if runner is None or site is None:
            return
        self._runner = self._site = None
        await site.stop()
        if runner.server is not None:
            for handler in runner.server.connections:
                if handler.transport is not None:
                    handler.transport.abort()
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        await runner.cleanup()

    async def restart(self) -> None:
        """Stop, then listen again on the same port: an endpoint that went away and is back
        (its prefix cache empty)."""
        await self.stop()
        if self.kv_cache is not None:
            self.kv_cache.clear()
        await self.start(self._host, self._port, self._tls)

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The API base, with /v1."""
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{self._host}:{self._port}/v1"

    def enqueue(self, *scripts: Script) -> None:
        """Scripts for the next generations, first in first out."""
        self._queue.extend(scripts)

    # ----------------------------------------------------------------- requests

    def _refused_key(self, request: web.Request) -> web.Response | None:
        self.headers = request.headers
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided")
        return None

    async def _read(self, request: web.Request, keys: frozenset[str]
                    ) -> tuple[dict[str, Any], web.Response | None]:
        """The JSON body, recorded; an error answer for a bad body or an unknown key."""
        refused = self._refused_key(request)
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return {}, _error(400, "the body is not JSON")
        self.requests.append((request.path, body))
        if refused is not None:
            return body, refused
        if not isinstance(body, dict):
            return {}, _error(400, "the body is not an object")
        unknown = sorted(set(body) - keys - self.extras)
        if unknown:
            return body, _error(400, f"Unrecognized request argument supplied: {unknown[0]}")
        if body.get("model") not in self.models:
            return body, _error(404, f"The model `{body.get('model')}` does not exist",
                                "NotFoundError")
        return body, None

    async def _models(self, request: web.Request) -> web.Response:
        refused = self._refused_key(request)
        if refused is not None:
            return refused
        return _json({"object": "list", "data": [
            {"id": name, "object": "model", "created": 1750000000, "owned_by": "fake"}
            for name in self.models]})

    async def _embeddings(self, request: web.Request) -> web.Response:
        body, error = await self._read(request, EMBEDDING_KEYS)
        if error is not None:
            return error
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return _error(400, "input must be a string or a list of strings")
        dimensions = body.get("dimensions") if self.matryoshka else None
        size = dimensions if isinstance(dimensions, int) else EMBEDDING_DIMENSIONS
        data = [{"object": "embedding", "index": i, "embedding": [
                    embedding_of(word, size) for word in t.split()] if self.per_token
                 else embedding_of(t, size)} for i, t in enumerate(texts)]
        tokens = sum(len(t.split()) for t in texts)
        return _json({"object": "list", "data": data[::-1], "model": body["model"],
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, chat=True)

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        if not self.completions:
            return web.Response(status=404, text='{"detail":"Not Found"}')
        return await self._generation(request, chat=False)

    def _format_error(self, body: Mapping[str, Any]) -> web.Response | None:
        """Refuse a response_format this dialect does not take."""
        form = body.get("response_format")
        if form is None:
            return None
        kind = form.get("type") if isinstance(form, dict) else None
        if self.schema_style == "json_object":
            if kind == "json_object" and set(form) <= {"type", "schema"}:
                return None
            return _error(422, "response_format: input should be 'text' or 'json_object'")
        if kind == "json_object" and set(form) == {"type"}:
            return None
        if kind == "json_schema" and isinstance(form.get("json_schema"), dict) \
                and "schema" in form["json_schema"] and set(form) == {"type", "json_schema"}:
            return None
        return _error(400, "Invalid parameter: response_format")

    def _stop_error(self, body: Mapping[str, Any]) -> web.Response | None:
        stop = body.get("stop")
        if self.stop_limit and isinstance(stop, list) and len(stop) > self.stop_limit:
            return _error(400, f"'stop' takes at most {self.stop_limit} sequences")
        return None

    def _tool_turn_error(self, body: Mapping[str, Any]) -> web.Response | None:
        """Refuse a tool turn without a `tool_call_id` (or, with `tool_pairing`, one that
        answers no call of an earlier assistant turn)."""
        calls: set[str] = set()
        for message in body.get("messages") or ():
            if not isinstance(message, Mapping):
                continue
            calls.update(call["id"] for call in message.get("tool_calls") or ()
                         if isinstance(call, Mapping) and isinstance(call.get("id"), str))
            if message.get("role") != "tool":
                continue
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or (self.tool_pairing and call_id not in calls):
                return _error(400, "messages with role 'tool' must be a response to a "
                                   "preceding message with 'tool_calls'")
        return None

    async def _generation(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body, error = await self._read(request, CHAT_KEYS if chat else COMPLETION_KEYS)
        if error is None:
            error = self._stop_error(body)
        if error is None and chat:
            error = self._format_error(body) or self._tool_turn_error(body) \
                or _tools_error(body)
        if error is not None:
            return error
        self.generation_requests.append(body)
        self.generation_headers.append(dict(request.headers))
        script = self._queue.popleft() if self._queue else self.default_script
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.active_streams += 1
        try:
            return await self._run(request, body, script, chat)
        except (ClientGone, ConnectionError):
            self.disconnects += 1
            return web.Response()
        finally:
            self.active_streams -= 1
            if task is not None:
                self._tasks.discard(task)

    async def _run(self, request: web.Request, body: dict[str, Any], script: Script,
                   chat: bool) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        if script.hang_before_headers:
            await _until_gone(request)
            raise ClientGone
        if script.reset_after == 0:
            _abort(request)
            return web.Response()
        if script.status is not None:
            headers = {"Retry-After": script.retry_after} if script.retry_after else None
            return _error(script.status, script.error, "server_error", headers)
        prefill, cached = 0.0, script.cached_tokens
        if self.kv_cache is not None:
            tokens_in, held = self.kv_cache.serve(body)
            prefill = (tokens_in - held) * self.kv_cache.prefill_per_token
            cached = held if cached is None else cached
        if await _sleep_until(request, loop.time() + script.first_token_delay + prefill):
            raise ClientGone
        tokens, reason = script.token_list(), "stop"
        limit = body.get("max_tokens")
        if isinstance(limit, int) and 0 < limit <= len(tokens) and not script.overrun:
            tokens, reason = tokens[:limit], "length"
        calls = script.tool_calls if chat else None
        if calls:
            reason = "tool_calls"
        reason = script.finish_reason or reason
        fault, cut = None, len(tokens)
        for name in ("reset_after", "hang_after", "error_after", "malformed_after"):
            if getattr(script, name) is not None:
                fault, cut = name, min(getattr(script, name), len(tokens))
                break
        sent = tokens[:cut]
        usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": len(sent),
                 "total_tokens": _prompt_tokens(body) + len(sent)}
        if cached is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        if script.usage is not None:
            usage = script.usage
        if body.get("stream") is not True:
            return self._whole(body, "".join(sent), reason, usage, chat, calls)

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        end = b"\r\n\r\n" if self.crlf else b"\n\n"
        await self._stream_tokens(request, resp, body["model"], sent, script.token_delay,
                                  chat, end)
        if fault == "reset_after":
            await _flush(request)
            _abort(request)
            return resp
        if fault == "hang_after":
            await _until_gone(request)
            raise ClientGone
        if fault == "error_after":
            await resp.write(b"data: " + _dumps({"error": MID_STREAM_ERROR}) + end)
            return resp
        if fault == "malformed_after":
            await resp.write(MALFORMED_EVENT)
            return resp
        if script.truncate:
            return resp
        if script.before_finish:
            await resp.write(script.before_finish)
        for index, call in enumerate(calls or ()):
            for piece in _call_pieces(index, call, script.argument_pieces):
                await resp.write(b"data: " + _dumps({
                    "id": "cmpl-fake", "object": "chat.completion.chunk",
                    "created": int(time.time()), "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": None,
                                 "delta": {"tool_calls": [piece]}}]}) + end)
        last = {"id": "cmpl-fake", "object": "chat.completion.chunk" if chat else
                "text_completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "finish_reason": reason,
                             **({"delta": {}} if chat else {"text": ""})}]}
        if script.timings is not None:
            last["timings"] = script.timings
        await resp.write(b"data: " + _dumps(last) + end)
        options = body.get("stream_options")
        if self.stream_usage and isinstance(options, dict) and options.get("include_usage"):
            await resp.write(b"data: " + _dumps({**last, "choices": [], "usage": usage}) + end)
        await resp.write(b"data: [DONE]" + end)
        self.completed += 1
        if script.after_done:
            await resp.write(script.after_done)
        if script.hang_after_done:
            await _until_gone(request)
            raise ClientGone
        return resp

    async def _stream_tokens(self, request: web.Request, resp: web.StreamResponse, model: str,
                             tokens: list[str], delay: float, chat: bool, end: bytes) -> None:
        """One event per token, paced on a fixed schedule when delay > 0."""
        loop = asyncio.get_running_loop()
        head = (b'data: {"id":"cmpl-fake","object":"' +
                (b'chat.completion.chunk' if chat else b'text_completion') +
                b'","created":' + str(int(time.time())).encode() + b',"model":' +
                _json_str(model) + b',"choices":[{"index":0,')
        if chat:
            await resp.write(head + b'"delta":{"role":"assistant","content":""},'
                             b'"finish_reason":null}]}' + end)
            middle, tail = b'"delta":{"content":', b'},"finish_reason":null}]}' + end
        else:
            middle, tail = b'"text":', b',"finish_reason":null}]}' + end
        start = loop.time()
        for index, token in enumerate(tokens):
            if delay > 0:
                if await _sleep_until(request, start + index * delay):
                    raise ClientGone
            elif index and index % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if _client_gone(request):
                raise ClientGone
            await resp.write(head + middle + _json_str(token) + tail)
            self.tokens_sent += 1

    def _whole(self, body: Mapping[str, Any], text: str, reason: str, usage: dict[str, Any],
               chat: bool, calls: list[dict[str, Any]] | None = None) -> web.Response:
        """`"stream": false`: one JSON object."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            if calls:
                choice["message"]["tool_calls"] = [
                    {"id": call.get("id", f"call_{index}"), "type": "function",
                     "function": {"name": call["name"], "arguments": call["arguments"]}}
                    for index, call in enumerate(calls)]
        else:
            choice["text"] = text
        self.completed += 1
        return _json({"id": "cmpl-fake", "object": "chat.completion" if chat else
                      "text_completion", "created": int(time.time()), "model": body["model"],
                      "choices": [choice], "usage": usage})


def _call_pieces(index: int, call: Mapping[str, Any], pieces: int) -> list[dict[str, Any]]:
    """One scripted call as OpenAI streams it: the id and name first, then the arguments'
    text in `pieces` parts, each `{"index", ...}`."""
    arguments: str = call["arguments"]
    size = max(1, -(-len(arguments) // max(1, pieces)))
    first = {"index": index, "id": call.get("id", f"call_{index}"), "type": "function",
             "function": {"name": call["name"], "arguments": ""}}
    return [first, *({"index": index, "function": {"arguments": arguments[at:at + size]}}
                     for at in range(0, len(arguments), size))]


def _tools_error(body: Mapping[str, Any]) -> web.Response | None:
    """Refuse tools and a tool_choice out of OpenAI's shapes: tools [{"type": "function",
    "function": {"name", "description"?, "parameters"?}}]; tool_choice "auto", "none",
    "required" or {"type": "function", "function": {"name": a declared tool}}; assistant
    tool_calls with string arguments."""
    tools = body.get("tools")
    names: set[str] = set()
    if tools is not None:
        if not isinstance(tools, list) or not tools:
            return _error(400, "Invalid parameter: tools")
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if tool.get("type") != "function" or not isinstance(function, dict) \
                    or not isinstance(function.get("name"), str) \
                    or not isinstance(function.get("parameters", {}), dict):
                return _error(400, "Invalid parameter: tools")
            names.add(function["name"])
    choice = body.get("tool_choice")
    if choice is not None:
        if tools is None:
            return _error(400, "'tool_choice' is only allowed when 'tools' are specified")
        named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if choice not in ("auto", "none", "required") and named not in names:
            return _error(400, "Invalid parameter: tool_choice")
    for message in body.get("messages") or ():
        for call in (message.get("tool_calls") or ()) if isinstance(message, dict) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
                return _error(400, "Invalid parameter: messages.tool_calls")
    return None


# --------------------------------------------------------------------- command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python tests/fake_openai.py",
                                     description="Serve the fake OpenAI API until SIGTERM.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per answer")
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--kv-cache-blocks", type=int, default=0,
                        help="model a prefix cache of this many blocks (0: none)")
    parser.add_argument("--block-tokens", type=int, default=16)
    parser.add_argument("--prefill-per-token", type=float, default=0.0,
                        help="seconds of prefill per prompt token not cached")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    tokens = None if args.tokens is None else [
        DEFAULT_TOKENS[i % len(DEFAULT_TOKENS)] for i in range(max(0, args.tokens))]
    fake = FakeOpenAI(models=args.model or [DEFAULT_MODEL], default_script=Script(
        tokens=tokens, token_delay=args.token_delay, first_token_delay=args.first_token_delay))
    if args.kv_cache_blocks:
        fake.kv_cache = KVCache(args.kv_cache_blocks, args.block_tokens, args.prefill_per_token)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await fake.start(args.host, args.port)
    try:
        print(f"fake-openai listening on {fake.url}", flush=True)
        await stopping.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(_serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
