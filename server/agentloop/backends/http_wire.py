"""What the HTTP backends (Ollama, OpenAI-compatible) share: the aiohttp connection pool to
one upstream, reading a streamed body line by line, mapping transport failures to the error
table, and keeping upstream text clean.

aiohttp rather than httpx: its C HTTP parser and flat connection pool cost a quarter of
httpx's CPU per request (0.27 against 1.0 ms per one-token stream, measured side by side on
the fake in one process), and what the gateway adds to a first token is mostly its own CPU.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiohttp.helpers
import yarl
from opentelemetry import propagate
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from agentloop.backends.bounds import (
    END_GRACE_SECONDS,
    END_TRAILER_BYTES,
    ERROR_BODY_BYTES,
    MAX_NDJSON_LINE_BYTES,
)
from agentloop.errors import (
    AgentLoopError,
    BackendStreamFailed,
    BackendUnavailable,
    UpstreamProtocolError,
)

#: What a call to an upstream can fail with: aiohttp's errors, and the end of a call's
#: whole-call timeout (health checks).
HTTP_FAILURES = (aiohttp.ClientError, TimeoutError)


class HttpUpstream:
    """One upstream's connection pool and the requests to it (both HTTP backends).

    At most `connections` open, kept alive for a minute. `connect` covers the wait for a
    free connection and the connecting; each read waits at most `read_timeout` (a slow
    prompt's first token included). The pool is made on first use: aiohttp needs the
    running event loop. No redirect is followed (an upstream that redirects is
    misconfigured, and a key must not follow it); HTTP(S)_PROXY and NO_PROXY are honoured
    as httpx honoured them, looked up once here (aiohttp's trust_env looks them up on a
    thread for every request)."""

    def __init__(self, url: str, *, connections: int, connect_timeout: float,
                 pool_timeout: float, read_timeout: float,
                 headers: dict[str, str] | None = None, tls: ssl.SSLContext | None = None,
                 server_hostname: str = "") -> None:
        self.base = url.rstrip("/")
        self._connector: dict[str, Any] = {
            "limit": connections, "limit_per_host": 0, "keepalive_timeout": 60.0,
            "ssl": (tls or ssl.create_default_context()) if url.startswith("https:") else False}
        self._timeout = aiohttp.ClientTimeout(total=None, connect=pool_timeout + connect_timeout,
                                              sock_connect=connect_timeout,
                                              sock_read=read_timeout)
        self._headers = headers
        self._options: dict[str, Any] = {"allow_redirects": False}
        if server_hostname:  # the name the certificate carries when `url` holds an address
            self._options["server_hostname"] = server_hostname
        try:
            proxy, auth = aiohttp.helpers.get_env_proxy_for_url(yarl.URL(url))
            self._options.update(proxy=proxy, proxy_auth=auth)
        except LookupError:
            pass
        self._session: aiohttp.ClientSession | None = None

    def request(self, method: str, path: str, *, body: object = None,
                headers: dict[str, str] | None = None, timeout: float | None = None
                ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """One request (an async context manager for its response; leaving it before the
        body's end closes the connection): the body as JSON, a timeout for the whole call
        where given."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(**self._connector), timeout=self._timeout,
                headers=self._headers, raise_for_status=False)
        options = dict(self._options)
        if body is not None:
            options["data"] = json.dumps(body).encode()
            headers = {**(headers or {}), "Content-Type": "application/json"}
        if timeout is not None:
            options["timeout"] = aiohttp.ClientTimeout(total=timeout)
        return self._session.request(method, self.base + path, headers=headers, **options)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def url_address(url: str) -> tuple[str, int]:
    """Where a base URL points: host and port (server.address / server.port)."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


async def byte_lines(chunks: AsyncIterator[bytes],
                     max_line: int = MAX_NDJSON_LINE_BYTES) -> AsyncIterator[bytes]:
    """Split a streamed body into lines: no text decoding layers (json.loads reads UTF-8
    bytes itself). A line longer than `max_line` fails the stream (UNAVAILABLE)."""
    pending = b""
    async for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if len(line) > max_line:
                raise line_too_long()
            yield line
        if len(pending) > max_line:
            raise line_too_long()
    if pending:
        yield pending


def line_too_long() -> UpstreamProtocolError:
    return UpstreamProtocolError("the upstream sent a line beyond any answer's size")


async def read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """A whole answer of at most `limit` bytes: a larger Content-Length is refused before a
    byte is read, a body growing past it is dropped as it does (UNAVAILABLE)."""
    if response.content_length is not None and response.content_length > limit:
        raise answer_too_large()
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise answer_too_large()
    return bytes(body)


def answer_too_large() -> UpstreamProtocolError:
    return UpstreamProtocolError("the upstream's answer is beyond any size")


async def read_head(response: aiohttp.ClientResponse, limit: int = ERROR_BODY_BYTES) -> bytes:
    """At most the first `limit` bytes of a body (an error's): the rest is never read (the
    connection is dropped with the response)."""
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


async def read_trailer(rest: AsyncIterator[object]) -> None:
    """After a stream's last chunk: read what is left, so that the connection goes back to
    the pool, for END_GRACE_SECONDS at most. An upstream still sending then (comments,
    keep-alives, more chunks) or past END_TRAILER_BYTES is left: leaving the response
    drops its connection."""
    read = 0
    try:
        async with asyncio.timeout(END_GRACE_SECONDS):
            async for item in rest:
                read += len(item) if isinstance(item, bytes) else 1
                if read > END_TRAILER_BYTES:
                    return
    except (AgentLoopError, *HTTP_FAILURES):  # the answer is whole: what follows is not
        pass


def transport_error(exc: BaseException, before_headers: bool = False) -> AgentLoopError:
    """Map a failure of HTTP_FAILURES; messages name the failure, never the URL."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return retryable(BackendUnavailable("the backend is unreachable", retry_after=1.0))
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return BackendStreamFailed("the backend stopped answering (read timeout)")
    if isinstance(exc, TimeoutError):  # a whole call's timeout
        return retryable(BackendUnavailable("the backend did not answer in time",
                                            retry_after=1.0))
    if before_headers and isinstance(exc, aiohttp.ServerDisconnectedError |
                                     aiohttp.ClientOSError):
        return retryable(BackendUnavailable(
            "the backend dropped the connection before answering", retry_after=1.0))
    return BackendStreamFailed(f"the connection to the backend failed ({type(exc).__name__})")


def retryable(error: AgentLoopError) -> AgentLoopError:
    """Mark a failure that happened before the engine started on the request."""
    error.retryable_before_first_token = True
    return error


_URL_OR_ADDRESS = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b",
                             re.IGNORECASE)


def clean(message: object) -> str:
    """Keep backend messages short, single-line and free of internal addresses."""
    return _URL_OR_ADDRESS.sub("<address>", " ".join(str(message).split()))[:300]


_W3C_TRACE_CONTEXT = TraceContextTextMapPropagator()


def trace_headers(propagate_trace: bool, remote: bool) -> dict[str, str]:
    """The trace headers an upstream call carries (the current span is its parent): none
    unless the operator's pools file lets this upstream have them (`propagate_trace`); a
    remote upstream gets the W3C trace context alone (`traceparent`, `tracestate`), never
    the caller's baggage; a local one what the process's propagators carry."""
    headers: dict[str, str] = {}
    if propagate_trace:
        (_W3C_TRACE_CONTEXT if remote else propagate).inject(headers)
    return headers
