"""Agent outcomes and events -> protobuf responses."""

from __future__ import annotations

import json

from agentloop.rpc.responses import duration, usage_pb
from agentloop.services.agent import (
    AgentEvent,
    AgentOutcome,
    AgentStep,
    AnswerDelta,
    AnswerWithdrawn,
    RunFinished,
    StepStarted,
    StopReason,
    ThoughtFormed,
    ToolCalled,
    ToolReturned,
)
from agentloop.services.tools import BUILTIN, Tool, ToolRegistry
from agentloop.v1 import agentloop_pb2 as pb

STOP_REASONS = {
    StopReason.FINAL_ANSWER: pb.AGENT_STOP_REASON_FINAL_ANSWER,
    StopReason.MAX_STEPS: pb.AGENT_STOP_REASON_MAX_STEPS,
    StopReason.DEADLINE: pb.AGENT_STOP_REASON_DEADLINE,
    StopReason.TOOL_ERROR: pb.AGENT_STOP_REASON_TOOL_ERROR,
    StopReason.MODEL_ERROR: pb.AGENT_STOP_REASON_MODEL_ERROR,
    StopReason.CANCELLED: pb.AGENT_STOP_REASON_CANCELLED,
}


def step_pb(step: AgentStep) -> pb.AgentStep:
    return pb.AgentStep(
        index=step.index,
        thought=step.thought,
        tool=step.tool,
        arguments_json=step.arguments_json,
        observation=step.observation,
        observation_truncated=step.observation_truncated,
        duration=duration(step.duration),
        error=step.error,
    )


def run_agent_response(outcome: AgentOutcome) -> pb.RunAgentResponse:
    return pb.RunAgentResponse(
        final_answer=outcome.final_answer,
        stop_reason=STOP_REASONS[outcome.stop_reason],
        steps=[step_pb(step) for step in outcome.steps],
        usage=usage_pb(outcome.usage),
        model=outcome.model,
        duration=duration(outcome.duration),
    )


def agent_event_pb(event: AgentEvent) -> pb.StreamRunAgentResponse:
    match event:
        case StepStarted(step):
            return pb.StreamRunAgentResponse(step_started=pb.AgentStepStarted(step=step))
        case ThoughtFormed(step, thought):
            return pb.StreamRunAgentResponse(thought=pb.AgentThought(step=step, thought=thought))
        case ToolCalled():
            return pb.StreamRunAgentResponse(tool_call=pb.AgentToolCall(
                step=event.step,
                call_id=event.call_id,
                tool=event.tool,
                arguments_json=event.arguments_json,
                client_tool=event.client_tool,
            ))
        case ToolReturned():
            return pb.StreamRunAgentResponse(tool_result=pb.AgentToolResult(
                step=event.step,
                call_id=event.call_id,
                tool=event.tool,
                observation=event.observation,
                observation_truncated=event.observation_truncated,
                is_error=event.is_error,
                duration=duration(event.duration),
            ))
        case AnswerDelta(step, text):
            return pb.StreamRunAgentResponse(answer_delta=pb.AgentAnswerDelta(step=step, text=text))
        case AnswerWithdrawn(step, chars):
            return pb.StreamRunAgentResponse(
                answer_withdrawn=pb.AgentAnswerWithdrawn(step=step, chars=chars))
        case RunFinished(outcome):
            return pb.StreamRunAgentResponse(finished=pb.AgentFinished(
                final_answer=outcome.final_answer,
                stop_reason=STOP_REASONS[outcome.stop_reason],
                usage=usage_pb(outcome.usage),
                steps=len(outcome.steps),
                duration=duration(outcome.duration),
                model=outcome.model,
            ))


def server_tool_pb(tool: Tool) -> pb.ServerTool:
    return pb.ServerTool(
        name=tool.name,
        description=tool.description,
        parameters_json_schema=json.dumps(tool.parameters),
        provider=getattr(tool, "provider", BUILTIN),
    )


def list_tools_response(tools: ToolRegistry) -> pb.ListToolsResponse:
    return pb.ListToolsResponse(tools=[server_tool_pb(tool) for tool in tools])
