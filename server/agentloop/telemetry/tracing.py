"""Traces: the tracer provider, and the spans of backend calls and agent runs.

The SDK reads the standard OTEL_* variables itself; spans leave through a batch processor's
thread, so a slow or absent collector never holds up a request. The spans follow the
OpenTelemetry GenAI semantic conventions; docs/observability.md lists them and their
attributes.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.environment_variables import OTEL_TRACES_SAMPLER
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from agentloop.domain import (
    AgentOutcome,
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationEnd,
    GenerationRequest,
    OutputFormat,
)
from agentloop.errors import AgentLoopError
from agentloop.telemetry import otlp

TRACER_NAME = "agentloop"

OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
ERROR_TYPE = "error.type"
#: The operator's name of the upstream pool that served (or failed) a call: spans and
#: metric labels (bounded: the pools file names them).
UPSTREAM = "agentloop.upstream"
#: gen_ai.operation.name of an Embed call's backend call.
EMBEDDINGS = "embeddings"
EMBEDDING_DIMENSIONS = "gen_ai.embeddings.dimension.count"

#: Without OTEL_TRACES_SAMPLER: a call that comes with a sampled traceparent is always
#: traced (its caller's trace goes on), one root call in ten otherwise. Tracing every call
#: costs about 6% of the gateway's CPU on a 64-token answer (bench/bench_telemetry.py);
#: OTEL_TRACES_SAMPLER=parentbased_always_on asks for it.
DEFAULT_SAMPLER = sampling.ParentBased(sampling.TraceIdRatioBased(0.1))
#: gen_ai.provider.name per backend (Backend.name), where the two differ.
PROVIDER_NAMES = {"embedded": "llama.cpp"}
_FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
                   FinishReason.TOOL_CALLS: "tool_calls"}


def tracer_provider(resource: Resource) -> TracerProvider:
    """A provider exporting by OTLP when an endpoint is set (a no-op one if the SDK is off).

    Sampling: what OTEL_TRACES_SAMPLER names, else DEFAULT_SAMPLER. Without an exporter no
    span is recorded (ALWAYS_OFF): they would go nowhere. Span contexts are made either
    way, so logs carry trace ids and Ollama gets a traceparent."""
    exporting = otlp.configured("traces")
    if not exporting:
        sampler: sampling.Sampler | None = sampling.ALWAYS_OFF
    elif os.environ.get(OTEL_TRACES_SAMPLER):
        sampler = None  # the SDK builds the one the variables name
    else:
        sampler = DEFAULT_SAMPLER
    provider = TracerProvider(resource=resource, sampler=sampler)
    if exporting and is_enabled(provider):
        provider.add_span_processor(BatchSpanProcessor(otlp.span_exporter()))
    return provider


def is_enabled(provider: trace.TracerProvider) -> bool:
    """False when OTEL_SDK_DISABLED made the provider hand out no-op tracers."""
    return not isinstance(provider.get_tracer(TRACER_NAME), trace.NoOpTracer)


def provider_name(backend_name: str) -> str:
    return PROVIDER_NAMES.get(backend_name, backend_name)


def operation_name(request: GenerationRequest) -> str:
    return "chat" if request.is_chat else "text_completion"


def finish_reason_name(reason: FinishReason) -> str:
    return _FINISH_REASONS.get(reason, "unspecified")


def error_type(exc: BaseException) -> str:
    """A low-cardinality name for a failure: the domain error's reason, else the class."""
    if isinstance(exc, AgentLoopError):
        return exc.reason
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return type(exc).__qualname__


def error_description(exc: BaseException) -> str:
    """The span status message: a domain error's message (written for clients), else the
    error type (other exception texts may carry internals)."""
    return exc.message if isinstance(exc, AgentLoopError) else error_type(exc)


def fail_span(span: Span, kind: str, description: str) -> None:
    """Mark a span failed with error.type and end it."""
    span.set_attribute(ERROR_TYPE, kind)
    span.set_status(Status(StatusCode.ERROR, description))
    span.end()


# --- backend calls ----------------------------------------------------------------------

def start_generation_span(
    tracer: Tracer, request: GenerationRequest, provider: str,
    address: tuple[str, int] | None, with_content: bool,
) -> Span:
    """The CLIENT span of one backend call, with the gen_ai.request.* attributes."""
    operation = operation_name(request)
    options = request.options
    attributes: dict[str, Any] = {
        OPERATION: operation,
        PROVIDER: provider,
        REQUEST_MODEL: request.model,
        "gen_ai.request.temperature": options.temperature,
        "gen_ai.request.top_p": options.top_p,
        "gen_ai.request.top_k": options.top_k,
        "gen_ai.request.max_tokens": options.max_tokens,
    }
    if request.format.kind is not OutputFormat.TEXT:
        attributes["gen_ai.output.type"] = "json"
    if options.seed is not None:
        attributes["gen_ai.request.seed"] = options.seed
    if options.stop:
        attributes["gen_ai.request.stop_sequences"] = list(options.stop)
    if address is not None:
        attributes["server.address"], attributes["server.port"] = address
    if request.context.tenant:  # the operator's name for the caller's team
        attributes["agentloop.tenant"] = request.context.tenant
    if with_content:
        attributes["gen_ai.input.messages"] = _input_messages(request)
        if request.system:
            attributes["gen_ai.system_instructions"] = _json([_text_part(request.system)])
    return tracer.start_span(f"{operation} {request.model}", kind=SpanKind.CLIENT,
                             attributes=attributes)


def end_generation_span(span: Span, end: GenerationEnd, output: list[str] | None) -> None:
    """Record the response attributes (and the answer, when captured) and end the span."""
    finish_reason = finish_reason_name(end.finish_reason)
    span.set_attributes({
        RESPONSE_MODEL: end.model,
        "gen_ai.response.finish_reasons": (finish_reason,),
        INPUT_TOKENS: end.usage.input_tokens,
        OUTPUT_TOKENS: end.usage.output_tokens,
    })
    if output is not None:
        span.set_attribute("gen_ai.output.messages", _json([{
            "role": "assistant", "parts": [_text_part("".join(output))],
            "finish_reason": finish_reason,
        }]))
    span.end()


def start_embeddings_span(tracer: Tracer, request: EmbeddingRequest, provider: str,
                          address: tuple[str, int] | None) -> Span:
    """The CLIENT span `embeddings {model}` of one backend call (no text goes in it)."""
    attributes: dict[str, Any] = {
        OPERATION: EMBEDDINGS,
        PROVIDER: provider,
        REQUEST_MODEL: request.model,
        "agentloop.embeddings.texts": len(request.texts),
    }
    if request.dimensions is not None:
        attributes[EMBEDDING_DIMENSIONS] = request.dimensions
    if address is not None:
        attributes["server.address"], attributes["server.port"] = address
    return tracer.start_span(f"{EMBEDDINGS} {request.model}", kind=SpanKind.CLIENT,
                             attributes=attributes)


def end_embeddings_span(span: Span, result: EmbeddingResult) -> None:
    span.set_attributes({
        RESPONSE_MODEL: result.model,
        INPUT_TOKENS: result.input_tokens,
        EMBEDDING_DIMENSIONS: len(result.vectors[0]) if result.vectors else 0,
    })
    span.end()


def _input_messages(request: GenerationRequest) -> str:
    if not request.is_chat:
        return _json([{"role": "user", "parts": [_text_part(request.prompt or "")]}])
    return _json([{"role": str(message.role), "parts": [_text_part(message.content)]}
                  for message in request.messages])


def _text_part(text: str) -> dict[str, str]:
    return {"type": "text", "content": text}


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


# --- agent runs -------------------------------------------------------------------------

def start_agent_span(tracer: Tracer, model: str, provider: str) -> Span:
    """The INTERNAL `invoke_agent` span around a whole run (the agent runs in-process)."""
    return tracer.start_span("invoke_agent", kind=SpanKind.INTERNAL, attributes={
        OPERATION: "invoke_agent", PROVIDER: provider, REQUEST_MODEL: model,
    })


def end_agent_span(span: Span, outcome: AgentOutcome) -> None:
    """Usage summed over the run's model calls; a run without an answer is an error."""
    stop_reason = outcome.stop_reason.name.lower()
    span.set_attributes({
        RESPONSE_MODEL: outcome.model,
        INPUT_TOKENS: outcome.usage.input_tokens,
        OUTPUT_TOKENS: outcome.usage.output_tokens,
        "agentloop.agent.steps": len(outcome.steps),
        "agentloop.agent.stop_reason": stop_reason,
    })
    if stop_reason != "final_answer":
        span.set_attribute(ERROR_TYPE, stop_reason)
        span.set_status(Status(StatusCode.ERROR, f"the run stopped without an answer "
                                                 f"({stop_reason})"))
    span.end()


def start_tool_span(tracer: Tracer, name: str, call_id: str, client_tool: bool,
                    arguments_json: str | None) -> Span:
    """The INTERNAL `execute_tool {name}` span (a client tool: the wait for the client)."""
    attributes: dict[str, Any] = {
        OPERATION: "execute_tool",
        "gen_ai.tool.name": name,
        "gen_ai.tool.call.id": call_id,
        "gen_ai.tool.type": "function",
        "agentloop.tool.client": client_tool,
    }
    if arguments_json is not None:
        attributes["gen_ai.tool.call.arguments"] = arguments_json
    return tracer.start_span(f"execute_tool {name}", kind=SpanKind.INTERNAL,
                             attributes=attributes)


def end_tool_span(span: Span, is_error: bool, result: str, *, with_content: bool) -> None:
    if with_content:
        span.set_attribute("gen_ai.tool.call.result", result)
    if is_error:
        span.set_attribute(ERROR_TYPE, "tool_error")
        span.set_status(Status(StatusCode.ERROR, "the tool reported an error"))
    span.end()
