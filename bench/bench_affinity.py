"""Conversation affinity against round-robin, side by side in one run, on the embedded engine.

Three `agentloop serve --backend embedded` replicas listen on 127.0.0.2, .3 and .4 (one
port). A workload of conversations (default 12) runs them all at once, each turn by turn
(default 6 turns): every turn is a StreamGenerate whose messages repeat the conversation so
far (opening, then each user turn and the model's reply) plus the new user turn. The same
workload runs twice through `agentloop_client`:

- round_robin: the client's default for an address list, every turn to the next replica;
- affinity: `session=` the conversation's id, so ring_hash keeps its turns on one replica.

Each mode gets conversations of its own (different openings), so neither finds the other's
prefixes in a cache. With `--rounds` above 1 the modes alternate which goes first.

Reported per mode, over the turns after the first (those a cache can help): the share of
prompt tokens the engine served from its cache (`usage.cached_input_tokens`, 0 while the
engine does not report it), and time to first token p50 / p95 as the client sees it (call
sent to first text delta, so waiting in a replica's queue counts). The all-turns figures
are in the JSON.

    .venv/bin/python -m bench.bench_affinity [--conversations 12] [--turns 6] [--rounds 1]

Writes bench/results/affinity.json and prints a Markdown table. A smoke run:
`--conversations 2 --turns 2 --max-tokens 4`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agentloop.v1 import agentloop_pb2 as pb
from agentloop_client import AgentLoopError, AsyncAgentLoopClient
from bench.bench_workers import wait_serving
from bench.processes import free_port, stop

RESULTS = Path(__file__).resolve().parent / "results"
AGENTLOOP = str(Path(sys.executable).parent / "agentloop")
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
MODES = ("round_robin", "affinity")
WORDS = ("river harbor lantern market winter garden letter journey mountain village "
         "captain island morning bridge forest signal engine window stranger promise "
         "orchard station archive compass meadow tower shadow festival canal workshop").split()
CACHED_FIELD = "cached_input_tokens"


@dataclass
class Turn:
    mode: str
    conversation: str
    turn: int
    ttft_s: float | None
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    error: str = ""


def opening(name: str, words: int) -> str:
    """A conversation's first message: its own text, long enough for a cache to matter."""
    rng = random.Random(name)
    story = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"Conversation {name}. Here are my notes: {story}. Tell me a story about them."


async def converse(client: AsyncAgentLoopClient, mode: str, name: str, args: argparse.Namespace
                   ) -> list[Turn]:
    """One conversation, turn by turn, each turn sending everything said so far."""
    messages: list[dict[str, str]] = []
    turns = []
    session = name if mode == "affinity" else None
    for index in range(args.turns):
        user = opening(name, args.opening_words) if index == 0 else f"Turn {index}: go on."
        messages.append({"role": "user", "content": user})
        started = time.perf_counter()
        first: float | None = None
        reply: list[str] = []
        last: pb.StreamGenerateResponse | None = None
        try:
            async for message in client.stream_generate(
                    messages=messages, session=session, timeout=args.call_timeout,
                    options={"max_tokens": args.max_tokens, "temperature": 0, "seed": 7}):
                if message.text and first is None:
                    first = time.perf_counter() - started
                reply.append(message.text)
                last = message
        except AgentLoopError as exc:
            turns.append(Turn(mode, name, index, None, 0, 0, 0, error=exc.code.name))
            break
        usage = last.usage if last is not None else pb.Usage()
        turns.append(Turn(mode, name, index, first, usage.input_tokens,
                          int(getattr(usage, CACHED_FIELD, 0)), usage.output_tokens))
        messages.append({"role": "assistant", "content": "".join(reply)})
    return turns


async def run_mode(target: str, mode: str, round_index: int, args: argparse.Namespace
                   ) -> list[Turn]:
    names = [f"{mode}-{round_index}-{i}" for i in range(args.conversations)]
    async with AsyncAgentLoopClient(target, affinity=mode == "affinity",
                                    timeout=args.call_timeout) as client:
        results = await asyncio.gather(*(converse(client, mode, name, args) for name in names))
    return [turn for turns in results for turn in turns]


def start_replicas(port: int, server_args: list[str]) -> list[subprocess.Popen[bytes]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for host in HOSTS:
            procs.append(subprocess.Popen(
                [AGENTLOOP, "serve", "--listen", f"{host}:{port}", "--backend", "embedded",
                 "--log-level", "warning", "--metrics-listen", "", "--drain-delay", "0",
                 "--queue-timeout", "300", *server_args],
                stdout=subprocess.DEVNULL))
        for host, proc in zip(HOSTS, procs, strict=True):
            wait_serving(f"{host}:{port}", proc, timeout=600)
    except BaseException:
        for proc in procs:
            stop(proc)
        raise
    return procs


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def summarize(turns: list[Turn]) -> dict[str, Any]:
    def figures(selected: list[Turn]) -> dict[str, Any]:
        ok = [t for t in selected if not t.error]
        prompt = sum(t.input_tokens for t in ok)
        cached = sum(t.cached_tokens for t in ok)
        ttfts = [t.ttft_s for t in ok if t.ttft_s is not None]
        p50, p95 = _percentile(ttfts, 50), _percentile(ttfts, 95)
        return {
            "turns": len(selected), "errors": len(selected) - len(ok),
            "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_share": round(cached / prompt, 4) if prompt else None,
            "ttft_p50_ms": round(p50 * 1e3, 1) if p50 is not None else None,
            "ttft_p95_ms": round(p95 * 1e3, 1) if p95 is not None else None,
        }

    return {"later_turns": figures([t for t in turns if t.turn > 0]),
            "all_turns": figures(turns)}


def table(result: dict[str, Any]) -> str:
    rows = ["| mode | prompt tokens from cache (turns 2+) | TTFT p50 | TTFT p95 | errors |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for mode in MODES:
        later = result["modes"][mode]["later_turns"]
        errors = result["modes"][mode]["all_turns"]["errors"]
        share = "n/a" if later["cached_share"] is None else f"{later['cached_share']:.0%}"
        rows.append(f"| {mode} | {share} ({later['cached_tokens']:,} of "
                    f"{later['prompt_tokens']:,}) | {_ms(later['ttft_p50_ms'])} | "
                    f"{_ms(later['ttft_p95_ms'])} | {errors} |")
    ratio = result["ttft_p50_ratio_round_robin_over_affinity"]
    if ratio is not None:
        rows.append(f"\nTTFT p50, round_robin / affinity: {ratio:.2f}x")
    if not result["cached_tokens_reported"]:
        rows.append(f"\n`Usage.{CACHED_FIELD}` is not in this build's protos: cached shares "
                    "read 0 until the engine reports them.")
    return "\n".join(rows)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} ms"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per reply")
    parser.add_argument("--opening-words", type=int, default=120,
                        help="words in each conversation's first message")
    parser.add_argument("--rounds", type=int, default=1, help="runs of both modes")
    parser.add_argument("--call-timeout", type=float, default=600.0)
    parser.add_argument("--server-arg", action="append", default=[], dest="server_args",
                        help="extra `agentloop serve` argument for every replica (repeatable)")
    args = parser.parse_args(argv)

    port = free_port(HOSTS[0])
    target = "ipv4:" + ",".join(f"{host}:{port}" for host in HOSTS)
    started = time.monotonic()
    procs = start_replicas(port, args.server_args)
    turns: list[Turn] = []
    try:
        for round_index in range(args.rounds):
            order = MODES if round_index % 2 == 0 else MODES[::-1]
            for mode in order:
                print(f"round {round_index + 1}: {mode}", flush=True)
                turns += asyncio.run(run_mode(target, mode, round_index, args))
    finally:
        for proc in procs:
            stop(proc)

    modes = {mode: summarize([t for t in turns if t.mode == mode]) for mode in MODES}
    rr, aff = (modes[m]["later_turns"]["ttft_p50_ms"] for m in MODES)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.machine(),
                    "python": platform.python_version()},
        "settings": vars(args),
        "cached_tokens_reported": CACHED_FIELD in pb.Usage.DESCRIPTOR.fields_by_name,
        "modes": modes,
        "ttft_p50_ratio_round_robin_over_affinity": round(rr / aff, 3) if rr and aff else None,
        "seconds": round(time.monotonic() - started, 1),
        "turns": [asdict(t) for t in turns],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "affinity.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


if __name__ == "__main__":
    main()
