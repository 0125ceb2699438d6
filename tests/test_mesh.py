"""The cluster path for conversation affinity, checked offline: the Envoy configuration parses
strictly with Envoy's own protos (xds-protos), the Istio DestinationRule validates against
Istio's CRD schema (@kubernetes-models/istio), and both hash the header the clients send,
point at the Services in k8s/base and leave unready pods out."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

# Envoy's messages for every typed_config in envoy.yaml: json_format resolves an Any by
# its type URL in the default pool, so an unknown or misspelled type fails the parse.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from agentloop.config import Settings, parse_host_port
from agentloop_client import SESSION_HEADER

ROOT = Path(__file__).resolve().parents[1]
AFFINITY = ROOT / "k8s" / "affinity"
GRPC_PORT = parse_host_port(Settings().listen)[1]


def base_service(name: str) -> dict[str, Any]:
    for path in (ROOT / "k8s" / "base").glob("service*.yaml"):
        doc = yaml.safe_load(path.read_text())
        if doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no Service {name} in k8s/base")


def envoy_bootstrap() -> bootstrap_pb2.Bootstrap:
    doc = yaml.safe_load((AFFINITY / "envoy.yaml").read_text())
    return json_format.ParseDict(doc, bootstrap_pb2.Bootstrap())


def test_envoy_config_is_strict_envoy_and_a_typo_would_fail():
    doc = yaml.safe_load((AFFINITY / "envoy.yaml").read_text())
    json_format.ParseDict(doc, bootstrap_pb2.Bootstrap())
    doc["static_resources"]["clusters"][0]["lb_polcy"] = "RING_HASH"
    with pytest.raises(json_format.ParseError, match="lb_polcy"):
        json_format.ParseDict(doc, bootstrap_pb2.Bootstrap())


def test_envoy_hashes_the_session_header_over_ready_pods():
    bootstrap = envoy_bootstrap()
    (listener,) = bootstrap.static_resources.listeners
    (chain,) = listener.filter_chains
    (hcm_filter,) = chain.filters
    manager = http_connection_manager_pb2.HttpConnectionManager()
    assert hcm_filter.typed_config.Unpack(manager)
    assert listener.address.socket_address.port_value == GRPC_PORT
    assert manager.http_filters[-1].name == "envoy.filters.http.router"
    routes = [route for host in manager.route_config.virtual_hosts for route in host.routes]
    assert routes
    (cluster,) = bootstrap.static_resources.clusters
    for route in routes:
        action: route_components_pb2.RouteAction = route.route
        assert action.cluster == cluster.name
        assert [policy.header.header_name for policy in action.hash_policy] == [SESSION_HEADER]
        assert action.timeout.ToTimedelta().total_seconds() == 0, "streams outlive 15 s"
        assert "unavailable" in action.retry_policy.retry_on.split(",")
        assert [p.name for p in action.retry_policy.retry_host_predicate] == [
            "envoy.retry_host_predicates.previous_hosts"]

    assert cluster.lb_policy == cluster_pb2.Cluster.RING_HASH
    assert cluster.type == cluster_pb2.Cluster.STRICT_DNS
    (locality,) = cluster.load_assignment.endpoints
    (endpoint,) = locality.lb_endpoints
    address = endpoint.endpoint.address.socket_address
    headless = base_service("agentloop-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert address.address.split(".")[0] == headless["metadata"]["name"]
    assert address.address.endswith(".svc.cluster.local")
    assert address.port_value == GRPC_PORT
    # Readiness decides, not the hash: gRPC health on `readiness`, and no panic mode that
    # would send to unhealthy pods once too many are unhealthy.
    (check,) = cluster.health_checks
    assert check.grpc_health_check.service_name == "readiness"
    assert check.unhealthy_threshold.value == 1
    assert cluster.common_lb_config.healthy_panic_threshold.value == 0
    options = http_protocol_options_pb2.HttpProtocolOptions()
    key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    assert cluster.typed_extension_protocol_options[key].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options"), "gRPC is HTTP/2"


def test_istio_destination_rule_validates_and_hashes_the_session_header():
    doc = yaml.safe_load((AFFINITY / "destinationrule.yaml").read_text())
    assert doc["spec"]["host"] == base_service("agentloop")["metadata"]["name"]
    consistent = doc["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]
    assert consistent["httpHeaderName"] == SESSION_HEADER
    assert validate_istio(doc) == ""
    broken = json.loads(json.dumps(doc))
    broken["spec"]["trafficPolicy"]["loadBalancer"]["simple"] = "ROUND_ROBIN"
    assert "must" in validate_istio(broken), "the schema check would not catch a bad rule"


def validate_istio(doc: dict[str, Any]) -> str:
    """'' when @kubernetes-models/istio accepts the DestinationRule, else its message."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing; `make test` needs it for the Istio schema", pytrace=False)
    script = (
        "import { DestinationRule } from '@kubernetes-models/istio/networking.istio.io/v1';"
        "import { readFileSync } from 'node:fs';"
        "try { new DestinationRule(JSON.parse(readFileSync(0, 'utf8'))).validate(); }"
        "catch (error) { console.log(error.message); }")
    result = subprocess.run([node, "--input-type=module", "-e", script], cwd=ROOT,
                            input=json.dumps(doc), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
