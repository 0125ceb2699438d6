"""Telemetry: OpenTelemetry traces and metrics, and JSON logs with trace ids.

One module per concern: `tracing` (the tracer provider, GenAI spans), `metrics` (the
instruments, the Prometheus endpoint), `otlp` (exporters from the OTEL_* variables),
`logs` (the JSON log format). The per-RPC span, metric and log line are recorded by
the gRPC edge (`agentloop.rpc.telemetry_interceptor`) into this package's instruments.

`start_telemetry` builds one server's `Telemetry`: its own providers (not the global
ones, so several servers in one process, as in the tests, each export where they were
told), handed to the services that record into it. Nothing here runs per token: a backend
call opens its span when it starts and records everything once, when its final report
comes or it fails.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.metrics import NoOpMeter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, Tracer

from agentloop.config import Settings
from agentloop.domain import (
    EmbeddingRequest,
    EmbeddingResult,
    GenerationEnd,
    GenerationRequest,
    Priority,
)
from agentloop.telemetry import logs, tracing
from agentloop.telemetry.metrics import (
    DOOR,
    PRIORITY,
    REFUSAL_REASON,
    RUN_STATUS,
    RUN_STORE_OPERATION,
    TENANT,
    WEBHOOK_OUTCOME,
    AdmissionState,
    CacheCounts,
    HealthState,
    Instruments,
    PrometheusEndpoint,
    RetryCounts,
    RunsState,
    engine_process,
    meter_provider,
    observe_engine_load,
    observe_runs,
    observe_server_state,
    observe_upstreams,
)
from agentloop.tenants import tenant_label

__all__ = ["Observed", "Telemetry", "start_telemetry"]

log = logging.getLogger(__name__)

#: The metric label of every model name the backend does not serve.
OTHER_MODEL = "_OTHER"
#: Seconds shutdown waits for the last spans and metrics to reach the collector.
FLUSH_TIMEOUT = 5.0


class Telemetry:
    """What one server records into: its tracer and its instruments."""

    def __init__(
        self,
        tracer: Tracer,
        instruments: Instruments,
        provider: str = "",
        address: tuple[str, int] | None = None,
        trace_content: bool = False,
        *,
        served_models: Callable[[], Collection[str]] = frozenset,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        prometheus: PrometheusEndpoint | None = None,
    ) -> None:
        self.tracer = tracer
        self.instruments = instruments
        #: gen_ai.provider.name: "ollama", or "llama.cpp" for the embedded engine.
        self.provider = provider
        self.trace_content = trace_content
        #: server.address / server.port of the engine (None in-process).
        self.address = address
        self._served_models = served_models
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._prometheus = prometheus

    @classmethod
    @functools.cache
    def disabled(cls) -> Telemetry:
        """Records nothing: for services built without a server (and the default)."""
        return cls(trace.NoOpTracer(), Instruments(NoOpMeter(tracing.TRACER_NAME)))

    @property
    def metrics_port(self) -> int | None:
        """The Prometheus endpoint's bound port; None when it does not run."""
        return self._prometheus.port if self._prometheus is not None else None

    # --- what the services call ---------------------------------------------------------

    @contextmanager
    def backend_call(self, request: GenerationRequest) -> Iterator[BackendCall]:
        """Observe one backend call; its span is current inside (Ollama gets `traceparent`).

        Call `finish(end)` when the final report arrives; leaving by an exception (or
        without a report) marks the call failed with error.type.
        """
        entry = logs.current_request()
        if entry is not None and not entry.model:
            entry.model = request.model
        call = BackendCall(self, request)
        with _observing(call):
            yield call

    @contextmanager
    def embeddings_call(self, request: EmbeddingRequest) -> Iterator[EmbeddingsCall]:
        """Observe one backend embedding call: the `embeddings {model}` span, the
        gen_ai.client.* duration and input tokens, the request log's model and tokens.
        Call `finish(result)` with the vectors; leaving by an exception fails it."""
        call = EmbeddingsCall(self, request)
        with _observing(call):
            yield call

    def generation_done(self, request: GenerationRequest, end: GenerationEnd) -> None:
        """A generation reached its caller: the gen_ai.server.* timings and the request log.

        `end.timings` are the gateway's (time to first token includes queueing)."""
        entry = logs.current_request()
        if entry is not None:
            entry.model = end.model
            entry.input_tokens += end.usage.input_tokens
            entry.output_tokens += end.usage.output_tokens
        first, total = end.timings.time_to_first_token, end.timings.total
        attributes = self.generation_attributes(request) | {
            tracing.RESPONSE_MODEL: self.model_label(end.model)}
        if first is not None:
            self.instruments.time_to_first_token.record(first, attributes)
            if total is not None and end.usage.output_tokens > 1:
                self.instruments.time_per_output_token.record(
                    (total - first) / (end.usage.output_tokens - 1), attributes)

    @contextmanager
    def agent_run(self, model: str) -> Iterator[Observed]:
        """The `invoke_agent` span around a run; `finish(outcome)` when it ends."""
        span = tracing.start_agent_span(self.tracer, model, self.provider)
        with _observing(Observed(span, tracing.end_agent_span)) as run:
            yield run

    @contextmanager
    def background_run(self, run_id: str, replica: str, resumed: bool) -> Iterator[None]:
        """The `agent_run` span around a background run's stint on this replica. Its trace
        id comes from the run id, so the spans of every replica that works on the run (the
        one that starts it, any that takes it over) are one trace; it links to the caller's
        span (StartAgentRun's) when there is one."""
        digest = hashlib.sha256(run_id.encode()).digest()
        parent = trace.NonRecordingSpan(trace.SpanContext(
            trace_id=int.from_bytes(digest[:16], "big") or 1,
            span_id=int.from_bytes(digest[16:24], "big") or 1, is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)))
        caller = trace.get_current_span().get_span_context()
        links = [trace.Link(caller)] if caller.is_valid else []
        with self.tracer.start_as_current_span(
                "agent_run", context=trace.set_span_in_context(parent), links=links,
                kind=trace.SpanKind.INTERNAL,
                attributes={"agentloop.run.id": run_id, "agentloop.run.resumed": resumed,
                            "agentloop.replica": replica}):
            yield

    @contextmanager
    def tool_call(self, name: str, call_id: str, client_tool: bool,
                  arguments_json: str) -> Iterator[Observed]:
        """The `execute_tool {name}` span; `finish(is_error, result_text)` when it returns."""
        span = tracing.start_tool_span(self.tracer, name, call_id, client_tool,
                                       arguments_json if self.trace_content else None)
        # Client tool names come from callers: one label value for them all.
        attributes = {"gen_ai.tool.name": "client" if client_tool else name}
        started = time.perf_counter()

        def end(span: Span, is_error: bool, result: str) -> None:
            tracing.end_tool_span(span, is_error, result, with_content=self.trace_content)
            self.instruments.tool_duration.record(
                time.perf_counter() - started,
                attributes | ({tracing.ERROR_TYPE: "tool_error"} if is_error else {}))

        with _observing(Observed(span, end)) as call:
            yield call

    # --- lifecycle ----------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Close the Prometheus endpoint, then flush spans and metrics to the collector.

        The flush runs on a daemon thread and is waited for at most FLUSH_TIMEOUT seconds:
        an unreachable collector keeps the exporter retrying until its own timeout
        (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s), and that must not hold up the process's exit."""
        if self._tracer_provider is None and self._meter_provider is None:
            return
        closed = threading.Event()

        def close() -> None:
            try:
                self._close()
            finally:
                closed.set()

        threading.Thread(target=close, name="agentloop-telemetry-flush", daemon=True).start()
        if not await asyncio.to_thread(closed.wait, FLUSH_TIMEOUT):
            log.warning("telemetry not flushed within %.0fs (is the collector reachable?)",
                        FLUSH_TIMEOUT)

    def _close(self) -> None:
        if self._prometheus is not None:
            self._prometheus.close()
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()

    def generation_attributes(self, request: GenerationRequest) -> dict[str, Any]:
        """The metric attributes every generation carries."""
        return {tracing.OPERATION: tracing.operation_name(request),
                tracing.PROVIDER: self.provider,
                tracing.REQUEST_MODEL: self.model_label(request.model),
                TENANT: tenant_label(request.context.tenant),
                DOOR: request.context.door}

    # --- what admission reports (an admission.AdmissionObserver) ------------------------

    def waited(self, tenant: str, priority: Priority, seconds: float) -> None:
        self.instruments.queue_wait.record(
            seconds, {TENANT: tenant, PRIORITY: priority.name.lower()})

    def refused(self, tenant: str, reason: str) -> None:
        self.instruments.refusals.add(1, {TENANT: tenant, REFUSAL_REASON: reason})

    def run_ended(self, status: str) -> None:
        self.instruments.runs_ended.add(1, {RUN_STATUS: status})

    def webhook_attempt(self, outcome: str) -> None:
        self.instruments.webhook_attempts.add(1, {WEBHOOK_OUTCOME: outcome})

    def run_store_call(self, operation: str, seconds: float) -> None:
        self.instruments.run_store_duration.record(seconds, {RUN_STORE_OPERATION: operation})

    def observe_runs(self, runs: RunsState) -> None:
        """Gauges over the run manager's counts (nothing when telemetry is off)."""
        if self._meter_provider is not None:
            observe_runs(self._meter_provider.get_meter(tracing.TRACER_NAME, _VERSION), runs)

    def model_label(self, model: str) -> str:
        """A model name as a metric label: callers choose the names they send, so a name
        the backend does not serve becomes OTHER_MODEL and /metrics stays bounded."""
        served = self._served_models()
        return model if model in served or f"{model}:latest" in served else OTHER_MODEL


class Observed:
    """A span its owner finishes with a result; an exception or no result fails it."""

    __slots__ = ("_end", "_open", "span")

    def __init__(self, span: Span, end: Callable[..., None]) -> None:
        self.span = span
        self._end = end
        self._open = True

    def finish(self, *result: Any) -> None:
        if self._open:
            self._open = False
            self._end(self.span, *result)

    def fail(self, exc: BaseException) -> None:
        self._fail(tracing.error_type(exc), tracing.error_description(exc))

    def close(self) -> None:
        """The operation is over: if nothing finished or failed it, it had no result."""
        self._fail("_OTHER", "ended without a result")

    def _fail(self, kind: str, description: str) -> None:
        if self._open:
            self._open = False
            tracing.fail_span(self.span, kind, description)


class BackendCall(Observed):
    """One backend call: its CLIENT span and the gen_ai.client.* metrics."""

    __slots__ = ("_attributes", "_instruments", "_model_label", "_started", "output")

    def __init__(self, telemetry: Telemetry, request: GenerationRequest) -> None:
        super().__init__(
            tracing.start_generation_span(telemetry.tracer, request, telemetry.provider,
                                          telemetry.address, telemetry.trace_content),
            tracing.end_generation_span)
        self._instruments = telemetry.instruments
        self._model_label = telemetry.model_label
        self._attributes = telemetry.generation_attributes(request)
        self._started = time.perf_counter()
        #: The answer's pieces, collected only when content goes into spans.
        self.output: list[str] | None = [] if telemetry.trace_content else None

    def finish(self, end: GenerationEnd) -> None:  # type: ignore[override]
        if not self._open:
            return
        super().finish(end, self.output)
        attributes = self._attributes | {tracing.RESPONSE_MODEL: self._model_label(end.model)}
        if end.upstream:
            attributes[tracing.UPSTREAM] = end.upstream
        self._instruments.operation_duration.record(time.perf_counter() - self._started,
                                                    attributes)
        usage = self._instruments.token_usage
        usage.record(end.usage.input_tokens, attributes | {"gen_ai.token.type": "input"})
        usage.record(end.usage.output_tokens, attributes | {"gen_ai.token.type": "output"})

    def _fail(self, kind: str, description: str) -> None:
        if not self._open:
            return
        super()._fail(kind, description)
        self._instruments.operation_duration.record(
            time.perf_counter() - self._started, self._attributes | {tracing.ERROR_TYPE: kind})


class EmbeddingsCall(Observed):
    """One backend embedding call: its CLIENT span and the gen_ai.client.* metrics."""

    __slots__ = ("_attributes", "_instruments", "_model_label", "_started")

    def __init__(self, telemetry: Telemetry, request: EmbeddingRequest) -> None:
        super().__init__(
            tracing.start_embeddings_span(telemetry.tracer, request, telemetry.provider,
                                          telemetry.address),
            tracing.end_embeddings_span)
        self._instruments = telemetry.instruments
        self._model_label = telemetry.model_label
        self._attributes = {tracing.OPERATION: tracing.EMBEDDINGS,
                            tracing.PROVIDER: telemetry.provider,
                            tracing.REQUEST_MODEL: telemetry.model_label(request.model)}
        self._started = time.perf_counter()

    def finish(self, result: EmbeddingResult) -> None:  # type: ignore[override]
        if not self._open:
            return
        super().finish(result)
        entry = logs.current_request()
        if entry is not None:
            entry.model = result.model
            entry.input_tokens += result.input_tokens
        attributes = self._attributes | {tracing.RESPONSE_MODEL: self._model_label(result.model)}
        self._instruments.operation_duration.record(time.perf_counter() - self._started,
                                                    attributes)
        self._instruments.token_usage.record(result.input_tokens,
                                             attributes | {"gen_ai.token.type": "input"})

    def _fail(self, kind: str, description: str) -> None:
        if not self._open:
            return
        super()._fail(kind, description)
        self._instruments.operation_duration.record(
            time.perf_counter() - self._started, self._attributes | {tracing.ERROR_TYPE: kind})


@contextmanager
def _observing(observed: Observed) -> Iterator[Any]:
    """Make the span current for the body; an exception or a missing result fails it."""
    with trace.use_span(observed.span, record_exception=False,
                        set_status_on_exception=False):
        try:
            yield observed
        except BaseException as exc:
            observed.fail(exc)
            raise
        finally:
            observed.close()


class Engine(Protocol):
    """What telemetry reads of the backend (a `Backend` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> tuple[str, int] | None: ...


def start_telemetry(settings: Settings, backend: Engine, admission: AdmissionState,
                    health: HealthState, cache: CacheCounts | None = None,
                    retrying: RetryCounts | None = None,
                    embed_admission: AdmissionState | None = None) -> Telemetry:
    """Providers from the OTEL_* variables, the Prometheus endpoint, the server-state gauges.

    With OTEL_SDK_DISABLED=true the tracer and meters are no-ops and neither the exporters
    nor the Prometheus endpoint start (the request log stays)."""
    resource = _resource()
    tracers = tracing.tracer_provider(resource)
    enabled = tracing.is_enabled(tracers)
    prometheus = PrometheusEndpoint.start(settings.metrics_listen, settings.metrics_threads,
                                          settings.metrics_timeout) \
        if enabled and settings.metrics_listen else None
    meters = meter_provider(resource, prometheus) if enabled else MeterProvider(resource=resource)
    meter = meters.get_meter(tracing.TRACER_NAME, _VERSION)
    provider = tracing.provider_name(backend.name)
    observe_server_state(meter, admission, health, provider, cache, retrying, embed_admission)
    observe_engine_load(meter, backend, provider)
    observe_upstreams(meter, backend)
    engine = engine_process(backend)
    if prometheus is not None and engine is not None and hasattr(engine, "engine_pid"):
        # The engine's child holds the model: the memory alert adds its resident memory.
        prometheus.watch_process("agentloop_engine", lambda: engine.engine_pid)
    return Telemetry(
        tracers.get_tracer(tracing.TRACER_NAME, _VERSION), Instruments(meter), provider,
        backend.address, settings.trace_content, served_models=lambda: health.served,
        tracer_provider=tracers, meter_provider=meters, prometheus=prometheus,
    )


_VERSION = version("agentloop")


def _resource() -> Resource:
    """The SDK's resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) with our defaults
    for what those leave out; every process is its own service instance."""
    resource = Resource.create()
    defaults: dict[str, str] = {}
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        defaults["service.name"] = "agentloop"
    if "service.version" not in resource.attributes:
        defaults["service.version"] = _VERSION
    if "service.instance.id" not in resource.attributes:
        defaults["service.instance.id"] = str(uuid.uuid4())
    return resource.merge(Resource(defaults))
