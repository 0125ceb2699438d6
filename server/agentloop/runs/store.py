"""The run store: runs, their events and their webhook deliveries, on the premises.

`RunStore` is the small async interface the run manager (services/runs.py) uses; every
implementation provides it (`SqliteRunStore` here, in a file in WAL mode by default, so
`make run` needs nothing). What a run carries (its request, answer, steps, events'
payloads) is bytes to the store: the manager encodes them; ids, tenants, statuses and
times stay in columns of their own so that queries need nothing else.

SQLite runs on one thread of its own, never on the event loop: its calls block (fsync on
commit), and one connection on one thread needs no locking of ours. A full disk (or the
store's own size limit) is `RunStoreFull`, anything else that keeps the store from
answering is `RunStoreUnavailable`: new runs are refused with a reason, and a run already
accepted keeps its events in memory until a later write succeeds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import enum
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agentloop.errors import RunLimitReached, RunStoreFull, RunStoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


class RunStatus(enum.StrEnum):
    """Where a run is in its life; the last four are final."""

    QUEUED = "queued"
    RUNNING = "running"
    #: The run waits for the client's result of one of its tools (`RunRecord.waiting_call`).
    WAITING_FOR_TOOL = "waiting_for_tool"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: The run's deadline passed before it could run.
    EXPIRED = "expired"


ACTIVE = frozenset({RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING_FOR_TOOL})
FINAL = frozenset(RunStatus) - ACTIVE
_ACTIVE_VALUES = tuple(sorted(status.value for status in ACTIVE))


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run as stored. Times are wall-clock seconds (time.time())."""

    id: str
    tenant: str
    status: RunStatus
    created: float
    updated: float
    #: The run's request, encoded by the manager (sealed when encryption is on).
    request: bytes
    #: When the run must have ended (wall clock); None: no deadline.
    deadline: float | None = None
    finished: float | None = None
    #: The final answer and the steps, encoded by the manager (sealed when encryption is on).
    answer: bytes = b""
    steps: bytes = b""
    input_tokens: int = 0
    output_tokens: int = 0
    model: str = ""
    stop_reason: str = ""
    #: Why the run failed, was cancelled or expired ("" otherwise).
    error: str = ""
    #: The client tool call the run waits for (status WAITING_FOR_TOOL).
    waiting_call: str = ""
    cancel_requested: bool = False
    #: The replica running the run, and until when its lease holds.
    lease_owner: str = ""
    lease_expires: float | None = None
    #: The sequence number of the run's last stored event.
    last_seq: int = 0
    webhook_url: str = ""


#: The columns `RunStore.update` may change.
UPDATABLE = frozenset({
    "status", "updated", "finished", "answer", "steps", "input_tokens", "output_tokens", "model",
    "stop_reason", "error", "waiting_call", "lease_owner", "lease_expires", "deadline",
})


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One event of a run: its sequence number (from 1, no gaps), kind and payload."""

    run_id: str
    seq: int
    kind: str
    payload: bytes


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    #: Retries ran out (the time the settings allow).
    FAILED = "failed"
    #: The receiver answered 410 Gone: the URL takes no more deliveries for this run.
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One webhook message of a run and how its delivery went (the same id on every try)."""

    webhook_id: str
    run_id: str
    event_type: str
    url: str
    body: bytes
    created: float
    state: DeliveryState = DeliveryState.PENDING
    attempts: int = 0
    last_status: int = 0
    last_error: str = ""
    last_attempt: float | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """Where a listing goes on: after the run created at `created` with id `run_id`."""

    created: float
    run_id: str

    def token(self) -> str:
        return base64.urlsafe_b64encode(f"{self.created!r}|{self.run_id}".encode()).decode()

    @classmethod
    def from_token(cls, token: str) -> Page:
        """The page a token names; ValueError for a token this server did not write."""
        try:
            created, _, run_id = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
            page = cls(float(created), run_id)
        except (ValueError, UnicodeError) as exc:
            raise ValueError("not a page token of this server") from exc
        if not run_id:
            raise ValueError("not a page token of this server")
        return page


class RunStore(Protocol):
    """What the run manager needs of a store; SQLite and PostgreSQL both provide it."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, run: RunRecord, max_active_per_tenant: int) -> None:
        """Store a new run; RunLimitReached when its tenant has that many active already."""

    async def get(self, run_id: str, tenant: str | None = None) -> RunRecord | None:
        """The run, if it exists (and belongs to `tenant`, unless None)."""

    async def list(self, tenant: str, statuses: Iterable[RunStatus], limit: int,
                   after: Page | None = None) -> list[RunRecord]:
        """The tenant's runs, newest first (all statuses when `statuses` is empty)."""

    async def update(self, run_id: str, **changes: Any) -> None:
        """Change columns of UPDATABLE."""

    async def request_cancel(self, run_id: str) -> None: ...

    async def listen_cancels(self, on_cancel: Callable[[str], None]) -> bool:
        """Have `on_cancel(run id)` called at once for cancels requested through any
        replica; False when the store cannot (the manager then reads them with the leases)."""

    async def append_events(self, run_id: str, events: Sequence[EventRecord]) -> None:
        """Store events (one transaction) and move the run's last_seq to the last of them."""

    async def events(self, run_id: str, after_seq: int, limit: int) -> list[EventRecord]: ...

    async def claim(self, run_id: str, owner: str, until: float, now: float) -> bool:
        """Take the run's lease when it is free, expired or already ours."""

    async def renew(self, owner: str, run_ids: Sequence[str], until: float
                    ) -> dict[str, bool]:
        """Extend our leases; {run id: cancel requested} of the runs still ours."""

    async def orphans(self, now: float, limit: int) -> list[RunRecord]:
        """Active runs whose lease expired (or that never had one)."""

    async def count_active(self, tenant: str) -> int: ...

    async def save_delivery(self, delivery: DeliveryRecord) -> None:
        """Insert or replace a webhook delivery (by webhook_id)."""

    async def deliveries(self, run_id: str) -> list[DeliveryRecord]: ...

    async def pending_deliveries(self, limit: int) -> list[DeliveryRecord]: ...

    async def put_tool_result(self, run_id: str, call_id: str, payload: bytes) -> None:
        """Leave a client tool's result for the replica running the run (the first one
        left for a call stays)."""

    async def take_tool_results(self, run_ids: Sequence[str]
                                ) -> list[tuple[str, str, bytes]]:
        """The results left for these runs, (run id, call id, payload), removed as taken."""

    async def sweep(self, now: float, ttls: Mapping[RunStatus, float]) -> int:
        """Delete final runs older than their status's TTL, with their events and
        deliveries; the number of runs deleted."""


# --- SQLite ----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    request BLOB NOT NULL,
    deadline REAL,
    finished REAL,
    answer BLOB NOT NULL DEFAULT x'',
    steps BLOB NOT NULL DEFAULT x'',
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    model TEXT NOT NULL DEFAULT '',
    stop_reason TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    waiting_call TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT NOT NULL DEFAULT '',
    lease_expires REAL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    webhook_url TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS runs_by_tenant ON runs (tenant, created DESC, id DESC);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, updated);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    webhook_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    last_attempt REAL
);
CREATE INDEX IF NOT EXISTS deliveries_by_run ON deliveries (run_id);
CREATE TABLE IF NOT EXISTS tool_results (
    run_id TEXT NOT NULL,
    call_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (run_id, call_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_by_state ON deliveries (state);
"""

_RUN_COLUMNS = tuple(f.name for f in dataclasses.fields(RunRecord))
_DELIVERY_COLUMNS = tuple(f.name for f in dataclasses.fields(DeliveryRecord))
#: Page size of SQLite's database file (its default): max_bytes / this = max_page_count.
_PAGE_BYTES = 4096
#: New runs are refused past this share of max_bytes, or with less free disk than
#: DISK_RESERVE: the rest is kept for the runs accepted already (their events and ends).
FILL_LIMIT = 0.75
DISK_RESERVE = 64 * 1024 * 1024


def _run(row: Sequence[Any]) -> RunRecord:
    values = dict(zip(_RUN_COLUMNS, row, strict=True))
    values["status"] = RunStatus(values["status"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    values["request"], values["answer"], values["steps"] = (
        bytes(values["request"]), bytes(values["answer"]), bytes(values["steps"]))
    return RunRecord(**values)


def _delivery(row: Sequence[Any]) -> DeliveryRecord:
    values = dict(zip(_DELIVERY_COLUMNS, row, strict=True))
    values["state"] = DeliveryState(values["state"])
    values["body"] = bytes(values["body"])
    return DeliveryRecord(**values)


def _store_error(exc: sqlite3.Error) -> Exception:
    """SQLite's error as the store's: full (RESOURCE_EXHAUSTED) or unavailable."""
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and ("full" in text or "disk i/o" in text):
        return RunStoreFull("the run store is full: no new runs until room is made",
                            retry_after=30.0)
    return RunStoreUnavailable(f"the run store is unavailable ({type(exc).__name__})",
                               retry_after=5.0)


class SqliteRunStore:
    """The run store in one SQLite file (WAL), on a thread of its own.

    `max_bytes` (0 = no limit) caps the file: past it a write fails as a full disk would.
    """

    def __init__(self, path: str | Path, *, max_bytes: int = 0) -> None:
        self.path = path if path == ":memory:" else str(Path(path).expanduser())
        self._max_bytes = max_bytes
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentloop-runstore")
        self._db: sqlite3.Connection | None = None
        #: Seconds each store call took, for the store latency metric (set by the manager).
        self.observe: Callable[[str, float], None] = lambda operation, seconds: None

    async def _call(self, operation: str, work: Callable[[sqlite3.Connection], T]) -> T:
        started = time.perf_counter()

        def call() -> T:
            if self._db is None:
                raise RunStoreUnavailable("the run store is not open", retry_after=5.0)
            try:
                with self._db:  # one transaction: committed, or rolled back on error
                    return work(self._db)
            except sqlite3.Error as exc:
                raise _store_error(exc) from None

        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, call)
        except RuntimeError:  # the thread was shut down: the store is closed
            raise RunStoreUnavailable("the run store is closed", retry_after=5.0) from None
        finally:
            self.observe(operation, time.perf_counter() - started)

    async def open(self) -> None:
        def connect() -> None:
            try:
                if self.path != ":memory:":
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                     timeout=5.0)
                db.execute("PRAGMA journal_mode=WAL")
                # WAL with synchronous=NORMAL: a commit survives a crash of the process; a
                # power cut may lose the last commits, never the file.
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA foreign_keys=OFF")
                if self._max_bytes:
                    db.execute(f"PRAGMA max_page_count={max(16, self._max_bytes // _PAGE_BYTES)}")
                db.executescript(_SCHEMA)
                db.isolation_level = "DEFERRED"  # `with db:` makes each call one transaction
            except sqlite3.Error as exc:
                raise _store_error(exc) from None
            except OSError as exc:
                raise RunStoreUnavailable(f"the run store cannot be opened ({exc.strerror})",
                                          retry_after=5.0) from None
            self._db = db

        await asyncio.get_running_loop().run_in_executor(self._thread, connect)

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        with contextlib.suppress(RuntimeError):  # closed already: the thread is gone
            await asyncio.get_running_loop().run_in_executor(self._thread, close)
        self._thread.shutdown(wait=False)

    async def create(self, run: RunRecord, max_active_per_tenant: int) -> None:
        values = [v.value if isinstance(v, enum.Enum) else v for v in dataclasses.astuple(run)]

        def create(db: sqlite3.Connection) -> None:
            self._check_room(db)
            db.execute("BEGIN IMMEDIATE")  # the count and the insert as one: no two slip in
            (active,), = db.execute(
                "SELECT count(*) FROM runs WHERE tenant = ? AND status IN (?, ?, ?)",
                (run.tenant, *_ACTIVE_VALUES)).fetchall()
            if active >= max_active_per_tenant:
                raise RunLimitReached(
                    f"the tenant has {active} runs queued or running; the limit is "
                    f"{max_active_per_tenant} (run_max_active_per_tenant)", retry_after=5.0)
            db.execute(f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) VALUES "
                       f"({', '.join('?' * len(_RUN_COLUMNS))})", values)

        await self._call("create", create)

    def _check_room(self, db: sqlite3.Connection) -> None:
        """RunStoreFull when a new run would eat into the room kept for accepted ones."""
        if self._max_bytes:
            (pages,), = db.execute("PRAGMA page_count").fetchall()
            if pages * _PAGE_BYTES > FILL_LIMIT * self._max_bytes:
                raise RunStoreFull(
                    f"the run store holds {pages * _PAGE_BYTES} bytes of its "
                    f"{self._max_bytes} (run_store_max_bytes): no new runs until the sweep "
                    "makes room", retry_after=30.0)
        if self.path != ":memory:":
            free = shutil.disk_usage(Path(self.path).parent).free
            if free < DISK_RESERVE:
                raise RunStoreFull(f"the run store's disk has {free} bytes free: no new runs "
                                   "until room is made", retry_after=30.0)

    async def get(self, run_id: str, tenant: str | None = None) -> RunRecord | None:
        def get(db: sqlite3.Connection) -> RunRecord | None:
            row = db.execute(f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE id = ?",
                             (run_id,)).fetchone()
            return None if row is None else _run(row)

        run = await self._call("get", get)
        return None if run is None or (tenant is not None and run.tenant != tenant) else run

    async def list(self, tenant: str, statuses: Iterable[RunStatus], limit: int,
                   after: Page | None = None) -> list[RunRecord]:
        wanted = sorted(set(statuses))
        where, args = ["tenant = ?"], [tenant]
        if wanted:
            where.append(f"status IN ({', '.join('?' * len(wanted))})")
            args += [status.value for status in wanted]
        if after is not None:
            where.append("(created < ? OR (created = ? AND id < ?))")
            args += [after.created, after.created, after.run_id]

        def list_runs(db: sqlite3.Connection) -> list[RunRecord]:
            rows = db.execute(
                f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE {' AND '.join(where)} "
                "ORDER BY created DESC, id DESC LIMIT ?", (*args, limit)).fetchall()
            return [_run(row) for row in rows]

        return await self._call("list", list_runs)

    async def update(self, run_id: str, **changes: Any) -> None:
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        values = [v.value if isinstance(v, enum.Enum) else v for v in changes.values()]

        def update(db: sqlite3.Connection) -> None:
            db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in changes)} WHERE id = ?",
                       (*values, run_id))

        await self._call("update", update)

    async def request_cancel(self, run_id: str) -> None:
        def cancel(db: sqlite3.Connection) -> None:
            db.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ?", (run_id,))

        await self._call("cancel", cancel)

    async def listen_cancels(self, on_cancel: Callable[[str], None]) -> bool:
        return False  # no notifications in SQLite: cancels are read with the leases

    async def append_events(self, run_id: str, events: Sequence[EventRecord]) -> None:
        if not events:
            return
        rows = [(e.run_id, e.seq, e.kind, e.payload) for e in events]
        last = max(e.seq for e in events)

        def append(db: sqlite3.Connection) -> None:
            # OR IGNORE: a batch written again after a failed commit keeps its first copy.
            db.executemany("INSERT OR IGNORE INTO events (run_id, seq, kind, payload) "
                           "VALUES (?, ?, ?, ?)", rows)
            db.execute("UPDATE runs SET last_seq = max(last_seq, ?) WHERE id = ?",
                       (last, run_id))

        await self._call("append_events", append)

    async def events(self, run_id: str, after_seq: int, limit: int) -> list[EventRecord]:
        def events(db: sqlite3.Connection) -> list[EventRecord]:
            rows = db.execute("SELECT run_id, seq, kind, payload FROM events WHERE run_id = ? "
                              "AND seq > ? ORDER BY seq LIMIT ?",
                              (run_id, after_seq, limit)).fetchall()
            return [EventRecord(r[0], r[1], r[2], bytes(r[3])) for r in rows]

        return await self._call("events", events)

    async def claim(self, run_id: str, owner: str, until: float, now: float) -> bool:
        def claim(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE runs SET lease_owner = ?, lease_expires = ? WHERE id = ? AND "
                "(lease_owner = '' OR lease_owner = ? OR lease_expires IS NULL OR "
                "lease_expires < ?)", (owner, until, run_id, owner, now))
            return cursor.rowcount == 1

        return await self._call("claim", claim)

    async def renew(self, owner: str, run_ids: Sequence[str], until: float) -> dict[str, bool]:
        if not run_ids:
            return {}
        marks = ", ".join("?" * len(run_ids))

        def renew(db: sqlite3.Connection) -> dict[str, bool]:
            db.execute(f"UPDATE runs SET lease_expires = ? WHERE lease_owner = ? AND id IN "
                       f"({marks})", (until, owner, *run_ids))
            rows = db.execute(f"SELECT id, cancel_requested FROM runs WHERE lease_owner = ? "
                              f"AND id IN ({marks})", (owner, *run_ids)).fetchall()
            return {run_id: bool(flag) for run_id, flag in rows}

        return await self._call("renew", renew)

    async def orphans(self, now: float, limit: int) -> list[RunRecord]:
        def orphans(db: sqlite3.Connection) -> list[RunRecord]:
            rows = db.execute(
                f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE status IN (?, ?, ?) AND "
                "(lease_expires IS NULL OR lease_expires < ?) ORDER BY created LIMIT ?",
                (*_ACTIVE_VALUES, now, limit)).fetchall()
            return [_run(row) for row in rows]

        return await self._call("orphans", orphans)

    async def count_active(self, tenant: str) -> int:
        def count(db: sqlite3.Connection) -> int:
            (n,), = db.execute("SELECT count(*) FROM runs WHERE tenant = ? AND status IN "
                               "(?, ?, ?)", (tenant, *_ACTIVE_VALUES)).fetchall()
            return int(n)

        return await self._call("count_active", count)

    async def save_delivery(self, delivery: DeliveryRecord) -> None:
        values = [v.value if isinstance(v, enum.Enum) else v
                  for v in dataclasses.astuple(delivery)]

        def save(db: sqlite3.Connection) -> None:
            db.execute(f"INSERT OR REPLACE INTO deliveries ({', '.join(_DELIVERY_COLUMNS)}) "
                       f"VALUES ({', '.join('?' * len(_DELIVERY_COLUMNS))})", values)

        await self._call("save_delivery", save)

    async def deliveries(self, run_id: str) -> list[DeliveryRecord]:
        def deliveries(db: sqlite3.Connection) -> list[DeliveryRecord]:
            rows = db.execute(f"SELECT {', '.join(_DELIVERY_COLUMNS)} FROM deliveries WHERE "
                              "run_id = ? ORDER BY created", (run_id,)).fetchall()
            return [_delivery(row) for row in rows]

        return await self._call("deliveries", deliveries)

    async def pending_deliveries(self, limit: int) -> list[DeliveryRecord]:
        def pending(db: sqlite3.Connection) -> list[DeliveryRecord]:
            rows = db.execute(f"SELECT {', '.join(_DELIVERY_COLUMNS)} FROM deliveries WHERE "
                              "state = ? ORDER BY created LIMIT ?",
                              (DeliveryState.PENDING.value, limit)).fetchall()
            return [_delivery(row) for row in rows]

        return await self._call("pending_deliveries", pending)

    async def put_tool_result(self, run_id: str, call_id: str, payload: bytes) -> None:
        def put(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO tool_results (run_id, call_id, payload) "
                       "VALUES (?, ?, ?)", (run_id, call_id, payload))

        await self._call("put_tool_result", put)

    async def take_tool_results(self, run_ids: Sequence[str]
                                ) -> list[tuple[str, str, bytes]]:
        if not run_ids:
            return []
        marks = ", ".join("?" * len(run_ids))

        def take(db: sqlite3.Connection) -> list[tuple[str, str, bytes]]:
            rows = db.execute(f"SELECT run_id, call_id, payload FROM tool_results WHERE "
                              f"run_id IN ({marks})", tuple(run_ids)).fetchall()
            db.execute(f"DELETE FROM tool_results WHERE run_id IN ({marks})", tuple(run_ids))
            return [(r[0], r[1], bytes(r[2])) for r in rows]

        return await self._call("take_tool_results", take)

    async def sweep(self, now: float, ttls: Mapping[RunStatus, float]) -> int:
        def sweep(db: sqlite3.Connection) -> int:
            deleted = 0
            for status, ttl in ttls.items():
                ids = [row[0] for row in db.execute(
                    "SELECT id FROM runs WHERE status = ? AND coalesce(finished, updated) < ? "
                    "LIMIT 1000", (status.value, now - ttl))]
                for run_id in ids:
                    db.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
                    db.execute("DELETE FROM deliveries WHERE run_id = ?", (run_id,))
                    db.execute("DELETE FROM tool_results WHERE run_id = ?", (run_id,))
                    db.execute("DELETE FROM runs WHERE id = ?", (run_id,))
                deleted += len(ids)
            return deleted

        return await self._call("sweep", sweep)


async def sweep_forever(store: RunStore, ttls: Mapping[RunStatus, float], interval: float,
                        on_sweep: Callable[[int], None] | None = None) -> None:
    """Delete expired runs every `interval` seconds (a failed sweep is tried again later)."""
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(RunStoreUnavailable, RunStoreFull):
            deleted = await store.sweep(time.time(), ttls)
            if deleted:
                log.info("run store: deleted %d expired runs", deleted)
            if on_sweep is not None:
                on_sweep(deleted)
