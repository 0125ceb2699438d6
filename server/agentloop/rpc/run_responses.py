"""Background runs -> protobuf: AgentRun, its deliveries and the events WatchAgentRun sends."""

from __future__ import annotations

from agentloop.rpc.agent_responses import STOP_REASONS, agent_event_pb, step_pb
from agentloop.rpc.responses import duration, timestamp, usage_pb
from agentloop.runs.store import DeliveryRecord, DeliveryState, RunStatus
from agentloop.services.runs import RunEnded, RunEvent, RunSummary, RunView
from agentloop.v1 import agentloop_pb2 as pb

RUN_STATUSES = {
    RunStatus.QUEUED: pb.AGENT_RUN_STATUS_QUEUED,
    RunStatus.RUNNING: pb.AGENT_RUN_STATUS_RUNNING,
    RunStatus.WAITING_FOR_TOOL: pb.AGENT_RUN_STATUS_WAITING_FOR_TOOL,
    RunStatus.COMPLETED: pb.AGENT_RUN_STATUS_COMPLETED,
    RunStatus.FAILED: pb.AGENT_RUN_STATUS_FAILED,
    RunStatus.CANCELLED: pb.AGENT_RUN_STATUS_CANCELLED,
    RunStatus.EXPIRED: pb.AGENT_RUN_STATUS_EXPIRED,
}
STATUSES_OF_PB = {number: status for status, number in RUN_STATUSES.items()}
_DELIVERY_STATES = {
    DeliveryState.PENDING: pb.WEBHOOK_DELIVERY_STATE_PENDING,
    DeliveryState.DELIVERED: pb.WEBHOOK_DELIVERY_STATE_DELIVERED,
    DeliveryState.FAILED: pb.WEBHOOK_DELIVERY_STATE_FAILED,
    DeliveryState.DISABLED: pb.WEBHOOK_DELIVERY_STATE_DISABLED,
}


def delivery_pb(delivery: DeliveryRecord) -> pb.WebhookDelivery:
    return pb.WebhookDelivery(
        webhook_id=delivery.webhook_id, event_type=delivery.event_type,
        state=_DELIVERY_STATES[delivery.state], attempts=delivery.attempts,
        last_status_code=delivery.last_status, last_error=delivery.last_error,
        last_attempt_time=timestamp(delivery.last_attempt),
    )


def run_pb(view: RunView) -> pb.AgentRun:
    record = view.record
    stop = view.stop_reason
    waiting = view.waiting_call
    return pb.AgentRun(
        id=record.id,
        status=RUN_STATUSES[record.status],
        create_time=timestamp(record.created),
        update_time=timestamp(record.updated),
        end_time=timestamp(record.finished),
        expire_time=timestamp(record.deadline),
        steps=[step_pb(step) for step in view.steps],
        final_answer=view.final_answer,
        stop_reason=STOP_REASONS[stop] if stop is not None else pb.AGENT_STOP_REASON_UNSPECIFIED,
        usage=usage_pb(view.usage),
        model=record.model,
        error=record.error,
        waiting_call=None if waiting is None else pb.AgentToolCall(
            step=waiting.step, call_id=waiting.call_id, tool=waiting.tool,
            arguments_json=waiting.arguments_json, client_tool=True),
        last_sequence=record.last_seq,
        webhook_deliveries=[delivery_pb(d) for d in view.deliveries],
        cancel_requested=record.cancel_requested and record.status not in (
            RunStatus.CANCELLED, RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.EXPIRED),
    )


def finished_pb(summary: RunSummary) -> pb.AgentFinished:
    return pb.AgentFinished(
        final_answer=summary.final_answer,
        stop_reason=STOP_REASONS[summary.stop_reason],
        usage=usage_pb(summary.usage),
        steps=summary.steps,
        duration=duration(summary.duration),
        model=summary.model,
    )


def run_event_pb(event: RunEvent) -> pb.WatchAgentRunResponse:
    """One recorded event as WatchAgentRun sends it (the same kinds as StreamRunAgent's)."""
    body = event.body
    if isinstance(body, RunSummary):
        return pb.WatchAgentRunResponse(sequence=event.seq, finished=finished_pb(body))
    if isinstance(body, RunEnded):
        return pb.WatchAgentRunResponse(sequence=event.seq, run_ended=pb.AgentRunEnded(
            status=RUN_STATUSES[body.status], error=body.error))
    streamed = agent_event_pb(body)
    kind = streamed.WhichOneof("event")
    reply = pb.WatchAgentRunResponse(sequence=event.seq)
    getattr(reply, kind).CopyFrom(getattr(streamed, kind))  # the same field names
    return reply


def stream_event_pb(event: RunEvent) -> pb.StreamRunAgentResponse | None:
    """A recorded event as StreamRunAgent sends it; None for the run's end (the stream ends)."""
    body = event.body
    if isinstance(body, RunSummary):
        return pb.StreamRunAgentResponse(finished=finished_pb(body))
    if isinstance(body, RunEnded):
        return None
    return agent_event_pb(body)
