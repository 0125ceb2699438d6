"""Conversation affinity across replicas, proven locally: three `agentloop serve` processes on
127.0.0.2, .3 and .4, each with its own fake Ollama (so every turn can be traced to the
replica that served it), called through `agentloop_client` with `session=`.

Every prompt starts with its session id, so a fake's request log says which sessions its
replica served.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_cli import action
from test_replicas import AGENTLOOP, Replica, free_port, start_replicas

from agentloop_client import SESSION_HEADER, AgentLoopClient, AsyncAgentLoopClient, Unavailable
from agentloop_client.channel import RING_HASH_HEADER_FLAG, ChannelConfig
from fake_ollama import FakeOllama, Script, wait_until
from helpers import TOKENS

ROOT = Path(__file__).resolve().parents[1]
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
# Readiness follows the backend every 0.1 s; a stopping replica drains for 0.3 s.
REPLICA_ARGS = ("--health-interval", "0.1")
# Reconnect quickly, so a replica that comes back is tried again within the test.
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
)


@asynccontextmanager
async def three_replicas() -> AsyncIterator[tuple[list[Replica], AsyncAgentLoopClient]]:
    """Three replicas on 127.0.0.2-4 and a client that hashes sessions over them."""
    port = free_port(HOSTS[0])
    async with AsyncExitStack() as stack:
        replicas = await start_replicas(stack, HOSTS, port, *REPLICA_ARGS)
        async with AsyncAgentLoopClient(target(replicas), affinity=True, timeout=10,
                                        options=FAST_RECONNECT) as client:
            yield replicas, client


def target(replicas: list[Replica]) -> str:
    return "ipv4:" + ",".join(replica.address for replica in replicas)


def served_sessions(replicas: list[Replica], since: list[int] | None = None
                    ) -> dict[str, set[int]]:
    """Session -> indexes of the replicas that served a turn of it (after `since` requests)."""
    where: dict[str, set[int]] = defaultdict(set)
    for index, replica in enumerate(replicas):
        bodies = replica.fake.generation_requests[since[index] if since else 0:]
        for body in bodies:
            if body.get("prompt"):
                where[body["prompt"].split()[0]].add(index)
    return dict(where)


def request_counts(replicas: list[Replica]) -> list[int]:
    """Where each fake's request log stands (for `served_sessions(since=...)`)."""
    return [len(replica.fake.generation_requests) for replica in replicas]


async def converse(client: AsyncAgentLoopClient, sessions: list[str], turns: int) -> None:
    """Each session's turns in order, the sessions interleaved turn by turn."""
    for turn in range(turns):
        for session in sessions:
            reply = await client.generate(f"{session} turn {turn}", session=session)
            assert reply.text == "ok"


async def readiness(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="readiness"), timeout=2)
        return reply.status


def test_the_session_key_is_a_header_and_selects_ring_hash_only_for_balanced_targets():
    hashed = ChannelConfig(address="dns:///agentloop-headless.ns.svc:50051", session="c1")
    assert hashed.hashes_sessions and (SESSION_HEADER, "c1") in hashed.metadata
    config = dict(hashed.channel_options())["grpc.service_config"]
    assert '"ring_hash_experimental": {"requestHashHeader": "x-agentloop-session"}' in config
    assert '"healthCheckConfig": {"serviceName": "readiness"}' in config
    assert os.environ[RING_HASH_HEADER_FLAG] == "true"
    # One address: the header still travels (a mesh may hash it), the channel does not hash.
    single = ChannelConfig(address="127.0.0.1:50051", session="c1")
    assert not single.hashes_sessions and (SESSION_HEADER, "c1") in single.metadata
    assert "round_robin" in dict(single.channel_options())["grpc.service_config"]
    # No session: balanced as before.
    plain = ChannelConfig(address="dns:///agentloop-headless.ns.svc:50051")
    assert not plain.hashes_sessions and not plain.metadata
    assert "round_robin" in dict(plain.channel_options())["grpc.service_config"]


async def test_a_sessions_turns_stay_on_one_replica_and_sessions_use_all_three():
    async with three_replicas() as (replicas, client):
        sessions = [f"conv{i}" for i in range(30)]
        await converse(client, sessions, turns=4)
        where = served_sessions(replicas)
        assert set(where) == set(sessions)
        assert all(len(places) == 1 for places in where.values()), where
        assert set().union(*where.values()) == {0, 1, 2}
        # Calls without a session still succeed and still spread.
        before = request_counts(replicas)
        for _ in range(30):
            assert (await client.generate("nobody")).text == "ok"
        assert all(after > b for after, b in zip(request_counts(replicas), before,
                                                 strict=True))

        # A client made for one conversation (the sync client, the CLI's --session) sends
        # every call to that conversation's replica.
        def solo_conversation() -> None:
            with AgentLoopClient(target(replicas), session="solo", timeout=10) as solo:
                assert solo.config.hashes_sessions
                for turn in range(5):
                    assert solo.generate(f"solo turn {turn}").text == "ok"

        await asyncio.to_thread(solo_conversation)
        assert len(served_sessions(replicas)["solo"]) == 1

        argv = [AGENTLOOP, "generate", "cli turn", "--address", target(replicas),
                "--session", "cli", "--timeout", "10"]
        for _ in range(3):
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0 and out.decode().strip() == "ok"
        assert len(served_sessions(replicas)["cli"]) == 1


async def test_a_replica_leaving_moves_only_its_sessions_and_no_call_fails():
    async with three_replicas() as (replicas, client):
        sessions = [f"conv{i}" for i in range(24)]
        await converse(client, sessions, turns=2)
        home = {session: next(iter(places))
                for session, places in served_sessions(replicas).items()}
        assert set(home.values()) == {0, 1, 2}

        # Conversations keep going, turn by turn, while replica 0 drains and exits.
        failures: list[Exception] = []
        turns = {session: 0 for session in sessions}
        done = asyncio.Event()

        async def keep_conversing(group: list[str]) -> None:
            while not done.is_set():
                for session in group:
                    try:
                        await client.generate(f"{session} turn", session=session)
                        turns[session] += 1
                    except Unavailable as exc:
                        failures.append(exc)

        callers = [asyncio.create_task(keep_conversing(sessions[i::4])) for i in range(4)]
        await wait_until(lambda: min(turns.values()) >= 2, timeout=20)
        assert await replicas[0].stop() == 0
        since = request_counts(replicas)
        stopped_at = dict(turns)
        await wait_until(lambda: all(turns[s] >= stopped_at[s] + 3 for s in sessions),
                         timeout=30)
        done.set()
        await asyncio.gather(*callers)
        assert failures == []

        after = served_sessions(replicas, since)
        assert set(after) == set(sessions)
        for session, places in after.items():
            assert len(places) == 1, (session, places)
            if home[session] != 0:
                assert places == {home[session]}, "a session of a replica that stayed moved"
            else:
                assert places != {0}


async def test_a_replica_that_is_not_ready_gets_no_sessions_until_it_is_ready_again():
    async with three_replicas() as (replicas, client):
        unready = replicas[0]
        sessions = [f"conv{i}" for i in range(24)]
        await converse(client, sessions, turns=1)
        assert any(places == {0} for places in served_sessions(replicas).values())

        # The backend loses its model: readiness turns NOT_SERVING, the process runs on.
        models = list(unready.fake.models)
        unready.fake.models = []
        await wait_until_status(unready.address, health_pb2.HealthCheckResponse.NOT_SERVING)
        since = request_counts(replicas)
        await converse(client, sessions + [f"new{i}" for i in range(24)], turns=2)
        after = served_sessions(replicas, since)
        assert not [s for s, places in after.items() if 0 in places], (
            "affinity overrode readiness")
        assert all(len(places) == 1 for places in after.values())

        # Ready again: the sessions that hash to it return.
        unready.fake.models = models
        await wait_until_status(unready.address, health_pb2.HealthCheckResponse.SERVING)
        since = request_counts(replicas)

        async def served_by_the_returned_replica() -> None:
            while not any(0 in p for p in served_sessions(replicas, since).values()):
                await converse(client, sessions, turns=1)

        await asyncio.wait_for(served_by_the_returned_replica(), 20)


async def wait_until_status(address: str, status: int) -> None:
    async def reached() -> None:
        while await readiness(address) != status:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(reached(), 20)


async def test_the_gateway_traces_and_logs_the_session_of_python_and_node_callers(
        gateway, fake_ollama: FakeOllama, caplog):
    """The header arrives from both clients; the request log names it, bounded."""
    node = shutil.which("node")
    assert node is not None, "node is needed for the Node example"
    # What the example asks for, in order (tests/test_clients.py runs it the same way).
    fake_ollama.capabilities[fake_ollama.models[0]] = ["completion", "tools"]
    fake_ollama.enqueue(
        Script(tokens=TOKENS), Script(tokens=TOKENS),
        Script(tokens=[], tool_calls=[{"name": "reverse_text", "arguments": {"text": "gRPC"}}]),
        Script(tokens=["Done", ":", " CPRg"]),
        action(thought="Reverse it.", tool="reverse_text", arguments={"text": "agentloop"}),
        action(thought="Got it.", final_answer="pooltnega"),
        action(tool="calculator", arguments={"expression": "17*23"}),  # the background run
        action(final_answer="391"),
    )
    with caplog.at_level(logging.INFO, logger="agentloop.requests"):
        proc = await asyncio.create_subprocess_exec(
            node, str(ROOT / "clients/node/example.js"), "--address", gateway.address,
            "--timeout", "20", "--session", "node-conv", cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode() + out.decode()
        async with AsyncAgentLoopClient(gateway.address, timeout=10) as client:
            await client.generate("hi", session="py-conv")
            await client.generate("hi", session="x" * 1000)
            await client.generate("hi")
        async with AsyncAgentLoopClient(gateway.address, timeout=10,
                                        session="whole-client") as client:
            await client.generate("hi")
            await client.generate("hi", session="one-call")  # the call's own wins

    sessions = [(r.fields["method"], r.fields.get("session")) for r in caplog.records
                if r.name == "agentloop.requests" and hasattr(r, "fields")]
    assert sessions == [
        ("ListTools", "node-conv"), ("Generate", "node-conv"),
        ("StreamGenerate", "node-conv"), ("Embed", "node-conv"),
        ("Generate", "node-conv"), ("Generate", "node-conv"),  # a function call's round trip
        ("StreamRunAgent", "node-conv"), ("StartAgentRun", "node-conv"),
        ("WatchAgentRun", "node-conv"), ("GetAgentRun", "node-conv"),
        ("CancelAgentRun", "node-conv"), ("Generate", "py-conv"), ("Generate", "x" * 128),
        ("Generate", None),
        ("Generate", "whole-client"), ("Generate", "one-call"),
    ]


# Run in a fresh process without the flag in its environment: a hashing channel made before
# the flag fails every call, and the client, which sets the flag when it makes its channel,
# works although grpc has made channels before.
FLAG_CHECK = """
import sys, grpc
from agentloop.v1 import agentloop_pb2 as pb, agentloop_pb2_grpc as pb_grpc
from agentloop_client import AgentLoopClient
from agentloop_client.channel import SESSION_HEADER, service_config
address = sys.argv[1]
options = [("grpc.service_config", service_config(1, False, hash_sessions=True))]
with grpc.insecure_channel(address, options=options) as channel:
    try:
        pb_grpc.AgentLoopServiceStub(channel).Generate(
            pb.GenerateRequest(prompt="hi"), metadata=((SESSION_HEADER, "s"),), timeout=10)
        print("without the flag: OK")
    except grpc.RpcError as error:
        print("without the flag:", error.code().name, error.details())
with AgentLoopClient(address, affinity=True, session="s", timeout=10) as client:
    print("client:", client.generate("hi").text)
"""


async def test_the_client_sets_grpcs_ring_hash_flag_which_grpc_reads_per_channel(gateway):
    env = {k: v for k, v in os.environ.items() if k != RING_HASH_HEADER_FLAG}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLAG_CHECK, gateway.address, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    without, client = out.decode().splitlines()
    assert client == "client: Hello, world!"
    assert without == "without the flag: INTERNAL hash attribute not present", (
        f"{without}: has grpcio changed how it treats {RING_HASH_HEADER_FLAG}? "
        "Update docs/clients.md and k8s/README.md")
