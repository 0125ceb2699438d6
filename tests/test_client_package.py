"""The client as its own distribution: it installs alone (grpcio, grpcio-status and protobuf,
nothing of the server) and calls a real server; its names mean what the server's mean."""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import agentloop.errors as server_errors
import agentloop_client.errors as client_errors
from agentloop.config import MAX_MESSAGE_BYTES, Settings
from agentloop.health import READINESS, SERVICE_NAME
from agentloop.rpc.transport import request_message_cap
from agentloop_client import channel, pb
from helpers import TOKENS

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "clients/python"

CALL = """
import importlib.util, json, sys
from agentloop_client import AgentLoopClient, InvalidArgument
with AgentLoopClient(sys.argv[1]) as client:
    reply = client.generate("hi")
    try:
        client.generate("hi", options={"top_p": 2})
        error = None
    except InvalidArgument as exc:
        error = exc.field_violations
    print(json.dumps({
        "text": reply.text, "health": client.health("readiness"), "error": error,
        "present": [name for name in ("agentloop", "grpc_health", "opentelemetry", "httpx")
                   if importlib.util.find_spec(name) is not None],
    }))
"""


@pytest.mark.timeout(600)
async def test_the_client_installs_alone_and_calls_a_real_server(gateway, tmp_path: Path):
    # A copy: building the wheel writes build/ next to the sources.
    source = shutil.copytree(CLIENT, tmp_path / "client",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)  # pip runs from outside (--python): quicker
    python = env / "bin/python"
    install = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--disable-pip-version-check", str(source)],
        capture_output=True, text=True, timeout=540)
    assert install.returncode == 0, install.stdout + install.stderr
    call = await asyncio.to_thread(
        subprocess.run, [str(python), "-c", CALL, gateway.address],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={"PATH": "/usr/bin"})
    assert call.returncode == 0, call.stderr
    result = json.loads(call.stdout)
    assert result["text"] == "".join(TOKENS) and result["health"] == "SERVING"
    assert "options.top_p" in result["error"]
    assert result["present"] == []  # neither the server nor its dependencies came along


def test_error_classes_of_the_same_name_mean_the_same_status() -> None:
    """A server error named X reaches the caller as the client's X (and AgentLoopError is
    the base on both sides)."""
    shared = {name for name, kind in inspect.getmembers(server_errors, inspect.isclass)
              if issubclass(kind, server_errors.AgentLoopError)} & set(dir(client_errors))
    assert {"AgentLoopError", "InvalidArgument", "ResourceExhausted", "DeadlineExceeded",
            "Cancelled", "Unauthenticated"} <= shared
    for name in shared - {"AgentLoopError"}:
        server_code = getattr(server_errors, name).code
        assert client_errors.error_class(server_code) is getattr(client_errors, name), name


def test_the_client_spells_the_servers_names_alike() -> None:
    """The client cannot import the server: its copies of the shared names must agree."""
    assert channel.SERVICE == SERVICE_NAME == pb.DESCRIPTOR.services_by_name[
        "AgentLoopService"].full_name
    assert channel.READINESS == READINESS
    assert channel.MAX_MESSAGE_BYTES == MAX_MESSAGE_BYTES
    # The server's default receive cap is what its limits allow: a client may send it all.
    assert request_message_cap(Settings()) <= MAX_MESSAGE_BYTES
