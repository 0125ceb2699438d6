"""What the HTTP backends (Ollama, OpenAI-compatible) share: reading a streamed body line by
line, mapping transport failures to the error table, and keeping upstream text clean.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import httpx

from agentloop.errors import (
    AgentLoopError,
    BackendStreamFailed,
    BackendUnavailable,
    ResourceExhausted,
)

#: Concurrent generations per connection pool: httpcore scans its whole pool on every
#: request and every response close, so beyond this many streams a backend spreads them
#: over several pools.
STREAMS_PER_POOL = 64


def client_pools(count: int, make: Callable[[], httpx.AsyncClient],
                 first: httpx.AsyncClient | None = None) -> list[httpx.AsyncClient]:
    """`count` connection pools (see STREAMS_PER_POOL); the first one, which also serves the
    control calls, may be given."""
    return [first or make(), *(make() for _ in range(count - 1))]


def url_address(url: str) -> tuple[str, int]:
    """Where a base URL points: host and port (server.address / server.port)."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


async def byte_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Split a streamed body into lines: per token much cheaper than httpx's aiter_lines
    (no text decoding layers; json.loads reads UTF-8 bytes itself)."""
    pending = b""
    async for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line
    if pending:
        yield pending


def transport_error(exc: httpx.HTTPError, before_headers: bool = False) -> AgentLoopError:
    """Map httpx failures; messages name the failure, never the URL."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return retryable(BackendUnavailable("the backend is unreachable", retry_after=1.0))
    if isinstance(exc, httpx.PoolTimeout):
        return ResourceExhausted("no free connection to the backend", retry_after=1.0)
    if isinstance(exc, httpx.ReadTimeout):
        return BackendStreamFailed("the backend stopped answering (read timeout)")
    if before_headers and isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError |
                                     httpx.WriteError):
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
