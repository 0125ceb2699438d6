"""Encryption at rest of the run store: with a key, nothing a run carries is readable in the
SQLite file, while the API shows it all; keys rotate by id; a missing key is a clear
FAILED_PRECONDITION; no key ever reaches a log, a repr or an error; without a key nothing is
encrypted."""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
from pathlib import Path

import grpc
import pytest

from agentloop.config import SettingsError
from agentloop.runs.sealing import MAGIC
from agentloop.v1 import agentloop_pb2 as pb
from fake_ollama import FakeOllama, Script
from helpers import client_stub, gateway_settings, rich_details, running_gateway

OLD_KEY = base64.b64encode(b"k" * 32).decode()
NEW_KEY = base64.b64encode(b"n" * 32).decode()
GOAL = "zebra-quartz: what is 17*23?"
SECRET_ANSWER = "391 (quartz-answer)"


def scripts() -> list[Script]:
    call = {"tool": "calculator", "arguments": {"expression": "17*23"},
            "thought": "tourmaline-thought"}
    return [Script(tokens=[json.dumps(call)]),
            Script(tokens=[json.dumps({"final_answer": SECRET_ANSWER})])]


def stored_bytes(path: Path) -> bytes:
    """Everything the store holds on disk: the file and its write-ahead log."""
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


async def run_to_end(stub, goal: str = GOAL) -> pb.AgentRun:
    run_id = (await stub.StartAgentRun(pb.StartAgentRunRequest(
        run=pb.StartAgentRun(goal=goal)), timeout=5)).run.id
    events = [e async for e in stub.WatchAgentRun(pb.WatchAgentRunRequest(run_id=run_id),
                                                   timeout=10)]
    assert events[-1].run_ended.status == pb.AGENT_RUN_STATUS_COMPLETED
    return (await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=run_id), timeout=5)).run


async def test_with_a_key_nothing_a_run_carries_is_readable_at_rest(fake_ollama: FakeOllama,
                                                                    tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "runs.db"
    fake_ollama.enqueue(*scripts())
    settings = gateway_settings(ollama_url=fake_ollama.url, run_store=str(path),
                                run_store_keys=f"old:{OLD_KEY}")
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        run = await run_to_end(stub)
        assert run.final_answer == SECRET_ANSWER and run.steps[0].thought == "tourmaline-thought"
    disk = stored_bytes(path)
    for secret in (b"zebra-quartz", b"quartz-answer", b"tourmaline-thought", b"17*23"):
        assert secret not in disk, secret
    with sqlite3.connect(path) as db:
        (status, model), = db.execute("SELECT status, model FROM runs").fetchall()
        (request,), = db.execute("SELECT request FROM runs").fetchall()
    assert status == "completed" and model  # in clear, for queries
    assert request.startswith(MAGIC + b"\x03old")
    assert OLD_KEY not in caplog.text and OLD_KEY not in repr(settings)


async def test_keys_rotate_by_id_and_a_missing_key_is_a_clear_error(fake_ollama, tmp_path):
    path = tmp_path / "runs.db"
    fake_ollama.enqueue(*scripts(), *scripts())
    old = gateway_settings(ollama_url=fake_ollama.url, run_store=str(path),
                           run_store_keys=f"old:{OLD_KEY}")
    async with running_gateway(old) as gateway, client_stub(gateway.address) as stub:
        first = await run_to_end(stub)
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"new:{NEW_KEY}\nold:{OLD_KEY}\n")
    rotated = gateway_settings(ollama_url=fake_ollama.url, run_store=str(path),
                               run_store_key_file=str(keys_file))
    async with running_gateway(rotated) as gateway, client_stub(gateway.address) as stub:
        again = (await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=first.id), timeout=5)).run
        assert again.final_answer == SECRET_ANSWER
        second = await run_to_end(stub)
    with sqlite3.connect(path) as db:
        (request,), = db.execute("SELECT request FROM runs WHERE id = ?", (second.id,))
    assert request.startswith(MAGIC + b"\x03new")
    only_new = gateway_settings(ollama_url=fake_ollama.url, run_store=str(path),
                                run_store_keys=f"new:{NEW_KEY}")
    async with running_gateway(only_new) as gateway, client_stub(gateway.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=first.id), timeout=5)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert rich_details(raised.value)["ErrorInfo"].reason == "RUN_STORE_KEY_MISSING"
        assert "'old'" in raised.value.details() and OLD_KEY not in raised.value.details()
        newer = (await stub.GetAgentRun(pb.GetAgentRunRequest(run_id=second.id), timeout=5))
        assert newer.run.final_answer == SECRET_ANSWER


async def test_without_a_key_nothing_is_encrypted(fake_ollama, tmp_path):
    path = tmp_path / "runs.db"
    fake_ollama.enqueue(*scripts())
    settings = gateway_settings(ollama_url=fake_ollama.url, run_store=str(path))
    async with running_gateway(settings) as gateway, client_stub(gateway.address) as stub:
        await run_to_end(stub)
    assert b"zebra-quartz" in stored_bytes(path)


def test_a_bad_key_is_refused_without_showing_it():
    short = base64.b64encode(b"s" * 16).decode()
    for keys, why in ((f"k1:{short}", "16 bytes"), ("k1", "ID:BASE64"),
                      (f"k1:{OLD_KEY},k1:{NEW_KEY}", "twice")):
        with pytest.raises(SettingsError) as raised:
            gateway_settings(run_store_keys=keys)
        assert why in str(raised.value)
        assert short not in str(raised.value) and OLD_KEY not in str(raised.value)
