"""The contract: generated stubs are fresh, buf is happy, settings validate clearly."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from agentloop.config import (
    EMBEDDED_WORKERS_PROBLEM,
    Settings,
    SettingsError,
    env_name,
    load_settings,
)
from agentloop.ranges import OPTION_RANGES
from agentloop.rpc.requests import requested_options
from agentloop.server import select_backend
from agentloop.settings_doc import BEGIN, END, settings_table, write_table
from agentloop.v1 import agentloop_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
#: Where `make generate` (protos/generate.py) writes: the server's stubs, the client's copy.
GENERATED = ("server/agentloop/v1", "clients/python/agentloop_client/_proto/agentloop/v1")


def test_generated_stubs_match_the_protos(tmp_path: Path) -> None:
    """`make generate` output (the server's stubs and the client's copy) is committed; this
    fails when a proto changed without it."""
    subprocess.run([sys.executable, "protos/generate.py", str(tmp_path)], cwd=ROOT, check=True)
    for target in GENERATED:
        fresh = {p.name: p.read_text() for p in (tmp_path / target).iterdir()}
        committed = {p.name: p.read_text() for p in (ROOT / target).iterdir()
                     if p.name != "__init__.py" and p.is_file()}
        assert fresh and fresh.keys() == committed.keys(), f"{target}: run `make generate`"
        stale = [name for name, text in fresh.items() if committed[name] != text]
        assert not stale, f"stale generated files in {target}: {stale}: run `make generate`"


def test_settings_defaults_follow_the_design() -> None:
    s = Settings()
    assert (s.listen, s.backend, s.ollama_url, s.model) == (
        "127.0.0.1:50051", "auto", "http://127.0.0.1:11434", "gemma3n:e2b")
    assert (s.temperature, s.top_p, s.top_k, s.repeat_penalty) == (0.7, 0.9, 40, 1.1)
    assert (s.num_ctx, s.keep_alive) == (8192, "5m")
    # max_tokens 0 = the engine's default: 2048 on Ollama as designed, less on the embedded
    # CPU engine (tests/test_first_hour.py).
    assert s.max_tokens == 0


def test_cli_flags_beat_environment_beat_defaults() -> None:
    env = {"AGENTLOOP_MODEL": "env:model", "AGENTLOOP_TOP_K": "7", "AGENTLOOP_LISTEN": "[::1]:1"}
    s = load_settings({"model": "cli:model"}, environ=env)
    assert s.model == "cli:model" and s.top_k == 7 and s.listen_address == ("::1", 1)
    with pytest.raises(AttributeError):
        s.model = "x"  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(("env", "named"), [
    ({"AGENTLOOP_TOP_P": "2"}, "AGENTLOOP_TOP_P"),
    ({"AGENTLOOP_TOP_K": "many"}, "AGENTLOOP_TOP_K"),
    ({"AGENTLOOP_BACKEND": "gpu"}, "AGENTLOOP_BACKEND"),
    ({"AGENTLOOP_LISTEN": "nowhere"}, "AGENTLOOP_LISTEN"),
    ({"AGENTLOOP_OLLAMA_URL": "ftp://x"}, "AGENTLOOP_OLLAMA_URL"),
    ({"AGENTLOOP_REFLECTION": "maybe"}, "AGENTLOOP_REFLECTION"),
])
def test_bad_settings_fail_with_a_message_naming_the_variable(env, named) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(environ=env)


def test_serve_with_a_bad_setting_exits_2_with_one_clear_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agentloop", "serve", "--top-p", "7"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "agentloop: invalid setting: --top-p / AGENTLOOP_TOP_P: must be in [0, 1]")


def test_the_settings_page_documents_every_setting() -> None:
    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")  # Makefile's SETTINGS_DOC
    missing = [env_name(name) for name in Settings.__dataclass_fields__
               if env_name(name) not in page]
    assert not missing, f"docs/settings.md lacks {missing}; run make docs"
    assert f"{BEGIN}\n{settings_table()}\n{END}" in page, "docs/settings.md is stale: make docs"


@pytest.mark.parametrize(("env", "message"), [
    ({"AGENTLOOP_CONNECT_TIMEOUT": "0"},
     "--connect-timeout / AGENTLOOP_CONNECT_TIMEOUT: must be > 0"),
    ({"AGENTLOOP_HEALTH_TIMEOUT": "nan"},
     "--health-timeout / AGENTLOOP_HEALTH_TIMEOUT: must be > 0"),
    ({"AGENTLOOP_DRAIN_DELAY": "-1"}, "--drain-delay / AGENTLOOP_DRAIN_DELAY: must be >= 0"),
    ({"AGENTLOOP_MAX_OBSERVATION_BYTES": "255"},
     "--max-observation-bytes / AGENTLOOP_MAX_OBSERVATION_BYTES: must be >= 256"),
    ({"AGENTLOOP_NUM_CTX": "40000"},
     "--num-ctx / AGENTLOOP_NUM_CTX: must be in [1, max_num_ctx (32768)]"),
    ({"AGENTLOOP_MAX_TOKENS": "-1"},
     "--max-tokens / AGENTLOOP_MAX_TOKENS: must be in [1, max_tokens_cap (8192)] or 0"),
    ({"AGENTLOOP_TEMPERATURE": "inf"},
     "--temperature / AGENTLOOP_TEMPERATURE: must be a finite number >= 0"),
    ({"AGENTLOOP_AGENT_DEFAULT_STEPS": "9"},
     "--agent-default-steps / AGENTLOOP_AGENT_DEFAULT_STEPS: must be in [1, agent_max_steps (8)]"),
    ({"AGENTLOOP_LOG_LEVEL": "loud"},
     "--log-level / AGENTLOOP_LOG_LEVEL: must be one of debug, info, warning, error, got 'loud'"),
    ({"AGENTLOOP_MODEL": ""}, "--model / AGENTLOOP_MODEL: must not be empty"),
    ({"AGENTLOOP_REFLECTION": "maybe"},
     "--reflection / AGENTLOOP_REFLECTION: expected true or false, got 'maybe'"),
    ({"AGENTLOOP_WORKERS": "two"}, "--workers / AGENTLOOP_WORKERS: expected a whole number, "
                                   "got 'two'"),
    ({"AGENTLOOP_DRAIN_DELAY": "soon"},
     "--drain-delay / AGENTLOOP_DRAIN_DELAY: expected a number, got 'soon'"),
    ({"AGENTLOOP_METRICS_LISTEN": "nowhere"},
     "--metrics-listen / AGENTLOOP_METRICS_LISTEN: expected HOST:PORT, got 'nowhere'"),
    ({"AGENTLOOP_WORKERS": "2", "AGENTLOOP_LISTEN": "127.0.0.1:0"},
     "--workers / AGENTLOOP_WORKERS: several workers need a fixed port in --listen, not port 0"),
    ({"AGENTLOOP_WORKERS": "2", "AGENTLOOP_LISTEN": "127.0.0.1:9", "AGENTLOOP_BACKEND": "embedded"},
     f"--workers / AGENTLOOP_WORKERS: {EMBEDDED_WORKERS_PROBLEM}"),
])
def test_each_rule_fails_with_one_message_naming_the_flag_and_the_variable(env, message) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ=env)
    assert str(caught.value) == message


def test_every_numeric_setting_declares_its_bounds_with_the_field() -> None:
    unbounded = [f.name for f in dataclasses.fields(Settings) if f.type in ("int", "float")
                 and f.metadata["rules"].range is None]
    assert not unbounded, f"declare minimum=/above= in their _setting(...): {unbounded}"


#: Per request option, a value no request may ask for.
OUT_OF_RANGE = {"temperature": float("inf"), "top_p": 1.5, "top_k": -1, "max_tokens": 9000,
                "repeat_penalty": 0.0, "num_ctx": 40_000}


@pytest.mark.parametrize("name", OPTION_RANGES)
def test_a_server_default_keeps_the_range_a_request_may_ask_for(name) -> None:
    rules = Settings.__dataclass_fields__[name].metadata["rules"]
    assert rules.range is OPTION_RANGES[name]
    violations: list[tuple[str, str]] = []
    requested_options(pb.GenerationOptions(**{name: OUT_OF_RANGE[name]}), Settings(), violations,
                      "options")
    assert [field for field, _ in violations] == [f"options.{name}"]
    with pytest.raises(SettingsError, match=env_name(name)):
        Settings(**{name: OUT_OF_RANGE[name]})


def test_request_option_violations_name_the_field_and_the_range() -> None:
    violations: list[tuple[str, str]] = []
    requested_options(pb.GenerationOptions(
        temperature=float("nan"), top_p=2, top_k=-1, max_tokens=0, repeat_penalty=-1,
        num_ctx=40_000), Settings(max_tokens_cap=100), violations, "options")
    assert violations == [
        ("options.temperature", "must be a finite number >= 0"),
        ("options.top_p", "must be in [0, 1]"),
        ("options.top_k", "must be in [0, 1000]"),
        ("options.max_tokens", "must be in [1, 100]"),
        ("options.repeat_penalty", "must be a finite number > 0"),
        ("options.num_ctx", "must be in [1, 32768]"),
    ]


def test_make_docs_rewrites_only_the_table_between_the_markers(tmp_path: Path) -> None:
    page = tmp_path / "settings.md"
    page.write_text(f"# Settings\n\n{BEGIN}\nold table\n{END}\n\nmore\n")
    subprocess.run([sys.executable, "-m", "agentloop.settings_doc", str(page)], check=True)
    assert page.read_text() == f"# Settings\n\n{BEGIN}\n{settings_table()}\n{END}\n\nmore\n"
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match=r"no .* marker"):
        write_table(tmp_path / "bare.md")


async def test_auto_falling_back_to_the_embedded_engine_refuses_several_workers() -> None:
    # Nothing listens on port 9 of loopback: auto would pick the embedded engine, one per
    # worker process.
    settings = load_settings(environ={}, workers=2, listen="127.0.0.1:50999", backend="auto",
                             ollama_url="http://127.0.0.1:9", connect_timeout=0.5)
    with pytest.raises(SettingsError, match="--workers 1"):
        await select_backend(settings)
