"""Building agentloop requests from plain Python values (shared by the sync and async clients).

Every builder also accepts the protobuf message itself, so callers can mix both styles.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from agentloop_client._proto.agentloop.v1 import agentloop_pb2 as pb

#: A chat message: the proto, or {"role": "user", "content": "...", "images": [bytes]}.
MessageLike: TypeAlias = pb.Message | Mapping[str, Any]
#: Sampling options: the proto, or {"temperature": 0.2, "max_tokens": 64, "stop": ["\n"]}.
OptionsLike: TypeAlias = pb.GenerationOptions | Mapping[str, Any]
#: Output format: None or "text", "json", a JSON Schema (dict or JSON string), or the proto.
FormatLike: TypeAlias = pb.ResponseFormat | str | Mapping[str, Any] | None
#: A tool the model may call (function calling): the proto, {"name", "description",
#: "parameters": JSON Schema (dict or JSON string)}, or OpenAI's {"type": "function",
#: "function": {...}} of the same.
ToolLike: TypeAlias = pb.ToolDefinition | Mapping[str, Any]
#: Whether the model may call tools: None (auto), "auto", "none", "required", the proto, or
#: one tool by name as {"name": ...} (or OpenAI's {"type": "function", "function": {...}}).
ToolChoiceLike: TypeAlias = pb.ToolChoice | str | Mapping[str, Any] | None
#: A tool call in an assistant message: the proto, or {"id", "name", "arguments"} with the
#: arguments as a dict or JSON text.
ToolCallLike: TypeAlias = pb.ToolCall | Mapping[str, Any]

_TOOL_CHOICES = {
    "auto": pb.ToolChoice.MODE_AUTO,
    "none": pb.ToolChoice.MODE_NONE,
    "required": pb.ToolChoice.MODE_REQUIRED,
}

_ROLES = {
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}


@dataclass(frozen=True, slots=True)
class ClientTool:
    """A tool the caller runs itself during StreamRunAgent.

    `run` gets the model's arguments as a dict and returns the observation (a str, or
    anything JSON-serializable); an exception it raises is reported to the model as the
    tool's error. With the async client `run` may be a coroutine function.
    """

    name: str
    run: Callable[[dict[str, Any]], Any] | Callable[[dict[str, Any]], Awaitable[Any]]
    description: str = ""
    parameters: Mapping[str, Any] | None = None

    def to_proto(self) -> pb.ClientTool:
        return pb.ClientTool(
            name=self.name,
            description=self.description,
            parameters_json_schema=json.dumps(self.parameters) if self.parameters else "",
        )


def message(value: MessageLike) -> pb.Message:
    if isinstance(value, pb.Message):
        return value
    role = value.get("role", "user")
    return pb.Message(
        role=_ROLES[role] if isinstance(role, str) else role,
        content=value.get("content") or "",
        images=list(value.get("images", ())),
        tool_calls=[tool_call(call) for call in value.get("tool_calls") or ()],
        tool_call_id=value.get("tool_call_id", ""),
    )


def tool_call(value: ToolCallLike) -> pb.ToolCall:
    if isinstance(value, pb.ToolCall):
        return value
    function = value.get("function", value)  # OpenAI's {"id", "function": {...}} too
    arguments = function.get("arguments", {})
    return pb.ToolCall(id=value.get("id", ""), name=function.get("name", ""),
                       arguments_json=arguments if isinstance(arguments, str)
                       else json.dumps(arguments))


def tool_definition(value: ToolLike) -> pb.ToolDefinition:
    if isinstance(value, pb.ToolDefinition):
        return value
    function = value.get("function", value)
    parameters = function.get("parameters")
    return pb.ToolDefinition(
        name=function.get("name", ""), description=function.get("description", ""),
        parameters_json_schema=parameters if isinstance(parameters, str)
        else json.dumps(parameters) if parameters else "")


def tool_choice(value: ToolChoiceLike) -> pb.ToolChoice | None:
    if value is None or isinstance(value, pb.ToolChoice):
        return value
    if isinstance(value, str):
        return pb.ToolChoice(mode=_TOOL_CHOICES[value])
    name = value.get("function", value).get("name", "")
    return pb.ToolChoice(mode=pb.ToolChoice.MODE_TOOL, name=name)


def tool_calls_of(responses: Sequence[pb.StreamGenerateResponse]) -> list[pb.ToolCall]:
    """The tool calls a stream's `tool_call_deltas` make, joined by index (the last message
    carries the same calls whole in `tool_calls`)."""
    calls: dict[int, pb.ToolCall] = {}
    for response in responses:
        for delta in response.tool_call_deltas:
            call = calls.setdefault(delta.index, pb.ToolCall())
            call.id = call.id or delta.id
            call.name = call.name or delta.name
            call.arguments_json += delta.arguments_json
    return [calls[index] for index in sorted(calls)]


def generation_options(value: OptionsLike | None) -> pb.GenerationOptions | None:
    if value is None or isinstance(value, pb.GenerationOptions):
        return value
    return pb.GenerationOptions(**value)


def response_format(value: FormatLike) -> pb.ResponseFormat | None:
    if value is None or isinstance(value, pb.ResponseFormat):
        return value
    if value == "text":
        return pb.ResponseFormat(type=pb.ResponseFormat.TYPE_TEXT)
    if value == "json":
        return pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON)
    schema = value if isinstance(value, str) else json.dumps(value)
    return pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=schema)


def generation_fields(
    prompt: str | None,
    messages: Sequence[MessageLike],
    system: str,
    model: str,
    options: OptionsLike | None,
    format: FormatLike,
    tools: Sequence[ToolLike] = (),
    choice: ToolChoiceLike = None,
) -> dict[str, Any]:
    """The fields GenerateRequest and StreamGenerateRequest share."""
    return {
        "prompt": prompt or "",
        "messages": [message(m) for m in messages],
        "system": system,
        "model": model,
        "options": generation_options(options),
        "format": response_format(format),
        "tools": [tool_definition(t) for t in tools],
        "tool_choice": tool_choice(choice),
    }


def agent_fields(
    goal: str,
    system: str,
    messages: Sequence[MessageLike],
    tools: Sequence[str],
    max_steps: int,
    options: OptionsLike | None,
    model: str,
) -> dict[str, Any]:
    """The fields RunAgentRequest and StartAgentRun share."""
    return {
        "goal": goal,
        "system": system,
        "messages": [message(m) for m in messages],
        "tools": list(tools),
        "max_steps": max_steps,
        "options": generation_options(options),
        "model": model,
    }


def start_agent_run(fields: dict[str, Any], client_tools: Sequence[ClientTool]
                    ) -> pb.StreamRunAgentRequest:
    return pb.StreamRunAgentRequest(start=pb.StartAgentRun(
        **fields, client_tools=[tool.to_proto() for tool in client_tools]))


def background_run_request(fields: dict[str, Any], client_tools: Sequence[ClientTool],
                           run_timeout: float | None, webhook_url: str
                           ) -> pb.StartAgentRunRequest:
    request = pb.StartAgentRunRequest(run=start_agent_run(fields, client_tools).start,
                                      webhook_url=webhook_url)
    if run_timeout is not None:
        request.timeout.FromNanoseconds(int(run_timeout * 1e9))
    return request


def tool_result(call_id: str, output: Any = None, error: BaseException | None = None
                ) -> pb.StreamRunAgentRequest:
    """The answer to a client tool call: its output, or the error it raised."""
    if error is not None:
        result = pb.ClientToolResult(call_id=call_id, error=f"{type(error).__name__}: {error}")
    else:
        text = output if isinstance(output, str) else json.dumps(output)
        result = pb.ClientToolResult(call_id=call_id, output=text)
    return pb.StreamRunAgentRequest(tool_result=result)


def tool_call_target(tools: Mapping[str, ClientTool], call: pb.AgentToolCall
                     ) -> tuple[ClientTool, dict[str, Any]]:
    """The client tool a call names and its arguments; raises if either is unusable."""
    tool = tools.get(call.tool)
    if tool is None:
        raise LookupError(f"no client tool named {call.tool!r}")
    arguments = json.loads(call.arguments_json or "{}")
    if not isinstance(arguments, dict):
        raise ValueError("the arguments are not a JSON object")
    return tool, arguments


def texts_list(texts: str | Sequence[str]) -> list[str]:
    """One text or several: a lone string is one text, not its characters."""
    return [texts] if isinstance(texts, str) else list(texts)


def embed_request(texts: str | Sequence[str], model: str, normalize: bool, truncate: bool,
                  dimensions: int) -> pb.EmbedRequest:
    return pb.EmbedRequest(texts=texts_list(texts), model=model, normalize=normalize,
                           truncate=truncate, dimensions=dimensions)


def count_tokens_request(texts: str | Sequence[str], messages: Sequence[MessageLike],
                         system: str, model: str) -> pb.CountTokensRequest:
    return pb.CountTokensRequest(texts=texts_list(texts), messages=[message(m) for m in messages],
                                 system=system, model=model)
