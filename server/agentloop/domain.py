"""Engine-neutral types that flow between the rpc layer, the services and the backends.

Nothing here knows about protobuf, HTTP or llama.cpp: the rpc layer converts protos to
these types, the backends turn them into engine calls.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, TypeAlias


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class FinishReason(enum.Enum):
    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2
    #: The model called tools (GenerationEnd.tool_calls says which).
    TOOL_CALLS = 3


class OutputFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"
    JSON_SCHEMA = "json_schema"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call of a declared tool by the model (function calling)."""

    #: Identifies the call within the chat; a tool turn answers it by this id.
    id: str
    name: str
    #: The arguments: a JSON object, as text.
    arguments_json: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str
    images: tuple[bytes, ...] = ()
    #: The calls the model made in this turn (assistant turns only).
    tool_calls: tuple[ToolCall, ...] = ()
    #: The id of the call this turn answers (tool turns only).
    tool_call_id: str = ""


@dataclass(frozen=True, slots=True)
class ToolDefinition:
    """A function the caller declares and runs: the model may call it."""

    name: str
    description: str = ""
    #: JSON Schema of the arguments (an object schema), parsed within the schema limits.
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})


class ToolChoiceMode(enum.Enum):
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    #: The one tool named by ToolChoice.name.
    TOOL = "tool"


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    #: The tool the model must call (mode TOOL only).
    name: str = ""


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call as the model writes it: the pieces of one `index` make one
    call; the first carries its id and name, the `arguments_json` pieces join up."""

    index: int
    id: str = ""
    name: str = ""
    arguments_json: str = ""


class Priority(enum.IntEnum):
    """How much a call matters: under pressure sheddable calls go first, critical last."""

    SHEDDABLE = 0
    STANDARD = 1
    CRITICAL = 2


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who is calling and how the call may be served: resolved once in the rpc layer
    (rpc.requests.call_context) and carried with every piece of work the call causes."""

    #: The operator's name for the caller's tenant; "" when API keys are off (one tenant).
    tenant: str = ""
    #: The caller's `x-agentloop-session`: a session sticks to one endpoint of a pool.
    session: str = ""
    #: The caller forbids remote upstreams for this call (refused rather than sent away).
    local_only: bool = False
    priority: Priority = Priority.STANDARD
    #: Engine prefix caches and the response cache are shared only within one scope.
    cache_scope: str = ""
    #: Whom admission's fair queue tells apart: the named tenant, else the caller's address
    #: (the peer, or a trusted proxy's header). Never a metric label: not bounded.
    caller: str = ""
    #: The door the call came through: "grpc", or "http" (the OpenAI-compatible API).
    door: str = "grpc"


@dataclass(frozen=True, slots=True)
class RequestedOptions:
    """Sampling options as the client sent them: None means "use the server default"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repeat_penalty: float | None = None
    num_ctx: int | None = None


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """Sampling options with every default applied: what the backend receives."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    repeat_penalty: float
    num_ctx: int
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    kind: OutputFormat = OutputFormat.TEXT
    json_schema: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation, validated and with defaults applied. Exactly one of prompt/messages."""

    model: str
    options: SamplingOptions
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    system: str = ""
    format: ResponseFormat = field(default_factory=ResponseFormat)
    #: Tools the model may call, and whether it may, must or must not.
    tools: tuple[ToolDefinition, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    # time.monotonic() value after which the caller no longer wants an answer.
    deadline: float | None = None
    context: CallContext = CallContext()

    @property
    def is_chat(self) -> bool:
        return self.prompt is None

    @property
    def offers_tools(self) -> bool:
        """The model may (or must) call tools: there are some and the choice is not none."""
        return bool(self.tools) and self.tool_choice.mode is not ToolChoiceMode.NONE

    @property
    def forces_tool_call(self) -> bool:
        return self.offers_tools and self.tool_choice.mode in (
            ToolChoiceMode.REQUIRED, ToolChoiceMode.TOOL)

    def time_left(self) -> float | None:
        """Seconds until the deadline (None when the caller set none)."""
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    #: Of `input_tokens`, those served from the engine's prompt cache (not evaluated again).
    cached_input_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cached_input_tokens + other.cached_input_tokens,
        )


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds; None where the engine did not say."""

    total: float | None = None
    load: float | None = None
    prompt_eval: float | None = None
    eval: float | None = None
    time_to_first_token: float | None = None

    def as_measured(self, total: float, time_to_first_token: float) -> Timings:
        """These timings with the gateway's own total and time to first token (every call
        has them: a plain constructor, not `dataclasses.replace`)."""
        return Timings(total, self.load, self.prompt_eval, self.eval, time_to_first_token)


@dataclass(frozen=True, slots=True)
class GenerationEnd:
    """What the engine reports when a generation is done."""

    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    model: str
    #: The operator's name of the upstream that served the call ("" for a single engine).
    upstream: str = ""
    #: The tools the model called, whole and in order (finish_reason TOOL_CALLS).
    tool_calls: tuple[ToolCall, ...] = ()
    #: Prompt tokens the engine said it served from its cache where the caller is not told
    #: (`usage.cached_input_tokens` is 0 then): the pool's prefix index learns from it;
    #: nothing shows it to a caller.
    engine_cached_tokens: int = 0


#: What a generation stream yields: text deltas and tool-call deltas, then exactly one
#: GenerationEnd (which repeats the tool calls whole).
StreamItem: TypeAlias = str | ToolCallDelta | GenerationEnd


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """A whole generation: the text plus its end report."""

    text: str
    end: GenerationEnd


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    size_bytes: int = 0
    loaded: bool = False
    family: str = ""
    parameter_size: str = ""
    quantization_level: str = ""
    modified_at: float | None = None  # unix seconds
    expires_at: float | None = None  # unix seconds
    size_vram_bytes: int = 0
    #: The model answers Embed, with vectors of this length (0: not known).
    embeds: bool = False
    embedding_dimensions: int = 0


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """The result of one readiness check."""

    ready: bool
    reason: str = ""
    #: Models the engine holds in memory, where it says (Ollama's /api/ps): for metrics.
    loaded: tuple[ModelInfo, ...] = ()
    #: Names of the models the engine serves, where it says (Ollama's /api/tags): the
    #: only model names metrics use as labels.
    served: tuple[str, ...] = ()


# --- agent runs: the result of the agent loop (services/agent.py) -------------------------


class StopReason(enum.Enum):
    FINAL_ANSWER = 1
    MAX_STEPS = 2
    DEADLINE = 3
    TOOL_ERROR = 4
    MODEL_ERROR = 5
    CANCELLED = 6


@dataclass(frozen=True, slots=True)
class AgentStep:
    index: int
    duration: float
    thought: str = ""
    tool: str = ""
    arguments_json: str = ""
    observation: str = ""
    observation_truncated: bool = False
    error: str = ""


@dataclass(frozen=True, slots=True)
class AgentOutcome:
    final_answer: str
    stop_reason: StopReason
    steps: tuple[AgentStep, ...]
    usage: Usage
    model: str
    duration: float


# --- embeddings and token counts (Backend.embed / Backend.count_tokens) -------------------


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A batch of texts to embed, validated (caps on count and bytes already applied)."""

    model: str
    texts: tuple[str, ...]
    #: Scale each vector to length 1 (cosine similarity becomes a dot product).
    normalize: bool = True
    #: Cut a text longer than the model's context instead of refusing it.
    truncate: bool = False
    #: A shorter output dimension (Matryoshka models only); None = the model's own.
    dimensions: int | None = None
    deadline: float | None = None
    context: CallContext = CallContext()

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """One vector per text, in the request's order."""

    vectors: tuple[tuple[float, ...], ...]
    model: str
    input_tokens: int = 0
    #: The operator's name of the upstream that served the call ("" for a single engine).
    upstream: str = ""


@dataclass(frozen=True, slots=True)
class TokenCountRequest:
    """Count the tokens the model would see: texts one by one, or a chat as Generate takes it."""

    model: str
    texts: tuple[str, ...] = ()
    messages: tuple[ChatMessage, ...] = ()
    system: str = ""
    deadline: float | None = None
    context: CallContext = CallContext()

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass(frozen=True, slots=True)
class TokenCount:
    #: One count per text, or one for the whole chat.
    counts: tuple[int, ...]
    #: The model's context length in tokens (0 when the engine does not say).
    context_length: int
    model: str
    upstream: str = ""
