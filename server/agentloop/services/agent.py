"""The agent loop: a goal -> steps of model calls and tool calls -> an answer.

Gemma 3n has no native tool calling in Ollama, so the loop asks the model for its next
action as structured output: `format` carries a JSON Schema that allows either a tool call
`{"tool", "arguments", "thought"?}` of a tool the run allows or a final answer
`{"final_answer", "thought"?}` (`action_schema`). The loop validates every reply itself
(a reply that fails gets one repair turn showing the error, then the run stops with
MODEL_ERROR), runs the tool, and shows the result to the model as an observation in the
next turn. The conversation only grows (every reply, repair turn and result is appended),
so each model call's prompt starts with the previous one's and the engine's prefix cache
serves it.
A final answer's text streams out (`AnswerDelta`) while the model writes the action.

The loop only talks to `GenerationService`, so it runs on every engine and every model
call passes admission control. It yields engine-neutral events; RunAgent keeps the last
one, StreamRunAgent sends them all. Tools the client runs (StreamRunAgent) are awaited
through `ClientToolCalls`, which the rpc layer feeds with the client's results.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from pydantic_core import from_json

from agentloop.config import Settings
from agentloop.domain import (
    AgentOutcome,
    AgentStep,
    CallContext,
    ChatMessage,
    FinishReason,
    GenerationRequest,
    OutputFormat,
    ResponseFormat,
    Role,
    SamplingOptions,
    StopReason,
    Usage,
)
from agentloop.errors import FORMAT_SCHEMA_FIELD, BackendRejected, Cancelled
from agentloop.schema_limits import first_error, load_json
from agentloop.services.generation import GenerationService
from agentloop.services.tools import (
    ANY_OBJECT,
    ClientTool,
    ToolDescription,
    ToolError,
    ToolRegistry,
)

log = logging.getLogger(__name__)

#: Turns a model gets to fix an invalid action before its step counts as failed.
REPAIR_TURNS = 1
#: Seconds kept back from the client's deadline to send the result before it passes.
DEADLINE_RESERVE = 0.25
#: Where a StartAgentRun carries the client's tools (and their schemas).
CLIENT_TOOLS_FIELD = "start.client_tools"


@dataclass(frozen=True, slots=True)
class AgentRun:
    """One validated agent run with every default applied."""

    goal: str
    model: str
    options: SamplingOptions
    max_steps: int
    #: Server tools the run may use (already resolved: never "empty means all").
    tools: tuple[str, ...]
    system: str = ""
    messages: tuple[ChatMessage, ...] = ()
    client_tools: tuple[ClientTool, ...] = ()
    #: time.monotonic() value after which the client no longer wants an answer.
    deadline: float | None = None
    #: Who is calling: every model call of the run carries it.
    context: CallContext = field(default_factory=CallContext)
    #: Seconds a client tool call may wait for its result (None: the tool_timeout setting);
    #: a background run waits up to its deadline.
    client_tool_timeout: float | None = None
    #: Where a run taken over from another replica goes on (None: from the start).
    resume: Resume | None = None


@dataclass(frozen=True, slots=True)
class Resume:
    """A run's recorded progress, for the replica that takes it over: its finished steps,
    and how far the step after them had come (its events already recorded are not sent
    again)."""

    steps: tuple[AgentStep, ...]
    usage: Usage = field(default_factory=Usage)
    #: The next step's StepStarted was recorded.
    step_started: bool = False
    #: Characters of the next step's answer deltas recorded: withdrawn before it goes on.
    answer_chars: int = 0
    #: The next step's tool call, recorded without its result: it runs (again) at once.
    pending_call: ToolCalled | None = None
    pending_thought: str = ""


# --- events (what StreamRunAgent sends, in this order per step) ---------------------------


@dataclass(frozen=True, slots=True)
class StepStarted:
    step: int


@dataclass(frozen=True, slots=True)
class ThoughtFormed:
    step: int
    thought: str
    #: The tokens of the step's model calls (its repair turns too): a run's record sums
    #: them, so a run taken over counts the calls of every replica that ran it.
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True, slots=True)
class ToolCalled:
    step: int
    call_id: str
    tool: str
    arguments_json: str
    #: True when the client must run the tool and answer with this call_id.
    client_tool: bool


@dataclass(frozen=True, slots=True)
class ToolReturned:
    step: int
    call_id: str
    tool: str
    observation: str
    observation_truncated: bool
    is_error: bool
    duration: float


@dataclass(frozen=True, slots=True)
class AnswerDelta:
    """A piece of the final answer, as the model writes it (before the step's ThoughtFormed)."""

    step: int
    text: str


@dataclass(frozen=True, slots=True)
class AnswerWithdrawn:
    """The step's AnswerDeltas so far are not the answer: their reply failed validation."""

    step: int
    chars: int


@dataclass(frozen=True, slots=True)
class RunFinished:
    outcome: AgentOutcome


AgentEvent = (
    StepStarted | AnswerDelta | AnswerWithdrawn | ThoughtFormed | ToolCalled | ToolReturned
    | RunFinished
)


def answer_delta_key(event: AgentEvent) -> tuple[str, int] | None:
    """Events that come while a model call is open (the answer's deltas) have a key: a
    stream never makes them wait for its client, and joins those of one step
    (`join_answer_deltas`) while the client lags."""
    return ("answer", event.step) if isinstance(event, AnswerDelta) else None


def join_answer_deltas(deltas: list[AgentEvent]) -> AgentEvent:
    """Consecutive AnswerDeltas of one step as one."""
    return AnswerDelta(deltas[0].step, "".join(d.text for d in deltas))  # type: ignore[union-attr]


# --- client tools ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientToolResult:
    """The client's answer to a call of one of its tools: exactly one of output and error."""

    call_id: str
    output: str | None = None
    error: str | None = None


class WrongCallId(ValueError):
    """A client tool result names a call that was never made or was already answered."""


class ClientClosedStream(Exception):
    """The client closed its side of the stream: no tool result can arrive any more."""


class ClientToolCalls:
    """Calls to client tools and their results, matched by call id (one per StreamRunAgent)."""

    def __init__(self) -> None:
        self._calls: dict[str, asyncio.Future[ClientToolResult]] = {}
        self._closed = False

    def expect(self, call_id: str) -> asyncio.Future[ClientToolResult]:
        """Register a call before the client hears of it; await the returned future."""
        future: asyncio.Future[ClientToolResult] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(ClientClosedStream())
        self._calls[call_id] = future
        return future

    def deliver(self, result: ClientToolResult) -> None:
        """Hand the client's result to the waiting call; WrongCallId for a wrong id."""
        future = self._calls.get(result.call_id)
        if future is None:
            raise WrongCallId(f"no tool call has id {result.call_id!r}")
        if future.cancelled():
            # The call timed out and the model has moved on: a late answer is dropped.
            log.info("dropping a late result for tool call %s", result.call_id)
            return
        if future.done():
            raise WrongCallId(f"tool call {result.call_id!r} was already answered")
        future.set_result(result)

    def close(self) -> None:
        """The client sent its last message: fail the calls still waiting."""
        self._closed = True
        for future in self._calls.values():
            if not future.done():
                future.set_exception(ClientClosedStream())


# --- the action schema --------------------------------------------------------------------


def action_schema(
    server_tools: Sequence[ToolDescription], client_tools: Sequence[ToolDescription]
) -> dict[str, Any]:
    """The JSON Schema of one action, sent as `format`: a tool call or a final answer.

    Each server tool gets a branch with its own arguments schema, so an engine that
    constrains decoding writes valid arguments by construction (a small model otherwise
    tends to ramble inside a free-form object until max_tokens, or copy the schema's own
    text into it). A client tool gets its own branch too when its schema is plain (see
    `is_plain_schema`); the others share one branch with any arguments object, because
    schemas from clients may use keywords a grammar converter rejects: their arguments are
    validated after decoding instead.
    Everything stays within what llama.cpp grammars and Ollama's `format` accept.
    """
    branches = [_tool_call_schema([tool.name], tool.parameters) for tool in server_tools]
    branches += [_tool_call_schema([tool.name], tool.parameters) for tool in client_tools
                 if is_plain_schema(tool.parameters)]
    others = [tool.name for tool in client_tools if not is_plain_schema(tool.parameters)]
    if others:
        branches.append(_tool_call_schema(others, ANY_OBJECT))
    if not branches:
        return _FINAL_ANSWER_SCHEMA
    return {"anyOf": [*branches, _FINAL_ANSWER_SCHEMA]}


#: Keywords every engine's grammar converter handles, and the types they may name.
_PLAIN_KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties", "items",
                             "enum", "description", "title"})
_PLAIN_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean"})
_PLAIN_DEPTH = 4


def is_plain_schema(schema: Any, depth: int = 0) -> bool:
    """Is this schema made only of keywords and types every grammar converter handles?"""
    if not isinstance(schema, Mapping) or depth > _PLAIN_DEPTH:
        return False
    kind = schema.get("type", "object")  # a list of types (["string", "null"]) is not plain
    if not set(schema) <= _PLAIN_KEYWORDS or not isinstance(kind, str) \
            or kind not in _PLAIN_TYPES:
        return False
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping):
        return False
    children = [*properties.values(), *([schema["items"]] if "items" in schema else [])]
    if not isinstance(schema.get("additionalProperties", False), bool):
        return False
    return all(is_plain_schema(child, depth + 1) for child in children)


# The decision comes first and the thought last, optional: a small model that writes a
# thought first talks itself out of calling a tool (or copies the example's thought), and
# an answer written first streams out at once. Grammars keep the properties' order.
_FINAL_ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"final_answer": {"type": "string"}, "thought": {"type": "string"}},
    "required": ["final_answer"],
    "additionalProperties": False,
}


def _tool_call_schema(
    tool_names: Sequence[str] | None, arguments: Mapping[str, Any]
) -> dict[str, Any]:
    tool: dict[str, Any] = {"type": "string"}
    if tool_names is not None:
        tool["enum"] = list(tool_names)
    return {
        "type": "object",
        "properties": {"tool": tool, "arguments": arguments, "thought": {"type": "string"}},
        "required": ["tool", "arguments"],
        "additionalProperties": False,
    }


# Replies are checked against the branch they claim to be, so the model hears a precise
# error ("'arguments' is a required property") rather than "not valid under any schema".
# Any tool name passes here: a made-up tool becomes an observation, not a repair turn; the
# arguments are checked against the named tool's own schema when the tool is called.
_FINAL_ANSWER_VALIDATOR = Draft202012Validator(_FINAL_ANSWER_SCHEMA)
_TOOL_CALL_VALIDATOR = Draft202012Validator(_tool_call_schema(None, ANY_OBJECT))


class InvalidAction(ValueError):
    """The model's reply is not an action; the message is shown to it in the repair turn."""


@dataclass(frozen=True, slots=True)
class Action:
    thought: str
    #: Set for a final answer; None for a tool call.
    final_answer: str | None = None
    tool: str = ""
    arguments: Mapping[str, Any] = field(default_factory=dict)


def parse_action(text: str) -> Action:
    try:
        # strict=False: a raw newline inside a string is a slip, not a different action;
        # bounded depth: a deeply nested reply is just invalid.
        value = load_json(text, strict=False)
    except ValueError as exc:
        raise InvalidAction(f"the reply is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidAction("the reply must be a JSON object")
    is_answer = "final_answer" in value
    validator = _FINAL_ANSWER_VALIDATOR if is_answer else _TOOL_CALL_VALIDATOR
    error = best_match(validator.iter_errors(value))
    if error is not None:
        raise InvalidAction(f"the reply does not match the action schema: {error.message}")
    if is_answer:
        return Action(value.get("thought", ""), final_answer=value["final_answer"])
    return Action(value.get("thought", ""), tool=value["tool"], arguments=value["arguments"])


# The worked examples: a call of a fictional tool (decoding only allows the run's own tool
# names) and a question answered without a tool, so the model sees both forms and no
# placeholders. A small model copies what it is shown: the examples carry no thought
# (whatever thought they showed would be repeated in every run) and no result or answer
# after the call (the model repeated the example's answer rather than its own result);
# `observation_message` asks for the answer after each result instead.
_EXAMPLE_WITH_TOOLS = """\
Examples (get_weather is only an example tool):
User: Is it raining in Lyon?
Assistant: {"tool": "get_weather", "arguments": {"city": "Lyon"}}
User: What is the capital of Japan?
Assistant: {"final_answer": "Tokyo"}"""
_EXAMPLE_WITHOUT_TOOLS = """\
Example:
User: What is the capital of Japan?
Assistant: {"final_answer": "Tokyo"}"""


def instructions(tools: Sequence[ToolDescription], extra: str) -> str:
    """The system prompt: how to act, by example, then the tools, then the client's text.

    It is the same for every step of a run (the engine's prefix cache serves it again)."""
    if not tools:
        lines = [
            "You answer the user's question.",
            'Reply with one JSON object with the keys "final_answer" and "thought".',
            "",
            _EXAMPLE_WITHOUT_TOOLS,
        ]
    else:
        lines = [
            "You answer the user's question, using a tool when it helps.",
            "Reply with one JSON object, of one of two kinds:",
            '- a tool call, with the keys "tool", "arguments" and "thought"; the tool\'s '
            "result comes back in the next message;",
            '- the answer, with the keys "final_answer" and "thought". Once a tool has given '
            "you what the question needs, reply with the answer, using that result.",
            "",
            _EXAMPLE_WITH_TOOLS,
            "",
            "Tools:",
        ]
        lines += [
            f"- {tool.name}: {tool.description} Arguments (JSON Schema): "
            f"{json.dumps(tool.parameters)}"
            for tool in tools
        ]
    if extra:
        lines += ["", extra]
    return "\n".join(lines)


def observation_message(tool: str, text: str, is_error: bool, repeated: bool = False) -> str:
    """What the model reads after a tool call: the result, and to answer with it."""
    if repeated:
        heard = "error" if is_error else "result"
        return (f"{tool} was already called with these arguments. Its {heard}: {text}\n"
                "Now give the final answer.")
    if is_error:
        return f"Error from {tool}: {text}\nFix the call, or give the final answer without it."
    return f"Result of {tool}: {text}\nNow give the final answer, using this result."


def _reply_text(action: Action) -> str:
    """A recorded action as the model's reply (the conversation of a resumed run)."""
    if action.final_answer is not None:
        return json.dumps({"final_answer": action.final_answer, "thought": action.thought},
                          ensure_ascii=False)
    return json.dumps({"tool": action.tool, "arguments": action.arguments,
                       "thought": action.thought}, ensure_ascii=False)


def _replay(state: _RunState, resume: Resume) -> int:
    """Put a resumed run's recorded steps into its state; the number of the next step."""
    for step in resume.steps:
        arguments = json.loads(step.arguments_json) if step.arguments_json else {}
        action = Action(step.thought, tool=step.tool, arguments=arguments)
        is_error = bool(step.error)
        state.conversation += (
            ChatMessage(Role.ASSISTANT, _reply_text(action)),
            ChatMessage(Role.USER, observation_message(step.tool, step.observation, is_error)),
        )
        state.results.setdefault((step.tool, json.dumps(arguments, sort_keys=True)),
                                 _Observation(step.observation, is_error))
        state.longest_step = max(state.longest_step, step.duration)
    state.steps = list(resume.steps)
    state.usage = resume.usage
    return len(resume.steps) + 1


def _spent(before: Usage, after: Usage) -> Usage:
    """The usage added between two totals."""
    return Usage(after.input_tokens - before.input_tokens,
                 after.output_tokens - before.output_tokens,
                 after.cached_input_tokens - before.cached_input_tokens)


def cap_observation(text: str, limit: int) -> tuple[str, bool]:
    """Cut an observation to `limit` UTF-8 bytes, saying so in the text; (text, truncated)."""
    data = text.encode()
    if len(data) <= limit:
        return text, False
    note = f" [truncated: {len(data)} bytes, only the first part shown]"
    kept = data[: limit - len(note.encode())].decode(errors="ignore")
    return kept + note, True


# --- the loop -------------------------------------------------------------------------------


class _StepFailed(Exception):
    """A step ended the run before it could act (no valid action, deadline, cancelled)."""

    def __init__(self, stop_reason: StopReason, message: str) -> None:
        super().__init__(message)
        self.stop_reason = stop_reason


@dataclass(frozen=True, slots=True)
class _Reply:
    text: str
    finish_reason: FinishReason


class AnswerReader:
    """Finds the final answer's text in an action while the model is still writing it.

    Each `feed` takes the next piece of the reply and returns the answer's text that piece
    completed ("" while there is none). The reply so far is parsed as partial JSON
    (pydantic-core's, which reads an unfinished string as far as it goes), so escapes are
    decoded and a key named "final_answer" inside the thought is not taken for the answer.
    """

    def __init__(self) -> None:
        self._text = ""
        self._sent = ""

    def feed(self, piece: str) -> str:
        self._text += piece
        if '"final_answer"' not in self._text:
            return ""
        try:
            value = from_json(self._text, allow_partial="trailing-strings")
        except ValueError:
            return ""
        answer = value.get("final_answer") if isinstance(value, dict) else None
        if not isinstance(answer, str) or not answer.startswith(self._sent):
            return ""
        delta, self._sent = answer[len(self._sent):], answer
        return delta


@dataclass(frozen=True, slots=True)
class _Observation:
    text: str
    is_error: bool = False
    #: The run cannot go on (a server tool broke unexpectedly).
    fatal: bool = False


@dataclass
class _RunState:
    """What one run accumulates."""

    system: str
    schema: dict[str, Any]
    conversation: tuple[ChatMessage, ...]
    model: str
    usage: Usage = field(default_factory=Usage)
    steps: list[AgentStep] = field(default_factory=list)
    longest_step: float = 0.0
    #: Observations of the tool calls so far, by (tool, arguments as canonical JSON).
    results: dict[tuple[str, str], _Observation] = field(default_factory=dict)
    #: The next model call may only answer (a call was repeated).
    answer_next: bool = False


class AgentService:
    """Runs agent loops on the generation service with the server's tools."""

    def __init__(
        self, generation: GenerationService, tools: ToolRegistry, settings: Settings
    ) -> None:
        self.generation = generation
        self.tools = tools
        self._telemetry = generation.telemetry
        self._tool_timeout = settings.tool_timeout
        self._max_observation_bytes = settings.max_observation_bytes

    async def complete(self, run: AgentRun) -> AgentOutcome:
        """Run to the end (server tools only) and return the outcome."""
        async with aclosing(self.run(run)) as events:
            async for event in events:
                if isinstance(event, RunFinished):
                    return event.outcome
        raise RuntimeError("the agent loop ended without a RunFinished event")

    async def run(
        self, run: AgentRun, client_calls: ClientToolCalls | None = None
    ) -> AsyncIterator[AgentEvent]:
        """Yield the run's events; the last one is always RunFinished."""
        with self._telemetry.agent_run(run.model) as observed:  # the invoke_agent span
            async with aclosing(self._steps(run, client_calls)) as events:
                async for event in events:
                    if isinstance(event, RunFinished):
                        observed.finish(event.outcome)
                    yield event

    async def _steps(
        self, run: AgentRun, client_calls: ClientToolCalls | None
    ) -> AsyncIterator[AgentEvent]:
        """The loop itself: model call, tool call, observation, until an answer or a limit."""
        started = time.monotonic()
        calls = client_calls or ClientToolCalls()
        server_tools = [self.tools[name] for name in run.tools]
        state = _RunState(
            system=instructions([*run.client_tools, *server_tools], run.system),
            schema=action_schema(server_tools, run.client_tools),
            conversation=(*run.messages, ChatMessage(Role.USER, run.goal)),
            model=run.model,
        )
        resume = run.resume
        first = 1
        if resume is not None:
            first = _replay(state, resume)
        stop, answer = StopReason.MAX_STEPS, ""
        for index in range(first, run.max_steps + 1):
            resumed = resume if resume is not None and index == first else None
            if not self._time_for_a_step(run, state):
                stop = StopReason.DEADLINE
                break
            if resumed is None or not resumed.step_started:
                yield StepStarted(index)
            if resumed is not None and resumed.answer_chars:
                yield AnswerWithdrawn(index, resumed.answer_chars)
            step_started = time.monotonic()
            usage_before = state.usage
            # The last step, and the one after a repeated call, may only answer: the
            # engine constrains the reply to the final-answer form.
            answer_only = state.answer_next or index == run.max_steps
            pending = resumed.pending_call if resumed is not None else None
            if pending is not None:
                assert resumed is not None
                action = Action(resumed.pending_thought, tool=pending.tool,
                                arguments=json.loads(pending.arguments_json))
                state.conversation += (ChatMessage(Role.ASSISTANT, _reply_text(action)),)
            else:
                try:
                    action = None
                    async with aclosing(self._next_action(run, state, index,
                                                          answer_only)) as replies:
                        async for item in replies:
                            if isinstance(item, AnswerDelta | AnswerWithdrawn):
                                yield item
                            else:
                                action = item
                    assert action is not None
                except _StepFailed as failure:
                    state.steps.append(
                        AgentStep(index, time.monotonic() - step_started, error=str(failure)))
                    stop = failure.stop_reason
                    break
                yield ThoughtFormed(index, action.thought, _spent(usage_before, state.usage))
            if action.final_answer is not None:
                state.steps.append(
                    AgentStep(index, time.monotonic() - step_started, thought=action.thought))
                stop, answer = StopReason.FINAL_ANSWER, action.final_answer
                break

            call_id = f"call_{index}"
            arguments_json = json.dumps(action.arguments, ensure_ascii=False)
            call_key = (action.tool, json.dumps(action.arguments, sort_keys=True))
            earlier = state.results.get(call_key)
            problem = None if earlier is not None else self._call_problem(run, action)
            client_call = None
            if earlier is None and problem is None and action.tool not in run.tools:
                client_call = calls.expect(call_id)  # before the client can hear of the call
            if pending is None:  # (a resumed call was recorded by the replica before)
                yield ToolCalled(index, call_id, action.tool, arguments_json,
                                 client_call is not None)
            tool_started = time.monotonic()
            if earlier is not None:
                # A small model tends to repeat a call rather than use its result: the
                # repeat is not run again, and the next step must answer.
                observation = earlier
                state.answer_next = True
            elif problem is not None:
                observation = _Observation(problem, is_error=True)
            else:
                observation = await self._run_tool(run, action, call_id, arguments_json,
                                                   client_call)
            text, truncated = cap_observation(observation.text, self._max_observation_bytes)
            state.results.setdefault(call_key, _Observation(text, observation.is_error))
            now = time.monotonic()
            yield ToolReturned(index, call_id, action.tool, text, truncated, observation.is_error,
                               now - tool_started)
            state.steps.append(AgentStep(
                index, now - step_started, thought=action.thought, tool=action.tool,
                arguments_json=arguments_json, observation=text, observation_truncated=truncated,
                error=text if observation.is_error else "",
            ))
            state.longest_step = max(state.longest_step, now - step_started)
            if observation.fatal:
                stop = StopReason.TOOL_ERROR
                break
            state.conversation += (ChatMessage(Role.USER, observation_message(
                action.tool, text, observation.is_error, repeated=earlier is not None)),)
        yield RunFinished(AgentOutcome(
            final_answer=answer,
            stop_reason=stop,
            steps=tuple(state.steps),
            usage=state.usage,
            model=state.model,
            duration=time.monotonic() - started,
        ))

    def _time_left(self, run: AgentRun) -> float | None:
        if run.deadline is None:
            return None
        return run.deadline - DEADLINE_RESERVE - time.monotonic()

    def _time_for_a_step(self, run: AgentRun, state: _RunState) -> bool:
        """Is there time left for a step as long as the longest so far?"""
        left = self._time_left(run)
        return left is None or left > state.longest_step

    def _tool_time(self, run: AgentRun, client: bool = False) -> float:
        limit = self._tool_timeout
        if client and run.client_tool_timeout is not None:
            limit = run.client_tool_timeout
        left = self._time_left(run)
        return limit if left is None else max(0.0, min(limit, left))

    async def _next_action(
        self, run: AgentRun, state: _RunState, step: int, answer_only: bool
    ) -> AsyncIterator[AnswerDelta | AnswerWithdrawn | Action]:
        """Ask the model for an action, with repair turns for invalid replies; the answer's
        deltas as they come (withdrawn again when their reply is not valid), then the Action.

        Every reply joins the conversation as the model wrote it, the repair turns too, so
        each model call's prompt starts with the previous one's (and its reply): the engine
        serves that prefix from its cache."""
        for _ in range(1 + REPAIR_TURNS):
            reply: _Reply | None = None
            shown = 0  # characters of answer deltas this reply sent
            async with aclosing(self._ask_model(run, state, step, answer_only)) as items:
                async for item in items:
                    if isinstance(item, AnswerDelta):
                        shown += len(item.text)
                        yield item
                    else:
                        reply = item
            assert reply is not None
            state.conversation += (ChatMessage(Role.ASSISTANT, reply.text),)
            try:
                yield parse_action(reply.text)
                return
            except InvalidAction as exc:
                error = str(exc)
                if reply.finish_reason is FinishReason.LENGTH:
                    error += " (the reply was cut off at max_tokens; keep it shorter)"
            if shown:
                yield AnswerWithdrawn(step, shown)
            state.conversation += (ChatMessage(
                Role.USER, f"That reply is not a valid action: {error}. Reply again with "
                           "exactly one JSON object in one of the two forms."),)
        raise _StepFailed(StopReason.MODEL_ERROR, f"no valid action after a repair turn: {error}")

    async def _ask_model(
        self, run: AgentRun, state: _RunState, step: int, answer_only: bool
    ) -> AsyncIterator[AnswerDelta | _Reply]:
        """One model call on the conversation so far: the answer's deltas, then the reply."""
        request = GenerationRequest(
            model=run.model,
            options=run.options,
            messages=state.conversation,
            system=state.system,
            format=ResponseFormat(OutputFormat.JSON_SCHEMA,
                                  _FINAL_ANSWER_SCHEMA if answer_only else state.schema),
            deadline=run.deadline,
            context=run.context,
        )
        left = self._time_left(run)
        # Cut the call short of the client's deadline so the run can still report. The
        # timeout covers each wait for the engine, never a yield to the caller.
        cutoff = None if left is None else asyncio.get_running_loop().time() + left
        reader = AnswerReader()
        pieces: list[str] = []
        async with aclosing(self.generation.stream(request)) as items:
            while True:
                try:
                    async with asyncio.timeout_at(cutoff):
                        item = await anext(items)
                except TimeoutError:
                    raise _StepFailed(StopReason.DEADLINE,
                                      "the deadline came before the model answered") from None
                except Cancelled as exc:
                    raise _StepFailed(StopReason.CANCELLED, exc.message) from None
                except BackendRejected as exc:
                    # The action schema is the run's own but for the client's tools: an
                    # engine that cannot enforce it was given a client schema it cannot take.
                    if exc.field == FORMAT_SCHEMA_FIELD and run.client_tools:
                        raise BackendRejected(exc.message, field=CLIENT_TOOLS_FIELD,
                                              metadata=exc.metadata) from None
                    raise
                except StopAsyncIteration:
                    raise RuntimeError("the generation ended without its report") from None
                if isinstance(item, str):
                    pieces.append(item)
                    if delta := reader.feed(item):
                        yield AnswerDelta(step, delta)
                    continue
                state.usage += item.usage
                state.model = item.model
                yield _Reply("".join(pieces), item.finish_reason)
                return

    def _call_problem(self, run: AgentRun, action: Action) -> str | None:
        """Why the model's tool call cannot run (unknown tool, bad arguments), or None."""
        tool: ToolDescription | None
        if action.tool in run.tools:
            tool = self.tools[action.tool]
        else:
            tool = next((t for t in run.client_tools if t.name == action.tool), None)
        if tool is None:
            names = [*run.tools, *(t.name for t in run.client_tools)]
            return (f"there is no tool named {action.tool!r}; the tools are: "
                    f"{', '.join(names) or 'none'}")
        # Client schemas passed schema_limits at request time; this validator runs their
        # regexes on RE2 and resolves references only inside the schema.
        error = first_error(tool.parameters, action.arguments)
        if error is not None:
            return f"invalid arguments for {tool.name}: {error}"
        return None

    async def _run_tool(
        self, run: AgentRun, action: Action, call_id: str, arguments_json: str,
        client_call: asyncio.Future[ClientToolResult] | None,
    ) -> _Observation:
        """Run a valid tool call (a client's or a server tool) in its execute_tool span."""
        with self._telemetry.tool_call(action.tool, call_id, client_call is not None,
                                       arguments_json) as span:
            if client_call is not None:
                observation = await self._client_tool(client_call,
                                                      self._tool_time(run, client=True))
            else:
                observation = await self._server_tool_result(action, self._tool_time(run))
            span.finish(observation.is_error, observation.text)
            return observation

    async def _server_tool_result(self, action: Action, timeout: float) -> _Observation:
        tool = self.tools[action.tool]
        try:
            async with asyncio.timeout(timeout):
                return _Observation(await tool.run(action.arguments))
        except TimeoutError:
            return _Observation(f"{tool.name} did not finish within {timeout:.1f}s", is_error=True)
        except ToolError as exc:
            return _Observation(str(exc), is_error=True)
        except Exception:
            log.exception("server tool %s failed", tool.name)
            return _Observation(f"{tool.name} failed unexpectedly", is_error=True, fatal=True)

    async def _client_tool(
        self, call: asyncio.Future[ClientToolResult], timeout: float
    ) -> _Observation:
        try:
            async with asyncio.timeout(timeout):
                result = await call
        except TimeoutError:
            return _Observation(f"the client did not answer within {timeout:.1f}s", is_error=True)
        except ClientClosedStream:
            return _Observation("the client closed its stream and can no longer run tools",
                                is_error=True)
        if result.error is not None:
            return _Observation(result.error, is_error=True)
        return _Observation(result.output or "")
