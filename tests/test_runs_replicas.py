"""Runs shared by replicas on a real PostgreSQL: a run started on one replica is watched,
listed and cancelled through another; a replica killed with SIGKILL mid-run has its run taken
over through the lease and finished after its last recorded step, every step recorded once.
And on either store: a tool call whose result was not recorded runs again only when its tool
is declared idempotent; otherwise the run fails saying so."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from postgres_server import fresh_database
from run_takeover import OUTPUT_TOKENS, PROMPT_TOKENS, TOOL, takeover

from agentloop.domain import CallContext, RequestedOptions
from agentloop.runs.store import EventRecord, RunRecord, RunStatus, SqliteRunStore
from agentloop.services.agent import (
    AgentRun,
    AgentService,
    StepStarted,
    ThoughtFormed,
    ToolCalled,
)
from agentloop.services.generation import resolve_options
from agentloop.services.runs import RunEnded, RunManager, encode_event, encode_request
from agentloop.services.tools import ToolRegistry
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import FakeOllama, Script, wait_until
from helpers import client_stub, gateway_settings, read_to_end, running_gateway

AGENTLOOP = str(Path(sys.executable).parent / "agentloop")
CALCULATE = Script(tokens=[json.dumps({"tool": "calculator",
                                       "arguments": {"expression": "17*23"}})])
ANSWER = Script(tokens=[json.dumps({"final_answer": "391"})])
FINAL = {pb.AGENT_RUN_STATUS_COMPLETED, pb.AGENT_RUN_STATUS_FAILED,
         pb.AGENT_RUN_STATUS_CANCELLED, pb.AGENT_RUN_STATUS_EXPIRED}


async def status_of(stub, run_id: str) -> pb.AgentRun:
    return (await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=run_id), timeout=5)).run


async def until_status(stub, run_id: str, wanted: set[int], timeout: float = 20) -> pb.AgentRun:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (run := await status_of(stub, run_id)).status not in wanted:
        assert loop.time() < end, f"{run_id} stayed {pb.AgentRunStatus.Name(run.status)}"
        await asyncio.sleep(0.05)
    return run


def start_request() -> pb.StartAgentRunRequest:
    return pb.StartAgentRunRequest(run=pb.StartAgentRun(goal="17*23?", max_steps=4))


async def test_a_run_on_one_replica_is_watched_listed_and_cancelled_through_another(
        fake_ollama, pg_server):
    url = await fresh_database(pg_server)
    settings = gateway_settings(ollama_url=fake_ollama.url, run_store=url, run_lease=0.6,
                                run_watch_poll_interval=0.05)
    fake_ollama.enqueue(CALCULATE, Script(hang_before_headers=True))
    async with running_gateway(settings) as a, running_gateway(settings) as b, \
            client_stub(a.address) as on_a, client_stub(b.address) as on_b:
        run_id = (await on_a.StartAgentRun(start_request(), timeout=5)).run.id
        await wait_until(lambda: len(fake_ollama.generation_requests) == 2, timeout=10)
        listed = await on_b.ListAgentRuns(pb.ListAgentRunsRequest(), timeout=5)
        assert [r.id for r in listed.runs] == [run_id]
        assert listed.runs[0].status == pb.AGENT_RUN_STATUS_RUNNING
        watching = on_b.WatchAgentRun(pb.WatchAgentRunRequest(run_id=run_id), timeout=20)
        first = await watching.read()
        assert first.sequence == 1 and first.WhichOneof("event") == "step_started"
        cancelled = (await on_b.CancelAgentRun(pb.CancelAgentRunRequest(run_id=run_id),
                                               timeout=5)).run
        assert cancelled.cancel_requested or cancelled.status == pb.AGENT_RUN_STATUS_CANCELLED
        rest = await read_to_end(watching)
        assert rest[-1].run_ended.status == pb.AGENT_RUN_STATUS_CANCELLED
        assert [e.sequence for e in [first, *rest]] == list(range(1, len(rest) + 2))
        assert {"tool_call", "tool_result"} <= {e.WhichOneof("event") for e in rest}
        run = await status_of(on_a, run_id)
        assert run.status == pb.AGENT_RUN_STATUS_CANCELLED and not run.cancel_requested


async def test_a_cancel_through_another_replica_stops_the_run_at_once(fake_ollama, pg_server):
    """With PostgreSQL the replica running a run hears a cancel made through another replica
    at once (LISTEN/NOTIFY), not when it next renews its lease (every third of it)."""
    url = await fresh_database(pg_server)
    lease = 30.0
    settings = gateway_settings(ollama_url=fake_ollama.url, run_store=url, run_lease=lease)
    fake_ollama.enqueue(Script(hang_before_headers=True))
    async with running_gateway(settings) as a, running_gateway(settings) as b, \
            client_stub(a.address) as on_a, client_stub(b.address) as on_b:
        run_id = (await on_a.StartAgentRun(start_request(), timeout=5)).run.id
        await wait_until(lambda: fake_ollama.active_streams == 1, timeout=10)
        await on_b.CancelAgentRun(pb.CancelAgentRunRequest(run_id=run_id), timeout=5)
        # Well before the lease keeper's first look (lease / 3): the engine call is closed
        # and the run ended by A.
        run = await until_status(on_b, run_id, FINAL, timeout=lease / 6)
        await wait_until(lambda: fake_ollama.disconnects == 1, timeout=lease / 6)
    assert run.status == pb.AGENT_RUN_STATUS_CANCELLED
    assert run.error == "cancelled by CancelAgentRun"


async def listeners(url: str) -> list[int]:
    """The backends LISTENing for cancels on the database (their pids)."""
    db = await asyncpg.connect(url)
    try:
        return [row["pid"] for row in await db.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND "
            "query LIKE 'LISTEN %'")]
    finally:
        await db.close()


async def test_a_lost_cancel_listener_falls_back_to_the_lease_and_listens_again(
        fake_ollama, pg_server):
    url = await fresh_database(pg_server)
    settings = gateway_settings(ollama_url=fake_ollama.url, run_store=url, run_lease=0.6)
    fake_ollama.enqueue(Script(hang_before_headers=True))
    async with running_gateway(settings) as a, running_gateway(settings) as b, \
            client_stub(a.address) as on_a, client_stub(b.address) as on_b:
        pids = await listeners(url)
        assert len(pids) == 2
        db = await asyncpg.connect(url)
        try:
            for pid in pids:  # both replicas' listening connections are lost
                await db.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await db.close()
        run_id = (await on_a.StartAgentRun(start_request(), timeout=5)).run.id
        await wait_until(lambda: fake_ollama.active_streams == 1, timeout=10)
        await on_b.CancelAgentRun(pb.CancelAgentRunRequest(run_id=run_id), timeout=5)
        run = await until_status(on_b, run_id, FINAL)  # read with the lease meanwhile
        assert run.status == pb.AGENT_RUN_STATUS_CANCELLED
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while len(again := await listeners(url)) < 2 or set(again) & set(pids):
            assert loop.time() < end, again
            await asyncio.sleep(0.05)


async def test_a_replica_killed_mid_run_is_taken_over_after_its_last_step(fake_ollama,
                                                                          pg_server):
    """Three gateways on one PostgreSQL: A (its own process) runs the run, C watches it
    live; A is SIGKILLed mid-run; B or C takes it over and finishes it, every step recorded
    once, and C's watch sees every event once, in order, to the end."""
    url = await fresh_database(pg_server)
    fake_ollama.enqueue(CALCULATE, Script(hang_before_headers=True), ANSWER)
    port = free_port()
    killed = await asyncio.create_subprocess_exec(
        AGENTLOOP, "serve", "--listen", f"127.0.0.1:{port}", "--backend", "ollama",
        "--ollama-url", fake_ollama.url, "--warm-up", "false", "--run-store", url,
        "--run-lease", "1", "--run-event-flush-interval", "0",
        stdout=asyncio.subprocess.PIPE)
    settings = gateway_settings(ollama_url=fake_ollama.url, run_store=url, run_lease=1.0,
                                run_watch_poll_interval=0.05)
    try:
        assert killed.stdout is not None
        line = await asyncio.wait_for(killed.stdout.readline(), 60)
        assert line.startswith(b"agentloop serving on"), line
        async with running_gateway(settings) as b, running_gateway(settings) as c, \
                client_stub(f"127.0.0.1:{port}") as on_a, client_stub(b.address) as on_b, \
                client_stub(c.address) as on_c:
            run_id = (await on_a.StartAgentRun(start_request(), timeout=5)).run.id
            watching = asyncio.ensure_future(read_all(on_c, run_id))
            await wait_until(lambda: len(fake_ollama.generation_requests) == 2, timeout=10)
            killed.send_signal(signal.SIGKILL)
            await killed.wait()
            run = await until_status(on_b, run_id, FINAL)
            watched = await asyncio.wait_for(watching, 30)
            events = [e async for e in on_b.WatchAgentRun(
                pb.WatchAgentRunRequest(run_id=run_id), timeout=10)]
    finally:
        if killed.returncode is None:
            killed.kill()
            await killed.wait()
    assert run.status == pb.AGENT_RUN_STATUS_COMPLETED, run.error
    assert run.final_answer == "391"
    assert [(s.index, s.tool) for s in run.steps] == [(1, "calculator"), (2, "")]
    kinds = [e.WhichOneof("event") for e in events]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    # Every step recorded once: the calculator ran on the killed replica only.
    assert kinds.count("step_started") == 2
    assert kinds.count("tool_call") == 1 and kinds.count("tool_result") == 1
    assert kinds[-2:] == ["finished", "run_ended"]
    assert watched == events  # the live watch on C, across the takeover


async def read_all(stub, run_id: str) -> list[pb.WatchAgentRunResponse]:
    return [e async for e in stub.WatchAgentRun(pb.WatchAgentRunRequest(run_id=run_id),
                                                timeout=30)]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- a tool call whose result was not recorded ----------------------------------------------


class SendNote:
    """A server tool with a side effect, counting its runs."""

    name = "send_note"
    description = "Sends a note."
    parameters: dict[str, Any] = {"type": "object"}

    def __init__(self, idempotent: bool) -> None:
        self.idempotent = idempotent
        self.runs = 0

    async def run(self, arguments: Any) -> str:
        self.runs += 1
        return "sent"


async def interrupted_in_a_tool_call(path: Path, settings) -> str:
    """A run recorded as a replica left it: step 1's call of send_note made, no result."""
    store = SqliteRunStore(path)
    await store.open()
    now = time.time()
    run = AgentRun(goal="send a note", model="gemma3n:e2b", max_steps=4, tools=("send_note",),
                   options=resolve_options(RequestedOptions(max_tokens=256), settings),
                   context=CallContext())
    events = [StepStarted(1), ThoughtFormed(1, ""),
              ToolCalled(1, "call_1", "send_note", '{"text": "hi"}', False)]
    try:
        await store.create(RunRecord(
            id="run_interrupted", tenant="", status=RunStatus.RUNNING, created=now,
            updated=now, request=encode_request(run), deadline=now + 600,
            lease_owner="gone-replica", lease_expires=now - 1), max_active_per_tenant=10)
        await store.append_events("run_interrupted", [
            EventRecord("run_interrupted", seq, *encode_event(event, 65536))
            for seq, event in enumerate(events, start=1)])
    finally:
        await store.close()
    return "run_interrupted"


@pytest.mark.parametrize("idempotent", [False, True])
async def test_a_call_whose_result_was_not_recorded_runs_again_only_if_idempotent(
        fake_ollama: FakeOllama, tmp_path, idempotent):
    path = tmp_path / "runs.db"
    settings = gateway_settings(ollama_url=fake_ollama.url, run_store=str(path), run_lease=0.3)
    run_id = await interrupted_in_a_tool_call(path, settings)
    fake_ollama.enqueue(ANSWER)
    async with running_gateway(gateway_settings(ollama_url=fake_ollama.url)) as gateway:
        tool = SendNote(idempotent)
        agent = AgentService(gateway.runs.agent.generation, ToolRegistry([tool]), settings)
        manager = RunManager(agent, SqliteRunStore(path), settings)
        await manager.start()
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            while (view := await manager.get("", run_id)).status not in (
                    RunStatus.COMPLETED, RunStatus.FAILED):
                assert loop.time() < end, view.status
                await asyncio.sleep(0.02)
        finally:
            await manager.close()
    if idempotent:
        assert view.status is RunStatus.COMPLETED, view.record.error
        assert tool.runs == 1  # once here; the replica that stopped may have run it too
        assert [step.tool for step in view.steps] == ["send_note", ""]
    else:
        assert view.status is RunStatus.FAILED
        assert tool.runs == 0
        assert "send_note" in view.record.error and "idempotent" in view.record.error
        assert "call_1" in view.record.error


async def test_a_store_that_goes_away_refuses_new_runs_with_unavailable(fake_ollama, tmp_path):
    # A PostgreSQL URL nobody answers: the gateway starts, new runs are UNAVAILABLE.
    settings = gateway_settings(ollama_url=fake_ollama.url,
                                run_store=f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.StartAgentRun(start_request(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "password" not in raised.value.details() and "127.0.0.1" not in \
            raised.value.details()


async def test_a_tool_result_submitted_through_another_replica_reaches_the_run(
        fake_ollama, pg_server):
    url = await fresh_database(pg_server)
    settings = gateway_settings(ollama_url=fake_ollama.url, run_store=url,
                                run_watch_poll_interval=0.05)
    lookup = pb.ClientTool(name="lookup", description="Looks a word up.")
    fake_ollama.enqueue(Script(tokens=[json.dumps({"tool": "lookup",
                                                   "arguments": {"word": "x"}})]), ANSWER)
    async with running_gateway(settings) as a, running_gateway(settings) as b, \
            client_stub(a.address) as on_a, client_stub(b.address) as on_b:
        run_id = (await on_a.StartAgentRun(pb.StartAgentRunRequest(run=pb.StartAgentRun(
            goal="look x up", client_tools=[lookup])), timeout=5)).run.id
        waiting = await until_status(on_b, run_id, {pb.AGENT_RUN_STATUS_WAITING_FOR_TOOL})
        assert waiting.waiting_call.call_id == "call_1"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await on_b.SubmitToolResult(pb.SubmitToolResultRequest(
                run_id=run_id, tool_result=pb.ClientToolResult(call_id="call_7", output="?")),
                timeout=5)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await on_b.SubmitToolResult(pb.SubmitToolResultRequest(
            run_id=run_id, tool_result=pb.ClientToolResult(call_id="call_1", output="a letter")),
            timeout=5)
        run = await until_status(on_b, run_id, FINAL)
        assert run.status == pb.AGENT_RUN_STATUS_COMPLETED, run.error
        assert run.steps[0].observation == "a letter"


async def test_a_replica_that_lost_its_lease_stops_the_run_without_ending_it(fake_ollama,
                                                                            tmp_path):
    path = tmp_path / "runs.db"
    settings = gateway_settings(ollama_url=fake_ollama.url, run_store=str(path), run_lease=0.3)
    fake_ollama.enqueue(Script(hang_before_headers=True))
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        run_id = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
        await wait_until(lambda: fake_ollama.generation_requests, timeout=5)
        other = SqliteRunStore(path)
        await other.open()
        try:
            # Another replica took it over (as if this one had stalled past its lease).
            assert await other.claim(run_id, "replica-b", until=time.time() + 600,
                                     now=time.time() + 600)
            await wait_until(lambda: not gateway.runs._local, timeout=5)
            await wait_until(lambda: fake_ollama.disconnects, timeout=5)  # its call closed
            record = await other.get(run_id)
            events = await other.events(run_id, 0, 100)
        finally:
            await other.close()
    assert record.status is RunStatus.RUNNING and record.lease_owner == "replica-b"
    assert "run_ended" not in [e.kind for e in events]


async def test_a_store_down_mid_run_loses_no_run_accepted(fake_ollama):
    from postgres_server import postgres_server

    with postgres_server() as server:  # a server of its own: this test stops it a while
        url = await fresh_database(server)
        settings = gateway_settings(ollama_url=fake_ollama.url, run_store=url)
        fake_ollama.enqueue(CALCULATE, Script(tokens=ANSWER.tokens, first_token_delay=1.0))
        async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
            run_id = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
            await wait_until(lambda: len(fake_ollama.generation_requests) == 2, timeout=10)
            await asyncio.to_thread(server.stop)  # the answer comes while the store is down
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.StartAgentRun(start_request(), timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            local = gateway.runs._local[run_id]
            # The run has its answer and its end, which wait in memory for the store.
            await wait_until(lambda: any(isinstance(e.body, RunEnded) for e in local.events),
                             timeout=10)
            await asyncio.to_thread(server.start)
            run = await until_status(stub, run_id, FINAL)
            events = [e async for e in stub.WatchAgentRun(
                pb.WatchAgentRunRequest(run_id=run_id), timeout=10)]
        assert run.status == pb.AGENT_RUN_STATUS_COMPLETED and run.final_answer == "391"
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[-1].run_ended.status == pb.AGENT_RUN_STATUS_COMPLETED


async def test_runs_of_a_killed_replica_finish_on_another_each_tool_call_run_once(
        fake_ollama, pg_server):
    """Several runs on replica A (its own process), each calling a tool that counts its
    executions at the tool (an MCP server on loopback); A SIGKILLed mid-run: every run
    finishes on B (its own process too), picked up within the lease (plus B's check every
    third of it), each recorded tool call executed exactly once, none unrecorded, and each
    run's usage counting the model calls of A and B."""
    lease = 2.0
    found = await takeover(fake_ollama, await fresh_database(pg_server), runs=3, steps=3,
                           lease=lease, token_delay=0.03)
    assert found["completed"] == 3, found["per_run"]
    for run in found["per_run"]:
        assert run["steps"] == [TOOL, TOOL, TOOL, ""]
        assert run["pickup_s"] is not None and run["pickup_s"] < 2 * lease, run
    assert found["tool_calls_recorded"] == 9 and found["tool_executions"] == 9
    assert not found["executed_twice"] and not found["executed_not_recorded"]
    assert not found["recorded_not_executed"]
    # Each run's usage: the model calls of its steps, A's and B's (PROMPT_TOKENS each).
    assert found["usage_counts_every_replica"], found["per_run"]
    assert all(run["usage"] == [4 * PROMPT_TOKENS, 4 * OUTPUT_TOKENS]
               for run in found["per_run"]), found["per_run"]
