"""The HTTP door against a peer door on the same upstream: llama.cpp's own OpenAI-compatible
endpoint (llama-cpp-python's server on the packaged Gemma 3 270M), called directly, and the
same server behind agentloop's HTTP door (an `openai` upstream in a pools file).

The official `openai` SDK sends the same streamed chat completion (temperature 0,
`--max-tokens`) `--requests` times to each, alternating, one at a time (the server serves
one request at a time). Reported per door: time to first token and latency (median and
P95) and tokens/s; the figure is the door's over the server's own (issue 33: report the
ratio; LiteLLM's proxy is not installed here).

    .venv/bin/python -m bench.bench_peer_door [--requests 20] [--max-tokens 64]

Writes bench/results/peer_door.json and prints a Markdown table. Run it on a quiet machine:
both the server and the gateway share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI

from bench.processes import TESTS, free_port, stop

sys.path.insert(0, str(TESTS))
from test_openai_real import ALIAS, KEY, llama_cpp_server

RESULTS = Path(__file__).resolve().parent / "results" / "peer_door.json"
AGENTLOOP = str(Path(sys.executable).parent / "agentloop")
QUESTION = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
#: llama-cpp-python's server as tests/test_openai_real.py describes it.
DIALECT = {"schema_style": "json_object", "stream_usage": False, "completions": True,
           "sampling_extras": True, "repeat_penalty_field": "repeat_penalty",
           "completions_format": "grammar", "strict_schema": False, "stop_limit": 0,
           "tool_choice_required": False}


def serve_door(folder: Path, base: str) -> tuple[subprocess.Popen[str], str]:
    """`agentloop serve` with the HTTP door before the server: (process, API base)."""
    pools = folder / "pools.json"
    pools.write_text(json.dumps({
        "upstreams": {"llama": {"kind": "openai", "endpoints": [base], "remote": False,
                                "api_key_env": "PEER_DOOR_KEY", "max_in_flight": 1,
                                "dialect": DIALECT}},
        "routes": [{"models": [ALIAS], "pools": ["llama"]}]}))
    http = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [AGENTLOOP, "serve", "--listen", "127.0.0.1:0", "--http-listen", http, "--upstreams",
         str(pools), "--model", ALIAS, "--warm-up", "false", "--log-level", "warning",
         "--drain-delay", "0", "--metrics-listen", "", "--read-timeout", "300",
         # The server answers one request at a time: its /models waits behind a generation.
         "--health-timeout", "60"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PEER_DOOR_KEY": KEY})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("agentloop serving on "):
        stop(proc)
        raise RuntimeError(f"the gateway did not start: {line!r}")
    return proc, f"http://{http}/v1"


async def one(client: AsyncOpenAI, max_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    first = 0.0
    pieces = 0
    stream = await client.chat.completions.create(
        model=ALIAS, messages=QUESTION, max_tokens=max_tokens, temperature=0, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
            if not first:
                first = time.perf_counter() - started
    latency = time.perf_counter() - started
    return {"ttft": first, "latency": latency, "tokens_per_s": pieces / latency}


def summary(samples: list[dict[str, float]]) -> dict[str, float]:
    def p95(values: list[float]) -> float:
        return sorted(values)[min(len(values) - 1, int(0.95 * len(values)))]

    ttft = [s["ttft"] for s in samples]
    latency = [s["latency"] for s in samples]
    return {"ttft_p50": statistics.median(ttft), "ttft_p95": p95(ttft),
            "latency_p50": statistics.median(latency), "latency_p95": p95(latency),
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in samples)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as folder, \
            llama_cpp_server(Path(folder) / "server.log") as base:
        proc, door = serve_door(Path(folder), base)
        try:
            clients = {"server": AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0),
                       "door": AsyncOpenAI(base_url=door, api_key="unused", max_retries=0)}
            for client in clients.values():  # a first call each: the model's pages in
                await one(client, 8)
            samples: dict[str, list[dict[str, float]]] = {name: [] for name in clients}
            for i in range(args.requests):
                order = list(clients) if i % 2 == 0 else list(reversed(clients))
                for name in order:
                    samples[name].append(await one(clients[name], args.max_tokens))
        finally:
            stop(proc)
    results.update({name: summary(values) for name, values in samples.items()})
    server, door_figures = results["server"], results["door"]
    results["ratios"] = {"ttft_p50": door_figures["ttft_p50"] / server["ttft_p50"],
                         "latency_p50": door_figures["latency_p50"] / server["latency_p50"],
                         "tokens_per_s": door_figures["tokens_per_s"] / server["tokens_per_s"]}
    return results


def table(results: dict[str, Any]) -> str:
    rows = ["| door | TTFT p50 / p95 | latency p50 / p95 | tokens/s |",
            "| --- | --- | --- | ---: |"]
    for name, label in (("server", "llama.cpp's own (llama-cpp-python's server)"),
                        ("door", "agentloop's HTTP door before it")):
        figures = results[name]
        rows.append(f"| {label} | {figures['ttft_p50'] * 1e3:.0f} / "
                    f"{figures['ttft_p95'] * 1e3:.0f} ms | {figures['latency_p50']:.2f} / "
                    f"{figures['latency_p95']:.2f} s | {figures['tokens_per_s']:.1f} |")
    ratios = results["ratios"]
    rows.append(f"\nThe door over the server's own: TTFT p50 {ratios['ttft_p50']:.2f}x, "
                f"latency p50 {ratios['latency_p50']:.2f}x, tokens/s "
                f"{ratios['tokens_per_s']:.2f}x")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
