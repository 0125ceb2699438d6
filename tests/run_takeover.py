"""The takeover scenario, shared by tests/test_runs_replicas.py (small) and bench/bench_runs.py
(the figure): `runs` background runs on replica A, two real `agentloop serve` processes on
one PostgreSQL, each run calling a counting MCP tool (tests/mcp_tool_server.py's `tally`,
over Streamable HTTP on loopback) in `steps` steps before it answers; A is SIGKILLed while
every run is inside a model call after its first tool step; B takes them over.

What it reports, per run and in all: the time from the kill to B's first model call for the
run (the pickup) and to the run's end, the tool's executions counted at the tool beside the
tool calls the runs recorded, and each run's usage beside the usage of every model call its
steps took (on A and on B).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import FakeOllama, Script, wait_until
from helpers import client_stub

AGENTLOOP = str(Path(sys.executable).parent / "agentloop")
MCP_SERVER = str(Path(__file__).with_name("mcp_tool_server.py"))
#: The counting tool as the gateway names it (server "counter").
TOOL = "counter__tally"
#: Tokens every model call of the scenario reports (the fake's final chunk says so).
PROMPT_TOKENS, OUTPUT_TOKENS = 100, 10
FINAL = {pb.AGENT_RUN_STATUS_COMPLETED, pb.AGENT_RUN_STATUS_FAILED,
         pb.AGENT_RUN_STATUS_CANCELLED, pb.AGENT_RUN_STATUS_EXPIRED}


@contextlib.asynccontextmanager
async def counting_tool_server(quiet: bool = False) -> AsyncIterator[str]:
    """tests/mcp_tool_server.py over Streamable HTTP on a free loopback port (its log
    dropped when `quiet`); its URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, MCP_SERVER, "http", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL if quiet else None)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("mcp listening on "), line
        yield line.split()[-1]
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def tool_executions(mcp_url: str) -> Counter[str]:
    """The tally tool's executions per label, as the tool counted them."""
    async with aiohttp.ClientSession() as session, \
            session.get(mcp_url.removesuffix("/mcp") + "/tallies") as response:
        response.raise_for_status()
        return Counter(await response.json())


@contextlib.asynccontextmanager
async def serving(*args: str, quiet: bool = False
                  ) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """An `agentloop serve` process on a free loopback port (its log dropped when `quiet`);
    (process, address)."""
    proc = await asyncio.create_subprocess_exec(
        AGENTLOOP, "serve", "--listen", "127.0.0.1:0", "--warm-up", "false",
        "--metrics-listen", "", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL if quiet else None)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
        assert line.startswith("agentloop serving on "), line
        yield proc, line.split()[3]
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def stepping_script(steps: int, token_delay: float,
                    calls: dict[str, list[float]]) -> Callable[[dict[str, Any]], Script]:
    """The fake's answer to any run's model call, from its conversation: a call of the tally
    tool labelled with the run's goal and the step while fewer than `steps` steps are done,
    then the final answer. Each call's start is noted in `calls` under the run's goal."""

    def script_for(body: dict[str, Any]) -> Script:
        messages = body.get("messages") or []
        goal = next((m["content"] for m in messages if m.get("role") == "user"), "")
        calls.setdefault(goal, []).append(time.time())
        done = sum(1 for m in messages if m.get("role") == "assistant")
        if done < steps:
            text = json.dumps({"tool": TOOL, "arguments": {"label": f"{goal}/{done + 1}"}})
        else:
            text = json.dumps({"final_answer": f"{goal}: {steps} tallies"})
        return Script(tokens=[text[i:i + 8] for i in range(0, len(text), 8)],
                      token_delay=token_delay,
                      final_fields={"prompt_eval_count": PROMPT_TOKENS,
                                    "eval_count": OUTPUT_TOKENS})

    return script_for


async def _tool_listed(stub: Any) -> bool:
    listed = await stub.ListTools(pb.ListToolsRequest(), timeout=10)
    return any(tool.name == TOOL for tool in listed.tools)


async def takeover(fake: FakeOllama, store_url: str, *, runs: int, steps: int, lease: float,
                   token_delay: float, quiet: bool = False) -> dict[str, Any]:
    """Run the scenario; what it measured (see the module's docstring). Each model call
    streams its tokens `token_delay` apart (about 10 tokens a call)."""
    calls: dict[str, list[float]] = {}
    fake.script_for = stepping_script(steps, token_delay, calls)
    with tempfile.TemporaryDirectory() as work:
        async with counting_tool_server(quiet) as mcp_url:
            servers = Path(work) / "mcp.json"
            servers.write_text(json.dumps({"servers": {"counter": {"url": mcp_url,
                                                                   "refresh": 0.5}}}))
            common = ("--backend", "ollama", "--ollama-url", fake.url, "--run-store", store_url,
                      "--run-lease", str(lease), "--run-max-running", str(runs),
                      "--max-in-flight", str(runs),  # every run's model call at once
                      "--mcp-servers", str(servers))
            async with serving(*common, quiet=quiet) as (a, on_a_address), \
                    serving(*common, quiet=quiet) as (_, on_b_address), \
                    client_stub(on_a_address) as on_a, client_stub(on_b_address) as on_b:
                for stub in (on_a, on_b):  # MCP sessions open in the background
                    end = time.monotonic() + 60
                    while not await _tool_listed(stub):
                        assert time.monotonic() < end, f"{TOOL} never listed"
                        await asyncio.sleep(0.1)
                goals = [f"run {i}" for i in range(runs)]
                ids = [(await on_a.StartAgentRun(pb.StartAgentRunRequest(run=pb.StartAgentRun(
                    goal=goal, tools=[TOOL], max_steps=steps + 1)), timeout=10)).run.id
                    for goal in goals]
                # Mid-run: every run past its first tool step, none at its answer yet, and
                # every one inside a model call (no tool call half done).
                await wait_until(lambda: fake.active_streams == runs and all(
                    2 <= len(calls.get(goal, ())) <= steps for goal in goals), timeout=60)
                killed = time.time()
                a.send_signal(signal.SIGKILL)
                await a.wait()
                ended = []
                for run_id in ids:
                    deadline = time.monotonic() + 30 * lease + 60
                    while (run := (await on_b.GetAgentRun(pb.GetAgentRunRequest(
                            run_id=run_id), timeout=10)).run).status not in FINAL:
                        assert time.monotonic() < deadline, f"{run_id} never ended"
                        await asyncio.sleep(0.05)
                    ended.append(run)
            executed = await tool_executions(mcp_url)
    recorded = Counter(json.loads(step.arguments_json)["label"]
                       for run in ended for step in run.steps if step.tool == TOOL)
    per_run = []
    for goal, run in zip(goals, ended, strict=True):
        after = [t for t in calls[goal] if t > killed]
        end = run.end_time.seconds + run.end_time.nanos / 1e9
        model_calls = sum(1 for step in run.steps)  # one per step: no repair turns here
        per_run.append({
            "status": pb.AgentRunStatus.Name(run.status), "error": run.error,
            "pickup_s": after[0] - killed if after else None, "end_s": end - killed,
            "steps": [step.tool for step in run.steps],
            "usage": [run.usage.input_tokens, run.usage.output_tokens],
            "usage_of_its_steps": [model_calls * PROMPT_TOKENS, model_calls * OUTPUT_TOKENS],
        })
    return {
        "runs": runs, "steps": steps, "lease_s": lease, "token_delay_s": token_delay,
        "completed": sum(r.status == pb.AGENT_RUN_STATUS_COMPLETED for r in ended),
        "tool_executions": sum(executed.values()), "tool_calls_recorded": sum(recorded.values()),
        "executed_twice": sorted(label for label, n in executed.items() if n > 1),
        "executed_not_recorded": sorted(set(executed) - set(recorded)),
        "recorded_not_executed": sorted(set(recorded) - set(executed)),
        "usage_counts_every_replica": all(r["usage"] == r["usage_of_its_steps"]
                                          for r in per_run),
        "pickup_s_max": max((r["pickup_s"] or 0.0) for r in per_run),
        "end_s_p50": sorted(r["end_s"] for r in per_run)[len(per_run) // 2],
        "end_s_max": max(r["end_s"] for r in per_run),
        "per_run": per_run,
    }
