"""`make generate`: the Python stubs of the contract, for the server and for the client.

One protoc run (grpcio-tools' bundled protoc: messages, .pyi types, gRPC stubs) writes
`agentloop/v1/`; the same files go to the server (`server/agentloop/v1`) and, as a private
copy, to the client distribution (`clients/python/agentloop_client/_proto/agentloop/v1`),
so the client installs without the server. The client's copy imports itself by its own
module path; the descriptors are byte for byte the same, so both copies load into one
process (protobuf registers an identical file once). tests/test_contract.py runs
`generate` into a temporary root and fails when a committed stub differs.

    python protos/generate.py [ROOT]     # ROOT defaults to the repository
"""

from __future__ import annotations

import sys
import tempfile
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTOS = REPO / "protos"
#: Where each copy goes, relative to the root, and the module path it is imported by.
TARGETS = {
    Path("server/agentloop/v1"): "agentloop.v1",
    Path("clients/python/agentloop_client/_proto/agentloop/v1"): (
        "agentloop_client._proto.agentloop.v1"),
}


def generate(root: Path = REPO) -> list[Path]:
    """Write every target's stubs under `root`; returns the files written."""
    protos = sorted(str(path.relative_to(PROTOS)) for path in PROTOS.rglob("*.proto"))
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as work:
        # grpcio-tools' own copy of the well-known types (google/protobuf/*.proto), as
        # `python -m grpc_tools.protoc` adds it.
        well_known = files("grpc_tools") / "_proto"
        status = protoc.main(["grpc_tools.protoc", f"-I{PROTOS}", f"-I{well_known}",
                              f"--python_out={work}",
                              f"--pyi_out={work}", f"--grpc_python_out={work}", *protos])
        if status != 0:
            raise SystemExit(f"protoc failed with exit code {status}")
        generated = Path(work, "agentloop/v1")
        for target, module in TARGETS.items():
            out = root / target
            out.mkdir(parents=True, exist_ok=True)
            for source in sorted(generated.iterdir()):
                text = source.read_text()
                # protoc names its modules by the proto path; the client's copy lives deeper.
                text = text.replace("from agentloop.v1 import ", f"from {module} import ")
                text = text.replace("'agentloop.v1.agentloop_pb2'", f"'{module}.agentloop_pb2'")
                (out / source.name).write_text(text)
                written.append(out / source.name)
    return written


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO)
