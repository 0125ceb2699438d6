"""Background agent runs through real channels against the fake Ollama: StartAgentRun returns
at once and the run outlives its caller; Get, List (paged, newest first, by status), Cancel
(the engine call closed at once, idempotent), Watch (replay after any sequence number, then
live; two watchers, one order), client tools that wait for SubmitToolResult (or fail at the
run's deadline), tenants that see only their runs, the limits, a full or missing store, events
written in batches, StreamRunAgent that goes on when its stream drops, and a restart that
loses no queued run."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from agentloop.runs.store import RunStatus
from agentloop.services.runs import RunEnded
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import FakeOllama, Script, wait_until
from helpers import client_stub, gateway_settings, rich_details, running_gateway

GOAL = "What is 17*23? Use the calculator."
FINAL = {pb.AGENT_RUN_STATUS_COMPLETED, pb.AGENT_RUN_STATUS_FAILED,
         pb.AGENT_RUN_STATUS_CANCELLED, pb.AGENT_RUN_STATUS_EXPIRED}


def action(**fields: Any) -> Script:
    text = json.dumps(fields)
    return Script(tokens=[text[i:i + 7] for i in range(0, len(text), 7)])


CALCULATE = action(tool="calculator", arguments={"expression": "17*23"}, thought="multiply")
ANSWER = action(final_answer="391", thought="done")


def start_request(goal: str = GOAL, **fields: Any) -> pb.StartAgentRunRequest:
    client_tools = fields.pop("client_tools", ())
    return pb.StartAgentRunRequest(run=pb.StartAgentRun(goal=goal, max_steps=4,
                                                        client_tools=client_tools), **fields)


async def wait_for_status(stub, run_id: str, statuses: set[int], metadata=(),
                          timeout: float = 10.0) -> pb.AgentRun:
    """Poll GetAgentRun until the run has one of `statuses`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        run = (await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=run_id), metadata=metadata,
                                      timeout=5)).run
        if run.status in statuses:
            return run
        if loop.time() > end:
            raise TimeoutError(f"run {run_id} stayed {pb.AgentRunStatus.Name(run.status)}")
        await asyncio.sleep(0.02)


async def watch(stub, run_id: str, after: int = 0, metadata=()) -> list[pb.WatchAgentRunResponse]:
    call = stub.WatchAgentRun(pb.WatchAgentRunRequest(run_id=run_id, after_sequence=after),
                              metadata=metadata, timeout=10)
    return [event async for event in call]


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def gateway(fake_ollama: FakeOllama, settings_overrides):
    settings = gateway_settings(ollama_url=fake_ollama.url, **settings_overrides)
    async with running_gateway(settings) as running:
        yield running


# --- a run outlives its caller ----------------------------------------------------------------


async def test_a_run_started_and_left_completes_with_its_steps(gateway, fake_ollama):
    fake_ollama.enqueue(CALCULATE, ANSWER)
    async with client_stub(gateway.address) as stub:
        started = (await stub.StartAgentRun(start_request(), timeout=5)).run
    # The caller is gone (its channel closed); the run goes on.
    assert started.id.startswith("run_") and len(started.id) >= 28
    assert started.status in (pb.AGENT_RUN_STATUS_QUEUED, pb.AGENT_RUN_STATUS_RUNNING)
    async with client_stub(gateway.address) as stub:
        run = await wait_for_status(stub, started.id, FINAL)
    assert run.status == pb.AGENT_RUN_STATUS_COMPLETED, run.error
    assert run.final_answer == "391"
    assert run.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER
    assert [s.tool for s in run.steps] == ["calculator", ""]
    assert run.steps[0].observation == "391"
    assert run.usage.output_tokens > 0 and run.end_time.seconds > 0
    assert run.last_sequence > 0 and not run.error


async def test_a_watcher_that_sees_the_end_reads_the_answer(gateway, stub, fake_ollama):
    """The end event goes out once the record says so: a store slow to take the end (a busy
    disk) never lets a watcher read a finished run without its answer."""
    store = gateway.runs.store
    recorded = store.update
    taking = asyncio.Event()

    async def slow_update(run_id: str, **changes: Any) -> Any:
        if changes.get("status") is not None and "answer" in changes:
            taking.set()
            await asyncio.sleep(0.3)  # the fault: the end's write takes a while
        return await recorded(run_id, **changes)

    store.update = slow_update
    fake_ollama.enqueue(ANSWER)
    run_id = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
    events = [e async for e in stub.WatchAgentRun(pb.WatchAgentRunRequest(run_id=run_id),
                                                   timeout=10)]
    assert taking.is_set() and events[-1].run_ended.status == pb.AGENT_RUN_STATUS_COMPLETED
    run = (await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=run_id), timeout=5)).run
    assert run.status == pb.AGENT_RUN_STATUS_COMPLETED and run.final_answer == "391"


async def test_ids_are_unguessable_and_unknown_ids_are_not_found(stub, fake_ollama):
    fake_ollama.enqueue(ANSWER, ANSWER)
    first = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
    second = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
    assert first != second
    for call in (stub.GetAgentRun(pb.GetAgentRunRequest(run_id="run_nope"), timeout=5),
                 stub.CancelAgentRun(pb.CancelAgentRunRequest(run_id="run_nope"), timeout=5)):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert rich_details(raised.value)["ErrorInfo"].reason == "RUN_NOT_FOUND"


async def test_a_bad_start_names_the_field(stub):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.StartAgentRun(pb.StartAgentRunRequest(
            run=pb.StartAgentRun(goal=" "),
            timeout=duration_pb2.Duration(seconds=10 ** 7)), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for v in rich_details(raised.value)["BadRequest"].field_violations}
    assert fields == {"run.goal", "timeout"}


# --- watching -------------------------------------------------------------------------------


async def test_watching_replays_after_any_sequence_number(stub, fake_ollama):
    fake_ollama.enqueue(CALCULATE, ANSWER)
    run_id = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
    everything = await watch(stub, run_id)
    kinds = [e.WhichOneof("event") for e in everything]
    assert [e.sequence for e in everything] == list(range(1, len(everything) + 1))
    assert kinds[0] == "step_started" and kinds[-2:] == ["finished", "run_ended"]
    assert {"tool_call", "tool_result", "thought", "answer_delta"} <= set(kinds)
    assert everything[-1].run_ended.status == pb.AGENT_RUN_STATUS_COMPLETED
    for after in range(len(everything)):
        assert await watch(stub, run_id, after) == everything[after:]
    run = (await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=run_id), timeout=5)).run
    assert run.last_sequence == len(everything)


async def test_two_live_watchers_see_the_same_events_in_the_same_order(stub, fake_ollama):
    slow = Script(tokens=CALCULATE.tokens, token_delay=0.02)
    fake_ollama.enqueue(slow, Script(tokens=ANSWER.tokens, token_delay=0.02))
    run_id = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
    first, second = await asyncio.gather(watch(stub, run_id), watch(stub, run_id))
    assert first == second
    assert first[-1].WhichOneof("event") == "run_ended"
    # And a watcher after the end replays the same.
    assert await watch(stub, run_id) == first


@pytest.mark.parametrize("settings_overrides", [{"run_event_flush_interval": 30.0}])
async def test_answer_deltas_are_joined_not_written_one_by_one(stub, fake_ollama):
    answer = "word " * 200
    text = json.dumps({"final_answer": answer})
    fake_ollama.enqueue(Script(tokens=[text[i:i + 3] for i in range(0, len(text), 3)]))
    run_id = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
    events = await watch(stub, run_id)
    deltas = [e.answer_delta.text for e in events if e.WhichOneof("event") == "answer_delta"]
    # Hundreds of pieces from the engine; one event (and no commit) per step's answer.
    assert len(deltas) == 1 and deltas[0] == answer
    assert len(events) <= 5


# --- cancel ---------------------------------------------------------------------------------


async def test_cancel_closes_the_engine_call_at_once_and_is_idempotent(stub, fake_ollama):
    fake_ollama.enqueue(Script(hang_before_headers=True))
    run_id = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
    await wait_until(lambda: fake_ollama.generation_requests, timeout=5)
    disconnects = fake_ollama.disconnects
    run = (await stub.CancelAgentRun(pb.CancelAgentRunRequest(run_id=run_id), timeout=5)).run
    assert run.status == pb.AGENT_RUN_STATUS_CANCELLED and "cancel" in run.error
    await wait_until(lambda: fake_ollama.disconnects > disconnects, timeout=5)
    again = (await stub.CancelAgentRun(pb.CancelAgentRunRequest(run_id=run_id), timeout=5)).run
    assert again.status == pb.AGENT_RUN_STATUS_CANCELLED and again.end_time == run.end_time
    events = await watch(stub, run_id)
    assert events[-1].run_ended.status == pb.AGENT_RUN_STATUS_CANCELLED


# --- client tools ---------------------------------------------------------------------------

LOOKUP = pb.ClientTool(name="lookup", description="Looks a word up.",
                       parameters_json_schema='{"type": "object"}')


async def test_a_client_tool_waits_for_its_result_by_run_id(stub, fake_ollama):
    fake_ollama.enqueue(action(tool="lookup", arguments={"word": "x"}),
                        action(final_answer="found it"))
    run_id = (await stub.StartAgentRun(start_request(client_tools=[LOOKUP]), timeout=5)).run.id
    run = await wait_for_status(stub, run_id, {pb.AGENT_RUN_STATUS_WAITING_FOR_TOOL})
    assert run.waiting_call.tool == "lookup" and run.waiting_call.call_id == "call_1"
    assert json.loads(run.waiting_call.arguments_json) == {"word": "x"}
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitToolResult(pb.SubmitToolResultRequest(
            run_id=run_id, tool_result=pb.ClientToolResult(call_id="call_9", output="?")),
            timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await stub.SubmitToolResult(pb.SubmitToolResultRequest(
        run_id=run_id, tool_result=pb.ClientToolResult(call_id="call_1", output="a letter")),
        timeout=5)
    run = await wait_for_status(stub, run_id, FINAL)
    assert run.status == pb.AGENT_RUN_STATUS_COMPLETED and run.final_answer == "found it"
    assert run.steps[0].observation == "a letter"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SubmitToolResult(pb.SubmitToolResultRequest(
            run_id=run_id, tool_result=pb.ClientToolResult(call_id="call_1", output="x")),
            timeout=5)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_client_tool_unanswered_past_the_deadline_fails_the_run(stub, fake_ollama):
    fake_ollama.enqueue(action(tool="lookup", arguments={"word": "x"}))
    run_id = (await stub.StartAgentRun(start_request(
        client_tools=[LOOKUP], timeout=duration_pb2.Duration(seconds=1)), timeout=5)).run.id
    run = await wait_for_status(stub, run_id, FINAL)
    assert run.status == pb.AGENT_RUN_STATUS_FAILED
    assert "deadline" in run.error and "call_1" in run.error and "lookup" in run.error


# --- tenants --------------------------------------------------------------------------------

TENANTS = """\
tenants:
  acme:
    keys: [acme-key]
  globex:
    keys: [globex-key]
"""


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def test_a_tenant_sees_only_its_own_runs(fake_ollama, tmp_path):
    keys = tmp_path / "tenants.yaml"
    keys.write_text(TENANTS)
    fake_ollama.enqueue(ANSWER)
    settings = gateway_settings(ollama_url=fake_ollama.url, api_keys_file=str(keys))
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        acme, globex = bearer("acme-key"), bearer("globex-key")
        run_id = (await stub.StartAgentRun(start_request(), metadata=acme, timeout=5)).run.id
        await wait_for_status(stub, run_id, FINAL, metadata=acme)
        for call in (
            stub.GetAgentRun(pb.GetAgentRunRequest(run_id=run_id), metadata=globex, timeout=5),
            stub.CancelAgentRun(pb.CancelAgentRunRequest(run_id=run_id), metadata=globex,
                                timeout=5),
            stub.SubmitToolResult(pb.SubmitToolResultRequest(
                run_id=run_id, tool_result=pb.ClientToolResult(call_id="call_1", output="x")),
                metadata=globex, timeout=5),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await watch(stub, run_id, metadata=globex)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.ListAgentRuns(pb.ListAgentRunsRequest(), metadata=globex, timeout=5)
        assert list(listed.runs) == []
        listed = await stub.ListAgentRuns(pb.ListAgentRunsRequest(), metadata=acme, timeout=5)
        assert [r.id for r in listed.runs] == [run_id]


# --- listing --------------------------------------------------------------------------------


async def test_list_is_newest_first_paged_and_filtered_by_status(stub, fake_ollama):
    fake_ollama.enqueue(*[ANSWER] * 5)
    ids = []
    for _ in range(5):
        run_id = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
        await wait_for_status(stub, run_id, FINAL)
        ids.append(run_id)
    fake_ollama.enqueue(Script(hang_before_headers=True))
    hanging = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
    await wait_for_status(stub, hanging, {pb.AGENT_RUN_STATUS_RUNNING})
    seen, token = [], ""
    while True:
        page = await stub.ListAgentRuns(pb.ListAgentRunsRequest(page_size=2, page_token=token),
                                        timeout=5)
        assert len(page.runs) <= 2 and not any(r.steps for r in page.runs)
        seen += [r.id for r in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [hanging, *reversed(ids)]
    running = await stub.ListAgentRuns(pb.ListAgentRunsRequest(
        statuses=[pb.AGENT_RUN_STATUS_RUNNING]), timeout=5)
    assert [r.id for r in running.runs] == [hanging]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ListAgentRuns(pb.ListAgentRunsRequest(page_token="garbage"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await stub.CancelAgentRun(pb.CancelAgentRunRequest(run_id=hanging), timeout=5)


# --- limits and the store -------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"run_max_running": 1,
                                                  "run_max_active_per_tenant": 2}])
async def test_runs_queue_past_the_replica_and_stop_at_the_tenants_limit(stub, fake_ollama):
    fake_ollama.enqueue(Script(hang_before_headers=True), ANSWER)
    first = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
    second = (await stub.StartAgentRun(start_request(), timeout=5)).run
    assert second.status == pb.AGENT_RUN_STATUS_QUEUED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.StartAgentRun(start_request(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_details(raised.value)["ErrorInfo"].reason == "RUN_LIMIT"
    assert "run_max_active_per_tenant" in raised.value.details()
    # The first one cancelled, the queued one runs.
    await stub.CancelAgentRun(pb.CancelAgentRunRequest(run_id=first), timeout=5)
    run = await wait_for_status(stub, second.id, FINAL)
    assert run.status == pb.AGENT_RUN_STATUS_COMPLETED


async def test_a_full_store_refuses_new_runs_and_keeps_the_accepted_ones(fake_ollama, tmp_path):
    path = tmp_path / "runs.db"
    settings = gateway_settings(ollama_url=fake_ollama.url, run_store=str(path),
                                run_store_max_bytes=96 * 1024)
    fake_ollama.default_script = ANSWER
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        accepted = []
        big = "y" * 20000
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            for _ in range(100):
                started = await stub.StartAgentRun(start_request(goal=big), timeout=5)
                accepted.append(started.run.id)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rich_details(raised.value)["ErrorInfo"].reason == "RUN_STORE_FULL"
        assert accepted
        for run_id in accepted:
            await wait_for_status(stub, run_id, FINAL)


async def test_a_store_that_cannot_open_makes_new_runs_unavailable(fake_ollama, tmp_path):
    (tmp_path / "a-file").write_text("")
    settings = gateway_settings(ollama_url=fake_ollama.url,
                                run_store=str(tmp_path / "a-file" / "runs.db"))
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.StartAgentRun(start_request(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert rich_details(raised.value)["ErrorInfo"].reason == "RUN_STORE_UNAVAILABLE"
        # The rest of the gateway serves as before.
        fake_ollama.enqueue(ANSWER)
        reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL), timeout=5)
        assert reply.final_answer == "391"


# --- StreamRunAgent that goes on --------------------------------------------------------------


async def test_a_stream_that_drops_leaves_its_run_going(stub, fake_ollama):
    fake_ollama.enqueue(Script(tokens=CALCULATE.tokens, first_token_delay=0.3), ANSWER)
    call = stub.StreamRunAgent(timeout=10)
    await call.write(pb.StreamRunAgentRequest(start=pb.StartAgentRun(
        goal=GOAL, continue_on_disconnect=True)))
    metadata = dict(await call.initial_metadata())
    run_id = metadata["x-agentloop-run-id"]
    first = await call.read()
    assert first.WhichOneof("event") == "step_started"
    call.cancel()  # the stream drops mid-run
    run = await wait_for_status(stub, run_id, FINAL)
    assert run.status == pb.AGENT_RUN_STATUS_COMPLETED and run.final_answer == "391"


async def test_a_continued_stream_sends_what_a_plain_one_does(stub, fake_ollama):
    fake_ollama.enqueue(CALCULATE, ANSWER)
    call = stub.StreamRunAgent(timeout=10)
    await call.write(pb.StreamRunAgentRequest(start=pb.StartAgentRun(
        goal=GOAL, continue_on_disconnect=True)))
    await call.done_writing()
    kinds = [reply.WhichOneof("event") async for reply in call]
    assert kinds[0] == "step_started" and kinds[-1] == "finished"
    assert "tool_call" in kinds and "tool_result" in kinds


# --- a restart ------------------------------------------------------------------------------


async def test_a_restart_loses_no_run(fake_ollama, tmp_path):
    path = tmp_path / "runs.db"
    settings = gateway_settings(ollama_url=fake_ollama.url, run_store=str(path),
                                run_max_running=1, run_lease=0.3)
    fake_ollama.enqueue(CALCULATE, Script(hang_before_headers=True))
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        started = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
        await wait_until(lambda: len(fake_ollama.generation_requests) == 2, timeout=5)
        queued = [(await stub.StartAgentRun(start_request(), timeout=5)).run.id
                  for _ in range(3)]
    with sqlite3.connect(path) as db:
        statuses = dict(db.execute("SELECT id, status FROM runs").fetchall())
    assert statuses[started] == "running"
    assert all(statuses[run_id] == "queued" for run_id in queued)
    fake_ollama.enqueue(ANSWER, ANSWER, ANSWER, ANSWER)
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        for run_id in queued:
            run = await wait_for_status(stub, run_id, FINAL)
            assert run.status == pb.AGENT_RUN_STATUS_COMPLETED, run.error
        # The started run goes on after its last recorded step: step 2, asked again.
        resumed = await wait_for_status(stub, started, FINAL)
        assert resumed.status == pb.AGENT_RUN_STATUS_COMPLETED, resumed.error
        assert resumed.final_answer == "391"
        assert [(s.index, s.tool) for s in resumed.steps] == [(1, "calculator"), (2, "")]
        events = await watch(stub, started)
    kinds = [e.WhichOneof("event") for e in events]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert kinds.count("step_started") == 2 and kinds.count("tool_call") == 1
    assert kinds.count("tool_result") == 1 and kinds[-1] == "run_ended"


# --- metrics --------------------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"metrics_listen": "127.0.0.1:0"}])
async def test_runs_are_counted_by_status_with_the_store_latency(gateway, stub, fake_ollama):
    from test_telemetry import scrape, total

    fake_ollama.enqueue(ANSWER)
    run_id = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
    await wait_for_status(stub, run_id, FINAL)
    samples = await scrape(gateway.metrics_port)
    names = {s.name for s in samples}
    ended = next(n for n in names if n.startswith("agentloop_runs_ended"))
    assert total(samples, ended, agentloop_run_status="completed") == 1
    stored = next(n for n in names if n.startswith("agentloop_run_store_operation_duration")
                  and n.endswith("_count"))
    assert total(samples, stored, agentloop_run_store_operation="append_events") >= 1
    active = next(n for n in names if n.startswith("agentloop_runs_active"))
    assert total(samples, active, agentloop_run_status="queued") == 0


# --- the Python client ----------------------------------------------------------------------


async def test_the_client_starts_watches_through_a_restart_and_cancels(fake_ollama, tmp_path):
    from test_replicas import free_port

    from agentloop.server import start_server
    from agentloop_client import AsyncAgentLoopClient

    port = free_port()
    settings = gateway_settings(ollama_url=fake_ollama.url, listen=f"127.0.0.1:{port}",
                                run_store=str(tmp_path / "runs.db"), run_lease=0.3)
    fake_ollama.enqueue(CALCULATE, Script(hang_before_headers=True), ANSWER)
    first = await start_server(settings)
    second = None
    try:
        async with AsyncAgentLoopClient(f"127.0.0.1:{port}", timeout=30) as client:
            run = await client.start_agent_run(GOAL, max_steps=4, run_timeout=60)
            assert run.status in (pb.AGENT_RUN_STATUS_QUEUED, pb.AGENT_RUN_STATUS_RUNNING)
            events: list[pb.WatchAgentRunResponse] = []

            async def follow() -> None:
                async for event in client.watch_agent_run(run.id, retry_delay=0.1):
                    events.append(event)

            watching = asyncio.create_task(follow())
            await wait_until(lambda: len(fake_ollama.generation_requests) == 2, timeout=10)
            await first.shutdown(grace=0.2, drain_delay=0.0)  # the watch drops mid-run
            second = await start_server(settings)  # takes the run over, on the same port
            await asyncio.wait_for(watching, 30)
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
            assert events[-1].run_ended.status == pb.AGENT_RUN_STATUS_COMPLETED
            kinds = [e.WhichOneof("event") for e in events]
            assert kinds.count("tool_call") == 1 and kinds.count("step_started") == 2
            done = await client.get_agent_run(run.id)
            assert done.final_answer == "391"
            listed = [r.id async for r in client.list_agent_runs(page_size=1)]
            assert listed == [run.id]
            again = await client.cancel_agent_run(run.id)  # ended: nothing changes
            assert again.status == pb.AGENT_RUN_STATUS_COMPLETED
    finally:
        await first.shutdown(grace=0.0, drain_delay=0.0)
        if second is not None:
            await second.shutdown(grace=0.0, drain_delay=0.0)


async def test_a_running_run_shows_its_finished_steps(stub, fake_ollama):
    fake_ollama.enqueue(CALCULATE, Script(hang_before_headers=True))
    run_id = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
    await wait_until(lambda: len(fake_ollama.generation_requests) == 2, timeout=5)
    run = (await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=run_id), timeout=5)).run
    assert run.status == pb.AGENT_RUN_STATUS_RUNNING
    assert [(s.index, s.tool, s.observation) for s in run.steps] == [(1, "calculator", "391")]
    await stub.CancelAgentRun(pb.CancelAgentRunRequest(run_id=run_id), timeout=5)


# --- conversations that go on ---------------------------------------------------------------


def said(fake: FakeOllama) -> list[tuple[str, str]]:
    """(role, content) of the last generation's chat, the system prompt left out."""
    return [(m["role"], m["content"]) for m in fake.generation_requests[-1]["messages"]
            if m["role"] != "system"]


@pytest.mark.parametrize("settings_overrides", [{"max_prompt_bytes": 3000}])
async def test_a_run_continues_a_stored_conversation(gateway, stub, fake_ollama):
    from agentloop.services.runs import decode_request

    fake_ollama.enqueue(ANSWER)
    first = (await stub.StartAgentRun(start_request("x" * 1500), timeout=5)).run.id
    await wait_for_status(stub, first, FINAL)
    fake_ollama.enqueue(action(final_answer="782"))
    second = (await stub.StartAgentRun(pb.StartAgentRunRequest(
        run=pb.StartAgentRun(goal="And doubled?"), previous_run_id=first), timeout=5)).run.id
    run = await wait_for_status(stub, second, FINAL)
    assert run.final_answer == "782"
    turns = said(fake_ollama)
    assert turns[:3] == [("user", "x" * 1500), ("assistant", "391"), ("user", "And doubled?")]
    # The conversation's affinity: its runs carry one session, the first run's id.
    stored = await gateway.runs.store.get(second)
    assert decode_request(stored.request).context.session == first
    # Past the limits: refused, naming the field, or trimmed when asked.
    long_goal = "y" * 1490
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.StartAgentRun(pb.StartAgentRunRequest(
            run=pb.StartAgentRun(goal=long_goal), previous_run_id=second), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "trim_conversation" in raised.value.details()
    fake_ollama.enqueue(ANSWER)
    third = (await stub.StartAgentRun(pb.StartAgentRunRequest(
        run=pb.StartAgentRun(goal=long_goal), previous_run_id=second, trim_conversation=True),
        timeout=5)).run.id
    await wait_for_status(stub, third, FINAL)
    turns = said(fake_ollama)
    assert ("user", "x" * 1500) not in turns and ("user", long_goal) in turns
    assert ("user", "And doubled?") in turns
    for missing in ("run_nope", third.replace("run_", "run_x")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.StartAgentRun(pb.StartAgentRunRequest(
                run=pb.StartAgentRun(goal="hi"), previous_run_id=missing), timeout=5)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_conversation_past_the_models_context_is_refused_or_trimmed(stub, fake_ollama):
    """The byte limit is far away; the model's context is not: 2,048 tokens less a 512-token
    answer hold about 6 KB of conversation."""
    fake_ollama.enqueue(ANSWER)
    options = pb.GenerationOptions(num_ctx=2048, max_tokens=512)
    first = (await stub.StartAgentRun(pb.StartAgentRunRequest(run=pb.StartAgentRun(
        goal="x" * 4000, options=options)), timeout=5)).run.id
    await wait_for_status(stub, first, FINAL)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.StartAgentRun(pb.StartAgentRunRequest(
            run=pb.StartAgentRun(goal="y" * 4000, options=options), previous_run_id=first),
            timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context of 2048 tokens" in raised.value.details()
    assert rich_details(raised.value)["BadRequest"].field_violations[0].field == \
        "previous_run_id"
    fake_ollama.enqueue(ANSWER)
    trimmed = (await stub.StartAgentRun(pb.StartAgentRunRequest(
        run=pb.StartAgentRun(goal="y" * 4000, options=options), previous_run_id=first,
        trim_conversation=True), timeout=5)).run.id
    await wait_for_status(stub, trimmed, FINAL)
    assert ("user", "x" * 4000) not in said(fake_ollama)


def test_every_replica_s_spans_of_a_run_are_one_trace_linked_to_its_caller():
    from opentelemetry.metrics import NoOpMeter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from agentloop.telemetry import Telemetry
    from agentloop.telemetry.metrics import Instruments

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(provider.get_tracer("test"), Instruments(NoOpMeter("test")))
    with provider.get_tracer("test").start_as_current_span("StartAgentRun") as caller:
        with telemetry.background_run("run_abc", "replica-a", resumed=False):
            pass
    with telemetry.background_run("run_abc", "replica-b", resumed=True):
        pass
    with telemetry.background_run("run_other", "replica-b", resumed=False):
        pass
    spans = {(s.attributes["agentloop.run.id"], s.attributes["agentloop.replica"]): s
             for s in exporter.get_finished_spans() if s.name == "agent_run"}
    first, second = spans["run_abc", "replica-a"], spans["run_abc", "replica-b"]
    assert first.context.trace_id == second.context.trace_id
    assert spans["run_other", "replica-b"].context.trace_id != first.context.trace_id
    assert [link.context.span_id for link in first.links] == [caller.get_span_context().span_id]
    assert second.attributes["agentloop.run.resumed"] is True


async def test_a_continued_stream_answers_its_client_tools(stub, fake_ollama):
    fake_ollama.enqueue(action(tool="lookup", arguments={"word": "x"}),
                        action(final_answer="found it"))
    call = stub.StreamRunAgent(timeout=10)
    await call.write(pb.StreamRunAgentRequest(start=pb.StartAgentRun(
        goal="look x up", client_tools=[LOOKUP], continue_on_disconnect=True)))
    kinds = []
    while (reply := await call.read()) is not grpc.aio.EOF:
        kinds.append(reply.WhichOneof("event"))
        if reply.HasField("tool_call") and reply.tool_call.client_tool:
            await call.write(pb.StreamRunAgentRequest(tool_result=pb.ClientToolResult(
                call_id=reply.tool_call.call_id, output="a letter")))
        if reply.HasField("finished"):
            assert reply.finished.final_answer == "found it"
    assert kinds[-1] == "finished" and "tool_result" in kinds
    assert "Result of lookup: a letter" in json.dumps(fake_ollama.generation_requests[-1])


@pytest.mark.parametrize("settings_overrides", [{"run_max_running": 1}])
async def test_a_run_queued_past_its_deadline_expires(stub, fake_ollama):
    fake_ollama.enqueue(Script(hang_before_headers=True))
    first = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
    queued = (await stub.StartAgentRun(start_request(timeout=duration_pb2.Duration(seconds=1)),
                                       timeout=5)).run.id
    run = await wait_for_status(stub, queued, FINAL)
    assert run.status == pb.AGENT_RUN_STATUS_EXPIRED and "queued" in run.error
    assert (await watch(stub, queued))[-1].run_ended.status == pb.AGENT_RUN_STATUS_EXPIRED
    await stub.CancelAgentRun(pb.CancelAgentRunRequest(run_id=first), timeout=5)



async def test_a_watcher_that_heard_the_end_finds_the_run_final(gateway, stub, fake_ollama):
    """The end reaches watchers once it is recorded: one that goes on at once (GetAgentRun,
    a continued conversation, the HTTP door's answer) never finds the run still running."""
    for _ in range(3):
        fake_ollama.enqueue(ANSWER)
        run_id = (await stub.StartAgentRun(start_request(), timeout=5)).run.id
        events = [event async for event in gateway.runs.watch("", run_id)]  # in-process
        view = await gateway.runs.get("", run_id)
        assert isinstance(events[-1].body, RunEnded)
        assert view.status is RunStatus.COMPLETED
