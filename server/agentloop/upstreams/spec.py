"""What the routing layer hands a backend for one endpoint of an upstream pool.

The operator's pools file (upstreams.config) becomes these specs; each backend kind turns
one into one `Backend` for one endpoint. Nothing here opens a connection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SchemaStyle(enum.StrEnum):
    """How an OpenAI-compatible upstream takes a JSON Schema in `response_format`."""

    #: OpenAI, vLLM, SGLang: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    JSON_SCHEMA = "json_schema"
    #: llama.cpp's and llama-cpp-python's servers: {"type": "json_object", "schema": {...}}
    JSON_OBJECT = "json_object"


@dataclass(frozen=True, slots=True)
class OpenAIDialect:
    """Where OpenAI-compatible engines differ (../shared/openai-contract.md, "Dialects")."""

    schema_style: SchemaStyle = SchemaStyle.JSON_SCHEMA
    #: Streams end with a usage chunk when asked (`stream_options.include_usage`).
    stream_usage: bool = True
    #: `/completions` serves a raw `prompt`; without it a prompt is sent as one user turn.
    completions: bool = True
    #: `top_k` and the repeat penalty are accepted at the top level of the body.
    sampling_extras: bool = False
    #: The repeat penalty's name there: vLLM and SGLang `repetition_penalty`, llama.cpp's
    #: and llama-cpp-python's servers `repeat_penalty`.
    repeat_penalty_field: str = "repetition_penalty"
    #: vLLM's `cache_salt`: the prefix cache is shared only within one salt.
    cache_salt: bool = False


@dataclass(frozen=True, slots=True)
class TlsSpec:
    #: Verify the upstream's certificate (against `ca_file`, or the system's roots).
    verify: bool = True
    ca_file: str = ""
    #: A client certificate and key for mutual TLS.
    client_cert: str = ""
    client_key: str = ""


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One endpoint of one upstream: where it is, how to reach it, how much it takes."""

    #: The operator's name of the upstream (bounded: span and metric labels use it).
    upstream: str
    #: "ollama", "openai" or "embedded".
    kind: str
    #: Base URL: Ollama's root, or an OpenAI-compatible API's base including `/v1`.
    url: str = ""
    #: Sent as `Authorization: Bearer ...`; read from the environment or a file, never logged.
    api_key: str = field(default="", repr=False)
    #: The name to send as Host and TLS SNI when `url` holds a resolved address.
    host: str = ""
    tls: TlsSpec = TlsSpec()
    connect_timeout: float = 2.0
    #: Longest silence while reading a response (between two chunks of a stream).
    read_timeout: float = 300.0
    #: Calls this endpoint serves at once; more wait in the pool's queue.
    max_in_flight: int = 4
    dialect: OpenAIDialect = OpenAIDialect()
    #: Off the premises (the pools file's `remote`): never the caller's baggage.
    remote: bool = False
    #: Calls carry the W3C trace context (`traceparent`): the pools file's `propagate_trace`.
    propagate_trace: bool = True
