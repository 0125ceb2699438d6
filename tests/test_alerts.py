"""Alert rules, SLO burn rates and the Grafana dashboard (k8s/monitoring), proven three ways.

- The rendered files are fresh (render.py from slo.yaml), carry the same groups in both
  forms, and every alert has a severity, a summary and a runbook section in the docs.
- promtool checks them and runs their unit tests (k8s/monitoring/agentloop-rules.test.yaml:
  series in, alerts out, look-alikes that must not fire).
- A real Prometheus on loopback (1 s scrapes and evaluations) scrapes two real gateways, one
  in front of the fake Ollama and one on the embedded engine. The test induces each failure
  and waits, through Prometheus's own API, for every alert to fire; every metric name a
  rule or a panel uses must be in what Prometheus scraped, and every panel's queries must
  return data. The rules it loads are the shipped ones with windows and `for:` durations
  divided by TIME_SCALE (render.py's `time_scale`).

promtool and prometheus come from Debian's `prometheus` package (`make prometheus-tools`,
which `make test` runs); without them these tests skip and say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import httpx
import psutil
import pytest
import yaml
from test_deploy import container_ports, documents, pod_labels, pod_spec

from agentloop.backends.embedded import EmbeddedBackend
from agentloop.server import RunningServer, start_server
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from fake_ollama import FakeOllama, Script, wait_until
from helpers import ROOT, gateway_settings, markdown_section

MONITORING = ROOT / "k8s" / "monitoring"
RULES_TEST = MONITORING / "agentloop-rules.test.yaml"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
MISSING = "Debian's prometheus package is not installed (`make prometheus-tools` installs it " \
    "with apt-get as root)"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"no promtool: {MISSING}")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=f"no prometheus: {MISSING}")

# The live check's speed-up: a 5 minute window lasts 10 s, a 15 minute `for:` 30 s.
TIME_SCALE = 30
SCRAPE_INTERVAL = 1.0
RATE_INTERVAL = "10s"  # the dashboard's $__rate_interval at a 1 s scrape (Grafana: 4 scrapes+)


def load_render() -> ModuleType:
    """k8s/monitoring/render.py, the one source of the rules and the dashboard."""
    spec = importlib.util.spec_from_file_location("agentloop_monitoring_render",
                                                  MONITORING / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


render = load_render()
SHIPPED = render.Params.load()
ALERTS = [rule["alert"] for rule in render.alerts(SHIPPED)]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def metric_names(expression: str) -> set[str]:
    """The metric names an expression selects: every name is written with a `{...}`
    selector (render.py always adds one), recording rules (with a colon) aside."""
    names = set(re.findall(r"([A-Za-z_][A-Za-z0-9_:]*)\{", expression))
    names |= set(re.findall(r"label_values\(([A-Za-z_][A-Za-z0-9_]*)", expression))
    return {name for name in names if ":" not in name}


def used_metric_names(params: Any) -> set[str]:
    board = render.dashboard(params)
    expressions = [rule["expr"] for group in render.rule_groups(params)
                   for rule in group["rules"]]
    expressions += [expr for _, expr in render.dashboard_queries(board)]
    expressions += [variable.get("definition", "") for variable in board["templating"]["list"]]
    return set().union(*(metric_names(expr) for expr in expressions))


# --- the rendered files ----------------------------------------------------------------

def test_rendered_files_are_fresh() -> None:
    for path, text in render.rendered(SHIPPED).items():
        assert path.read_text(encoding="utf-8") == text, \
            f"{path.name} is stale: run `make monitoring` (k8s/monitoring/render.py)"


def test_the_prometheus_rule_carries_the_rules_file_groups() -> None:
    plain = load_yaml(render.RULES_FILE)
    manifest = load_yaml(render.PROMETHEUS_RULE_FILE)
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["name"] == "agentloop"
    assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(manifest["spec"]) == {"groups"}
    assert manifest["spec"]["groups"] == plain["groups"]
    # The operator's Rule schema: these fields and no others.
    fields = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
    for group in plain["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"], group["name"]
        for rule in group["rules"]:
            assert set(rule) <= fields, rule
            assert ("record" in rule) != ("alert" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip(), rule
            if "for" in rule:
                assert re.fullmatch(r"\d+(ms|s|m|h)", rule["for"]), rule


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section() -> None:
    assert len(ALERTS) == len(set(ALERTS)) == 14, ALERTS
    for rule in render.alerts(SHIPPED):
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert annotations["summary"] and annotations["description"], name
        assert annotations["runbook_url"] == f"docs/observability.md#{name.lower()}", name
        section = markdown_section("docs/observability.md", f"#### {name}")
        assert "What it means" in section and "What to do" in section, name


def test_the_dashboard_is_provisionable_and_documented() -> None:
    board = json.loads(render.DASHBOARD_FILE.read_text(encoding="utf-8"))
    assert board["uid"] == "agentloop" and board["title"]
    assert "id" not in board, "a provisioned dashboard has no database id"
    ids = [panel["id"] for panel in board["panels"]]
    ids += [inner["id"] for panel in board["panels"] for inner in panel.get("panels", [])]
    assert len(ids) == len(set(ids))
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    rows = [panel["title"] for panel in board["panels"] if panel["type"] == "row"]
    assert render.POOLS_AND_TENANTS_ROW in rows
    docs = markdown_section("docs/observability.md", "### Dashboard")
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["description"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"], panel["title"]
        assert f"| {panel['title']} |" in docs, f"docs/observability.md lacks {panel['title']}"


def test_the_monitoring_kustomization_builds_and_selects_the_gateways() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl, "install kubectl; its `kubectl kustomize` builds k8s/"
    built = subprocess.run([kubectl, "kustomize", str(MONITORING)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert built.returncode == 0, built.stderr
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(built.stdout)}
    assert set(docs) == {"PodMonitor", "PrometheusRule", "ConfigMap"}
    dashboard = docs["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["dashboard.json"] == \
        render.DASHBOARD_FILE.read_text(encoding="utf-8")
    assert docs["PrometheusRule"]["spec"] == load_yaml(render.PROMETHEUS_RULE_FILE)["spec"]
    monitor = docs["PodMonitor"]["spec"]
    for overlay in ("gpu", "cpu"):
        gateway = documents(overlay)
        labels = pod_labels(gateway)
        assert monitor["selector"]["matchLabels"].items() <= labels.items(), overlay
        assert labels[monitor["jobLabel"]] == SHIPPED.job, overlay
        for endpoint in monitor["podMetricsEndpoints"]:
            assert container_ports(pod_spec(gateway))[endpoint["port"]] == 9464, overlay
            assert render.parse_duration(endpoint["interval"]) == SHIPPED.scrape_interval


# --- promtool ----------------------------------------------------------------------------

def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


@needs_promtool
def test_promtool_accepts_both_rule_files(tmp_path: Path) -> None:
    checked = promtool("check", "rules", render.RULES_FILE.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    spec = tmp_path / "from-prometheusrule.yaml"
    spec.write_text(yaml.safe_dump(load_yaml(render.PROMETHEUS_RULE_FILE)["spec"]))
    checked = promtool("check", "rules", str(spec))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULES_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    assert fires == set(ALERTS), set(ALERTS) ^ fires
    assert silent == set(ALERTS), set(ALERTS) ^ silent


# --- the live check ------------------------------------------------------------------------

def free_port() -> int:
    """A port nobody listens on now (Prometheus cannot take port 0 and tell which it got)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrometheusApi:
    """The HTTP API of one Prometheus, and the alerts it has been seen firing."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.firing: dict[str, set[str]] = {}  # alert -> instances ("" when aggregated)
        self.first_fired: dict[str, float] = {}  # alert -> when it was first seen firing

    async def get(self, path: str, **params: Any) -> Any:
        response = await self.client.get(path, params=params, timeout=10)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        return (await self.get("/api/v1/query", query=expr))["result"]

    async def alerts(self) -> list[dict[str, Any]]:
        return (await self.get("/api/v1/alerts"))["alerts"]

    async def watch_alerts(self) -> None:
        """Note every alert that fires (they need not fire together)."""
        while True:
            for alert in await self.alerts():
                if alert["state"] == "firing":
                    labels = alert["labels"]
                    self.firing.setdefault(labels["alertname"], set()).add(
                        labels.get("instance", ""))
                    self.first_fired.setdefault(labels["alertname"], time.monotonic())
            await asyncio.sleep(0.2)

    async def fired(self, *names: str, timeout: float = 30.0) -> None:
        await wait_until(lambda: set(names) <= set(self.firing), timeout=timeout,
                         message=f"alerts {sorted(set(names) - set(self.firing))} firing "
                                 f"(fired so far: {sorted(self.firing)})")

    async def value_becomes(self, expr: str, value: float, timeout: float = 15.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = await self.query(expr)
            if result and all(float(sample["value"][1]) == value for sample in result):
                return
            assert loop.time() < deadline, f"{expr} never became {value}: {result}"
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def running_prometheus(workdir: Path, targets: list[str],
                             rules: str) -> AsyncIterator[PrometheusApi]:
    """Debian's prometheus on 127.0.0.1, scraping `targets` as job "agentloop" every second
    and evaluating `rules` every second; always stopped by its handle."""
    assert PROMETHEUS is not None
    (workdir / "rules.yaml").write_text(rules, encoding="utf-8")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "rule_files": [str(workdir / "rules.yaml")],
        "scrape_configs": [{"job_name": SHIPPED.job,
                            "static_configs": [{"targets": targets}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            stdout=log, stderr=log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            api = PrometheusApi(client)

            async def ready() -> bool:
                assert process.returncode is None, log_path.read_text(errors="replace")
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get("/-/ready", timeout=2)).status_code == 200
                return False

            deadline = time.monotonic() + 30
            while not await ready():
                assert time.monotonic() < deadline, "prometheus never became ready"
                await asyncio.sleep(0.1)
            watcher = asyncio.create_task(api.watch_alerts())
            try:
                yield api
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


def metrics_target(gateway: RunningServer) -> str:
    assert gateway.metrics_port is not None
    return f"127.0.0.1:{gateway.metrics_port}"


def engine_of(gateway: RunningServer) -> EmbeddedBackend:
    backend = gateway.backend.engine
    assert isinstance(backend, EmbeddedBackend), backend
    return backend


async def call(stub: pb_grpc.AgentLoopServiceStub, timeout: float = 30.0,
               **fields: Any) -> grpc.StatusCode:
    """One Generate; its status code."""
    try:
        await stub.Generate(pb.GenerateRequest(prompt="hi", **fields), timeout=timeout)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def create_series(stub: pb_grpc.AgentLoopServiceStub, fake: FakeOllama) -> None:
    """Traffic before Prometheus starts: each status code's series exists before the test
    counts on it (rate() cannot see the first increment of a series it never saw at 0)."""
    fake.enqueue(Script(reset_after=0))  # the connection drops: UNAVAILABLE
    assert await call(stub) == grpc.StatusCode.UNAVAILABLE
    # Two hang in flight, two wait in the queue, one is refused; the deadline ends the rest.
    fake.enqueue(Script(hang_before_headers=True), Script(hang_before_headers=True))
    codes = await asyncio.gather(*(call(stub, timeout=1.5) for _ in range(5)))
    assert sorted(code.name for code in codes) == \
        ["DEADLINE_EXCEEDED"] * 4 + ["RESOURCE_EXHAUSTED"], codes
    deterministic = pb.GenerationOptions(temperature=0, seed=7)
    for options in (None, None, deterministic, deterministic):  # the second one: a cache hit
        assert await call(stub, options=options) == grpc.StatusCode.OK
    [_ async for _ in stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"), timeout=10)]


async def quiet_baseline(api: PrometheusApi, targets: int) -> None:
    """After several scrapes and a full round of evaluations, nothing is pending or firing."""
    expr = f'count_over_time(up{{job="{SHIPPED.job}"}}[10s])'
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not ((result := await api.query(expr)) and len(result) == targets
               and all(float(sample["value"][1]) >= 6 for sample in result)):
        assert loop.time() < deadline, f"too few scrapes: {result}"
        await asyncio.sleep(0.2)
    mark = time.time()
    while True:
        groups = (await api.get("/api/v1/rules"))["groups"]
        evaluated = [group["lastEvaluation"] for group in groups]
        if all(rfc3339_seconds(moment) > mark for moment in evaluated):
            break
        assert loop.time() < deadline, f"rules not evaluated: {evaluated}"
        await asyncio.sleep(0.2)
    assert await api.alerts() == [], "alerts pending or firing while everything is healthy"


def rfc3339_seconds(moment: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", moment)).timestamp()


async def every_panel_has_data(api: PrometheusApi, since: float) -> None:
    board = render.dashboard(SHIPPED)
    for title, expr in render.dashboard_queries(board):
        query = expr.replace("$__rate_interval", RATE_INTERVAL) \
            .replace("$instance", ".*").replace("$job", SHIPPED.job)
        data = await api.get("/api/v1/query_range", query=query, start=f"{since:.3f}",
                             end=f"{time.time():.3f}", step="1")
        values = [float(value) for series in data["result"] for _, value in series["values"]]
        assert any(not math.isnan(value) for value in values), \
            f"panel {title!r} has no data: {query}"


# What the live check does to fire each alert (the closing note of issue 26 lists it).
INDUCED = {
    "AgentLoopQueueNearCapacity": "2 slow generations in flight on a replica with "
                                  "max_in_flight=2, 2 more queued (max_queue=2)",
    "AgentLoopRefusingForCapacity": "the 5th and 6th generation of that burst, refused",
    "AgentLoopMemoryNearLimit": "192 MiB of ballast in the gateway's process",
    "AgentLoopEngineRestarted": "SIGKILL to the embedded engine's process",
    "AgentLoopSlowResponses": "Generate calls that took 10.5 s (first token delayed)",
    "AgentLoopTimeToFirstTokenBudgetBurnFast": "the same calls' 10.5 s first tokens",
    "AgentLoopTimeToFirstTokenBudgetBurnSlow": "the same calls' 10.5 s first tokens",
    "AgentLoopErrorRateHigh": "the fake Ollama stopped: every call UNAVAILABLE",
    "AgentLoopAvailabilityBudgetBurnFast": "the same UNAVAILABLE calls",
    "AgentLoopAvailabilityBudgetBurnSlow": "the same UNAVAILABLE calls",
    "AgentLoopCircuitOpen": "the same calls: 2 backend failures open the breaker",
    "AgentLoopBackendNotReady": "the fake Ollama stopped: readiness 0 at every scrape",
    "AgentLoopReadinessFlapping": "the fake Ollama stopped and started again",
    "AgentLoopDown": "the gateway shut down: its metrics port stops answering",
}


@contextlib.asynccontextmanager
async def error_traffic(stub: pb_grpc.AgentLoopServiceStub) -> AsyncIterator[list[str]]:
    """Generate calls every 0.1 s while the block runs; yields their status names."""
    codes: list[str] = []

    async def loop() -> None:
        while True:
            codes.append((await call(stub, timeout=2)).name)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(loop())
    try:
        yield codes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@needs_prometheus
@pytest.mark.real_model
async def test_every_alert_fires_on_a_real_prometheus(tmp_path: Path) -> None:
    assert set(INDUCED) == set(ALERTS)
    stack = contextlib.AsyncExitStack()
    async with stack:
        fake = await stack.enter_async_context(FakeOllama())
        ollama_settings = gateway_settings(
            ollama_url=fake.url, metrics_listen="127.0.0.1:0", max_in_flight=2, max_queue=2,
            cache_entries=16, circuit_failure_threshold=2, circuit_reset_timeout=1.0,
            read_timeout=30.0)
        ollama_gateway = await start_server(ollama_settings)
        stopped: list[RunningServer] = []

        async def stop(gateway: RunningServer) -> None:
            if gateway not in stopped:
                stopped.append(gateway)
                await gateway.shutdown(grace=0.5, drain_delay=0.0)

        stack.push_async_callback(stop, ollama_gateway)
        embedded_settings = gateway_settings(backend="embedded", metrics_listen="127.0.0.1:0",
                                             num_ctx=1024, read_timeout=60.0)
        embedded_gateway = await start_server(embedded_settings,
                                              backend=EmbeddedBackend(embedded_settings))
        stack.push_async_callback(stop, embedded_gateway)
        engine = engine_of(embedded_gateway)
        # A third replica routes through a pools file: the upstream pools panels' series.
        pool_fake = await stack.enter_async_context(FakeOllama())
        pools_file = tmp_path / "pools.json"
        pools_file.write_text(json.dumps({
            "upstreams": {"local": {"kind": "ollama", "endpoints": [pool_fake.url]}},
            "routes": [{"models": [ollama_settings.model], "pools": ["local"]}]}))
        pools_gateway = await start_server(gateway_settings(
            upstreams=str(pools_file), metrics_listen="127.0.0.1:0"))
        stack.push_async_callback(stop, pools_gateway)
        pools_channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(pools_gateway.address))
        pools_stub = pb_grpc.AgentLoopServiceStub(pools_channel)
        assert await call(pools_stub) == grpc.StatusCode.OK
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(ollama_gateway.address))
        stub = pb_grpc.AgentLoopServiceStub(channel)
        await create_series(stub, fake)

        # The memory limit the rules get: 96 MiB above what the embedded replica (gateway
        # and engine processes) holds now; the ballast later adds 192 MiB.
        ballast_size = 192 << 20
        engine_pid = engine.engine_pid
        assert engine_pid is not None
        held = psutil.Process().memory_info().rss + psutil.Process(engine_pid).memory_info().rss
        limit = int((held + ballast_size // 2) / SHIPPED.memory_ratio)
        params = render.Params.load(time_scale=TIME_SCALE, scrape_interval=SCRAPE_INTERVAL,
                                    memory_limit_bytes=limit)
        rules = render.to_yaml(render.rules_file(params))
        targets = [metrics_target(ollama_gateway), metrics_target(embedded_gateway),
                   metrics_target(pools_gateway)]
        api = await stack.enter_async_context(running_prometheus(tmp_path, targets, rules))
        started = time.time()
        await quiet_baseline(api, len(targets))
        for _ in range(3):  # calls by upstream, after Prometheus saw the series
            assert await call(pools_stub) == grpc.StatusCode.OK
        induced = time.monotonic()

        # 1. A burst on a slow upstream, memory ballast, an engine that dies.
        slow = Script(first_token_delay=10.5)
        fake.enqueue(slow, slow)
        burst = [asyncio.create_task(call(stub)) for _ in range(6)]
        ballast = b"\x01" * ballast_size
        os.kill(engine_pid, signal.SIGKILL)
        await api.fired("AgentLoopQueueNearCapacity", "AgentLoopRefusingForCapacity",
                        "AgentLoopMemoryNearLimit", "AgentLoopEngineRestarted")
        codes = await asyncio.gather(*burst)
        assert sorted(code.name for code in codes) == \
            ["OK"] * 4 + ["RESOURCE_EXHAUSTED"] * 2, codes
        await api.fired("AgentLoopSlowResponses", "AgentLoopTimeToFirstTokenBudgetBurnFast")
        del ballast

        # 2. The backend goes away while calls keep coming.
        await fake.stop()
        async with error_traffic(stub) as errors:
            await api.fired("AgentLoopErrorRateHigh", "AgentLoopAvailabilityBudgetBurnFast",
                            "AgentLoopCircuitOpen", "AgentLoopBackendNotReady")
            # The slow pairs hold for 15 minutes: 30 s here.
            await api.fired("AgentLoopAvailabilityBudgetBurnSlow",
                            "AgentLoopTimeToFirstTokenBudgetBurnSlow", timeout=60)
        assert set(errors) == {"UNAVAILABLE"}, set(errors)

        # 3. The backend comes and goes.
        ready = f'agentloop_backend_ready{{instance="{targets[0]}"}}'
        for _ in range(4):
            if "AgentLoopReadinessFlapping" in api.firing:
                break
            await fake.restart()
            await api.value_becomes(ready, 1)
            await fake.stop()
            await api.value_becomes(ready, 0)
        await api.fired("AgentLoopReadinessFlapping", timeout=5)
        await fake.restart()

        # Every name a rule or panel uses was scraped; every panel has data.
        scraped = set(await api.get("/api/v1/label/__name__/values"))
        missing = used_metric_names(params) - scraped
        assert not missing, f"not in a real scrape: {sorted(missing)}"
        await every_panel_has_data(api, started)

        # 4. A gateway goes away.
        await stop(ollama_gateway)
        await api.fired("AgentLoopDown", timeout=15)

        assert set(api.firing) >= set(ALERTS), set(ALERTS) - set(api.firing)
        for name in sorted(ALERTS, key=api.first_fired.__getitem__):  # shown with -s
            print(f"{api.first_fired[name] - induced:5.1f} s  {name}: {INDUCED[name]}")
        assert api.firing["AgentLoopMemoryNearLimit"] == {targets[1]}
        assert api.firing["AgentLoopEngineRestarted"] == {targets[1]}
        assert targets[0] in api.firing["AgentLoopBackendNotReady"]
        assert api.firing["AgentLoopDown"] == {targets[0]}


def test_the_names_check_sees_every_metric_an_expression_uses() -> None:
    """The live check's name extraction misses no metric: outside selectors and `by (...)`,
    every identifier of the metric families is one it found."""
    board = render.dashboard(SHIPPED)
    expressions = [rule["expr"] for group in render.rule_groups(SHIPPED)
                   for rule in group["rules"]]
    expressions += [expr for _, expr in render.dashboard_queries(board)]
    for expr in expressions:
        bare = re.sub(r"\{[^}]*\}|\b(by|on|ignoring|without) \([^)]*\)", " ", expr)
        bare = re.sub(r"[A-Za-z_]*:[A-Za-z0-9_:]*", " ", bare)  # recording rules
        names = set(re.findall(r"\b(?:agentloop|gen_ai|rpc|process)_\w+|\bup\b", bare))
        assert names <= metric_names(expr), (expr, names - metric_names(expr))
