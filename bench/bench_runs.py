"""Background runs, side by side in one run: the figures of issue 32.

- survive: `--runs` background runs started, each from a channel closed at once (the
  caller gone): how many complete, and model calls made (none repeated: one per run).
- resume: for a finished run, WatchAgentRun from every sequence number returns exactly
  the events after it (checked, and the time per watch).
- store: the cost per event written, p50 / p99, one event per commit, on SQLite (a file)
  and on PostgreSQL (a server started here, when one can run); and the commits a run with a
  `--tokens`-token answer makes (events joined in batches) beside one commit per token.
- webhook: the time from a run's end to its webhook at a loopback receiver, p50 / max;
  and with a receiver that fails twice (500, then a reset): the attempt that delivers and
  whether the webhook-id was the same on each.
- queued: `--queued` runs waiting behind one hanging run: the gateway's memory per queued
  run, and how many are still queued after the gateway restarts on its file.
- takeover: `--takeover-runs` runs of `--takeover-steps` tool steps each on replica A, A
  SIGKILLed mid-run, B finishing them (two `agentloop serve` processes on the PostgreSQL
  started here, lease `--lease`): the time from the kill to B's pickup and to each run's
  end, the tool's executions counted at the tool (an MCP server on loopback) beside the
  tool calls recorded, and each run's usage beside its model calls' on A and B
  (tests/run_takeover.py).

Everything but the takeover's replicas and tool server runs in this process on loopback
(the gateway, the fake Ollama, the receiver).

    .venv/bin/python -m bench.bench_runs [--runs 100] [--tokens 1000] [--queued 1000]

Writes bench/results/runs.json and prints a Markdown table. A smoke run:
`--runs 10 --tokens 100 --queued 50 --events 200 --takeover-runs 3`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fakes live with the tests

from run_takeover import takeover  # noqa: E402

from agentloop.runs.store import EventRecord, RunRecord, RunStatus, SqliteRunStore  # noqa: E402
from agentloop.v1 import agentloop_pb2 as pb  # noqa: E402
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc  # noqa: E402
from fake_ollama import FakeOllama, Script  # noqa: E402
from helpers import gateway_settings, running_gateway  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SECRET = "whsec_" + base64.b64encode(b"b" * 32).decode()
FINAL = {pb.AGENT_RUN_STATUS_COMPLETED, pb.AGENT_RUN_STATUS_FAILED,
         pb.AGENT_RUN_STATUS_CANCELLED, pb.AGENT_RUN_STATUS_EXPIRED}


def answer(text: str = "391", pieces: int = 1) -> Script:
    body = json.dumps({"final_answer": text})
    size = max(1, len(body) // pieces)
    return Script(tokens=[body[i:i + size] for i in range(0, len(body), size)])


def start(goal: str = "17*23?", **fields: Any) -> pb.StartAgentRunRequest:
    return pb.StartAgentRunRequest(run=pb.StartAgentRun(goal=goal, max_steps=2), **fields)


async def until_final(stub: Any, run_id: str, timeout: float = 120) -> pb.AgentRun:
    end = time.monotonic() + timeout
    while True:
        run = (await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=run_id), timeout=10)).run
        if run.status in FINAL or time.monotonic() > end:
            return run
        await asyncio.sleep(0.02)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


async def survive(fake: FakeOllama, address: str, runs: int) -> dict[str, Any]:
    fake.default_script = answer()
    before = len(fake.generation_requests)
    ids = []
    for _ in range(runs):
        async with grpc.aio.insecure_channel(address) as channel:  # closed at once: gone
            ids.append((await pb_grpc.AgentLoopServiceStub(channel).StartAgentRun(
                start(), timeout=10)).run.id)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AgentLoopServiceStub(channel)
        finals = [await until_final(stub, run_id) for run_id in ids]
    return {"started": runs,
            "completed": sum(r.status == pb.AGENT_RUN_STATUS_COMPLETED for r in finals),
            "model_calls": len(fake.generation_requests) - before}


async def resume(fake: FakeOllama, stub: Any) -> dict[str, Any]:
    fake.enqueue(Script(tokens=[json.dumps({"tool": "calculator",
                                            "arguments": {"expression": "17*23"}})]),
                 answer(pieces=20))
    run_id = (await stub.StartAgentRun(start(), timeout=10)).run.id
    await until_final(stub, run_id)
    everything = [e async for e in stub.WatchAgentRun(pb.WatchAgentRunRequest(run_id=run_id),
                                                      timeout=10)]
    exact, times = 0, []
    for after in range(len(everything)):
        started = time.perf_counter()
        got = [e async for e in stub.WatchAgentRun(pb.WatchAgentRunRequest(
            run_id=run_id, after_sequence=after), timeout=10)]
        times.append(time.perf_counter() - started)
        exact += got == everything[after:]
    return {"events": len(everything), "exact": exact, "watch_ms_p50":
            statistics.median(times) * 1000}


async def store_cost(store: Any, events: int) -> dict[str, float]:
    await store.open()
    try:
        now = time.time()
        await store.create(RunRecord("run_bench", "", RunStatus.RUNNING, now, now, b"{}"), 10)
        payload = json.dumps({"step": 1, "text": "x" * 40}).encode()
        single = []
        for seq in range(1, events + 1):
            started = time.perf_counter()
            await store.append_events("run_bench", [EventRecord("run_bench", seq, "answer_delta",
                                                                payload)])
            single.append(time.perf_counter() - started)
        started = time.perf_counter()
        batch = [EventRecord("run_bench", seq, "answer_delta", payload)
                 for seq in range(events + 1, 2 * events + 1)]
        await store.append_events("run_bench", batch)
        batched = (time.perf_counter() - started) / events
        return {"p50_us": percentile(single, 0.5) * 1e6, "p99_us": percentile(single, 0.99) * 1e6,
                "batched_us_per_event": batched * 1e6}
    finally:
        await store.close()


async def commits_per_run(fake: FakeOllama, stub: Any, gateway: Any, tokens: int
                          ) -> dict[str, Any]:
    commits: list[str] = []
    store = gateway.runs.store
    observe = store.observe
    store.observe = lambda op, s: (commits.append(op), observe(op, s))
    try:
        text = "word " * tokens
        body = json.dumps({"final_answer": text})
        step = max(1, len(body) // tokens)
        fake.enqueue(Script(tokens=[body[i:i + step] for i in range(0, len(body), step)],
                            token_delay=0.001))
        run_id = (await stub.StartAgentRun(start(), timeout=10)).run.id
        run = await until_final(stub, run_id)
    finally:
        store.observe = observe
    return {"tokens": tokens, "event_commits": commits.count("append_events"),
            "events": run.last_sequence}


async def webhooks(fake: FakeOllama, runs: int) -> dict[str, Any]:
    received: list[tuple[str, float]] = []
    plan: list[str] = []

    async def receive(request: web.Request) -> web.StreamResponse:
        await request.read()
        received.append((request.headers["webhook-id"], time.time()))
        step = plan.pop(0) if plan else "200"
        if step == "reset":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)
        return web.Response(status=int(step))

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore
    settings = gateway_settings(ollama_url=fake.url, webhook_url_prefixes=url,
                                webhook_secrets=SECRET, webhook_allowed_networks="127.0.0.0/8",
                                webhook_backoff=0.2, webhook_backoff_max=1.0)
    delays = []
    try:
        async with running_gateway(settings) as gateway, \
                grpc.aio.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.AgentLoopServiceStub(channel)
            fake.default_script = answer()
            for _ in range(runs):
                received.clear()
                run_id = (await stub.StartAgentRun(start(webhook_url=url), timeout=10)).run.id
                run = await until_final(stub, run_id)
                while not received:
                    await asyncio.sleep(0.005)
                ended = run.end_time.seconds + run.end_time.nanos / 1e9
                delays.append(received[0][1] - ended)
            received.clear()
            plan[:] = ["500", "reset"]
            run_id = (await stub.StartAgentRun(start(webhook_url=url), timeout=10)).run.id
            await until_final(stub, run_id)
            while len(received) < 3:
                await asyncio.sleep(0.01)
            run = (await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=run_id), timeout=10)).run
            while run.webhook_deliveries[0].state == pb.WEBHOOK_DELIVERY_STATE_PENDING:
                await asyncio.sleep(0.01)
                run = (await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=run_id),
                                              timeout=10)).run
    finally:
        await runner.cleanup()
    delivery = run.webhook_deliveries[0]
    return {"delay_ms_p50": statistics.median(delays) * 1000, "delay_ms_max": max(delays) * 1000,
            "failing_receiver_attempts": delivery.attempts,
            "same_webhook_id": len({wid for wid, _ in received}) == 1}


async def queued(fake: FakeOllama, count: int, path: Path) -> dict[str, Any]:
    settings = gateway_settings(ollama_url=fake.url, run_store=str(path), run_max_running=1,
                                run_max_queued=count + 10, run_max_active_per_tenant=count + 10,
                                run_lease=1.0)
    process = psutil.Process()
    fake.enqueue(Script(hang_before_headers=True))
    async with running_gateway(settings) as gateway, \
            grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.AgentLoopServiceStub(channel)
        await stub.StartAgentRun(start(), timeout=10)
        before = process.memory_info().rss
        ids = [(await stub.StartAgentRun(start("q" * 200), timeout=10)).run.id
               for _ in range(count)]
        after = process.memory_info().rss
    kept = 0
    async with running_gateway(settings) as gateway:
        for run_id in ids:
            record = await gateway.runs.store.get(run_id)
            kept += record is not None and record.status is RunStatus.QUEUED
        # Let them run now: they are not lost, only waiting.
    return {"queued": count, "kb_per_queued_run": (after - before) / 1024 / count,
            "still_queued_after_restart": kept}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as work:
        async with FakeOllama() as fake:
            settings = gateway_settings(ollama_url=fake.url, run_store=f"{work}/runs.db",
                                        run_max_running=16)
            async with running_gateway(settings) as gateway, \
                    grpc.aio.insecure_channel(gateway.address) as channel:
                stub = pb_grpc.AgentLoopServiceStub(channel)
                results["survive"] = await survive(fake, gateway.address, args.runs)
                results["resume"] = await resume(fake, stub)
                results["commits"] = await commits_per_run(fake, stub, gateway, args.tokens)
            results["webhook"] = await webhooks(fake, args.webhook_runs)
            results["queued"] = await queued(fake, args.queued, Path(work) / "queued.db")
        results["store_sqlite"] = await store_cost(SqliteRunStore(f"{work}/cost.db"),
                                                   args.events)
        from postgres_server import fresh_database, postgres_server, why_no_server

        if why_no_server() is None:
            from agentloop.runs.postgres import PostgresRunStore

            with postgres_server() as server:
                url = await fresh_database(server)
                results["store_postgres"] = await store_cost(PostgresRunStore(url), args.events)
                async with FakeOllama() as fake:
                    results["takeover"] = await takeover(
                        fake, await fresh_database(server), runs=args.takeover_runs,
                        steps=args.takeover_steps, lease=args.lease, token_delay=0.05,
                        quiet=True)
        else:
            results["store_postgres"] = results["takeover"] = {"skipped": why_no_server()}
    return results


def table(results: dict[str, Any]) -> str:
    s, r, c = results["survive"], results["resume"], results["commits"]
    w, q = results["webhook"], results["queued"]
    lines = ["| figure | result |", "| --- | --- |",
             f"| runs whose caller left at once | {s['completed']} of {s['started']} completed, "
             f"{s['model_calls']} model calls (one each) |",
             f"| watch from every sequence number | {r['exact']} of {r['events']} exact, "
             f"{r['watch_ms_p50']:.1f} ms p50 |",
             f"| a {c['tokens']}-token answer | {c['events']} events in {c['event_commits']} "
             "commits |",
             f"| webhook after the run's end (loopback) | p50 {w['delay_ms_p50']:.0f} ms, "
             f"max {w['delay_ms_max']:.0f} ms |",
             f"| receiver failing twice (500, reset) | delivered on attempt "
             f"{w['failing_receiver_attempts']}, same webhook-id: {w['same_webhook_id']} |",
             f"| {q['queued']} runs queued | {q['kb_per_queued_run']:.1f} KiB each; "
             f"{q['still_queued_after_restart']} still queued after a restart |"]
    for name in ("store_sqlite", "store_postgres"):
        cost = results[name]
        if "skipped" in cost:
            lines.append(f"| {name}: per event | skipped ({cost['skipped']}) |")
        else:
            lines.append(f"| {name}: per event, one per commit | p50 {cost['p50_us']:.0f} us, "
                         f"p99 {cost['p99_us']:.0f} us; batched "
                         f"{cost['batched_us_per_event']:.1f} us |")
    t = results["takeover"]
    if "skipped" in t:
        lines.append(f"| takeover | skipped ({t['skipped']}) |")
    else:
        lines += [
            f"| takeover: {t['runs']} runs of {t['steps']} tool steps, A SIGKILLed | "
            f"{t['completed']} of {t['runs']} completed on B; lease {t['lease_s']:g} s; picked "
            f"up {t['pickup_s_max']:.2f} s after the kill at most; ended p50 "
            f"{t['end_s_p50']:.2f} s, max {t['end_s_max']:.2f} s after it |",
            f"| takeover: tool executions (at the tool) vs tool calls recorded | "
            f"{t['tool_executions']} vs {t['tool_calls_recorded']}; executed twice: "
            f"{len(t['executed_twice'])}; usage counts A's and B's model calls: "
            f"{t['usage_counts_every_replica']} |"]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--webhook-runs", type=int, default=10)
    parser.add_argument("--takeover-runs", type=int, default=10)
    parser.add_argument("--takeover-steps", type=int, default=3)
    parser.add_argument("--lease", type=float, default=3.0)
    arguments = parser.parse_args()
    found = asyncio.run(main(arguments))
    found["command"] = "python -m bench.bench_runs " + " ".join(sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runs.json").write_text(json.dumps(found, indent=2))
    print(table(found))
