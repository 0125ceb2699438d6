"""The standard gRPC health check (grpc.health.v1.Health/Check) without its stubs package.

Its request `{string service = 1}` and its reply `{ServingStatus status = 1}` have the wire
format of protobuf's own `StringValue` and `Int32Value`, so those carry them and the
client needs no grpcio-health-checking (and no second copy of health.proto's symbols).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.wrappers_pb2 import Int32Value, StringValue

CHECK = "/grpc.health.v1.Health/Check"
#: grpc.health.v1.HealthCheckResponse.ServingStatus, by number.
STATUS_NAMES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")


def check_method(channel: Any) -> Any:
    """Health/Check on `channel` (sync or grpc.aio): call it with `check_request(service)`."""
    return channel.unary_unary(CHECK, request_serializer=StringValue.SerializeToString,
                               response_deserializer=Int32Value.FromString)


def check_request(service: str) -> StringValue:
    return StringValue(value=service)


def status_name(reply: Int32Value) -> str:
    return STATUS_NAMES[reply.value] if 0 <= reply.value < len(STATUS_NAMES) else "UNKNOWN"
