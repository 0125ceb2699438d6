"""Scale-out, proven locally: replicas on several loopback addresses behind one
round_robin channel, a replica leaving on SIGTERM, one arriving late, GOAWAY by
max_connection_age, and `--workers` sharing one port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import psutil
import pytest

from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from fake_ollama import FakeOllama, Script, wait_until

AGENTLOOP = str(Path(sys.executable).parent / "agentloop")

# What an in-cluster client uses (see the README): round_robin over every address the
# name resolves to, client-side health checking (a draining replica's NOT_SERVING takes
# it out of the rotation before it closes), and retries of UNAVAILABLE.
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": "readiness"},
    "methodConfig": [{
        "name": [{"service": "agentloop.v1.AgentLoopService"}],
        "retryPolicy": {
            "maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
})
CHANNEL_OPTIONS = [
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Replica:
    """One `agentloop serve` process with its own fake Ollama, so calls can be counted."""

    def __init__(self, host: str, port: int, fake: FakeOllama, *extra: str) -> None:
        self.address = f"{host}:{port}"
        self.fake = fake
        self.extra = extra
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            AGENTLOOP, "serve", "--listen", self.address, "--backend", "ollama",
            "--ollama-url", self.fake.url, "--drain-delay", "0.3", "--shutdown-grace", "5",
            *self.extra, stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        assert line.startswith(b"agentloop serving on"), line

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 30)

    @property
    def served(self) -> int:
        # Generations only: the warm-up's load request has neither prompt nor messages.
        return sum(1 for body in self.fake.generation_requests
                   if body.get("prompt") or body.get("messages"))


async def start_replicas(stack: AsyncExitStack, hosts: list[str], port: int, *extra: str,
                         started: bool = True) -> list[Replica]:
    replicas = []
    for host in hosts:
        fake = await stack.enter_async_context(FakeOllama())
        fake.default_script = Script(tokens=["ok"])
        replica = Replica(host, port, fake, *extra)
        stack.push_async_callback(replica.stop)
        if started:
            await replica.start()
        replicas.append(replica)
    return replicas


async def call_many(stub: pb_grpc.AgentLoopServiceStub, count: int) -> list[str]:
    replies = [await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
               for _ in range(count)]
    return [r.text for r in replies]


async def test_round_robin_spreads_and_survives_a_replica_leaving():
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = free_port(hosts[0])
    async with AsyncExitStack() as stack:
        replicas = await start_replicas(stack, hosts, port)
        target = "ipv4:" + ",".join(f"{h}:{port}" for h in hosts)
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.AgentLoopServiceStub(channel)
            assert await call_many(stub, 30) == ["ok"] * 30
            assert all(r.served >= 5 for r in replicas), [r.served for r in replicas]

            # A replica leaves while calls keep flowing: none of them fails.
            failures: list[grpc.aio.AioRpcError] = []
            done = asyncio.Event()

            async def keep_calling() -> int:
                calls = 0
                while not done.is_set():
                    try:
                        await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
                    except grpc.aio.AioRpcError as exc:
                        failures.append(exc)
                    calls += 1
                return calls

            callers = [asyncio.create_task(keep_calling()) for _ in range(4)]
            assert await replicas[0].stop() == 0
            before = [r.served for r in replicas[1:]]
            await wait_until(lambda: all(r.served > b + 5 for r, b in zip(
                replicas[1:], before, strict=True)), timeout=20)
            done.set()
            total = sum(await asyncio.gather(*callers))
            assert failures == [], [f.code() for f in failures]
            assert total > 10


async def test_a_replica_started_later_receives_calls_from_an_existing_channel():
    hosts = ["127.0.0.2", "127.0.0.3"]
    port = free_port(hosts[0])
    async with AsyncExitStack() as stack:
        early, late = await start_replicas(stack, hosts, port, started=False)
        await early.start()
        target = "ipv4:" + ",".join(f"{h}:{port}" for h in hosts)
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.AgentLoopServiceStub(channel)
            assert await call_many(stub, 5) == ["ok"] * 5
            assert late.served == 0
            await late.start()

            async def calls_reach_the_late_replica() -> None:
                while late.served == 0:
                    await call_many(stub, 1)

            await asyncio.wait_for(calls_reach_the_late_replica(), 20)


async def test_max_connection_age_reconnects_without_failing_calls():
    port = free_port()
    async with AsyncExitStack() as stack:
        (replica,) = await start_replicas(stack, ["127.0.0.1"], port,
                                          "--max-connection-age", "0.3",
                                          "--max-connection-age-grace", "5")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.AgentLoopServiceStub(channel)
            peers: set[int] = set()
            assert replica.proc is not None
            server = psutil.Process(replica.proc.pid)
            # Keep calling until the server has told the first connection to go away and
            # the channel has opened another one: no call may fail on the way.
            while len(peers) < 2:
                assert await call_many(stub, 3) == ["ok"] * 3
                peers |= {c.raddr.port for c in server.net_connections("tcp")
                          if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork")
async def test_workers_share_one_port_and_all_serve():
    port = free_port()
    async with AsyncExitStack() as stack:
        (replica,) = await start_replicas(stack, ["127.0.0.1"], port, "--workers", "2")
        assert replica.proc is not None
        parent = psutil.Process(replica.proc.pid)
        await wait_until(lambda: len(parent.children()) == 2, timeout=30)
        workers = parent.children()

        def workers_with_clients() -> int:
            return sum(
                any(c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
                    for c in w.net_connections("tcp"))
                for w in workers)

        channels = []
        try:
            # Channels with their own subchannel pools are separate connections; the kernel
            # spreads connections over the workers.
            while workers_with_clients() < 2 and len(channels) < 64:
                channel = grpc.aio.insecure_channel(
                    f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                channels.append(channel)
                reply = await pb_grpc.AgentLoopServiceStub(channel).Generate(
                    pb.GenerateRequest(prompt="hi"), timeout=10)
                assert reply.text == "ok"
            assert workers_with_clients() == 2
        finally:
            for channel in channels:
                await channel.close()
        assert await replica.stop() == 0
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
