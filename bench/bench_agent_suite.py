"""A fixed suite of agent goals on the embedded model: does the model follow the prompts?

Each goal runs at temperature 0 under each of three request `system` texts (SYSTEMS),
through a real `agentloop serve` process on the embedded engine (the packaged Gemma 3 270M
unless --gguf names another): arithmetic with the calculator, the time, a question needing
no tool (RunAgent), and a lookup with a tool the client runs (StreamRunAgent). The report
gives the share of runs answered correctly, the steps each took, the time per step, and
the runs whose thought or answer repeats the agent's instruction text, a value of its
worked examples or a placeholder (`<your answer>`): a model copying its prompt rather
than acting on it.

Correctness at temperature 0 is the figure to compare; the time per step depends on how
busy the machine is.

    .venv/bin/python -m bench.bench_agent_suite [--max-tokens 256] [--gguf FILE]

Prints a Markdown table and writes bench/results/agent_suite.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc

from agentloop.services.agent import instructions
from agentloop.services.tools import ClientTool, default_tools
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from bench.processes import stop

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
#: Words in a row shared with the instructions that count as repeating them.
ECHO_WORDS = 6
PLACEHOLDER = re.compile(r"<[a-z][^<>\n]{0,40}>")

ORDERS = {"A-1042": "order A-1042: shipped on 2025-03-02 by DHL, tracking 7731"}
LOOKUP = ClientTool(
    "lookup_order", "Looks up an order by its id and returns its shipping status.",
    {"type": "object", "properties": {"order_id": {"type": "string"}},
     "required": ["order_id"], "additionalProperties": False},
)


@dataclass(frozen=True)
class Goal:
    name: str
    goal: str
    #: Is the final answer right? Gets the answer and the run's observations.
    check: Callable[[str, list[str]], bool]
    tools: tuple[str, ...] = ()
    client_tools: tuple[ClientTool, ...] = ()


def _contains(*needles: str) -> Callable[[str, list[str]], bool]:
    return lambda answer, _: any(needle.lower() in answer.lower() for needle in needles)


def _states_the_time(answer: str, observations: list[str]) -> bool:
    """The answer gives today's date (UTC) and the hour the clock tool reported."""
    today = datetime.now(UTC).date().isoformat()
    hours = {obs[11:13] for obs in observations if re.match(r"\d{4}-\d\d-\d\dT\d\d", obs)}
    return today in answer and (not hours or any(
        re.search(rf"(T|\b){hour}:\d\d", answer) for hour in hours))


GOALS = (
    Goal("multiply", "What is 17*23? Use the calculator.", _contains("391"), ("calculator",)),
    Goal("expression", "What is (128 + 256) * 3? Use the calculator.", _contains("1152", "1,152"),
         ("calculator",)),
    Goal("divide", "I have 1234 apples and share them among 8 people. How many does each "
         "get? Use the calculator.", _contains("154.25"), ("calculator",)),
    Goal("time", "What is the current date and time in UTC?", _states_the_time,
         ("current_time",)),
    Goal("no_tool", "What is the capital of France?", _contains("Paris"),
         ("calculator", "current_time")),
    Goal("client_lookup", "When was order A-1042 shipped?", _contains("2025-03-02", "March 2"),
         (), (LOOKUP,)),
)

#: Each goal runs under each of these request `system` texts. One greedy run per goal
#: swings with any change of the prompt's wording; three give the share more footing.
SYSTEMS = ("", "You work at the help desk of ACME Corp.", "Be brief.")


@dataclass
class Outcome:
    name: str
    system: str
    correct: bool
    stop_reason: str
    steps: int
    seconds: float
    answer: str
    thoughts: list[str] = field(default_factory=list)
    tools_called: list[str] = field(default_factory=list)
    echoes: list[str] = field(default_factory=list)
    #: Why steps failed (not JSON, cut off at max_tokens, ...), for RunAgent goals.
    errors: list[str] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def echoes(texts: list[str], instruction_text: str, goal: str = "") -> list[str]:
    """Pieces of `texts` that copy a placeholder, ECHO_WORDS words of the instructions, or a
    value of their worked examples (the example tool's name, its arguments, the example's
    answer) that the goal itself does not contain."""
    words = re.findall(r"\w+", instruction_text.lower())
    grams = {tuple(words[i:i + ECHO_WORDS]) for i in range(len(words) - ECHO_WORDS + 1)}
    values = [value.lower() for value in example_values(instruction_text)
              if value.lower() not in goal.lower()]
    found = []
    for text in texts:
        found += PLACEHOLDER.findall(text)
        said = re.findall(r"\w+", text.lower())
        found += [" ".join(said[i:i + ECHO_WORDS]) for i in range(len(said) - ECHO_WORDS + 1)
                  if tuple(said[i:i + ECHO_WORDS]) in grams][:1]
        found += [value for value in values if value in text.lower()]
    return found


def example_values(instruction_text: str) -> list[str]:
    """Every string in the worked examples' replies (`Assistant: {...}` lines)."""
    values: list[str] = []

    def collect(value: object) -> None:
        if isinstance(value, str):
            values.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    for line in instruction_text.splitlines():
        if line.startswith("Assistant: {"):
            collect(json.loads(line.removeprefix("Assistant: ")))
    return values


def instructions_for(goal: Goal, system: str) -> str:
    registry = default_tools()
    tools = [registry[name] for name in goal.tools or registry.names]
    return instructions([*goal.client_tools, *tools], system)


def run_goal(stub: pb_grpc.AgentLoopServiceStub, goal: Goal, system: str,
             options: pb.GenerationOptions, timeout: float) -> Outcome:
    started = time.monotonic()
    errors: list[str] = []
    if goal.client_tools:
        answer, stop_reason, steps, thoughts, tools, observations = _stream_run(
            stub, goal, system, options, timeout, errors)
    else:
        reply = stub.RunAgent(pb.RunAgentRequest(goal=goal.goal, system=system, tools=goal.tools,
                                                 max_steps=4, options=options), timeout=timeout)
        answer, steps = reply.final_answer, len(reply.steps)
        stop_reason = pb.AgentStopReason.Name(reply.stop_reason)
        thoughts = [step.thought for step in reply.steps]
        tools = [f"{step.tool} {step.arguments_json}" for step in reply.steps if step.tool]
        observations = [step.observation for step in reply.steps if step.tool]
        errors += [step.error for step in reply.steps if step.error]
    seconds = time.monotonic() - started
    return Outcome(
        name=goal.name, system=system,
        correct=stop_reason.endswith("FINAL_ANSWER") and goal.check(answer, observations),
        stop_reason=stop_reason.removeprefix("AGENT_STOP_REASON_"),
        steps=steps, seconds=seconds, answer=answer, thoughts=thoughts, tools_called=tools,
        echoes=echoes([answer, *thoughts], instructions_for(goal, system), goal.goal),
        errors=errors,
    )


def _stream_run(stub: pb_grpc.AgentLoopServiceStub, goal: Goal, system: str,
                options: pb.GenerationOptions, timeout: float, errors: list[str]
                ) -> tuple[str, str, int, list[str], list[str], list[str]]:
    """StreamRunAgent, answering the client tool's calls from ORDERS."""
    import queue

    outbox: queue.Queue[pb.StreamRunAgentRequest | None] = queue.Queue()
    outbox.put(pb.StreamRunAgentRequest(start=pb.StartAgentRun(
        goal=goal.goal, system=system, tools=goal.tools, max_steps=4, options=options,
        client_tools=[pb.ClientTool(name=t.name, description=t.description,
                                    parameters_json_schema=json.dumps(t.parameters))
                      for t in goal.client_tools],
    )))
    thoughts: list[str] = []
    tools: list[str] = []
    observations: list[str] = []
    call = stub.StreamRunAgent(iter(outbox.get, None), timeout=timeout)
    try:
        for event in call:
            kind = event.WhichOneof("event")
            if kind == "thought":
                thoughts.append(event.thought.thought)
            elif kind == "tool_call":
                tools.append(f"{event.tool_call.tool} {event.tool_call.arguments_json}")
                if event.tool_call.client_tool:
                    order = json.loads(event.tool_call.arguments_json).get("order_id", "")
                    found = ORDERS.get(str(order).strip())
                    result = pb.ClientToolResult(call_id=event.tool_call.call_id)
                    if found is None:
                        result.error = f"no order has id {order!r}"
                    else:
                        result.output = found
                    outbox.put(pb.StreamRunAgentRequest(tool_result=result))
            elif kind == "tool_result":
                observations.append(event.tool_result.observation)
                if event.tool_result.is_error:
                    errors.append(event.tool_result.observation)
            elif kind == "finished":
                done = event.finished
                return (done.final_answer, pb.AgentStopReason.Name(done.stop_reason), done.steps,
                        thoughts, tools, observations)
    finally:
        outbox.put(None)
        call.cancel()
    raise RuntimeError("StreamRunAgent ended without a finished event")


@contextmanager
def embedded_gateway(gguf: str) -> Iterator[str]:
    """`agentloop serve` on the embedded engine; yields its address once it serves."""
    argv = [str(BIN / "agentloop"), "serve", "--listen", "127.0.0.1:0", "--backend", "embedded",
            "--log-level", "warning", "--drain-delay", "0", "--shutdown-grace", "1",
            "--metrics-listen", "", "--max-connection-age", "0"]
    if gguf:
        argv += ["--gguf", gguf]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("agentloop serving on "):
            raise RuntimeError(f"the gateway did not start: {line!r}")
        yield line.split()[3]
    finally:
        stop(proc)


def report(outcomes: list[Outcome]) -> str:
    rows = ["| goal | system | correct | stop | steps | s/step | tool calls | answer | echoes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        answer = o.answer.replace("|", "/").replace("\n", " ")[:60]
        rows.append(f"| {o.name} | {o.system or '(none)'} | {'yes' if o.correct else 'no'} "
                    f"| {o.stop_reason} | {o.steps} "
                    f"| {o.seconds_per_step:.1f} | {len(o.tools_called)} "
                    f"| {answer} | {len(o.echoes)} |")
    correct = sum(o.correct for o in outcomes)
    steps = sum(o.steps for o in outcomes)
    per_step = statistics.median(o.seconds_per_step for o in outcomes)
    echoing = sum(bool(o.echoes) for o in outcomes)
    rows += ["", f"answered correctly: {correct}/{len(outcomes)} "
                 f"({100 * correct / len(outcomes):.0f}%); steps: {steps} in all "
                 f"({steps / len(outcomes):.1f} per goal); time per step: median "
                 f"{per_step:.1f}s; runs repeating instructions or placeholders: {echoing}"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="max_tokens of each model call")
    parser.add_argument("--gguf", default="", help="model file (default: the packaged one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per goal")
    parser.add_argument("--only", action="append", default=[], help="run only this goal")
    parser.add_argument("--out", default=str(RESULTS / "agent_suite.json"))
    args = parser.parse_args(argv)
    options = pb.GenerationOptions(temperature=0.0, max_tokens=args.max_tokens, seed=1)
    goals = [g for g in GOALS if not args.only or g.name in args.only]
    with embedded_gateway(args.gguf) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.AgentLoopServiceStub(channel)
        outcomes = []
        for system, goal in ((system, goal) for system in SYSTEMS for goal in goals):
            outcome = run_goal(stub, goal, system, options, args.timeout)
            print(f"{goal.name} [{system or 'no system'}]: "
                  f"{'correct' if outcome.correct else 'wrong'} "
                  f"({outcome.stop_reason}, {outcome.steps} steps) {outcome.answer[:80]!r}",
                  file=sys.stderr, flush=True)
            outcomes.append(outcome)
    table = report(outcomes)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(
        {"outcomes": [asdict(o) for o in outcomes], "report": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
