"""A scriptable fake Ollama: a real aiohttp server on loopback that speaks the HTTP contract.

Every test and benchmark of agentloop talks to this server instead of a real Ollama. It
follows `ollama-contract.md` closely enough for the official `ollama` client to parse it,
and each chat/generate request can be scripted (tokens, delays, status codes, mid-stream
error lines, resets, hangs, malformed lines, truncated streams) through `Script`.

    async with FakeOllama() as fake:
        fake.enqueue(Script(tokens=["Hi", " there"]), Script(status=503))
        ...  # point the code under test at fake.url

Run standalone (other processes read the URL from the single stdout line):

    python tests/fake_ollama.py --port 0 --tokens 100 --token-delay 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import inspect
import json
import math
import random
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from aiohttp import web

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TOKENS",
    "FakeOllama",
    "Script",
    "main",
    "normalize_model",
    "parse_keep_alive",
    "split_words",
    "wait_until",
]

DEFAULT_MODEL = "gemma3n:e2b"
#: The length of the fake's vectors (`<family>.embedding_length` in /api/show).
EMBEDDING_LENGTH = 768
#: Words an /api/embed input may have (the fake's "context length").
EMBED_CONTEXT = 2048
DEFAULT_TOKENS: tuple[str, ...] = (
    "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".",
)
FAKE_VERSION = "0.12.6"
DEFAULT_KEEP_ALIVE = 300.0  # seconds, Ollama's OLLAMA_KEEP_ALIVE default (5m)

NDJSON = "application/x-ndjson"
# Yield to the loop this often when streaming at full speed so one stream cannot starve others.
YIELD_EVERY = 64
# Client-gone polling period while hanging (the contract's "notice the client went away").
POLL = 0.01
# Sleeps shorter than this are not polled: the next write notices a vanished client anyway,
# and polling hundreds of paced benchmark streams would cost more CPU than the streams.
POLL_ABOVE = 0.05

DEFAULT_ERRORS: dict[int, str] = {
    400: "bad request",
    404: "not found",
    499: "request canceled",
    500: "an error was encountered while running the model",
    503: "server busy, please try again.  maximum pending requests exceeded",
}
MID_STREAM_ERROR = "an error was encountered while running the model: unexpected EOF"
MALFORMED_LINE = b'{"model": this line is not JSON\n'

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def split_words(text: str) -> list[str]:
    """Split text into word tokens that keep their leading spaces ("a b" -> ["a", " b"])."""
    return re.findall(r"\s*\S+|\s+", text)


@dataclass
class Script:
    """How the fake answers one /api/chat or /api/generate request (every field optional).

    The `*_after` faults send that many tokens first; set at most one of them. A `status`
    answers an error at once with {"error": error}.
    """

    tokens: list[str] | None = None  # None: response_text if set, else DEFAULT_TOKENS
    response_text: str | None = None  # convenience: split into word tokens keeping spaces
    token_delay: float = 0.0  # seconds between tokens, on a fixed (non-drifting) schedule
    first_token_delay: float = 0.0  # "prompt evaluation": before headers and the first token
    status: int | None = None  # answer this HTTP status with {"error": error}
    error: str | None = None  # message for status / error_after
    error_after: int | None = None  # N tokens, then an NDJSON {"error": ...} line, then end
    reset_after: int | None = None  # N tokens, then abort the connection (0: before headers)
    hang_before_headers: bool = False  # never answer; wait until the client goes away
    hang_after: int | None = None  # N tokens, then hang until the client goes away
    malformed_after: int | None = None  # N tokens, then a line that is not JSON, then end
    truncate_final: bool = False  # end the stream without the done:true chunk
    done_reason: str | None = None  # override the final chunk's done_reason
    # A hostile Ollama's answers:
    overrun: bool = False  # stream every token, whatever num_predict asks
    final_fields: dict[str, Any] | None = None  # set on the final chunk (counts, durations)
    before_final: bytes = b""  # raw bytes written before the final chunk
    after_done: bytes = b""  # raw bytes written after the final chunk
    hang_after_done: bool = False  # then keep the response open until the client goes away
    # Function calling (/api/chat): after the tokens, one chunk whose message carries these
    # calls, each {"name": ..., "arguments": {...}} (Ollama gives no ids); the request must
    # declare `tools` (else 400, as a model without tool support answers).
    tool_calls: list[dict[str, Any]] | None = None

    def token_list(self) -> list[str]:
        """The tokens this script streams (before num_predict is applied)."""
        if self.tokens is not None:
            return list(self.tokens)
        if self.response_text is not None:
            return split_words(self.response_text)
        return list(DEFAULT_TOKENS)


async def wait_until(
    predicate: Callable[[], object], timeout: float = 5.0, message: str | None = None
) -> None:
    """Poll a sync predicate every 5 ms until it is true; raise TimeoutError after timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            raise TimeoutError(
                f"condition not met within {timeout:g}s: {message or _describe(predicate)}"
            )
        await asyncio.sleep(0.005)


def _describe(predicate: Callable[[], object]) -> str:
    """The predicate's source line when available (lambdas), else its name."""
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return getattr(predicate, "__qualname__", repr(predicate))


def _dumps(obj: Any) -> bytes:
    """Compact JSON, as Ollama's Go encoder writes it."""
    return json.dumps(obj, separators=(",", ":")).encode()


@lru_cache(maxsize=8192)
def _json_str(text: str) -> bytes:
    """A token as a JSON string literal; cached because streams repeat the same tokens."""
    return json.dumps(text).encode()


#: A scripted raw answer for a path (`answers`): bytes, sent whole with a Content-Length, or
#: chunks, sent one by one without one (an endless iterator: until the client goes away).
RawAnswer = bytes | Iterable[bytes]


def raw_answers(owner: Any) -> Any:
    """A middleware answering the paths in `owner.answers` with their raw answer and the
    status `owner.raw_status`; counts the chunks it wrote (a bytes answer is one) in
    `owner.raw_chunks_sent`."""
    @web.middleware
    async def answer_raw(request: web.Request, handler: Any) -> web.StreamResponse:
        answer = owner.answers.get(request.path)
        if answer is None:
            return await handler(request)
        await request.read()
        if isinstance(answer, bytes):
            owner.raw_chunks_sent += 1
            return web.Response(status=owner.raw_status, body=answer,
                                content_type="application/json")
        resp = web.StreamResponse(status=owner.raw_status,
                                  headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for chunk in answer:
                if _client_gone(request):
                    break
                await resp.write(chunk)
                owner.raw_chunks_sent += 1
                await asyncio.sleep(0)
        return resp

    return answer_raw


def _rfc3339(moment: datetime | None = None) -> str:
    """RFC 3339 in UTC with a Z suffix, microsecond precision."""
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def normalize_model(name: str) -> str:
    """Ollama's model naming: a name without a tag means ":latest"."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def parse_keep_alive(value: Any) -> float:
    """keep_alive as seconds: a number, a Go duration string ("5m", "1h30m") or digits.

    0 unloads after the request; negative keeps the model loaded forever (math.inf).
    Raises ValueError on anything else, which the handlers answer with 400.
    """
    if value is None:
        return DEFAULT_KEEP_ALIVE
    if isinstance(value, bool):
        raise ValueError(f"invalid keep_alive {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        if re.fullmatch(r"\d+", body):
            seconds = sign * float(body)
        elif body and _DURATION_PART.sub("", body) == "":
            total = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(body))
            seconds = sign * total
        else:
            raise ValueError(f'time: invalid duration "{value}"')
    else:
        raise ValueError(f"invalid keep_alive {value!r}")
    return math.inf if seconds < 0 else seconds


def _prompt_words(kind: str, body: Mapping[str, Any]) -> int:
    """A deterministic prompt_eval_count: whitespace words of everything the model would read."""
    texts: list[str] = []
    if isinstance(body.get("system"), str):
        texts.append(body["system"])
    if kind == "generate":
        if isinstance(body.get("prompt"), str):
            texts.append(body["prompt"])
    else:
        for message in body.get("messages") or ():
            if isinstance(message, Mapping) and isinstance(message.get("content"), str):
                texts.append(message["content"])
    return max(1, sum(len(text.split()) for text in texts))


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _until_gone(request: web.BaseRequest) -> None:
    """Hang until the client closes its connection."""
    while not _client_gone(request):
        await asyncio.sleep(POLL)


async def _sleep_until(request: web.BaseRequest, deadline: float) -> bool:
    """Sleep until a loop-time deadline; True if the client went away meanwhile."""
    loop = asyncio.get_running_loop()
    remaining = deadline - loop.time()
    if remaining <= 0:
        return False
    if remaining <= POLL_ABOVE:
        await asyncio.sleep(remaining)
        return False
    while remaining > 0:
        if _client_gone(request):
            return True
        await asyncio.sleep(min(POLL, remaining))
        remaining = deadline - loop.time()
    return _client_gone(request)


class ClientGone(Exception):
    """Raised inside a generation when the client abandoned the response."""


class FakeOllama:
    """A fake Ollama HTTP server on loopback, scriptable per chat/generate request.

    Settable: `models` (known model names; pulls add to it), `default_script` (used when
    the queue is empty), `model_scripts` (a script for every request naming that model,
    before the queue: a model that always fails, say), `script_for` (a function of the
    request's body giving its script, or None for the usual choice: answers that depend on
    the conversation, for runs that interleave), `capabilities` (per model, default
    ["completion"]; a chat with `tools` on a model without "tools" gets 400 like gemma3n),
    `version`.

    Observed (read by tests): `requests` [(path, body)] for every POST, `generation_requests`
    [body] for chat/generate, `headers` of the last chat/generate request, `disconnects`
    (generations the client abandoned), `active_streams`, `completed` (generations that sent
    their final done chunk), `loaded` (model -> expiry, what /api/ps shows).

    Load requests (empty prompt / no messages) and rejected requests (404, 400) do not take
    a script from the queue: scripts belong to generations.

    `/api/embed` answers as Ollama does: one unit vector per input (a deterministic function
    of the text, `embedding_length` long, cut to `dimensions` and normalized again), with
    `prompt_eval_count` the inputs' whitespace words; an input over `embed_context` words is
    cut (`truncate`, the default) or refused with 400. `embed_requests` records the bodies;
    `embed_scripts` (a queue) scripts their faults: `status`, `first_token_delay`,
    `reset_after=0`, `hang_before_headers`.

    A hostile Ollama: `answers` {path: RawAnswer} answers those paths with raw bytes and the
    status `raw_status` (`raw_chunks_sent` counts the chunks written); `tokens_sent` counts
    the token chunks every generation wrote.
    """

    def __init__(
        self, models: Iterable[str] | None = None, default_script: Script | None = None
    ) -> None:
        self.models: list[str] = list(models) if models is not None else [DEFAULT_MODEL]
        self.default_script: Script = default_script or Script()
        self.model_scripts: dict[str, Script] = {}
        self.script_for: Callable[[dict[str, Any]], Script | None] | None = None
        self.capabilities: dict[str, list[str]] = {}
        self.version: str = FAKE_VERSION
        self.requests: list[tuple[str, Any]] = []
        self.generation_requests: list[dict[str, Any]] = []
        self.headers: Mapping[str, str] = {}
        self.disconnects = 0
        self.active_streams = 0
        #: Generations streamed at once at most (Ollama's OLLAMA_NUM_PARALLEL): more wait,
        #: unseen by the client, for a stream to end. None: no limit.
        self.max_streams: int | None = None
        #: The most generations that ever streamed at once.
        self.peak_streams = 0
        self._slots: asyncio.Semaphore | None = None
        self.completed = 0
        self.loaded: dict[str, float] = {}  # normalized model -> expiry (time.time(), inf)
        self.embedding_length = EMBEDDING_LENGTH
        self.embed_context = EMBED_CONTEXT
        self.embed_requests: list[dict[str, Any]] = []
        self.embed_scripts: deque[Script] = deque()
        self.answers: dict[str, RawAnswer] = {}
        self.raw_status = 200
        self.raw_chunks_sent = 0
        self.tokens_sent = 0
        self._queue: deque[Script] = deque()
        self._host = "127.0.0.1"
        self._port = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on host:port (0 picks a free port; `port` tells which)."""
        if self._runner is not None:
            raise RuntimeError("FakeOllama is already running")
        app = web.Application(client_max_size=64 * 1024 * 1024,  # base64 images are big
                              middlewares=[raw_answers(self)])
        app.router.add_get("/", self._root)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/show", self._show)
        app.router.add_post("/api/pull", self._pull)
        app.router.add_post("/api/generate", self._generate)
        app.router.add_post("/api/chat", self._chat)
        app.router.add_post("/api/embed", self._embed)
        # No access log (benchmarks), no signal handling (the owner decides), short shutdown
        # because stop() aborts every connection first.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        # A deep backlog: benchmarks open hundreds of connections at once (default 128 drops
        # SYNs, which costs a 1 s retransmit).
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._site = runner, site
        self._host = host
        self._port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Close the listener and abort every open connection, like a crashed Ollama."""
        runner, site = self._runner, self._site
        if runner is None or site is None:
            return
        self._runner = self._site = None
        await site.stop()  # new connections are refused from here on
        server = runner.server
        if server is not None:
            for handler in server.connections:
                if handler.transport is not None:
                    handler.transport.abort()
        # Handlers sleeping in delays or hangs end now rather than at their next poll.
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        await runner.cleanup()

    async def restart(self) -> None:
        """Stop if running, then listen again on the same host and port."""
        if not self._port:
            raise RuntimeError("restart() needs a previous start()")
        await self.stop()
        await self.start(self._host, self._port)

    async def __aenter__(self) -> FakeOllama:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    # ----------------------------------------------------------------- scripting

    def enqueue(self, *scripts: Script) -> None:
        """Queue scripts for the next chat/generate requests, first in first out."""
        self._queue.extend(scripts)

    @property
    def queued(self) -> int:
        """Scripts still waiting for a request."""
        return len(self._queue)

    def find_model(self, name: str) -> str | None:
        """The known model `name` refers to (normalized), or None."""
        wanted = normalize_model(name)
        for known in self.models:
            if normalize_model(known) == wanted:
                return wanted
        return None

    def loaded_models(self) -> list[str]:
        """Models /api/ps shows now (expired ones are dropped)."""
        now = time.time()
        for name in [name for name, expiry in self.loaded.items() if expiry <= now]:
            del self.loaded[name]
        return list(self.loaded)

    # ----------------------------------------------------------------- small endpoints

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return _json_response({"version": self.version})

    def _model_entry(self, name: str) -> dict[str, Any]:
        digest = hashlib.sha256(name.encode()).hexdigest()
        family = re.sub(r"[^a-z0-9]", "", name.split(":")[0].rsplit("/", 1)[-1].lower())
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-06-26T10:00:00.000000Z",
            "size": 5_600_000_000 + int(digest[:6], 16),
            "digest": digest,
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": family or "llama",
                "families": [family or "llama"],
                "parameter_size": "4.5B",
                "quantization_level": "Q4_K_M",
            },
        }

    async def _tags(self, request: web.Request) -> web.Response:
        names = dict.fromkeys(normalize_model(name) for name in self.models)
        return _json_response({"models": [self._model_entry(name) for name in names]})

    async def _ps(self, request: web.Request) -> web.Response:
        entries = []
        for name in self.loaded_models():
            entry = self._model_entry(name)
            expiry = self.loaded[name]
            until = (datetime.now(UTC) + timedelta(days=365 * 100) if math.isinf(expiry)
                     else datetime.fromtimestamp(expiry, UTC))
            entry.pop("modified_at")
            entry.update(expires_at=_rfc3339(until), size_vram=entry["size"],
                         context_length=4096)
            entries.append(entry)
        return _json_response({"models": entries})

    async def _read_model_request(
        self, request: web.Request
    ) -> tuple[str, dict[str, Any], web.Response | None]:
        """The body of a request about one model (show, pull) and its model name."""
        body, error = await self._read_post(request)
        if error is not None:
            return "", {}, error
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            return "", body, _error(400, "model is required")
        return name, body, None

    async def _show(self, request: web.Request) -> web.Response:
        name, _, error = await self._read_model_request(request)
        if error is not None:
            return error
        found = self.find_model(name)
        if found is None:
            return _error(404, f"model '{name}' not found")
        entry = self._model_entry(found)
        family = entry["details"]["family"]
        return _json_response({
            "license": "",
            "modelfile": f"# Modelfile generated by the fake Ollama\nFROM {found}\n",
            "parameters": 'stop "<end_of_turn>"',
            "template": "{{ .Prompt }}",
            "details": entry["details"],
            "model_info": {
                "general.architecture": family,
                "general.parameter_count": 4_460_000_000,
                f"{family}.context_length": 32768,
                f"{family}.embedding_length": self.embedding_length,
            },
            "capabilities": self.capabilities.get(found, ["completion"]),
            "modified_at": entry["modified_at"],
        })

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        name, body, error = await self._read_model_request(request)
        if error is not None:
            return error
        if self.find_model(name) is None:
            self.models.append(normalize_model(name))
        if body.get("stream", True) is False:
            return _json_response({"status": "success"})
        digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        total = 5_600_000_000
        lines = [{"status": "pulling manifest"}]
        lines += [{"status": f"pulling {digest[7:19]}", "digest": digest, "total": total,
                   "completed": done} for done in (0, total // 2, total)]
        lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                  {"status": "success"}]
        resp = _ndjson_response()
        with contextlib.suppress(ConnectionError):
            await resp.prepare(request)
            for line in lines:
                await resp.write(_dumps(line) + b"\n")
        return resp

    # ----------------------------------------------------------------- embeddings

    async def _embed(self, request: web.Request) -> web.Response:
        started = time.perf_counter_ns()
        body, error = await self._read_post(request)
        if error is not None:
            return error
        self.embed_requests.append(body)
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return _error(400, "model is required")
        if self.find_model(name) is None:
            return _error(404, f"model '{name}' not found")
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs] if inputs else []
        if inputs is None:
            inputs = []
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            return _error(400, "invalid input type")
        dimensions = body.get("dimensions") or 0
        if not isinstance(dimensions, int) or isinstance(dimensions, bool):
            return _error(400, "json: cannot unmarshal dimensions")
        try:
            parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            return _error(400, str(exc))
        script = self.embed_scripts.popleft() if self.embed_scripts else Script()
        if script.hang_before_headers:
            await _until_gone(request)
            self.disconnects += 1
            return web.Response()
        if script.reset_after == 0:
            _abort(request)
            return web.Response()
        if script.status is not None:
            return _error(script.status, script.error or DEFAULT_ERRORS.get(script.status,
                                                                             "error"))
        if await _sleep_until(request, asyncio.get_running_loop().time()
                              + script.first_token_delay):
            self.disconnects += 1
            return web.Response()
        truncate = body.get("truncate", True) is not False
        vectors, tokens = [], 0
        for text in inputs:
            words = text.split()
            if len(words) > self.embed_context:
                if not truncate:
                    return _error(400, "input exceeds maximum context length and cannot be "
                                       "truncated further")
                words = words[:self.embed_context]
            tokens += len(words)
            vectors.append(_fake_vector(" ".join(words), self.embedding_length, dimensions))
        now = time.perf_counter_ns()
        return _json_response({"model": name, "embeddings": vectors,
                               "total_duration": max(1, now - started), "load_duration": 1,
                               "prompt_eval_count": tokens})

    # ----------------------------------------------------------------- generations

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "generate")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "chat")

    async def _read_post(self, request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        """Parse and record a POST body; an error response when it is not a JSON object."""
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self.requests.append((request.path, None))
            return {}, _error(400, "invalid character in request body: not JSON")
        self.requests.append((request.path, body))
        if body is None:
            return {}, _error(400, "missing request body")
        if not isinstance(body, dict):
            return {}, _error(400, "json: cannot unmarshal into a request object")
        return body, None

    async def _generation(self, request: web.Request, kind: str) -> web.StreamResponse:
        started = time.perf_counter_ns()
        body, error = await self._read_post(request)
        if error is not None:
            return error
        self.generation_requests.append(body)
        self.headers = request.headers
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return _error(400, "model is required")
        model = self.find_model(name)
        if model is None:
            return _error(404, f'model "{name}" not found, try pulling it first')
        if kind == "chat" and body.get("tools") and "tools" not in self.capabilities.get(
            model, ["completion"]
        ):
            return _error(400, f"{name} does not support tools")
        if kind == "chat" and not _tools_valid(body):
            return _error(400, "invalid tools or tool messages")
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            return _error(400, str(exc))
        empty = not body.get("prompt") if kind == "generate" else not body.get("messages")
        if empty:
            return self._load_or_unload(kind, name, model, keep_alive)

        chosen = self.script_for(body) if self.script_for is not None else None
        script = chosen or self.model_scripts.get(name) or (
            self._queue.popleft() if self._queue else self.default_script)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        if self.max_streams is not None and self._slots is None:
            self._slots = asyncio.Semaphore(self.max_streams)
        if self._slots is not None:
            await self._slots.acquire()
        self.active_streams += 1
        self.peak_streams = max(self.peak_streams, self.active_streams)
        self.loaded[model] = math.inf  # in use: never expires while generating
        try:
            return await self._run(request, kind, name, body, script, started)
        except ClientGone:
            self.disconnects += 1
            return web.Response()  # aiohttp fails to send it quietly: the client is gone
        finally:
            self.active_streams -= 1
            if self._slots is not None:
                self._slots.release()
            if task is not None:
                self._tasks.discard(task)
            # Ollama starts the keep_alive countdown when the request ends.
            if keep_alive == 0:
                self.loaded.pop(model, None)
            else:
                self.loaded[model] = time.time() + keep_alive

    def _load_or_unload(self, kind: str, name: str, model: str, keep_alive: float) -> web.Response:
        """An empty prompt / no messages: load (or with keep_alive 0, unload) the model."""
        if keep_alive == 0:
            self.loaded.pop(model, None)
            reason = "unload"
        else:
            self.loaded[model] = time.time() + keep_alive
            reason = "load"
        answer: dict[str, Any] = {"model": name, "created_at": _rfc3339()}
        if kind == "generate":
            answer["response"] = ""
        else:
            answer["message"] = {"role": "assistant", "content": ""}
        answer.update(done=True, done_reason=reason)
        return _json_response(answer)

    async def _run(
        self,
        request: web.Request,
        kind: str,
        name: str,
        body: dict[str, Any],
        script: Script,
        started: int,
    ) -> web.StreamResponse:
        """Answer one generation as the script says; raise ClientGone if the client left."""
        loop = asyncio.get_running_loop()
        if script.hang_before_headers:
            await _until_gone(request)
            raise ClientGone
        if script.reset_after == 0:
            _abort(request)
            return web.Response()
        if script.status is not None:
            return _error(script.status, script.error or DEFAULT_ERRORS.get(script.status,
                                                                             "error"))
        loaded_at = time.perf_counter_ns()
        if await _sleep_until(request, loop.time() + script.first_token_delay):
            raise ClientGone

        tokens = script.token_list()
        reason = "stop"
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        limit = options.get("num_predict")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 \
                and len(tokens) >= limit and not script.overrun:
            tokens, reason = tokens[:limit], "length"
        reason = script.done_reason or reason

        # The first fault that applies cuts the stream after that many tokens.
        fault, cut = None, len(tokens)
        for fault_name in ("reset_after", "hang_after", "error_after", "malformed_after"):
            value = getattr(script, fault_name)
            if value is not None:
                fault, cut = fault_name, min(value, len(tokens))
                break
        sent = tokens[:cut]

        stream = body.get("stream", True) is not False
        if not stream:
            return await self._answer_whole(request, kind, name, body, script, sent, fault,
                                            reason, started, loaded_at)

        resp = _ndjson_response()
        try:
            await resp.prepare(request)
            first_at = time.perf_counter_ns()
            await self._stream_tokens(request, resp, kind, name, sent, script.token_delay)
            if fault == "reset_after":
                await _flush(request)
                _abort(request)
                return resp
            if fault == "hang_after":
                await _until_gone(request)
                raise ClientGone
            if fault == "error_after":
                await resp.write(_dumps({"error": script.error or MID_STREAM_ERROR}) + b"\n")
                return resp
            if fault == "malformed_after":
                await resp.write(MALFORMED_LINE)
                return resp
            if script.truncate_final:
                return resp
            if script.before_final:
                await resp.write(script.before_final)
            if script.tool_calls and kind == "chat":
                await resp.write(_dumps({
                    "model": name, "created_at": _rfc3339(), "done": False,
                    "message": {"role": "assistant", "content": "",
                                "tool_calls": _ollama_calls(script.tool_calls)}}) + b"\n")
            final = self._final(kind, name, body, "", len(sent), reason, started, loaded_at,
                                first_at)
            final.update(script.final_fields or {})
            await resp.write(_dumps(final) + b"\n")
            self.completed += 1
            if script.after_done:
                await resp.write(script.after_done)
            if script.hang_after_done:
                await _until_gone(request)
                raise ClientGone
            return resp
        except ConnectionError as exc:
            raise ClientGone from exc

    async def _stream_tokens(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        kind: str,
        name: str,
        tokens: list[str],
        delay: float,
    ) -> None:
        """Write one NDJSON chunk per token, paced on a fixed schedule when delay > 0."""
        loop = asyncio.get_running_loop()
        model = _json_str(name)
        if kind == "generate":
            middle, suffix = b'","response":', b',"done":false}\n'
        else:
            middle = b'","message":{"role":"assistant","content":'
            suffix = b'},"done":false}\n'
        head = b'{"model":' + model + b',"created_at":"'
        prefix = head + _rfc3339().encode() + middle
        start = loop.time()
        for index, token in enumerate(tokens):
            if delay > 0:
                # Sleep until start + i*delay (not "delay after the last write"): no drift.
                if await _sleep_until(request, start + index * delay):
                    raise ClientGone
                prefix = head + _rfc3339().encode() + middle
            elif index and index % YIELD_EVERY == 0:
                await asyncio.sleep(0)
                prefix = head + _rfc3339().encode() + middle
            await resp.write(prefix + _json_str(token) + suffix)
            self.tokens_sent += 1

    async def _answer_whole(
        self,
        request: web.Request,
        kind: str,
        name: str,
        body: dict[str, Any],
        script: Script,
        tokens: list[str],
        fault: str | None,
        reason: str,
        started: int,
        loaded_at: int,
    ) -> web.Response:
        """`"stream": false`: take the generation time, then answer one JSON object."""
        loop = asyncio.get_running_loop()
        first_at = time.perf_counter_ns()
        if script.token_delay > 0 and tokens and await _sleep_until(
            request, loop.time() + script.token_delay * (len(tokens) - 1)
        ):
            raise ClientGone
        if fault == "reset_after":
            _abort(request)
            return web.Response()
        if fault == "hang_after":
            await _until_gone(request)
            raise ClientGone
        if fault == "error_after":
            return _error(500, script.error or MID_STREAM_ERROR)
        if fault == "malformed_after":
            return web.Response(body=MALFORMED_LINE, content_type="application/json")
        text = "".join(tokens)
        if script.truncate_final:
            partial: dict[str, Any] = {"model": name, "created_at": _rfc3339()}
            if kind == "generate":
                partial["response"] = text
            else:
                partial["message"] = {"role": "assistant", "content": text}
            partial["done"] = False
            return _json_response(partial)
        if _client_gone(request):
            raise ClientGone
        final = self._final(kind, name, body, text, len(tokens), reason, started, loaded_at,
                            first_at)
        if script.tool_calls and kind == "chat":
            final["message"]["tool_calls"] = _ollama_calls(script.tool_calls)
        self.completed += 1
        return _json_response(final)

    def _final(
        self,
        kind: str,
        name: str,
        body: dict[str, Any],
        text: str,
        eval_count: int,
        reason: str,
        started: int,
        loaded_at: int,
        first_at: int,
    ) -> dict[str, Any]:
        """The done chunk: counts and nanosecond durations measured on this request."""
        now = time.perf_counter_ns()
        load = max(1, loaded_at - started)
        prompt_eval = max(1, first_at - loaded_at)
        evaluation = max(1, now - first_at)
        prompt_count = _prompt_words(kind, body)
        final: dict[str, Any] = {"model": name, "created_at": _rfc3339()}
        if kind == "generate":
            final["response"] = text
        else:
            final["message"] = {"role": "assistant", "content": text}
        final.update(
            done=True,
            done_reason=reason,
            total_duration=max(now - started, load + prompt_eval + evaluation),
            load_duration=load,
            prompt_eval_count=prompt_count,
            prompt_eval_duration=prompt_eval,
            eval_count=eval_count,
            eval_duration=evaluation,
        )
        if kind == "generate":
            final["context"] = list(range(1, prompt_count + eval_count + 1))
        return final


def _ollama_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scripted calls as Ollama's message.tool_calls."""
    return [{"function": {"index": index, "name": call["name"],
                          "arguments": call.get("arguments", {})}}
            for index, call in enumerate(calls)]


def _tools_valid(body: Mapping[str, Any]) -> bool:
    """Ollama's shapes: tools [{"type": "function", "function": {"name", "parameters"}}],
    assistant tool_calls [{"function": {"name", "arguments": {...}}}] (an object, not text),
    tool turns with content (and tool_name)."""
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(t, dict) and t.get("type") == "function"
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)
            and isinstance(t["function"].get("parameters", {}), dict) for t in tools)):
        return False
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            return False
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                    or not isinstance(function.get("arguments"), dict):
                return False
        if "tool_name" in message and not isinstance(message["tool_name"], str):
            return False
    return True


@lru_cache(maxsize=4096)
def _fake_vector(text: str, length: int, dimensions: int) -> list[float]:
    """A unit vector that is a function of the text: texts sharing words lie closer (each
    word adds its own random direction), as Ollama's are unit vectors cut to `dimensions`
    and normalized again."""
    vector = [0.0] * length
    for word in text.lower().split() or [""]:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "big")
        generator = random.Random(seed)
        for index in range(length):
            vector[index] += generator.gauss(0.0, 1.0)
    if 0 < dimensions < length:
        vector = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_dumps(obj), content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json_response({"error": message}, status=status)


def _ndjson_response() -> web.StreamResponse:
    resp = web.StreamResponse(status=200)
    resp.content_type = NDJSON
    resp.enable_chunked_encoding()
    return resp


async def _flush(request: web.BaseRequest) -> None:
    """Wait until written bytes left the process, so an abort does not discard them."""
    transport = request.transport
    while transport is not None and not transport.is_closing() \
            and transport.get_write_buffer_size() > 0:
        await asyncio.sleep(0.001)


def _abort(request: web.BaseRequest) -> None:
    """Drop the TCP connection without an HTTP ending: the client sees the server vanish."""
    transport = request.transport
    if transport is not None:
        transport.abort()


# --------------------------------------------------------------------- command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tests/fake_ollama.py",
        description="Serve the scriptable fake Ollama until SIGTERM or SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per answer (default: a 10-token sentence)")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--first-token-delay", type=float, default=0.0,
                        help="seconds before the first token")
    parser.add_argument("--model", action="append", default=None,
                        help=f"known model (repeatable; default {DEFAULT_MODEL})")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    tokens = None
    if args.tokens is not None:
        tokens = [DEFAULT_TOKENS[i % len(DEFAULT_TOKENS)] for i in range(max(0, args.tokens))]
    fake = FakeOllama(
        models=args.model or [DEFAULT_MODEL],
        default_script=Script(tokens=tokens, token_delay=args.token_delay,
                              first_token_delay=args.first_token_delay),
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await fake.start(args.host, args.port)
    try:
        print(f"fake-ollama listening on {fake.url}", flush=True)
        await stopping.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> int:
    """Command line entry: serve until SIGTERM/SIGINT, print the URL line when ready."""
    asyncio.run(_serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
