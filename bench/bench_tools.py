"""Function calling on the embedded engine: tool-call validity, and decode speed with the
tool grammar beside plain decoding, in one run.

Measured through the real gateway (a child `agentloop serve --backend embedded`, as
bench_embedded runs it), with grpc.aio in this process:

  validity   P prompts (>= 50 for the figure), each a Generate with the TOOLS and tool choice
             required (a call is forced; the model picks the tool): the share of calls that
             parse, name a declared tool and validate against its schema (goal: 100 %), and
             how many answers max_tokens cut before the call closed (no call, counted apart)
  speed      decode tokens/s of an answer under the tool grammar (a call of `save_people`,
             as long as max_tokens lets it be) / of a plain answer to the same chat, the two
             alternating, median over R rounds (goal: >= 80 %)

    .venv/bin/python -m bench.bench_tools [--prompts 50] [--rounds 6] [--max-tokens 96]

Writes bench/results/tools.json (or --out) and prints a Markdown table. Run it on a quiet
machine: llama.cpp slows down a lot when other processes compete for the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import jsonschema

from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from bench.bench_embedded import gateway

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMAS: dict[str, dict[str, Any]] = {
    "get_weather": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24},
                       "days": {"enum": [1, 2, 3, 5, 7]}},
        "required": ["city", "days"],
    },
    "convert_units": {
        "type": "object",
        "properties": {"amount": {"type": "number"},
                       "from_unit": {"enum": ["km", "mi", "kg", "lb", "C", "F"]},
                       "to_unit": {"enum": ["km", "mi", "kg", "lb", "C", "F"]}},
        "required": ["amount", "from_unit", "to_unit"],
    },
    "send_email": {
        "type": "object",
        "properties": {"to": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}[.]com$"},
                       "subject": {"type": "string", "maxLength": 40},
                       "urgent": {"type": "boolean"}},
        "required": ["to", "subject"],
    },
}
#: A call as long as max_tokens lets it be: the speed figure's tool.
PEOPLE = {
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 20, "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "city": {"type": "string"},
                       "age": {"type": "integer"}},
        "required": ["name", "city", "age"]}}},
    "required": ["people"],
}
SUBJECTS = ["Paris", "Oslo", "12 miles", "30 kg", "a meeting", "Lima", "75 F", "the report",
            "Tokyo", "5 km"]
ASKS = ["What is the weather in {}?", "Convert {} please.", "Write an email about {}.",
        "I need help with {}.", "Tell me something about {}."]
GOALS = {"valid_share": 1.0, "grammar_over_plain": 0.80}


def tools_of(schemas: dict[str, dict[str, Any]]) -> list[pb.ToolDefinition]:
    return [pb.ToolDefinition(name=name, description=f"The {name.replace('_', ' ')} tool.",
                              parameters_json_schema=json.dumps(schema))
            for name, schema in schemas.items()]


def prompt(index: int) -> str:
    return ASKS[index % len(ASKS)].format(SUBJECTS[(index // len(ASKS)) % len(SUBJECTS)])


async def validity(stub: pb_grpc.AgentLoopServiceStub, prompts: int,
                   max_tokens: int) -> dict[str, Any]:
    calls = valid = cut = 0
    problems: list[str] = []
    for index in range(prompts):
        reply = await stub.Generate(pb.GenerateRequest(
            messages=[pb.Message(role=pb.ROLE_USER, content=prompt(index))],
            tools=tools_of(SCHEMAS), tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED),
            options=pb.GenerationOptions(max_tokens=max_tokens, temperature=0.8,
                                         seed=index + 1)), timeout=600)
        if not reply.tool_calls:
            cut += reply.finish_reason == pb.FINISH_REASON_LENGTH
            continue
        for call in reply.tool_calls:
            calls += 1
            try:
                jsonschema.validate(json.loads(call.arguments_json), SCHEMAS[call.name])
            except (KeyError, ValueError, jsonschema.ValidationError) as exc:
                problems.append(f"{call.name}: {str(exc)[:120]}")
                continue
            valid += 1
    return {"prompts": prompts, "calls": calls, "valid": valid, "cut_by_max_tokens": cut,
            "valid_share": valid / calls if calls else 0.0, "problems": problems[:10]}


async def speed(stub: pb_grpc.AgentLoopServiceStub, rounds: int,
                max_tokens: int) -> dict[str, float]:
    """Decode tokens/s of a forced call of `save_people` and of a plain answer, alternating."""
    chat = [pb.Message(role=pb.ROLE_USER, content="Save a list of twenty people with their "
                                                  "city and age.")]
    rates: dict[str, list[float]] = {"plain": [], "tool_grammar": []}
    for index in range(rounds):
        for kind in ("plain", "tool_grammar") if index % 2 == 0 else ("tool_grammar", "plain"):
            tools = {"tools": tools_of({"save_people": PEOPLE}),
                     "tool_choice": pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)} \
                if kind == "tool_grammar" else {}
            reply = await stub.Generate(pb.GenerateRequest(
                messages=chat, options=pb.GenerationOptions(max_tokens=max_tokens,
                                                            seed=index + 1), **tools),
                timeout=1800)
            decode = reply.timings.eval_duration.ToNanoseconds() / 1e9
            rates[kind].append(max(reply.usage.output_tokens - 1, 1) / max(decode, 1e-9))
    plain, constrained = (statistics.median(rates[k]) for k in ("plain", "tool_grammar"))
    return {"plain_tokens_per_s": plain, "tool_grammar_tokens_per_s": constrained,
            "ratio": constrained / plain}


async def measure(address: str, args: argparse.Namespace) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AgentLoopServiceStub(channel)
        return {"validity": await validity(stub, args.prompts, args.max_tokens),
                "speed": await speed(stub, args.rounds, args.max_tokens)}


def table(result: dict[str, Any]) -> str:
    validity_, speed_ = result["validity"], result["speed"]
    rows = [
        ("tool calls valid (parse, declared name, schema)",
         f"{validity_['valid']}/{validity_['calls']} ({validity_['valid_share']:.0%}); "
         f"{validity_['cut_by_max_tokens']} of {validity_['prompts']} cut by max_tokens",
         f"{GOALS['valid_share']:.0%}"),
        ("decode tokens/s, tool grammar / plain",
         f"{speed_['tool_grammar_tokens_per_s']:.1f} / {speed_['plain_tokens_per_s']:.1f} = "
         f"{speed_['ratio']:.0%}", f">= {GOALS['grammar_over_plain']:.0%}"),
    ]
    return "\n".join(["| figure | measured | goal |", "| --- | --- | --- |",
                      *(f"| {a} | {b} | {c} |" for a, b, c in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6, help="grammar/plain pairs")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=RESULTS / "tools.json")
    args = parser.parse_args()
    started = time.monotonic()
    with gateway([]) as address:
        result = asyncio.run(measure(address, args))
    result["command"] = " ".join([Path(sys.executable).name, "-m", "bench.bench_tools",
                                  *sys.argv[1:]])
    result["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\n{result['command']}\nwritten to {args.out}")


if __name__ == "__main__":
    main()
