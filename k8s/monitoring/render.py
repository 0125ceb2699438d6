"""The one source of agentloop's alert rules and Grafana dashboard; renders them all.

    python k8s/monitoring/render.py          # (or `make monitoring`) write the files below
    python k8s/monitoring/render.py --check  # exit 1 if a written file is stale

From slo.yaml (the operator's thresholds and SLOs) it writes, beside itself:

- agentloop-rules.yaml: a plain Prometheus rules file (`rule_files:`);
- prometheusrule.yaml: the same groups as a PrometheusRule for the Prometheus operator;
- dashboard.json: a provisionable Grafana dashboard.

The live test (tests/test_alerts.py) renders a variant with `time_scale`: every range
window and `for:` duration divided by it, so alerts meant to need minutes fire in seconds
against a 1 s scrape. The expressions, thresholds and metric names stay those shipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
SLO_FILE = HERE / "slo.yaml"
RULES_FILE = HERE / "agentloop-rules.yaml"
PROMETHEUS_RULE_FILE = HERE / "prometheusrule.yaml"
DASHBOARD_FILE = HERE / "dashboard.json"
RUNBOOK = "docs/observability.md"

SERVICE = "agentloop.v1.AgentLoopService"
# gRPC codes that are the server's fault (the server spans' ERROR set, telemetry_interceptor
# .py): UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS. A
# caller's own mistakes (INVALID_ARGUMENT, NOT_FOUND, ...) spend no error budget.
SERVER_FAULTS = "2|4|12|13|14|15"
RESOURCE_EXHAUSTED = "8"
# gen_ai_server_time_to_first_token_seconds's buckets (telemetry/metrics.py): an SLO
# threshold must be one of them, as the exporter writes it in `le`.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
# Burn rates of the SRE workbook's multi-window alerts (a 30-day budget): the fast pair
# spends 2 % of the budget in an hour, the slow pair 5 % in six hours.
FAST_BURN = (14.4, 3600, 300)  # rate, long window, short window (seconds)
SLOW_BURN = (6.0, 6 * 3600, 1800)
# The windows the SLO recording rules keep, named by their shipped length.
SLO_WINDOWS = {"5m": 300, "30m": 1800, "1h": 3600, "6h": 6 * 3600}


@dataclasses.dataclass(frozen=True)
class Params:
    """slo.yaml, plus the test's time scale."""

    job: str
    scrape_interval: float
    response_time_seconds: float
    error_rate: float
    memory_ratio: float
    memory_limit_bytes: int
    failed_health_checks: int
    availability_target: float
    ttft_threshold_seconds: float
    ttft_target: float
    queue_near_cap: float
    capacity_refusals: float
    flapping_changes: int
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.ttft_threshold_seconds not in TTFT_BUCKETS:
            raise ValueError(f"ttft_threshold_seconds must be a bucket boundary: {TTFT_BUCKETS}")
        for name in ("availability_target", "ttft_target"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be between 0 and 1")

    @classmethod
    def load(cls, path: Path = SLO_FILE, **overrides: Any) -> Params:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
        values["scrape_interval"] = parse_duration(str(values["scrape_interval"]))
        values.update(overrides)
        return cls(**values)

    def window(self, seconds: float) -> str:
        """A range window, scaled; never under four scrapes (rate() needs two samples)."""
        return duration(max(seconds / self.time_scale, 4 * self.scrape_interval))

    def hold(self, seconds: float) -> str:
        """A `for:` duration, scaled."""
        return duration(seconds / self.time_scale)


def parse_duration(text: str) -> float:
    """Seconds of a Prometheus duration with one unit ("15s", "1m")."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match[2]]


def duration(seconds: float) -> str:
    """Prometheus's duration notation in the largest unit that divides it (at least 1s)."""
    millis = max(round(seconds * 1000), 1000)
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if millis % size == 0:
            return f"{millis // size}{unit}"
    return f"{millis}ms"


def number(value: float) -> str:
    """A threshold as PromQL reads it: no float noise (14.4 * 0.005 is 0.072)."""
    return f"{value:.6g}"


def binary_bytes(count: int) -> str:
    """1073741824 -> "1 GiB" (in the largest unit that divides it)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count % size == 0:
            return f"{count // size} {unit}"
    return f"{count} bytes"


def le_label(bound: float) -> str:
    """A bucket bound as the OpenTelemetry Prometheus exporter writes `le`."""
    return str(float(bound))


# --- the rules --------------------------------------------------------------------------

def selector(p: Params, **labels: str) -> str:
    """`{job="agentloop", name="value", ...}`; a value starting with `~` is a regex match."""
    matchers = [f'job="{p.job}"'] + [
        f'{name}=~"{value[1:]}"' if value.startswith("~") else f'{name}="{value}"'
        for name, value in labels.items()]
    return "{" + ", ".join(matchers) + "}"


def rpc_rate(p: Params, window: str, by: str = "job", **labels: str) -> str:
    calls = f"rpc_server_call_duration_seconds_count{selector(p, rpc_service=SERVICE, **labels)}"
    return f"sum by ({by}) (rate({calls}[{window}]))"


def alert(name: str, expr: str, hold: str | None, severity: str, summary: str,
          description: str) -> dict[str, Any]:
    """An alerting rule; `hold` is its `for:` (None: it fires at the first evaluation)."""
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if hold is not None:
        rule["for"] = hold
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": f"{RUNBOOK}#{name.lower()}",
    }
    return rule


def slo_recording_rules(p: Params) -> list[dict[str, Any]]:
    """Error ratios per window: server faults over calls, slow first tokens over firsts."""
    ttft = selector(p)
    le = le_label(p.ttft_threshold_seconds)
    rules = []
    for name, seconds in SLO_WINDOWS.items():
        window = p.window(seconds)
        rules.append({
            "record": f"agentloop:rpc_server_faults:ratio_rate{name}",
            "expr": f"{rpc_rate(p, window, rpc_grpc_status_code='~' + SERVER_FAULTS)}\n"
                    f"/\n{rpc_rate(p, window)}",
        })
        bucket = "gen_ai_server_time_to_first_token_seconds_bucket" \
            f"{selector(p, le=le)}"
        count = f"gen_ai_server_time_to_first_token_seconds_count{ttft}"
        rules.append({
            "record": f"agentloop:ttft_slow:ratio_rate{name}",
            "expr": f"1 - (\n  sum by (job) (rate({bucket}[{window}]))\n  /\n"
                    f"  sum by (job) (rate({count}[{window}]))\n)",
        })
    return rules


@dataclasses.dataclass(frozen=True)
class Slo:
    name: str  # in the alerts' names
    what: str  # in their text
    record: str  # the recording rules' prefix (one per window)
    events: str  # what the ratio counts
    budget: float  # 1 - target


def burn_alerts(p: Params, slo: Slo) -> list[dict[str, Any]]:
    """The fast (page) and slow (warning) pairs of windows over one SLO's recorded ratios."""
    names = {seconds: name for name, seconds in SLO_WINDOWS.items()}
    alerts = []
    for speed, (rate, long, short), hold, severity in (
            ("Fast", FAST_BURN, 120, "critical"), ("Slow", SLOW_BURN, 900, "warning")):
        threshold = number(rate * slo.budget)
        expr = (f"{slo.record}:ratio_rate{names[long]}{{job=\"{p.job}\"}} > {threshold}\nand\n"
                f"{slo.record}:ratio_rate{names[short]}{{job=\"{p.job}\"}} > {threshold}")
        alerts.append(alert(
            f"AgentLoop{slo.name}BudgetBurn{speed}", expr, p.hold(hold), severity,
            f"agentloop is spending its {slo.what} error budget {number(rate)}x too fast",
            f"{slo.what.capitalize()}: {{{{ $value | humanizePercentage }}}} of "
            f"{slo.events} missed the SLO over the last {duration(long)}, and over "
            f"{duration(short)} too; at this rate the 30-day budget lasts "
            f"{30 / rate:.1f} days."))
    return alerts


def plan_alerts(p: Params) -> list[dict[str, Any]]:
    """The plan's four thresholds."""
    generate = "rpc_server_call_duration_seconds_bucket" \
        f"{selector(p, rpc_service=SERVICE, rpc_method='Generate')}"
    resident = f"process_resident_memory_bytes{selector(p)}"
    engine = f"agentloop_engine_process_resident_memory_bytes{selector(p)}"
    ready = f"agentloop_backend_ready{selector(p)}"
    # "More than N failed checks in a row", as Prometheus sees them: every scrape within
    # N + 1.5 intervals saw readiness 0. Such a window always holds N + 1 or N + 2 scrapes, so
    # N zeros after a 1 never fire and N + 2 always do (docs/observability.md).
    scrapes = p.failed_health_checks + 1
    window = duration((scrapes + 0.5) * p.scrape_interval)
    return [
        alert("AgentLoopSlowResponses",
              f"histogram_quantile(0.95,\n  sum by (job, le) (rate({generate}[{p.window(300)}]))"
              f"\n) > {number(p.response_time_seconds)}",
              p.hold(120), "critical",
              f"agentloop's Generate calls take over {number(p.response_time_seconds)} s",
              "The 95th percentile of unary Generate calls over 5 minutes is "
              "{{ $value | humanizeDuration }}."),
        alert("AgentLoopErrorRateHigh",
              # Its own expression, not the recording rule of another group: groups are
              # evaluated independently, and it would lag by one evaluation.
              f"{rpc_rate(p, p.window(300), rpc_grpc_status_code='~' + SERVER_FAULTS)}\n/\n"
              f"{rpc_rate(p, p.window(300))}\n> {number(p.error_rate)}",
              p.hold(60), "critical",
              f"over {number(p.error_rate * 100)} % of agentloop's calls fail",
              "{{ $value | humanizePercentage }} of calls ended with a server fault "
              "(UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS) "
              "across 5 minutes."),
        alert("AgentLoopBackendNotReady",
              f"max by (job, instance) (max_over_time({ready}[{window}])) == 0\n"
              f"and\nmin by (job, instance) (count_over_time({ready}[{window}])) >= {scrapes}",
              None, "critical",
              "an agentloop replica failed more than "
              f"{p.failed_health_checks} health checks in a row",
              "Readiness of {{ $labels.instance }} was 0 at each of its last "
              f"{scrapes} scrapes or more: it takes no traffic."),
        alert("AgentLoopMemoryNearLimit",
              f"(\n  sum by (job, instance) ({resident})\n"
              f"  + (sum by (job, instance) ({engine}) or 0 * sum by (job, instance) "
              f"({resident}))\n) / {p.memory_limit_bytes} > {number(p.memory_ratio)}",
              p.hold(300), "critical",
              f"an agentloop replica uses over {number(p.memory_ratio * 100)} % of its memory",
              "{{ $labels.instance }} (gateway and engine processes) holds "
              "{{ $value | humanizePercentage }} of the "
              f"{binary_bytes(p.memory_limit_bytes)} allocated to it."),
    ]


def engine_alerts(p: Params) -> list[dict[str, Any]]:
    """The engine's own troubles."""
    queued = f"agentloop_requests_queued{selector(p)}"
    limit = f"agentloop_requests_queued_limit{selector(p)}"
    window = p.window(300)
    return [
        alert("AgentLoopQueueNearCapacity",
              f"sum by (job, instance) ({queued})\n/\nmax by (job, instance) ({limit} > 0)\n"
              f"> {number(p.queue_near_cap)}",
              p.hold(120), "warning",
              "an agentloop replica's admission queue is nearly full",
              "{{ $labels.instance }} has {{ $value | humanizePercentage }} of its queue "
              "places taken: the next burst is refused."),
        alert("AgentLoopRefusingForCapacity",
              f"{rpc_rate(p, window, rpc_grpc_status_code=RESOURCE_EXHAUSTED)}\n/\n"
              f"{rpc_rate(p, window)}\n> {number(p.capacity_refusals)}",
              p.hold(120), "warning",
              "agentloop refuses calls for want of capacity",
              "{{ $value | humanizePercentage }} of calls were refused with "
              "RESOURCE_EXHAUSTED across 5 minutes."),
        alert("AgentLoopEngineRestarted",
              f"sum by (job, instance) (increase(agentloop_engine_restarts_total"
              f"{selector(p)}[{p.window(900)}])) > 0",
              None, "warning",
              "an agentloop replica's engine process restarted",
              "The embedded engine of {{ $labels.instance }} died or hung and was started "
              "again ({{ $value | humanize }} restart(s) in 15 minutes); the generations it "
              "was running failed with UNAVAILABLE."),
        alert("AgentLoopCircuitOpen",
              f"max by (job, instance) (agentloop_backend_circuit_open{selector(p)}) == 1",
              p.hold(60), "warning",
              "an agentloop replica's circuit breaker is open",
              "{{ $labels.instance }} fails its calls fast after repeated backend failures."),
        alert("AgentLoopReadinessFlapping",
              f"max by (job, instance) (changes(agentloop_backend_ready{selector(p)}"
              f"[{p.window(900)}])) >= {p.flapping_changes}",
              None, "warning",
              "an agentloop replica's readiness keeps changing",
              "Readiness of {{ $labels.instance }} changed {{ $value }} times in 15 minutes."),
        alert("AgentLoopDown",
              f"up{selector(p)} == 0",
              p.hold(60), "critical",
              "Prometheus cannot scrape an agentloop replica",
              "{{ $labels.instance }} does not answer on its metrics port: the process is "
              "gone, or its metrics listener is."),
    ]


def rule_groups(p: Params) -> list[dict[str, Any]]:
    return [
        {"name": "agentloop-slo", "rules": [
            *slo_recording_rules(p),
            *burn_alerts(p, Slo("Availability", "availability", "agentloop:rpc_server_faults",
                                "calls", 1 - p.availability_target)),
            *burn_alerts(p, Slo("TimeToFirstToken", "time to first token",
                                "agentloop:ttft_slow", "generations", 1 - p.ttft_target)),
        ]},
        {"name": "agentloop-plan", "rules": plan_alerts(p)},
        {"name": "agentloop-engine", "rules": engine_alerts(p)},
    ]


def rules_file(p: Params) -> dict[str, Any]:
    return {"groups": rule_groups(p)}


def prometheus_rule(p: Params) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "agentloop",
            "labels": {"app.kubernetes.io/name": "agentloop",
                       "app.kubernetes.io/component": "monitoring"},
        },
        "spec": {"groups": rule_groups(p)},
    }


def alerts(p: Params) -> list[dict[str, Any]]:
    """Every alerting rule, in order."""
    return [rule for group in rule_groups(p) for rule in group["rules"] if "alert" in rule]


# --- the dashboard ----------------------------------------------------------------------

DASHBOARD_SELECTOR = 'job=~"$job", instance=~"$instance"'
RATE = "$__rate_interval"


def _dashboard_selector(**labels: str) -> str:
    extra = "".join(f', {name}="{value}"' for name, value in labels.items())
    return "{" + DASHBOARD_SELECTOR + extra + "}"


def _quantiles(metric: str, by: str = "", **labels: str) -> list[tuple[str, str]]:
    group = f"{by}, le" if by else "le"
    legend_by = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) "
             f"(rate({metric}_bucket{_dashboard_selector(**labels)}[{RATE}])))",
             f"{legend_by}P{round(q * 100)}") for q in (0.5, 0.95, 0.99)]


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    answers: str  # what the panel answers (docs/observability.md repeats it)
    targets: tuple[tuple[str, str], ...]  # (expr, legend)
    unit: str = "short"


def panel_rows(p: Params) -> list[tuple[str, list[Panel]]]:
    rpc = _dashboard_selector(rpc_service=SERVICE)
    failed = "{" + DASHBOARD_SELECTOR + f', rpc_service="{SERVICE}", rpc_grpc_status_code!="0"}}'
    sel = _dashboard_selector()
    tokens = f"gen_ai_client_token_usage_sum{sel}"
    return [
        ("Traffic", [
            Panel("Requests by method and code", "How many calls each method serves, and with "
                  "which gRPC status code (0 is OK).",
                  ((f"sum by (rpc_method, rpc_grpc_status_code) "
                    f"(rate(rpc_server_call_duration_seconds_count{rpc}[{RATE}]))",
                    "{{rpc_method}} {{rpc_grpc_status_code}}"),), "reqps"),
            Panel("Errors by method and code", "Which calls fail, and how: every status "
                  "but OK, by method and code.",
                  ((f"sum by (rpc_method, rpc_grpc_status_code) "
                    f"(rate(rpc_server_call_duration_seconds_count{failed}[{RATE}]))",
                    "{{rpc_method}} {{rpc_grpc_status_code}}"),), "reqps"),
            Panel("Server-fault ratio", "The share of calls that spend the availability "
                  f"budget (SLO: {number(p.availability_target * 100)} % succeed).",
                  ((f'sum by (job) (rate(rpc_server_call_duration_seconds_count{{'
                    f'{DASHBOARD_SELECTOR}, rpc_service="{SERVICE}", '
                    f'rpc_grpc_status_code=~"{SERVER_FAULTS}"}}[{RATE}]))\n/\n'
                    f"sum by (job) (rate(rpc_server_call_duration_seconds_count{rpc}"
                    f"[{RATE}]))", "{{job}}"),), "percentunit"),
        ]),
        ("Latency", [
            Panel("Call latency P50 / P95 / P99", "How long calls take, by method (streams: "
                  "until their last message).",
                  tuple(_quantiles("rpc_server_call_duration_seconds", "rpc_method",
                                   rpc_service=SERVICE)), "s"),
            Panel("Time to first token P50 / P95 / P99", "How long callers wait for the first "
                  f"token, queueing included (SLO: {number(p.ttft_target * 100)} % within "
                  f"{number(p.ttft_threshold_seconds)} s).",
                  tuple(_quantiles("gen_ai_server_time_to_first_token_seconds")), "s"),
        ]),
        ("Tokens", [
            Panel("Tokens per second in and out", "How many prompt tokens the engines read "
                  "and how many they write, per second, over all replicas.",
                  ((f"sum by (gen_ai_token_type) (rate({tokens}[{RATE}]))",
                    "{{gen_ai_token_type}}"),), "short"),
            Panel("Output tokens per second per generation", "How fast one generation "
                  "streams once it has started (1 / time per output token, median).",
                  (("1 / histogram_quantile(0.5, sum by (le) (rate("
                    f"gen_ai_server_time_per_output_token_seconds_bucket{sel}[{RATE}])))",
                    "median"),), "short"),
        ]),
        ("Admission", [
            Panel("In flight and queued", "How full each replica's admission is: "
                  "generations running and waiting, against their limits.",
                  ((f"sum by (instance) (agentloop_requests_in_flight{sel})",
                    "{{instance}} in flight"),
                   (f"sum by (instance) (agentloop_requests_queued{sel})",
                    "{{instance}} queued"),
                   (f"max by (instance) (agentloop_requests_in_flight_limit{sel})",
                    "{{instance}} in-flight limit"),
                   (f"max by (instance) (agentloop_requests_queued_limit{sel})",
                    "{{instance}} queue limit")), "short"),
            Panel("Admission refusals", "How many calls are turned away for capacity "
                  "(RESOURCE_EXHAUSTED), by method.",
                  ((f"sum by (rpc_method) (rate(rpc_server_call_duration_seconds_count"
                    f"{_dashboard_selector(rpc_service=SERVICE, rpc_grpc_status_code='8')}"
                    f"[{RATE}]))", "{{rpc_method}}"),), "reqps"),
        ]),
        ("Engine and caches", [
            Panel("Engine slots", "How busy the embedded engines are: slots holding a "
                  "sequence against the slots there are, and requests waiting for one.",
                  ((f"sum by (instance) (agentloop_engine_slots_usage{sel})",
                    "{{instance}} in use"),
                   (f"sum by (instance) (agentloop_engine_slots_limit{sel})",
                    "{{instance}} slots"),
                   (f"sum by (instance) (agentloop_engine_requests_waiting{sel})",
                    "{{instance}} waiting")), "short"),
            Panel("Engine KV cache", "How full the embedded engines' KV caches are.",
                  ((f"sum by (instance) (agentloop_engine_cache_usage{sel})\n/\n"
                    f"sum by (instance) (agentloop_engine_cache_limit{sel})",
                    "{{instance}}"),), "percentunit"),
            Panel("Response cache", "How deterministic generations were served: from the "
                  "cache (hits), generated (misses), or joined to one in flight (coalesced).",
                  ((f"sum by (agentloop_cache_result) (rate(agentloop_cache_lookups_total{sel}"
                    f"[{RATE}]))", "{{agentloop_cache_result}}"),), "reqps"),
        ]),
        ("Health", [
            Panel("Readiness", "Which replicas take traffic (1) and which do not (0).",
                  ((f"max by (instance) (agentloop_backend_ready{sel})", "{{instance}}"),),
                  "short"),
            Panel("Circuit breaker, restarts and retries", "Whether a replica fails fast "
                  "(circuit open), how often its engine restarted, and how many backend "
                  "calls were sent again.",
                  ((f"max by (instance) (agentloop_backend_circuit_open{sel})",
                    "{{instance}} circuit open"),
                   (f"sum by (instance) (increase(agentloop_engine_restarts_total{sel}"
                    f"[{RATE}]))", "{{instance}} engine restarts"),
                   (f"sum by (instance) (rate(agentloop_backend_retries_total{sel}"
                    f"[{RATE}]))", "{{instance}} retries/s")), "short"),
            Panel("Memory", "How close each replica is to its memory limit (the gateway's "
                  "and the engine's resident memory).",
                  ((f"sum by (instance) (process_resident_memory_bytes{sel})",
                    "{{instance}} gateway"),
                   (f"sum by (instance) (agentloop_engine_process_resident_memory_bytes{sel})",
                    "{{instance}} engine"),
                   (f"vector({p.memory_limit_bytes})", "limit")), "bytes"),
        ]),
        (POOLS_AND_TENANTS_ROW, [
            Panel("Calls by upstream", "Where calls were served: the operator's upstream "
                  "pools (a pools file; empty without one), and how often a call spilled "
                  "to the next pool of its route.",
                  ((f"sum by (agentloop_upstream) (rate(gen_ai_client_operation_duration_"
                    f"seconds_count{_dashboard_selector()[:-1]}, agentloop_upstream!=\"\"}}"
                    f"[{RATE}]))", "{{agentloop_upstream}}"),
                   (f"sum by (agentloop_upstream) (rate(agentloop_upstream_overflows_total"
                    f"{sel}[{RATE}]))", "{{agentloop_upstream}} spilled")), "reqps"),
            Panel("Upstream pools", "How busy each pool is: calls on its endpoints, calls "
                  "waiting for one, and endpoints available (healthy, circuit closed).",
                  ((f"sum by (agentloop_upstream) (agentloop_upstream_requests_in_flight"
                    f"{sel})", "{{agentloop_upstream}} in flight"),
                   (f"sum by (agentloop_upstream) (agentloop_upstream_requests_queued{sel})",
                    "{{agentloop_upstream}} queued"),
                   (f"min by (agentloop_upstream) (agentloop_upstream_endpoints_available"
                    f"{sel})", "{{agentloop_upstream}} endpoints")), "short"),
            Panel("Prompt cache by upstream", "How much of each pool's prompt tokens the "
                  "engines served from their prefix caches (where they say: vLLM, SGLang, "
                  "llama.cpp's servers; Ollama never does).",
                  ((f"sum by (agentloop_upstream) (rate("
                    f"agentloop_upstream_prompt_tokens_cached_total{sel}[{RATE}]))\n/\n"
                    f"sum by (agentloop_upstream) (rate(agentloop_upstream_prompt_tokens_total"
                    f"{sel}[{RATE}]))", "{{agentloop_upstream}}"),), "percentunit"),
            Panel("Cache-aware picks", "How each pool placed generations: picks sent where "
                  "the prompt's prefix was cached, and picks where the load bound overrode "
                  "the cache.",
                  ((f"sum by (agentloop_upstream) (rate(agentloop_upstream_picks_cache_total"
                    f"{sel}[{RATE}]))", "{{agentloop_upstream}} for cache"),
                   (f"sum by (agentloop_upstream) (rate(agentloop_upstream_picks_load_total"
                    f"{sel}[{RATE}]))", "{{agentloop_upstream}} for load")), "reqps"),
            Panel("Tokens by tenant", "What each tenant spends, input and output (callers "
                  "without a key are `_default`).",
                  ((f"sum by (agentloop_tenant, gen_ai_token_type) (rate({tokens}[{RATE}]))",
                    "{{agentloop_tenant}} {{gen_ai_token_type}}"),), "short"),
            Panel("Admission by tenant", "Who waits for a slot and who is refused: each "
                  "tenant's queue wait P95 and refusals by reason (queue full, timeout, "
                  "shed, quota).",
                  ((f"histogram_quantile(0.95, sum by (agentloop_tenant, le) (rate("
                    f"agentloop_admission_queue_wait_seconds_bucket{sel}[{RATE}])))",
                    "{{agentloop_tenant}} wait P95"),
                   (f"sum by (agentloop_tenant, agentloop_refusal_reason) (rate("
                    f"agentloop_admission_refusals_total{sel}[{RATE}]))",
                    "{{agentloop_tenant}} refused {{agentloop_refusal_reason}}")), "short"),
        ]),
    ]


POOLS_AND_TENANTS_ROW = "Upstream pools and tenants"


def dashboard(p: Params) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for row, row_panels in panel_rows(p):
        panels.append({"id": next_id, "type": "row", "title": row, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        width = 24 // len(row_panels)
        for index, panel in enumerate(row_panels):
            panels.append({
                "id": next_id,
                "type": "timeseries",
                "title": panel.title,
                "description": panel.answers,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": width, "x": index * width, "y": y},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                            "tooltip": {"mode": "multi"}},
                "targets": [{"refId": chr(ord("A") + n), "expr": expr, "legendFormat": legend,
                             "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                            for n, (expr, legend) in enumerate(panel.targets)],
            })
            next_id += 1
        y += 8
    label = "agentloop_backend_ready"
    return {
        "uid": "agentloop",
        "title": "agentloop",
        "description": "agentloop gateways: traffic, latency, tokens, admission, engines, "
                       "health. Rendered by k8s/monitoring/render.py; docs/observability.md "
                       "says what each panel answers.",
        "tags": ["agentloop", "llm", "grpc"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            {"name": "job", "label": "Job", "type": "query",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": f"label_values({label}, job)", "refId": "job"},
             "definition": f"label_values({label}, job)", "refresh": 2,
             "current": {"text": p.job, "value": p.job}, "includeAll": False, "multi": False},
            {"name": "instance", "label": "Instance", "type": "query",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": f'label_values({label}{{job=~"$job"}}, instance)',
                       "refId": "instance"},
             "definition": f'label_values({label}{{job=~"$job"}}, instance)', "refresh": 2,
             "includeAll": True, "allValue": ".*", "multi": True,
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def dashboard_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expression) of every query in the dashboard."""
    found = []
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    return found


# --- writing ----------------------------------------------------------------------------

HEADER = "# Rendered by k8s/monitoring/render.py from slo.yaml: edit those, then `make " \
    "monitoring`.\n"


def to_yaml(document: dict[str, Any]) -> str:
    class Literal(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Literal.add_representer(str, text)
    return HEADER + yaml.dump(document, Dumper=Literal, sort_keys=False, width=100)


def rendered(p: Params) -> dict[Path, str]:
    return {
        RULES_FILE: to_yaml(rules_file(p)),
        PROMETHEUS_RULE_FILE: to_yaml(prometheus_rule(p)),
        DASHBOARD_FILE: json.dumps(dashboard(p), indent=2) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered(Params.load()).items():
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"stale: {', '.join(stale)}; run `make monitoring`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
