"""OTLP exporters for traces and metrics, configured by the standard OTEL_EXPORTER_OTLP_* variables.

The exporters read their endpoint, headers, timeout, compression and certificates from the
environment themselves; this module only decides whether to export at all (an endpoint is
set) and picks the transport OTEL_EXPORTER_OTLP_PROTOCOL names (`grpc`, the default, or
`http/protobuf`). Without an endpoint nothing is exported: a laptop without a collector
should not log a failed export every few seconds.
"""

from __future__ import annotations

import os
from typing import Literal

from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
)
from opentelemetry.sdk.metrics.export import MetricExporter
from opentelemetry.sdk.trace.export import SpanExporter

from agentloop.config import SettingsError

Signal = Literal["traces", "metrics"]

_ENDPOINTS = {"traces": OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
              "metrics": OTEL_EXPORTER_OTLP_METRICS_ENDPOINT}
_PROTOCOLS = {"traces": OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
              "metrics": OTEL_EXPORTER_OTLP_METRICS_PROTOCOL}
GRPC = "grpc"
HTTP_PROTOBUF = "http/protobuf"


def configured(signal: Signal) -> bool:
    """Is an OTLP endpoint set for `signal` (its own variable or the common one)?"""
    return _protocol(signal) is not None


def span_exporter() -> SpanExporter:
    """The OTLP span exporter over the transport the environment names."""
    if _protocol("traces") == HTTP_PROTOBUF:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as OTLPGrpcSpanExporter,
    )

    return OTLPGrpcSpanExporter()


def metric_exporter() -> MetricExporter:
    """The OTLP metric exporter over the transport the environment names."""
    if _protocol("metrics") == HTTP_PROTOBUF:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
        OTLPMetricExporter as OTLPGrpcMetricExporter,
    )

    return OTLPGrpcMetricExporter()


def _protocol(signal: Signal) -> str | None:
    """The transport for `signal` (the signal's own variable first), None without endpoint."""
    if not (os.environ.get(_ENDPOINTS[signal]) or os.environ.get(OTEL_EXPORTER_OTLP_ENDPOINT)):
        return None
    variable = _PROTOCOLS[signal] if os.environ.get(_PROTOCOLS[signal]) \
        else OTEL_EXPORTER_OTLP_PROTOCOL
    protocol = os.environ.get(variable, GRPC).strip() or GRPC
    if protocol not in (GRPC, HTTP_PROTOBUF):
        raise SettingsError(f"{variable}: expected {GRPC} or {HTTP_PROTOBUF}, got {protocol!r}")
    return protocol
