"""One frozen settings object: CLI flags over AGENTLOOP_* environment variables over defaults.

Every setting is a field of `Settings` with its help text in the field's metadata, so the
CLI flags, the environment names and the README table all come from one place.
`Settings.__post_init__` validates the whole object, so a bad value stops the server at
start with a message naming the flag and the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "AGENTLOOP_"
BACKEND_CHOICES = ("auto", "ollama", "embedded")
LOG_LEVELS = ("debug", "info", "warning", "error")


class SettingsError(ValueError):
    """A setting has a bad value; the message names the flag and the variable."""


def _setting(default: Any, help: str, group: str = "server", **extra: Any) -> Any:
    """Declare one setting: its default, the help text and its README group."""
    return field(default=default, metadata={"help": help, "group": group, **extra})


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_host_port(text: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:PORT); port 0 means any free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server can be told. Build it with `load_settings`."""

    # --- server ---
    listen: str = _setting(
        "127.0.0.1:50051", "gRPC listen address HOST:PORT (port 0 = any free port)"
    )
    backend: str = _setting(
        "auto",
        "engine: ollama, embedded, or auto (Ollama if it answers at start, else embedded)",
        choices=BACKEND_CHOICES,
    )
    model: str = _setting(
        "gemma3n:e2b", "default model when a request leaves `model` empty (Ollama)"
    )
    workers: int = _setting(
        1,
        "server processes sharing the listen port (SO_REUSEPORT), one event loop each; "
        "needs a fixed port",
    )
    max_connection_age: float = _setting(
        300.0,
        "seconds before the server asks a client connection to go away (GOAWAY), so "
        "long-lived channels re-resolve and spread over new replicas; 0 = never",
    )
    max_connection_age_grace: float = _setting(
        30.0, "seconds calls on a connection told to go away may still take to finish"
    )
    reflection: bool = _setting(True, "serve gRPC server reflection (grpcurl list/describe)")
    log_level: str = _setting("info", "log level: debug, info, warning, error", choices=LOG_LEVELS)
    health_interval: float = _setting(
        2.0, "seconds between background readiness checks of the backend", group="health"
    )
    health_timeout: float = _setting(
        1.0, "seconds one readiness check may take before the backend is down", group="health"
    )
    drain_delay: float = _setting(
        2.0,
        "seconds between reporting NOT_SERVING and closing the listener on SIGTERM",
        group="health",
    )
    shutdown_grace: float = _setting(
        20.0, "seconds in-flight RPCs get to finish after the listener closes", group="health"
    )

    # --- ollama backend ---
    ollama_url: str = _setting(
        "http://127.0.0.1:11434", "base URL of the Ollama server", group="ollama"
    )
    connect_timeout: float = _setting(2.0, "seconds to open a connection to Ollama", group="ollama")
    read_timeout: float = _setting(
        300.0,
        "seconds Ollama may stay silent (before the first token or between tokens)",
        group="ollama",
    )
    pool_timeout: float = _setting(
        5.0, "seconds to wait for a free pooled connection to Ollama", group="ollama"
    )
    max_connections: int = _setting(
        1000, "most open connections to Ollama (the pool's size)", group="ollama"
    )
    keep_alive: str = _setting(
        "5m",
        "how long Ollama keeps the model loaded after a request (Ollama duration, e.g. 5m, -1)",
        group="ollama",
    )

    # --- embedded backend ---
    gguf: str = _setting(
        "",
        "GGUF file for the embedded engine; empty = the Gemma 3 270M from its PyPI package",
        group="embedded",
    )
    model_cache_dir: str = _setting(
        "",
        "directory the packaged Gemma 3 270M GGUF is assembled into on first use; "
        "empty = $XDG_CACHE_HOME/agentloop or ~/.cache/agentloop",
        group="embedded",
    )

    # --- generation defaults (used when a request leaves an option unset) ---
    temperature: float = _setting(0.7, "default sampling temperature", group="generation")
    top_p: float = _setting(0.9, "default nucleus sampling top_p", group="generation")
    top_k: int = _setting(40, "default top_k", group="generation")
    repeat_penalty: float = _setting(1.1, "default repeat penalty", group="generation")
    max_tokens: int = _setting(2048, "default most new tokens per generation", group="generation")
    num_ctx: int = _setting(8192, "default context window in tokens", group="generation")

    # --- admission control ---
    max_in_flight: int = _setting(
        0,
        "generations run at once per replica (0 = the backend's parallelism: 4 for Ollama, "
        "1 for embedded); match OLLAMA_NUM_PARALLEL",
        group="admission",
    )
    max_queue: int = _setting(
        64, "generations that may wait for a slot; beyond it RESOURCE_EXHAUSTED", group="admission"
    )
    queue_timeout: float = _setting(
        30.0, "seconds a request may wait for a slot (then RESOURCE_EXHAUSTED)", group="admission"
    )

    # --- request limits ---
    max_tokens_cap: int = _setting(
        8192, "largest max_tokens a request may ask for", group="limits"
    )
    max_prompt_bytes: int = _setting(
        262144, "largest prompt + system + messages text, in UTF-8 bytes", group="limits"
    )
    max_messages: int = _setting(256, "most chat messages in one request", group="limits")
    max_image_bytes: int = _setting(
        8388608, "largest total size of the images in one request, in bytes", group="limits"
    )
    max_message_bytes: int = _setting(
        33554432,
        "largest gRPC message the server accepts, in bytes (beyond: RESOURCE_EXHAUSTED)",
        group="limits",
    )

    # --- agent loop ---
    agent_max_steps: int = _setting(
        8, "most steps an agent run may take (caps a request's max_steps)", group="agent"
    )
    agent_default_steps: int = _setting(
        4, "steps an agent run takes when the request leaves max_steps 0", group="agent"
    )
    tool_timeout: float = _setting(
        10.0, "seconds one tool call (server or client tool) may take", group="agent"
    )
    max_observation_bytes: int = _setting(
        4096, "largest tool result shown to the model, in UTF-8 bytes (cut beyond)", group="agent"
    )
    mcp_servers: str = _setting(
        "",
        "file (JSON or YAML) listing MCP servers whose tools the agent may use, named "
        "<server>__<tool> (see the README's agent section); empty = none",
        group="agent",
    )

    # --- telemetry (OpenTelemetry itself follows the standard OTEL_* variables) ---
    metrics_listen: str = _setting(
        "127.0.0.1:9464",
        "Prometheus /metrics listen address HOST:PORT (port 0 = any free port, empty = off); "
        "worker N of --workers serves on PORT+N",
        group="telemetry",
    )
    trace_content: bool = _setting(
        False,
        "put prompts, answers and tool arguments and results into spans (off: counts only)",
        group="telemetry",
    )

    # --- resilience: retries, circuit breaker, warm-up, response cache ---
    retry_attempts: int = _setting(
        2,
        "extra attempts for a generation that failed before its first token (connect error, "
        "reset before headers, HTTP 503); 0 = no retries",
        group="resilience",
    )
    retry_backoff: float = _setting(
        0.1, "seconds of the first retry's backoff (doubles per attempt, full jitter)",
        group="resilience",
    )
    retry_backoff_max: float = _setting(
        2.0, "most seconds of one retry's backoff", group="resilience"
    )
    circuit_failure_threshold: int = _setting(
        5, "consecutive backend failures that open the circuit (calls then fail fast)",
        group="resilience",
    )
    circuit_reset_timeout: float = _setting(
        10.0, "seconds the circuit stays open before a half-open probe", group="resilience"
    )
    warm_up: bool = _setting(
        True,
        "load the model (an empty request with keep_alive) at start and whenever the backend "
        "comes back; readiness waits for it",
        group="resilience",
    )
    pull_model: bool = _setting(
        False, "pull the model first during warm-up when Ollama lacks it", group="resilience"
    )
    cache_entries: int = _setting(
        0,
        "responses kept for identical deterministic requests (temperature 0 or a seed), "
        "LRU; 0 = no cache",
        group="resilience",
    )
    cache_ttl: float = _setting(
        300.0, "seconds a cached response stays valid", group="resilience"
    )

    # --- security: API keys, rate limits, TLS ---
    # repr=False: raw keys stay out of logs and tracebacks.
    api_keys: str = field(default="", repr=False, metadata={
        "help": "accepted API keys, comma-separated (prefer api_keys_file); empty and no file "
                "= no authentication",
        "group": "security",
    })
    api_keys_file: str = _setting(
        "", "file of accepted API keys, one per line, # starts a comment", group="security"
    )
    auth_exempt: str = _setting(
        "grpc.health.v1.Health,grpc.reflection.v1.ServerReflection,"
        "grpc.reflection.v1alpha.ServerReflection",
        "gRPC services callable without an API key, comma-separated",
        group="security",
    )
    rate_limit: float = _setting(
        0.0,
        "calls per second per client (API key, else peer address), token bucket; 0 = no limit",
        group="security",
    )
    rate_burst: int = _setting(
        10, "calls a client may make at once before rate_limit applies", group="security"
    )
    tls_cert: str = _setting(
        "", "PEM certificate chain for TLS on the gRPC port; empty = plaintext", group="security"
    )
    tls_key: str = _setting("", "PEM private key of tls_cert", group="security")
    tls_client_ca: str = _setting(
        "", "PEM CA bundle: require client certificates signed by it (mutual TLS)",
        group="security",
    )

    def __post_init__(self) -> None:
        errors = list(_validate(self))
        if errors:
            raise SettingsError("; ".join(errors))

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_host_port(self.listen)


def _validate(s: Settings) -> Sequence[str]:
    """Yield one message per bad value, naming the flag and the variable."""
    errors: list[str] = []

    def bad(name: str, why: str) -> None:
        errors.append(f"{flag_name(name)} / {env_name(name)}: {why}")

    for f in dataclasses.fields(s):
        choices = f.metadata.get("choices")
        if choices and getattr(s, f.name) not in choices:
            bad(f.name, f"must be one of {', '.join(choices)}, got {getattr(s, f.name)!r}")
    try:
        parse_host_port(s.listen)
    except ValueError as exc:
        bad("listen", str(exc))
    url = urlsplit(s.ollama_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        bad("ollama_url", f"expected an http(s) URL, got {s.ollama_url!r}")
    for name in ("connect_timeout", "read_timeout", "pool_timeout", "health_interval",
                 "health_timeout", "queue_timeout"):
        if getattr(s, name) <= 0:
            bad(name, "must be > 0")
    for name in ("drain_delay", "shutdown_grace", "max_in_flight", "max_queue",
                 "max_connection_age", "max_connection_age_grace"):
        if getattr(s, name) < 0:
            bad(name, "must be >= 0")
    for name in ("max_connections", "max_tokens", "num_ctx", "max_tokens_cap", "max_prompt_bytes",
                 "max_messages", "max_image_bytes"):
        if getattr(s, name) < 1:
            bad(name, "must be >= 1")
    if s.workers < 1:
        bad("workers", "must be >= 1")
    elif s.workers > 1 and s.listen.endswith(":0"):
        bad("workers", "several workers need a fixed port in --listen, not port 0")
    if s.max_tokens > s.max_tokens_cap:
        bad("max_tokens", f"must not exceed max_tokens_cap ({s.max_tokens_cap})")
    if s.temperature < 0:
        bad("temperature", "must be >= 0")
    if not 0 <= s.top_p <= 1:
        bad("top_p", "must be in [0, 1]")
    if s.top_k < 0:
        bad("top_k", "must be >= 0")
    if s.repeat_penalty <= 0:
        bad("repeat_penalty", "must be > 0")
    if not s.model:
        bad("model", "must not be empty")
    if s.tool_timeout <= 0:
        bad("tool_timeout", "must be > 0")
    if s.agent_max_steps < 1:
        bad("agent_max_steps", "must be >= 1")
    if not 1 <= s.agent_default_steps <= s.agent_max_steps:
        bad("agent_default_steps", f"must be in [1, agent_max_steps ({s.agent_max_steps})]")
    if s.max_observation_bytes < 256:
        bad("max_observation_bytes", "must be >= 256")
    if s.metrics_listen:
        try:
            parse_host_port(s.metrics_listen)
        except ValueError as exc:
            bad("metrics_listen", str(exc))
    _validate_resilience_and_security(s, bad)
    return errors


def _validate_resilience_and_security(s: Settings, bad: Callable[[str, str], None]) -> None:
    for name in ("retry_backoff", "retry_backoff_max", "circuit_reset_timeout", "cache_ttl"):
        if getattr(s, name) <= 0:
            bad(name, "must be > 0")
    for name in ("retry_attempts", "cache_entries", "rate_limit"):
        if getattr(s, name) < 0:
            bad(name, "must be >= 0")
    for name in ("circuit_failure_threshold", "rate_burst"):
        if getattr(s, name) < 1:
            bad(name, "must be >= 1")
    if s.retry_backoff_max < s.retry_backoff:
        bad("retry_backoff_max", f"must be >= retry_backoff ({s.retry_backoff})")
    if s.max_message_bytes < 1024:
        bad("max_message_bytes", "must be >= 1024")
    for name in ("api_keys_file", "tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(s, name)
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            bad(name, f"no readable file at {path!r}")
    if bool(s.tls_cert) != bool(s.tls_key):
        bad("tls_key" if s.tls_cert else "tls_cert", "tls_cert and tls_key go together")
    if s.tls_client_ca and not s.tls_cert:
        bad("tls_client_ca", "mutual TLS needs tls_cert and tls_key too")
    if any(any(c.isspace() or c == "#" for c in key) for key in parse_list(s.api_keys)):
        bad("api_keys", "an API key must not contain spaces or #")


def parse_list(text: str) -> list[str]:
    """A comma-separated setting as a list, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _converter(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    types: dict[str, type] = {"bool": bool, "int": int, "float": float}
    kind = f.type if isinstance(f.type, type) else types.get(str(f.type), str)
    return parse_bool if kind is bool else kind


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; unset flags stay None so the environment shows through."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Settings):
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"{group_name} settings")
        groups[group_name].add_argument(
            flag_name(f.name),
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} (env {env_name(f.name)}, default {f.default!r})",
        )


def load_settings(
    cli: Mapping[str, Any] | argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings: keyword overrides > CLI values > AGENTLOOP_* variables > defaults."""
    environ = os.environ if environ is None else environ
    cli_values = vars(cli) if isinstance(cli, argparse.Namespace) else dict(cli or {})
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        convert = _converter(f)
        raw, source = None, ""
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        if cli_values.get(f.name) is not None:
            raw, source = cli_values[f.name], flag_name(f.name)
        elif env_name(f.name) in environ:
            raw, source = environ[env_name(f.name)], env_name(f.name)
        if raw is None:
            continue
        try:
            values[f.name] = convert(raw) if isinstance(raw, str) else raw
        except ValueError as exc:
            raise SettingsError(f"{source}: {exc}") from None
    return Settings(**values)


def settings_table() -> str:
    """The README's settings table, in Markdown."""
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(Settings):
        default = f.default if f.default != "" else "(empty)"
        rows.append(
            f"| `{flag_name(f.name)}` | `{env_name(f.name)}` | `{default}` | {f.metadata['help']} |"
        )
    return "\n".join(rows)


SETTINGS_BEGIN = "<!-- settings:begin (make docs writes this table from config.py) -->"
SETTINGS_END = "<!-- settings:end -->"


def update_readme(path: str) -> None:
    """Rewrite the settings table between the README's markers (`make docs`)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    head, _, rest = text.partition(SETTINGS_BEGIN)
    _, _, tail = rest.partition(SETTINGS_END)
    if not rest:
        raise SystemExit(f"{path}: no {SETTINGS_BEGIN} marker")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"{head}{SETTINGS_BEGIN}\n{settings_table()}\n{SETTINGS_END}{tail}")
