"""Protobuf requests -> validated domain requests.

Every rule collects a (field path, reason) pair, so a client learns about all its bad
fields in one INVALID_ARGUMENT with a google.rpc.BadRequest.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any, Protocol

from agentloop.config import Settings
from agentloop.domain import (
    CallContext,
    ChatMessage,
    GenerationRequest,
    OutputFormat,
    Priority,
    RequestedOptions,
    ResponseFormat,
    Role,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    ToolDefinition,
)
from agentloop.errors import InvalidArgument
from agentloop.ranges import OPTION_RANGES
from agentloop.schema_limits import (
    MAX_SCHEMA_BYTES,
    SchemaRefused,
    check_schema,
    load_json,
    parse_schema,
)
from agentloop.services.generation import resolve_options
from agentloop.services.tools import ANY_OBJECT, TOOL_NAME
from agentloop.tenants import resolved_tenant
from agentloop.tool_calls import MAX_CALL_ID_CHARS, calls_schema
from agentloop.v1 import agentloop_pb2 as pb

MAX_STOP_SEQUENCES = 16
#: Longest stop string, in characters (Ollama and llama.cpp match each one on every token).
MAX_STOP_CHARS = 256
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}$")
_ROLES = {
    pb.ROLE_SYSTEM: Role.SYSTEM,
    pb.ROLE_USER: Role.USER,
    pb.ROLE_ASSISTANT: Role.ASSISTANT,
    pb.ROLE_TOOL: Role.TOOL,
}
_FORMATS = {
    pb.ResponseFormat.TYPE_UNSPECIFIED: OutputFormat.TEXT,
    pb.ResponseFormat.TYPE_TEXT: OutputFormat.TEXT,
    pb.ResponseFormat.TYPE_JSON: OutputFormat.JSON,
    pb.ResponseFormat.TYPE_JSON_SCHEMA: OutputFormat.JSON_SCHEMA,
}

_TOOL_CHOICES = {
    pb.ToolChoice.MODE_UNSPECIFIED: ToolChoiceMode.AUTO,
    pb.ToolChoice.MODE_AUTO: ToolChoiceMode.AUTO,
    pb.ToolChoice.MODE_NONE: ToolChoiceMode.NONE,
    pb.ToolChoice.MODE_REQUIRED: ToolChoiceMode.REQUIRED,
    pb.ToolChoice.MODE_TOOL: ToolChoiceMode.TOOL,
}
#: Tools one Generate may declare (as many as an agent run's client tools).
MAX_TOOLS = 64
#: The schemas of all of a request's tools together: they become one grammar.
MAX_TOOLS_SCHEMA_BYTES = 2 * MAX_SCHEMA_BYTES
#: Longest tool-call id kept (OpenAI's are about 30 characters).
MAX_TOOL_CALL_ID_CHARS = MAX_CALL_ID_CHARS
#: Tool calls one assistant turn may carry.
MAX_TOOL_CALLS_PER_TURN = 64

Violations = list[tuple[str, str]]


class GenerationFields(Protocol):
    """What GenerateRequest and StreamGenerateRequest have in common."""

    model: str
    prompt: str
    messages: list[pb.Message]
    system: str
    options: pb.GenerationOptions
    format: pb.ResponseFormat
    tools: list[pb.ToolDefinition]
    tool_choice: pb.ToolChoice

    def HasField(self, name: str) -> bool: ...


#: Conversation affinity: the calls of one session go to one replica (ring_hash) and, in an
#: upstream pool, to one endpoint (where its KV cache lives).
SESSION_HEADER = "x-agentloop-session"
#: A caller's "never send this call to a remote upstream", as a header (any RPC).
LOCAL_ONLY_HEADER = "x-agentloop-local-only"
#: Longest session id kept: the caller's text, hashed for picks, never a label.
MAX_SESSION_CHARS = 256


#: How much a call matters: critical, standard (the default) or sheddable.
PRIORITY_HEADER = "x-agentloop-priority"
#: A caller's own cache key (like vLLM's cache_salt): narrows prefix and response cache
#: sharing within its tenant, never widens it across tenants.
CACHE_KEY_HEADER = "x-agentloop-cache-key"
MAX_CACHE_KEY_CHARS = 128
#: Longest client address kept from a trusted proxy's header.
MAX_ADDRESS_CHARS = 64
_PRIORITY_NAMES = {p.name.lower(): p for p in Priority}
#: What x-agentloop-local-only may say (trimmed, any case); anything else is refused: a
#: privacy switch read as "off" because it was spelled `on` sent calls off the premises.
_LOCAL_ONLY_VALUES = {"true": True, "1": True, "false": False, "0": False}
#: The headers read once per call: sent twice, the call is refused (which one counted
#: would be a guess, and a guess must not decide where a call goes or what it shares).
_ONCE_HEADERS = (SESSION_HEADER, LOCAL_ONLY_HEADER, PRIORITY_HEADER, CACHE_KEY_HEADER)


def call_context(metadata: Any, peer: str = "", settings: Settings | None = None,
                 door: str = "grpc") -> CallContext:
    """Who is calling and how the call may be served: the call's metadata, its peer and the
    tenant the edge resolved (agentloop.tenants.RESOLVED_TENANT). A header the gateway
    reads that is repeated or holds a value outside its documented set is INVALID_ARGUMENT
    naming it."""
    headers: dict[str, str] = {}
    violations: Violations = []
    address = ""
    address_header = settings.client_address_header if settings is not None else ""
    for key, value in metadata or ():
        if not isinstance(value, str):
            continue
        if key in _ONCE_HEADERS:
            if key in headers and (key, _TWICE) not in violations:
                violations.append((key, _TWICE))
            headers[key] = value
        elif address_header and key == address_header:
            # The last entry is the one the trusted proxy added; earlier ones are the
            # caller's to invent (X-Forwarded-For).
            address = value.rpartition(",")[2].strip()[:MAX_ADDRESS_CHARS]
    local_only = _local_only(headers.get(LOCAL_ONLY_HEADER), violations)
    priority = _priority(headers.get(PRIORITY_HEADER), violations)
    cache_key = headers.get(CACHE_KEY_HEADER, "")
    if len(cache_key) > MAX_CACHE_KEY_CHARS:  # cut, two keys could share a scope
        violations.append((CACHE_KEY_HEADER, f"at most {MAX_CACHE_KEY_CHARS} characters"))
    if violations:
        raise InvalidArgument(violations)
    session = headers.get(SESSION_HEADER, "")[:MAX_SESSION_CHARS]
    tenant = resolved_tenant()
    if tenant.name:
        caller = tenant.name
        scope_base = "tenant:" + tenant.name
    else:
        caller = "addr:" + (address or peer_host(peer))
        one_domain = settings is not None and settings.one_trust_domain
        scope_base = "" if one_domain else caller
    return CallContext(
        tenant=tenant.name, session=session,
        local_only=local_only or not tenant.allow_remote,
        priority=min(priority, tenant.max_priority),
        cache_scope=cache_scope(scope_base, cache_key), caller=caller, door=door)


_TWICE = "sent more than once: send it once"


def _local_only(text: str | None, violations: Violations) -> bool:
    if text is None:
        return False
    local_only = _LOCAL_ONLY_VALUES.get(text.strip().lower())
    if local_only is None:
        violations.append((LOCAL_ONLY_HEADER, "must be true or 1 (local only), or false or 0"))
        return True
    return local_only


def _priority(text: str | None, violations: Violations) -> Priority:
    if text is None:
        return Priority.STANDARD
    priority = _PRIORITY_NAMES.get(text.strip().lower())
    if priority is None:
        violations.append((PRIORITY_HEADER, f"must be one of {', '.join(_PRIORITY_NAMES)}"))
        return Priority.STANDARD
    return priority


def peer_host(peer: str) -> str:
    """"ipv4:10.0.0.5:51234" -> "ipv4:10.0.0.5": a client's port changes per connection."""
    return peer.rpartition(":")[0] if peer.count(":") > 1 else peer


def cache_scope(base: str, cache_key: str) -> str:
    """The scope caches are shared within: a digest (it may reach an upstream as its
    cache salt, so it names no tenant or address), "" for everyone when both are empty."""
    if not base and not cache_key:
        return ""
    return hashlib.sha256(f"{base}\0{cache_key}".encode()).hexdigest()[:32]


def deadline_from(time_remaining: float | None) -> float | None:
    """Turn grpc's time_remaining() into a time.monotonic() deadline."""
    return None if time_remaining is None else time.monotonic() + time_remaining


def generation_request(
    message: GenerationFields,
    settings: Settings,
    default_model: str,
    deadline: float | None = None,
) -> GenerationRequest:
    """Validate a Generate/StreamGenerate request and apply the server's defaults."""
    violations: Violations = []
    prompt = message.prompt
    messages = chat_messages(message.messages, "messages", settings, violations)
    if prompt and message.messages:
        violations.append(("prompt", "set either prompt or messages, not both"))
    elif not message.messages and not prompt.strip():
        violations.append(("prompt", "must not be empty (or set messages instead)"))
    tools = tool_definitions(message.tools, violations)
    tool_choice = tool_choice_of(message.tool_choice, tools, violations)
    check_tool_turns(messages, violations)
    text_bytes = len(prompt.encode()) + len(message.system.encode()) + sum(
        len(m.content.encode()) + sum(len(c.arguments_json.encode()) for c in m.tool_calls)
        for m in messages  # () when there were too many
    ) + sum(len(t.description.encode()) for t in tools)
    if text_bytes > settings.max_prompt_bytes:
        violations.append((
            "messages" if message.messages else "prompt",
            f"prompt text is {text_bytes} bytes; the limit is {settings.max_prompt_bytes}",
        ))
    check_model(message.model, violations)
    options = requested_options(message.options, settings, violations, "options")
    response_format = response_format_of(message.format, violations, "format")
    if tools and tool_choice.mode is not ToolChoiceMode.NONE:
        if not message.messages:
            violations.append(("tools", "tools need a chat: set messages, not prompt"))
        if response_format.kind is not OutputFormat.TEXT:
            violations.append(("format", "a JSON format and tools the model may call do not "
                                         "go together: set one of them"))
    if violations:
        raise InvalidArgument(violations)
    return GenerationRequest(
        model=message.model or default_model,
        options=resolve_options(options, settings),
        prompt=None if message.messages else prompt,
        messages=messages,
        system=message.system,
        format=response_format,
        tools=tools,
        tool_choice=tool_choice,
        deadline=deadline,
    )


def chat_messages(
    messages: list[pb.Message], path: str, settings: Settings, violations: Violations
) -> tuple[ChatMessage, ...]:
    """Validate chat messages: known roles, content present, size limits.

    Counts are checked first and end the check: a request of millions of messages (or
    images) is refused without a look at each, which held the event loop for seconds."""
    if len(messages) > settings.max_messages:
        violations.append((path, f"{len(messages)} messages; the limit is {settings.max_messages}"))
        return ()
    images = sum(len(message.images) for message in messages)
    if images > settings.max_images:
        violations.append((
            f"{path}.images", f"{images} images; the limit is {settings.max_images}"))
        return ()
    image_bytes = 0
    converted = []
    for index, message in enumerate(messages):
        role = _ROLES.get(message.role)
        if role is None:
            violations.append((f"{path}[{index}].role", "must be set to a known role"))
            continue
        if any(not image for image in message.images):
            violations.append((f"{path}[{index}].images", "images must not be empty"))
        image_bytes += sum(len(image) for image in message.images)
        calls = _tool_calls(message, role, f"{path}[{index}]", violations)
        if message.tool_call_id and role is not Role.TOOL:
            violations.append((f"{path}[{index}].tool_call_id", "only a ROLE_TOOL message "
                                                                "answers a tool call"))
        if not message.content and not message.images and not calls:
            violations.append((f"{path}[{index}].content", "must not be empty"))
        converted.append(ChatMessage(role, message.content, tuple(message.images), calls,
                                     message.tool_call_id[:MAX_TOOL_CALL_ID_CHARS + 1]))
    if image_bytes > settings.max_image_bytes:
        violations.append((
            f"{path}.images",
            f"images total {image_bytes} bytes; the limit is {settings.max_image_bytes}",
        ))
    return tuple(converted)


def check_model(model: str, violations: Violations) -> None:
    if model and not _MODEL_NAME.fullmatch(model):  # not match: "$" passes a final "\n"
        violations.append(("model", "must be a model name like gemma3n:e2b"))


def requested_options(
    options: pb.GenerationOptions, settings: Settings, violations: Violations, path: str
) -> RequestedOptions:
    """Range-check the options the client set (ranges.OPTION_RANGES); unset ones stay None."""

    def present(name: str) -> bool:
        return options.HasField(name)

    def bad(name: str, why: str) -> None:
        violations.append((f"{path}.{name}", why))

    for name, bounds in OPTION_RANGES.items():
        problem = bounds.problem(getattr(options, name), settings) if present(name) else None
        if problem:
            bad(name, problem)
    if len(options.stop) > MAX_STOP_SEQUENCES:  # counted first: millions are not each read
        bad("stop", f"at most {MAX_STOP_SEQUENCES} stop strings")
    elif any(not stop for stop in options.stop):
        bad("stop", "stop strings must not be empty")
    elif any(len(stop) > MAX_STOP_CHARS for stop in options.stop):
        bad("stop", f"stop strings are limited to {MAX_STOP_CHARS} characters")
    return RequestedOptions(
        temperature=options.temperature if present("temperature") else None,
        top_p=options.top_p if present("top_p") else None,
        top_k=options.top_k if present("top_k") else None,
        max_tokens=options.max_tokens if present("max_tokens") else None,
        seed=options.seed if present("seed") else None,
        stop=tuple(options.stop) if len(options.stop) <= MAX_STOP_SEQUENCES else (),
        repeat_penalty=options.repeat_penalty if present("repeat_penalty") else None,
        num_ctx=options.num_ctx if present("num_ctx") else None,
    )


def response_format_of(
    fmt: pb.ResponseFormat, violations: Violations, path: str
) -> ResponseFormat:
    kind = _FORMATS.get(fmt.type)
    if kind is None:
        violations.append((f"{path}.type", "unknown format type"))
        return ResponseFormat()
    if kind is not OutputFormat.JSON_SCHEMA:
        if fmt.json_schema:
            violations.append((f"{path}.json_schema", "only allowed with TYPE_JSON_SCHEMA"))
        return ResponseFormat(kind)
    schema = schema_field(fmt.json_schema, f"{path}.json_schema", violations)
    if schema is None:
        return ResponseFormat()
    return ResponseFormat(kind, schema)


def schema_field(text: str, path: str, violations: Violations) -> dict[str, Any] | None:
    """A caller's JSON Schema within the schema limits, or None and a violation."""
    try:
        return parse_schema(text)
    except SchemaRefused as exc:
        violations.append((path, str(exc)))
        return None


def _tool_calls(message: pb.Message, role: Role, path: str,
                violations: Violations) -> tuple[ToolCall, ...]:
    """An assistant turn's tool calls: ids and names well-formed, arguments a JSON object."""
    if not message.tool_calls:
        return ()
    if role is not Role.ASSISTANT:
        violations.append((f"{path}.tool_calls", "only a ROLE_ASSISTANT message carries "
                                                 "tool calls"))
        return ()
    if len(message.tool_calls) > MAX_TOOL_CALLS_PER_TURN:
        violations.append((f"{path}.tool_calls", f"{len(message.tool_calls)} calls; the limit "
                                                 f"is {MAX_TOOL_CALLS_PER_TURN}"))
        return ()
    calls = []
    for index, call in enumerate(message.tool_calls):
        where = f"{path}.tool_calls[{index}]"
        if not call.id or len(call.id) > MAX_TOOL_CALL_ID_CHARS:
            violations.append((f"{where}.id", f"must be 1 to {MAX_TOOL_CALL_ID_CHARS} "
                                              "characters"))
        if not TOOL_NAME.match(call.name):
            violations.append((f"{where}.name", "must match [A-Za-z0-9_-]{1,64}"))
        try:
            arguments = load_json(call.arguments_json)
        except ValueError as exc:
            violations.append((f"{where}.arguments_json", f"not valid JSON ({exc})"))
        else:
            if not isinstance(arguments, dict):
                violations.append((f"{where}.arguments_json", "must be a JSON object"))
        calls.append(ToolCall(call.id, call.name, call.arguments_json))
    return tuple(calls)


def check_tool_turns(messages: tuple[ChatMessage, ...], violations: Violations) -> None:
    """Every tool turn answers a call an earlier assistant turn made (by its id), once; a
    chat with tool calls names the call in each of its tool turns."""
    made: set[str] = set()
    answered: set[str] = set()
    for index, message in enumerate(messages):
        for call in message.tool_calls:
            if call.id in made:
                violations.append((f"messages[{index}].tool_calls",
                                   f"the call id {call.id[:64]!r} is used twice in the chat"))
            made.add(call.id)
        if message.role is not Role.TOOL:
            continue
        call_id = message.tool_call_id
        if not call_id:
            if made:
                violations.append((f"messages[{index}].tool_call_id",
                                   "must name the tool call this message answers"))
        elif call_id not in made:
            violations.append((f"messages[{index}].tool_call_id",
                               f"{call_id[:64]!r} answers no tool call of an earlier "
                               "assistant message"))
        elif call_id in answered:
            violations.append((f"messages[{index}].tool_call_id",
                               f"the call {call_id[:64]!r} is answered twice"))
        answered.add(call_id)


def tool_definitions(declared: list[pb.ToolDefinition],
                     violations: Violations) -> tuple[ToolDefinition, ...]:
    """The request's tools: good unique names, object schemas within the schema limits,
    and all of them together small enough to become one grammar."""
    if len(declared) > MAX_TOOLS:  # and none of them is read: each may cost work
        violations.append(("tools", f"{len(declared)} tools; the limit is {MAX_TOOLS}"))
        return ()
    schema_bytes = sum(len(tool.parameters_json_schema.encode()) for tool in declared)
    if schema_bytes > MAX_TOOLS_SCHEMA_BYTES:
        violations.append(("tools", f"the tools' schemas are {schema_bytes} bytes; the limit "
                                    f"is {MAX_TOOLS_SCHEMA_BYTES}"))
        return ()
    tools: list[ToolDefinition] = []
    seen: set[str] = set()
    problems = len(violations)
    for index, tool in enumerate(declared):
        path = f"tools[{index}]"
        if not TOOL_NAME.match(tool.name):
            violations.append((f"{path}.name", "must match [A-Za-z0-9_-]{1,64}"))
        elif tool.name in seen:
            violations.append((f"{path}.name", f"{tool.name!r} is declared twice"))
        seen.add(tool.name)
        schema = parameters_schema(tool.parameters_json_schema,
                                   f"{path}.parameters_json_schema", violations)
        tools.append(ToolDefinition(tool.name, tool.description, schema))
    if tools and len(violations) == problems:
        try:  # the union the engines constrain a call by: bounded as one schema
            check_schema(calls_schema(tools))
        except SchemaRefused as exc:
            violations.append(("tools", f"the tools together are too large a schema: {exc}"))
    return tuple(tools)


def parameters_schema(text: str, path: str, violations: Violations) -> dict[str, Any]:
    """A tool's arguments schema: an object schema within the schema limits ("" = any)."""
    if not text:
        return dict(ANY_OBJECT)
    schema = schema_field(text, path, violations)
    if schema is None:
        return dict(ANY_OBJECT)
    if schema.get("type", "object") != "object":
        violations.append((path, 'must describe an object ("type": "object")'))
    return schema


def tool_choice_of(choice: pb.ToolChoice, tools: tuple[ToolDefinition, ...],
                   violations: Violations) -> ToolChoice:
    mode = _TOOL_CHOICES.get(choice.mode)
    if mode is None:
        violations.append(("tool_choice.mode", "unknown tool choice mode"))
        return ToolChoice()
    if mode is ToolChoiceMode.TOOL:
        names = {tool.name for tool in tools}
        if choice.name not in names:
            known = ", ".join(sorted(names)) or "none"
            violations.append(("tool_choice.name", f"{choice.name[:64]!r} is not one of the "
                                                   f"request's tools ({known[:300]})"))
    elif choice.name:
        violations.append(("tool_choice.name", "only allowed with MODE_TOOL"))
    if mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.TOOL) and not tools:
        violations.append(("tool_choice.mode", "the model cannot call a tool: set tools"))
    return ToolChoice(mode, choice.name if mode is ToolChoiceMode.TOOL else "")
