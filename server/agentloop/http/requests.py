"""OpenAI request bodies -> the gRPC API's request messages -> the domain, by one set of rules.

The door validates nothing the gRPC servicer does not: it reads the JSON into the protobuf
request the gRPC API takes (checking only what JSON leaves open: types, and the OpenAI
fields that have no counterpart), then the rpc layer's own reading
(`rpc.requests.generation_request`, `rpc.embedding_requests.embedding_request`) applies
every rule and every limit; its field names come back in OpenAI's terms
(`options.temperature` -> `temperature`), so a 400 names the `param` the caller sent.

Function calling maps onto Generate's own: `tools` onto its tool definitions (each
schema as text, read within the schema limits there), `tool_choice` onto its tool choice,
assistant `tool_calls` and `tool` turns onto its messages; the rules (names, schemas, which
call a tool turn answers) are the rpc layer's, named back as OpenAI's parameters.

What the gRPC API cannot do is refused, never ignored: a request that asks for it would
get another answer than it asked for (legacy `functions`, `parallel_tool_calls: false`).
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agentloop.config import Settings
from agentloop.errors import InvalidArgument
from agentloop.rpc.requests import MAX_STOP_SEQUENCES, MAX_TOOL_CALLS_PER_TURN, MAX_TOOLS
from agentloop.v1 import agentloop_pb2 as pb

Json = dict[str, Any]
Violations = list[tuple[str, str]]
#: Turns a field path of the gRPC request into the OpenAI parameter the caller sent.
Rename = Callable[[str], str]

#: Function calling's fields; `functions` and `function_call` are the legacy ones (refused).
TOOL_FIELDS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")
#: Fields that change nothing about the answer: who the end user is, what to store.
INERT_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})
#: The gRPC API's options, by their OpenAI names (top_k, repeat_penalty and num_ctx are
#: llama.cpp's and vLLM's extras, as extra_body in the SDKs).
_SAMPLING = frozenset({"temperature", "top_p", "max_tokens", "seed", "stop", "top_k",
                       "repeat_penalty", "num_ctx"})
#: OpenAI fields with no counterpart here: accepted at the value that changes nothing.
_NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False,
            "top_logprobs": 0, "logit_bias": {}, "echo": False, "best_of": 1, "suffix": "",
            "modalities": ["text"]}
CHAT_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "response_format",
                         "max_completion_tokens", "n", "presence_penalty", "frequency_penalty",
                         "logprobs", "top_logprobs", "logit_bias", "modalities", *_SAMPLING,
                         *INERT_FIELDS, *TOOL_FIELDS})
COMPLETION_FIELDS = frozenset({"model", "prompt", "stream", "stream_options", "n",
                               "presence_penalty", "frequency_penalty", "logprobs",
                               "logit_bias", "echo", "best_of", "suffix", *_SAMPLING,
                               *INERT_FIELDS})
EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions",
                              *INERT_FIELDS})
ENCODING_FORMATS = ("float", "base64")

_ROLES = {"system": pb.ROLE_SYSTEM, "developer": pb.ROLE_SYSTEM, "user": pb.ROLE_USER,
          "assistant": pb.ROLE_ASSISTANT, "tool": pb.ROLE_TOOL}
_TOOL_CHOICE_MODES = {"none": pb.ToolChoice.MODE_NONE, "auto": pb.ToolChoice.MODE_AUTO,
                      "required": pb.ToolChoice.MODE_REQUIRED}
#: A tool's `function` object: `strict` is accepted as response_format's is (the embedded
#: engine always holds a call to its schema; an upstream gets the schema as it is).
_FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})
_LEGACY_FUNCTIONS = "legacy function calling is not taken: send tools (and tool_choice)"
_FORMAT_TYPES = {"text": pb.ResponseFormat.TYPE_TEXT,
                 "json_object": pb.ResponseFormat.TYPE_JSON,
                 "json_schema": pb.ResponseFormat.TYPE_JSON_SCHEMA}
_INT32 = (-2**31, 2**31 - 1)
_INT64 = (-2**63, 2**63 - 1)
_DATA_URL_BASE64 = ";base64,"
#: Most parts of one message's content read: a message is text and a few images.
MAX_CONTENT_PARTS = 64


@dataclass(frozen=True, slots=True)
class GenerationCall:
    """A chat or text completion, as the gRPC API's request and how to answer it."""

    message: pb.GenerateRequest
    stream: bool
    include_usage: bool
    rename: Rename

    @property
    def carries_schema(self) -> bool:
        """Schemas to check (a format's, tools'): read off the loop, as Generate reads."""
        return bool(self.message.format.json_schema) or bool(self.message.tools)


@dataclass(frozen=True, slots=True)
class EmbeddingCall:
    message: pb.EmbedRequest
    base64: bool


class Body:
    """One JSON body's fields, read by type; every problem is a violation naming it."""

    def __init__(self, body: Any, known: frozenset[str]) -> None:
        self.violations: Violations = []
        if not isinstance(body, dict):
            self.violations.append(("body", "must be a JSON object"))
            body = {}
        self.fields: Json = body
        for name in sorted(set(body) - known)[:5]:
            self.violations.append((name, "not a parameter this API takes"))

    def bad(self, name: str, why: str) -> None:
        self.violations.append((name, why))

    def text(self, name: str) -> str | None:
        return self._typed(name, str, "a string")

    def flag(self, name: str) -> bool:
        return bool(self._typed(name, bool, "true or false"))

    def number(self, name: str) -> float | None:
        value = self.fields.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.bad(name, "must be a number")
            return None
        return float(value)

    def integer(self, name: str, bounds: tuple[int, int] = _INT32) -> int | None:
        value = self._typed(name, int, "an integer")
        if value is None:
            return None
        if not bounds[0] <= value <= bounds[1]:
            self.bad(name, "out of range")
            return None
        return int(value)

    def _typed(self, name: str, kind: type, what: str) -> Any:
        value = self.fields.get(name)
        if value is None:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.bad(name, f"must be {what}")
            return None
        return value

    def neutral_only(self, names: Iterable[str]) -> None:
        """OpenAI parameters with no counterpart: only their neutral value is accepted."""
        for name in names:
            value = self.fields.get(name)
            if value is None or value == _NEUTRAL[name] or (not value and not _NEUTRAL[name]):
                continue
            self.bad(name, f"not supported by this gateway (only {json.dumps(_NEUTRAL[name])})")

    def raise_if_bad(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)


def _tools(body: Body, message: pb.GenerateRequest) -> None:
    """`tools` and `tool_choice` onto Generate's; legacy `functions` and a
    `function_call` that asks for a call refused (their answers have another shape:
    `function_call`, turns by name with no call id)."""
    if body.fields.get("functions") not in (None, []):
        body.bad("functions", _LEGACY_FUNCTIONS)
    if body.fields.get("function_call") not in (None, "none", "auto"):
        body.bad("function_call", _LEGACY_FUNCTIONS)
    tools = body.fields.get("tools")
    if tools is not None and not isinstance(tools, list):
        body.bad("tools", "must be a list of tools")
    elif tools and len(tools) > MAX_TOOLS:  # counted before each is read, as Generate does
        body.bad("tools", f"{len(tools)} tools; the limit is {MAX_TOOLS}")
    elif tools:
        for index, tool in enumerate(tools):
            _tool(body, tool, f"tools[{index}]", message.tools)
    _tool_choice(body, message.tool_choice)
    parallel = body.fields.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        body.bad("parallel_tool_calls", "must be true or false")
    elif parallel is False and tools and message.tool_choice.mode != pb.ToolChoice.MODE_NONE:
        # Ollama has no such switch: an answer could hold several calls all the same.
        body.bad("parallel_tool_calls", "false is not taken: not every engine can be held "
                                        "to one call per answer (leave it out)")


def _tool(body: Body, tool: Any, path: str, into: Any) -> None:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {
            "type", "function"}:
        body.bad(path, 'must be {"type": "function", "function": {...}}')
        return
    if not isinstance(function, dict):
        body.bad(f"{path}.function", "must be an object with name, description, parameters")
        return
    for key in sorted(set(function) - _FUNCTION_KEYS)[:3]:
        body.bad(f"{path}.function.{key}", "not a field of a function")
    name, description = function.get("name"), function.get("description")
    parameters, strict = function.get("parameters"), function.get("strict")
    if not isinstance(name, str):
        body.bad(f"{path}.function.name", "must be a string")
    if description is not None and not isinstance(description, str):
        body.bad(f"{path}.function.description", "must be a string")
    if parameters is not None and not isinstance(parameters, dict):
        body.bad(f"{path}.function.parameters", "must be a JSON Schema object")
    if strict is not None and not isinstance(strict, bool):
        body.bad(f"{path}.function.strict", "must be true or false")
    # The schema as text: the rpc layer reads it within the schema limits, as Generate's.
    into.add(name=_text(name), description=_text(description),
             parameters_json_schema=json.dumps(parameters)
             if isinstance(parameters, dict) else "")


def _tool_choice(body: Body, choice: pb.ToolChoice) -> None:
    value = body.fields.get("tool_choice")
    if value is None:
        return
    function = value.get("function") if isinstance(value, dict) else None
    if isinstance(value, str) and value in _TOOL_CHOICE_MODES:
        choice.mode = _TOOL_CHOICE_MODES[value]
    elif isinstance(value, dict) and value.get("type") == "function" \
            and isinstance(function, dict) and isinstance(function.get("name"), str):
        choice.mode = pb.ToolChoice.MODE_TOOL
        choice.name = function["name"]
    else:
        body.bad("tool_choice", 'must be "none", "auto", "required" or '
                                '{"type": "function", "function": {"name": ...}}')


def chat_call(data: Any, settings: Settings) -> GenerationCall:
    """A /v1/chat/completions body as a GenerateRequest (InvalidArgument naming params)."""
    body = Body(data, CHAT_FIELDS)
    body.neutral_only(("n", "presence_penalty", "frequency_penalty", "logprobs",
                       "top_logprobs", "logit_bias", "modalities"))
    message = pb.GenerateRequest(model=body.text("model") or "")
    _messages(body, settings, message.messages)
    _tools(body, message)
    names = sampling_options(body, message.options, ("max_tokens", "max_completion_tokens"))
    _response_format(body, message.format)
    stream, include_usage = _streaming(body)
    body.raise_if_bad()
    return GenerationCall(message, stream, include_usage, renamer(names, prompt="messages"))


def completion_call(data: Any) -> GenerationCall:
    """A /v1/completions body as a GenerateRequest with a prompt."""
    body = Body(data, COMPLETION_FIELDS)
    body.neutral_only(("n", "presence_penalty", "frequency_penalty", "logprobs", "logit_bias",
                       "echo", "best_of", "suffix"))
    message = pb.GenerateRequest(model=body.text("model") or "")
    prompt = body.fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str):
        message.prompt = prompt
    elif prompt is not None:
        body.bad("prompt", "must be one string (token arrays and batches are not taken)")
    names = sampling_options(body, message.options, ("max_tokens",))
    stream, include_usage = _streaming(body)
    body.raise_if_bad()
    return GenerationCall(message, stream, include_usage, renamer(names, prompt="prompt"))


def embedding_call(data: Any, settings: Settings) -> EmbeddingCall:
    """A /v1/embeddings body as an EmbedRequest (vectors normalized, as OpenAI's are)."""
    body = Body(data, EMBEDDING_FIELDS)
    message = pb.EmbedRequest(model=body.text("model") or "")
    texts = body.fields.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        body.bad("input", "must be a string or a list of strings")
    elif len(texts) > settings.max_texts:  # counted before each is read, as Embed does
        body.bad("input", f"{len(texts)} texts; the limit is {settings.max_texts}")
    elif not all(isinstance(text, str) for text in texts):
        body.bad("input", "must be a string or a list of strings (token arrays are not taken)")
    else:
        message.texts.extend(texts)
    encoding = body.text("encoding_format") or "float"
    if encoding not in ENCODING_FORMATS:
        body.bad("encoding_format", f"must be one of {', '.join(ENCODING_FORMATS)}")
    dimensions = body.integer("dimensions")
    if dimensions is not None:
        if dimensions < 1:
            body.bad("dimensions", "must be at least 1")
        else:
            message.dimensions = dimensions
    body.raise_if_bad()
    return EmbeddingCall(message, encoding == "base64")


def _streaming(body: Body) -> tuple[bool, bool]:
    stream = body.flag("stream")
    options = body.fields.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        body.bad("stream_options", "only with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"} \
            or not isinstance(options.get("include_usage", False), bool):
        body.bad("stream_options", "takes include_usage (true or false) only")
        return stream, False
    return stream, bool(options.get("include_usage"))


def sampling_options(body: Body, options: pb.GenerationOptions,
             max_tokens_names: tuple[str, ...]) -> dict[str, str]:
    """The sampling options into `options`; the OpenAI name of each, where it differs."""
    names: dict[str, str] = {}
    for name in ("temperature", "top_p", "repeat_penalty"):
        value = body.number(name)
        if value is not None:
            setattr(options, name, value)
    for name in ("top_k", "num_ctx"):
        value = body.integer(name)
        if value is not None:
            setattr(options, name, value)
    seed = body.integer("seed", _INT64)
    if seed is not None:
        options.seed = seed
    sent = {name: body.integer(name) for name in max_tokens_names
            if body.fields.get(name) is not None}
    if len(set(sent.values())) > 1:
        body.bad(max_tokens_names[-1], f"differs from {max_tokens_names[0]}: send one of them")
    for name, value in sent.items():
        if value is not None:
            options.max_tokens = value
            names["max_tokens"] = name
    stop = body.fields.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        pass
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        body.bad("stop", "must be a string or a list of strings")
    elif len(stop) > MAX_STOP_SEQUENCES:  # counted before they are copied
        body.bad("stop", f"at most {MAX_STOP_SEQUENCES} stop strings")
    else:
        options.stop.extend(stop)
    return names


def _messages(body: Body, settings: Settings, into: Any) -> None:
    messages = body.fields.get("messages")
    if not isinstance(messages, list) or not messages:
        body.bad("messages", "must be a non-empty list of messages")
        return
    if len(messages) > settings.max_messages:  # counted before each is read
        body.bad("messages", f"{len(messages)} messages; the limit is {settings.max_messages}")
        return
    images = 0
    for index, turn in enumerate(messages):
        path = f"messages[{index}]"
        if not isinstance(turn, dict):
            body.bad(path, "must be an object with role and content")
            continue
        role = turn.get("role")
        if role == "function" or turn.get("function_call") is not None:
            body.bad(f"{path}.function_call" if role != "function" else f"{path}.role",
                     f"{_LEGACY_FUNCTIONS} turns (tool_calls, and tool turns by tool_call_id)")
            continue
        if role not in _ROLES:
            body.bad(f"{path}.role", f"must be one of {', '.join(_ROLES)}")
            continue
        content, pictures = content_of(body, turn.get("content"), f"{path}.content",
                                     settings.max_images - images)
        images += len(pictures)
        message = into.add(role=_ROLES[role], content=content, images=pictures)
        # Which roles may carry calls or answer one is Generate's rule (rpc.requests).
        calls = turn.get("tool_calls")
        if calls is not None:
            _tool_calls(body, calls, f"{path}.tool_calls", message.tool_calls)
        call_id = turn.get("tool_call_id")
        if isinstance(call_id, str):
            message.tool_call_id = call_id
        elif call_id is not None:
            body.bad(f"{path}.tool_call_id", "must be a string")


def _tool_calls(body: Body, calls: Any, path: str, into: Any) -> None:
    """An assistant turn's `tool_calls` as OpenAI sends them back: id, type function,
    function {name, arguments as JSON text}."""
    if not isinstance(calls, list):
        body.bad(path, "must be a list of tool calls")
        return
    if len(calls) > MAX_TOOL_CALLS_PER_TURN:  # counted before each is read
        body.bad(path, f"{len(calls)} calls; the limit is {MAX_TOOL_CALLS_PER_TURN}")
        return
    for index, call in enumerate(calls):
        where = f"{path}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("type", "function") != "function" \
                or not isinstance(function, dict):
            body.bad(where, 'must be {"id", "type": "function", '
                            '"function": {"name", "arguments"}}')
            continue
        call_id, name = call.get("id"), function.get("name")
        arguments = function.get("arguments")
        for field, value in (("id", call_id), ("function.name", name),
                             ("function.arguments", arguments)):
            if not isinstance(value, str):
                body.bad(f"{where}.{field}", "must be a string")
        into.add(id=_text(call_id), name=_text(name), arguments_json=_text(arguments))


def _text(value: Any) -> str:
    """A string field as sent, or "" where it was not one (already a violation)."""
    return value if isinstance(value, str) else ""


@dataclass(frozen=True, slots=True)
class PartKinds:
    """What an API calls the parts of a message's content."""

    text: frozenset[str]
    image: str
    shape: str  # how the parts look, for the refusal


#: Chat Completions' parts.
CHAT_PARTS = PartKinds(frozenset({"text"}), "image_url",
                       "parts are {type: text, text} or {type: image_url, image_url}")


def content_of(body: Body, content: Any, path: str, images_left: int,
               kinds: PartKinds = CHAT_PARTS) -> tuple[str, list[bytes]]:
    """A message's text and images: a string, or parts of `kinds` (an image as a data: URL:
    the gateway fetches nothing)."""
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list) or len(content) > MAX_CONTENT_PARTS:
        body.bad(path, f"must be a string or a list of at most {MAX_CONTENT_PARTS} parts")
        return "", []
    texts: list[str] = []
    images: list[bytes] = []
    for index, part in enumerate(content):
        where = f"{path}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind in kinds.text and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == kinds.image:
            if len(images) >= images_left:
                body.bad(where, "too many images (max_images)")
                break
            image = data_url(part.get("image_url"))
            if image is None:
                body.bad(f"{where}.image_url", "must be a data: URL with base64 content "
                                               "(the gateway fetches nothing)")
            else:
                images.append(image)
        else:
            body.bad(where, kinds.shape)
    return "\n".join(texts), images


def data_url(image_url: Any) -> bytes | None:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url.startswith("data:"):
        return None
    _, sep, data = url.partition(_DATA_URL_BASE64)
    if not sep:
        return None
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        return None


def _response_format(body: Body, fmt: pb.ResponseFormat) -> None:
    value = body.fields.get("response_format")
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in _FORMAT_TYPES:
        body.bad("response_format.type", f"must be one of {', '.join(_FORMAT_TYPES)}")
        return
    fmt.type = _FORMAT_TYPES[kind]
    if kind != "json_schema":
        return
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        body.bad("response_format.json_schema.schema", "must be a JSON Schema object")
        return
    # As text: the rpc layer reads it within the schema limits, as it reads gRPC's.
    fmt.json_schema = json.dumps(schema)


#: Generate's names of a tool's and a call's fields -> OpenAI's (under `function`).
_TOOL_FIELDS_OPENAI = {"name": ".function.name", "parameters_json_schema": ".function.parameters",
                       "arguments_json": ".function.arguments"}
_TOOL_FIELD = re.compile(r"(?<!\.function)\.(name|parameters_json_schema|arguments_json)$")
_TOOL_CHOICE_FIELDS = {"tool_choice.mode": "tool_choice",
                       "tool_choice.name": "tool_choice.function.name"}


def renamer(names: dict[str, str], prompt: str) -> Rename:
    """The OpenAI parameter for a field of the gRPC request (`options.top_p` -> `top_p`);
    a name already in OpenAI's terms stays as it is."""

    def rename(field: str) -> str:
        head, dot, rest = field.partition(".")
        if head == "options" and dot:
            option, _, tail = rest.partition("[")
            return names.get(option, option) + (f"[{tail}" if tail else "")
        if field.startswith("format.json_schema"):
            return "response_format.json_schema.schema"
        if head == "format":
            return "response_format" + field[len(head):]
        if field == "prompt":
            return prompt
        if field.startswith("texts"):
            return "input" + field[len("texts"):]
        if field in _TOOL_CHOICE_FIELDS:
            return _TOOL_CHOICE_FIELDS[field]
        if head.startswith("tools[") or ".tool_calls[" in field:
            return _TOOL_FIELD.sub(lambda found: _TOOL_FIELDS_OPENAI[found[1]], field)
        return field

    return rename


def renamed(error: InvalidArgument, rename: Rename) -> InvalidArgument:
    """The same violations, named as the caller's parameters."""
    return InvalidArgument((rename(name), why) for name, why in error.violations)
