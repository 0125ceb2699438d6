"""MCP servers as tool providers: a real MCP server written with the official SDK
(tests/mcp_tool_server.py) over stdio and over Streamable HTTP on loopback, its tools in
ListTools and in agent runs, their failures as observations, servers that are down, and
sessions closed at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from agentloop.config import SettingsError
from agentloop.services.mcp_tools import load_mcp_servers
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import FakeOllama, Script, wait_until
from helpers import bad_fields, gateway_settings, running_gateway

SERVER_MODULE = str(Path(__file__).with_name("mcp_tool_server.py"))
GOAL = "What is 2 + 3? Use local__add."


def action(**fields: Any) -> Script:
    text = json.dumps(fields)
    return Script(tokens=[text[i:i + 9] for i in range(0, len(text), 9)])


def answer(text: str = "5") -> Script:
    return action(thought="done", final_answer=text)


@contextlib.asynccontextmanager
async def serving_http(port: int = 0) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """tests/mcp_tool_server.py serving Streamable HTTP on 127.0.0.1 (port 0: a free one)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, SERVER_MODULE, "http", str(port), stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("mcp listening on "), line
        yield line.split()[-1], proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@pytest.fixture
async def http_server() -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    async with serving_http() as served:
        yield served


def closed_port_url() -> str:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"


@pytest.fixture
def servers_file(tmp_path: Path, http_server) -> Path:
    url, _ = http_server
    path = tmp_path / "mcp.yaml"
    path.write_text(json.dumps({"servers": {
        "local": {"command": sys.executable, "args": [SERVER_MODULE, "stdio"], "timeout": 1},
        "remote": {"url": url, "refresh": 0.2, "timeout": 5},
        "down": {"url": closed_port_url(), "connect_timeout": 1},
        "crashing": {"command": sys.executable, "args": ["-c", "raise SystemExit(3)"],
                     "connect_timeout": 2},
    }}))
    return path


@pytest.fixture
async def gateway(fake_ollama: FakeOllama, servers_file: Path):
    settings = gateway_settings(ollama_url=fake_ollama.url, mcp_servers=str(servers_file),
                                max_observation_bytes=256, metrics_listen="127.0.0.1:0")
    async with running_gateway(settings) as running:
        by_name = {server.name: server for server in running.mcp.servers}
        for name in ("local", "remote"):
            await asyncio.wait_for(by_name[name].listed.wait(), 30)
        yield running


async def test_list_tools_has_the_builtin_and_the_connected_mcp_tools(stub):
    reply = await stub.ListTools(pb.ListToolsRequest(), timeout=5)
    tools = {tool.name: tool for tool in reply.tools}

    assert [t.name for t in reply.tools[:2]] == ["calculator", "current_time"]
    assert tools["calculator"].provider == "builtin"
    assert json.loads(tools["calculator"].parameters_json_schema)["required"] == ["expression"]
    for server in ("local", "remote"):
        assert {f"{server}__{name}" for name in ("add", "echo", "broken", "sleep")} <= set(tools)
    add = tools["local__add"]
    assert add.provider == "local" and add.description == "Adds two integers."
    schema = json.loads(add.parameters_json_schema)
    assert schema["required"] == ["a", "b"] and schema["properties"]["a"]["type"] == "integer"
    # An MCP server is a third party: a tool whose schema breaks the limits a caller's
    # schema keeps is left out (its maxLength of 100,000 would reach the grammar).
    assert not [name for name in tools if name.endswith("__hostile")]
    # Servers that are down have no tools, and nothing else is affected.
    assert not [name for name in tools if name.startswith(("down__", "crashing__"))]


async def test_an_agent_run_calls_mcp_tools_over_stdio_and_http(stub, fake_ollama):
    fake_ollama.enqueue(
        action(thought="add", tool="local__add", arguments={"a": 2, "b": 3}),
        action(thought="echo", tool="remote__echo", arguments={"text": "ab", "times": 2}),
        answer(),
    )
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL), timeout=30)

    assert reply.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER
    assert [(s.tool, s.observation, s.error) for s in reply.steps[:2]] == [
        ("local__add", "5", ""), ("remote__echo", "abab", "")]
    first = fake_ollama.generation_requests[0]
    assert "local__add: Adds two integers." in first["messages"][0]["content"]
    branches = {branch["properties"]["tool"]["enum"][0]: branch["properties"]["arguments"]
                for branch in first["format"]["anyOf"] if "tool" in branch["properties"]}
    assert branches["local__add"]["required"] == ["a", "b"]  # the server's own schema


async def test_mcp_tool_failures_are_observations(stub, fake_ollama):
    fake_ollama.enqueue(
        action(thought="x", tool="local__broken", arguments={}),
        action(thought="x", tool="local__sleep", arguments={"seconds": 30}),  # timeout 1 s
        action(thought="x", tool="remote__echo", arguments={"text": "é" * 50, "times": 10}),
        answer(),
    )
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL, max_steps=4), timeout=60)

    assert reply.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER
    broken, slow, big = reply.steps[:3]
    assert broken.error and "broken" in broken.observation
    assert slow.error == "local__sleep did not finish within 1s"
    assert big.observation_truncated and not big.error
    assert len(big.observation.encode()) <= 256
    assert "[truncated: 1000 bytes" in big.observation


async def test_each_mcp_call_is_measured(gateway, stub, fake_ollama):
    fake_ollama.enqueue(action(thought="add", tool="local__add", arguments={"a": 1, "b": 1}),
                        answer("2"))
    await stub.RunAgent(pb.RunAgentRequest(goal=GOAL), timeout=30)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics")).text
    counts = {sample.labels.get("gen_ai_tool_name"): sample.value
              for family in text_string_to_metric_families(text)
              for sample in family.samples
              if sample.name == "agentloop_tool_call_duration_seconds_count"}
    assert counts.get("local__add") == 1


async def test_a_request_naming_a_tool_of_a_server_that_is_down_is_rejected(stub):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RunAgent(pb.RunAgentRequest(goal=GOAL, tools=["down__add"]), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == {"tools[0]"}


async def test_a_server_going_away_loses_its_tools_not_the_agent(gateway, stub, fake_ollama,
                                                                  http_server):
    _, proc = http_server
    proc.kill()
    await proc.wait()
    remote = next(server for server in gateway.mcp.servers if server.name == "remote")
    await wait_until(lambda: not remote.connected, timeout=30,
                     message="the gateway noticed (it re-lists every 0.2 s)")
    names = {t.name for t in (await stub.ListTools(pb.ListToolsRequest(), timeout=5)).tools}
    assert "remote__add" not in names and "local__add" in names

    async with grpc.aio.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    fake_ollama.enqueue(action(thought="add", tool="local__add", arguments={"a": 2, "b": 3}),
                        answer())
    reply = await stub.RunAgent(pb.RunAgentRequest(goal=GOAL), timeout=30)
    assert reply.final_answer == "5" and reply.steps[0].observation == "5"


async def test_a_server_that_comes_up_later_gets_its_tools(fake_ollama, tmp_path):
    url = closed_port_url()
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"servers": {"late": {"url": url, "connect_timeout": 2}}}))
    settings = gateway_settings(ollama_url=fake_ollama.url, mcp_servers=str(path))
    async with running_gateway(settings) as running:
        late = running.mcp.servers[0]
        assert not late.connected and not list(running.mcp.available())
        async with serving_http(urlsplit(url).port or 0):
            await asyncio.wait_for(late.listed.wait(), 60)  # retried with backoff
            assert late.connected
            assert "late__add" in {tool.name for tool in running.mcp.available()}


async def test_shutdown_closes_every_session_and_stdio_process(fake_ollama, servers_file):
    me = psutil.Process()
    before = {child.pid for child in me.children(recursive=True)}
    settings = gateway_settings(ollama_url=fake_ollama.url, mcp_servers=str(servers_file))
    async with running_gateway(settings) as running:
        local = next(server for server in running.mcp.servers if server.name == "local")
        await asyncio.wait_for(local.listed.wait(), 30)
        started = {child.pid for child in me.children(recursive=True)} - before
        assert started  # the stdio server runs as a child process
        tasks = {task for task in asyncio.all_tasks() if task.get_name().startswith("mcp-")}
        assert len(tasks) == 4
    assert all(task.done() for task in tasks)
    await wait_until(lambda: not started & {c.pid for c in me.children(recursive=True)},
                     timeout=10, message="the stdio server process ended")


@pytest.mark.parametrize(("document", "complaint"), [
    ("servers: [a, b]", "expected a mapping"),
    ("servers:\n  bad name: {command: x}", "server 'bad name'"),
    ("servers:\n  s: {command: x, url: 'http://h/mcp'}", "exactly one of"),
    ("servers:\n  s: {url: 'ftp://h/mcp'}", "http:// or https://"),
    ("servers:\n  s: {command: x, timeout: 0}", "`timeout` must be"),
    ("servers:\n  s: {command: x, colour: red}", "unknown keys ['colour']"),
    ("servers: {s: {command: x", "cannot read the file"),
])
def test_a_bad_servers_file_names_what_is_wrong(tmp_path, document, complaint):
    path = tmp_path / "mcp.yaml"
    path.write_text(document)
    with pytest.raises(SettingsError) as caught:
        load_mcp_servers(str(path))
    assert complaint in str(caught.value) and "--mcp-servers" in str(caught.value)


def test_the_servers_file_may_be_json_or_yaml(tmp_path):
    yaml_path, json_path = tmp_path / "a.yaml", tmp_path / "a.json"
    yaml_path.write_text("servers:\n  files:\n    command: srv\n    args: [--root, /data]\n"
                         "    timeout: 3\n  web:\n    url: http://127.0.0.1:9/mcp\n")
    json_path.write_text(json.dumps({"servers": {"files": {
        "command": "srv", "args": ["--root", "/data"], "timeout": 3},
        "web": {"url": "http://127.0.0.1:9/mcp"}}}))
    assert load_mcp_servers(str(yaml_path)) == load_mcp_servers(str(json_path))
    files, web = load_mcp_servers(str(yaml_path))
    assert files.args == ("--root", "/data") and files.timeout == 3.0 and web.url
