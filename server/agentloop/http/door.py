"""The HTTP door: the OpenAI-compatible API on its own port, served by the same services.

`HttpDoor` is an aiohttp low-level server (seven routes need no router) that, for each
request, in this order:

1. refuses it while the server drains (503, Retry-After);
2. asks the edge (`rpc.edge.Edge.refusal`, the gRPC port's own decision): the key from
   `Authorization: Bearer`, the refusal lock-out, the rate limit; the key's tenant becomes
   the call's RESOLVED_TENANT. A peer's refusals and buckets are one for both doors;
3. reads the body within bounds before parsing it: its declared and its actual size
   (`body_cap`), the request byte budget all calls share with gRPC (held until the call
   ends, or until its agent run is stored), `http_body_timeout` for it to arrive, and a
   depth limit on the JSON;
4. reads the caller's headers as the gRPC metadata (`rpc.requests.call_context`: session,
   priority, local-only, cache key, trusted proxy address), with the door named `http`;
5. translates (`http.requests`), calls GenerationService / EmbeddingService / the router,
   translates back (`http.responses`). Errors come from the one table (`http.errors`).
   `/v1/responses` starts the run gRPC's StartAgentRun starts (`http.agent_requests`, then
   `rpc.agent_requests.start_background_run`) on the RunManager, and answers, streams,
   gets and cancels it as OpenAI Response objects and events (`http.agent_responses`); a
   request that is not `background` waits on its run and cancels it if its client leaves.

Connections are bounded too: `http_connections_per_peer` at once per address (more are
answered 429 and closed), `http_idle_timeout` for a connection without a request (its
head included: a slow head is an idle connection). A stream's next event may wait
`send_stall_timeout` for the client to read, then the connection is dropped; the
generation never waits for the client (`rpc.coalesce`), so a client that never reads holds
only its own text until then (a run's events wait in the run store, not in the door). A
client that goes away cancels its handler, and with it the engine call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from agentloop.config import Settings, parse_host_port
from agentloop.domain import CallContext, GenerationEnd, GenerationRequest
from agentloop.errors import (
    AgentLoopError,
    DeadlineExceeded,
    InvalidArgument,
    ModelNotFound,
    ResourceExhausted,
    SendStalled,
    ShuttingDown,
    Unimplemented,
    internal_error,
)
from agentloop.http.agent_requests import response_call
from agentloop.http.agent_responses import ResponseEvents, ResponseHead, view_json
from agentloop.http.errors import HTTP_STATUS, error_body, error_headers, http_status
from agentloop.http.requests import (
    GenerationCall,
    Rename,
    chat_call,
    completion_call,
    embedding_call,
    renamed,
    renamer,
)
from agentloop.http.responses import Answer, embeddings_json, models_json
from agentloop.rpc.agent_requests import start_background_run
from agentloop.rpc.auth import bearer_token
from agentloop.rpc.coalesce import coalesced
from agentloop.rpc.edge import Edge
from agentloop.rpc.embedding_requests import embedding_request
from agentloop.rpc.requests import SESSION_HEADER, call_context, generation_request
from agentloop.rpc.responses import UPSTREAM_HEADER
from agentloop.rpc.servicer import read_request
from agentloop.rpc.transport import RequestBytes, over_budget, request_message_cap
from agentloop.schema_limits import MAX_DEPTH, load_json
from agentloop.services.agent import AgentService
from agentloop.services.embeddings import EmbeddingService
from agentloop.services.generation import GenerationService
from agentloop.services.runs import RunManager, RunView
from agentloop.services.tools import ToolRegistry
from agentloop.telemetry import Telemetry, logs
from agentloop.telemetry.metrics import DOOR, TENANT
from agentloop.tenants import RESOLVED_TENANT, resolved_tenant, tenant_label

log = logging.getLogger(__name__)
request_log = logging.getLogger(logs.REQUEST_LOGGER)

HTTP_DOOR = "http"
#: The status proxies log for a client that went away before its answer.
CLIENT_CLOSED = 499
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
MODELS = "/v1/models"
RESPONSES = "/v1/responses"
RESPONSE = "/v1/responses/{response_id}"
CANCEL_RESPONSE = "/v1/responses/{response_id}/cancel"
#: Each route's method; any other path is 404, another method 405.
ROUTES = {CHAT: "POST", COMPLETIONS: "POST", EMBEDDINGS: "POST", MODELS: "GET",
          RESPONSES: "POST", RESPONSE: "GET", CANCEL_RESPONSE: "POST"}
#: JSON adds to what the gRPC request holds: base64 images (4/3), escapes, field names.
_JSON_GROWTH = 4 / 3
_JSON_OVERHEAD = 64 * 1024
#: The body's nesting beyond a schema's own (body -> response_format -> json_schema ->
#: schema, and messages -> message -> content -> part -> image_url).
MAX_BODY_DEPTH = MAX_DEPTH + 4
#: Bodies past this size are parsed on a thread: the event loop keeps serving meanwhile.
_PARSE_ON_THREAD_BYTES = 256 * 1024
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"


def body_cap(settings: Settings) -> int:
    """The largest body: what the gRPC API's largest request message holds, as JSON."""
    return math.ceil(request_message_cap(settings) * _JSON_GROWTH) + _JSON_OVERHEAD


class BodyTooLarge(InvalidArgument):
    http_status = 413

    def __init__(self, cap: int) -> None:
        super().__init__([("body", f"larger than {cap} bytes")])


class BodyTimeout(DeadlineExceeded):
    """The body did not arrive within http_body_timeout."""

    reason = "BODY_TIMEOUT"
    http_status = 408


class UnknownRoute(ModelNotFound):
    reason = "UNKNOWN_URL"


class WrongMethod(InvalidArgument):
    http_status = 405

    def __init__(self, method: str, allow: str) -> None:
        super().__init__([("method", f"{method} is not served here; use {allow}")])
        self.allow = allow


class CompressedBody(InvalidArgument):
    """A compressed body would be inflated before its size could be bounded."""

    http_status = 415

    def __init__(self, encoding: str) -> None:
        super().__init__([("content-encoding", f"{encoding[:40]!r} bodies are not taken: "
                                               "send the body uncompressed")])


class _Stalled(Exception):
    """The client did not read a stream's next event within send_stall_timeout."""


class _ClientGone(Exception):
    """The client closed the connection while its answer was being written."""


@dataclasses.dataclass
class _Call:
    """One request's state: what it holds of the byte budget, its answer's status."""

    status: int = 200
    held: int = 0
    rename: Rename = str


class HttpDoor:
    """The OpenAI-compatible API on `settings.http_listen`."""

    def __init__(self, settings: Settings, edge: Edge, generation: GenerationService,
                 embeddings: EmbeddingService, telemetry: Telemetry,
                 draining: Callable[[], bool], agent: AgentService | None = None,
                 runs: RunManager | None = None) -> None:
        self._settings = settings
        self._agent = agent
        self._runs = runs
        #: Cancels of foreground runs whose client left, under way.
        self._cancels: set[asyncio.Task[None]] = set()
        self._edge = edge
        self._generation = generation
        self._embeddings = embeddings
        self._telemetry = telemetry
        self._draining = draining
        self._body_cap = body_cap(settings)
        self._server = _PeerLimitedServer(
            self._handle, settings.http_connections_per_peer, handler_cancellation=True,
            keepalive_timeout=settings.http_idle_timeout, access_log=None)
        self._runner = web.ServerRunner(self._server, handle_signals=False,
                                        shutdown_timeout=settings.shutdown_grace)
        self.port = 0

    @property
    def budget(self) -> RequestBytes:
        """The request byte budget, shared with the gRPC port."""
        return self._edge.budget

    @property
    def connections(self) -> int:
        """The connections open now."""
        return len(self._server.connections)

    async def start(self) -> int:
        """Listen (TLS with the gRPC port's certificate when it has one); the bound port."""
        host, port = parse_host_port(self._settings.http_listen)
        sock = socket.create_server((host, port), family=_family(host),
                                    reuse_port=self._settings.workers > 1)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock, ssl_context=tls_context(self._settings))
        await site.start()
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self, grace: float) -> None:
        """Close the listener, give the requests in flight `grace` seconds, then end them."""
        self._runner._shutdown_timeout = grace  # aiohttp reads it only from here
        await self._runner.cleanup()
        if self._cancels:  # the foreground runs of the requests just ended
            await asyncio.wait(set(self._cancels), timeout=grace)

    # --- one request ------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        route, response_id = route_of(request.path)
        served = route is not None and ROUTES[route] == request.method
        observed = _ObservedRequest(self._telemetry, request, route if served else None)
        call = _Call()
        try:
            if route is None or not served:
                raise _no_route(request, route)
            response = await self._serve(request, route, response_id, call)
        except asyncio.CancelledError:
            call.status = CLIENT_CLOSED
            raise
        except Exception as exc:
            error = _domain_error(exc, route or request.path)
            call.status = _status_of(error)
            headers = error_headers(error)
            if isinstance(error, WrongMethod):
                headers["Allow"] = error.allow
            response = web.json_response(error_body(error, call.rename, call.status),
                                         status=call.status, headers=headers)
            if not request.content.at_eof():
                response.force_close()  # an unread body is not read (nor lingered on)
        finally:
            self._edge.budget.give_back(call.held)
            call.held = 0
            observed.end(call.status)
        return response

    async def _serve(self, request: web.BaseRequest, route: str, response_id: str,
                     call: _Call) -> web.StreamResponse:
        if self._draining():
            raise ShuttingDown("the server is shutting down; retry on another replica",
                               retry_after=0.1)
        self._admit(request, route)
        if route == MODELS:
            return web.json_response(models_json(await self._generation.backend.list_models()))
        if route == RESPONSE:  # a GET: no body
            return await self._get_response(request, response_id, self._context(request), call)
        data = await self._body(request, call, empty_ok=route == CANCEL_RESPONSE)
        context = self._context(request)
        if route == RESPONSES:
            return await self._create_response(request, data, context, call)
        if route == CANCEL_RESPONSE:
            if data not in (None, {}):
                raise InvalidArgument([("body", "a cancel takes no parameters")])
            head, view = await self._run_view(context, response_id, cancel=True)
            return web.json_response(view_json(head, view))
        if route == EMBEDDINGS:
            return await self._embed(data, context, call)
        generation = chat_call(data, self._settings) if route == CHAT else completion_call(data)
        call.rename = generation.rename
        domain = await self._generation_request(generation, context)
        if generation.stream:
            return await self._stream(request, generation, domain, call)
        result = await self._generation.generate(domain)
        answer = Answer(route == CHAT, domain.model)
        return web.json_response(answer.whole(result), headers=_upstream(result.end))

    def _admit(self, request: web.BaseRequest, route: str) -> None:
        """The edge's decision, as for a gRPC call; the tenant for the rest of the call."""
        key = _bearer(request)
        tenant = self._edge.tenant_of(key) if self._edge.checks_keys else None
        address, peer = _peer(request)
        error = self._edge.refusal(address, peer, f"{request.method} {route}", key, tenant,
                                   checks_key=self._edge.checks_keys)
        if error is not None:
            raise error
        if tenant is not None:
            RESOLVED_TENANT.set(tenant)

    def _context(self, request: web.BaseRequest) -> CallContext:
        """The caller's headers as the gRPC metadata (session, priority, ...), its tenant."""
        return call_context(_metadata(request), _peer(request)[1], self._settings,
                            door=HTTP_DOOR)

    async def _body(self, request: web.BaseRequest, call: _Call, empty_ok: bool = False) -> Any:
        """The JSON body, bounded before it is parsed; its bytes held in the budget (None
        for an empty one where `empty_ok`)."""
        cap = self._body_cap
        if request.content_length is not None and request.content_length > cap:
            raise BodyTooLarge(cap)
        encoding = request.headers.get("Content-Encoding", "identity")
        if encoding.strip().lower() != "identity":
            raise CompressedBody(encoding)
        budget = self._edge.budget
        pieces: list[bytes] = []
        timeout = self._settings.http_body_timeout
        try:
            async with asyncio.timeout(timeout):
                async for piece in request.content.iter_any():
                    if call.held + len(piece) > cap:
                        raise BodyTooLarge(cap)
                    if not budget.take(len(piece)):
                        raise over_budget(budget)
                    call.held += len(piece)
                    pieces.append(piece)
        except TimeoutError:
            raise BodyTimeout(f"the request body did not arrive within {timeout:g}s "
                              "(http_body_timeout)") from None
        data = b"".join(pieces)
        if empty_ok and not data.strip():
            return None
        try:
            if len(data) > _PARSE_ON_THREAD_BYTES:
                return await asyncio.to_thread(load_json, data, MAX_BODY_DEPTH)
            return load_json(data, MAX_BODY_DEPTH)
        except ValueError as exc:  # UnicodeDecodeError too
            raise InvalidArgument([("body", f"not valid JSON ({exc})")]) from None

    async def _generation_request(self, generation: GenerationCall,
                                  context: CallContext) -> GenerationRequest:
        """The gRPC API's own reading of the request (a schema is read off the loop)."""
        try:
            domain = await read_request(
                generation.carries_schema, generation_request, generation.message,
                self._settings, self._generation.default_model, None)
        except InvalidArgument as exc:
            raise renamed(exc, generation.rename) from None
        return dataclasses.replace(domain, context=context)

    async def _embed(self, data: Any, context: CallContext, call: _Call) -> web.Response:
        embedding = embedding_call(data, self._settings)
        call.rename = renamer({}, prompt="input")
        try:
            domain = embedding_request(embedding.message, self._settings,
                                       self._generation.default_model)
        except InvalidArgument as exc:
            raise renamed(exc, call.rename) from None
        result = await self._embeddings.embed(dataclasses.replace(domain, context=context))
        headers = {UPSTREAM_HEADER: result.upstream} if result.upstream else None
        return web.json_response(embeddings_json(result, embedding.base64), headers=headers)

    # --- /v1/responses: agent runs, backed by the background runs ---------------------

    @property
    def _run_manager(self) -> RunManager:
        if self._runs is None or self._agent is None:
            raise Unimplemented("this server keeps no agent runs")
        return self._runs

    async def _create_response(self, request: web.BaseRequest, data: Any,
                               context: CallContext, call: _Call) -> web.StreamResponse:
        """Start the run StartAgentRun would start. In the background: answer it at once
        (or stream it: the run goes on when the stream drops). Else the request waits on
        it, and a client that leaves before its end cancels it."""
        runs = self._run_manager
        tools = self._run_tools
        creation = response_call(data, self._settings, tools)
        call.rename = creation.rename
        try:
            started = start_background_run(creation.message, self._settings, tools,
                                           self._generation.default_model)
            run = dataclasses.replace(started.run, context=context)
            if creation.no_tools:
                run = dataclasses.replace(run, tools=())
            run_id = await runs.start_run(run, timeout=started.timeout,
                                          previous_run_id=started.previous_run_id,
                                          trim_conversation=started.trim_conversation)
        except InvalidArgument as exc:
            raise renamed(exc, creation.rename) from None
        # The request is in the store: its bytes go back now, however long the run takes.
        self._edge.budget.give_back(call.held)
        call.held = 0
        if creation.background and not creation.stream:
            head, view = await self._run_view(context, run_id)
            return web.json_response(view_json(head, view, background=True))
        head, _ = await self._run_view(context, run_id, details=False)
        events = ResponseEvents(head, background=creation.background)
        try:
            if creation.stream:
                return await self._stream_run(request, events, context, call)
            return web.json_response(await self._await_run(events, context))
        finally:
            if not creation.background and events.final is None:
                self._cancel_soon(context.tenant, run_id)  # its client left: nobody waits

    async def _get_response(self, request: web.BaseRequest, response_id: str,
                            context: CallContext, call: _Call) -> web.StreamResponse:
        """A run as a Response; with stream=true its events from the first (or after
        starting_after) until it ends."""
        query = request.query
        violations = [(name, "not a parameter this API takes") for name in sorted(
            set(query) - {"stream", "starting_after", "include", "include[]",
                          "include_obfuscation"})[:5]]
        stream = _query_flag(query, "stream", violations)
        after = _query_count(query, "starting_after", violations)
        if any(query.getall(name, []) for name in ("include", "include[]")):
            violations.append(("include", "nothing more can be included (leave it out)"))
        if _query_flag(query, "include_obfuscation", violations):
            violations.append(("include_obfuscation", "not taken (leave it out)"))
        if after is not None and not stream:
            violations.append(("starting_after", "only with stream=true"))
        if violations:
            raise InvalidArgument(violations)
        head, view = await self._run_view(context, response_id, details=not stream)
        if not stream:
            return web.json_response(view_json(head, view))
        events = ResponseEvents(head, starting_after=-1 if after is None else after)
        return await self._stream_run(request, events, context, call)

    async def _run_view(self, context: CallContext, run_id: str, cancel: bool = False,
                        details: bool = True) -> tuple[ResponseHead, RunView]:
        """The caller's tenant's run (another tenant's is not found), cancelled first when
        asked."""
        runs = self._run_manager
        if cancel:
            view = await runs.cancel(context.tenant, run_id)
        else:
            view = await runs.get(context.tenant, run_id, details=details)
        return ResponseHead.of(view.record, self._run_tools), view

    @property
    def _run_tools(self) -> ToolRegistry:
        assert self._agent is not None
        return self._agent.tools

    async def _await_run(self, events: ResponseEvents, context: CallContext) -> Any:
        """The Response once the run ended (its events read as a stream would send them)."""
        watched = self._run_manager.watch(context.tenant, events.head.id)
        async with aclosing(watched):
            async for event in watched:
                events.add(event)
                if events.final is not None:
                    return events.final
        # Its end was recorded by a replica that took it over, past the events read.
        head, view = await self._run_view(context, events.head.id)
        events.final = view_json(head, view, background=events.background)
        return events.final

    async def _stream_run(self, request: web.BaseRequest, events: ResponseEvents,
                          context: CallContext, call: _Call) -> web.StreamResponse:
        """The run's streaming events as server-sent events, each named by its type."""
        response = web.StreamResponse(headers=_SSE_HEADERS)
        try:
            await response.prepare(request)
            for item in events.opening():
                await self._send_event(response, item)
            watched = self._run_manager.watch(context.tenant, events.head.id)
            try:
                async with aclosing(watched):
                    async for event in watched:
                        for item in events.add(event):
                            await self._send_event(response, item)
                        if events.final is not None:
                            break
            except (_Stalled, _ClientGone):
                raise
            except Exception as exc:  # the stream ends; the run goes on (resume it)
                error = _domain_error(exc, request.path)
                call.status = _status_of(error)
                for item in events.error(error.reason.lower(), error.message):
                    await self._send_event(response, item)
        except _Stalled:
            call.status = HTTP_STATUS[SendStalled.code]
            _drop(request)
            return response
        except (_ClientGone, ConnectionError):
            call.status = CLIENT_CLOSED
            _drop(request)
            return response
        await response.write_eof()
        return response

    async def _send_event(self, response: web.StreamResponse, event: dict[str, Any]) -> None:
        await self._write(response, b"event: " + event["type"].encode() + b"\ndata: "
                          + _dumps(event) + b"\n\n")

    def _cancel_soon(self, tenant: str, run_id: str) -> None:
        """Cancel a run in a task of its own (the request's task may be being cancelled)."""
        task = asyncio.create_task(self._cancel_run(tenant, run_id), name=f"cancel-{run_id}")
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel_run(self, tenant: str, run_id: str) -> None:
        try:
            await self._run_manager.cancel(tenant, run_id)
        except AgentLoopError as exc:  # the store is down: the run ends at its deadline
            log.warning("could not cancel run %s its client left: %s", run_id, exc.message)

    async def _stream(self, request: web.BaseRequest, generation: GenerationCall,
                      domain: GenerationRequest, call: _Call) -> web.StreamResponse:
        """Server-sent events. The status is sent with the first token, so a call refused
        before it (quota, overload, an unknown model) gets its own HTTP status."""
        answer = Answer(request.path == CHAT, domain.model)
        usage = generation.include_usage
        response = web.StreamResponse(headers=_SSE_HEADERS)
        items = coalesced(self._generation.stream(domain))
        first = True
        try:
            async with aclosing(items):
                try:
                    async for item in items:
                        if first:
                            await response.prepare(request)
                        if not isinstance(item, GenerationEnd):  # text, or a call's piece
                            await self._send(response, answer.chunk(item, with_usage=usage,
                                                                    first=first))
                            first = False
                            continue
                        if first:  # no text at all: the role still opens the answer
                            await self._send(response, answer.chunk("", with_usage=usage,
                                                                    first=True))
                            first = False
                        await self._send(response, answer.end_chunk(item, usage))
                        if usage:
                            await self._send(response, answer.usage_chunk(item))
                        await self._write(response, _DONE)
                except (_Stalled, _ClientGone):
                    raise
                except Exception as exc:
                    if first:
                        raise  # nothing sent yet: an ordinary error response
                    # After the first event the status is sent: the error is an event.
                    error = _domain_error(exc, request.path)
                    call.status = _status_of(error)
                    await self._send(response, error_body(error, call.rename, call.status))
        except _Stalled:
            # The generation is closed; the client reads nothing, so it gets nothing more.
            call.status = HTTP_STATUS[SendStalled.code]  # recorded: the client reads nothing
            _drop(request)
            return response
        except _ClientGone:
            call.status = CLIENT_CLOSED
            _drop(request)
            return response
        await response.write_eof()
        return response

    async def _send(self, response: web.StreamResponse, event: dict[str, Any]) -> None:
        await self._write(response, b"data: " + _dumps(event) + b"\n\n")

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        """One event within send_stall_timeout (a timer cancels the write where it waits)."""
        try:
            async with asyncio.timeout(self._settings.send_stall_timeout):
                await response.write(data)
        except TimeoutError:
            raise _Stalled from None
        except ConnectionError:
            raise _ClientGone from None


class _PeerLimitedServer(web.Server):
    """aiohttp's server, holding at most `per_peer` connections per peer address."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                 per_peer: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._per_peer = per_peer
        self._peers: dict[str, int] = {}
        self._peer_of: dict[RequestHandler, str] = {}

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if peer else ""
        held = self._peers.get(host, 0)
        self._peers[host] = held + 1
        self._peer_of[handler] = host
        if held >= self._per_peer:
            body = _dumps(error_body(ResourceExhausted(
                f"too many connections from this address (at most "
                f"{self._per_peer}: http_connections_per_peer)", retry_after=1.0,
                metadata={"limit": "connections"})))
            transport.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n"
                            b"Content-Type: application/json\r\nConnection: close\r\n"
                            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            transport.close()

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        host = self._peer_of.pop(handler, None)
        if host is not None:
            left = self._peers.get(host, 1) - 1
            if left > 0:
                self._peers[host] = left
            else:
                self._peers.pop(host, None)


class _ObservedRequest:
    """One request's SERVER span (current while it runs), duration metric and log line,
    as the gRPC door's (`rpc.telemetry_interceptor`), with `agentloop.door` http."""

    __slots__ = ("_context_token", "_log", "_log_token", "_started", "_telemetry", "method",
                 "route", "session", "span")

    def __init__(self, telemetry: Telemetry, request: web.BaseRequest,
                 route: str | None) -> None:
        self._telemetry = telemetry
        self._started = time.perf_counter()
        self.method = request.method
        self.route = route or "_OTHER"  # a path the caller chose is no label
        headers = {name.lower(): value for name, value in request.headers.items()}
        parent = propagate.extract(headers)
        attributes: dict[str, Any] = {"http.request.method": self.method,
                                      "http.route": self.route, DOOR: HTTP_DOOR}
        session = headers.get(SESSION_HEADER)
        self.session = session[:128] if session else None
        if self.session:
            attributes["session.id"] = self.session
        self.span = telemetry.tracer.start_span(f"{self.method} {self.route}", context=parent,
                                                kind=SpanKind.SERVER, attributes=attributes)
        self._context_token = otel_context.attach(trace.set_span_in_context(self.span, parent))
        self._log, self._log_token = logs.begin_request()

    def end(self, status: int) -> None:
        duration = time.perf_counter() - self._started
        tenant = tenant_label(resolved_tenant().name)
        span = self.span
        span.set_attribute(TENANT, tenant)
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_attribute("error.type", str(status))
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, str(status)))
        span.end()
        self._telemetry.instruments.http_duration.record(duration, {
            "http.request.method": self.method, "http.route": self.route,
            "http.response.status_code": status, DOOR: HTTP_DOOR, TENANT: tenant})
        if request_log.isEnabledFor(logging.INFO):
            self._write_log(status, duration, tenant)
        logs.end_request(self._log_token)
        otel_context.detach(self._context_token)  # the handler's task: its own context

    def _write_log(self, status: int, duration: float, tenant: str) -> None:
        fields = logs.request_fields(f"{self.method} {self.route}", status, duration, tenant,
                                     self._log, self.session, self.span)
        fields["door"] = HTTP_DOOR
        request_log.info("%s %s %d %.1fms", self.method, self.route, status, duration * 1e3,
                         extra={"fields": fields})


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The gRPC port's TLS, for HTTP: the same certificate, and client certificates
    required when tls_client_ca is set."""
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        context.load_verify_locations(settings.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def route_of(path: str) -> tuple[str | None, str]:
    """The route a path names (None: none), and the response id in it ("" where none)."""
    if path in ROUTES:
        return path, ""
    if path.startswith(RESPONSES + "/"):
        parts = path[len(RESPONSES) + 1:].split("/")
        if len(parts) == 1 and parts[0]:
            return RESPONSE, parts[0]
        if len(parts) == 2 and parts[0] and parts[1] == "cancel":
            return CANCEL_RESPONSE, parts[0]
    return None, ""


def _no_route(request: web.BaseRequest, route: str | None) -> AgentLoopError:
    if route is not None:
        return WrongMethod(request.method, ROUTES[route])
    return UnknownRoute(f"no route {request.method} {request.path[:200]} (this door serves "
                        f"{', '.join(sorted(ROUTES))})")


def _query_flag(query: Any, name: str, violations: list[tuple[str, str]]) -> bool:
    value = query.get(name)
    if value is None or value == "false":
        return False
    if value != "true":
        violations.append((name, "must be true or false"))
    return value == "true"


def _query_count(query: Any, name: str, violations: list[tuple[str, str]]) -> int | None:
    value = query.get(name)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 18:
        violations.append((name, "must be a sequence number (an integer >= 0)"))
        return None
    return int(value)


def _drop(request: web.BaseRequest) -> None:
    """Close the connection at once: what it still buffers is not worth a wait."""
    if request.transport is not None:
        request.transport.abort()


def _domain_error(exc: BaseException, where: str) -> AgentLoopError:
    if isinstance(exc, AgentLoopError):
        return exc
    log.exception("unexpected error in %s", where)
    return internal_error()


def _status_of(error: AgentLoopError) -> int:
    return getattr(error, "http_status", None) or http_status(error)


def _metadata(request: web.BaseRequest) -> list[tuple[str, str]]:
    """The headers as gRPC metadata: lower-case names, repeated ones kept (and refused)."""
    return [(name.lower(), value) for name, value in request.headers.items()]


def _bearer(request: web.BaseRequest) -> str | None:
    values = request.headers.getall("Authorization", [])
    return bearer_token([("authorization", values[0])]) if len(values) == 1 else None


def _peer(request: web.BaseRequest) -> tuple[str, str]:
    """(address, peer) in gRPC's spelling (`ipv4:127.0.0.1`, `ipv4:127.0.0.1:5123`), so a
    peer's refusal and rate buckets are one whichever door it calls through."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return "unknown", "unknown"
    host, port = str(peer[0]), peer[1]
    address = f"ipv6:[{host}]" if ":" in host else f"ipv4:{host}"
    return address, f"{address}:{port}"


def _upstream(end: GenerationEnd) -> dict[str, str] | None:
    return {UPSTREAM_HEADER: end.upstream} if end.upstream else None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
