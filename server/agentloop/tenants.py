"""Tenants: who a caller is, and the limits the operator gave its team.

The API keys file names a tenant per key (several keys per tenant, so keys rotate while the
tenant stays), with optional limits: generations at once, tokens and requests per minute,
the highest priority it may ask for, its share of the queue (weight) and whether its calls
may leave the premises. The old format, one key per line, still works: those keys belong to
the unnamed default tenant, whose callers admission and the caches tell apart by address,
as they do without keys. `TenantKeys` is one parsed file; `reload` swaps it whole, so a
call sees the old file or the new one, never a mix.

Format (YAML or JSON; the file is read as this format when its first line that is not a
comment or blank starts with `tenants:` or `{`)::

    tenants:
      search:
        keys: [sk-search-1, sk-search-2]
        weight: 2
        max_concurrency: 8
        tokens_per_minute: 200000
        requests_per_minute: 600
        max_priority: critical
        allow_remote: false
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from agentloop.domain import Priority

log = logging.getLogger(__name__)

#: The metric label and span value of every caller without a named tenant (one bucket).
DEFAULT_TENANT_LABEL = "_default"
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PRIORITIES = {p.name.lower(): p for p in Priority}
_LIMIT_FIELDS = ("weight", "max_concurrency", "tokens_per_minute", "requests_per_minute",
                 "max_priority", "allow_remote", "keys")


class TenantsFileError(ValueError):
    """The keys file cannot be read as keys or tenants; the message never quotes a key."""


@dataclass(frozen=True, slots=True)
class Tenant:
    """One tenant's identity and limits (0 = no limit)."""

    #: The operator's name ("" for the default tenant: keys listed without one, or no keys).
    name: str = ""
    #: Its share of the queue against other waiting tenants (2 = twice the slots of 1).
    weight: float = 1.0
    #: Generations at once, holding an admission slot or waiting for one.
    max_concurrency: int = 0
    tokens_per_minute: int = 0
    requests_per_minute: int = 0
    max_priority: Priority = Priority.CRITICAL
    #: False: every call is local-only (CallContext.local_only), whatever the caller says.
    allow_remote: bool = True

    @property
    def label(self) -> str:
        return tenant_label(self.name)

    @property
    def has_quota(self) -> bool:
        return bool(self.max_concurrency or self.tokens_per_minute or self.requests_per_minute)


DEFAULT_TENANT = Tenant()


def tenant_label(name: str) -> str:
    """A tenant as a metric label: operator names only (a tenant name comes from the keys
    file, never from a caller), so the labels stay bounded; callers without one, one bucket."""
    return name or DEFAULT_TENANT_LABEL


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class TenantKeys:
    """One reading of the keys: SHA-256 digests of the keys, each with its tenant."""

    keys: tuple[tuple[bytes, Tenant], ...] = ()
    tenants: Mapping[str, Tenant] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def match(self, key: str) -> Tenant | None:
        """The key's tenant, or None. Every digest is compared (in constant time), so the
        time taken says nothing about which key matched, or how many."""
        presented = digest(key)
        found: Tenant | None = None
        for known, tenant in self.keys:
            if hmac.compare_digest(presented, known):
                found = tenant
        return found

    def tenant(self, name: str) -> Tenant:
        """The named tenant's current limits (the default tenant's for "" or a name the
        file no longer has)."""
        return self.tenants.get(name, DEFAULT_TENANT) if name else DEFAULT_TENANT


def is_structured(text: str) -> bool:
    """True when the file is the tenants format, False for one key per line."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        return stripped.startswith(("{", "tenants:"))
    return False


def parse_keys_text(text: str, extra_keys: Iterable[str] = (),
                    extra_digests: Iterable[bytes] = ()) -> TenantKeys:
    """Keys from one file's text (either format) plus the default tenant's `extra_keys`
    (or their digests)."""
    pairs = [(known, DEFAULT_TENANT) for known in extra_digests]
    pairs += [(digest(key), DEFAULT_TENANT) for key in extra_keys]
    tenants: dict[str, Tenant] = {}
    if is_structured(text):
        for tenant, keys in _parse_tenants(text):
            tenants[tenant.name] = tenant
            pairs += [(digest(key), tenant) for key in keys]
    else:
        lines = (line.partition("#")[0].strip() for line in text.splitlines())
        pairs += [(digest(key), DEFAULT_TENANT) for key in lines if key]
    digests = [known for known, _ in pairs]
    if len(set(digests)) != len(digests):
        raise TenantsFileError("a key is listed twice")
    return TenantKeys(tuple(pairs), tenants)


def read_keys_file(path: str, extra_digests: Iterable[bytes] = ()) -> TenantKeys:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return parse_keys_text(text, extra_digests=extra_digests)


def _parse_tenants(text: str) -> list[tuple[Tenant, list[str]]]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise TenantsFileError(f"not valid YAML or JSON{where}") from None
    if not isinstance(document, dict) or set(document) != {"tenants"} \
            or not isinstance(document["tenants"], dict) or not document["tenants"]:
        raise TenantsFileError("expected one mapping 'tenants:' of tenant names to entries")
    return [_tenant(name, entry) for name, entry in document["tenants"].items()]


def _tenant(name: Any, entry: Any) -> tuple[Tenant, list[str]]:
    if not isinstance(name, str) or not _TENANT_NAME.fullmatch(name):
        raise TenantsFileError(f"tenant name {str(name)[:64]!r}: letters, digits, '.', '_' and "
                               "'-', at most 64, not starting with a symbol")
    where = f"tenant {name!r}"
    if not isinstance(entry, dict):
        raise TenantsFileError(f"{where}: expected a mapping with 'keys'")
    unknown = sorted(str(key) for key in entry if key not in _LIMIT_FIELDS)
    if unknown:
        raise TenantsFileError(f"{where}: unknown field {unknown[0][:64]!r} (known: "
                               f"{', '.join(_LIMIT_FIELDS)})")
    keys = entry.get("keys")
    if not isinstance(keys, list) or not keys or not all(
            isinstance(key, str) and key and not any(c.isspace() for c in key) for key in keys):
        raise TenantsFileError(f"{where}: 'keys' must be a list of keys without spaces")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) \
            or not math.isfinite(weight) or not 0.01 <= weight <= 1000:
        raise TenantsFileError(f"{where}: 'weight' must be a number from 0.01 to 1000")
    limits = {limit: _count(where, limit, entry.get(limit, 0))
              for limit in ("max_concurrency", "tokens_per_minute", "requests_per_minute")}
    max_priority = entry.get("max_priority", "critical")
    if max_priority not in _PRIORITIES:
        raise TenantsFileError(f"{where}: 'max_priority' must be one of "
                               f"{', '.join(_PRIORITIES)}")
    allow_remote = entry.get("allow_remote", True)
    if not isinstance(allow_remote, bool):
        raise TenantsFileError(f"{where}: 'allow_remote' must be true or false")
    tenant = Tenant(name, float(weight), max_priority=_PRIORITIES[max_priority],
                    allow_remote=allow_remote, **limits)
    return tenant, keys


def _count(where: str, limit: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**12:
        raise TenantsFileError(f"{where}: {limit!r} must be a whole number >= 0 (0 = no limit)")
    return value


#: Readings of the keys file one reload makes at most when the file keeps changing while
#: it is read; past them the stamp stays old, so the next watch tick or SIGHUP reads again.
MAX_READS_PER_RELOAD = 5


class KeysFile:
    """The keys file, read again when it changes (`changed`) or on demand (`reload`).

    One reading at a time: a reload asked for while one runs (the watch thread and SIGHUP
    at once) makes the running one read again when it is done, and returns at once. A
    reading is applied only if the file's stamp (time, size, inode) is the same after the
    read as before it, so an older reading never lands over a newer file: a key removed
    from the file never comes back."""

    def __init__(self, path: str, extra_keys: Iterable[str] = ()) -> None:
        self.path = path
        # --api-keys, kept as digests for every reading of the file.
        self._extra = tuple(digest(key) for key in extra_keys)
        self._stamp = self._stat()
        self.current = read_keys_file(path, self._extra) if path else parse_keys_text(
            "", extra_digests=self._extra)
        self._state = threading.Lock()
        self._reloading = False
        self._again = False

    def _stat(self) -> tuple[int, int, int] | None:
        if not self.path:
            return None
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def changed(self) -> bool:
        """The file's time, size or inode moved since the last reading (a Kubernetes Secret
        volume swaps a symlink: the inode changes)."""
        return self._stat() != self._stamp

    def reload(self) -> bool:
        """Read the file again and apply it (True when new keys were applied); on a bad
        file keep the keys in force and log why. Blocks on a file read: call it off the
        event loop."""
        with self._state:
            if self._reloading:
                self._again = True  # the running reload reads once more, after this
                return False
            self._reloading = True
        applied = False
        try:
            for _ in range(MAX_READS_PER_RELOAD):
                with self._state:
                    self._again = False
                outcome = self._read_and_apply()
                applied = applied or outcome is True
                with self._state:
                    if outcome is not None and not self._again:
                        self._reloading = False
                        return applied
            log.warning("keys file %s changed while it was read, %d times: read again on "
                        "its next change or SIGHUP", self.path, MAX_READS_PER_RELOAD)
            return applied
        finally:
            with self._state:
                self._reloading = False

    def _read_and_apply(self) -> bool | None:
        """One reading: True applied, False refused (a bad file), None when the file
        changed while it was read (nothing applied)."""
        before = self._stat()
        try:
            keys = read_keys_file(self.path, self._extra)
        except (OSError, ValueError) as exc:
            if self._stat() != before:
                return None
            self._stamp = before
            log.warning("keys file %s not reloaded, the previous keys stay in force: %s",
                        self.path, exc)
            return False
        if self._stat() != before:
            return None  # this reading may be older than the file: never applied
        self._stamp = before
        if not len(keys):
            log.warning("keys file %s not reloaded: it has no key", self.path)
            return False
        self.current = keys
        log.info("keys file %s reloaded: %d keys, %d named tenants", self.path, len(keys),
                 len(keys.tenants))
        return True


#: The tenant the edge (rpc.edge) resolved for the call being handled (None: keys off).
#: Each RPC runs in its own task, so the value is the call's own.
RESOLVED_TENANT: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar(
    "agentloop_tenant", default=None)


def resolved_tenant() -> Tenant:
    return RESOLVED_TENANT.get() or DEFAULT_TENANT
