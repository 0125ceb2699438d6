"""Assembling, running and draining the grpc.aio server.

`start_server` wires settings -> backend -> services -> servicers -> server and returns a
`RunningServer`; `RunningServer.shutdown` is the graceful drain that SIGTERM triggers:
health NOT_SERVING and new calls refused at once, a short drain delay for balancers to
notice, then `server.stop(grace)` so streams in flight can finish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentloop.backends.base import Backend
from agentloop.backends.kinds import embedded_backend
from agentloop.backends.ollama import OllamaBackend
from agentloop.config import (
    EMBEDDED_WORKERS_PROBLEM,
    MAX_MESSAGE_BYTES,
    Settings,
    SettingsError,
    parse_host_port,
)
from agentloop.health import SERVICE_NAME, HealthReporter
from agentloop.http.door import HttpDoor
from agentloop.rpc.auth import ApiKeys
from agentloop.rpc.edge import Edge
from agentloop.rpc.interceptors import (
    CallsInFlight,
    DrainInterceptor,
    ErrorInterceptor,
    UndecodableRequestGuard,
)
from agentloop.rpc.servicer import AgentLoopServicer
from agentloop.rpc.telemetry_interceptor import ServerTelemetry
from agentloop.rpc.transport import RequestBytes, SendStallGuard, server_transport_options
from agentloop.services.agent import AgentService
from agentloop.services.cache import ResponseCache
from agentloop.services.embeddings import EmbeddingService
from agentloop.services.generation import GenerationService
from agentloop.services.quotas import Quotas
from agentloop.services.runs import RunManager, open_store
from agentloop.services.tools import default_tools
from agentloop.services.webhooks import WebhookSender
from agentloop.telemetry import Telemetry, start_telemetry
from agentloop.upstreams.admission import AdmissionTotals, Work
from agentloop.upstreams.config import load_pools
from agentloop.upstreams.router import Router
from agentloop.v1 import agentloop_pb2_grpc

if TYPE_CHECKING:
    from agentloop.services.mcp_tools import McpServers

log = logging.getLogger(__name__)

#: Seconds the calls still running when the shutdown grace ends get to send their
#: SHUTTING_DOWN status before gRPC cuts them.
SHUTDOWN_CUT_MARGIN = 0.25


@dataclass
class RunningServer:
    """A started server and what it needs to shut down cleanly."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    backend: Router
    health: HealthReporter
    drain_gate: DrainInterceptor
    #: Every pool's generation slots read as one.
    admission: AdmissionTotals
    cache: ResponseCache | None = None
    telemetry: Telemetry = field(default_factory=Telemetry.disabled)
    #: The MCP tool servers, when --mcp-servers names any.
    mcp: McpServers | None = None
    #: The API keys and their tenants (reload_keys reads the file again).
    keys: ApiKeys | None = None
    #: The task that re-reads the keys file when it changes.
    keys_watch: asyncio.Task[None] | None = None
    #: Every pool's Embed slots read as one (apart from the generations').
    embed_admission: AdmissionTotals | None = None
    #: The AgentLoopService calls running (the shutdown ends the late ones).
    calls: CallsInFlight = field(default_factory=CallsInFlight)
    runs: RunManager | None = None
    #: The OpenAI-compatible HTTP door, when --http-listen is set.
    http: HttpDoor | None = None

    async def reload_keys(self) -> bool:
        """Read the keys file again (SIGHUP) on a thread, never on the event loop: new keys,
        tenants and limits at once (one reading at a time: agentloop.tenants.KeysFile)."""
        return self.keys is not None and await asyncio.to_thread(self.keys.reload)

    @property
    def address(self) -> str:
        host, _ = self.settings.listen_address
        return f"{host}:{self.port}"

    @property
    def http_address(self) -> str | None:
        """HOST:PORT of the HTTP door (its bound port); None when it is off."""
        if self.http is None:
            return None
        host, _ = parse_host_port(self.settings.http_listen)
        return f"[{host}]:{self.http.port}" if ":" in host else f"{host}:{self.http.port}"

    @property
    def metrics_port(self) -> int | None:
        """The Prometheus /metrics port (bound, so port 0 resolves); None when off."""
        return self.telemetry.metrics_port

    async def shutdown(self, grace: float | None = None, drain_delay: float | None = None) -> None:
        """Drain: refuse new calls, report NOT_SERVING, wait, then stop with a grace period."""
        grace = self.settings.shutdown_grace if grace is None else grace
        drain_delay = self.settings.drain_delay if drain_delay is None else drain_delay
        self.drain_gate.draining = True
        if self.keys_watch is not None:
            self.keys_watch.cancel()
        await self.health.drain()
        log.info("draining: NOT_SERVING, closing the listener in %.1fs", drain_delay)
        if drain_delay > 0:
            # Time for load balancers and kube-proxy to see NOT_SERVING before we close.
            await asyncio.sleep(drain_delay)
        await self._stop(grace)
        if self.runs is not None:  # runs still going stay active: a replica takes them over
            await self.runs.close()
        if self.mcp is not None:
            await self.mcp.close()
        await self.backend.close()
        await self.telemetry.shutdown()  # flush the last spans and metrics
        log.info("stopped")


    async def _stop(self, grace: float) -> None:
        """`server.stop(grace)`, but the calls still running when the grace ends are ended
        with SHUTTING_DOWN (gRPC's own cut, a moment later, carries no details)."""
        doors = [self.server.stop(grace + SHUTDOWN_CUT_MARGIN)]
        if self.http is not None:
            doors.append(self.http.stop(grace))
        stopping = asyncio.ensure_future(asyncio.gather(*doors))
        await asyncio.wait({stopping}, timeout=grace)
        if not stopping.done() and self.calls.running:
            log.info("grace over: ending %d calls still running", self.calls.running)
            await self.calls.cut(within=SHUTDOWN_CUT_MARGIN)
        await stopping


async def select_backend(settings: Settings) -> Backend:
    """The backend the settings ask for; `auto` prefers a reachable Ollama. Logs one line
    naming the engine, where it is (URL or model file) and why it was chosen."""
    if settings.backend == "ollama":
        log.info("engine ollama at %s (--backend ollama)", settings.ollama_url)
        return OllamaBackend(settings)
    why = "--backend embedded"
    if settings.backend == "auto":
        ollama = OllamaBackend(settings)
        if await ollama.is_reachable():
            log.info("engine ollama at %s (--backend auto: Ollama answers there)",
                     settings.ollama_url)
            return ollama
        await ollama.close()
        why = f"--backend auto: no Ollama answers at {settings.ollama_url}"
    if settings.workers > 1:
        raise SettingsError(f"--workers / AGENTLOOP_WORKERS: {EMBEDDED_WORKERS_PROBLEM} "
                            f"({why})")
    backend = embedded_backend(settings)
    log.info("engine embedded, model file %s (%s)", backend.model_path, why)
    return backend


async def routed_backend(settings: Settings, backend: Backend | None = None) -> Router:
    """The one path every call takes: the router over the pools file when --upstreams names
    one, else over the single engine as a pool of one (`backend`, else the settings')."""
    if backend is None and settings.upstreams:
        pools = load_pools(settings.upstreams)
        if settings.workers > 1 and any(u.kind == "embedded" for u in pools.upstreams.values()):
            raise SettingsError(
                f"--upstreams ({settings.upstreams}) has an `embedded` upstream, and --workers "
                f"{settings.workers} would start one engine per worker: use --workers 1")
        router = Router(pools, settings)
        log.info("engines: %d upstream pools from %s (--upstreams); --backend and "
                 "--ollama-url are not used", len(router.pools), settings.upstreams)
        return router
    return Router.for_engine(backend or await select_backend(settings), settings)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    options = []
    if settings.max_connection_age > 0:
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)))
        # Unset, gRPC's grace is unlimited: the connection takes no new calls after GOAWAY
        # and closes when its last call ends, so connection age never cuts a call.
        if settings.max_connection_age_grace > 0:
            options.append(("grpc.max_connection_age_grace_ms",
                            int(settings.max_connection_age_grace * 1000)))
    return [
        *options,
        # The ping policy clients must keep (agentloop_client's keepalive is within it):
        # pings at most every min_ping_interval, also while no call or no data is under
        # way (a long silent generation), instead of gRPC's default of one per 5 minutes,
        # whose breach ends the connection with too_many_pings.
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.min_ping_interval * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        *server_transport_options(settings),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Several workers share the port on purpose; one worker must not share it by accident.
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
    ]


def with_engine_defaults(settings: Settings, backend: Backend) -> Settings:
    """Settings whose engine-dependent defaults (0 = the engine's) are filled in."""
    if settings.max_tokens:
        return settings
    return dataclasses.replace(settings, max_tokens=min(backend.default_max_tokens,
                                                        settings.max_tokens_cap))


def add_services(server: grpc.aio.Server, servicer: AgentLoopServicer,
                 health: HealthReporter, settings: Settings) -> None:
    agentloop_pb2_grpc.add_AgentLoopServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )


def add_port(server: grpc.aio.Server, settings: Settings) -> int:
    """Listen in plaintext, or with TLS (mutual TLS when tls_client_ca is set)."""
    if not settings.tls_cert:
        return server.add_insecure_port(settings.listen)

    def read(path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    credentials = grpc.ssl_server_credentials(
        [(read(settings.tls_key), read(settings.tls_cert))],
        root_certificates=read(settings.tls_client_ca) if settings.tls_client_ca else None,
        require_client_auth=bool(settings.tls_client_ca),
    )
    return server.add_secure_port(settings.listen, credentials)


async def start_server(settings: Settings, backend: Backend | None = None) -> RunningServer:
    """Build and start everything; the caller owns the returned server's shutdown."""
    keys = ApiKeys.from_settings(settings)
    mcp = None
    if settings.mcp_servers:  # the MCP SDK loads only when there are servers
        from agentloop.services.mcp_tools import McpServers

        mcp = McpServers.from_file(settings.mcp_servers)  # a bad file stops the start here
    backend = await routed_backend(settings, backend)
    settings = with_engine_defaults(settings, backend)
    backend.tenants = keys.tenant
    await backend.start()
    quotas = Quotas(tenants=keys.tenant)
    admission, embed_admission = backend.admission(Work.GENERATE), backend.admission(Work.EMBED)
    cache = ResponseCache(settings.cache_entries, settings.cache_ttl) \
        if settings.cache_entries else None
    health = HealthReporter(backend, backend.default_model, settings.health_interval,
                            warm_up=settings.warm_up)
    backend.on_health_change = health.check_soon
    telemetry = start_telemetry(settings, backend, admission, health, cache, backend,
                                embed_admission)
    backend.observer = quotas.observer = telemetry
    generation = GenerationService(backend, quotas, cache, telemetry)
    drain_gate = DrainInterceptor()
    edge = Edge.from_settings(settings, keys, RequestBytes(settings.max_request_bytes_in_flight))
    calls = CallsInFlight()
    server = grpc.aio.server(
        # The calls in flight outermost (the shutdown ends the late ones), then the
        # send-stall guard: it writes the stream the others produce.
        # Telemetry next: its span and status cover what the others refuse or raise.
        # The edge (keys, refusals, rate, request bytes, tenant) before any other work: a
        # refused call's bytes are never read; undecodable bytes are refused inside it.
        interceptors=[calls, SendStallGuard(settings.send_stall_timeout),
                      ServerTelemetry(telemetry.tracer, telemetry.instruments.rpc_duration),
                      drain_gate, edge, UndecodableRequestGuard(), ErrorInterceptor()],
        options=server_options(settings),
    )
    tools = default_tools()
    if mcp is not None:
        tools.add_provider(mcp)
    agent = AgentService(generation, tools, settings)
    embeddings = EmbeddingService(backend, quotas, telemetry)
    store = open_store(settings)
    runs = RunManager(agent, store, settings, webhooks=WebhookSender(store, settings))
    await runs.start()
    add_services(server, AgentLoopServicer(settings, generation, agent, embeddings, runs),
                 health, settings)
    port = add_port(server, settings)
    await server.start()
    http = None
    if settings.http_listen:
        http = HttpDoor(settings, edge, generation, embeddings, telemetry,
                        lambda: drain_gate.draining, agent=agent, runs=runs)
        try:
            await http.start()
        except BaseException:  # the port is taken, say: nothing stays up half-started
            await server.stop(None)
            await backend.close()
            raise
    await health.start()
    if mcp is not None:
        mcp.start()  # connects in the background: a server that is down delays nothing
    watch = asyncio.create_task(watch_keys(keys, settings.api_keys_reload_interval),
                                name="keys-watch") \
        if settings.api_keys_file and settings.api_keys_reload_interval > 0 else None
    running = RunningServer(settings, server, port, backend, health, drain_gate, admission, cache,
                            telemetry, mcp, keys, watch, embed_admission, calls, runs, http)
    log.info("listening for %s on %s with the %s backend, model %s; readiness %s",
             SERVICE_NAME, running.address, backend.name, backend.default_model,
             "SERVING" if health.ready else f"NOT_SERVING ({health.last.reason})")
    if running.http_address is not None:
        log.info("the OpenAI-compatible HTTP API on %s://%s/v1",
                 "https" if settings.tls_cert else "http", running.http_address)
    return running


async def watch_keys(keys: ApiKeys, interval: float) -> None:
    """Re-read the keys file whenever its time, size or inode changed (one stat per
    interval: a Kubernetes Secret volume update is seen without a signal)."""
    while True:
        await asyncio.sleep(interval)
        if keys.changed():
            await asyncio.to_thread(keys.reload)  # a file read: off the event loop


async def serve(settings: Settings, backend: Backend | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain (on `backend`, else the settings' engine);
    SIGHUP re-reads the keys file."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers first: a signal during the start (a slow warm-up) drains instead of killing.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running: RunningServer | None = None
    reloads: set[asyncio.Task[bool]] = set()

    def reload_keys() -> None:
        if running is not None:
            reload = asyncio.create_task(running.reload_keys(), name="keys-reload")
            reloads.add(reload)  # the loop keeps only a weak reference
            reload.add_done_callback(reloads.discard)

    # From the start too: SIGHUP's default action would end the process.
    loop.add_signal_handler(signal.SIGHUP, reload_keys)
    running = await start_server(settings, backend)
    # The banner invites calls, so it waits for readiness (a warm-up, a model to pull).
    stopped = asyncio.create_task(stop.wait())
    ready = asyncio.create_task(running.health.wait_ready())
    await asyncio.wait((stopped, ready), return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if not stop.is_set():
        print(ready_banner(running), flush=True)
    await stopped
    log.info("signal received, shutting down")
    await running.shutdown()


def ready_banner(running: RunningServer) -> str:
    banner = (
        f"agentloop serving on {running.address} (backend {running.backend.name}, "
        f"model {running.backend.default_model})\n"
        f"  try: {runnable('grpcurl')} -plaintext -d '{{\"prompt\":\"The capital of France "
        f"is\",\"options\":{{\"max_tokens\":16}}}}' {running.address} "
        f"{SERVICE_NAME}/StreamGenerate"
    )
    if running.http_address is not None:
        scheme = "https" if running.settings.tls_cert else "http"
        banner += f"\n  OpenAI-compatible API: {scheme}://{running.http_address}/v1"
    return banner


def runnable(command: str) -> str:
    """A command of this server's environment as a shell runs it: its name when PATH finds
    one, else its full path (`make run` serves from a venv the newcomer's shell has not
    activated)."""
    installed = Path(sys.executable).parent / command
    if installed.exists() and not shutil.which(command):
        return shlex.quote(str(installed))
    return command
