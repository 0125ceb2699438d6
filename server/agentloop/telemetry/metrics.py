"""Metrics: the OpenTelemetry instruments, and where they are read (Prometheus, OTLP).

Every instrument is recorded once per RPC or per backend call, never per token. Gauges of
state (admission, readiness, model memory) are observable: their callbacks read values
the server keeps anyway (`Admission` counters, the health task's last result), so a
scrape never waits on the backend.

Readers: a Prometheus endpoint (`metrics_listen`, served by prometheus_client's HTTP
server in its own thread, from a registry of this server's own) and, when an OTLP
endpoint is set, a periodic OTLP export (OTEL_METRIC_EXPORT_INTERVAL, default 60 s).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.environment_variables import OTEL_METRICS_EXEMPLAR_FILTER
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from agentloop.config import Settings, parse_host_port
from agentloop.domain import BackendHealth
from agentloop.telemetry import otlp
from agentloop.telemetry.tracing import UPSTREAM

log = logging.getLogger(__name__)

MEMORY_TYPE = "agentloop.memory.type"
CACHE_RESULT = "agentloop.cache.result"
CACHE_RESULTS = ("hits", "misses", "coalesced")
#: The operator's tenant name (callers without one: tenants.DEFAULT_TENANT_LABEL).
TENANT = "agentloop.tenant"
PRIORITY = "agentloop.priority"
#: The way a call came in: "grpc" (AgentLoopService) or "http" (the OpenAI-compatible door).
DOOR = "agentloop.door"
REFUSAL_REASON = "agentloop.refusal.reason"

# Bucket boundaries the GenAI semantic conventions advise.
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                  16777216, 67108864)
_TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                                0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TIME_PER_OUTPUT_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                                  0.75, 1.0, 2.5)
_QUEUE_WAIT_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                       10.0, 30.0)
_RPC_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                         60.0, 120.0, 300.0)


class AdmissionState(Protocol):
    """What the gauges read of admission control (an `Admission` is one)."""

    @property
    def in_flight(self) -> int: ...

    @property
    def queued(self) -> int: ...

    @property
    def max_in_flight(self) -> int: ...

    @property
    def max_queue(self) -> int: ...


class HealthState(Protocol):
    """What the gauges read of the health task (a `HealthReporter` is one)."""

    @property
    def ready(self) -> bool: ...

    @property
    def last(self) -> BackendHealth: ...


class CacheCounts(Protocol):
    """The response cache's counters (a `ResponseCache` is one)."""

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...

    @property
    def coalesced(self) -> int: ...


class RetryCounts(Protocol):
    """The backend's retry counter and circuit breakers (the router is one)."""

    @property
    def retries(self) -> int: ...

    @property
    def circuit_open(self) -> bool: ...


class Instruments:
    """The synchronous instruments the request path records into."""

    def __init__(self, meter: Meter) -> None:
        self.rpc_duration = meter.create_histogram(
            "rpc.server.call.duration", unit="s",
            description="Duration of AgentLoopService RPCs, by method and status code "
                        "(its count is the number of RPCs).",
            explicit_bucket_boundaries_advisory=_RPC_DURATION_BUCKETS)
        self.http_duration = meter.create_histogram(
            "http.server.request.duration", unit="s",
            description="Duration of the HTTP door's requests (agentloop.door http), by "
                        "http.route and http.response.status_code (its count is the "
                        "requests).",
            explicit_bucket_boundaries_advisory=_RPC_DURATION_BUCKETS)
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens per backend call, by gen_ai.token.type (input, output).",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS)
        self.operation_duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="Duration of backend calls (error.type set on failure).",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS)
        self.time_to_first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time from the request to its first token, as the gateway sees it "
                        "(queueing included), for successful generations.",
            explicit_bucket_boundaries_advisory=_TIME_TO_FIRST_TOKEN_BUCKETS)
        self.tool_duration = meter.create_histogram(
            "agentloop.tool.call.duration", unit="s",
            description="Duration of agent tool calls, by gen_ai.tool.name (client tools: "
                        "\"client\") and error.type on failure (its count is the calls).",
            explicit_bucket_boundaries_advisory=_RPC_DURATION_BUCKETS)
        self.queue_wait = meter.create_histogram(
            "agentloop.admission.queue.wait", unit="s",
            description="Time a generation waited for an admission slot (0 when one was "
                        "free), by agentloop.tenant and agentloop.priority.",
            explicit_bucket_boundaries_advisory=_QUEUE_WAIT_BUCKETS)
        self.refusals = meter.create_counter(
            "agentloop.admission.refusals", unit="{request}",
            description="Generations admission refused, by agentloop.tenant and "
                        "agentloop.refusal.reason (queue_full, queue_timeout, deadline, shed, "
                        "max_concurrency, requests_per_minute, tokens_per_minute).")
        self.runs_ended = meter.create_counter(
            "agentloop.runs.ended", unit="{run}",
            description="Background agent runs that ended here, by agentloop.run.status "
                        "(completed, failed, cancelled, expired).")
        self.webhook_attempts = meter.create_counter(
            "agentloop.webhook.attempts", unit="{attempt}",
            description="Webhook delivery attempts, by agentloop.webhook.outcome (delivered, "
                        "retry, failed: retries ran out, disabled: 410).")
        self.run_store_duration = meter.create_histogram(
            "agentloop.run_store.operation.duration", unit="s",
            description="Duration of run store operations, by agentloop.run_store.operation "
                        "(append_events is one batch of a run's events).",
            explicit_bucket_boundaries_advisory=_QUEUE_WAIT_BUCKETS)
        self.time_per_output_token = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Time per output token after the first, for successful generations.",
            explicit_bucket_boundaries_advisory=_TIME_PER_OUTPUT_TOKEN_BUCKETS)


RUN_STATUS = "agentloop.run.status"
WEBHOOK_OUTCOME = "agentloop.webhook.outcome"
RUN_STORE_OPERATION = "agentloop.run_store.operation"


class RunsState(Protocol):
    """What the run manager counts anyway."""

    def active_by_status(self) -> dict[str, int]: ...


def observe_runs(meter: Meter, runs: RunsState) -> None:
    """Background runs on this replica by status (queued is the queue's depth)."""

    def active(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, {RUN_STATUS: status})
                for status, count in runs.active_by_status().items()]

    meter.create_observable_gauge(
        "agentloop.runs.active", [active], unit="{run}",
        description="Background runs on this replica by agentloop.run.status (queued, "
                    "running, waiting_for_tool).")


def observe_server_state(meter: Meter, admission: AdmissionState, health: HealthState,
                         provider: str, cache: CacheCounts | None = None,
                         retrying: RetryCounts | None = None,
                         embed_admission: AdmissionState | None = None) -> None:
    """Observable gauges and counters over state the server keeps anyway: nothing here
    does I/O."""
    backend = {"gen_ai.provider.name": provider}

    def in_flight(_options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(admission.in_flight)

    def queued(_options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(admission.queued)

    def in_flight_limit(_options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(admission.max_in_flight)

    def queue_limit(_options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(admission.max_queue)

    def ready(_options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(1 if health.ready else 0, backend)

    def model_memory(_options: CallbackOptions) -> Iterable[Observation]:
        for model in health.last.loaded:
            model_attributes = {**backend, "gen_ai.request.model": model.name}
            yield Observation(model.size_bytes, {**model_attributes, MEMORY_TYPE: "total"})
            yield Observation(model.size_vram_bytes, {**model_attributes, MEMORY_TYPE: "vram"})

    def retries(_options: CallbackOptions) -> Iterable[Observation]:
        if retrying is not None:
            yield Observation(retrying.retries, backend)

    def circuit_open(_options: CallbackOptions) -> Iterable[Observation]:
        if retrying is not None:
            yield Observation(1 if retrying.circuit_open else 0, backend)

    def cache_lookups(_options: CallbackOptions) -> Iterable[Observation]:
        if cache is not None:
            for result in CACHE_RESULTS:
                yield Observation(getattr(cache, result), {CACHE_RESULT: result})

    meter.create_observable_counter(
        "agentloop.backend.retries", [retries], unit="{retry}",
        description="Backend calls sent again after an early failure (attempts beyond the "
                    "first).")
    meter.create_observable_counter(
        "agentloop.cache.lookups", [cache_lookups], unit="{request}",
        description="Deterministic generations by how the response cache served them: hits "
                    "(a stored answer), misses (generated) and coalesced (joined an identical "
                    "generation in flight).")
    meter.create_observable_gauge(
        "agentloop.requests.in_flight", [in_flight], unit="{request}",
        description="Generations holding a slot of their pool (every pool's together).")
    meter.create_observable_gauge(
        "agentloop.requests.queued", [queued], unit="{request}",
        description="Generations waiting for a slot, in every pool's queue.")
    # The limits beside the gauges, so a rule or a panel reads "near the cap" without
    # knowing this replica's settings.
    meter.create_observable_gauge(
        "agentloop.requests.in_flight.limit", [in_flight_limit], unit="{request}",
        description="Generations that may hold a slot at once: the available endpoints' "
                    "slots of every pool.")
    meter.create_observable_gauge(
        "agentloop.requests.queued.limit", [queue_limit], unit="{request}",
        description="Calls that may wait in all the replica's queues together (max_queue); "
                    "beyond it RESOURCE_EXHAUSTED.")
    meter.create_observable_gauge(
        "agentloop.backend.circuit.open", [circuit_open],
        description="1 while the circuit breaker fails calls fast (open or half-open), "
                    "else 0.")
    if embed_admission is not None:
        embedding = embed_admission

        def embeds_in_flight(_options: CallbackOptions) -> Iterable[Observation]:
            yield Observation(embedding.in_flight)

        def embeds_queued(_options: CallbackOptions) -> Iterable[Observation]:
            yield Observation(embedding.queued)

        meter.create_observable_gauge(
            "agentloop.embeddings.in_flight", [embeds_in_flight], unit="{request}",
            description="Embed batches holding an admission slot (slots of their own).")
        meter.create_observable_gauge(
            "agentloop.embeddings.queued", [embeds_queued], unit="{request}",
            description="Embed batches waiting for one.")
    meter.create_observable_gauge(
        "agentloop.backend.ready", [ready],
        description="1 while the backend answers and has the model (readiness), else 0.")
    meter.create_observable_gauge(
        "agentloop.backend.model.memory", [model_memory], unit="By",
        description="Memory of each loaded model (total and on the GPU), from the last "
                    "health check (Ollama's /api/ps).")


# The embedded engine's load gauges: (instrument, EngineStats field, unit, description).
_ENGINE_GAUGES = (
    ("agentloop.engine.sequences.running", "running", "{sequence}",
     "Sequences the engine is decoding."),
    ("agentloop.engine.requests.waiting", "waiting", "{request}",
     "Requests handed to the engine that wait for a slot."),
    ("agentloop.engine.slots.usage", "slots_in_use", "{slot}",
     "Engine slots holding a sequence."),
    ("agentloop.engine.slots.limit", "slots", "{slot}",
     "Engine slots (sequences decoded together)."),
    ("agentloop.engine.cache.usage", "cache_tokens", "{token}",
     "Tokens held in the engine's KV cache."),
    ("agentloop.engine.cache.limit", "cache_capacity", "{token}",
     "Tokens the engine's KV cache holds at most."),
)


def engine_process(backend: object) -> Any | None:
    """The engine that runs a process of its own and reports its load (the embedded
    engine) behind the router (the single engine, or the embedded upstream of a pools
    file), or None."""
    pools: Any = getattr(backend, "pools", None)
    if isinstance(pools, dict):
        for pool in pools.values():
            for endpoint in pool.endpoints:
                if hasattr(endpoint.backend, "engine_stats"):
                    return endpoint.backend
    return backend if hasattr(backend, "engine_stats") else None


def observe_engine_load(meter: Meter, backend: object, provider: str) -> None:
    """Load gauges of an engine that reports them (the embedded engine's `engine_stats`,
    refreshed by its heartbeat): what an autoscaler or a load-aware balancer reads. The
    callbacks read the last report; nothing asks the engine during a scrape."""
    source: Any = engine_process(backend)
    if source is None:
        return
    attributes = {"gen_ai.provider.name": provider}

    def reader(field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            stats = source.engine_stats
            if stats is not None:
                yield Observation(getattr(stats, field), attributes)
        return observe

    for name, field, unit, description in _ENGINE_GAUGES:
        meter.create_observable_gauge(name, [reader(field)], unit=unit,
                                      description=description)

    def restarts(_options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(source.restarts, attributes)

    if hasattr(source, "restarts"):
        meter.create_observable_counter(
            "agentloop.engine.restarts", [restarts], unit="{restart}",
            description="Times the engine's process was started again after it died or hung.")


def observe_upstreams(meter: Meter, backend: object) -> None:
    """Per upstream pool (the router's `pools`, when there is a pools file): calls in flight
    and queued, endpoints available, calls that spilled to the next pool, prompt tokens and
    those served from the engines' caches, and the cache-aware picks (upstreams/
    prefix_index.py). Labels are the operator's upstream names."""
    pools: Any = getattr(backend, "pools", None)
    if not isinstance(pools, dict):
        return

    def reader(value: Callable[[Any], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            for name, pool in pools.items():
                yield Observation(value(pool), {UPSTREAM: name})
        return observe

    meter.create_observable_gauge(
        "agentloop.upstream.requests.in_flight", [reader(lambda p: p.in_flight)],
        unit="{request}", description="Calls an upstream pool's endpoints are serving.")
    meter.create_observable_gauge(
        "agentloop.upstream.requests.queued", [reader(lambda p: p.queued)],
        unit="{request}", description="Calls waiting for an endpoint of an upstream pool.")
    meter.create_observable_gauge(
        "agentloop.upstream.endpoints.available",
        [reader(lambda p: sum(e.available for e in p.endpoints))], unit="{endpoint}",
        description="Endpoints of an upstream pool that are healthy with a closed circuit.")
    meter.create_observable_counter(
        "agentloop.upstream.overflows", [reader(lambda p: p.overflowed)], unit="{request}",
        description="Calls that spilled from an upstream pool to the next pool of their route "
                    "(its queue past the overflow limits).")
    meter.create_observable_counter(
        "agentloop.upstream.prompt_tokens", [reader(lambda p: p.prefixes.prompt_tokens)],
        unit="{token}", description="Prompt tokens of the generations an upstream pool's "
                                    "endpoints served.")
    meter.create_observable_counter(
        "agentloop.upstream.prompt_tokens.cached",
        [reader(lambda p: p.prefixes.cached_tokens)], unit="{token}",
        description="Of those, the tokens the engines said they served from their prefix "
                    "caches (engines that say: vLLM, SGLang, llama.cpp's servers).")
    meter.create_observable_counter(
        "agentloop.upstream.picks.cache", [reader(lambda p: p.prefixes.for_cache)],
        unit="{request}", description="Picks that sent a call to the endpoint expected to "
                                      "hold the longest prefix of its prompt.")
    meter.create_observable_counter(
        "agentloop.upstream.picks.load", [reader(lambda p: p.prefixes.for_load)],
        unit="{request}", description="Picks where the load bound overrode an endpoint "
                                      "holding more of the prompt's prefix.")


class PrometheusEndpoint:
    """`GET /metrics` on its own thread, serving this server's metrics only."""

    def __init__(self, server: WSGIServer, thread: threading.Thread,
                 registry: CollectorRegistry) -> None:
        self._server = server
        self._thread = thread
        self._registry = registry
        self.reader = PrometheusMetricReader(registry=registry)

    def watch_process(self, namespace: str, pid: Callable[[], int | None]) -> None:
        """`{namespace}_process_*` (resident memory, CPU) of another process, read from /proc
        by each scrape on the endpoint's thread; nothing while `pid` is None."""
        ProcessCollector(namespace=namespace, pid=lambda: pid() or "none",
                         registry=self._registry)

    @classmethod
    def start(cls, listen: str, threads: int = 4,
              timeout: float = 5.0) -> PrometheusEndpoint | None:
        """Bind `listen`; None (and a warning) when the port is taken: metrics must not stop
        the server. At most `threads` connections are served at once (one thread each; one
        more is closed at once) and each gets `timeout` seconds per read and write."""
        host, port = parse_host_port(listen)
        registry = CollectorRegistry(auto_describe=True)
        # process_resident_memory_bytes and friends (Linux /proc): what the memory alert
        # compares with the container's limit.
        ProcessCollector(registry=registry)
        try:
            server, thread = _start_metrics_server(host, port, registry, threads, timeout)
        except OSError as exc:
            log.warning("no Prometheus endpoint: cannot listen on %s (%s)", listen, exc)
            return None
        endpoint = cls(server, thread, registry)
        log.info("Prometheus metrics on http://%s/metrics",
                 f"[{host}]:{endpoint.port}" if ":" in host else f"{host}:{endpoint.port}")
        return endpoint

    @property
    def port(self) -> int:
        return self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _BoundedWSGIServer(ThreadingWSGIServer):
    """prometheus_client's threaded server with a cap on threads: a connection past
    `max_threads` is closed at once (a scraper retries), so held connections cannot pile
    up threads."""

    daemon_threads = True
    max_threads = 4

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.max_threads)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A read or write timed out, or the peer went away: its own business.
        log.debug("a /metrics connection from %s failed", client_address, exc_info=True)


class _QuietHandler(WSGIRequestHandler):
    """No access log; `timeout` seconds per socket read and write (set per server)."""

    timeout: float | None = 5.0

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _start_metrics_server(host: str, port: int, registry: CollectorRegistry, threads: int,
                          timeout: float) -> tuple[WSGIServer, threading.Thread]:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (_BoundedWSGIServer,),
                        {"address_family": family, "max_threads": threads})
    handler_class = type("MetricsHandler", (_QuietHandler,), {"timeout": timeout})
    server = make_server(host, port, make_wsgi_app(registry), server_class,
                         handler_class=handler_class)
    thread = threading.Thread(target=server.serve_forever, name="agentloop-metrics",
                              daemon=True)
    thread.start()
    return server, thread


def for_worker(settings: Settings, worker: int) -> Settings:
    """Worker N of `--workers` serves /metrics on the configured port + N (0 stays 0)."""
    if not settings.metrics_listen or worker == 0:
        return settings
    host, port = parse_host_port(settings.metrics_listen)
    if port == 0:
        return settings
    return dataclasses.replace(settings, metrics_listen=f"[{host}]:{port + worker}"
                               if ":" in host else f"{host}:{port + worker}")


def meter_provider(resource: Resource, prometheus: PrometheusEndpoint | None) -> MeterProvider:
    """A provider read by Prometheus (if listening) and by OTLP (if an endpoint is set)."""
    readers: list[MetricReader] = []
    if prometheus is not None:
        readers.append(prometheus.reader)
    if otlp.configured("metrics"):
        readers.append(PeriodicExportingMetricReader(otlp.metric_exporter()))
    # Exemplars cost every recording a look at the current span; the Prometheus text format
    # drops them anyway. OTEL_METRICS_EXEMPLAR_FILTER turns them back on.
    exemplars = None if os.environ.get(OTEL_METRICS_EXEMPLAR_FILTER) \
        else AlwaysOffExemplarFilter()
    return MeterProvider(resource=resource, metric_readers=readers, exemplar_filter=exemplars)
