"""What a newcomer and an operator meet first: long calls survive connection age and
keepalive, agent runs are never repeated by client retries, per-engine defaults, a quiet
log and a banner that waits for readiness, and the command line's first contact (port in
use, --version, flag suggestions, `make run`'s progress), and timings that add up."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from agentloop.cli import _describe_error as describe_error
from agentloop.config import Settings, load_settings
from agentloop.domain import Timings
from agentloop.rpc.responses import within_total
from agentloop.server import server_options, with_engine_defaults
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from agentloop_client import AsyncAgentLoopClient, Unavailable
from agentloop_client.channel import DEFAULT_KEEPALIVE
from fake_ollama import FakeOllama, Script
from helpers import TOKENS, client_stub, gateway_settings, running_gateway

ROOT = Path(__file__).resolve().parents[1]
AGENTLOOP = str(Path(sys.executable).parent / "agentloop")


# --- 1. connection age never cuts a call in flight -------------------------------------------

def test_connection_age_grace_is_unlimited_by_default() -> None:
    options = dict(server_options(load_settings(environ={})))
    assert options["grpc.max_connection_age_ms"] == 300_000
    # Unset = gRPC's unlimited grace: after GOAWAY the connection only stops taking calls.
    assert "grpc.max_connection_age_grace_ms" not in options
    limited = dict(server_options(load_settings(environ={}, max_connection_age_grace=5.0)))
    assert limited["grpc.max_connection_age_grace_ms"] == 5000


async def test_a_call_longer_than_the_connection_age_completes(fake_ollama: FakeOllama):
    tokens = [f"t{i} " for i in range(6)]
    fake_ollama.enqueue(Script(tokens=tokens, token_delay=0.25))  # 1.5 s, 5x the age
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, max_connection_age=0.3)
    async with running_gateway(settings) as gateway, \
            grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.AgentLoopServiceStub(channel)
        call = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=30)
        texts = [reply.text async for reply in call]
        assert "".join(texts) == "".join(tokens)
        # The channel follows the GOAWAY to a new connection for the next call.
        reply = await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=30)
        assert reply.text == "".join(TOKENS)


# --- 2. retries never repeat an agent run; keepalive within the server's ping policy ---------

class FailingServicer(pb_grpc.AgentLoopServiceServicer):
    """Answers every call with UNAVAILABLE after counting it (a replica dying mid-call)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def _fail(self, name: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")

    async def Generate(self, request, context):
        await self._fail("Generate", context)

    async def RunAgent(self, request, context):
        await self._fail("RunAgent", context)

    async def StreamRunAgent(self, request_iterator, context):
        await self._fail("StreamRunAgent", context)
        yield pb.StreamRunAgentResponse()  # pragma: no cover (aborted above)


@asynccontextmanager
async def failing_server() -> AsyncIterator[tuple[str, FailingServicer]]:
    servicer = FailingServicer()
    server = grpc.aio.server()
    pb_grpc.add_AgentLoopServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


async def _fail_each(client: AsyncAgentLoopClient) -> None:
    with pytest.raises(Unavailable):
        await client.generate("hi")
    with pytest.raises(Unavailable):
        await client.run_agent("goal")
    with pytest.raises(Unavailable):
        async for _ in client.stream_run_agent("goal"):
            pass


async def test_agent_runs_are_never_retried_unless_the_caller_opts_in():
    async with failing_server() as (address, servicer):
        async with AsyncAgentLoopClient(address, retries=3) as client:
            await _fail_each(client)
        assert servicer.calls == {"Generate": 3, "RunAgent": 1, "StreamRunAgent": 1}
        servicer.calls.clear()
        async with AsyncAgentLoopClient(address, retries=3, retry_agent_runs=True) as client:
            await _fail_each(client)
        assert servicer.calls == {"Generate": 3, "RunAgent": 3, "StreamRunAgent": 3}


def test_client_keepalive_stays_within_the_servers_ping_policy() -> None:
    assert DEFAULT_KEEPALIVE >= Settings().min_ping_interval
    options = dict(server_options(Settings()))
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == (
        Settings().min_ping_interval * 1000)
    assert options["grpc.keepalive_permit_without_calls"] == 1


async def test_a_call_silent_longer_than_the_ping_interval_survives(fake_ollama: FakeOllama):
    """Tiny intervals: a client pinging every 0.1 s (gRPC sends at most about one a
    second) through a call that sends nothing for 5 s."""
    fake_ollama.default_script = Script(tokens=TOKENS, first_token_delay=5)
    settings = gateway_settings(ollama_url=fake_ollama.url, min_ping_interval=0.05)
    async with running_gateway(settings) as gateway, \
            AsyncAgentLoopClient(gateway.address, keepalive=0.1) as client:
        reply = await client.generate("hi", timeout=30)
        assert reply.text == "".join(TOKENS)
    # The control: the same client against gRPC's default policy (one ping per 5 minutes)
    # loses the call, and the CLI's message names the cause.
    settings = gateway_settings(ollama_url=fake_ollama.url, min_ping_interval=300)
    async with running_gateway(settings) as gateway, \
            AsyncAgentLoopClient(gateway.address, keepalive=0.1, retries=1) as client:
        with pytest.raises(Unavailable) as failure:
            await client.generate("hi", timeout=30)
    message = describe_error(failure.value, gateway.address)
    assert message.startswith(f"the server at {gateway.address} closed the connection because "
                              "this client sent keepalive pings more often than the server's "
                              "--min-ping-interval allows"), message


async def test_the_cli_names_a_connection_closed_under_the_call(fake_ollama: FakeOllama):
    # Every attempt (StreamGenerate is retried) outlasts the grace: the server cuts each.
    fake_ollama.default_script = Script(tokens=TOKENS, first_token_delay=3)
    settings = gateway_settings(ollama_url=fake_ollama.url, max_connection_age=0.2,
                                max_connection_age_grace=0.2)
    async with running_gateway(settings) as gateway:
        result = await asyncio.to_thread(
            subprocess.run, [AGENTLOOP, "generate", "hi", "--address", gateway.address],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"agentloop: the connection to the server at {gateway.address} was closed during "
        "the call (UNAVAILABLE: "), result.stderr
    assert len(result.stderr.splitlines()) == 1


# --- 3. defaults per engine ------------------------------------------------------------------

async def test_unset_max_tokens_takes_the_engines_default(fake_ollama: FakeOllama):
    from agentloop.backends.embedded import EmbeddedBackend
    from agentloop.backends.ollama import OllamaBackend

    assert EmbeddedBackend.default_max_tokens == 256
    assert OllamaBackend.default_max_tokens == 2048
    settings = load_settings(environ={})
    assert settings.max_tokens == 0
    assert with_engine_defaults(settings, EmbeddedBackend(settings)).max_tokens == 256
    assert with_engine_defaults(load_settings(environ={}, max_tokens=64),
                                EmbeddedBackend(settings)).max_tokens == 64
    fake_ollama.default_script = Script(tokens=TOKENS)
    async with running_gateway(gateway_settings(ollama_url=fake_ollama.url)) as gateway, \
            AsyncAgentLoopClient(gateway.address) as client:
        await client.generate("hi")
        await client.generate("hi", options={"max_tokens": 7})
    assert [r["options"]["num_predict"] for r in fake_ollama.generation_requests] == [2048, 7]


# --- 4 and 5. `agentloop serve`: the log, the banner, first contact ---------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _agentloop(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [AGENTLOOP, *args], capture_output=True,
                                   text=True, timeout=60)


def _path_without_the_venv() -> str:
    """PATH without this venv's commands: `make run` calls .venv/bin/agentloop by path."""
    venv = Path(AGENTLOOP).parent.resolve()
    return os.pathsep.join(entry for entry in os.environ.get("PATH", "").split(os.pathsep)
                           if entry and Path(entry).resolve() != venv)


async def test_banner_waits_for_readiness_and_the_log_stays_quiet(fake_ollama: FakeOllama):
    fake_ollama.models = ["other:1b"]  # the default model is missing: NOT_SERVING
    fake_ollama.default_script = Script(tokens=TOKENS)
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PATH": _path_without_the_venv()}  # as `make run` serves
    proc = await asyncio.create_subprocess_exec(
        AGENTLOOP, "serve", "--listen", address, "--ollama-url", fake_ollama.url,
        "--model", "absent:1b", "--health-interval", "0.05", "--drain-delay", "0",
        "--metrics-listen", "", "--warm-up", "false", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        banner = asyncio.ensure_future(proc.stdout.readline())
        for _ in range(200):  # up and answering, but not ready
            live = await _agentloop("health", "--address", address, "--service", "liveness")
            if live.returncode == 0:
                break
        assert (await _agentloop("health", "--address", address)).stdout == "NOT_SERVING\n"
        await asyncio.wait({banner}, timeout=0.5)
        assert not banner.done(), "the banner appeared while readiness was NOT_SERVING"
        fake_ollama.models.append("absent:1b")
        line = (await asyncio.wait_for(banner, 30)).decode()
        assert line.startswith(f"agentloop serving on {address} "), line
        # The banner's command runs as printed in a shell like the server's.
        command = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert command.startswith("try: "), command
        tried = await asyncio.to_thread(
            subprocess.run, ["bash", "-c", command.removeprefix("try: ")], env=env,
            capture_output=True, text=True, timeout=60)
        assert tried.returncode == 0, f"{command}\n{tried.stderr}"
        assert '"text": "Hello"' in tried.stdout, tried.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    log = err.decode()
    assert '"logger": "httpx"' not in log and '"logger": "httpcore"' not in log, log[:2000]
    engine = [line for line in log.splitlines() if '"message": "engine ' in line]
    assert len(engine) == 1, log[:2000]
    assert (f"engine ollama at {fake_ollama.url} (--backend auto: Ollama answers there)"
            in engine[0])


async def test_a_port_in_use_is_one_line_before_loading_anything(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        # The model file does not exist either: the port is checked first.
        result = await _agentloop("serve", "--listen", address, "--backend", "embedded",
                                  "--gguf", str(tmp_path / "missing.gguf"))
    assert result.returncode == 2
    assert result.stderr == (
        f"agentloop: invalid setting: --listen / AGENTLOOP_LISTEN: cannot listen on {address}: "
        "already in use (another server listens there); choose another HOST:PORT\n")


async def test_version_and_suggestions_for_typos():
    version = await _agentloop("--version")
    assert version.returncode == 0 and version.stdout.startswith("agentloop 0."), version
    # The suggestion first, then one short usage line (the whole usage is --help's).
    flag = await _agentloop("generate", "hi", "--temprature", "0")
    assert flag.returncode == 2
    assert flag.stderr.splitlines() == [
        "agentloop generate: error: unrecognized arguments: --temprature 0 (did you mean "
        "--temperature?)",
        "usage: agentloop generate [options] prompt (agentloop generate --help lists them)"]
    flags = await _agentloop("serve", "--listn", "x", "--reflecton", "true")
    assert flags.returncode == 2 and len(flags.stderr.splitlines()) == 2, flags.stderr
    assert flags.stderr.startswith(
        "agentloop serve: error: unrecognized arguments: --listn x --reflecton true (did you "
        "mean --listen for --listn, --reflection for --reflecton?)\n"), flags.stderr
    command = await _agentloop("generat", "hi")
    assert command.returncode == 2 and "did you mean 'generate'?" in command.stderr
    assert len(command.stderr.splitlines()) == 2, command.stderr


async def test_a_bad_value_names_the_flag_and_the_variable():
    for args, env in ((["--reflection", "maybe"], {}), ([], {"AGENTLOOP_REFLECTION": "maybe"})):
        result = await asyncio.to_thread(
            subprocess.run, [AGENTLOOP, "serve", *args], capture_output=True, text=True,
            timeout=60, env={**os.environ, **env})
        assert result.returncode == 2
        assert result.stderr == ("agentloop: invalid setting: --reflection / "
                                 "AGENTLOOP_REFLECTION: expected true or false, got 'maybe'\n")


def test_make_run_shows_the_first_build(tmp_path: Path):
    """A dry run on a fresh venv: the install says what takes long and pip is not quiet."""
    result = subprocess.run(["make", "-n", "run", f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    install = [line for line in result.stdout.splitlines()
               if "pip install" in line and "[dev,embedded]" in line]
    assert install and "--quiet" not in install[0] and "-q " not in install[0]
    assert "llama-cpp-python from source" in result.stdout
    assert os.path.basename(install[0].split()[0]) == "python"


# --- 6. the timings of one call add up ------------------------------------------------------

def _parts_within_total(timings: pb.Timings) -> bool:
    total = timings.total_duration.ToNanoseconds()
    parts = (timings.load_duration, timings.prompt_eval_duration, timings.eval_duration)
    return (sum(part.ToNanoseconds() for part in parts) <= total
            and timings.time_to_first_token.ToNanoseconds() <= total)


async def test_the_parts_of_a_calls_timings_never_exceed_its_total(fake_ollama: FakeOllama):
    # A cached answer replays at once, with the engine's timings of the call that made it.
    fake_ollama.default_script = Script(tokens=TOKENS, first_token_delay=0.2, token_delay=0.1)
    settings = gateway_settings(ollama_url=fake_ollama.url, cache_entries=8)
    request = pb.GenerateRequest(prompt="hi", options=pb.GenerationOptions(temperature=0))
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        first = await stub.Generate(request, timeout=30)
        replayed = await stub.Generate(request, timeout=30)
        streamed = [reply async for reply in stub.StreamGenerate(pb.StreamGenerateRequest(
            prompt="hi", options=pb.GenerationOptions(temperature=0)), timeout=30)]
    assert len(fake_ollama.generation_requests) == 1, "the others came from the cache"
    assert first.timings.eval_duration.ToNanoseconds() > 0
    for timings in (first.timings, replayed.timings, streamed[-1].timings):
        assert _parts_within_total(timings), timings


def test_timings_are_cut_to_the_total_in_the_order_they_happen():
    cut = within_total(Timings(total=1.0, load=0.25, prompt_eval=0.5, eval=0.5,
                               time_to_first_token=2.0))
    assert cut == Timings(total=1.0, load=0.25, prompt_eval=0.5, eval=0.25,
                          time_to_first_token=1.0)
    assert within_total(Timings(total=0.5, load=3.0, eval=1.0)) == Timings(
        total=0.5, load=0.5, eval=0.0)
    kept = Timings(total=2.0, load=0.0, prompt_eval=0.5, eval=1.0, time_to_first_token=0.6)
    assert within_total(kept) == kept
    assert within_total(Timings(eval=3.0)) == Timings(eval=3.0)  # no total: nothing to cut by
