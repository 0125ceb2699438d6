"""What the routing layer hands a backend for one endpoint of an upstream pool.

The operator's pools file (upstreams.config) becomes these specs; each backend kind turns
one into one `Backend` for one endpoint. Nothing here opens a connection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

#: Calls one endpoint of an HTTP upstream serves at once when the pools file does not say
#: (Ollama's own default parallelism; an OpenAI-compatible server that batches more, such as
#: vLLM, wants its `max_in_flight` set).
DEFAULT_MAX_IN_FLIGHT = 4


class SchemaStyle(enum.StrEnum):
    """How an OpenAI-compatible upstream takes a JSON Schema in `response_format`."""

    #: OpenAI, vLLM, SGLang: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    JSON_SCHEMA = "json_schema"
    #: llama.cpp's and llama-cpp-python's servers: {"type": "json_object", "schema": {...}}
    JSON_OBJECT = "json_object"


class CompletionsFormat(enum.StrEnum):
    """How an OpenAI-compatible upstream's `/completions` takes a JSON Schema or JSON mode
    for a raw prompt (its chat endpoint takes `response_format`: see `SchemaStyle`)."""

    #: It takes none (OpenAI's legacy Completions): a raw prompt with a format is refused.
    NONE = "none"
    #: `response_format`, as its chat endpoint takes it (vLLM, SGLang).
    RESPONSE_FORMAT = "response_format"
    #: A `json_schema` field holding the schema (llama.cpp's server).
    JSON_SCHEMA = "json_schema"
    #: A GBNF `grammar` the gateway writes from the schema (llama-cpp-python's server, whose
    #: `/completions` ignores `response_format`).
    GRAMMAR = "grammar"


@dataclass(frozen=True, slots=True)
class OpenAIDialect:
    """Where OpenAI-compatible engines differ (../shared/openai-contract.md, "Dialects")."""

    schema_style: SchemaStyle = SchemaStyle.JSON_SCHEMA
    #: Streams end with a usage chunk when asked (`stream_options.include_usage`).
    stream_usage: bool = True
    #: `/completions` serves a raw `prompt`; without it a prompt is sent as one user turn.
    completions: bool = True
    #: How `/completions` takes a schema or JSON mode. The default refuses: an upstream
    #: that ignores `response_format` there would drop the constraint without a word.
    completions_format: CompletionsFormat = CompletionsFormat.NONE
    #: `strict` in a `json_schema` response format: true when the schema keeps to OpenAI's
    #: strict mode (an object root, every object closed with all its properties required),
    #: false otherwise. Off: `strict` is not sent (engines that enforce any schema).
    strict_schema: bool = True
    #: The most stop strings the upstream takes (OpenAI: 4; 0: no limit). The gateway cuts
    #: the stream at the others itself.
    stop_limit: int = 4
    #: `top_k` and the repeat penalty are accepted at the top level of the body.
    sampling_extras: bool = False
    #: The repeat penalty's name there: vLLM and SGLang `repetition_penalty`, llama.cpp's
    #: and llama-cpp-python's servers `repeat_penalty`.
    repeat_penalty_field: str = "repetition_penalty"
    #: vLLM's `cache_salt`: the prefix cache is shared only within one salt.
    cache_salt: bool = False
    #: `tool_choice: "required"` is honoured. llama-cpp-python's server honours only a named
    #: function: there a call required of one tool goes as that tool by name, a call
    #: required of one of several is refused (it would not be held).
    tool_choice_required: bool = True


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
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    dialect: OpenAIDialect = OpenAIDialect()
    #: Off the premises (the pools file's `remote`): never the caller's baggage.
    remote: bool = False
    #: Calls carry the W3C trace context (`traceparent`): the pools file's `propagate_trace`.
    propagate_trace: bool = True
