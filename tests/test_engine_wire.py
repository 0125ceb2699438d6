"""The embedded engine's socket protocol: typed JSON messages, never pickle.

A child taken over through llama.cpp writes what it likes on its socket: the gateway must
read only the message kinds and field types of its table, and nothing it reads may run code.
"""

from __future__ import annotations

import json
import pickle
import socket
import struct

import pytest

from agentloop.backends import engine_child
from agentloop.backends.engine_types import EngineConfig, EngineStats
from agentloop.backends.engine_wire import (
    CHILD_MESSAGES,
    HEADER_SIZE,
    MAX_FRAME_BYTES,
    PARENT_MESSAGES,
    WireError,
    decode_error,
    decode_frame,
    encode_frame,
    frame_size,
)
from agentloop.domain import (
    CallContext,
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationEnd,
    GenerationRequest,
    OutputFormat,
    Priority,
    ResponseFormat,
    Role,
    SamplingOptions,
    Timings,
    TokenCount,
    TokenCountRequest,
    Usage,
)

REQUEST = GenerationRequest(
    model="gemma",
    options=SamplingOptions(temperature=0.5, top_p=0.9, top_k=40, max_tokens=8,
                            repeat_penalty=1.1, num_ctx=1024, seed=None, stop=("\n", "END")),
    messages=(ChatMessage(Role.USER, "hi <eos> ✓", images=(b"\x00\xff",)),
              ChatMessage(Role.ASSISTANT, "hello")),
    system="be brief",
    format=ResponseFormat(OutputFormat.JSON_SCHEMA,
                          {"type": "object", "properties": {"b": {}, "a": {}}}),
    deadline=123.5,
    context=CallContext(tenant="t", session="s", priority=Priority.CRITICAL, cache_scope="c"),
)


def roundtrip(messages: list[tuple], table) -> list[tuple]:
    frame = encode_frame(messages)
    assert frame_size(frame[:HEADER_SIZE]) == len(frame) - HEADER_SIZE
    return decode_frame(frame[HEADER_SIZE:], table)


def test_every_message_crosses_whole():
    config = EngineConfig("/m.gguf", 1024, 4, 2, prefix_reuse=False, batch_tokens=64)
    parent = [("start", config, 0.25, 20), ("submit", 7, REQUEST), ("cancel", 7), ("close",),
              ("embed", 8, EmbeddingRequest("m", ("a", "b"), dimensions=64, deadline=1.5)),
              ("count", 9, TokenCountRequest("m", messages=REQUEST.messages, system="s"))]
    end = GenerationEnd(FinishReason.LENGTH, Usage(5, 8, 3), Timings(load=0.0, eval=1.5), "m")
    child = [("delta", 7, "text"), ("end", 7, end),
             ("embedding", 8, EmbeddingResult(((0.5, -1.0), (0.0, 2.0)), "m", 4)),
             ("token_count", 9, TokenCount((3, 4), 1024, "m")),
             ("stats", EngineStats(4, 1, 1, 0, 10, 4096, steps=3, nodes=900), 12),
             ("log", 30, "agentloop.x", "line", "/p.py", 3, "f"), ("beat",)]

    assert roundtrip(parent, PARENT_MESSAGES) == parent
    assert roundtrip(child, CHILD_MESSAGES) == child
    # A schema's key order is the order the grammar writes properties in: it stays.
    [(_, _, request)] = roundtrip([("submit", 1, REQUEST)], PARENT_MESSAGES)
    assert list(request.format.json_schema["properties"]) == ["b", "a"]


@pytest.mark.parametrize("body", [
    pickle.dumps([("delta", 1, "x")]),  # the old protocol: not even read
    b'[["submit", 1, "x"]]',  # a parent's kind from the child
    b'[["delta", "1", "x"]]',  # a job id that is not an int
    b'[["delta", true, "x"]]',  # a bool is not an int here
    b'[["delta", 1]]',  # a field missing
    b'[["end", 1, [9, [1, 2, 3], [null, null, null, null, null], "m", ""]]]',  # no such reason
    b'[["stats", [1, 1, 1, 0, 1, 1, 0, 0, "soon"], 1]]',  # a float that is a string
    b'[["error", 1, ["X", "m", null, "", {"k": 1}, []]]]',  # metadata values are strings
    b"[" * 100_000,  # nested past the parser's depth
    b'{"delta": 1}',
], ids=lambda body: repr(body[:30]))
def test_a_frame_off_the_table_is_refused(body: bytes):
    with pytest.raises(WireError):
        decode_frame(body, CHILD_MESSAGES)


def test_a_frame_length_past_the_limit_is_refused_before_it_is_read():
    with pytest.raises(WireError):
        frame_size(struct.pack(">I", MAX_FRAME_BYTES + 1))


def test_an_unknown_error_kind_arrives_as_a_protocol_error():
    body = json.dumps([["error", 1, ["SystemExit", "bye", None, "", {}, []]]]).encode()
    [(_, _, report)] = decode_frame(body, CHILD_MESSAGES)
    error = decode_error(report)

    assert type(error).__name__ == "BackendProtocolError" and error.message == "bye"


def read_frame(sock: socket.socket) -> list[tuple]:
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            assert chunk, "the socket closed mid-frame"
            data += chunk
        return data
    return decode_frame(exactly(frame_size(exactly(HEADER_SIZE))), CHILD_MESSAGES)


def test_a_decode_steps_items_leave_the_child_in_one_frame():
    """The engine hands the child's sink a step's items at once (`many`): they go out as
    one frame, so the parent wakes once per step, not once per token."""
    ours, theirs = socket.socketpair()
    channel = engine_child._Channel(ours)
    sink = engine_child._Sink(channel)
    end = GenerationEnd(finish_reason=FinishReason.LENGTH, usage=Usage(3, 1, 0),
                        timings=Timings(), model="m")
    try:
        theirs.settimeout(10)
        sink.many([(1, "a"), (2, "b"), (1, end)])
        assert read_frame(theirs) == [("delta", 1, "a"), ("delta", 2, "b"), ("end", 1, end)]
        sink(2, "c")
        assert read_frame(theirs) == [("delta", 2, "c")]
    finally:
        channel.close()
        theirs.close()
