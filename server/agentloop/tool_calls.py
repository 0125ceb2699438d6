"""Function calling, engine-neutral: the shape of a call an engine is constrained to, the
reading of that shape as it streams, and the checks on calls an upstream reports.

An engine without a tool format of its own (the embedded engine: Gemma 3 has none in its
chat template) writes a call as one JSON object, `{"tool": NAME, "arguments": {...}}`,
held to `calls_schema` by a grammar (backends/constraints.py); `CallReader` turns that
text, as it streams, into tool-call deltas and the whole call.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from agentloop.domain import (
    ChatMessage,
    FinishReason,
    GenerationEnd,
    GenerationRequest,
    StreamItem,
    ToolCall,
    ToolCallDelta,
    ToolChoiceMode,
    ToolDefinition,
)
from agentloop.errors import BackendProtocolError, UpstreamProtocolError
from agentloop.schema_limits import first_error, load_json

#: Tool calls one answer may carry (as many as a request may declare tools).
MAX_CALLS = 64
#: The longest tool-call id a tool turn may send back (rpc.requests checks it there).
MAX_CALL_ID_CHARS = 64
#: The call's keys in the JSON object an engine without a tool format writes.
TOOL_KEY, ARGUMENTS_KEY = "tool", "arguments"
#: The text before a call's arguments, as the grammar lets the model write it.
_CALL_HEAD = re.compile(r'\{\s*"' + TOOL_KEY + r'"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"'
                        + ARGUMENTS_KEY + r'"\s*:\s*(?=\S)')
#: What may still close the call (the outer brace) or pad it: held back from the deltas.
_CALL_TAIL = re.compile(r"\s*(\}\s*)?$")


def new_call_id() -> str:
    """A tool-call id for an engine that gives none (OpenAI's look: call_ + 24 hex)."""
    return "call_" + secrets.token_hex(12)


def offered_tools(request: GenerationRequest) -> tuple[ToolDefinition, ...]:
    """The tools the model may call under the request's tool choice (none, all, or one)."""
    if not request.offers_tools:
        return ()
    if request.tool_choice.mode is ToolChoiceMode.TOOL:
        return tuple(t for t in request.tools if t.name == request.tool_choice.name)
    return request.tools


def calls_schema(tools: Sequence[ToolDefinition]) -> dict[str, Any]:
    """JSON Schema of one call of one of `tools`: {"tool": NAME, "arguments": {...}}."""
    choices = [{
        "type": "object",
        "properties": {TOOL_KEY: {"const": tool.name}, ARGUMENTS_KEY: tool.parameters},
        "required": [TOOL_KEY, ARGUMENTS_KEY],
        "additionalProperties": False,
    } for tool in tools]
    return choices[0] if len(choices) == 1 else {"anyOf": choices}


def tools_instructions(tools: Sequence[ToolDefinition], forced: bool) -> str:
    """What a model without a tool format is told about the tools (in its system text)."""
    lines = ["You can call these tools:"]
    for tool in tools:
        lines.append(f"- {tool.name}: {tool.description or 'no description'}; arguments "
                     f"(JSON Schema): {json.dumps(tool.parameters, separators=(',', ':'))}")
    how = (f'To call a tool, answer with only a JSON object: {{"{TOOL_KEY}": "<name>", '
           f'"{ARGUMENTS_KEY}": {{...}}}}.')
    lines.append(how if forced else how + " Otherwise answer in plain text.")
    return "\n".join(lines)


def call_text(call: ToolCall) -> str:
    """An earlier call as the model would have written it (an assistant turn's history)."""
    try:
        arguments = json.loads(call.arguments_json)
    except ValueError:  # checked at the door; defensive
        arguments = {}
    return json.dumps({TOOL_KEY: call.name, ARGUMENTS_KEY: arguments}, ensure_ascii=False)


def call_names(messages: Iterable[ChatMessage]) -> dict[str, str]:
    """Tool-call id -> the tool's name, over a chat's assistant turns (a tool turn's name:
    Ollama wants it, the request validation made sure every tool turn has its call)."""
    return {call.id: call.name for message in messages for call in message.tool_calls}


def check_calls(calls: Sequence[ToolCall], request: GenerationRequest) -> tuple[ToolCall, ...]:
    """An upstream's tool calls, checked: each names a tool the request offered and its
    arguments are a JSON object. Anything else is a broken answer, not the caller's."""
    offered = {tool.name for tool in offered_tools(request)}
    if len(calls) > MAX_CALLS:
        raise UpstreamProtocolError("the upstream sent more tool calls than any answer has")
    if calls and not offered:
        raise UpstreamProtocolError("the upstream called a tool the request did not offer")
    for call in calls:
        if call.name not in offered:
            raise UpstreamProtocolError(
                f"the upstream called a tool the request did not offer ({call.name[:64]!r})")
        try:
            arguments = load_json(call.arguments_json)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise UpstreamProtocolError("the upstream sent tool-call arguments that are not "
                                       "a JSON object")
    return tuple(calls)


def arguments_text(arguments: object) -> str:
    """Arguments as an upstream sent them (an object, or JSON text of one) -> JSON text."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


class CallReader:
    """Reads an answer written under the call grammar, as it streams: text (the first
    character is not `{`) passes through; a call becomes ToolCallDeltas (the id and name
    once the name is read, then the arguments as they come) and, at the end, one ToolCall."""

    def __init__(self, call_id: str | None = None) -> None:
        self._id = call_id or new_call_id()
        self._text: bool | None = None  # None until the first character says which
        self._buffer = ""
        self._head_end = -1  # where the arguments begin, once the head is read
        self._name = ""
        self._sent = 0  # characters of the arguments sent as deltas

    def feed(self, piece: str) -> list[str | ToolCallDelta]:
        if self._text is None and piece:  # the grammar: a call opens with `{`, text never
            self._text = not piece.startswith("{")
        if self._text is not False:
            return [piece] if piece else []
        self._buffer += piece
        out: list[str | ToolCallDelta] = []
        if self._head_end < 0:
            head = _CALL_HEAD.match(self._buffer)
            if head is None:
                return out
            self._name = json.loads(f'"{head.group(1)}"')
            self._head_end = head.end()
            out.append(ToolCallDelta(0, id=self._id, name=self._name))
        arguments = self._buffer[self._head_end:]
        tail = _CALL_TAIL.search(arguments)
        ready = tail.start() if tail is not None else len(arguments)
        if ready > self._sent:
            out.append(ToolCallDelta(0, arguments_json=arguments[self._sent:ready]))
            self._sent = ready
        return out

    def finish(self) -> tuple[list[ToolCallDelta], tuple[ToolCall, ...]]:
        """The last delta (what was held back) and the call; no call when the answer is
        text or the call was cut short (max_tokens)."""
        if self._text is not False or self._head_end < 0:
            return [], ()
        arguments = self._buffer[self._head_end:].rstrip()
        if not arguments.endswith("}"):
            return [], ()
        arguments = arguments[:-1].rstrip()
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return [], ()
        if not isinstance(parsed, dict):
            return [], ()
        rest = [ToolCallDelta(0, arguments_json=arguments[self._sent:])] \
            if len(arguments) > self._sent else []
        return rest, (ToolCall(self._id, self._name, arguments),)


async def read_calls(items: AsyncIterator[StreamItem],
                     request: GenerationRequest) -> AsyncIterator[StreamItem]:
    """An engine's stream written under the call grammar -> text or tool-call deltas, and
    an end carrying the call (finish reason TOOL_CALLS). The call is checked against its
    tool's schema once more: a grammar looser than the schema fails the call, never passes
    invalid arguments on."""
    reader = CallReader()
    async with aclosing(items) as source:
        async for item in source:
            if isinstance(item, str):
                for out in reader.feed(item):
                    yield out
                continue
            if not isinstance(item, GenerationEnd):
                yield item
                continue
            rest, calls = reader.finish()
            for delta in rest:
                yield delta
            schemas = {tool.name: tool.parameters for tool in request.tools}
            for call in calls:
                if call.name not in schemas or first_error(
                        schemas[call.name], json.loads(call.arguments_json)) is not None:
                    raise BackendProtocolError("the engine wrote a tool call that breaks its "
                                               "schema")
            if calls:
                item = replace(item, finish_reason=FinishReason.TOOL_CALLS, tool_calls=calls)
            yield item
            return


def tool_definitions_json(tools: Sequence[ToolDefinition]) -> list[Mapping[str, Any]]:
    """The tools in the OpenAI / Ollama wire shape: {"type": "function", "function": ...}."""
    return [{"type": "function", "function": {
        "name": tool.name, "description": tool.description, "parameters": tool.parameters,
    }} for tool in tools]
