"""Background agent runs: the agent loop driven by a task this manager owns, recorded.

A run is a record, not a call: `RunManager.start` stores it (RUN_LIMIT, RUN_STORE_FULL or
RUN_STORE_UNAVAILABLE refuse it with a reason) and returns its id at once; a task of the
manager runs the same agent loop as RunAgent (`AgentService.run`, with the run's
CallContext, so the tenant's limits apply to its model calls like any other) and records
each event with a sequence number. `watch` replays the events after a sequence number and
then follows the live ones, so any number of watchers see the same events in the same
order; `cancel` cancels the task (the engine call closes at once); client tools wait for
`submit_tool_result` until the run's deadline.

Events are written in batches: answer deltas are joined while they wait (at most
run_event_flush_interval), and a batch is committed when that interval has passed or an
event must be durable before the run goes on (a tool call before the tool runs, a tool's
result, the end). A live run keeps its recent events in memory (all those not yet
written among them), so a watcher on this replica never waits for the store.

A replica holds a lease on each run it runs, renewed every third of run_lease; a run
whose lease lapsed (its replica stopped) is an orphan: a queued one is run here, a started
one goes on after its last recorded step. A cancel made through another replica is heard
at once where the store announces it (PostgreSQL's NOTIFY), else read with the lease.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from agentloop.config import Settings, SettingsError
from agentloop.domain import (
    AgentStep,
    CallContext,
    ChatMessage,
    Priority,
    Role,
    SamplingOptions,
    StopReason,
    Usage,
)
from agentloop.errors import (
    AgentLoopError,
    FailedPrecondition,
    InvalidArgument,
    RunLimitReached,
    RunNotFound,
    RunStoreFull,
    RunStoreUnavailable,
    ShuttingDown,
)
from agentloop.runs.sealing import SealedStore, Sealer, load_keys
from agentloop.runs.store import (
    ACTIVE,
    FINAL,
    DeliveryRecord,
    EventRecord,
    Page,
    RunRecord,
    RunStatus,
    RunStore,
    SqliteRunStore,
    sweep_forever,
)
from agentloop.services.agent import (
    AgentEvent,
    AgentRun,
    AgentService,
    AnswerDelta,
    AnswerWithdrawn,
    ClientToolCalls,
    ClientToolResult,
    Resume,
    RunFinished,
    StepStarted,
    ThoughtFormed,
    ToolCalled,
    ToolReturned,
    WrongCallId,
)
from agentloop.services.quotas import BYTES_PER_TOKEN
from agentloop.services.tools import ClientTool, is_idempotent
from agentloop.services.webhooks import WebhookSender, delivery_for

log = logging.getLogger(__name__)

#: Events kept in memory per live run besides those not yet written (watchers close behind).
RECENT_EVENTS = 256
#: Events one read of the store returns to a watcher.
WATCH_BATCH = 500
#: Page sizes of ListAgentRuns.
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 200
#: Seconds between attempts to write what a run could not write (store down or full).
STORE_RETRY = 1.0
#: Seconds a CancelAgentRun waits for a local run to stop before it answers.
CANCEL_WAIT = 5.0
#: Stop reasons that complete a run; the others fail it.
_COMPLETING = frozenset({StopReason.FINAL_ANSWER, StopReason.MAX_STEPS})


# --- events as stored -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What a run's `finished` event says (the outcome without its steps)."""

    final_answer: str
    stop_reason: StopReason
    usage: Usage
    steps: int
    duration: float
    model: str


@dataclass(frozen=True, slots=True)
class RunEnded:
    """The last event of every run."""

    status: RunStatus
    error: str = ""


RunEventBody = AgentEvent | RunSummary | RunEnded

_KINDS: dict[type, str] = {
    StepStarted: "step_started", AnswerDelta: "answer_delta", AnswerWithdrawn: "answer_withdrawn",
    ThoughtFormed: "thought", ToolCalled: "tool_call", ToolReturned: "tool_result",
    RunSummary: "finished", RunEnded: "run_ended",
}
_TYPES = {kind: kind_type for kind_type, kind in _KINDS.items()}


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One event of a run with its sequence number."""

    seq: int
    body: RunEventBody


def encode_event(body: RunEventBody, limit: int) -> tuple[str, bytes]:
    """(kind, payload JSON) of an event, its longest texts cut until it fits in `limit`."""
    data = {f.name: getattr(body, f.name) for f in dataclasses.fields(body)}  # type: ignore[arg-type]
    if isinstance(body, RunSummary | ThoughtFormed):
        data["usage"] = dataclasses.asdict(body.usage)
    if isinstance(body, RunSummary):
        data["stop_reason"] = body.stop_reason.name
    elif isinstance(body, RunEnded):
        data["status"] = body.status.value
    payload = json.dumps(data, ensure_ascii=False).encode()
    while len(payload) > limit:
        name = max((k for k, v in data.items() if isinstance(v, str)),
                   key=lambda k: len(data[k]), default=None)
        if name is None or not data[name]:
            break
        excess = len(payload) - limit + 64
        text = data[name].encode()
        data[name] = text[:max(0, len(text) - excess)].decode(errors="ignore") + " [cut]"
        payload = json.dumps(data, ensure_ascii=False).encode()
    return _KINDS[type(body)], payload


def decode_event(record: EventRecord) -> RunEvent:
    data = json.loads(record.payload)
    kind_type = _TYPES[record.kind]
    if "usage" in data:  # (a thought recorded before steps had their usage has none)
        data["usage"] = Usage(**data["usage"])
    if kind_type is RunSummary:
        data["stop_reason"] = StopReason[data["stop_reason"]]
    elif kind_type is RunEnded:
        data["status"] = RunStatus(data["status"])
    return RunEvent(record.seq, kind_type(**data))


# --- runs' requests and results as stored ---------------------------------------------------


def encode_request(run: AgentRun, *, webhook_each_step: bool = False) -> bytes:
    """A run's request as stored: everything needed to run it again on any replica."""
    context = run.context
    return json.dumps({
        "webhook_each_step": webhook_each_step,
        "goal": run.goal, "model": run.model, "max_steps": run.max_steps,
        "tools": list(run.tools), "system": run.system,
        "options": {**dataclasses.asdict(run.options), "stop": list(run.options.stop)},
        "messages": [{"role": m.role.value, "content": m.content,
                      "images": [base64.b64encode(i).decode() for i in m.images]}
                     for m in run.messages],
        "client_tools": [{"name": t.name, "description": t.description,
                          "parameters": dict(t.parameters)} for t in run.client_tools],
        "context": {"tenant": context.tenant, "session": context.session,
                    "local_only": context.local_only, "priority": int(context.priority),
                    "cache_scope": context.cache_scope, "caller": context.caller},
    }, ensure_ascii=False).encode()


def decode_request(data: bytes) -> AgentRun:
    value = json.loads(data)
    options = value["options"]
    return AgentRun(
        goal=value["goal"], model=value["model"], max_steps=value["max_steps"],
        tools=tuple(value["tools"]), system=value["system"],
        options=SamplingOptions(**{**options, "stop": tuple(options["stop"])}),
        messages=tuple(ChatMessage(Role(m["role"]), m["content"],
                                   tuple(base64.b64decode(i) for i in m["images"]))
                       for m in value["messages"]),
        client_tools=tuple(ClientTool(t["name"], t["description"], t["parameters"])
                           for t in value["client_tools"]),
        context=CallContext(**{**value["context"],
                               "priority": Priority(value["context"]["priority"])}),
    )


def _encode_steps(steps: Iterable[AgentStep]) -> bytes:
    return json.dumps([dataclasses.asdict(step) for step in steps], ensure_ascii=False).encode()


def _decode_steps(data: bytes) -> tuple[AgentStep, ...]:
    return tuple(AgentStep(**step) for step in json.loads(data)) if data else ()


@dataclass(frozen=True, slots=True)
class RunView:
    """A run as a caller sees it: the record with its answer, steps and deliveries read."""

    record: RunRecord
    final_answer: str = ""
    steps: tuple[AgentStep, ...] = ()
    #: The client tool call the run waits for (status WAITING_FOR_TOOL).
    waiting_call: ToolCalled | None = None
    deliveries: tuple[DeliveryRecord, ...] = ()

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def status(self) -> RunStatus:
        return self.record.status

    @property
    def stop_reason(self) -> StopReason | None:
        return StopReason[self.record.stop_reason] if self.record.stop_reason else None

    @property
    def usage(self) -> Usage:
        return Usage(self.record.input_tokens, self.record.output_tokens)


# --- one run on this replica ---------------------------------------------------------------


class _LocalRun:
    """A run this replica drives: its task, its recent events and who waits for more."""

    def __init__(self, record: RunRecord, settings: Settings) -> None:
        self.id = record.id
        self.tenant = record.tenant
        self.webhook_url = record.webhook_url
        self.webhook_each_step = bool(record.webhook_url) and json.loads(record.request).get(
            "webhook_each_step", False)
        self.next_seq = record.last_seq + 1
        self.written_seq = record.last_seq
        self.events: list[RunEvent] = []
        self.calls = ClientToolCalls()
        self.task: asyncio.Task[None] | None = None
        self.cancel_requested = False
        #: Another replica took the run over (this one's lease lapsed): it records the end.
        self.lost = False
        self.waiting: ToolCalled | None = None
        #: The last client tool call whose result never came, and the calls answered.
        self.unanswered: ToolCalled | None = None
        self.answered: set[str] = set()
        self.ended = False
        self._changed = asyncio.Event()
        self._pending_delta: AnswerDelta | None = None
        self._delta_since = 0.0
        self._last_write = time.monotonic()
        self._flush_interval = settings.run_event_flush_interval
        self._max_event_bytes = settings.run_max_event_bytes
        # Room for the events the steps need (about six each) and the end; deltas get the rest.
        self._delta_room = settings.run_max_events - 8 * settings.agent_max_steps - 4

    def changed(self) -> asyncio.Event:
        """An event set when the next change comes (take it before reading the events)."""
        return self._changed

    def notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _append(self, body: RunEventBody) -> None:
        self.events.append(RunEvent(self.next_seq, body))
        self.next_seq += 1

    def add(self, body: RunEventBody, announce: bool = True) -> bool:
        """Take an event of the loop; True when the run must write before it goes on.
        `announce=False` keeps it from watchers until `notify` (the end: after the record
        says so, so a watcher that sees the end reads the run's answer)."""
        now = time.monotonic()
        if isinstance(body, AnswerDelta):
            if self.next_seq > self._delta_room:
                return False  # past the room: the finished event carries the whole answer
            if self._pending_delta is not None and self._pending_delta.step == body.step:
                self._pending_delta = AnswerDelta(body.step, self._pending_delta.text + body.text)
            else:
                self._release_delta()
                self._pending_delta, self._delta_since = body, now
            if now - self._delta_since >= self._flush_interval:
                self._release_delta()
                self.notify()
            return False
        self._release_delta()
        self._append(body)
        if announce:
            self.notify()
        durable = isinstance(body, ToolCalled | ToolReturned | RunSummary | RunEnded)
        return durable or now - self._last_write >= self._flush_interval

    def _release_delta(self) -> None:
        if self._pending_delta is not None:
            self._append(self._pending_delta)
            self._pending_delta = None

    def unwritten(self) -> list[EventRecord]:
        start = bisect.bisect_right(self.events, self.written_seq, key=lambda e: e.seq)
        return [EventRecord(self.id, event.seq, *encode_event(event.body, self._max_event_bytes))
                for event in self.events[start:]]

    def written(self, seq: int) -> None:
        """Events up to `seq` are in the store: keep only the recent ones of them."""
        self.written_seq = max(self.written_seq, seq)
        self._last_write = time.monotonic()
        start = bisect.bisect_right(self.events, self.written_seq, key=lambda e: e.seq)
        drop = max(0, start - RECENT_EVENTS)
        if drop:
            del self.events[:drop]

    def after(self, seq: int) -> list[RunEvent] | None:
        """The events after `seq` from memory, or None when memory no longer has them all.
        (The run's end is among them before it is recorded: `watch` holds it back until
        `ended`.)"""
        if self.events and seq + 1 < self.events[0].seq:
            return None
        if not self.events and seq < self.written_seq:
            return None
        start = bisect.bisect_right(self.events, seq, key=lambda e: e.seq)
        return self.events[start:]


@dataclass(frozen=True, slots=True)
class Progress:
    """What a run's recorded events say it did: its finished steps and the step after."""

    steps: tuple[AgentStep, ...]
    step_started: bool = False
    thought: str = ""
    #: The unfinished step's tool call (recorded, its result not).
    call: ToolCalled | None = None
    answer_chars: int = 0
    #: How the run ended, if its end was recorded.
    ended: RunEnded | None = None
    #: The tokens of the model calls whose steps were recorded (on any replica).
    usage: Usage = dataclasses.field(default_factory=Usage)


def replay_events(events: Iterable[RunEvent]) -> Progress:
    """A run's progress from its events, in order."""
    steps: list[AgentStep] = []
    step: StepStarted | None = None
    thought, call, chars = "", None, 0
    ended: RunEnded | None = None
    usage = Usage()
    for event in events:
        body = event.body
        if isinstance(body, RunSummary):
            ended = RunEnded(RunStatus.COMPLETED if body.stop_reason in _COMPLETING
                             else RunStatus.FAILED)
        elif isinstance(body, RunEnded):
            ended = body
        elif isinstance(body, StepStarted):
            step, thought, call, chars = body, "", None, 0
        elif isinstance(body, AnswerDelta):
            chars += len(body.text)
        elif isinstance(body, AnswerWithdrawn):
            chars = 0
        elif isinstance(body, ThoughtFormed):
            thought = body.thought
            usage += body.usage
        elif isinstance(body, ToolCalled):
            call = body
        elif isinstance(body, ToolReturned) and step is not None and call is not None:
            steps.append(AgentStep(
                step.step, body.duration, thought=thought, tool=body.tool,
                arguments_json=call.arguments_json, observation=body.observation,
                observation_truncated=body.observation_truncated,
                error=body.observation if body.is_error else ""))
            step, call = None, None
    return Progress(tuple(steps), step is not None, thought, call, chars, ended, usage)


# --- the manager -----------------------------------------------------------------------------


def _stop(local: _LocalRun) -> None:
    """Cancel a local run's task, once (a second cancel would outlive the one it handles)."""
    if local.task is None or local.ended or local.cancel_requested:
        return
    local.cancel_requested = True
    local.task.cancel()


def new_run_id() -> str:
    """An unguessable id (144 random bits)."""
    return "run_" + secrets.token_urlsafe(18)


def replica_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def open_store(settings: Settings) -> RunStore:
    """The store the settings name: PostgreSQL for a postgresql:// URL, else SQLite."""
    store: RunStore
    if settings.run_store.startswith(("postgresql://", "postgres://")):
        from agentloop.runs.postgres import PostgresRunStore  # asyncpg loads only for it

        store = PostgresRunStore(settings.run_store)
    else:
        store = SqliteRunStore(settings.run_store, max_bytes=settings.run_store_max_bytes)
    try:
        keys = load_keys(settings.run_store_keys, settings.run_store_key_file)
    except ValueError as exc:  # the key file's (the variable's was checked with the settings)
        raise SettingsError(f"--run-store-key-file / AGENTLOOP_RUN_STORE_KEY_FILE: {exc}") \
            from None
    if keys:
        log.info("run store: encrypted at rest, sealing under key %s (%d keys)", keys[0][0],
                 len(keys))
        store = SealedStore(store, Sealer(keys))
    return store


class RunManager:
    """Starts, records, watches and cancels background runs (one per replica).

    The interface the doors use: `start(run, context) -> run id`, `get`, `list`, `cancel`,
    `watch(after_seq)`, `submit_tool_result`.
    """

    def __init__(self, agent: AgentService, store: RunStore, settings: Settings,
                 replica: str | None = None, webhooks: WebhookSender | None = None) -> None:
        self.agent = agent
        self.store = store
        self.webhooks = webhooks
        self._telemetry = agent.generation.telemetry
        store.observe = self._telemetry.run_store_call  # type: ignore[attr-defined]
        if webhooks is not None:
            webhooks.observe = self._telemetry.webhook_attempt
        self._telemetry.observe_runs(self)
        self.settings = settings
        self.replica = replica or replica_name()
        self._local: dict[str, _LocalRun] = {}
        self._running = asyncio.Semaphore(settings.run_max_running)
        self._queued = 0
        self._open = False
        self._open_lock = asyncio.Lock()
        self._background: list[asyncio.Task[None]] = []
        self._closing = False
        self.ttls: Mapping[RunStatus, float] = {
            RunStatus.COMPLETED: settings.run_ttl_completed,
            RunStatus.FAILED: settings.run_ttl_failed,
            RunStatus.EXPIRED: settings.run_ttl_failed,
            RunStatus.CANCELLED: settings.run_ttl_cancelled,
        }

    # --- life ---

    async def start(self) -> None:
        """Open the store (a store that is down only refuses runs until it answers) and
        start the sweep and the lease keeper."""
        with contextlib.suppress(RunStoreUnavailable, RunStoreFull):
            await self._ensure_open()
            await self.store.listen_cancels(self._cancelled_elsewhere)
            if self.webhooks is not None:
                await self.webhooks.resume()
        self._background = [
            asyncio.create_task(sweep_forever(self.store, self.ttls,
                                              self.settings.run_sweep_interval),
                                name="runs-sweep"),
            asyncio.create_task(self._keep_leases(), name="runs-leases"),
            asyncio.create_task(self._collect_results(), name="runs-tool-results"),
        ]

    async def close(self) -> None:
        """Stop every local run without ending it (its lease lapses and another replica, or
        this one restarted, takes it over) and close the store."""
        if self._closing:
            return
        self._closing = True
        tasks = [*self._background, *(r.task for r in self._local.values() if r.task)]
        for task in tasks:
            task.cancel()
        for local in self._local.values():  # its watchers hear SHUTTING_DOWN at once
            local.notify()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.webhooks is not None:  # pending deliveries stay pending: resumed at a start
            await self.webhooks.close()
        for local in list(self._local.values()):  # what a taking-over replica goes on from
            with contextlib.suppress(RunStoreUnavailable, RunStoreFull):
                await self.store.append_events(local.id, local.unwritten())
        if self._local:  # their leases end now: a replica restarted here takes them at once
            with contextlib.suppress(RunStoreUnavailable, RunStoreFull):
                await self.store.renew(self.replica, list(self._local), time.time())
        await self.store.close()

    async def _ensure_open(self) -> None:
        if self._open:
            return
        async with self._open_lock:
            if not self._open:
                await self.store.open()
                self._open = True

    # --- the doors' interface ---

    async def start_run(self, run: AgentRun, *, timeout: float | None = None,
                        webhook_url: str = "", previous_run_id: str = "",
                        trim_conversation: bool = False, webhook_each_step: bool = False) -> str:
        """Store a new run and start (or queue) it; its id. `run.context` says whose it is;
        `previous_run_id` names a completed run of the tenant whose conversation it goes on."""
        await self._ensure_open()
        if previous_run_id:
            run = await self._continued(run, previous_run_id, trim_conversation)
        if self._queued >= self.settings.run_max_queued:
            raise RunLimitReached(
                f"this replica has {self._queued} runs queued; the limit is "
                f"{self.settings.run_max_queued} (run_max_queued)", retry_after=5.0)
        now = time.time()
        timeout = timeout or self.settings.run_default_timeout
        record = RunRecord(
            id=new_run_id(), tenant=run.context.tenant, status=RunStatus.QUEUED, created=now,
            updated=now, request=encode_request(run, webhook_each_step=webhook_each_step),
            deadline=now + timeout,
            model=run.model, lease_owner=self.replica,
            lease_expires=now + self.settings.run_lease, webhook_url=webhook_url)
        await self.store.create(record, self.settings.run_max_active_per_tenant)
        self._launch(record, run)
        return record.id

    async def _continued(self, run: AgentRun, previous_run_id: str, trim: bool) -> AgentRun:
        """The run with the earlier run's conversation before its own messages, and the
        conversation's session (affinity: its turns land where their prefix is cached)."""
        earlier = await self.store.get(previous_run_id, run.context.tenant)
        if earlier is None:
            raise RunNotFound(f"no run {previous_run_id[:64]!r} (previous_run_id)")
        if earlier.status is not RunStatus.COMPLETED:
            raise FailedPrecondition(
                f"run {previous_run_id} is {earlier.status.value}: only a completed run's "
                "conversation goes on", reason="RUN_NOT_COMPLETED")
        before = decode_request(earlier.request)
        history = [*before.messages, ChatMessage(Role.USER, before.goal),
                   ChatMessage(Role.ASSISTANT, earlier.answer.decode())]
        messages = [*history, *run.messages]
        own = len(run.goal.encode()) + len(run.system.encode())

        def size(turns: list[ChatMessage]) -> int:
            return own + sum(len(m.content.encode()) for m in turns)

        # The model's context holds the conversation and the answer: a conversation past
        # it (estimated at BYTES_PER_TOKEN) is refused here, not by the engine mid-run.
        window = max(0, run.options.num_ctx - run.options.max_tokens) * BYTES_PER_TOKEN
        limit = min(self.settings.max_prompt_bytes, window)
        most = self.settings.max_messages
        while (size(messages) > limit or len(messages) > most) and trim \
                and len(messages) > len(run.messages):
            messages = messages[1:]  # the oldest turn first
        if size(messages) > limit or len(messages) > most:
            raise InvalidArgument([("previous_run_id", (
                f"the conversation would be {size(messages)} bytes in {len(messages)} "
                f"messages; the limits are {limit} bytes (max_prompt_bytes, and the model's "
                f"context of {run.options.num_ctx} tokens less the answer's "
                f"{run.options.max_tokens}, at {BYTES_PER_TOKEN} bytes a token) and {most} "
                "messages (max_messages): set trim_conversation to drop its oldest turns"))])
        context = run.context
        if not context.session:
            context = dataclasses.replace(context, session=before.context.session
                                          or previous_run_id)
        return dataclasses.replace(run, messages=tuple(messages), context=context)

    async def get(self, tenant: str, run_id: str, *, details: bool = True) -> RunView:
        await self._ensure_open()
        record = await self.store.get(run_id, tenant)
        if record is None:
            raise RunNotFound(f"no run {run_id[:64]!r}")
        return await self._view(record, details)

    async def list(self, tenant: str, statuses: Iterable[RunStatus], page_size: int = 0,
                   page_token: str = "") -> tuple[list[RunView], str]:
        """A page of the tenant's runs, newest first, and the next page's token ("" at the
        end)."""
        if page_size < 0:
            raise InvalidArgument([("page_size", "must be >= 0")])
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = None
        if page_token:
            try:
                after = Page.from_token(page_token)
            except ValueError as exc:
                raise InvalidArgument([("page_token", str(exc))]) from None
        await self._ensure_open()
        records = await self.store.list(tenant, statuses, size + 1, after)
        more = len(records) > size
        records = records[:size]
        token = Page(records[-1].created, records[-1].id).token() if more else ""
        return [await self._view(r, details=False) for r in records], token

    async def cancel(self, tenant: str, run_id: str) -> RunView:
        """Cancel a run (idempotent): a local run stops at once; another replica's when that
        replica hears of it (at once with PostgreSQL, else when it next renews its lease)."""
        view = await self.get(tenant, run_id, details=False)
        if view.status in FINAL:
            return await self.get(tenant, run_id)
        local = self._local.get(run_id)
        await self.store.request_cancel(run_id)
        if local is not None and local.task is not None:
            _stop(local)  # (unless the store's notice of this cancel came first)
            await asyncio.wait({local.task}, timeout=CANCEL_WAIT)
        return await self.get(tenant, run_id)

    async def submit_tool_result(self, tenant: str, run_id: str,
                                 result: ClientToolResult) -> RunView:
        """Hand a client tool's result to the run waiting for it, on this replica or,
        through the store, on the one running it."""
        view = await self.get(tenant, run_id, details=False)
        local = self._local.get(run_id)
        waiting = local.waiting is not None if local is not None \
            else view.status is RunStatus.WAITING_FOR_TOOL
        if not waiting:
            raise FailedPrecondition(
                f"run {run_id} waits for no tool result (status {view.status.value})",
                reason="RUN_NOT_WAITING")
        if local is None:  # another replica runs it: it takes the result from the store
            if result.call_id != view.record.waiting_call:
                raise InvalidArgument([("tool_result.call_id",
                                        f"run {run_id} waits for {view.record.waiting_call}")])
            await self.store.put_tool_result(run_id, result.call_id, json.dumps(
                {"output": result.output, "error": result.error}).encode())
            return view
        try:
            local.calls.deliver(result)
            local.answered.add(result.call_id)
        except WrongCallId as exc:
            raise InvalidArgument([("tool_result.call_id", str(exc))]) from None
        return await self.get(tenant, run_id)

    async def _collect_results(self) -> None:
        """Results of client tools left in the store (by another replica) for the runs
        waiting here."""
        while True:
            await asyncio.sleep(self.settings.run_watch_poll_interval)
            waiting = [run_id for run_id, local in self._local.items()
                       if local.waiting is not None]
            if not waiting:
                continue
            with contextlib.suppress(RunStoreUnavailable, RunStoreFull):
                for run_id, call_id, payload in await self.store.take_tool_results(waiting):
                    local = self._local.get(run_id)
                    if local is None:
                        continue
                    value = json.loads(payload)
                    with contextlib.suppress(WrongCallId):  # answered here meanwhile
                        local.calls.deliver(ClientToolResult(call_id, value.get("output"),
                                                             value.get("error")))
                        local.answered.add(call_id)

    async def watch(self, tenant: str, run_id: str, after_seq: int = 0
                    ) -> AsyncIterator[RunEvent]:
        """The run's events after `after_seq`, then the new ones, until the run ends."""
        if after_seq < 0:
            raise InvalidArgument([("after_sequence", "must be >= 0")])
        await self.get(tenant, run_id, details=False)  # NOT_FOUND for another tenant's run
        cursor = after_seq
        while True:
            if self._closing:  # the watcher goes on through another replica
                raise ShuttingDown("this replica is stopping: watch again after the last "
                                   "sequence number received", retry_after=0.5)
            local = self._local.get(run_id)
            changed = local.changed() if local is not None else None
            batch = local.after(cursor) if local is not None else None
            if batch is None:
                batch = [decode_event(e) for e in
                         await self.store.events(run_id, cursor, WATCH_BATCH)]
            held = False
            for event in batch:
                if isinstance(event.body, RunEnded) and local is not None and not local.ended:
                    held = True  # its record is being written: the end goes out after it
                    break
                yield event
                cursor = event.seq
                if isinstance(event.body, RunEnded):
                    return
            if batch and not held:
                continue
            if changed is not None:
                await changed.wait()
                continue
            record = await self.store.get(run_id)
            if record is None or (record.status in FINAL and cursor >= record.last_seq):
                return
            await asyncio.sleep(self.settings.run_watch_poll_interval)

    # --- driving a run ---

    def _launch(self, record: RunRecord, run: AgentRun) -> None:
        local = _LocalRun(record, self.settings)
        self._local[record.id] = local
        self._queued += 1
        local.task = asyncio.create_task(self._drive(local, record, run),
                                         name=f"run-{record.id}")

    async def _drive(self, local: _LocalRun, record: RunRecord, run: AgentRun) -> None:
        status, error, summary = RunStatus.FAILED, "", None
        steps: tuple[AgentStep, ...] = ()
        deadline = record.deadline
        queued = True
        try:
            try:
                async with asyncio.timeout(None if deadline is None else deadline - time.time()):
                    await self._running.acquire()
            except TimeoutError:
                status, error = RunStatus.EXPIRED, "the run's deadline passed while it was queued"
                return
            queued = False
            self._queued -= 1
            try:
                pending = run.resume.pending_call if run.resume is not None else None
                if pending is not None and pending.client_tool:  # it waits for it again
                    local.waiting = pending
                    await self._set(local, status=RunStatus.WAITING_FOR_TOOL,
                                    waiting_call=pending.call_id)
                else:
                    await self._set(local, status=RunStatus.RUNNING)
                left = None if deadline is None else max(0.0, deadline - time.time())
                run = dataclasses.replace(
                    run, deadline=None if left is None else time.monotonic() + left,
                    client_tool_timeout=left)
                with self._telemetry.background_run(local.id, self.replica,
                                                    run.resume is not None):
                    async with aclosing(self.agent.run(run, local.calls)) as events:
                        async for event in events:
                            if isinstance(event, RunFinished):
                                outcome = event.outcome
                                steps = outcome.steps
                                summary = RunSummary(outcome.final_answer, outcome.stop_reason,
                                                     outcome.usage, len(outcome.steps),
                                                     outcome.duration, outcome.model)
                                await self._record(local, summary)
                            else:
                                await self._on_event(local, event)
                if summary is None:
                    raise RuntimeError("the agent loop ended without its outcome")
                status = (RunStatus.COMPLETED if summary.stop_reason in _COMPLETING
                          else RunStatus.FAILED)
                error = "" if status is RunStatus.COMPLETED else self._why(local, steps, summary)
            finally:
                self._running.release()
        except asyncio.CancelledError:
            if not local.cancel_requested:
                raise  # the replica stops: the run stays active for a takeover
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            status, error = RunStatus.CANCELLED, "cancelled by CancelAgentRun"
        except AgentLoopError as exc:
            status, error = RunStatus.FAILED, f"{exc.reason}: {exc.message}"
        except Exception:
            log.exception("background run %s failed", local.id)
            status, error = RunStatus.FAILED, "INTERNAL: the run failed unexpectedly"
        finally:
            if queued:
                self._queued -= 1
            # A replica that stops, or lost the lease, leaves the run to the one taking over.
            if local.cancel_requested or not (self._closing or local.lost):
                await self._end(local, status, error, summary, steps)

    def _why(self, local: _LocalRun, steps: tuple[AgentStep, ...], summary: RunSummary) -> str:
        if summary.stop_reason is StopReason.DEADLINE and local.unanswered is not None:
            return (f"DEADLINE: the run's deadline passed while it waited for the result of "
                    f"{local.unanswered.call_id} ({local.unanswered.tool})")
        last_error = next((s.error for s in reversed(steps) if s.error), "")
        return f"{summary.stop_reason.name}: {last_error}".rstrip(": ")

    async def _on_event(self, local: _LocalRun, event: AgentEvent) -> None:
        if isinstance(event, ToolCalled) and event.client_tool:
            # Waiting before anyone hears of the call: a result may come at once.
            local.waiting = event
            await self._set(local, status=RunStatus.WAITING_FOR_TOOL, waiting_call=event.call_id)
        await self._record(local, event)
        if isinstance(event, ToolReturned) and local.webhook_each_step \
                and self.webhooks is not None:
            await self._send_webhook(local, "agent_run.step", {
                "id": local.id, "step": event.step, "call_id": event.call_id,
                "tool": event.tool, "is_error": event.is_error,
                "observation": event.observation})
        if isinstance(event, ToolReturned) and local.waiting is not None:
            if local.waiting.call_id not in local.answered:
                local.unanswered = local.waiting
            local.waiting = None
            await self._set(local, status=RunStatus.RUNNING, waiting_call="")

    async def _record(self, local: _LocalRun, body: RunEventBody) -> None:
        if local.add(body):
            # A tool call is written before the tool runs, whatever it takes: a replica that
            # takes the run over must know the call was made.
            await self._write(local, must=isinstance(body, ToolCalled))

    async def _write(self, local: _LocalRun, must: bool) -> None:
        """Write the run's unwritten events; with `must`, until the store takes them."""
        while True:
            batch = local.unwritten()
            try:
                await self.store.append_events(local.id, batch)
            except (RunStoreUnavailable, RunStoreFull) as exc:
                if not must:
                    log.warning("run %s: events kept in memory (%s)", local.id, exc.message)
                    return
                await asyncio.sleep(STORE_RETRY)
                continue
            if batch:
                local.written(batch[-1].seq)
            return

    async def _set(self, local: _LocalRun, **changes: Any) -> None:
        with contextlib.suppress(RunStoreUnavailable, RunStoreFull):
            await self.store.update(local.id, updated=time.time(), **changes)

    async def _end(self, local: _LocalRun, status: RunStatus, error: str,
                   summary: RunSummary | None, steps: tuple[AgentStep, ...]) -> None:
        """Record the run's end (retried until the store takes it: an accepted run is never
        lost) and let its watchers finish."""
        local.add(RunEnded(status, error), announce=False)
        changes: dict[str, Any] = {"status": status, "error": error, "finished": time.time(),
                                   "waiting_call": "", "lease_owner": "", "lease_expires": None}
        if summary is not None:
            changes.update(answer=summary.final_answer.encode(), steps=_encode_steps(steps),
                           input_tokens=summary.usage.input_tokens,
                           output_tokens=summary.usage.output_tokens, model=summary.model,
                           stop_reason=summary.stop_reason.name)
        while True:
            try:
                await self._write(local, must=True)
                await self.store.update(local.id, updated=time.time(), **changes)
                break
            except (RunStoreUnavailable, RunStoreFull):
                await asyncio.sleep(STORE_RETRY)
        local.ended = True
        self._local.pop(local.id, None)
        local.notify()
        self._telemetry.run_ended(status.value)
        if local.webhook_url and self.webhooks is not None:
            await self._announce(local, status, error, summary)

    async def _announce(self, local: _LocalRun, status: RunStatus, error: str,
                        summary: RunSummary | None) -> None:
        """The run's end to its webhook (recorded, then delivered in the background)."""
        assert self.webhooks is not None
        data: dict[str, Any] = {"id": local.id, "status": status.value, "error": error}
        if summary is not None:
            data.update(final_answer=summary.final_answer, stop_reason=summary.stop_reason.name,
                        usage={"input_tokens": summary.usage.input_tokens,
                               "output_tokens": summary.usage.output_tokens},
                        model=summary.model, steps=summary.steps)
        await self._send_webhook(local, f"agent_run.{status.value}", data)

    async def _send_webhook(self, local: _LocalRun, event_type: str,
                            data: dict[str, Any]) -> None:
        assert self.webhooks is not None
        delivery = delivery_for(local.id, local.webhook_url, event_type, data)
        try:
            await self.webhooks.send(delivery)
        except (RunStoreUnavailable, RunStoreFull) as exc:
            log.warning("run %s: webhook not recorded (%s)", local.id, exc.message)

    # --- leases ---

    async def _keep_leases(self) -> None:
        """Renew this replica's leases; stop runs cancelled elsewhere; take up orphans."""
        interval = self.settings.run_lease / 3
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(RunStoreUnavailable, RunStoreFull):
                await self._ensure_open()  # a store that was down at the start, back now
                await self._renew()
                # Listening again after a lost connection (the leases read cancels meanwhile),
                # once the leases are renewed: a slow connect must not let them lapse.
                await self.store.listen_cancels(self._cancelled_elsewhere)
                await self._adopt_orphans()
                if self.webhooks is not None:
                    await self.webhooks.resume()

    async def _renew(self) -> None:
        ids = [run_id for run_id, local in self._local.items() if not local.ended]
        if not ids:
            return
        ours = await self.store.renew(self.replica, ids, time.time() + self.settings.run_lease)
        for run_id in ids:
            local = self._local.get(run_id)
            if local is None or local.task is None:
                continue
            if run_id not in ours:
                log.warning("run %s: lease lost to another replica; stopping here", run_id)
                self._local.pop(run_id, None)
                local.lost = True
                local.task.cancel()
            elif ours[run_id]:
                self._cancelled_elsewhere(run_id)

    def _cancelled_elsewhere(self, run_id: str) -> None:
        """A cancel requested through another replica: the run stops here if it runs here
        (not while this replica stops: the run goes on elsewhere, where the cancel is read)."""
        local = self._local.get(run_id)
        if local is not None and not self._closing:
            _stop(local)

    async def _adopt_orphans(self) -> None:
        """Take over runs whose replica stopped: a queued one starts here, a started one goes
        on after its last recorded step (or fails, saying why it cannot)."""
        if not self._open:
            return
        now = time.time()
        for record in await self.store.orphans(now, limit=16):
            if record.id in self._local or not await self.store.claim(
                    record.id, self.replica, now + self.settings.run_lease, now):
                continue
            run = decode_request(record.request)
            if record.status is RunStatus.QUEUED:
                self._launch(record, run)
                continue
            log.info("run %s: taken over from %s", record.id, record.lease_owner or "nobody")
            point = await self._resume_point(record)
            if isinstance(point, Resume):
                self._launch(record, dataclasses.replace(run, resume=point))
            else:
                await self._end(_LocalRun(record, self.settings), point.status, point.error,
                                None, ())

    async def _resume_point(self, record: RunRecord) -> Resume | RunEnded:
        """Where a started run goes on, from its recorded events; or how it must end."""
        progress = replay_events(await self._all_events(record.id))
        if progress.ended is not None:
            return progress.ended  # it had ended; only its status was not written
        call = progress.call
        if call is not None and not call.client_tool:
            tool = self.agent.tools[call.tool] if call.tool in self.agent.tools else None
            if not is_idempotent(tool):
                return RunEnded(RunStatus.FAILED, (
                    f"INTERRUPTED: the replica running it stopped while {call.tool} "
                    f"({call.call_id}) ran; its result was not recorded, and {call.tool} is "
                    "not declared idempotent, so it is not run a second time"))
        return Resume(progress.steps, usage=progress.usage, step_started=progress.step_started,
                      answer_chars=progress.answer_chars, pending_call=call,
                      pending_thought=progress.thought)

    async def _all_events(self, run_id: str) -> list[RunEvent]:
        local = self._local.get(run_id)
        if local is not None and (kept := local.after(0)) is not None:
            return list(kept)
        events: list[RunEvent] = []
        while batch := await self.store.events(run_id, events[-1].seq if events else 0,
                                               WATCH_BATCH):
            events += [decode_event(e) for e in batch]
        return events

    # --- views ---

    async def _view(self, record: RunRecord, details: bool) -> RunView:
        waiting = None
        local = self._local.get(record.id)
        if record.status is RunStatus.WAITING_FOR_TOOL:
            # Here, the call itself; on another replica's run, its id (details: its events).
            waiting = local.waiting if local is not None else ToolCalled(
                0, record.waiting_call, "", "", True)
        if not details:
            return RunView(record, final_answer=record.answer.decode(), waiting_call=waiting)
        deliveries = tuple(await self.store.deliveries(record.id))
        steps = _decode_steps(record.steps)
        if record.status in ACTIVE:  # the steps so far, from the events
            progress = replay_events(await self._all_events(record.id))
            steps = progress.steps
            if waiting is not None and progress.call is not None \
                    and progress.call.call_id == record.waiting_call:
                waiting = progress.call
        return RunView(record, record.answer.decode(), steps, waiting, deliveries)

    def active_by_status(self) -> dict[str, int]:
        """Runs on this replica by status: queued (the queue's depth), running, waiting."""
        waiting = sum(1 for local in self._local.values() if local.waiting is not None)
        running = max(0, len(self._local) - self._queued - waiting)
        return {RunStatus.QUEUED.value: self._queued, RunStatus.RUNNING.value: running,
                RunStatus.WAITING_FOR_TOOL.value: waiting}
