"""Assembling, running and draining the grpc.aio server.

`start_server` wires settings -> backend -> services -> servicers -> server and returns a
`RunningServer`; `RunningServer.shutdown` is the graceful drain that SIGTERM triggers:
health NOT_SERVING and new calls refused at once, a short drain delay for balancers to
notice, then `server.stop(grace)` so streams in flight can finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentloop.admission import Admission
from agentloop.backends.base import Backend
from agentloop.backends.ollama import OllamaBackend
from agentloop.config import Settings, SettingsError
from agentloop.health import SERVICE_NAME, HealthReporter
from agentloop.rpc.interceptors import DrainInterceptor, ErrorInterceptor
from agentloop.rpc.servicer import AgentLoopServicer
from agentloop.services.generation import GenerationService
from agentloop.v1 import agentloop_pb2, agentloop_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 32 * 1024 * 1024


@dataclass
class RunningServer:
    """A started server and what it needs to shut down cleanly."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    backend: Backend
    health: HealthReporter
    drain_gate: DrainInterceptor
    admission: Admission

    @property
    def address(self) -> str:
        host, _ = self.settings.listen_address
        return f"{host}:{self.port}"

    async def shutdown(self, grace: float | None = None, drain_delay: float | None = None) -> None:
        """Drain: refuse new calls, report NOT_SERVING, wait, then stop with a grace period."""
        grace = self.settings.shutdown_grace if grace is None else grace
        drain_delay = self.settings.drain_delay if drain_delay is None else drain_delay
        self.drain_gate.draining = True
        await self.health.drain()
        log.info("draining: NOT_SERVING, closing the listener in %.1fs", drain_delay)
        if drain_delay > 0:
            # Time for load balancers and kube-proxy to see NOT_SERVING before we close.
            await asyncio.sleep(drain_delay)
        await self.server.stop(grace)
        await self.backend.close()
        log.info("stopped")


async def select_backend(settings: Settings) -> Backend:
    """The backend the settings ask for; `auto` prefers a reachable Ollama."""
    if settings.backend == "ollama":
        return OllamaBackend(settings)
    if settings.backend == "auto":
        ollama = OllamaBackend(settings)
        if await ollama.is_reachable():
            log.info("backend auto: Ollama answers at the configured URL, using it")
            return ollama
        await ollama.close()
        log.info("backend auto: no Ollama answers at the configured URL, using the embedded engine")
    return embedded_backend(settings)


def embedded_backend(settings: Settings) -> Backend:
    try:
        from agentloop.backends.embedded import EmbeddedBackend
    except ImportError as exc:
        raise SettingsError(
            "the embedded engine needs the 'embedded' extra: pip install 'agentloop[embedded]' "
            f"({exc})"
        ) from None
    return EmbeddedBackend(settings)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    options = []
    if settings.max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace * 1000)),
        ]
    return [
        *options,
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Several workers share the port on purpose; one worker must not share it by accident.
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
    ]


def add_services(server: grpc.aio.Server, servicer: AgentLoopServicer,
                 health: HealthReporter, settings: Settings) -> None:
    agentloop_pb2_grpc.add_AgentLoopServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (
                agentloop_pb2.DESCRIPTOR.services_by_name["AgentLoopService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )


async def start_server(settings: Settings, backend: Backend | None = None) -> RunningServer:
    """Build and start everything; the caller owns the returned server's shutdown."""
    backend = backend or await select_backend(settings)
    await backend.start()
    admission = Admission(
        settings.max_in_flight or backend.parallelism, settings.max_queue, settings.queue_timeout
    )
    generation = GenerationService(backend, admission)
    health = HealthReporter(backend, backend.default_model, settings.health_interval)
    drain_gate = DrainInterceptor()
    server = grpc.aio.server(
        interceptors=[drain_gate, ErrorInterceptor()], options=server_options(settings)
    )
    add_services(server, AgentLoopServicer(settings, generation), health, settings)
    port = server.add_insecure_port(settings.listen)
    await server.start()
    await health.start()
    running = RunningServer(settings, server, port, backend, health, drain_gate, admission)
    log.info("serving %s on %s with the %s backend, model %s",
             SERVICE_NAME, running.address, backend.name, backend.default_model)
    return running


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    running = await start_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(ready_banner(running), flush=True)
    await stop.wait()
    log.info("signal received, shutting down")
    await running.shutdown()


def ready_banner(running: RunningServer) -> str:
    return (
        f"agentloop serving on {running.address} (backend {running.backend.name}, "
        f"model {running.backend.default_model})\n"
        f"  try: grpcurl -plaintext -d '{{\"prompt\":\"The capital of France is\","
        f"\"options\":{{\"max_tokens\":16}}}}' {running.address} "
        f"agentloop.v1.AgentLoopService/StreamGenerate"
    )
