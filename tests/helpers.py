"""Test helpers: start the real gateway on port 0, read rich error details, read the docs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from agentloop.config import Settings, load_settings
from agentloop.server import RunningServer, start_server
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
DETAILS_KEY = "grpc-status-details-bin"
# What the fake Ollama streams in most tests.
TOKENS = ["Hello", ",", " world", "!"]


def gateway_settings(**overrides: Any) -> Settings:
    """Settings for a gateway under test: port 0, fast health checks, no drain delay."""
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "backend": "ollama",
        "health_interval": 0.05,
        "health_timeout": 0.5,
        "drain_delay": 0.0,
        "shutdown_grace": 1.0,
        "connect_timeout": 0.5,
        "read_timeout": 10.0,
        # One backend call per request and no load request in fake.generation_requests;
        # test_faults.py covers retries and warm-up.
        "retry_attempts": 0,
        "warm_up": False,
        # No fixed Prometheus port: test_telemetry.py asks for port 0 where it scrapes.
        "metrics_listen": "",
        # Background runs in memory: test_runs.py names a file where it restarts a gateway.
        "run_store": ":memory:",
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings, **kwargs: Any) -> AsyncIterator[RunningServer]:
    """Start the real server and always shut it down."""
    running = await start_server(settings, **kwargs)
    try:
        yield running
    finally:
        await running.shutdown(grace=0.5, drain_delay=0.0)


@contextlib.asynccontextmanager
async def client_stub(address: str) -> AsyncIterator[pb_grpc.AgentLoopServiceStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield pb_grpc.AgentLoopServiceStub(channel)


def rich_details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """Unpack google.rpc details by type name: {"BadRequest": msg, "RetryInfo": msg, ...}."""
    trailers = dict(error.trailing_metadata() or ())
    raw = trailers.get(DETAILS_KEY)
    if raw is None:
        return {}
    status = status_pb2.Status.FromString(raw)
    assert status.code == error.code().value[0], "rich status code differs from the call's"
    unpacked: dict[str, Any] = {}
    for detail in status.details:
        for kind in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo,
                     error_details_pb2.RetryInfo, error_details_pb2.QuotaFailure):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                unpacked[kind.DESCRIPTOR.name] = message
    return unpacked


def bad_fields(error: grpc.aio.AioRpcError) -> set[str]:
    """The field names a BadRequest detail names."""
    bad_request = rich_details(error).get("BadRequest")
    assert bad_request is not None, f"no BadRequest in {error.code()}: {error.details()}"
    return {violation.field for violation in bad_request.field_violations}


async def read_to_end(call: grpc.aio.UnaryStreamCall) -> list[Any]:
    """The rest of a stream already read with call.read() (iteration may not be mixed in)."""
    replies = []
    while (reply := await call.read()) is not grpc.aio.EOF:
        replies.append(reply)
    return replies


def markdown_section(page: str, heading: str) -> str:
    """The text under the heading line `heading` of the repository's Markdown file `page`, up
    to the next heading of the same or a higher level (`#` lines in code blocks are code)."""
    depth = heading.index(" ")
    lines: list[str] = []
    inside = fenced = False
    for line in (ROOT / page).read_text(encoding="utf-8").splitlines(keepends=True):
        hashes = len(line) - len(line.lstrip("#"))
        if not fenced and line.rstrip("\n") == heading:
            inside = True
            continue
        if not fenced and 0 < hashes <= depth and line[hashes:hashes + 1] == " " and inside:
            break
        fenced ^= line.startswith("```")
        if inside:
            lines.append(line)
    assert inside, f"{page} has no heading {heading!r}"
    return "".join(lines)


#: A small JSON Schema the real-model tests constrain decoding with.
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
