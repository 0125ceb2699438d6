"""A typed Python client for agentloop's AgentLoopService (sync and asyncio).

It wraps its own copy of the generated stubs (the messages are `agentloop_client.pb`) with
what every caller would otherwise repeat: a default deadline, round_robin balancing (or
conversation affinity with `session=`) and retries of UNAVAILABLE, keepalive, TLS, an API key
sent as a bearer token, streams as Python strings, and failures as exceptions carrying the
status code and the rich error details. The raw stub stays one attribute away (`client.stub`).
"""

from agentloop_client._proto.agentloop.v1 import agentloop_pb2 as pb
from agentloop_client.aio import AsyncAgentLoopClient
from agentloop_client.channel import DEFAULT_ADDRESS, SESSION_HEADER, ChannelConfig
from agentloop_client.client import AgentLoopClient
from agentloop_client.errors import (
    AgentLoopError,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from agentloop_client.requests import ClientTool, tool_calls_of

__all__ = [
    "DEFAULT_ADDRESS",
    "SESSION_HEADER",
    "AgentLoopClient",
    "AgentLoopError",
    "AsyncAgentLoopClient",
    "Cancelled",
    "ChannelConfig",
    "ClientTool",
    "DeadlineExceeded",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "pb",
    "tool_calls_of",
]
