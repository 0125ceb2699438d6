"""The cluster path for conversation affinity, checked offline: the Envoy configuration
parses strictly with Envoy's own protos (the xds-protos package), the Istio DestinationRule
validates against Istio's CRD schema (@kubernetes-models/istio), and both hash the header
the clients send, point at the Services in k8s/base and leave unready pods out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentloop.config import Settings, parse_host_port
from agentloop_client import SESSION_HEADER

ROOT = Path(__file__).resolve().parents[1]
AFFINITY = ROOT / "k8s" / "affinity"
GRPC_PORT = parse_host_port(Settings().listen)[1]
# `make install` puts xds-protos here, outside the venv's path: the wheel also carries
# opentelemetry.proto and google.* modules that would replace the server's own.
XDS_PROTOS = Path(sys.executable).parents[1] / "xds-protos"

# Runs with XDS_PROTOS first on its path. json_format resolves each typed_config by its type
# URL in the default pool, so every type the file names is imported here; an unknown field,
# a wrong type or an unknown type URL fails the parse.
ENVOY_PARSER = """
import json, sys
from google.protobuf import json_format
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
try:
    bootstrap = json_format.ParseDict(json.load(sys.stdin), bootstrap_pb2.Bootstrap())
except json_format.ParseError as error:
    print(json.dumps({"error": str(error)}))
else:
    print(json.dumps(json_format.MessageToDict(bootstrap, preserving_proto_field_name=True)))
"""


def base_service(name: str) -> dict[str, Any]:
    for path in (ROOT / "k8s" / "base").glob("service*.yaml"):
        doc = yaml.safe_load(path.read_text())
        if doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no Service {name} in k8s/base")


def envoy_yaml() -> dict[str, Any]:
    return yaml.safe_load((AFFINITY / "envoy.yaml").read_text())


def parse_envoy(doc: dict[str, Any]) -> dict[str, Any]:
    """The Bootstrap as Envoy's protos read it (canonical JSON), or {"error": ...}."""
    if not (XDS_PROTOS / "envoy").is_dir():
        pytest.fail(f"xds-protos is missing from {XDS_PROTOS}; run `make install`",
                    pytrace=False)
    env = {**os.environ, "PYTHONPATH": str(XDS_PROTOS)}
    result = subprocess.run([sys.executable, "-c", ENVOY_PARSER], input=json.dumps(doc),
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_envoy_config_is_strict_envoy_and_a_typo_would_fail():
    doc = envoy_yaml()
    assert "error" not in parse_envoy(doc)
    doc["static_resources"]["clusters"][0]["lb_polcy"] = "RING_HASH"
    assert "lb_polcy" in parse_envoy(doc)["error"]


def test_envoy_hashes_the_session_header_over_ready_pods():
    bootstrap = parse_envoy(envoy_yaml())
    (listener,) = bootstrap["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == GRPC_PORT
    (chain,) = listener["filter_chains"]
    (manager_filter,) = chain["filters"]
    manager = manager_filter["typed_config"]
    assert manager["@type"].endswith(".HttpConnectionManager")
    assert manager["http_filters"][-1]["name"] == "envoy.filters.http.router"
    routes = [route for host in manager["route_config"]["virtual_hosts"]
              for route in host["routes"]]
    (cluster,) = bootstrap["static_resources"]["clusters"]
    assert routes
    for route in routes:
        action = route["route"]
        assert action["cluster"] == cluster["name"]
        assert [p["header"]["header_name"] for p in action["hash_policy"]] == [SESSION_HEADER]
        assert action["timeout"] == "0s", "a stream may outlive Envoy's 15 s default"
        retry = action["retry_policy"]
        assert "unavailable" in retry["retry_on"].split(",")
        assert [p["name"] for p in retry["retry_host_predicate"]] == [
            "envoy.retry_host_predicates.previous_hosts"]

    assert (cluster["lb_policy"], cluster["type"]) == ("RING_HASH", "STRICT_DNS")
    (locality,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    headless = base_service("agentloop-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert address["address"].split(".")[0] == headless["metadata"]["name"]
    assert address["address"].endswith(".svc.cluster.local")
    assert address["port_value"] == GRPC_PORT
    # Readiness decides, not the hash: gRPC health on `readiness`, one failed check is
    # enough, and no panic mode (which sends to unhealthy pods once too many are).
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == "readiness"
    assert check["unhealthy_threshold"] == 1
    panic = cluster["common_lb_config"]["healthy_panic_threshold"]
    assert panic.get("value", 0) == 0
    (options,) = cluster["typed_extension_protocol_options"].values()
    assert "http2_protocol_options" in options["explicit_http_config"], "gRPC is HTTP/2"


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


def test_the_deployment_guide_shows_every_affinity_path():
    guide = (ROOT / "k8s" / "README.md").read_text(encoding="utf-8")
    for needed in (SESSION_HEADER, "ring_hash_experimental", "requestHashHeader",
                   "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY", "affinity/envoy.yaml",
                   "affinity/destinationrule.yaml", "httpHeaderName", "session="):
        assert needed in guide, f"k8s/README.md should cover {needed!r}"
