"""buf on the contract: lint and format are clean, and `buf generate` (buf.gen.yaml) writes
a working TypeScript client offline (the Python stubs come from `make generate`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "node_modules/.bin/buf"
TSC = ROOT / "node_modules/.bin/tsc"
GEN = ROOT / "clients/gen"

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="npm install has not run")


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_buf_lint_is_clean() -> None:
    result = run(BUF, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_leaves_the_protos_unchanged() -> None:
    result = run(BUF, "format", "--exit-code", "--diff")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def generated() -> Path:
    result = run(BUF, "generate")
    assert result.returncode == 0, result.stdout + result.stderr
    return GEN


def test_buf_generate_writes_typescript_that_compiles(generated: Path) -> None:
    source = generated / "ts/agentloop/v1/agentloop_pb.ts"
    text = source.read_text()
    assert "export const AgentLoopService: GenService<{" in text
    for method in ("generate", "streamGenerate", "runAgent", "streamRunAgent", "listModels"):
        assert f"  {method}: {{" in text, method
    if not TSC.exists():
        pytest.skip("typescript is not installed")
    result = run(TSC, "--noEmit", "--strict", "--target", "es2022", "--module", "node16",
                 "--moduleResolution", "node16", source)
    assert result.returncode == 0, result.stdout + result.stderr
