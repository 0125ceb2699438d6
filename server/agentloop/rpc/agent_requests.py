"""Agent requests -> validated agent runs; the reading of a StreamRunAgent's later messages.

Validation follows `rpc.requests`: every bad field is collected, so one INVALID_ARGUMENT
with a google.rpc.BadRequest names them all (under `start.` for StreamRunAgent).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol, TypeVar

from agentloop.config import Settings
from agentloop.errors import AgentLoopError, InvalidArgument
from agentloop.rpc.coalesce import Backlog
from agentloop.rpc.requests import (
    Violations,
    chat_messages,
    check_model,
    parameters_schema,
    requested_options,
)
from agentloop.services.agent import AgentRun, ClientToolCalls, ClientToolResult, WrongCallId
from agentloop.services.generation import resolve_options
from agentloop.services.tools import TOOL_NAME, ClientTool, ToolRegistry
from agentloop.services.webhooks import url_problem as webhook_url_problem
from agentloop.v1 import agentloop_pb2 as pb

MAX_CLIENT_TOOLS = 64
#: Server tool names a run may list (there are a handful; repeats are allowed).
MAX_TOOL_NAMES = 256

T = TypeVar("T")


class AgentRunFields(Protocol):
    """What RunAgentRequest and StartAgentRun have in common."""

    goal: str
    system: str
    messages: Sequence[pb.Message]
    tools: Sequence[str]
    max_steps: int
    options: pb.GenerationOptions
    model: str


def run_agent_request(
    message: pb.RunAgentRequest,
    settings: Settings,
    registry: ToolRegistry,
    default_model: str,
    deadline: float | None = None,
) -> AgentRun:
    """Validate a RunAgent request and apply the server's defaults."""
    violations: Violations = []
    run = _agent_run(message, (), settings, registry, default_model, deadline, violations)
    if violations:
        raise InvalidArgument(violations)
    return run


def start_agent_run(
    message: pb.StreamRunAgentRequest | None,
    settings: Settings,
    registry: ToolRegistry,
    default_model: str,
    deadline: float | None = None,
) -> AgentRun:
    """Validate the first message of a StreamRunAgent call, which must be `start`."""
    if message is None or message.WhichOneof("kind") != "start":
        raise InvalidArgument([("start", "the first message must start the run")])
    return _start(message.start, "start", settings, registry, default_model, deadline)


@dataclass(frozen=True, slots=True)
class BackgroundRun:
    """A validated StartAgentRunRequest."""

    run: AgentRun
    #: Seconds the run may take.
    timeout: float
    webhook_url: str = ""
    #: The earlier run whose conversation this one continues ("" = none).
    previous_run_id: str = ""
    trim_conversation: bool = False
    webhook_each_step: bool = False


def start_background_run(
    message: pb.StartAgentRunRequest, settings: Settings, registry: ToolRegistry,
    default_model: str,
) -> BackgroundRun:
    """Validate a StartAgentRunRequest (its run under `run.`, as StreamRunAgent's `start`)."""
    violations: Violations = []
    timeout = settings.run_default_timeout
    if message.HasField("timeout"):
        timeout = message.timeout.ToTimedelta().total_seconds()
        if not 0 < timeout <= settings.run_max_timeout:
            violations.append(("timeout", f"must be above 0s and at most "
                                          f"{settings.run_max_timeout:g}s (run_max_timeout)"))
    if message.webhook_url and (problem := webhook_url_problem(message.webhook_url, settings)):
        violations.append(("webhook_url", problem))
    if message.webhook_each_step and not message.webhook_url:
        violations.append(("webhook_each_step", "needs a webhook_url"))
    try:
        run = _start(message.run, "run", settings, registry, default_model, None)
    except InvalidArgument as exc:
        raise InvalidArgument([*exc.violations, *violations]) from None
    if violations:
        raise InvalidArgument(violations)
    return BackgroundRun(run, timeout, message.webhook_url, message.previous_run_id[:128],
                         message.trim_conversation, message.webhook_each_step)


def _start(start: pb.StartAgentRun, prefix: str, settings: Settings, registry: ToolRegistry,
           default_model: str, deadline: float | None) -> AgentRun:
    violations: Violations = []
    client_tools = _client_tools(start.client_tools, registry, violations)
    run = _agent_run(start, client_tools, settings, registry, default_model, deadline, violations)
    if violations:
        raise InvalidArgument([(f"{prefix}.{name}", why) for name, why in violations])
    return run


def client_tool_result(message: pb.ClientToolResult) -> ClientToolResult:
    violations: Violations = []
    if not message.call_id:
        violations.append(("tool_result.call_id", "must not be empty"))
    outcome = message.WhichOneof("outcome")
    if outcome is None:
        violations.append(("tool_result.outcome", "set output or error"))
    if violations:
        raise InvalidArgument(violations)
    if outcome == "error":
        return ClientToolResult(message.call_id, error=message.error)
    return ClientToolResult(message.call_id, output=message.output)


def _agent_run(
    message: AgentRunFields,
    client_tools: tuple[ClientTool, ...],
    settings: Settings,
    registry: ToolRegistry,
    default_model: str,
    deadline: float | None,
    violations: Violations,
) -> AgentRun:
    if not message.goal.strip():
        violations.append(("goal", "must not be empty"))
    messages = chat_messages(message.messages, "messages", settings, violations)
    text_bytes = sum(len(text.encode()) for text in (
        message.goal, message.system, *(m.content for m in messages),
        *(t.description + json.dumps(t.parameters) for t in client_tools),
    ))
    if text_bytes > settings.max_prompt_bytes:
        violations.append((
            "goal", f"goal, system, messages and tools are {text_bytes} bytes; "
                    f"the limit is {settings.max_prompt_bytes}",
        ))
    # Counted first: millions of names are refused without a look (and a message) at each.
    tool_names = list(message.tools) if len(message.tools) <= MAX_TOOL_NAMES else []
    if len(message.tools) > MAX_TOOL_NAMES:
        violations.append(("tools", f"{len(message.tools)} tool names; the limit is "
                                    f"{MAX_TOOL_NAMES}"))
    known = ", ".join(registry.names) or "none"
    for index, name in enumerate(tool_names):
        if name not in registry:
            violations.append((f"tools[{index}]",
                               f"unknown server tool {name[:64]!r}; the server has {known}"))
    if message.max_steps < 0:
        violations.append(("max_steps", "must be >= 0 (0 means the server's default)"))
    check_model(message.model, violations)
    options = requested_options(message.options, settings, violations, "options")
    return AgentRun(
        goal=message.goal,
        model=message.model or default_model,
        options=resolve_options(options, settings),
        max_steps=min(message.max_steps or settings.agent_default_steps, settings.agent_max_steps),
        tools=tuple(dict.fromkeys(tool_names)) or registry.names,
        system=message.system,
        messages=messages,
        client_tools=client_tools,
        deadline=deadline,
    )


def _client_tools(
    declared: Sequence[pb.ClientTool], registry: ToolRegistry, violations: Violations
) -> tuple[ClientTool, ...]:
    """Validate client tool declarations: good unique names, object schemas."""
    if len(declared) > MAX_CLIENT_TOOLS:  # and none of them is read: each may cost work
        violations.append(("client_tools", f"at most {MAX_CLIENT_TOOLS} client tools"))
        return ()
    tools: list[ClientTool] = []
    seen: set[str] = set()
    for index, tool in enumerate(declared):
        path = f"client_tools[{index}]"
        if not TOOL_NAME.match(tool.name):
            violations.append((f"{path}.name", "must match [A-Za-z0-9_-]{1,64}"))
        elif tool.name in registry:
            violations.append((f"{path}.name", f"{tool.name!r} is the name of a server tool"))
        elif tool.name in seen:
            violations.append((f"{path}.name", f"{tool.name!r} is declared twice"))
        seen.add(tool.name)
        schema = parameters_schema(tool.parameters_json_schema, f"{path}.parameters_json_schema",
                                   violations)
        tools.append(ClientTool(tool.name, tool.description, schema))
    return tuple(tools)


class ToolResultReader:
    """Reads a StreamRunAgent's messages after `start` in a task of its own.

    Tool results go to the calls waiting for them (`calls`); a message that breaks the
    protocol (a second `start`, a wrong call id, a result without an outcome) ends the
    whole call with INVALID_ARGUMENT at once, through `watch`. The task never outlives
    the `async with` block.
    """

    def __init__(self, requests: AsyncIterator[pb.StreamRunAgentRequest]) -> None:
        self.calls = ClientToolCalls()
        self._requests = requests
        self._error: AgentLoopError | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ToolResultReader:
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait({self._task})

    async def _read(self) -> None:
        try:
            async for message in self._requests:
                self._route(message)
        except AgentLoopError as exc:  # a protocol error, or a message over a bound
            self._error = exc
        self.calls.close()

    def _route(self, message: pb.StreamRunAgentRequest) -> None:
        kind = message.WhichOneof("kind")
        if kind != "tool_result":
            raise InvalidArgument([(kind or "tool_result",
                                    "after start, only tool results may be sent")])
        try:
            self.calls.deliver(client_tool_result(message.tool_result))
        except WrongCallId as exc:
            raise InvalidArgument([("tool_result.call_id", str(exc))]) from None

    async def watch(self, events: AsyncIterator[T], key: Callable[[T], Hashable | None],
                    merge: Callable[[list[T]], T]) -> AsyncIterator[T]:
        """Pass the events on until they end or a client message breaks the protocol.

        The events are produced in one task of their own, so a protocol error stops a run
        even in the middle of a model call (the cancel closes it upstream), and the run's
        context (its spans, its timeouts) stays in the one task that entered it. Events
        with a `key` come during a model call: they never wait for the client (consecutive
        ones are merged), so a client that reads slowly or never does not hold a model call
        open (`rpc.coalesce.Backlog`)."""
        assert self._task is not None
        backlog: Backlog[T | object] = Backlog(
            lambda event: None if event is _END else key(event),  # type: ignore[arg-type]
            merge)  # type: ignore[arg-type]

        async def produce() -> None:
            async with aclosing(events):
                async for event in events:
                    await backlog.put(event)
            await backlog.put(_END)

        producer = asyncio.create_task(produce())
        try:
            while True:
                getter = asyncio.ensure_future(backlog.get())
                try:
                    waiting = {getter, producer}
                    if not self._task.done():
                        waiting.add(self._task)
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    if self._error is not None:
                        raise self._error
                    if not getter.done():
                        if producer.done():
                            producer.result()  # raises what ended the run
                        continue
                    event = getter.result()
                finally:
                    getter.cancel()
                if event is _END:
                    return
                yield event  # type: ignore[misc]
        finally:
            producer.cancel()
            await asyncio.wait({producer})


_END = object()
