"""OpenAI Responses request bodies -> the gRPC API's StartAgentRunRequest, by one set of rules.

`POST /v1/responses` starts an agent run: the body is read into the StartAgentRunRequest
the gRPC StartAgentRun takes (checking only what JSON leaves open), and the rpc layer's
`start_background_run` applies every rule and limit; a violation comes back named as the
parameter the caller sent (`run.goal` -> `input`, `run.tools[2]` -> `tools[1].name`).

What maps: `input` (a string, or messages: the last one, a user's, is the run's goal, the
others its conversation), `instructions` (the system text), `tools` (`function` tools name
server tools, `mcp` tools name an MCP server the operator listed: all its tools, or its
`allowed_tools`), `model`, `max_output_tokens` (each model call's), `max_tool_calls` (steps
= calls + 1: the step after the last call may only answer), `temperature`, `top_p`,
`previous_response_id` (the earlier run's conversation), `truncation: "auto"` (its oldest
turns dropped to fit). What the agent cannot do is refused, never ignored: client-run
functions and their outputs, MCP servers by URL, approvals, structured output, reasoning,
`store: false` (runs are kept).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agentloop.config import Settings
from agentloop.http.requests import (
    INERT_FIELDS,
    Body,
    PartKinds,
    Rename,
    content_of,
    renamer,
    sampling_options,
)
from agentloop.rpc.agent_requests import MAX_TOOL_NAMES
from agentloop.services.mcp_tools import tool_name
from agentloop.services.tools import BUILTIN, ToolRegistry
from agentloop.v1 import agentloop_pb2 as pb

#: The Responses API's parameters this door takes (top_k, repeat_penalty, num_ctx and seed
#: are the chat door's extras, as extra_body in the SDKs).
RESPONSE_FIELDS = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "max_output_tokens",
    "max_tool_calls", "temperature", "top_p", "top_k", "repeat_penalty", "num_ctx", "seed",
    "previous_response_id", "background", "stream", "stream_options", "parallel_tool_calls",
    "text", "truncation", "include", "reasoning", "top_logprobs", "safety_identifier",
    "prompt_cache_key", *INERT_FIELDS})
_ROLES = {"user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT, "system": pb.ROLE_SYSTEM,
          "developer": pb.ROLE_SYSTEM}
#: The Responses API's parts.
_RESPONSE_PARTS = PartKinds(frozenset({"input_text", "output_text"}), "input_image",
                            "parts are {type: input_text, text} or {type: input_image, "
                            "image_url}")
_CLIENT_FUNCTIONS = ("functions the client runs are not taken: the door's tools are the "
                     "server's (name them in tools), and their calls run on the server")
_MCP_BY_URL = ("the gateway calls only the MCP servers its operator listed: name one by "
               "server_label")
_MCP_KEYS = frozenset({"type", "server_label", "allowed_tools", "require_approval",
                       "server_description"})
_FUNCTION_KEYS = frozenset({"type", "name", "description", "parameters", "strict"})
_TRUNCATION = {None: False, "disabled": False, "auto": True}


@dataclass(frozen=True, slots=True)
class ResponseCall:
    """A /v1/responses body as the gRPC API's request and how to answer it."""

    message: pb.StartAgentRunRequest
    stream: bool
    background: bool
    #: The run may use no tool (`tools: []` or `tool_choice: "none"`): the gRPC request
    #: cannot say it (no tools there means all the server's).
    no_tools: bool
    rename: Rename


def response_call(data: Any, settings: Settings, tools: ToolRegistry) -> ResponseCall:
    """A /v1/responses body as a StartAgentRunRequest (InvalidArgument naming params)."""
    body = Body(data, RESPONSE_FIELDS)
    _neutral(body)
    message = pb.StartAgentRunRequest()
    run = message.run  # (a message given to a constructor is copied: this one is filled)
    run.model = body.text("model") or ""
    run.system = body.text("instructions") or ""
    _input(body, settings, run)
    tool_paths = _tools(body, tools, run.tools)
    no_tools = body.fields.get("tools") == [] or _tool_choice(body) == "none"
    names = sampling_options(body, run.options, ("max_output_tokens",))
    calls = body.integer("max_tool_calls")
    if calls is not None:
        if calls < 0:
            body.bad("max_tool_calls", "must be >= 0")
        else:  # the step after the last call may only answer
            run.max_steps = min(calls + 1, settings.agent_max_steps)
    previous = body.text("previous_response_id")
    if previous:
        message.previous_run_id = previous
    truncation = body.fields.get("truncation")
    if (truncation is not None and not isinstance(truncation, str)) \
            or truncation not in _TRUNCATION:
        body.bad("truncation", 'must be "auto" or "disabled"')
    else:
        message.trim_conversation = _TRUNCATION[truncation]
    stream, background = body.flag("stream"), body.flag("background")
    body.raise_if_bad()
    return ResponseCall(message, stream, background, no_tools,
                        _renamer(names, tool_paths))


def _neutral(body: Body) -> None:
    """Parameters that would change the answer in ways an agent run cannot: only their
    neutral values."""
    fields = body.fields
    if fields.get("store") is False:
        body.bad("store", "runs are kept (until run_ttl_*): leave store out, or true")
    if fields.get("include") not in (None, []):
        body.bad("include", "nothing more can be included (leave it out)")
    if fields.get("reasoning") not in (None, {}):
        body.bad("reasoning", "not supported by this gateway (leave it out)")
    if fields.get("top_logprobs") not in (None, 0):
        body.bad("top_logprobs", "not supported by this gateway (only 0)")
    if fields.get("metadata") not in (None, {}):
        body.bad("metadata", "not kept with runs (leave it out)")
    text = fields.get("text")
    if text is not None and text not in ({}, {"format": {"type": "text"}}):
        body.bad("text.format", 'the agent answers in text: only {"type": "text"}')
    options = fields.get("stream_options")
    if options not in (None, {}, {"include_obfuscation": False}):
        body.bad("stream_options", 'takes only {"include_obfuscation": false}')
    parallel = fields.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        body.bad("parallel_tool_calls", "must be true or false")  # one call per step: both hold


def _input(body: Body, settings: Settings, run: pb.StartAgentRun) -> None:
    """`input` as the run's goal (the last message, a user's) and its conversation."""
    value = body.fields.get("input")
    if isinstance(value, str):
        run.goal = value
        return
    if not isinstance(value, list) or not value:
        body.bad("input", "must be a string or a non-empty list of messages")
        return
    if len(value) > settings.max_messages + 1:  # counted before each is read
        body.bad("input", f"{len(value)} items; the limit is {settings.max_messages + 1}")
        return
    images = 0
    *earlier, last = value
    for index, item in enumerate(earlier):
        role, text, pictures = _message(body, item, f"input[{index}]",
                                        settings.max_images - images)
        images += len(pictures)
        if role is not None:
            run.messages.add(role=role, content=text, images=pictures)
    where = f"input[{len(earlier)}]"
    role, text, pictures = _message(body, last, where, settings.max_images - images)
    if role is None:
        return
    if role != pb.ROLE_USER:
        body.bad(f"{where}.role", "the last message is the run's goal: a user's")
    elif pictures:
        body.bad(f"{where}.content", "the last message is the run's goal: text only (send "
                                     "images in an earlier message)")
    run.goal = text


def _message(body: Body, item: Any, path: str,
             images_left: int) -> tuple[int | None, str, list[bytes]]:
    """(role, text, images) of one input item, None for the role where it is not taken."""
    if not isinstance(item, dict):
        body.bad(path, "must be a message: {role, content}")
        return None, "", []
    kind = item.get("type", "message")
    if kind in ("function_call", "function_call_output"):
        body.bad(f"{path}.type", _CLIENT_FUNCTIONS)
        return None, "", []
    if kind != "message" or set(item) - {"type", "role", "content", "id", "status"}:
        body.bad(path, "must be a message: {role, content} (other items are not taken)")
        return None, "", []
    role = item.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        body.bad(f"{path}.role", f"must be one of {', '.join(_ROLES)}")
        return None, "", []
    text, images = content_of(body, item.get("content"), f"{path}.content", images_left,
                              _RESPONSE_PARTS)
    return _ROLES[role], text, images




def _tools(body: Body, registry: ToolRegistry, into: Any) -> list[str]:
    """The tools' server tool names into `into`; the parameter each name came from."""
    tools = body.fields.get("tools")
    paths: list[str] = []
    if tools is None:
        return paths
    if not isinstance(tools, list):
        body.bad("tools", "must be a list of tools")
        return paths
    if len(tools) > MAX_TOOL_NAMES:  # counted before each is read
        body.bad("tools", f"{len(tools)} tools; the limit is {MAX_TOOL_NAMES}")
        return paths
    for index, tool in enumerate(tools):
        path = f"tools[{index}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            _function_tool(body, tool, path, into, paths)
        elif kind == "mcp":
            _mcp_tool(body, tool, path, registry, into, paths)
        else:
            body.bad(f"{path}.type", 'must be "function" (a server tool by name) or "mcp" '
                                     "(an MCP server the operator listed)")
    return paths


def _function_tool(body: Body, tool: dict[str, Any], path: str, into: Any,
                   paths: list[str]) -> None:
    """A server tool by name. Its description and parameters, when sent (the SDKs' typed
    tools need them), are the caller's copy: the server's own are what the model sees."""
    for key in sorted(set(tool) - _FUNCTION_KEYS)[:3]:
        body.bad(f"{path}.{key}", "not a field of a function tool")
    name = tool.get("name")
    if not isinstance(name, str):
        body.bad(f"{path}.name", "must be a string")
        return
    into.append(name)
    paths.append(f"{path}.name")


def _mcp_tool(body: Body, tool: dict[str, Any], path: str, registry: ToolRegistry,
              into: Any, paths: list[str]) -> None:
    """An MCP server the operator listed, by its name: its tools available now, or those
    of them in `allowed_tools` (a list of names, or {"tool_names": [...]})."""
    for key in sorted(set(tool) - _MCP_KEYS)[:3]:
        body.bad(f"{path}.{key}", _MCP_BY_URL if key in ("server_url", "connector_id",
                                                          "headers", "authorization")
                 else "not a field of an MCP tool")
    if tool.get("require_approval") not in (None, "never"):
        body.bad(f"{path}.require_approval", 'calls are not held for approval: only "never" '
                                             "(the operator listed the server)")
    label = tool.get("server_label")
    if not isinstance(label, str):
        body.bad(f"{path}.server_label", "must be a string")
        return
    offered = [t.name for t in registry if getattr(t, "provider", BUILTIN) == label
               and label != BUILTIN]
    if not offered:
        servers = sorted({getattr(t, "provider", BUILTIN) for t in registry} - {BUILTIN})
        body.bad(f"{path}.server_label", f"no MCP server {label[:64]!r} offers tools now "
                                         f"(those that do: {', '.join(servers) or 'none'})")
        return
    allowed = tool.get("allowed_tools")
    if isinstance(allowed, dict) and set(allowed) <= {"tool_names", "read_only"} \
            and allowed.get("read_only") in (None, False):
        allowed = allowed.get("tool_names")
    if allowed is None:
        into.extend(offered)
        paths.extend([f"{path}.server_label"] * len(offered))
        return
    if not isinstance(allowed, list) or not all(isinstance(n, str) for n in allowed):
        body.bad(f"{path}.allowed_tools", "must be a list of the server's tool names")
        return
    for index, remote in enumerate(allowed[:MAX_TOOL_NAMES]):
        into.append(tool_name(label, remote) or remote)
        paths.append(f"{path}.allowed_tools[{index}]")


def _tool_choice(body: Body) -> str | None:
    """"auto" (the agent chooses) or "none" (no tool); the agent loop cannot be made to
    call a tool, so "required" and a named tool are refused."""
    choice = body.fields.get("tool_choice")
    if choice in (None, "auto", "none"):
        return choice
    body.bad("tool_choice", 'must be "auto" or "none" (the agent decides when to call a '
                            "tool: a call cannot be forced)")
    return None


def _renamer(names: dict[str, str], tool_paths: Iterable[str]) -> Rename:
    """The parameter a field of the StartAgentRunRequest came from."""
    paths = list(tool_paths)
    options = renamer(names, prompt="input")

    def rename(field: str) -> str:
        head, dot, rest = field.partition(".")
        if head != "run" or not dot:
            return _TOP_LEVEL.get(field, field)
        name, bracket, tail = rest.partition("[")
        if name == "tools" and bracket:
            index, _, after = tail.partition("]")
            if index.isdigit() and int(index) < len(paths):
                return paths[int(index)] + after
        if name.partition(".")[0] == "messages":
            return "input" + rest[len("messages"):]
        return _RUN_FIELDS.get(name, None) or options(rest)

    return rename


_TOP_LEVEL = {"previous_run_id": "previous_response_id", "timeout": "background",
              "trim_conversation": "truncation"}
_RUN_FIELDS = {"goal": "input", "system": "instructions", "max_steps": "max_tool_calls",
               "model": "model", "tools": "tools", "client_tools": "tools"}

