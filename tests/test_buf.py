"""buf on the contract: lint and format are clean, `buf generate` (buf.gen.yaml) writes a
working TypeScript client offline (the Python stubs come from `make generate`), and
buf.gen.go.yaml writes Go stubs that compile and call a real server."""

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


# --- Go: buf.gen.go.yaml with Debian's protoc-gen-go / protoc-gen-go-grpc (make go-tools) ---

GO_PROGRAM = """package main

import (
	"context"
	"fmt"
	"os"
	"time"

	agentloopv1 "agentloop/gen/go/agentloop/v1"
	"google.golang.org/grpc"
)

func main() {
	conn, err := grpc.Dial(os.Args[1], grpc.WithInsecure())
	if err != nil {
		panic(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client := agentloopv1.NewAgentLoopServiceClient(conn)
	reply, err := client.Generate(ctx, &agentloopv1.GenerateRequest{Prompt: "hi"})
	if err != nil {
		panic(err)
	}
	fmt.Print(reply.GetText())
}
"""
GOCODE = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages put Go sources


def _go_tools_missing() -> str:
    import shutil

    missing = [tool for tool in ("go", "protoc-gen-go", "protoc-gen-go-grpc")
               if shutil.which(tool) is None]
    if not (GOCODE / "src/google.golang.org/grpc").is_dir():
        missing.append("golang-google-grpc-dev")
    if not (GOCODE / "src/github.com/golang/protobuf/proto/registry.go").is_file():
        missing.append("golang-github-golang-protobuf-1-5-dev")  # 1.3 cannot encode v2 messages
    return ", ".join(missing)


@pytest.mark.skipif(bool(_go_tools_missing()),
                    reason=f"Go tools missing ({_go_tools_missing()}): see `make go-tools`")
async def test_go_stubs_compile_and_call_a_real_server(tmp_path: Path, gateway) -> None:
    import asyncio

    result = await asyncio.to_thread(
        run, BUF, "generate", "--template", "buf.gen.go.yaml", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    package = tmp_path / "gopath/src/agentloop/gen/go/agentloop/v1"
    package.parent.mkdir(parents=True)
    (tmp_path / "out/clients/gen/go/agentloop/v1").rename(package)
    assert {p.name for p in package.iterdir()} == {"agentloop.pb.go", "agentloop_grpc.pb.go"}
    program = tmp_path / "gopath/src/example/main.go"
    program.parent.mkdir(parents=True)
    program.write_text(GO_PROGRAM)
    # GOPATH mode over Debian's sources: no module download needed (or possible) offline.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GO111MODULE": "off",
           "GOPATH": f"{tmp_path / 'gopath'}:{GOCODE}", "GOCACHE": str(tmp_path / "cache"),
           "GOFLAGS": ""}
    built = await asyncio.to_thread(
        subprocess.run, ["go", "build", "-o", str(tmp_path / "example"), "example"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    called = await asyncio.to_thread(
        subprocess.run, [str(tmp_path / "example"), gateway.address], capture_output=True,
        text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    assert called.stdout == "Hello, world!"

