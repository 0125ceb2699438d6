"""Agent runs -> OpenAI Response objects and the Responses API's streaming events.

A response is a run: its id is the run's, and the same run reads the same through either
door. Its output is made of the run's steps: a step that called a server tool is a
`function_call` item and its `function_call_output` (a tool of an MCP server: one
`mcp_call` item, its server_label the server's name), and the final answer a `message`.
Item ids follow from the run's id and the step's number, so a stream, a resumed stream and
GET name the same items alike.

`ResponseEvents` turns the run's recorded events into the streaming events, numbered
from 0 in one deterministic order: resuming after sequence number N replays the run's
events from its first and sends those past N. A final answer streams as it is written
(`response.output_text.delta`); when the agent withdraws a reply it had begun to stream
(the reply failed validation), that message item is closed `incomplete` and the next try
opens another.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agentloop.domain import AgentStep, StopReason, Usage
from agentloop.runs.store import RunRecord, RunStatus
from agentloop.services.agent import (
    AgentRun,
    AnswerDelta,
    AnswerWithdrawn,
    StepStarted,
    ToolCalled,
    ToolReturned,
)
from agentloop.services.runs import RunEnded, RunEvent, RunSummary, RunView, decode_request
from agentloop.services.tools import BUILTIN, ToolRegistry

Json = dict[str, Any]

#: A run's status -> the Response's (a run waiting for a client tool is still in progress).
RESPONSE_STATUSES = {
    RunStatus.QUEUED: "queued", RunStatus.RUNNING: "in_progress",
    RunStatus.WAITING_FOR_TOOL: "in_progress", RunStatus.COMPLETED: "completed",
    RunStatus.FAILED: "failed", RunStatus.CANCELLED: "cancelled", RunStatus.EXPIRED: "failed",
}
#: The terminal streaming event of each final status.
_TERMINAL_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete",
                    "failed": "response.failed", "cancelled": "response.failed"}


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """What every object and event of one response shares: the run's id, its creation
    time and its request (what it was asked to do, with which tools)."""

    id: str
    created: float
    run: AgentRun
    model: str
    registry: ToolRegistry

    @classmethod
    def of(cls, record: RunRecord, registry: ToolRegistry) -> ResponseHead:
        run = decode_request(record.request)
        return cls(record.id, record.created, run, record.model or run.model, registry)

    def item_id(self, kind: str, step: int, attempt: int = 0) -> str:
        tail = f"_{attempt}" if attempt else ""
        return f"{kind}_{self.id.removeprefix('run_')}_{step}{tail}"

    def mcp_server(self, tool: str) -> tuple[str, str] | None:
        """(server label, the tool's own name) for a tool of an MCP server; None else."""
        try:
            found = self.registry[tool]
        except KeyError:
            return None
        provider = getattr(found, "provider", BUILTIN)
        if provider == BUILTIN:
            return None
        return provider, getattr(found, "remote_name", tool)

    def tools_json(self) -> list[Json]:
        tools: list[Json] = []
        for name in self.run.tools:
            try:
                tool = self.registry[name]
            except KeyError:
                tools.append({"type": "function", "name": name, "description": None,
                              "parameters": None, "strict": False})
                continue
            tools.append({"type": "function", "name": name, "description": tool.description,
                          "parameters": dict(tool.parameters), "strict": False})
        return tools

    def json(self, status: str, output: list[Json], *, usage: Usage | None = None,
             error: Json | None = None, incomplete: Json | None = None,
             completed_at: float | None = None, background: bool | None = None) -> Json:
        """The Response object."""
        options = self.run.options
        return {
            "id": self.id, "object": "response", "created_at": int(self.created),
            "status": status, "background": background,
            "completed_at": None if completed_at is None else int(completed_at),
            "error": error, "incomplete_details": incomplete,
            "instructions": self.run.system or None, "max_output_tokens": options.max_tokens,
            "max_tool_calls": self.run.max_steps - 1, "model": self.model, "output": output,
            "parallel_tool_calls": True, "previous_response_id": None,
            "temperature": options.temperature, "top_p": options.top_p,
            "tool_choice": "auto" if self.run.tools else "none", "tools": self.tools_json(),
            "text": {"format": {"type": "text"}}, "truncation": "disabled",
            "usage": None if usage is None else usage_json(usage), "metadata": {},
            "store": True,
        }


def usage_json(usage: Usage) -> Json:
    return {"input_tokens": usage.input_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_input_tokens},
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.input_tokens + usage.output_tokens}


def final_status(status: RunStatus, stop: StopReason | None) -> tuple[str, Json | None]:
    """The Response's status and incomplete_details: a run that stopped at its step limit
    without an answer completed as a run, and is an incomplete response."""
    if status is RunStatus.COMPLETED and stop is StopReason.MAX_STEPS:
        return "incomplete", {"reason": "max_tool_calls"}
    return RESPONSE_STATUSES[status], None


def error_json(status: RunStatus, error: str) -> Json | None:
    """A failed run's error: its reason (the text before the colon) as the code."""
    if status not in (RunStatus.FAILED, RunStatus.EXPIRED):
        return None
    reason, colon, _ = error.partition(":")
    code = reason.strip().lower() if colon and reason.isupper() else "server_error"
    if status is RunStatus.EXPIRED:
        code = "expired"
    return {"code": code, "message": error or f"the run {status.value}"}


def output_items(head: ResponseHead, steps: Sequence[AgentStep], answer: str | None,
                 answer_step: int) -> list[Json]:
    """The run's output: each tool call and its result, then the final answer (if any)."""
    items: list[Json] = []
    for step in steps:
        if step.tool:
            items += _call_items(head, step.index, step.tool, step.arguments_json,
                                 step.observation, bool(step.error))
    if answer is not None:
        items.append(_message(head.item_id("msg", answer_step), answer, "completed"))
    return items


def view_json(head: ResponseHead, view: RunView, background: bool | None = None) -> Json:
    """The Response object of a run as stored (GET, cancel, a background create)."""
    record = view.record
    status, incomplete = final_status(record.status, view.stop_reason)
    answer = view.final_answer if view.stop_reason is StopReason.FINAL_ANSWER else None
    answer_step = view.steps[-1].index if view.steps else 1
    return head.json(status, output_items(head, view.steps, answer, answer_step),
                     usage=view.usage if record.finished else None,
                     error=error_json(record.status, record.error), incomplete=incomplete,
                     completed_at=record.finished, background=background)


def _message(item_id: str, text: str, status: str) -> Json:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [] if status == "in_progress" else [_text_part(text)]}


def _text_part(text: str) -> Json:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_items(head: ResponseHead, step: int, tool: str, arguments: str, observation: str,
                is_error: bool, done: bool = True) -> list[Json]:
    """A tool call's finished items: function_call and function_call_output, or mcp_call."""
    call_id = head.item_id("call", step)
    mcp = head.mcp_server(tool)
    if mcp is not None:
        item: Json = {"type": "mcp_call", "id": head.item_id("mcp", step),
                      "server_label": mcp[0], "name": mcp[1], "arguments": arguments,
                      "output": None, "error": None, "status": "in_progress"}
        if done and is_error:
            item.update(status="failed", error={"type": "mcp_tool_execution_error",
                                                "content": observation})
        elif done:
            item.update(status="completed", output=observation)
        return [item]
    return [{"type": "function_call", "id": head.item_id("fc", step), "call_id": call_id,
             "name": tool, "arguments": arguments, "status": "completed"},
            {"type": "function_call_output", "id": head.item_id("fco", step),
             "call_id": call_id, "output": observation, "status": "completed"}]


@dataclass
class _OpenMessage:
    """The message item a step's answer streams into."""

    item: Json
    index: int
    text: str = ""


@dataclass
class ResponseEvents:
    """A run's events as the Responses API's streaming events, numbered from 0; those at
    or before `starting_after` are counted but not returned (a resumed stream)."""

    head: ResponseHead
    starting_after: int = -1
    background: bool | None = None
    #: The Response once the run ended (the terminal event's), else None.
    final: Json | None = None
    _seq: int = -1
    _outputs: int = 0
    _step: int = 0
    _attempt: int = 0
    _started: bool = False
    _message: _OpenMessage | None = None
    _call: tuple[ToolCalled, int] | None = None
    _steps: list[AgentStep] = field(default_factory=list)
    _summary: RunSummary | None = None
    _out: list[Json] = field(default_factory=list)

    def opening(self) -> list[Json]:
        """response.created: the response, queued, before any event of its run."""
        self._emit("response.created", response=self._snapshot("queued"))
        return self._take()

    def add(self, event: RunEvent) -> list[Json]:
        """The streaming events one run event makes (none past the run's end)."""
        if self.final is not None:
            return []
        body = event.body
        if isinstance(body, StepStarted):
            self._step_started(body.step)
        elif isinstance(body, AnswerDelta):
            self._delta(body.step, body.text)
        elif isinstance(body, AnswerWithdrawn):
            self._close_message("incomplete")
            self._attempt += 1
        elif isinstance(body, ToolCalled):
            self._tool_called(body)
        elif isinstance(body, ToolReturned):
            self._tool_returned(body)
        elif isinstance(body, RunSummary):
            self._finished(body)
        elif isinstance(body, RunEnded):
            self._ended(body)
        return self._take()

    def error(self, code: str, message: str) -> list[Json]:
        """An `error` event: the stream ends without the run's end (it may be resumed)."""
        self._emit("error", code=code, message=message, param=None)
        return self._take()

    # --- one kind of event each ---

    def _step_started(self, step: int) -> None:
        if not self._started:
            self._started = True
            self._emit("response.in_progress", response=self._snapshot("in_progress"))
        self._step, self._attempt = step, 0

    def _delta(self, step: int, text: str) -> None:
        if self._message is None:
            self._open_message(step)
        assert self._message is not None
        self._message.text += text
        self._emit("response.output_text.delta", item_id=self._message.item["id"],
                   output_index=self._message.index, content_index=0, delta=text,
                   logprobs=[])

    def _open_message(self, step: int) -> None:
        item = _message(self.head.item_id("msg", step, self._attempt), "", "in_progress")
        self._message = _OpenMessage(item, self._new_output())
        self._emit("response.output_item.added", output_index=self._message.index, item=item)
        self._emit("response.content_part.added", item_id=item["id"],
                   output_index=self._message.index, content_index=0, part=_text_part(""))

    def _close_message(self, status: str, text: str | None = None) -> None:
        message = self._message
        if message is None:
            return
        self._message = None
        text = message.text if text is None else text
        item_id, index = message.item["id"], message.index
        self._emit("response.output_text.done", item_id=item_id, output_index=index,
                   content_index=0, text=text, logprobs=[])
        self._emit("response.content_part.done", item_id=item_id, output_index=index,
                   content_index=0, part=_text_part(text))
        self._emit("response.output_item.done", output_index=index,
                   item=_message(item_id, text, status))

    def _tool_called(self, call: ToolCalled) -> None:
        self._close_message("incomplete")
        head = self.head
        [item, *_] = _call_items(head, call.step, call.tool, "", "", False, done=False)
        item["status"] = "in_progress"
        index = self._new_output()
        self._call = (call, index)
        self._emit("response.output_item.added", output_index=index, item=item)
        if item["type"] == "mcp_call":
            self._emit("response.mcp_call_arguments.delta", item_id=item["id"],
                       output_index=index, delta=call.arguments_json)
            self._emit("response.mcp_call_arguments.done", item_id=item["id"],
                       output_index=index, arguments=call.arguments_json)
            self._emit("response.mcp_call.in_progress", item_id=item["id"], output_index=index)
            return
        self._emit("response.function_call_arguments.delta", item_id=item["id"],
                   output_index=index, delta=call.arguments_json)
        self._emit("response.function_call_arguments.done", item_id=item["id"],
                   output_index=index, arguments=call.arguments_json)
        self._emit("response.output_item.done", output_index=index,
                   item={**item, "arguments": call.arguments_json, "status": "completed"})

    def _tool_returned(self, result: ToolReturned) -> None:
        if self._call is None:
            return
        call, index = self._call
        self._call = None
        step = AgentStep(call.step, result.duration, tool=call.tool,
                         arguments_json=call.arguments_json, observation=result.observation,
                         observation_truncated=result.observation_truncated,
                         error=result.observation if result.is_error else "")
        self._steps.append(step)
        items = _call_items(self.head, step.index, step.tool, step.arguments_json,
                            step.observation, result.is_error)
        if items[0]["type"] == "mcp_call":
            item = items[0]
            kind = "response.mcp_call.failed" if result.is_error else "response.mcp_call.completed"
            self._emit(kind, item_id=item["id"], output_index=index)
            self._emit("response.output_item.done", output_index=index, item=item)
            return
        output = items[1]
        index = self._new_output()
        self._emit("response.output_item.added", output_index=index, item=output)
        self._emit("response.output_item.done", output_index=index, item=output)

    def _finished(self, summary: RunSummary) -> None:
        self._summary = summary
        if summary.stop_reason is not StopReason.FINAL_ANSWER:
            self._close_message("incomplete")
            return
        answer = summary.final_answer
        if self._message is None:
            self._open_message(self._step)
        assert self._message is not None
        streamed = self._message.text
        if answer != streamed and answer.startswith(streamed):
            # Deltas past the run's event room were not recorded: the rest at once.
            self._delta(self._step, answer[len(streamed):])
        self._close_message("completed", answer)

    def _ended(self, ended: RunEnded) -> None:
        self._close_message("incomplete")
        summary = self._summary
        status, incomplete = final_status(ended.status,
                                          summary.stop_reason if summary else None)
        answer = summary.final_answer if summary is not None \
            and summary.stop_reason is StopReason.FINAL_ANSWER else None
        output = output_items(self.head, self._steps, answer, self._step)
        head = dataclasses.replace(self.head, model=summary.model) \
            if summary is not None and summary.model else self.head
        # The usage the record keeps (GET's): no count of cached tokens.
        usage = Usage(summary.usage.input_tokens, summary.usage.output_tokens) \
            if summary is not None else Usage()
        self.final = head.json(status, output, usage=usage,
                               error=error_json(ended.status, ended.error),
                               incomplete=incomplete, completed_at=time.time(),
                               background=self.background)
        self._emit(_TERMINAL_EVENTS[status], response=self.final)

    # --- numbering ---

    def _snapshot(self, status: str) -> Json:
        return self.head.json(status, [], background=self.background)

    def _new_output(self) -> int:
        self._outputs += 1
        return self._outputs - 1

    def _emit(self, kind: str, **fields: Any) -> None:
        self._seq += 1
        if self._seq > self.starting_after:
            self._out.append({"type": kind, "sequence_number": self._seq, **fields})

    def _take(self) -> list[Json]:
        out, self._out = self._out, []
        return out
