"""The contract: generated stubs are fresh, buf is happy, settings validate clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agentloop.config import Settings, SettingsError, env_name, load_settings
from agentloop.settings_doc import settings_table

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


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [env_name(name) for name in Settings.__dataclass_fields__
               if env_name(name) not in readme]
    assert not missing, f"README settings table lacks {missing}; paste settings_table()"
    assert settings_table() in readme, "README settings table is stale: paste settings_table()"
