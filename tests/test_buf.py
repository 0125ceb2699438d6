"""buf on the contract: lint and format are clean, and `buf generate` (buf.gen.yaml) writes
working Python and TypeScript clients offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from agentloop.v1 import agentloop_pb2

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "node_modules/.bin/buf"
TSC = ROOT / "node_modules/.bin/tsc"
GEN = ROOT / "clients/gen"
STUBS = ROOT / "server/agentloop/v1"

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


def test_buf_generate_writes_the_same_python_stubs_as_make_generate(generated: Path) -> None:
    out = generated / "python/agentloop/v1"
    for name in ("agentloop_pb2.pyi", "agentloop_pb2_grpc.py"):
        assert (out / name).read_text() == (STUBS / name).read_text(), name
    # buf's descriptors carry json_name where protoc's leave it to the runtime: compare the
    # contract itself, loaded in a fresh interpreter (one descriptor pool per process).
    loaded = subprocess.run(
        [sys.executable, "-c",
         "import sys; from agentloop.v1 import agentloop_pb2 as m; "
         "sys.stdout.buffer.write(m.DESCRIPTOR.serialized_pb); sys.stderr.write(m.__file__)"],
        cwd=ROOT, env={"PYTHONPATH": str(generated / "python")}, capture_output=True,
        timeout=60)
    assert loaded.returncode == 0, loaded.stderr.decode()
    assert loaded.stderr.decode() == str(out / "agentloop_pb2.py")
    assert loaded.stdout and _without_json_names(loaded.stdout) == _without_json_names(
        agentloop_pb2.DESCRIPTOR.serialized_pb)


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


def _without_json_names(serialized: bytes) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    for message in _messages(proto.message_type):
        for field in message.field:
            field.ClearField("json_name")
    return proto


def _messages(messages):  # type: ignore[no-untyped-def]
    for message in messages:
        yield message
        yield from _messages(message.nested_type)
