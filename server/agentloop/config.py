"""One frozen settings object: CLI flags over AGENTLOOP_* environment variables over defaults.

Every setting is a field of `Settings` with its help text and the rules its value keeps
(choices, bounds, format) declared with it, so the CLI flags, the environment names, the
validation and the settings table (settings_doc.py) all come from one place.
`Settings.__post_init__` checks every field's rules, then the few rules that tie settings
together, so a bad value stops the server at start with a message naming the flag and the
variable.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from agentloop.ranges import OPTION_RANGES, Range

ENV_PREFIX = "AGENTLOOP_"
BACKEND_CHOICES = ("auto", "ollama", "embedded")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: The largest gRPC message: the default receive cap (max_message_bytes) and the send cap.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class SettingsError(ValueError):
    """A setting has a bad value; the message names the flag and the variable."""


@dataclass(frozen=True, slots=True)
class Rules:
    """What one setting's value must satisfy (declared with the field by `_setting`)."""

    choices: tuple[str, ...] = ()
    range: Range | None = None
    #: A number allowed besides `range` (0 = "the engine's default").
    unset: float | None = None
    #: The value must not be empty.
    required: bool = False
    #: Parses a non-empty value; its ValueError says what is wrong.
    check: Callable[[str], object] | None = None

    def problem(self, value: Any, settings: Settings) -> str | None:
        """Why `value` breaks these rules ("must be ..."), or None."""
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        if self.required and not value:
            return "must not be empty"
        if self.check is not None and value:
            try:
                self.check(value)
            except ValueError as exc:
                return str(exc)
        if self.range is None or (self.unset is not None and value == self.unset):
            return None
        problem = self.range.problem(value, settings, name_the_cap=True)
        if problem is None or self.unset is None:
            return problem
        return f"{problem} or {self.unset}"


def _setting(
    default: Any,
    help: str,
    group: str = "server",
    *,
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | str | None = None,
    option: str = "",
    unset: float | None = None,
    required: bool = False,
    check: Callable[[str], object] | None = None,
    repr: bool = True,
) -> Any:
    """Declare one setting: its default, the help text, its `--help` group and its rules.

    `minimum`/`maximum` are inclusive, `above` exclusive; a `maximum` may name the setting
    that holds it. `option` makes the setting the server's default of that request option:
    the option's range (ranges.OPTION_RANGES) applies. `check` parses a non-empty value.
    """
    if option:
        bounds: Range | None = OPTION_RANGES[option]
    elif minimum is None and above is None:
        bounds = None
    else:
        bounds = Range(minimum=minimum, above=above, maximum=maximum)
    rules = Rules(choices, bounds, unset, required, check)
    return field(default=default, repr=repr, metadata={"help": help, "group": group,
                                                       "rules": rules})


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None


def parse_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def parse_host_port(text: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:PORT); port 0 means any free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def check_http_url(text: str) -> None:
    url = urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"expected an http(s) URL, got {text!r}")


def check_readable_file(path: str) -> None:
    if not (os.path.isfile(path) and os.access(path, os.R_OK)):
        raise ValueError(f"no readable file at {path!r}")


def check_api_keys(text: str) -> None:
    if any(any(c.isspace() or c == "#" for c in key) for key in parse_list(text)):
        raise ValueError("an API key must not contain spaces or #")


def parse_webhook_secrets(text: str) -> list[bytes]:
    """The keys of whsec_<base64> secrets (24 bytes or more); an error never shows one."""
    keys = []
    for index, item in enumerate(parse_list(text)):
        try:
            encoded = item.removeprefix("whsec_")
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"secret {index + 1} is not whsec_<base64>") from None
        if len(key) < 24:
            raise ValueError(f"secret {index + 1} is shorter than 24 bytes")
        keys.append(key)
    return keys


_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")


def parse_store_keys(text: str) -> list[tuple[str, bytes]]:
    """The run store's `ID:BASE64` keys (32 bytes each), by line or comma; the first seals.
    An error names a bad key by its position or id, never by its value."""
    keys: list[tuple[str, bytes]] = []
    items = [item.strip() for line in text.splitlines() for item in line.split(",")]
    for index, item in enumerate(i for i in items if i and not i.startswith("#")):
        key_id, sep, encoded = item.partition(":")
        if not sep or not _KEY_ID.fullmatch(key_id):
            raise ValueError(f"key {index + 1} is not ID:BASE64 (ID: [A-Za-z0-9_-]{{1,32}})")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"key {key_id} is not base64") from None
        if len(key) != 32:
            raise ValueError(f"key {key_id} is {len(key)} bytes; AES-256 needs 32")
        if any(known == key_id for known, _ in keys):
            raise ValueError(f"key id {key_id} is listed twice")
        keys.append((key_id, key))
    return keys


def _check_networks(text: str) -> None:
    for item in parse_list(text):
        ipaddress.ip_network(item, strict=False)  # its ValueError names the bad one


def check_header_name(text: str) -> None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,127}", text) or text.startswith("grpc-"):
        raise ValueError(f"expected a lowercase metadata key like x-forwarded-for, got {text!r}")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server can be told. Build it with `load_settings`."""

    # --- server ---
    listen: str = _setting(
        "127.0.0.1:50051", "gRPC listen address HOST:PORT (port 0 = any free port)",
        required=True, check=parse_host_port,
    )
    http_listen: str = _setting(
        "", "listen address HOST:PORT of the OpenAI-compatible HTTP API (/v1/chat/completions, "
        "/v1/completions, /v1/embeddings, /v1/models) on the same services, keys, TLS and "
        "limits as the gRPC port (port 0 = any free port); empty = off",
        check=parse_host_port,
    )
    backend: str = _setting(
        "auto",
        "engine: ollama, embedded, or auto (Ollama if it answers at start, else embedded)",
        choices=BACKEND_CHOICES,
    )
    model: str = _setting(
        "gemma3n:e2b", "default model when a request leaves `model` empty (Ollama); the "
        "embedded engine answers to it as another name of its GGUF",
        required=True,
    )
    workers: int = _setting(
        1,
        "server processes sharing the listen port (SO_REUSEPORT), one event loop each; "
        "needs a fixed port",
        minimum=1,
    )
    max_connection_age: float = _setting(
        300.0,
        "seconds before the server asks a client connection to go away (GOAWAY), so "
        "long-lived channels re-resolve and spread over new replicas; 0 = never",
        minimum=0,
    )
    max_connection_age_grace: float = _setting(
        0.0,
        "seconds calls on a connection told to go away may still take to finish, then they "
        "are cut; 0 = no limit: the connection takes no new calls and closes when its last "
        "call ends (each call still ends by its own deadline)",
        minimum=0,
    )
    min_ping_interval: float = _setting(
        10.0,
        "fewest seconds a client must leave between keepalive pings (idle or not); a client "
        "pinging more often is disconnected with too_many_pings (agentloop_client pings "
        "every 30 s)",
        above=0,
    )
    reflection: bool = _setting(True, "serve gRPC server reflection (grpcurl list/describe)")
    log_level: str = _setting("info", "log level: debug, info, warning, error", choices=LOG_LEVELS)
    health_interval: float = _setting(
        2.0, "seconds between background readiness checks of the backend", group="health",
        above=0,
    )
    health_timeout: float = _setting(
        1.0, "seconds one readiness check may take before the backend is down", group="health",
        above=0,
    )
    drain_delay: float = _setting(
        2.0,
        "seconds between reporting NOT_SERVING and closing the listener on SIGTERM",
        group="health", minimum=0,
    )
    shutdown_grace: float = _setting(
        20.0, "seconds in-flight RPCs get to finish after the listener closes", group="health",
        minimum=0,
    )

    # --- ollama backend ---
    ollama_url: str = _setting(
        "http://127.0.0.1:11434", "base URL of the Ollama server", group="ollama",
        required=True, check=check_http_url,
    )
    connect_timeout: float = _setting(
        2.0, "seconds to open a connection to Ollama", group="ollama", above=0
    )
    read_timeout: float = _setting(
        300.0,
        "seconds Ollama may stay silent (before the first token or between tokens)",
        group="ollama", above=0,
    )
    pool_timeout: float = _setting(
        5.0, "seconds to wait for a free pooled connection to Ollama", group="ollama", above=0
    )
    max_connections: int = _setting(
        1000, "most open connections to Ollama (the pool's size)", group="ollama", minimum=1
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
    embedded_slots: int = _setting(
        10,
        "generations the embedded engine decodes together (continuous batching; each slot "
        "holds --num-ctx tokens of KV cache); admission's parallelism follows it",
        group="embedded", minimum=1,
    )
    embedded_prefix_reuse: bool = _setting(
        True,
        "reuse the longest cached prompt prefix of a free slot (an agent's earlier steps, "
        "a chat's earlier turns) instead of evaluating it again",
        group="embedded",
    )
    embedded_batch_tokens: int = _setting(
        256,
        "most tokens per decoding step of the embedded engine: the running generations' "
        "next tokens plus a chunk of the prompts being evaluated",
        group="embedded", minimum=1,
    )
    embedded_kv_unified: bool = _setting(
        True,
        "one KV cache shared by the embedded engine's slots (each still keeps to its "
        "--num-ctx share): every decoding step is one pass over the weights, whichever slots "
        "are busy; off, each slot has its own and llama.cpp splits a step over slots not "
        "numbered next to each other, or mixing prompt chunks with generating slots, into "
        "passes (3 streams on slots 0, 2, 4 take three)",
        group="embedded",
    )
    embedded_embed_share: float = _setting(
        0.1,
        "share of the embedded engine's time embeddings get while generations run (they "
        "take all of it otherwise): one embedding step at a time, then generation steps "
        "until the share is kept",
        group="embedded", minimum=0.01, maximum=1,
    )
    embedded_stall_timeout: float = _setting(
        30.0,
        "seconds the embedded engine's process may go without a heartbeat, without "
        "progress while generations run, or building one grammar, before it is killed "
        "and restarted",
        group="embedded", above=0,
    )

    # --- generation defaults (used when a request leaves an option unset) ---
    temperature: float = _setting(
        0.7, "default sampling temperature", group="generation", option="temperature"
    )
    top_p: float = _setting(
        0.9, "default nucleus sampling top_p", group="generation", option="top_p"
    )
    top_k: int = _setting(40, "default top_k", group="generation", option="top_k")
    repeat_penalty: float = _setting(
        1.1, "default repeat penalty", group="generation", option="repeat_penalty"
    )
    max_tokens: int = _setting(
        0,
        "default most new tokens per generation; 0 = the engine's: 2048 for Ollama, 256 for "
        "the embedded engine (a small CPU model: first calls finish in seconds)",
        group="generation", option="max_tokens", unset=0,
    )
    num_ctx: int = _setting(
        8192, "default context window in tokens", group="generation", option="num_ctx"
    )

    # --- admission control ---
    max_in_flight: int = _setting(
        0,
        "generations the single engine runs at once (0 = its parallelism: 4 for Ollama, "
        "--embedded-slots for embedded; match OLLAMA_NUM_PARALLEL); with --upstreams each "
        "upstream's max_in_flight says it per endpoint",
        group="admission", minimum=0,
    )
    max_embed_in_flight: int = _setting(
        0,
        "Embed batches run at once per engine endpoint, in slots of their own so that "
        "embeddings and generations never wait for each other (0 = the backend's "
        "parallelism); they queue under --max-queue and --queue-timeout like generations",
        group="admission", minimum=0,
    )
    max_queue: int = _setting(
        64, "calls that may wait for a slot, in all the replica's queues together; beyond it "
        "RESOURCE_EXHAUSTED", group="admission",
        minimum=0,
    )
    queue_timeout: float = _setting(
        30.0, "seconds a request may wait for a slot (then RESOURCE_EXHAUSTED)", group="admission",
        above=0,
    )
    critical_reserve: int = _setting(
        0,
        "slots of each pool only critical calls may take (kept free under a flood of other "
        "calls, so a critical call starts at once); at most the pool's slots - 1",
        group="admission", minimum=0,
    )
    fair_queuing: bool = _setting(
        True,
        "a free slot goes to the waiting tenant (without keys: caller address) with the least "
        "service recently, by its weight; off = first come, first served (priorities hold "
        "either way)",
        group="admission",
    )
    fair_anticipation: float = _setting(
        0.01,
        "seconds a slot freed by a caller with no other call waiting stays that caller's, "
        "while others wait and it holds no more than its share of the slots: a client "
        "calling back to back keeps its place instead of waiting for the next slot to free "
        "(with fair queuing; 0 = off)",
        group="admission", minimum=0, maximum=1,
    )

    # --- request limits ---
    max_tokens_cap: int = _setting(
        8192, "largest max_tokens a request may ask for", group="limits", minimum=1
    )
    max_prompt_bytes: int = _setting(
        262144, "largest prompt + system + messages text, in UTF-8 bytes", group="limits",
        minimum=1,
    )
    max_messages: int = _setting(
        256, "most chat messages in one request", group="limits", minimum=1
    )
    max_image_bytes: int = _setting(
        8388608, "largest total size of the images in one request, in bytes", group="limits",
        minimum=1,
    )
    max_images: int = _setting(16, "most images in one request", group="limits", minimum=1)
    max_num_ctx: int = _setting(
        32768,
        "largest num_ctx (context window) a request may ask for: the engine allocates it",
        group="limits", minimum=1,
    )
    max_texts: int = _setting(
        256, "most texts in one Embed or CountTokens call", group="limits", minimum=1
    )
    max_text_bytes: int = _setting(
        65536, "largest single text of an Embed or CountTokens call, in UTF-8 bytes",
        group="limits", minimum=1,
    )
    max_texts_bytes: int = _setting(
        1048576, "largest total of the texts of one Embed or CountTokens call, in UTF-8 bytes",
        group="limits", minimum=1,
    )
    max_message_bytes: int = _setting(
        0,
        "largest gRPC message the server accepts once decompressed, in bytes (beyond: "
        "RESOURCE_EXHAUSTED); 0 = the largest request the other limits allow (prompt, "
        "images, schemas, stop strings: about 10.4 MiB with their defaults)",
        group="limits", minimum=1024, unset=0,
    )

    # --- transport: what one connection and all calls together may hold ---
    max_concurrent_streams: int = _setting(
        256,
        "most calls one client connection may have open at once (HTTP/2 "
        "SETTINGS_MAX_CONCURRENT_STREAMS): gRPC clients queue their calls beyond it, streams "
        "past it are refused",
        group="transport", minimum=1,
    )
    first_message_timeout: float = _setting(
        10.0,
        "seconds a StreamRunAgent call may take to send its first message (start), then "
        "DEADLINE_EXCEEDED",
        group="transport", above=0,
    )
    send_stall_timeout: float = _setting(
        30.0,
        "seconds a stream's next message may wait for the client to read (HTTP/2 flow "
        "control), then the call ends with RESOURCE_EXHAUSTED (SEND_STALLED); the "
        "generation itself never waits for the client",
        group="transport", above=0,
    )
    http_idle_timeout: float = _setting(
        30.0,
        "seconds an HTTP API connection may go without a request, the request line and "
        "headers included, before it is closed (slow or silent clients hold nothing)",
        group="transport", above=0,
    )
    http_body_timeout: float = _setting(
        30.0,
        "seconds an HTTP API request body may take to arrive once its headers did, then 408",
        group="transport", above=0,
    )
    http_connections_per_peer: int = _setting(
        64,
        "most HTTP API connections one peer address may hold open at once; more are "
        "answered 429 and closed",
        group="transport", minimum=1,
    )
    max_request_bytes_in_flight: int = _setting(
        128 * 1024 * 1024,
        "most decompressed request bytes all calls may hold at once; a call past it gets "
        "RESOURCE_EXHAUSTED (limit: request_bytes)",
        group="transport", minimum=1024 * 1024,
    )

    # --- agent loop ---
    agent_max_steps: int = _setting(
        8, "most steps an agent run may take (caps a request's max_steps)", group="agent",
        minimum=1,
    )
    agent_default_steps: int = _setting(
        4, "steps an agent run takes when the request leaves max_steps 0", group="agent",
        minimum=1, maximum="agent_max_steps",
    )
    tool_timeout: float = _setting(
        10.0, "seconds one tool call (server or client tool) may take", group="agent", above=0
    )
    max_observation_bytes: int = _setting(
        4096, "largest tool result shown to the model, in UTF-8 bytes (cut beyond)", group="agent",
        minimum=256,
    )
    upstreams: str = _setting(
        "",
        "file (YAML or JSON) of upstream pools and the routes from model names to them (see "
        "docs/upstreams.md); empty = one engine, chosen by --backend",
        group="upstreams", check=check_readable_file,
    )
    mcp_servers: str = _setting(
        "",
        "file (JSON or YAML) listing MCP servers whose tools the agent may use, named "
        "<server>__<tool> (see docs/agent.md); empty = none",
        group="agent", check=check_readable_file,
    )

    # --- background runs (StartAgentRun & co., docs/agent.md) ---
    run_store: str = _setting(
        "~/.local/state/agentloop/runs.db",
        "where background agent runs, their events and webhook deliveries are kept: a SQLite "
        "file (WAL; created if missing), :memory: (lost at exit), or a postgresql:// URL "
        "that replicas share (from a Secret: it may hold a password, and is never logged)",
        group="runs", required=True, repr=False,
    )
    run_store_keys: str = _setting(
        "", "encrypt runs at rest (AES-256-GCM): ID:BASE64 keys of 32 bytes, comma-separated; "
        "the first encrypts, all decrypt (rotation: put the new one first). Prompts, answers, "
        "steps, tool arguments and results, errors, events and webhook bodies are encrypted; "
        "ids, tenants, statuses and times stay in clear. Empty (and no key file) = nothing is "
        "encrypted", group="runs", check=parse_store_keys, repr=False,
    )
    run_store_key_file: str = _setting(
        "", "file of run store keys, one ID:BASE64 per line, read before run_store_keys",
        group="runs", check=check_readable_file,
    )
    run_store_max_bytes: int = _setting(
        0, "largest size of the SQLite run store, in bytes; past it new runs are "
        "RESOURCE_EXHAUSTED (RUN_STORE_FULL); 0 = no limit but the disk's", group="runs",
        minimum=0,
    )
    run_max_running: int = _setting(
        8, "background runs this replica runs at once; more wait, queued", group="runs",
        minimum=1,
    )
    run_max_queued: int = _setting(
        1000, "background runs that may wait queued on this replica; past it new runs are "
        "RESOURCE_EXHAUSTED (RUN_LIMIT)", group="runs", minimum=0,
    )
    run_max_active_per_tenant: int = _setting(
        100, "background runs one tenant may have queued or running (all replicas of the "
        "store); past it its new runs are RESOURCE_EXHAUSTED (RUN_LIMIT)", group="runs",
        minimum=1,
    )
    run_default_timeout: float = _setting(
        3600.0, "seconds a background run may take when its request sets no timeout (waits "
        "for client tools included)", group="runs", minimum=1, maximum="run_max_timeout",
    )
    run_max_timeout: float = _setting(
        86400.0, "most seconds a background run may ask to take", group="runs", above=0,
    )
    run_max_events: int = _setting(
        10000, "most events stored per run; answer deltas past the room the steps need are "
        "dropped (the finished event carries the whole answer)", group="runs", minimum=100,
    )
    run_max_event_bytes: int = _setting(
        65536, "largest stored event, in bytes; its longest text is cut to fit", group="runs",
        minimum=4096,
    )
    run_event_flush_interval: float = _setting(
        0.05, "seconds a run's events may wait to be written together (answer deltas are "
        "joined meanwhile); tool calls and the end are written at once", group="runs",
        minimum=0,
    )
    run_ttl_completed: float = _setting(
        7 * 86400.0, "seconds a completed run is kept, then deleted with its events",
        group="runs", above=0,
    )
    run_ttl_failed: float = _setting(
        7 * 86400.0, "seconds a failed or expired run is kept", group="runs", above=0,
    )
    run_ttl_cancelled: float = _setting(
        86400.0, "seconds a cancelled run is kept", group="runs", above=0,
    )
    run_sweep_interval: float = _setting(
        60.0, "seconds between sweeps deleting runs past their TTL", group="runs", above=0,
    )
    run_lease: float = _setting(
        30.0, "seconds a replica's claim on a run it runs holds without renewal (renewed "
        "every third of it); a run whose lease lapsed is taken over", group="runs", above=0,
    )
    run_watch_poll_interval: float = _setting(
        0.25, "seconds between reads of the store when watching a run another replica runs "
        "(and for client tool results submitted through another replica)",
        group="runs", above=0,
    )

    webhook_url_prefixes: str = _setting(
        "", "comma-separated URL prefixes a run's webhook_url must start with (e.g. "
        "https://hooks.example.com/agentloop/); empty = no webhooks", group="runs",
    )
    webhook_secrets: str = _setting(
        "", "comma-separated Standard Webhooks secrets (whsec_<base64>, 24 bytes or more) "
        "signing every webhook, each signature in the one header (rotation: add the new, then "
        "drop the old); needed with webhook_url_prefixes", group="runs",
        check=parse_webhook_secrets, repr=False,
    )
    webhook_allowed_networks: str = _setting(
        "", "comma-separated CIDRs a webhook may go to although not public (e.g. "
        "10.0.0.0/8 for a receiver in the cluster); other private, loopback and link-local "
        "addresses are refused", group="runs", check=_check_networks,
    )
    webhook_timeout: float = _setting(
        10.0, "seconds one webhook attempt may take", group="runs", above=0,
    )
    webhook_retry_for: float = _setting(
        3600.0, "seconds after a run's end its webhook is retried for, then given up",
        group="runs", minimum=0,
    )
    webhook_backoff: float = _setting(
        1.0, "seconds before a webhook's first retry; doubled each time (with jitter)",
        group="runs", above=0,
    )
    webhook_backoff_max: float = _setting(
        300.0, "longest wait between webhook retries, in seconds", group="runs", above=0,
    )

    # --- telemetry (OpenTelemetry itself follows the standard OTEL_* variables) ---
    metrics_listen: str = _setting(
        "127.0.0.1:9464",
        "Prometheus /metrics listen address HOST:PORT (port 0 = any free port, empty = off); "
        "worker N of --workers serves on PORT+N",
        group="telemetry", check=parse_host_port,
    )
    metrics_threads: int = _setting(
        4,
        "most scrapes of /metrics served at once (one thread each); a connection past it is "
        "closed at once",
        group="telemetry", minimum=1,
    )
    metrics_timeout: float = _setting(
        5.0,
        "seconds a /metrics connection may wait on one read or write (a peer that sends or "
        "reads nothing is dropped then)",
        group="telemetry", above=0,
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
        group="resilience", minimum=0,
    )
    retry_backoff: float = _setting(
        0.1, "seconds of the first retry's backoff (doubles per attempt, full jitter)",
        group="resilience", above=0,
    )
    retry_backoff_max: float = _setting(
        2.0, "most seconds of one retry's backoff", group="resilience", above=0
    )
    circuit_failure_threshold: int = _setting(
        5, "consecutive failures to reach the backend (connect errors, connections dropped "
        "before any answer) that open the circuit (calls then fail fast)",
        group="resilience", minimum=1,
    )
    circuit_reset_timeout: float = _setting(
        10.0, "seconds the circuit stays open before a half-open probe", group="resilience",
        above=0,
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
        group="resilience", minimum=0,
    )
    cache_ttl: float = _setting(
        300.0, "seconds a cached response stays valid", group="resilience", above=0
    )

    # --- security: API keys, rate limits, TLS ---
    # repr=False: raw keys stay out of logs and tracebacks.
    api_keys: str = _setting(
        "",
        "accepted API keys, comma-separated (prefer api_keys_file); empty and no file "
        "= no authentication",
        group="security", check=check_api_keys, repr=False,
    )
    api_keys_file: str = _setting(
        "",
        "file of accepted API keys: one per line (# starts a comment), or tenants with their "
        "keys and limits (YAML; docs/security.md); re-read on SIGHUP and when it changes",
        group="security", check=check_readable_file,
    )
    api_keys_reload_interval: float = _setting(
        5.0,
        "seconds between checks of api_keys_file for a change (re-read when its time, size "
        "or inode moved; a Kubernetes Secret update is seen); 0 = only on SIGHUP",
        group="security", minimum=0,
    )
    client_address_header: str = _setting(
        "",
        "metadata key a trusted proxy sets to the client's address (e.g. x-forwarded-for, "
        "its last entry): callers without a named tenant are told apart by it instead of the "
        "peer address; empty = the peer address",
        group="security", check=check_header_name,
    )
    one_trust_domain: bool = _setting(
        False,
        "callers without a named tenant share the engine's prefix cache and the response "
        "cache (one trust domain); off = each client address its own (named tenants are "
        "always apart)",
        group="security",
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
        group="security", minimum=0,
    )
    rate_burst: int = _setting(
        10, "calls a client may make at once before rate_limit applies", group="security",
        minimum=1,
    )
    refusal_rate: float = _setting(
        1.0,
        "calls without a valid API key a peer address may make per second (token bucket); "
        "past refusal_burst, every call from that address is RESOURCE_EXHAUSTED until the "
        "bucket refills, a valid key or not (key guessing slows to this rate)",
        group="security", above=0,
    )
    refusal_burst: int = _setting(
        20, "calls without a valid API key a peer address may make at once",
        group="security", minimum=1,
    )
    tls_cert: str = _setting(
        "", "PEM certificate chain for TLS on the gRPC port and the HTTP API port; empty = "
        "plaintext", group="security",
        check=check_readable_file,
    )
    tls_key: str = _setting(
        "", "PEM private key of tls_cert", group="security", check=check_readable_file
    )
    tls_client_ca: str = _setting(
        "", "PEM CA bundle: require client certificates signed by it (mutual TLS)",
        group="security", check=check_readable_file,
    )

    def __post_init__(self) -> None:
        errors = list(_validate(self))
        if errors:
            raise SettingsError("; ".join(errors))

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_host_port(self.listen)


#: Why --workers and the embedded engine do not go together.
EMBEDDED_WORKERS_PROBLEM = (
    "the embedded engine runs one per server process: several workers would each load the "
    "model and its cache, split the prefix caches and run llama.cpp threads on every CPU; "
    "use --workers 1 (the engine batches concurrent requests itself)")


def _validate(s: Settings) -> Sequence[str]:
    """One message per bad value, naming the flag and the variable: each field's own rules,
    then the rules that tie settings together."""
    problems = [(f.name, f.metadata["rules"].problem(getattr(s, f.name), s))
                for f in dataclasses.fields(s)]
    problems += _cross_field_problems(s)
    return [f"{flag_name(name)} / {env_name(name)}: {why}" for name, why in problems if why]


def _cross_field_problems(s: Settings) -> list[tuple[str, str]]:
    problems = []
    if s.workers > 1 and s.listen.endswith(":0"):
        problems.append(("workers", "several workers need a fixed port in --listen, not port 0"))
    if s.workers > 1 and s.http_listen.endswith(":0"):
        problems.append(("workers", "several workers need a fixed port in --http-listen, "
                                    "not port 0"))
    if s.workers > 1 and s.backend == "embedded":
        problems.append(("workers", EMBEDDED_WORKERS_PROBLEM))
    if s.embedded_batch_tokens < s.embedded_slots:
        problems.append(("embedded_batch_tokens",
                         f"must be >= embedded_slots ({s.embedded_slots})"))
    if s.retry_backoff_max < s.retry_backoff:
        problems.append(("retry_backoff_max", f"must be >= retry_backoff ({s.retry_backoff})"))
    if bool(s.tls_cert) != bool(s.tls_key):
        problems.append(("tls_key" if s.tls_cert else "tls_cert",
                         "tls_cert and tls_key go together"))
    if s.webhook_url_prefixes and not s.webhook_secrets:
        problems.append(("webhook_secrets", "webhooks (webhook_url_prefixes) need a secret"))
    if s.webhook_backoff_max < s.webhook_backoff:
        problems.append(("webhook_backoff_max", f"must be >= webhook_backoff "
                                                f"({s.webhook_backoff})"))
    if s.tls_client_ca and not s.tls_cert:
        problems.append(("tls_client_ca", "mutual TLS needs tls_cert and tls_key too"))
    return problems


def parse_list(text: str) -> list[str]:
    """A comma-separated setting as a list, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _converter(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    parsers: dict[str, Callable[[str], Any]] = {
        "bool": parse_bool, "int": parse_int, "float": parse_float}
    kind = f.type.__name__ if isinstance(f.type, type) else str(f.type)
    return parsers.get(kind, str)


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
        raw = None
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        if cli_values.get(f.name) is not None:
            raw = cli_values[f.name]
        elif env_name(f.name) in environ:
            raw = environ[env_name(f.name)]
        if raw is None:
            continue
        try:
            values[f.name] = convert(raw) if isinstance(raw, str) else raw
        except ValueError as exc:  # named as every bad value is: the flag and the variable
            raise SettingsError(f"{flag_name(f.name)} / {env_name(f.name)}: {exc}") from None
    return Settings(**values)
