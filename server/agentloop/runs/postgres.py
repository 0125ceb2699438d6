"""The run store on PostgreSQL (asyncpg), for replicas that share runs.

The same `RunStore` interface and tables as SQLite's (runs/store.py). Replicas may start
together: the schema is created under an advisory lock, and a tenant's active runs are
counted and a new one inserted under a per-tenant advisory lock, so no two replicas let a
tenant past its limit at once. A server that does not answer is RUN_STORE_UNAVAILABLE, a
full disk (SQLSTATE class 53) RUN_STORE_FULL.

A cancel is announced on a channel (NOTIFY, sent when the cancel commits) that every
replica listens to on a connection of its own (`listen_cancels`): the replica running the
run stops it at once. The flag in the table stays the fallback that the lease keeper reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import asyncpg

from agentloop.errors import RunLimitReached, RunStoreFull, RunStoreUnavailable
from agentloop.runs.store import (
    ACTIVE,
    UPDATABLE,
    DeliveryRecord,
    DeliveryState,
    EventRecord,
    Page,
    RunRecord,
    RunStatus,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agentloop_runs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    status TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    request BYTEA NOT NULL,
    deadline DOUBLE PRECISION,
    finished DOUBLE PRECISION,
    answer BYTEA NOT NULL DEFAULT '',
    steps BYTEA NOT NULL DEFAULT '',
    input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    model TEXT NOT NULL DEFAULT '',
    stop_reason TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    waiting_call TEXT NOT NULL DEFAULT '',
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    lease_owner TEXT NOT NULL DEFAULT '',
    lease_expires DOUBLE PRECISION,
    last_seq BIGINT NOT NULL DEFAULT 0,
    webhook_url TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS agentloop_runs_by_tenant
    ON agentloop_runs (tenant, created DESC, id DESC);
CREATE INDEX IF NOT EXISTS agentloop_runs_by_status ON agentloop_runs (status, updated);
CREATE TABLE IF NOT EXISTS agentloop_run_events (
    run_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    payload BYTEA NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS agentloop_run_deliveries (
    webhook_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    url TEXT NOT NULL,
    body BYTEA NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    last_attempt DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS agentloop_run_deliveries_by_run ON agentloop_run_deliveries (run_id);
CREATE TABLE IF NOT EXISTS agentloop_run_tool_results (
    run_id TEXT NOT NULL,
    call_id TEXT NOT NULL,
    payload BYTEA NOT NULL,
    PRIMARY KEY (run_id, call_id)
);
CREATE INDEX IF NOT EXISTS agentloop_run_deliveries_by_state
    ON agentloop_run_deliveries (state);
"""
#: The advisory lock key under which replicas create the schema one at a time.
_SCHEMA_LOCK = 0x6167_6C70  # "aglp"

_RUN_COLUMNS = tuple(f.name for f in dataclasses.fields(RunRecord))
_DELIVERY_COLUMNS = tuple(f.name for f in dataclasses.fields(DeliveryRecord))
_ACTIVE_VALUES = sorted(status.value for status in ACTIVE)
#: Connections per replica (the cancel listener's besides).
POOL_SIZE = 8
#: The channel on which a cancel is announced (its payload: the run's id).
CANCEL_CHANNEL = "agentloop_run_cancel"


def _value(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _run(row: asyncpg.Record) -> RunRecord:
    values = dict(row)
    values["status"] = RunStatus(values["status"])
    return RunRecord(**values)


def _delivery(row: asyncpg.Record) -> DeliveryRecord:
    values = dict(row)
    values["state"] = DeliveryState(values["state"])
    return DeliveryRecord(**values)


def _store_error(exc: BaseException) -> Exception:
    if isinstance(exc, asyncpg.InsufficientResourcesError):  # SQLSTATE class 53: disk full
        return RunStoreFull("the run store is full: no new runs until room is made",
                            retry_after=30.0)
    return RunStoreUnavailable(f"the run store is unavailable ({type(exc).__name__})",
                               retry_after=5.0)


class PostgresRunStore:
    """The run store in PostgreSQL: `url` is a postgresql:// connection URL."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self._url = url
        self._timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self.observe: Callable[[str, float], None] = lambda operation, seconds: None

    async def _call(self, operation: str,
                    work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        if self._pool is None:
            raise RunStoreUnavailable("the run store is not open", retry_after=5.0)
        started = time.perf_counter()
        try:
            async with self._pool.acquire(timeout=self._timeout) as db, db.transaction():
                return await work(db)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise _store_error(exc) from None
        finally:
            self.observe(operation, time.perf_counter() - started)

    async def open(self) -> None:
        try:
            pool = await asyncpg.create_pool(self._url, min_size=1, max_size=POOL_SIZE,
                                             timeout=self._timeout, command_timeout=30)
            async with pool.acquire() as db, db.transaction():
                await db.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                await db.execute(_SCHEMA)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise _store_error(exc) from None
        self._pool = pool

    async def close(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                                     TimeoutError):
                await listener.close(timeout=self._timeout)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def listen_cancels(self, on_cancel: Callable[[str], None]) -> bool:
        """Call `on_cancel(run id)` for every cancel any replica requests, as it commits;
        True while listening (a lost connection is opened again at the next call), False
        when the server cannot be reached (cancels are then only read with the leases)."""
        if self._listener is not None and not self._listener.is_closed():
            return True
        if self._pool is None:
            return False
        try:
            listener = await asyncpg.connect(self._url, timeout=self._timeout)
            await listener.add_listener(
                CANCEL_CHANNEL, lambda _db, _pid, _channel, run_id: on_cancel(run_id))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            return False
        self._listener = listener
        return True

    async def create(self, run: RunRecord, max_active_per_tenant: int) -> None:
        values = [_value(v) for v in dataclasses.astuple(run)]

        async def create(db: asyncpg.Connection) -> None:
            await db.execute("SELECT pg_advisory_xact_lock(hashtext($1))", run.tenant)
            active = await db.fetchval(
                "SELECT count(*) FROM agentloop_runs WHERE tenant = $1 AND status = ANY($2)",
                run.tenant, _ACTIVE_VALUES)
            if active >= max_active_per_tenant:
                raise RunLimitReached(
                    f"the tenant has {active} runs queued or running; the limit is "
                    f"{max_active_per_tenant} (run_max_active_per_tenant)", retry_after=5.0)
            await db.execute(
                f"INSERT INTO agentloop_runs ({', '.join(_RUN_COLUMNS)}) VALUES "
                f"({', '.join(f'${i + 1}' for i in range(len(_RUN_COLUMNS)))})", *values)

        await self._call("create", create)

    async def get(self, run_id: str, tenant: str | None = None) -> RunRecord | None:
        async def get(db: asyncpg.Connection) -> RunRecord | None:
            row = await db.fetchrow(f"SELECT {', '.join(_RUN_COLUMNS)} FROM agentloop_runs "
                                    "WHERE id = $1", run_id)
            return None if row is None else _run(row)

        run = await self._call("get", get)
        return None if run is None or (tenant is not None and run.tenant != tenant) else run

    async def list(self, tenant: str, statuses: Iterable[RunStatus], limit: int,
                   after: Page | None = None) -> list[RunRecord]:
        wanted = sorted(status.value for status in set(statuses))
        where, args = ["tenant = $1"], [tenant]
        if wanted:
            args.append(wanted)
            where.append(f"status = ANY(${len(args)})")
        if after is not None:
            args += [after.created, after.run_id]
            where.append(f"(created, id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit)

        async def list_runs(db: asyncpg.Connection) -> list[RunRecord]:
            rows = await db.fetch(
                f"SELECT {', '.join(_RUN_COLUMNS)} FROM agentloop_runs WHERE "
                f"{' AND '.join(where)} ORDER BY created DESC, id DESC LIMIT ${len(args)}",
                *args)
            return [_run(row) for row in rows]

        return await self._call("list", list_runs)

    async def update(self, run_id: str, **changes: Any) -> None:
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        names = list(changes)
        sets = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(names))

        async def update(db: asyncpg.Connection) -> None:
            await db.execute(f"UPDATE agentloop_runs SET {sets} WHERE id = $1", run_id,
                             *(_value(changes[name]) for name in names))

        await self._call("update", update)

    async def request_cancel(self, run_id: str) -> None:
        async def cancel(db: asyncpg.Connection) -> None:
            await db.execute("UPDATE agentloop_runs SET cancel_requested = TRUE WHERE id = $1",
                             run_id)
            await db.execute("SELECT pg_notify($1, $2)", CANCEL_CHANNEL, run_id)

        await self._call("cancel", cancel)

    async def append_events(self, run_id: str, events: Sequence[EventRecord]) -> None:
        if not events:
            return
        rows = [(e.run_id, e.seq, e.kind, e.payload) for e in events]
        last = max(e.seq for e in events)

        async def append(db: asyncpg.Connection) -> None:
            await db.executemany(
                "INSERT INTO agentloop_run_events (run_id, seq, kind, payload) VALUES "
                "($1, $2, $3, $4) ON CONFLICT DO NOTHING", rows)
            await db.execute("UPDATE agentloop_runs SET last_seq = GREATEST(last_seq, $1) "
                             "WHERE id = $2", last, run_id)

        await self._call("append_events", append)

    async def events(self, run_id: str, after_seq: int, limit: int) -> list[EventRecord]:
        async def events(db: asyncpg.Connection) -> list[EventRecord]:
            rows = await db.fetch("SELECT run_id, seq, kind, payload FROM agentloop_run_events "
                                  "WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                                  run_id, after_seq, limit)
            return [EventRecord(r["run_id"], r["seq"], r["kind"], bytes(r["payload"]))
                    for r in rows]

        return await self._call("events", events)

    async def claim(self, run_id: str, owner: str, until: float, now: float) -> bool:
        async def claim(db: asyncpg.Connection) -> bool:
            result = await db.execute(
                "UPDATE agentloop_runs SET lease_owner = $1, lease_expires = $2 WHERE id = $3 "
                "AND (lease_owner = '' OR lease_owner = $1 OR lease_expires IS NULL OR "
                "lease_expires < $4)", owner, until, run_id, now)
            return result.endswith(" 1")

        return await self._call("claim", claim)

    async def renew(self, owner: str, run_ids: Sequence[str], until: float) -> dict[str, bool]:
        if not run_ids:
            return {}

        async def renew(db: asyncpg.Connection) -> dict[str, bool]:
            rows = await db.fetch(
                "UPDATE agentloop_runs SET lease_expires = $1 WHERE lease_owner = $2 AND "
                "id = ANY($3) RETURNING id, cancel_requested", until, owner, list(run_ids))
            return {row["id"]: row["cancel_requested"] for row in rows}

        return await self._call("renew", renew)

    async def orphans(self, now: float, limit: int) -> list[RunRecord]:
        async def orphans(db: asyncpg.Connection) -> list[RunRecord]:
            rows = await db.fetch(
                f"SELECT {', '.join(_RUN_COLUMNS)} FROM agentloop_runs WHERE status = ANY($1) "
                "AND (lease_expires IS NULL OR lease_expires < $2) ORDER BY created LIMIT $3",
                _ACTIVE_VALUES, now, limit)
            return [_run(row) for row in rows]

        return await self._call("orphans", orphans)

    async def count_active(self, tenant: str) -> int:
        async def count(db: asyncpg.Connection) -> int:
            return int(await db.fetchval(
                "SELECT count(*) FROM agentloop_runs WHERE tenant = $1 AND status = ANY($2)",
                tenant, _ACTIVE_VALUES))

        return await self._call("count_active", count)

    async def save_delivery(self, delivery: DeliveryRecord) -> None:
        values = [_value(v) for v in dataclasses.astuple(delivery)]
        columns = ", ".join(_DELIVERY_COLUMNS)
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _DELIVERY_COLUMNS[1:])

        async def save(db: asyncpg.Connection) -> None:
            await db.execute(
                f"INSERT INTO agentloop_run_deliveries ({columns}) VALUES "
                f"({', '.join(f'${i + 1}' for i in range(len(values)))}) "
                f"ON CONFLICT (webhook_id) DO UPDATE SET {updates}", *values)

        await self._call("save_delivery", save)

    async def deliveries(self, run_id: str) -> list[DeliveryRecord]:
        async def deliveries(db: asyncpg.Connection) -> list[DeliveryRecord]:
            rows = await db.fetch(f"SELECT {', '.join(_DELIVERY_COLUMNS)} FROM "
                                  "agentloop_run_deliveries WHERE run_id = $1 ORDER BY created",
                                  run_id)
            return [_delivery(row) for row in rows]

        return await self._call("deliveries", deliveries)

    async def pending_deliveries(self, limit: int) -> list[DeliveryRecord]:
        async def pending(db: asyncpg.Connection) -> list[DeliveryRecord]:
            rows = await db.fetch(f"SELECT {', '.join(_DELIVERY_COLUMNS)} FROM "
                                  "agentloop_run_deliveries WHERE state = $1 ORDER BY created "
                                  "LIMIT $2", DeliveryState.PENDING.value, limit)
            return [_delivery(row) for row in rows]

        return await self._call("pending_deliveries", pending)

    async def put_tool_result(self, run_id: str, call_id: str, payload: bytes) -> None:
        async def put(db: asyncpg.Connection) -> None:
            await db.execute("INSERT INTO agentloop_run_tool_results (run_id, call_id, payload) "
                             "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                             run_id, call_id, payload)

        await self._call("put_tool_result", put)

    async def take_tool_results(self, run_ids: Sequence[str]
                                ) -> list[tuple[str, str, bytes]]:
        if not run_ids:
            return []

        async def take(db: asyncpg.Connection) -> list[tuple[str, str, bytes]]:
            rows = await db.fetch("DELETE FROM agentloop_run_tool_results WHERE "
                                  "run_id = ANY($1) RETURNING run_id, call_id, payload",
                                  list(run_ids))
            return [(r["run_id"], r["call_id"], bytes(r["payload"])) for r in rows]

        return await self._call("take_tool_results", take)

    async def sweep(self, now: float, ttls: Mapping[RunStatus, float]) -> int:
        async def sweep(db: asyncpg.Connection) -> int:
            deleted = 0
            for status, ttl in ttls.items():
                ids = [row["id"] for row in await db.fetch(
                    "SELECT id FROM agentloop_runs WHERE status = $1 AND "
                    "coalesce(finished, updated) < $2 LIMIT 1000", status.value, now - ttl)]
                if ids:
                    await db.execute("DELETE FROM agentloop_run_events WHERE run_id = ANY($1)",
                                     ids)
                    await db.execute("DELETE FROM agentloop_run_deliveries WHERE "
                                     "run_id = ANY($1)", ids)
                    await db.execute("DELETE FROM agentloop_run_tool_results WHERE "
                                     "run_id = ANY($1)", ids)
                    await db.execute("DELETE FROM agentloop_runs WHERE id = ANY($1)", ids)
                deleted += len(ids)
            return deleted

        return await self._call("sweep", sweep)
