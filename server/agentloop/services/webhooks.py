"""Webhooks at a run's end, the Standard Webhooks way: signed, retried, recorded.

A run started with a `webhook_url` gets one message when it ends (`agent_run.completed`,
`.failed`, `.cancelled` or `.expired`), POSTed as JSON with the spec's three headers:
`webhook-id` (the same on every attempt, so a receiver drops repeats), `webhook-timestamp`
(seconds, of the attempt) and `webhook-signature`: `v1,<base64 HMAC-SHA256 of
"id.timestamp.body">` under each of the operator's secrets, space-separated, so a receiver
holding the old or the new secret verifies it while secrets rotate.

Only URLs starting with one of the operator's prefixes (webhook_url_prefixes) are taken,
and the address the host resolves to must be public, or in webhook_allowed_networks: the
check runs on the very addresses the connection uses (the connector's resolver), so a name
that resolves elsewhere later changes nothing. Redirects are not followed. A 2xx delivers;
410 Gone disables the URL for the run; anything else (another status, no answer, a reset)
is tried again after an exponential backoff with jitter, until webhook_retry_for has passed
since the run ended. Every attempt is recorded on the run (`DeliveryRecord`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from cachetools import LRUCache

from agentloop.config import Settings, parse_list, parse_webhook_secrets
from agentloop.runs.store import DeliveryRecord, DeliveryState, RunStore

log = logging.getLogger(__name__)

#: Longest webhook URL a run may carry.
MAX_URL_CHARS = 2048
#: Deliveries in flight at once per replica (the others wait their turn).
MAX_CONCURRENT_DELIVERIES = 16
#: Seconds past the longest wait between attempts after which a pending delivery is taken up.
STALE_MARGIN = 10.0
#: Runs whose URL answered 410 remembered in memory (older ones: read from the store).
DISABLED_RUNS_KEPT = 10_000
#: Bytes of a receiver's answer read (and ignored) at most.
MAX_ANSWER_BYTES = 4096

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> list[Network]:
    return [ipaddress.ip_network(item, strict=False) for item in parse_list(text)]


def sign(keys: Sequence[bytes], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one `v1,<signature>` per key, space-separated."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
                    .decode() for key in keys)


def address_problem(address: Address, allowed: Sequence[Network]) -> str | None:
    """Why a webhook may not go to this address (not public, not allowed), or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allowed):
        return None
    if not address.is_global or address.is_multicast:
        return f"{address} is not a public address (webhook_allowed_networks)"
    return None


def url_problem(url: str, settings: Settings) -> str | None:
    """Why a run may not carry this webhook URL, or None."""
    prefixes = parse_list(settings.webhook_url_prefixes)
    if not prefixes:
        return "this server sends no webhooks (webhook_url_prefixes is empty)"
    if len(url) > MAX_URL_CHARS:
        return f"longer than {MAX_URL_CHARS} characters"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username \
            or parts.password:
        return "must be an http(s) URL without credentials"
    if not any(url.startswith(prefix) for prefix in prefixes):
        return "must start with one of the URL prefixes the server allows (webhook_url_prefixes)"
    return None


class RefusedAddress(OSError):
    """The webhook's host resolves to no address it may go to."""


class _CheckedResolver(AbstractResolver):
    """The system resolver, keeping only the addresses a webhook may go to."""

    def __init__(self, allowed: Sequence[Network]) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allowed = allowed

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        problems = [address_problem(ipaddress.ip_address(r["host"]), self._allowed)
                    for r in found]
        kept = [r for r, problem in zip(found, problems, strict=True) if problem is None]
        if not kept:
            raise RefusedAddress(f"refused: {problems[0] if problems else 'no address'}")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def delivery_for(run_id: str, url: str, event_type: str, data: dict[str, Any]) -> DeliveryRecord:
    """A new message for a run's webhook (its id is kept for every attempt)."""
    now = time.time()
    webhook_id = "msg_" + secrets.token_urlsafe(18)
    body = json.dumps({"type": event_type, "timestamp": _iso(now), "data": data},
                      ensure_ascii=False).encode()
    return DeliveryRecord(webhook_id, run_id, event_type, url, body, created=now)


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix)) + f".{int(unix % 1 * 1000):03d}Z"


class WebhookSender:
    """Delivers runs' webhook messages with retries, recording every attempt in the store."""

    def __init__(self, store: RunStore, settings: Settings) -> None:
        self._store = store
        self._settings = settings
        self._keys = parse_webhook_secrets(settings.webhook_secrets)
        self._allowed = parse_networks(settings.webhook_allowed_networks)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_DELIVERIES)
        #: Runs whose URL answered 410 (the most recent; the store has them all).
        self._disabled_runs: LRUCache[str, bool] = LRUCache(maxsize=DISABLED_RUNS_KEPT)
        #: Called with each attempt's outcome ("delivered", "failed", "retry", "disabled").
        self.observe: Callable[[str], None] = lambda outcome: None

    @property
    def enabled(self) -> bool:
        return bool(parse_list(self._settings.webhook_url_prefixes)) and bool(self._keys)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=_CheckedResolver(self._allowed),
                                             limit=MAX_CONCURRENT_DELIVERIES)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._settings.webhook_timeout))
        return self._session

    async def resume(self) -> None:
        """Take up the deliveries a stopped replica left pending: those no replica tried for
        longer than the longest wait between two attempts (a replica that tries them still
        would have; a receiver drops the rare repeat by its webhook-id)."""
        stale = time.time() - (self._settings.webhook_backoff_max
                               + self._settings.webhook_timeout + STALE_MARGIN)
        mine = {task.get_name() for task in self._tasks}
        for delivery in await self._store.pending_deliveries(limit=1000):
            if f"webhook-{delivery.webhook_id}" in mine:
                continue
            if (delivery.last_attempt or delivery.created) < stale:
                self._spawn(delivery)

    async def send(self, delivery: DeliveryRecord) -> None:
        """Record a new message, then deliver it in the background; a run whose URL answered
        410 gets its later messages recorded as disabled, not sent."""
        if delivery.run_id in self._disabled_runs or any(
                d.state is DeliveryState.DISABLED
                for d in await self._store.deliveries(delivery.run_id)):
            self._disabled_runs[delivery.run_id] = True
            delivery = dataclasses.replace(delivery, state=DeliveryState.DISABLED,
                                           last_error="the URL answered 410 Gone before")
            await self._store.save_delivery(delivery)
            return
        await self._store.save_delivery(delivery)
        self._spawn(delivery)

    def _spawn(self, delivery: DeliveryRecord) -> None:
        task = asyncio.create_task(self._deliver(delivery), name=f"webhook-{delivery.webhook_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _deliver(self, delivery: DeliveryRecord) -> None:
        give_up = delivery.created + self._settings.webhook_retry_for
        while delivery.state is DeliveryState.PENDING:
            async with self._slots:
                status, error = await self._attempt(delivery)
            now = time.time()
            if 200 <= status < 300:
                state, outcome = DeliveryState.DELIVERED, "delivered"
            elif status == 410:
                state, outcome = DeliveryState.DISABLED, "disabled"
                self._disabled_runs[delivery.run_id] = True
            else:
                delay = self._backoff(delivery.attempts + 1)
                state, outcome = ((DeliveryState.PENDING, "retry") if now + delay < give_up
                                  else (DeliveryState.FAILED, "failed"))
            delivery = DeliveryRecord(
                delivery.webhook_id, delivery.run_id, delivery.event_type, delivery.url,
                delivery.body, delivery.created, state, delivery.attempts + 1, status,
                error, now)
            self.observe(outcome)
            with contextlib.suppress(Exception):  # a store that is down: the next try records
                await self._store.save_delivery(delivery)
            if state is DeliveryState.PENDING:
                await asyncio.sleep(delay)
        if delivery.state is not DeliveryState.DELIVERED:
            log.warning("webhook %s of run %s: %s after %d attempts (%s)", delivery.webhook_id,
                        delivery.run_id, delivery.state.value, delivery.attempts,
                        delivery.last_error or delivery.last_status)

    def _backoff(self, attempts: int) -> float:
        """Exponential, capped, with full jitter over its upper half."""
        ceiling = min(self._settings.webhook_backoff_max,
                      self._settings.webhook_backoff * 2 ** (attempts - 1))
        return ceiling * random.uniform(0.5, 1.0)

    async def _attempt(self, delivery: DeliveryRecord) -> tuple[int, str]:
        """One POST; (HTTP status, "") or (0, why there was no answer)."""
        host = urlsplit(delivery.url).hostname or ""
        with contextlib.suppress(ValueError):  # a literal address skips the resolver
            problem = address_problem(ipaddress.ip_address(host), self._allowed)
            if problem is not None:
                return 0, f"refused: {problem}"
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._keys, delivery.webhook_id, timestamp, delivery.body),
            "user-agent": "agentloop-webhooks",
        }
        try:
            async with self._client().post(delivery.url, data=delivery.body, headers=headers,
                                           allow_redirects=False) as response:
                await response.content.read(MAX_ANSWER_BYTES)
                if 300 <= response.status < 400:
                    return response.status, "redirects are not followed"
                return response.status, ""
        except RefusedAddress as exc:
            return 0, str(exc)
        except aiohttp.ClientConnectorError as exc:
            cause = exc.os_error if isinstance(exc.os_error, RefusedAddress) else None
            return 0, str(cause) if cause is not None else "could not connect"
        except TimeoutError:
            return 0, f"no answer within {self._settings.webhook_timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return 0, f"no answer ({type(exc).__name__})"
