"""Encryption at rest of the run store, optional: AES-256-GCM under keys with ids.

`SealedStore` wraps any `RunStore`: what runs carry (requests with their prompts and tools,
answers, steps with tool arguments and results, errors, events' payloads, webhook bodies) is
sealed on the way in and opened on the way out; ids, tenants, statuses, times, counts and
leases stay in clear, so the store's queries need no key. Each sealed value names the id of
its key: the first key seals, every key opens, so keys rotate by putting a new one first
and dropping the old once the runs it sealed have expired. The additional data binds a
value to its run and column: a sealed value copied to another run does not open.

Keys come from a file or an environment variable (`run_store_keys`, `run_store_key_file`),
one `ID:BASE64` per line or comma; no key, its bytes or base64, is ever put in a message.
"""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agentloop.config import parse_store_keys
from agentloop.errors import FailedPrecondition
from agentloop.runs.store import (
    DeliveryRecord,
    EventRecord,
    Page,
    RunRecord,
    RunStatus,
    RunStore,
)

#: What starts a sealed value: no text or JSON the store keeps starts so.
MAGIC = b"\x00AGL1"
_NONCE_BYTES = 12
#: Sealed text columns (error) keep their bytes as base64 after this prefix.
TEXT_PREFIX = "sealed:"


def load_keys(inline: str, path: str) -> list[tuple[str, bytes]]:
    """The keys of the settings: the file's, then the variable's."""
    text = inline
    if path:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            text = handle.read() + "\n" + inline
    return parse_store_keys(text)


class Sealer:
    """Seals and opens values with AES-256-GCM; the first key seals."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("no key")
        self._sealing_id = keys[0][0]
        self._keys = {key_id: AESGCM(key) for key_id, key in keys}

    def seal(self, data: bytes, context: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        key_id = self._sealing_id.encode()
        sealed = self._keys[self._sealing_id].encrypt(nonce, data, context.encode())
        return MAGIC + bytes([len(key_id)]) + key_id + nonce + sealed

    def open(self, data: bytes, context: str) -> bytes:
        if not data.startswith(MAGIC):
            return data  # written before encryption was turned on
        at = len(MAGIC)
        length = data[at]
        key_id = data[at + 1:at + 1 + length].decode(errors="replace")
        nonce = data[at + 1 + length:at + 1 + length + _NONCE_BYTES]
        aead = self._keys.get(key_id)
        if aead is None:
            raise FailedPrecondition(
                f"this run is sealed under key {key_id!r}, which this server does not have "
                "(run_store_keys)", reason="RUN_STORE_KEY_MISSING")
        try:
            return aead.decrypt(nonce, data[at + 1 + length + _NONCE_BYTES:], context.encode())
        except Exception:
            raise FailedPrecondition(
                f"a value sealed under key {key_id!r} does not open: it was changed or "
                "belongs to another run", reason="RUN_STORE_SEALED_VALUE_BROKEN") from None

    def seal_text(self, text: str, context: str) -> str:
        if not text:
            return text
        return TEXT_PREFIX + base64.b64encode(self.seal(text.encode(), context)).decode()

    def open_text(self, text: str, context: str) -> str:
        if not text.startswith(TEXT_PREFIX):
            return text
        return self.open(base64.b64decode(text[len(TEXT_PREFIX):]), context).decode()


class SealedStore:
    """A RunStore whose runs' contents are sealed at rest (the `RunStore` interface)."""

    def __init__(self, inner: RunStore, sealer: Sealer) -> None:
        self.inner = inner
        self._sealer = sealer

    def __getattr__(self, name: str) -> Any:  # observe and the like
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("inner", "_sealer"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    # --- the fields that are sealed ---

    def _seal_run(self, run: RunRecord) -> RunRecord:
        s, rid = self._sealer, run.id
        return dataclasses.replace(
            run, request=s.seal(run.request, f"{rid}:request"),
            answer=s.seal(run.answer, f"{rid}:answer") if run.answer else b"",
            steps=s.seal(run.steps, f"{rid}:steps") if run.steps else b"",
            error=s.seal_text(run.error, f"{rid}:error"))

    def _open_run(self, run: RunRecord | None) -> RunRecord | None:
        if run is None:
            return None
        s, rid = self._sealer, run.id
        return dataclasses.replace(
            run, request=s.open(run.request, f"{rid}:request"),
            answer=s.open(run.answer, f"{rid}:answer"),
            steps=s.open(run.steps, f"{rid}:steps"),
            error=s.open_text(run.error, f"{rid}:error"))

    def _seal_delivery(self, delivery: DeliveryRecord) -> DeliveryRecord:
        context = f"{delivery.run_id}:webhook:{delivery.webhook_id}"
        return dataclasses.replace(delivery, body=self._sealer.seal(delivery.body, context))

    def _open_delivery(self, delivery: DeliveryRecord) -> DeliveryRecord:
        context = f"{delivery.run_id}:webhook:{delivery.webhook_id}"
        return dataclasses.replace(delivery, body=self._sealer.open(delivery.body, context))

    # --- the interface ---

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def create(self, run: RunRecord, max_active_per_tenant: int) -> None:
        await self.inner.create(self._seal_run(run), max_active_per_tenant)

    async def get(self, run_id: str, tenant: str | None = None) -> RunRecord | None:
        return self._open_run(await self.inner.get(run_id, tenant))

    async def list(self, tenant: str, statuses: Iterable[RunStatus], limit: int,
                   after: Page | None = None) -> list[RunRecord]:
        runs = await self.inner.list(tenant, statuses, limit, after)
        return [run for run in map(self._open_run, runs) if run is not None]

    async def update(self, run_id: str, **changes: Any) -> None:
        s = self._sealer
        for name in ("answer", "steps"):
            if changes.get(name):
                changes[name] = s.seal(changes[name], f"{run_id}:{name}")
        if changes.get("error"):
            changes["error"] = s.seal_text(changes["error"], f"{run_id}:error")
        await self.inner.update(run_id, **changes)

    async def request_cancel(self, run_id: str) -> None:
        await self.inner.request_cancel(run_id)

    async def listen_cancels(self, on_cancel: Callable[[str], None]) -> bool:
        return await self.inner.listen_cancels(on_cancel)  # run ids are in clear

    async def append_events(self, run_id: str, events: Sequence[EventRecord]) -> None:
        await self.inner.append_events(run_id, [dataclasses.replace(
            e, payload=self._sealer.seal(e.payload, f"{e.run_id}:event:{e.seq}"))
            for e in events])

    async def events(self, run_id: str, after_seq: int, limit: int) -> list[EventRecord]:
        return [dataclasses.replace(e, payload=self._sealer.open(
            e.payload, f"{e.run_id}:event:{e.seq}"))
            for e in await self.inner.events(run_id, after_seq, limit)]

    async def claim(self, run_id: str, owner: str, until: float, now: float) -> bool:
        return await self.inner.claim(run_id, owner, until, now)

    async def renew(self, owner: str, run_ids: Sequence[str], until: float) -> dict[str, bool]:
        return await self.inner.renew(owner, run_ids, until)

    async def orphans(self, now: float, limit: int) -> list[RunRecord]:
        runs = await self.inner.orphans(now, limit)
        return [run for run in map(self._open_run, runs) if run is not None]

    async def count_active(self, tenant: str) -> int:
        return await self.inner.count_active(tenant)

    async def save_delivery(self, delivery: DeliveryRecord) -> None:
        await self.inner.save_delivery(self._seal_delivery(delivery))

    async def deliveries(self, run_id: str) -> list[DeliveryRecord]:
        return [self._open_delivery(d) for d in await self.inner.deliveries(run_id)]

    async def pending_deliveries(self, limit: int) -> list[DeliveryRecord]:
        return [self._open_delivery(d) for d in await self.inner.pending_deliveries(limit)]

    async def put_tool_result(self, run_id: str, call_id: str, payload: bytes) -> None:
        await self.inner.put_tool_result(run_id, call_id, self._sealer.seal(
            payload, f"{run_id}:tool_result:{call_id}"))

    async def take_tool_results(self, run_ids: Sequence[str]
                                ) -> list[tuple[str, str, bytes]]:
        return [(run_id, call_id, self._sealer.open(payload, f"{run_id}:tool_result:{call_id}"))
                for run_id, call_id, payload in await self.inner.take_tool_results(run_ids)]

    async def sweep(self, now: float, ttls: Mapping[RunStatus, float]) -> int:
        return await self.inner.sweep(now, ttls)
