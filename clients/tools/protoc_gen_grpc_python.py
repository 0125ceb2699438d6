"""protoc-gen-grpc_python for buf: grpcio-tools' gRPC Python generator as a protoc plugin.

grpcio-tools compiles the generator into its bundled protoc (`python -m grpc_tools.protoc
--grpc_python_out`) and ships no standalone plugin, so buf cannot call it directly. This
plugin reads buf's CodeGeneratorRequest on stdin, hands the request's descriptors to that
bundled protoc and answers with the files it wrote. buf.gen.yaml runs it as
`local: [.venv/bin/python, clients/tools/protoc_gen_grpc_python.py]`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL)
    with tempfile.TemporaryDirectory() as work:
        descriptors = Path(work, "descriptors.binpb")
        descriptors.write_bytes(
            descriptor_pb2.FileDescriptorSet(file=request.proto_file).SerializeToString())
        out = Path(work, "out")
        out.mkdir()
        option = f"{request.parameter}:" if request.parameter else ""
        status = protoc.main([
            "grpc_tools.protoc", f"--descriptor_set_in={descriptors}",
            f"--grpc_python_out={option}{out}", *request.file_to_generate,
        ])
        if status != 0:
            response.error = f"grpc_tools.protoc failed with exit code {status}"
            return response
        for path in sorted(out.rglob("*.py")):
            response.file.add(name=str(path.relative_to(out)), content=path.read_text())
    return response


def main() -> None:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())


if __name__ == "__main__":
    main()
