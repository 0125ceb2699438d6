"""API keys, token buckets and the refusal log: what the edge (`rpc.edge`) decides with.

Keys are held only as SHA-256 digests and compared in constant time; a key never reaches
a log. `TokenBuckets` is one token bucket per client (the rate limit, and the refusals of
calls without a valid key per peer address); an empty bucket is RESOURCE_EXHAUSTED with
RetryInfo saying when the next token comes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

import grpc
from cachetools import TTLCache

from agentloop.config import Settings, SettingsError, env_name, flag_name, parse_list
from agentloop.errors import ResourceExhausted
from agentloop.tenants import KeysFile, Tenant, TenantKeys, TenantsFileError

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
BEARER = "bearer "
# Buckets of clients not seen for burst/rate seconds are full again: dropping them is exact.
MAX_TRACKED_CLIENTS = 100_000

class ApiKeys:
    """The accepted API keys (SHA-256 digests), each with its tenant, read again from the
    keys file on `reload` (SIGHUP, or the file watch when it changed)."""

    def __init__(self, keys: Iterable[str], path: str = "") -> None:
        self._file = KeysFile(path, keys)

    def __len__(self) -> int:
        return len(self._file.current)

    @property
    def _digests(self) -> tuple[bytes, ...]:
        return tuple(known for known, _ in self._file.current.keys)

    @property
    def current(self) -> TenantKeys:
        return self._file.current

    @property
    def path(self) -> str:
        return self._file.path

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        """Keys from `api_keys` and `api_keys_file` (one key per line, # starts a comment,
        or the tenants format: see agentloop.tenants)."""
        name = "api_keys_file"
        try:
            keys = cls(parse_list(settings.api_keys), settings.api_keys_file)
        except TenantsFileError as exc:
            raise SettingsError(f"{flag_name(name)} / {env_name(name)}: {exc}") from None
        if settings.api_keys_file and len(keys) == len(parse_list(settings.api_keys)):
            raise SettingsError(f"{flag_name(name)} / {env_name(name)}: no key in "
                                f"{settings.api_keys_file!r}")
        return keys

    def accepts(self, key: str) -> bool:
        return self.tenant_of(key) is not None

    def tenant_of(self, key: str) -> Tenant | None:
        """The key's tenant, or None for a key not accepted (compared in constant time)."""
        return self._file.current.match(key)

    def tenant(self, name: str) -> Tenant:
        """The named tenant's limits as the keys file says now."""
        return self._file.current.tenant(name)

    def changed(self) -> bool:
        return bool(self._file.path) and self._file.changed()

    def reload(self) -> bool:
        return bool(self._file.path) and self._file.reload()


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The key from `authorization: Bearer <key>`, or None."""
    for name, value in metadata or ():
        if name == AUTHORIZATION and isinstance(value, str) and value.lower().startswith(BEARER):
            return value[len(BEARER):].strip()
    return None


def service_of(method: str) -> str:
    """"/grpc.health.v1.Health/Check" -> "grpc.health.v1.Health"."""
    return method.strip("/").partition("/")[0]


def peer_address(context: grpc.aio.ServicerContext) -> str:
    """The peer's address without its port (which changes per connection)."""
    return context.peer().rpartition(":")[0]


def too_many_refusals(wait: float) -> ResourceExhausted:
    return ResourceExhausted(
        f"too many calls without a valid API key from this address; retry in {wait:.2f}s",
        retry_after=wait, metadata={"limit": "refusals"})


class TokenBuckets:
    """One token bucket per client: `rate` tokens a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: TTLCache[str, tuple[float, float]] = TTLCache(
            MAX_TRACKED_CLIENTS, burst / rate, clock)

    def wait(self, client: str) -> float:
        """The seconds until `client` has a token (0.0: it has one), taking none."""
        now = self._clock()
        tokens, last = self._buckets.get(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate

    def take(self, client: str) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there is one."""
        now = self._clock()
        tokens, last = self._buckets.get(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self._rate


class RefusalLog:
    """A warning per refused call, but at most one line per `interval` seconds: a flood of
    calls with made-up keys must not flood the log (the next line counts the rest)."""

    def __init__(self, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._quiet_until = float("-inf")
        self._unlogged = 0

    def warn(self, method: str, peer: str, why: str) -> None:
        now = self._clock()
        if now < self._quiet_until:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused since the last line)" if self._unlogged else ""
        log.warning("refused %s from %s: %s API key%s", method, peer, why, more)
        self._unlogged, self._quiet_until = 0, now + self._interval
