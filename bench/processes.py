"""Processes the benchmarks start: the fake Ollama, free ports, and stopping by handle."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

PY = sys.executable
TESTS = Path(__file__).resolve().parent.parent / "tests"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it does not end within 15 s; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def fake_ollama(tokens: int, token_delay: float, poll: float | None = None,
                stderr: IO[str] | int | None = None) -> Iterator[str]:
    """The fake Ollama as its own process; yields its base URL and stops it after.

    `poll` sets how often a stream sleeping between slow tokens checks that its client is
    still there (the fake's POLL): thousands of streams at 2 tokens/s would otherwise keep
    the fake's CPU busy with checks."""
    with _fake("fake_ollama", tokens, token_delay, poll, stderr) as url:
        yield url


@contextmanager
def fake_openai(tokens: int, token_delay: float, model: str,
                stderr: IO[str] | int | None = None) -> Iterator[str]:
    """The fake OpenAI-compatible server as its own process, serving `model`; yields its API
    base (with /v1) and stops it after."""
    with _fake("fake_openai", tokens, token_delay, None, stderr, "--model", model) as url:
        yield url


@contextmanager
def _fake(module: str, tokens: int, token_delay: float, poll: float | None,
          stderr: IO[str] | int | None, *extra: str) -> Iterator[str]:
    """A fake server of tests/ as a process: its one stdout line names its URL."""
    argv = ["--port", "0", "--tokens", str(tokens), "--token-delay", str(token_delay), *extra]
    # The fakes live with the tests (tests/fake_*.py), not in the product package.
    setup = f"import fake_ollama; fake_ollama.POLL = {poll}; " if poll is not None else ""
    command = [PY, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r}); {setup}"
               f"import {module} as f; sys.exit(f.main(sys.argv[1:]))", *argv]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    banner = f"{module.replace('_', '-')} listening on "
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(banner):
            raise RuntimeError(f"{module} did not start: {line!r}")
        yield line.split()[-1]
    finally:
        stop(proc)
