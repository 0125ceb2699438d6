"""The embedded engine's socket protocol: JSON frames, every message checked against a table.

A frame is a 4-byte big-endian length, then a JSON array of messages; a message is an array
`[kind, field, ...]`. `PARENT_MESSAGES` (gateway -> child) and `CHILD_MESSAGES` (child ->
gateway) name every kind with the types of its fields. `encode_frame` writes Python values
(dataclasses as arrays of their fields, enums as their values, bytes as base64);
`decode_frame` checks each message against its side's table and rebuilds the values,
refusing anything else with `WireError`. Nothing a frame holds is executed or imported: a
child taken over through llama.cpp can send the gateway wrong values, never code (pickle
would run whatever it wrote).

Adding a message kind is one entry in its side's table, `"kind": (FieldType, ...)`, where a
type is a plain type (str, int, float, bool, bytes), a frozen dataclass of such fields, an
enum, `X | None`, `tuple[X, ...]` or `dict[str, X]`; then the receiving side handles it
(`engine_child.serve` or `EmbeddedBackend._dispatch`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import struct
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from agentloop.backends.engine_types import EngineConfig, EngineStats
from agentloop.domain import (
    EmbeddingRequest,
    EmbeddingResult,
    GenerationEnd,
    GenerationRequest,
    ModelInfo,
    TokenCount,
    TokenCountRequest,
)
from agentloop.errors import (
    AgentLoopError,
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
    Cancelled,
    DeadlineExceeded,
    EngineRestarting,
    InvalidArgument,
    ModelNotFound,
    ResourceExhausted,
    RetryableError,
    ShuttingDown,
)

Message = tuple[Any, ...]

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
#: The largest frame either side accepts: a prompt within --max-prompt-bytes fits many
#: times over; a bigger length is a broken or hostile peer.
MAX_FRAME_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ErrorReport:
    """An engine error as plain data (`encode_error`, `decode_error`)."""

    kind: str  # the AgentLoopError class's name, one of _ERRORS
    message: str
    retry_after: float | None = None
    field: str = ""
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    violations: tuple[tuple[str, str], ...] = ()  # InvalidArgument's (field, why) pairs


PARENT_MESSAGES: dict[str, tuple[Any, ...]] = {
    "start": (EngineConfig, float, int),  # config, heartbeat seconds, log level
    "submit": (int, GenerationRequest),  # job id, request
    "embed": (int, EmbeddingRequest),  # job id, request (llama_embedder)
    "count": (int, TokenCountRequest),  # job id, request (llama_embedder)
    "cancel": (int,),  # job id
    "close": (),
}
CHILD_MESSAGES: dict[str, tuple[Any, ...]] = {
    "beat": (),  # while the model loads
    "ready": (ModelInfo, int),  # the model, tokens per slot
    "failed": (str,),  # the load failed: why
    "delta": (int, str),  # job id, text
    "end": (int, GenerationEnd),  # job id, its report (terminal)
    "embedding": (int, EmbeddingResult),  # job id, an embed job's answer (terminal)
    "token_count": (int, TokenCount),  # job id, a count job's answer (terminal)
    "error": (int, ErrorReport),  # job id, its error (terminal)
    "stats": (EngineStats, int),  # load, progress count
    "log": (int, str, str, str, int, str),  # level, logger, text, path, line, function
}
#: The kinds that carry a job's output (progress, for the watchdog).
JOB_ITEMS = frozenset({"delta", "end", "embedding", "token_count", "error"})

# The errors a child may report, by name; anything else arrives as BackendProtocolError.
_ERRORS: dict[str, type[AgentLoopError]] = {cls.__name__: cls for cls in (
    BackendProtocolError, BackendRejected, BackendUnavailable, Cancelled, DeadlineExceeded,
    EngineRestarting, InvalidArgument, ModelNotFound, ResourceExhausted, ShuttingDown)}


class WireError(ValueError):
    """A frame or message that does not fit the protocol."""


# --- frames ----------------------------------------------------------------------------------

def encode_frame(messages: list[Message]) -> bytes:
    body = json.dumps([_to_wire(list(message)) for message in messages],
                      separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


def frame_size(header: bytes) -> int:
    size = int(_HEADER.unpack(header)[0])
    if size > MAX_FRAME_BYTES:
        raise WireError(f"a frame of {size} bytes")
    return size


def decode_frame(body: bytes, table: Mapping[str, tuple[Any, ...]]) -> list[Message]:
    """The frame's messages as Python values, each checked against `table`."""
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise WireError("a frame that is not JSON") from exc
    if not isinstance(raw, list):
        raise WireError("a frame that is not a list of messages")
    return [decode_message(item, table) for item in raw]


def decode_message(raw: object, table: Mapping[str, tuple[Any, ...]]) -> Message:
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], str):
        raise WireError("a message that is not [kind, ...]")
    kind, values = raw[0], raw[1:]
    fields = table.get(kind)
    if fields is None:
        raise WireError(f"an unknown message kind {kind[:40]!r}")
    if len(values) != len(fields):
        raise WireError(f"a {kind!r} message with {len(values)} fields")
    return (kind, *(_from_wire(value, hint) for value, hint in zip(values, fields,
                                                                    strict=True)))


# --- errors ----------------------------------------------------------------------------------

def encode_error(exc: BaseException) -> ErrorReport:
    if not isinstance(exc, AgentLoopError) or type(exc).__name__ not in _ERRORS:
        exc = BackendProtocolError("the embedded engine failed")
    return ErrorReport(
        kind=type(exc).__name__,
        message=exc.message,
        retry_after=exc.retry_after if isinstance(exc, RetryableError) else None,
        field=exc.field if isinstance(exc, BackendRejected) else "",
        metadata=dict(exc.metadata),
        violations=tuple(exc.violations) if isinstance(exc, InvalidArgument) else (),
    )


def decode_error(report: ErrorReport) -> AgentLoopError:
    kind = _ERRORS.get(report.kind, BackendProtocolError)
    message = report.message[:1000]
    if issubclass(kind, InvalidArgument):
        return kind(report.violations)
    if issubclass(kind, RetryableError):
        return kind(message, retry_after=report.retry_after or 1.0, metadata=report.metadata)
    if issubclass(kind, BackendRejected):
        return kind(message, field=report.field[:200], metadata=report.metadata)
    return kind(message, metadata=report.metadata)


# --- values ----------------------------------------------------------------------------------

def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [_to_wire(getattr(value, f.name)) for f in _fields(type(value))]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_to_wire(item) for item in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {key: _to_wire(item) for key, item in value.items()}
    return value  # None, bool, int, float, str


def _from_wire(value: Any, hint: Any) -> Any:
    """`value` (decoded JSON) as the type `hint`; WireError when it is not one."""
    if hint is Any:  # a JSON value as such (a caller's schema)
        return value
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _from_wire(value, option)
                except WireError:
                    continue
        raise WireError(f"no {hint} in the message")
    if origin is tuple:
        items, args = _expect(value, list), typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_wire(item, args[0]) for item in items)
        if len(items) != len(args):
            raise WireError(f"{len(items)} values for {hint}")
        return tuple(_from_wire(item, arg) for item, arg in zip(items, args, strict=True))
    if origin is dict:
        _, item_type = typing.get_args(hint)
        return {_expect(key, str): _from_wire(item, item_type)
                for key, item in _expect(value, dict).items()}
    if dataclasses.is_dataclass(hint):
        fields = _fields(hint)
        values = _expect(value, list)
        if len(values) != len(fields):
            raise WireError(f"a {hint.__name__} with {len(values)} fields")
        hints = _hints(hint)
        arguments = {f.name: _from_wire(item, hints[f.name])
                     for f, item in zip(fields, values, strict=True)}
        try:
            return hint(**arguments)
        except (TypeError, ValueError) as exc:
            raise WireError(f"a {hint.__name__} that does not hold") from exc
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except (ValueError, TypeError):
            raise WireError(f"not a {hint.__name__}") from None
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise WireError("not a number")
    if hint is bytes:
        try:
            return base64.b64decode(_expect(value, str), validate=True)
        except binascii.Error:
            raise WireError("not base64") from None
    if hint in (str, int, bool):
        return _expect(value, hint)
    raise WireError(f"no wire form for {hint}")


def _expect(value: Any, kind: type) -> Any:
    # bool is an int to Python, never to the protocol.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(f"not a {kind.__name__}")
    return value


@cache
def _fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    return tuple(f for f in dataclasses.fields(cls) if f.init)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)

