"""The operator's pools file: named upstreams and the routes from model names to them.

One YAML or JSON file (`--upstreams`), read once at start; a bad file stops the start
with a message naming the upstream or route and the key. The format, with every key:
docs/upstreams.md. Secrets (API keys) are read here from the environment or a file and
never appear in a message or a log line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import re2
import yaml

from agentloop.config import SettingsError
from agentloop.upstreams.spec import CompletionsFormat, OpenAIDialect, SchemaStyle, TlsSpec

KINDS = ("ollama", "openai", "embedded")
#: Upstream names become span attributes and metric labels: short, plain, operator-chosen.
UPSTREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_UPSTREAM_KEYS = {
    "kind", "endpoints", "dns", "scheme", "path", "remote", "api_key_env", "api_key_file",
    "tls", "connect_timeout", "read_timeout", "first_token_timeout", "max_in_flight",
    "overflow", "dialect", "models", "dns_refresh", "propagate_trace", "prefix_routing",
}
_ROUTE_KEYS = {"models", "pattern", "pools", "allow_remote"}
_TLS_KEYS = {f.name for f in dataclasses.fields(TlsSpec)}
_DIALECT_KEYS = {f.name for f in dataclasses.fields(OpenAIDialect)}
_OVERFLOW_KEYS = {"max_queue", "max_wait"}
#: An endpoint's index stays under about 120 MB (120 bytes a block) whatever the file says.
MAX_INDEX_BLOCKS = 1_000_000
_PREFIX_ROUTING_KEYS = {"enabled", "load_bound", "index_blocks", "max_age"}


@dataclass(frozen=True, slots=True)
class Overflow:
    """When a pool's queue is this long, or a call has waited this long, new calls spill to
    the next pool of their route instead of waiting (None: no limit of that kind)."""

    max_queue: int | None = None
    max_wait: float | None = None


@dataclass(frozen=True, slots=True)
class PrefixRouting:
    """How a pool of several endpoints weighs where a prompt's prefix is cached
    (upstreams/prefix_index.py; docs/upstreams.md says how to choose the numbers)."""

    enabled: bool = True
    #: How much busier (calls in flight over its slots) the endpoint holding the prefix may
    #: be than the least-loaded one and still be picked for it: past it, the load wins.
    #: Half its slots: a tighter bound copies hot prefixes to more engines, and the copies
    #: evict other prefixes (bench/fleet_sizing.py --cache shows the trade).
    load_bound: float = 0.5
    #: Prefix blocks (256 bytes of prompt each) remembered per endpoint, least recently
    #: used forgotten first: 16,384 is about 4 MB of prompt text, about a million tokens.
    index_blocks: int = 16384
    #: Seconds after which a block not used again is taken as gone from the engine's cache.
    max_age: float = 600.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    kind: str
    #: Base URLs, one per endpoint (empty for `embedded` and for `dns`).
    endpoints: tuple[str, ...] = ()
    #: HOST:PORT whose addresses are the endpoints, re-resolved every `dns_refresh` seconds.
    dns: str = ""
    scheme: str = "http"
    #: The URL path of the API under each address (`dns` only): "/v1" for OpenAI kinds.
    path: str = ""
    dns_refresh: float = 10.0
    #: Off the premises: only routes with `allow_remote` may use it, never a local-only call.
    remote: bool = False
    #: Calls carry the W3C trace context (traceparent); default: local upstreams only.
    propagate_trace: bool = True
    api_key: str = dataclasses.field(default="", repr=False)
    tls: TlsSpec = dataclasses.field(default_factory=TlsSpec)
    connect_timeout: float = 2.0
    read_timeout: float = 300.0
    #: Seconds to the first token before the call moves to the next pool (None: no limit).
    first_token_timeout: float | None = None
    #: Calls one endpoint serves at once (0: the engine's own parallelism).
    max_in_flight: int = 0
    overflow: Overflow = Overflow()
    dialect: OpenAIDialect = dataclasses.field(default_factory=OpenAIDialect)
    #: The caller's model name -> this upstream's name for it (absent: sent as is).
    models: dict[str, str] = dataclasses.field(default_factory=dict)
    prefix_routing: PrefixRouting = PrefixRouting()

    def upstream_model(self, model: str) -> str:
        return self.models.get(model, model)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    #: Exact model names (and aliases) this route serves.
    models: tuple[str, ...]
    #: Pools in the order they are tried.
    pools: tuple[str, ...]
    #: A model name pattern (RE2, whole name) besides the exact names; "" = none.
    pattern: str = ""
    allow_remote: bool = False

    def matches(self, model: str) -> bool:
        return model in self.models or bool(self.pattern and re2.fullmatch(self.pattern, model))


@dataclass(frozen=True, slots=True)
class PoolsConfig:
    upstreams: dict[str, UpstreamConfig]
    routes: tuple[RouteConfig, ...]


def load_pools(path: str) -> PoolsConfig:
    """The pools file at `path`; SettingsError naming what is wrong."""
    where = f"--upstreams / AGENTLOOP_UPSTREAMS ({path})"
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"{where}: cannot read the file: {exc}") from None
    return parse_pools(document, where)


def parse_pools(document: Any, where: str) -> PoolsConfig:
    if not isinstance(document, dict) or set(document) - {"upstreams", "routes"}:
        raise SettingsError(f"{where}: expected a mapping with `upstreams` and `routes`")
    upstreams = document.get("upstreams")
    if not isinstance(upstreams, dict) or not upstreams:
        raise SettingsError(f"{where}: `upstreams` must map names to upstreams")
    parsed = {str(name): _upstream(name, entry, where) for name, entry in upstreams.items()}
    if sum(1 for u in parsed.values() if u.kind == "embedded") > 1:
        raise SettingsError(f"{where}: at most one upstream of kind `embedded` (one engine "
                            "per process)")
    routes = document.get("routes")
    if not isinstance(routes, list) or not routes:
        raise SettingsError(f"{where}: `routes` must be a list of routes")
    return PoolsConfig(parsed, tuple(_route(i, entry, parsed, where)
                                     for i, entry in enumerate(routes)))


def _upstream(name: Any, entry: Any, where: str) -> UpstreamConfig:
    def bad(why: str) -> SettingsError:
        return SettingsError(f"{where}: upstream {name!r}: {why}")

    if not isinstance(name, str) or not UPSTREAM_NAME.match(name):
        raise bad("names are 1-32 letters, digits, '_' or '-', starting with a letter or digit")
    if not isinstance(entry, dict):
        raise bad("expected a mapping with `kind`")
    _known_keys(entry, _UPSTREAM_KEYS, bad)
    kind = entry.get("kind")
    if kind not in KINDS:
        raise bad(f"`kind` must be one of {', '.join(KINDS)}")
    endpoints, dns = entry.get("endpoints", []), entry.get("dns", "")
    if kind == "embedded":
        if endpoints or dns:
            raise bad("an `embedded` upstream runs in this process: no `endpoints` or `dns`")
    elif bool(endpoints) == bool(dns):
        raise bad("set exactly one of `endpoints` (a list of URLs) and `dns` (HOST:PORT)")
    if not isinstance(endpoints, list) or not all(isinstance(u, str) for u in endpoints):
        raise bad("`endpoints` must be a list of URLs")
    for url in endpoints:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad("each endpoint must be an http:// or https:// URL")
    if dns and (not isinstance(dns, str) or not re.fullmatch(r"[A-Za-z0-9.-]+:\d{1,5}", dns)):
        raise bad("`dns` must be HOST:PORT")
    if kind == "openai" and "remote" not in entry:
        raise bad("say whether an `openai` upstream is off the premises: `remote: true` or "
                  "`remote: false`")
    if kind != "openai" and ({"api_key_env", "api_key_file", "tls"} & set(entry)):
        raise bad("`api_key_env`, `api_key_file` and `tls` are for `openai` upstreams (Ollama "
                  "takes no key: put a proxy with TLS and keys in front of it, and list the "
                  "proxy as an `openai` upstream if it speaks that API)")
    remote = entry.get("remote", False)
    if not isinstance(remote, bool):
        raise bad("`remote` must be true or false")
    # A trace id and span ids say which calls belong together: off the premises only
    # when the operator says so.
    propagate_trace = entry.get("propagate_trace", not remote)
    if not isinstance(propagate_trace, bool):
        raise bad("`propagate_trace` must be true or false")
    scheme = entry.get("scheme", "http")
    if scheme not in ("http", "https"):
        raise bad("`scheme` must be http or https")
    models = entry.get("models", {})
    if not isinstance(models, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in models.items()):
        raise bad("`models` must map the callers' model names to this upstream's names")
    return UpstreamConfig(
        name=name, kind=kind, endpoints=tuple(u.rstrip("/") for u in endpoints), dns=dns,
        scheme=scheme, path=_text(entry, "path", bad).rstrip("/"),
        dns_refresh=_seconds(entry, "dns_refresh", 10.0, bad) or 10.0,
        remote=remote, propagate_trace=propagate_trace, api_key=_api_key(entry, bad),
        tls=_tls(entry.get("tls", {}), bad),
        connect_timeout=_seconds(entry, "connect_timeout", 2.0, bad) or 2.0,
        read_timeout=_seconds(entry, "read_timeout", 300.0, bad) or 300.0,
        first_token_timeout=_seconds(entry, "first_token_timeout", None, bad),
        max_in_flight=_count(entry, "max_in_flight", 0, bad),
        overflow=_overflow(entry.get("overflow", {}), bad),
        dialect=_dialect(entry.get("dialect", {}), kind, bad),
        models=dict(models),
        prefix_routing=_prefix_routing(entry.get("prefix_routing", {}), bad),
    )


def _route(index: int, entry: Any, upstreams: dict[str, UpstreamConfig],
           where: str) -> RouteConfig:
    def bad(why: str) -> SettingsError:
        return SettingsError(f"{where}: routes[{index}]: {why}")

    if not isinstance(entry, dict):
        raise bad("expected a mapping with `models` and `pools`")
    _known_keys(entry, _ROUTE_KEYS, bad)
    models, pattern = entry.get("models", []), entry.get("pattern", "")
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise bad("`models` must be a list of model names")
    if not models and not pattern:
        raise bad("set `models`, `pattern` or both")
    if pattern:
        try:
            re2.compile(pattern)
        except re2.error:
            raise bad("`pattern` is not a valid RE2 regular expression") from None
    pools = entry.get("pools", [])
    if not isinstance(pools, list) or not pools:
        raise bad("`pools` must list the upstreams to try, in order")
    for pool in pools:
        if pool not in upstreams:
            raise bad(f"`pools` names {pool!r}, which is not an upstream")
    allow_remote = entry.get("allow_remote", False)
    if not isinstance(allow_remote, bool):
        raise bad("`allow_remote` must be true or false")
    remote = [p for p in pools if upstreams[p].remote]
    if remote and not allow_remote:
        raise bad(f"lists remote upstreams {remote} without `allow_remote: true`: local "
                  "stays local unless the route says otherwise")
    return RouteConfig(tuple(models), tuple(pools), str(pattern or ""), allow_remote)


def _known_keys(entry: dict[str, Any], known: set[str], bad: Any) -> None:
    unknown = set(entry) - known
    if unknown:
        raise bad(f"unknown keys {sorted(map(str, unknown))}; known: {sorted(known)}")


def _text(entry: dict[str, Any], key: str, bad: Any) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise bad(f"`{key}` must be a string")
    return value


def _seconds(entry: dict[str, Any], key: str, default: float | None, bad: Any) -> float | None:
    value = entry.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise bad(f"`{key}` must be a number of seconds > 0")
    return float(value)


def _count(entry: dict[str, Any], key: str, default: int, bad: Any) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad(f"`{key}` must be a whole number >= 0")
    return value


def _api_key(entry: dict[str, Any], bad: Any) -> str:
    env, path = entry.get("api_key_env"), entry.get("api_key_file")
    if env and path:
        raise bad("set at most one of `api_key_env` and `api_key_file`")
    if env:
        if not isinstance(env, str) or env not in os.environ:
            raise bad("`api_key_env` names an environment variable that is not set")
        return os.environ[env].strip()
    if path:
        try:
            return Path(str(path)).read_text().strip()
        except OSError:
            raise bad("`api_key_file` cannot be read") from None
    return ""


def _tls(entry: Any, bad: Any) -> TlsSpec:
    if not isinstance(entry, dict):
        raise bad("`tls` must be a mapping")
    _known_keys(entry, _TLS_KEYS, bad)
    verify = entry.get("verify", True)
    if not isinstance(verify, bool):
        raise bad("`tls.verify` must be true or false")
    files = {key: _text(entry, key, bad) for key in ("ca_file", "client_cert", "client_key")}
    for key, path in files.items():
        if path and not os.access(path, os.R_OK):
            raise bad(f"`tls.{key}` cannot be read")
    if bool(files["client_cert"]) != bool(files["client_key"]):
        raise bad("`tls.client_cert` and `tls.client_key` go together")
    return TlsSpec(verify=verify, **files)


def _overflow(entry: Any, bad: Any) -> Overflow:
    if not isinstance(entry, dict):
        raise bad("`overflow` must be a mapping")
    _known_keys(entry, _OVERFLOW_KEYS, bad)
    max_queue = entry.get("max_queue")
    if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int)
                                  or max_queue < 0):
        raise bad("`overflow.max_queue` must be a whole number >= 0")
    return Overflow(max_queue, _seconds(entry, "max_wait", None, bad))


def _prefix_routing(entry: Any, bad: Any) -> PrefixRouting:
    if not isinstance(entry, dict):
        raise bad("`prefix_routing` must be a mapping")
    _known_keys(entry, _PREFIX_ROUTING_KEYS, bad)
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise bad("`prefix_routing.enabled` must be true or false")
    defaults = PrefixRouting()
    load_bound = entry.get("load_bound", defaults.load_bound)
    if isinstance(load_bound, bool) or not isinstance(load_bound, int | float) \
            or not 0 <= load_bound <= 1:
        raise bad("`prefix_routing.load_bound` must be a number from 0 to 1 (a share of an "
                  "endpoint's slots)")
    index_blocks = entry.get("index_blocks", defaults.index_blocks)
    if isinstance(index_blocks, bool) or not isinstance(index_blocks, int) \
            or not 1 <= index_blocks <= MAX_INDEX_BLOCKS:
        raise bad(f"`prefix_routing.index_blocks` must be a whole number from 1 to "
                  f"{MAX_INDEX_BLOCKS}")
    max_age = _seconds(entry, "max_age", defaults.max_age, bad)
    return PrefixRouting(enabled, float(load_bound), index_blocks, max_age or defaults.max_age)


def _dialect(entry: Any, kind: str, bad: Any) -> OpenAIDialect:
    if not isinstance(entry, dict):
        raise bad("`dialect` must be a mapping")
    if entry and kind != "openai":
        raise bad("`dialect` is for `openai` upstreams")
    _known_keys(entry, _DIALECT_KEYS, bad)
    values: dict[str, Any] = {}
    for key, value in entry.items():
        if key == "schema_style":
            if value not in tuple(SchemaStyle):
                raise bad(f"`dialect.schema_style` must be one of {', '.join(SchemaStyle)}")
            values[key] = SchemaStyle(value)
        elif key == "completions_format":
            if value not in tuple(CompletionsFormat):
                raise bad("`dialect.completions_format` must be one of "
                          f"{', '.join(CompletionsFormat)}")
            if value == CompletionsFormat.GRAMMAR and importlib.util.find_spec("llama_cpp") \
                    is None:
                raise bad("`dialect.completions_format: grammar` needs llama-cpp-python's "
                          "grammar converter: pip install 'agentloop[embedded]'")
            values[key] = CompletionsFormat(value)
        elif key == "stop_limit":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad("`dialect.stop_limit` must be a whole number >= 0 (0: no limit)")
            values[key] = value
        elif key == "repeat_penalty_field":
            if value not in ("repetition_penalty", "repeat_penalty"):
                raise bad("`dialect.repeat_penalty_field` must be repetition_penalty (vLLM, "
                          "SGLang) or repeat_penalty (llama.cpp)")
            values[key] = value
        elif not isinstance(value, bool):
            raise bad(f"`dialect.{key}` must be true or false")
        else:
            values[key] = value
    return OpenAIDialect(**values)
