"""gRPC health: readiness follows the backend, liveness follows the event loop.

A background task checks the backend every `health_interval` seconds and sets
`""`, `agentloop.v1.AgentLoopService` and `readiness`; probes read the cached status
and never wait on the backend. `liveness` is SERVING as long as the loop answers.
Before the first SERVING, and again whenever the backend was not ready, the task warms
the backend up (loads the model), so readiness means "answers without a cold start".
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2

from agentloop.backends.base import Backend
from agentloop.domain import BackendHealth
from agentloop.errors import AgentLoopError

log = logging.getLogger(__name__)

SERVICE_NAME = "agentloop.v1.AgentLoopService"
READINESS = "readiness"
LIVENESS = "liveness"
READY_NAMES = ("", SERVICE_NAME, READINESS)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def known_services(names: Iterable[str]) -> str:
    """The health service names, for a person: `'' (the whole server), liveness, ...`."""
    return ", ".join(f"{name!r} (the whole server)" if not name else name
                     for name in sorted(names))


class HealthServicer(health.aio.HealthServicer):
    """grpcio's asyncio health servicer, with Watch fixed for several watchers of one name.

    grpcio's Watch drops the condition a service's watchers share as soon as any one of
    them ends: the others (other replicas' clients, a probe that reconnected) never hear
    of a change again, a drain included. Here it is dropped when the last one ends."""

    def __init__(self) -> None:
        super().__init__()
        self._watchers: collections.Counter[str] = collections.Counter()

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        """As grpcio's, but an unknown name's NOT_FOUND names the services there are."""
        status = self._server_status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no health service named {request.service!r}; this server "
                                f"has {known_services(self._server_status)}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> None:
        service = request.service
        self._watchers[service] += 1
        try:
            condition = self._server_watchers[service]
            last = None
            async with condition:
                while True:
                    status = self._server_status.get(
                        service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    # As in grpcio: a watcher gets the latest status, not every one.
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    await condition.wait()
        finally:
            self._watchers[service] -= 1
            if self._watchers[service] <= 0:
                del self._watchers[service]
                self._server_watchers.pop(service, None)


class HealthReporter:
    """Owns the health servicer's statuses and the task that refreshes readiness."""

    def __init__(self, backend: Backend, model: str, interval: float,
                 warm_up: bool = False) -> None:
        self.servicer = HealthServicer()
        self._backend = backend
        self._model = model
        self._interval = interval
        self._warm = not warm_up  # True once warmed up, or when warm-up is off
        self._warm_up = warm_up
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.last: BackendHealth = BackendHealth(False, "not checked yet")
        self._became_ready = asyncio.Event()
        #: Model names the backend last said it serves (kept while it cannot say).
        self.served: frozenset[str] = frozenset({model})

    @property
    def ready(self) -> bool:
        return self.last.ready

    async def wait_ready(self) -> None:
        """Return once readiness has been SERVING (at once if it already was)."""
        await self._became_ready.wait()

    async def start(self) -> None:
        """Set the initial statuses, run the first check, then refresh in the background."""
        await self.servicer.set(LIVENESS, SERVING)
        # The health servicer starts "" SERVING: not before the first check says so.
        await self._set_ready(self.last)
        await self._set_ready(await self._check())
        self._task = asyncio.create_task(self._refresh_forever(), name="health-refresh")

    def check_soon(self) -> None:
        """Ask for a check now (e.g. after the backend failed a request)."""
        self._wake.set()

    async def drain(self) -> None:
        """Everything NOT_SERVING for good: the server is shutting down."""
        await self.stop()
        await self.servicer.enter_graceful_shutdown()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _refresh_forever(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self._set_ready(await self._check())

    async def _check(self) -> BackendHealth:
        """Warm the backend up if it is cold (at start, after an outage), then check it."""
        if not self._warm:
            try:
                await self._backend.warm_up()
            except AgentLoopError as exc:
                return BackendHealth(False, f"warm-up failed: {exc.message}")
        result = await self._backend.check_health(self._model)
        self._warm = result.ready or not self._warm_up
        return result

    async def _set_ready(self, result: BackendHealth) -> None:
        if result.ready != self.last.ready or result.reason != self.last.reason:
            log.info("readiness %s%s", "SERVING" if result.ready else "NOT_SERVING",
                     f" ({result.reason})" if result.reason else "")
        self.last = result
        if result.ready:
            self._became_ready.set()
        if result.served:
            self.served = frozenset({self._model, *result.served})
        status = SERVING if result.ready else NOT_SERVING
        for name in READY_NAMES:
            await self.servicer.set(name, status)
