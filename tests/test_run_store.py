"""The run store on a real SQLite file and on a real PostgreSQL, behind one interface: the
tenant check, pages newest first, events in batches with sequence numbers, leases, the
retention sweep; SQLite's WAL file, its thread, and a full store refusing with
RUN_STORE_FULL."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator

import pytest
from postgres_server import fresh_database

from agentloop.errors import RunLimitReached, RunStoreFull, RunStoreUnavailable
from agentloop.runs.postgres import PostgresRunStore
from agentloop.runs.store import (
    DeliveryRecord,
    DeliveryState,
    EventRecord,
    Page,
    RunRecord,
    RunStatus,
    RunStore,
    SqliteRunStore,
)


def record(run_id: str, tenant: str = "acme", created: float = 1000.0,
           status: RunStatus = RunStatus.QUEUED) -> RunRecord:
    return RunRecord(id=run_id, tenant=tenant, status=status, created=created, updated=created,
                     request=b'{"goal": "x"}')


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request, tmp_path) -> AsyncIterator[RunStore]:
    """Each store the server has, behind the one interface (SQLite, a real PostgreSQL)."""
    if request.param == "sqlite":
        store: RunStore = SqliteRunStore(tmp_path / "runs.db")
    else:
        server = request.getfixturevalue("pg_server")
        store = PostgresRunStore(await fresh_database(server))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def sqlite_store(tmp_path) -> AsyncIterator[SqliteRunStore]:
    store = SqliteRunStore(tmp_path / "runs.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_the_file_is_in_wal_mode_and_survives_reopening(tmp_path, sqlite_store):
    store = sqlite_store
    await store.create(record("run_a"), max_active_per_tenant=10)
    with sqlite3.connect(tmp_path / "runs.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = SqliteRunStore(tmp_path / "runs.db")
    await again.open()
    try:
        found = await again.get("run_a")
        assert found is not None and found.request == b'{"goal": "x"}'
    finally:
        await again.close()


async def test_calls_run_off_the_event_loop_thread(sqlite_store):
    store = sqlite_store
    seen: list[str] = []
    store.observe = lambda operation, seconds: seen.append(threading.current_thread().name)
    await store.get("nothing")
    # The observer runs on the loop; the call itself ran on the store's thread.
    assert seen == [threading.current_thread().name]
    assert store._thread._threads  # the store's own thread exists and served the call
    assert all(t.name.startswith("agentloop-runstore") for t in store._thread._threads)


async def test_another_tenant_does_not_find_the_run(store):
    await store.create(record("run_a", tenant="acme"), max_active_per_tenant=10)
    assert (await store.get("run_a", "acme")) is not None
    assert await store.get("run_a", "globex") is None


async def test_active_runs_per_tenant_are_capped(store):
    for index in range(3):
        await store.create(record(f"run_{index}"), max_active_per_tenant=3)
    with pytest.raises(RunLimitReached) as raised:
        await store.create(record("run_3"), max_active_per_tenant=3)
    assert "3" in raised.value.message and raised.value.reason == "RUN_LIMIT"
    # Another tenant has room; a finished run frees its place.
    await store.create(record("run_other", tenant="globex"), max_active_per_tenant=3)
    await store.update("run_0", status=RunStatus.COMPLETED)
    await store.create(record("run_3"), max_active_per_tenant=3)


async def test_listing_is_newest_first_paged_and_filtered(store):
    for index in range(5):
        await store.create(record(f"run_{index}", created=1000.0 + index),
                           max_active_per_tenant=100)
    await store.create(record("run_x", tenant="globex", created=2000.0),
                       max_active_per_tenant=100)
    await store.update("run_3", status=RunStatus.FAILED)
    first = await store.list("acme", (), limit=2)
    assert [r.id for r in first] == ["run_4", "run_3"]
    token = Page(first[-1].created, first[-1].id).token()
    rest = await store.list("acme", (), limit=10, after=Page.from_token(token))
    assert [r.id for r in rest] == ["run_2", "run_1", "run_0"]
    failed = await store.list("acme", [RunStatus.FAILED], limit=10)
    assert [r.id for r in failed] == ["run_3"]
    with pytest.raises(ValueError):
        Page.from_token("not-a-token")


async def test_events_are_read_after_a_sequence_number(store):
    await store.create(record("run_a"), max_active_per_tenant=10)
    await store.append_events("run_a", [EventRecord("run_a", seq, "step", b"%d" % seq)
                                        for seq in range(1, 6)])
    after = await store.events("run_a", 2, limit=100)
    assert [e.seq for e in after] == [3, 4, 5]
    assert (await store.get("run_a")).last_seq == 5
    # A batch written again (a retried commit) keeps one copy of each event.
    await store.append_events("run_a", [EventRecord("run_a", 5, "step", b"again")])
    assert [e.payload for e in await store.events("run_a", 4, 10)] == [b"5"]


async def test_a_lease_is_taken_only_when_free_or_lapsed(store):
    await store.create(record("run_a"), max_active_per_tenant=10)
    assert await store.claim("run_a", "replica-a", until=110.0, now=100.0)
    assert not await store.claim("run_a", "replica-b", until=120.0, now=105.0)
    assert await store.renew("replica-a", ["run_a"], until=130.0) == {"run_a": False}
    await store.request_cancel("run_a")
    assert await store.renew("replica-a", ["run_a"], until=130.0) == {"run_a": True}
    assert [r.id for r in await store.orphans(now=140.0, limit=10)] == ["run_a"]
    assert await store.claim("run_a", "replica-b", until=150.0, now=140.0)
    assert await store.renew("replica-a", ["run_a"], until=160.0) == {}


async def test_the_sweep_deletes_final_runs_past_their_ttl_with_their_events(store):
    await store.create(record("old", created=100.0), max_active_per_tenant=10)
    await store.create(record("young", created=100.0), max_active_per_tenant=10)
    await store.create(record("running", created=100.0), max_active_per_tenant=10)
    await store.update("old", status=RunStatus.COMPLETED, finished=200.0)
    await store.update("young", status=RunStatus.COMPLETED, finished=900.0)
    await store.update("running", status=RunStatus.RUNNING)
    await store.append_events("old", [EventRecord("old", 1, "step", b"")])
    await store.save_delivery(DeliveryRecord("msg_1", "old", "run.completed", "http://x/",
                                             b"{}", created=200.0))
    deleted = await store.sweep(now=1000.0, ttls={RunStatus.COMPLETED: 500.0})
    assert deleted == 1
    assert await store.get("old") is None and await store.events("old", 0, 10) == []
    assert await store.deliveries("old") == []
    assert await store.get("young") is not None and await store.get("running") is not None


async def test_deliveries_are_kept_by_webhook_id(store):
    await store.create(record("run_a"), max_active_per_tenant=10)
    first = DeliveryRecord("msg_1", "run_a", "run.completed", "http://x/", b"{}", created=1.0)
    await store.save_delivery(first)
    assert [d.webhook_id for d in await store.pending_deliveries(10)] == ["msg_1"]
    await store.save_delivery(DeliveryRecord(
        "msg_1", "run_a", "run.completed", "http://x/", b"{}", created=1.0,
        state=DeliveryState.DELIVERED, attempts=3, last_status=200))
    (delivery,) = await store.deliveries("run_a")
    assert (delivery.state, delivery.attempts, delivery.last_status) == (
        DeliveryState.DELIVERED, 3, 200)
    assert await store.pending_deliveries(10) == []


async def test_a_full_store_refuses_new_runs_with_a_reason(tmp_path):
    store = SqliteRunStore(tmp_path / "small.db", max_bytes=64 * 1024)
    await store.open()
    try:
        with pytest.raises(RunStoreFull) as raised:
            for index in range(1000):
                await store.create(RunRecord(
                    id=f"run_{index}", tenant="acme", status=RunStatus.COMPLETED,
                    created=1.0, updated=1.0, request=b"x" * 4096), max_active_per_tenant=10)
        assert raised.value.reason == "RUN_STORE_FULL"
        # What was stored before stays readable.
        assert await store.get("run_0") is not None
    finally:
        await store.close()


async def test_a_store_that_cannot_open_is_unavailable(tmp_path):
    (tmp_path / "a-file").write_text("")
    store = SqliteRunStore(tmp_path / "a-file" / "runs.db")  # its directory is a file
    with pytest.raises(RunStoreUnavailable):
        await store.open()
    with pytest.raises(RunStoreUnavailable):
        await store.get("run_a")
    await store.close()


async def test_tool_results_are_left_once_and_taken_once(store):
    await store.create(record("run_a"), max_active_per_tenant=10)
    await store.put_tool_result("run_a", "call_1", b"first")
    await store.put_tool_result("run_a", "call_1", b"second")  # the first one stays
    assert await store.take_tool_results(["run_a", "run_b"]) == [("run_a", "call_1", b"first")]
    assert await store.take_tool_results(["run_a"]) == []


async def test_a_cancel_is_announced_to_every_listener_on_postgresql(pg_server, sqlite_store):
    """A cancel requested through one store is heard on another's listening connection
    when it commits; SQLite announces nothing (its replicas read the flag with the lease)."""
    url = await fresh_database(pg_server)
    requester, running = PostgresRunStore(url), PostgresRunStore(url)
    await requester.open()
    await running.open()
    heard: asyncio.Queue[str] = asyncio.Queue()
    try:
        assert await running.listen_cancels(heard.put_nowait)
        await requester.create(record("run_1"), max_active_per_tenant=10)
        await requester.request_cancel("run_1")
        assert await asyncio.wait_for(heard.get(), 10) == "run_1"
        assert (await running.get("run_1")).cancel_requested
    finally:
        await requester.close()
        await running.close()
    assert not await sqlite_store.listen_cancels(heard.put_nowait)
