"""The `agentloop` client commands (generate, agent, models, health) as real processes against
a real gateway with the fake Ollama behind it."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sys
from pathlib import Path
from typing import Any

from fake_ollama import Script
from helpers import TOKENS

AGENTLOOP = str(Path(sys.executable).parent / "agentloop")


async def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
              stderr: int | None = asyncio.subprocess.PIPE) -> tuple[int, str, str]:
    """Run `agentloop ARGS` while the gateway keeps serving on this event loop."""
    proc = await asyncio.create_subprocess_exec(
        AGENTLOOP, *args, env={**os.environ, "AGENTLOOP_ADDRESS": "", **(env or {})},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr)
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), (err or b"").decode()


def action(**fields: Any) -> Script:
    text = json.dumps(fields)
    return Script(tokens=[text[i:i + 7] for i in range(0, len(text), 7)])


# --- generate -----------------------------------------------------------------------------


async def test_generate_prints_the_text_and_passes_options(gateway, fake_ollama):
    code, out, err = await cli(
        "generate", "Say hi", "--address", gateway.address, "--max-tokens", "3",
        "--temperature", "0", "--stop", "\n", "--stop", "END", "--system", "Be brief.",
        "--format", "json", "--seed", "7")
    assert (code, out, err) == (0, "Hello, world\n", "")
    body = fake_ollama.generation_requests[-1]
    assert body["prompt"] == "Say hi" and body["system"] == "Be brief."
    assert body["format"] == "json"
    options = body["options"]
    assert options["num_predict"] == 3 and options["temperature"] == 0
    assert options["stop"] == ["\n", "END"] and options["seed"] == 7


async def test_generate_reads_the_prompt_from_stdin_and_prints_json_lines(gateway, fake_ollama):
    code, out, _ = await cli("generate", "-", "--json", stdin="from stdin\n",
                             env={"AGENTLOOP_ADDRESS": gateway.address})
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line.get("text", "") for line in lines] == [*TOKENS, ""]
    assert lines[-1]["finish_reason"] == "FINISH_REASON_STOP"
    assert lines[-1]["usage"]["output_tokens"] == str(len(TOKENS))
    assert fake_ollama.generation_requests[-1]["prompt"] == "from stdin\n"


async def test_generate_with_a_json_schema_from_a_file(gateway, fake_ollama, tmp_path):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    code, _, err = await cli("generate", "hi", "--address", gateway.address,
                             "--format", f"@{tmp_path / 'schema.json'}")
    assert code == 0, err
    assert fake_ollama.generation_requests[-1]["format"] == schema


async def test_generate_with_tools_prints_the_calls(gateway, fake_ollama, tmp_path):
    fake_ollama.capabilities[fake_ollama.models[0]] = ["completion", "tools"]
    fake_ollama.enqueue(Script(tokens=[], tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Paris"}}]))
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    (tmp_path / "weather.json").write_text(json.dumps(schema))
    code, out, err = await cli("generate", "Weather in Paris?", "--address", gateway.address,
                               "--tool", f"get_weather=@{tmp_path / 'weather.json'}",
                               "--tool", "get_time")
    assert code == 0, err
    [line] = [line for line in out.splitlines() if line]
    assert line.startswith("tool call call_") and line.endswith(' get_weather {"city":"Paris"}')
    body = fake_ollama.generation_requests[-1]
    assert body["messages"] == [{"role": "user", "content": "Weather in Paris?"}]
    assert [t["function"]["parameters"] for t in body["tools"]] == [schema, {"type": "object"}]
    code, _, err = await cli("generate", "hi", "--address", gateway.address, "--tool", "a",
                             "--tool-choice", "b")
    assert code == 1 and err.startswith("agentloop: INVALID_ARGUMENT: tool_choice.name")


async def test_bad_input_is_one_line_naming_the_field(gateway):
    code, out, err = await cli("generate", "hi", "--address", gateway.address, "--top-p", "3")
    assert code == 1 and out == ""
    assert err == "agentloop: INVALID_ARGUMENT: options.top_p: must be in [0, 1]\n"


async def test_backend_errors_carry_the_code_and_the_retry_delay(gateway, fake_ollama):
    fake_ollama.enqueue(Script(status=503))
    code, _, err = await cli("generate", "hi", "--address", gateway.address)
    assert code == 1
    assert err == "agentloop: RESOURCE_EXHAUSTED: the backend is busy; try again (retry in 1s)\n"


async def test_an_unreachable_server_says_so(gateway):
    address = gateway.address
    await gateway.shutdown(grace=0, drain_delay=0)
    for command in (["generate", "hi"], ["agent", "goal"], ["models"], ["health"]):
        code, _, err = await cli(*command, "--address", address, "--timeout", "5")
        assert code == 1, command
        assert err.startswith(f"agentloop: cannot reach a server at {address} (UNAVAILABLE")
        assert len(err.splitlines()) == 1 and "Traceback" not in err


async def test_a_passed_deadline_is_one_line(gateway, fake_ollama):
    fake_ollama.enqueue(Script(hang_before_headers=True))
    code, _, err = await cli("generate", "hi", "--address", gateway.address, "--timeout", "0.3")
    assert (code, err) == (1, "agentloop: DEADLINE_EXCEEDED: Deadline Exceeded\n")


async def test_a_terminal_sees_progress_until_the_first_token(gateway, fake_ollama):
    fake_ollama.enqueue(Script(tokens=TOKENS, first_token_delay=0.6))
    controller, terminal = pty.openpty()
    try:
        code, out, _ = await cli("generate", "hi", "--address", gateway.address,
                                 stderr=terminal)
        os.close(terminal)
        terminal = -1
        screen = _read_all(controller)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert code == 0 and out == "Hello, world!\n"
    assert "waiting for the first token..." in screen
    assert "\r\x1b[K" in screen  # the spinner erased itself before the text
    assert "[STOP, 4 tokens in" in screen  # the summary line


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the terminal side is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


# --- agent --------------------------------------------------------------------------------


async def test_agent_shows_each_step_and_the_answer(gateway, fake_ollama):
    fake_ollama.enqueue(
        action(thought="Multiply.", tool="calculator", arguments={"expression": "17*23"}),
        action(thought="Done.", final_answer="391"),
    )
    code, out, err = await cli("agent", "What is 17*23?", "--address", gateway.address,
                               "--tool", "calculator", "--max-steps", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:5] == [
        "step 1",
        "  thought: Multiply.",
        '  call: calculator {"expression": "17*23"}',
        lines[3],
        "step 2",
    ]
    assert lines[3].startswith("  result: 391 (")
    assert lines[5:7] == ["  thought: Done.", "answer: 391"]
    assert lines[7].startswith("[FINAL_ANSWER, 2 steps,")


async def test_agent_json_lines_and_a_run_without_answer_exits_1(gateway, fake_ollama):
    fake_ollama.enqueue(
        action(thought="Again.", tool="calculator", arguments={"expression": "1+1"}))
    code, out, _ = await cli("agent", "-", "--json", "--max-steps", "1",
                             "--address", gateway.address, stdin="loop forever")
    assert code == 1
    events = [json.loads(line) for line in out.splitlines()]
    assert [next(iter(e)) for e in events] == [
        "step_started", "thought", "tool_call", "tool_result", "finished"]
    assert events[-1]["finished"]["stop_reason"] == "AGENT_STOP_REASON_MAX_STEPS"


# --- models and health --------------------------------------------------------------------


async def test_models_prints_a_table_and_json(gateway):
    # Nothing generated yet: the fake has the model on disk, not loaded.
    code, out, _ = await cli("models", "--address", gateway.address)
    assert code == 0
    header, row, footer = out.splitlines()
    assert header.split() == ["NAME", "SIZE", "LOADED", "FAMILY", "PARAMETERS", "QUANTIZATION",
                              "EMBEDS"]
    assert row.split() == ["gemma3n:e2b", "*", "5.6", "GB", "no", "gemma3n", "4.5B", "Q4_K_M",
                           "no"]
    assert footer.startswith("backend ollama;")
    code, out, _ = await cli("models", "--json", "--address", gateway.address)
    reply = json.loads(out)
    assert reply["default_model"] == "gemma3n:e2b" and reply["backend"] == "ollama"
    assert [m["name"] for m in reply["models"]] == ["gemma3n:e2b"]


# --- embed and tokens ---------------------------------------------------------------------


async def test_embed_prints_one_vector_per_line_in_order(gateway, fake_ollama):
    code, out, err = await cli("embed", "a cat", "a dog", "--dimensions", "4", "--truncate",
                               "--address", gateway.address)
    assert (code, err) == (0, "")
    vectors = [json.loads(line) for line in out.splitlines()]
    assert [len(vector) for vector in vectors] == [4, 4] and vectors[0] != vectors[1]
    body = fake_ollama.embed_requests[-1]
    assert body["input"] == ["a cat", "a dog"] and body["dimensions"] == 4 and body["truncate"]
    code, out, _ = await cli("embed", "-", "--json", "--address", gateway.address,
                             stdin="first line\n\nsecond\n")
    reply = json.loads(out)
    assert code == 0 and len(reply["embeddings"]) == 2 and reply["usage"]["input_tokens"] == "3"
    assert fake_ollama.embed_requests[-1]["input"] == ["first line", "second"]


async def test_embed_and_tokens_failures_are_one_line(gateway):
    code, out, err = await cli("embed", "ok", " ", "--address", gateway.address)
    assert (code, out) == (1, "")
    assert err == "agentloop: INVALID_ARGUMENT: texts[1]: must not be empty\n"
    code, out, err = await cli("tokens", "a cat", "--address", gateway.address)
    assert (code, out) == (1, "")
    assert err.startswith("agentloop: UNIMPLEMENTED: the Ollama backend cannot count tokens")
    code, _, err = await cli("tokens", "--message", "nobody:hi", "--address", gateway.address)
    assert code == 2 and "ROLE:TEXT" in err


async def test_health_reads_the_address_from_the_environment(gateway):
    code, out, _ = await cli("health", env={"AGENTLOOP_ADDRESS": gateway.address})
    assert (code, out) == (0, "SERVING\n")


async def test_an_unknown_health_service_names_the_ones_there_are(gateway):
    code, out, err = await cli("health", "--service", "bogus", "--address", gateway.address)
    assert (code, out) == (1, "")
    assert err == ("agentloop: NOT_FOUND: no health service named 'bogus'; this server has '' "
                   "(the whole server), agentloop.v1.AgentLoopService, liveness, readiness\n")
