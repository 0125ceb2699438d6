"""`agentloop serve` as a real process: grpcurl through reflection, SIGTERM drains it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from fake_ollama import FakeOllama, Script
from helpers import read_to_end

BIN = Path(sys.executable).parent
SERVICE = "agentloop.v1.AgentLoopService"


async def start_serve(*args: str, env: dict[str, str] | None = None
                      ) -> tuple[asyncio.subprocess.Process, str]:
    """Start `agentloop serve` on port 0 and read its address from the ready banner."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "agentloop"), "serve", "--listen", "127.0.0.1:0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    assert line.startswith("agentloop serving on "), line
    return proc, line.split()[3]


async def grpcurl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "grpcurl"), "-plaintext", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run an `agentloop` client command without blocking the event loop."""
    return await asyncio.to_thread(
        subprocess.run, [str(BIN / "agentloop"), *args], capture_output=True, text=True,
        timeout=30)


async def stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 30)


async def test_grpcurl_lists_through_reflection_and_calls_generate(fake_ollama: FakeOllama):
    fake_ollama.default_script = Script(tokens=["Hi", " there"])
    proc, address = await start_serve("--backend", "ollama", "--ollama-url", fake_ollama.url,
                                      "--drain-delay", "0")
    try:
        services = (await grpcurl(address, "list")).split()
        assert SERVICE in services and "grpc.health.v1.Health" in services
        reply = json.loads(await grpcurl("-d", '{"prompt":"hi"}', address, f"{SERVICE}/Generate"))
        assert reply["text"] == "Hi there", reply
        assert reply["usage"]["output_tokens"] == "2", reply
        stream = await grpcurl("-d", '{"prompt":"hi"}', address, f"{SERVICE}/StreamGenerate")
        assert '"text": "Hi"' in stream and '"text": " there"' in stream
        health = json.loads(await grpcurl("-d", '{"service":"readiness"}', address,
                                          "grpc.health.v1.Health/Check"))
        assert health["status"] == "SERVING"
        health_cli = await run_cli("health", "--address", address)
        assert health_cli.returncode == 0 and health_cli.stdout.strip() == "SERVING"
    finally:
        code = await stop(proc)
    assert code == 0


async def test_health_cli_exits_nonzero_when_not_serving(fake_ollama: FakeOllama):
    # No banner while NOT_SERVING: listen on a known free port and wait for liveness.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "agentloop"), "serve", "--listen", address, "--backend", "ollama",
        "--ollama-url", fake_ollama.url, "--model", "absent:1b", "--drain-delay", "0",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(300):
            live = await run_cli("health", "--address", address, "--service", "liveness",
                                 "--timeout", "1")
            if live.returncode == 0:
                break
        assert live.returncode == 0, live.stderr
        result = await run_cli("health", "--address", address)
        assert result.returncode == 1 and result.stdout.strip() == "NOT_SERVING"
    finally:
        await stop(proc)
    nobody = await run_cli("health", "--address", address, "--timeout", "0.5")
    assert nobody.returncode == 1 and "UNAVAILABLE" in nobody.stderr
    assert "Traceback" not in nobody.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_a_stream_in_flight(fake_ollama: FakeOllama, sig):
    tokens = [f"t{i} " for i in range(15)]
    fake_ollama.enqueue(Script(tokens=tokens, token_delay=0.05))
    proc, address = await start_serve("--backend", "ollama", "--ollama-url", fake_ollama.url,
                                      "--drain-delay", "0.2", "--shutdown-grace", "10")
    try:
        import grpc

        from agentloop.v1 import agentloop_pb2 as pb
        from agentloop.v1 import agentloop_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.AgentLoopServiceStub(channel).StreamGenerate(
                pb.StreamGenerateRequest(prompt="hi"), timeout=20)
            first = await call.read()
            proc.send_signal(sig)
            rest = await read_to_end(call)
        assert first.text + "".join(r.text for r in rest) == "".join(tokens)
    finally:
        code = await stop(proc)
    assert code == 0


async def test_sighup_reloads_the_keys_file(fake_ollama: FakeOllama, tmp_path: Path):
    import grpc

    from agentloop.v1 import agentloop_pb2 as pb
    from agentloop.v1 import agentloop_pb2_grpc as pb_grpc

    keys = tmp_path / "keys"
    keys.write_text("old-key\n")
    proc, address = await start_serve("--backend", "ollama", "--ollama-url", fake_ollama.url,
                                      "--drain-delay", "0", "--api-keys-file", str(keys),
                                      "--api-keys-reload-interval", "0")  # SIGHUP only
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.AgentLoopServiceStub(channel)

            async def accepted(key: str) -> bool:
                try:
                    await stub.ListModels(pb.ListModelsRequest(), timeout=5,
                                          metadata=(("authorization", f"Bearer {key}"),))
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                    return False
                return True

            assert await accepted("old-key") and not await accepted("new-key")
            keys.write_text("tenants:\n  team:\n    keys: [new-key]\n")
            assert not await accepted("new-key"), "no reload without the signal"
            proc.send_signal(signal.SIGHUP)
            for _ in range(500):  # the signal is handled on the server's loop: poll
                if await accepted("new-key"):
                    break
            assert await accepted("new-key") and not await accepted("old-key")
    finally:
        code = await stop(proc)
    assert code == 0


async def test_one_flag_opens_the_http_door(fake_ollama: FakeOllama):
    fake_ollama.default_script = Script(tokens=["Hi", " there"])
    proc, _ = await start_serve("--backend", "ollama", "--ollama-url", fake_ollama.url,
                                "--drain-delay", "0", "--http-listen", "127.0.0.1:0")
    try:
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 10)  # the banner's grpcurl line
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert line.strip().startswith("OpenAI-compatible API: http://127.0.0.1:"), line
        async with openai.AsyncOpenAI(base_url=line.split()[-1], api_key="unused",
                                      max_retries=0) as client:
            reply = await client.chat.completions.create(
                model="gemma3n:e2b", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "Hi there"
    finally:
        code = await stop(proc)
    assert code == 0
