"""The llama.cpp engine: continuous batching over slots, synchronous and thread-based.

`Engine` loads one GGUF into one llama.cpp context holding `slots` sequences. A scheduler
thread owns the context; each step is one `llama_decode` over the next token of every
generating sequence plus a chunk of the prompts still being evaluated. A job takes the free
slot with the longest cached prefix, samples with its own sampler chain (a grammar checks
only the sampled token unless it rejects it, as llama.cpp's server does; grammars compile on
builder threads), and puts text deltas, then exactly one terminal item (`GenerationEnd` or
`AgentLoopError`), into its sink: a step's items once every slot of it is sampled, in one
call to a `StepSink`. Slots, prefix reuse, constrained decoding and
determinism, for users: docs/embedded-engine.md.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import itertools
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import llama_cpp
import numpy as np
from llama_cpp import _internals, llama_chat_format, llama_grammar
from llama_cpp._logger import set_verbose

from agentloop.backends.constraints import (
    grammar_for_schema,
    grammar_for_tool_calls,
    split_on_stops,
)
from agentloop.backends.engine_types import EngineConfig, EngineStats
from agentloop.config import SettingsError
from agentloop.domain import (
    FinishReason,
    GenerationEnd,
    GenerationRequest,
    ModelInfo,
    OutputFormat,
    Role,
    SamplingOptions,
    Timings,
    Usage,
)
from agentloop.errors import (
    FORMAT_SCHEMA_FIELD,
    TOOLS_FIELD,
    AgentLoopError,
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
    Cancelled,
    DeadlineExceeded,
    ShuttingDown,
)
from agentloop.ranges import TOP_K_MAX
from agentloop.tool_calls import (
    call_names,
    call_text,
    calls_schema,
    offered_tools,
    tools_instructions,
)

log = logging.getLogger(__name__)

SCHEDULER_THREAD_NAME = "agentloop-engine"
GRAMMAR_THREAD_PREFIX = "agentloop-grammar"
TOKENIZER_THREAD_PREFIX = "agentloop-tokenizer"
# llama.cpp's file types (enum llama_ftype) for the quantizations people actually use.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}
_GRAMMAR_CACHE_SIZE = 32
_GRAMMAR_BUILDERS = 2
# Prompts are rendered and tokenized on their own threads (llama_tokenize releases the GIL):
# two at a time, so a long one does not hold up the admission of a short one.
_TOKENIZERS = 2
#: How long the scheduler waits for new prompts to tokenize before a step: a short prompt
#: is ready in well under this and joins the step at once instead of the one after it.
_TOKENIZE_GRACE_S = 0.002
# A free slot's cache is reused only when the shared prefix is at least this share of what
# the slot holds: reusing a few tokens (BOS, a template's header) would throw away a warm
# prefix that a conversation waiting on a tool call comes back for.
_REUSE_MIN_SHARE = 0.5
# Content markers while a chat is rendered: private-use characters no template writes.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")
_NO_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED
_LIKELY_TOKENS = 1024  # candidates a grammar is applied to before the whole vocabulary
_PENALTY_LAST_N = 64  # tokens the repeat penalty looks back on (llama-cpp-python's default)

Sink = Callable[[int, object], None]


class StepSink(Protocol):
    """A sink that also takes a whole step's items in one call, in order (the engine's
    child sends them to the gateway as one frame)."""

    def __call__(self, job_id: int, item: object) -> None: ...

    def many(self, items: list[tuple[int, object]]) -> None: ...


class SideWork(Protocol):
    """Work that shares the scheduler thread with generation (llama_embedder.Embedder):
    its steps run between generation steps, so neither decodes while the other does."""

    def step(self, generating: bool) -> bool:
        """Run at most one step (bounded like a generation step); True when it decoded.
        Never raises: a failure is its own jobs' to report."""
        ...

    def close(self) -> None:
        """Fail what is left and free what it holds (before the model is freed)."""
        ...


# --- jobs and slots ----------------------------------------------------------------------

@dataclass
class _Prompt:
    tokens: list[int]
    stops: tuple[str, ...]


@dataclass(eq=False)
class _Job:
    job_id: int
    request: GenerationRequest
    sink: Sink
    cancelled: bool = False
    ended: bool = False
    prompt: _Prompt | None = None
    prepared: Future[_Prompt] | None = None  # the prompt, tokenized off the scheduler thread
    grammar: Future[int] | None = None  # the compiled grammar sampler (a prototype to clone)

    def send(self, item: object) -> None:
        if self.accepts(item):
            _deliver(self.sink, [(self.job_id, item)])

    def accepts(self, item: object) -> bool:
        """Whether the item goes out: nothing does after the terminal one."""
        if self.ended:
            return False
        self.ended = not isinstance(item, str)
        return True

    def expired(self, now: float) -> AgentLoopError | None:
        if self.cancelled:
            return Cancelled("the generation was cancelled")
        deadline = self.request.deadline
        if deadline is not None and now > deadline:
            return DeadlineExceeded("the deadline passed before the generation ended")
        return None


@dataclass(eq=False)
class _Slot:
    """One sequence of the context and the job it runs."""

    seq: int
    cached: list[int] = field(default_factory=list)  # tokens in its KV cache, positions 0..
    scope: str = ""  # the CallContext.cache_scope of the job that left `cached`
    last_used: float = 0.0
    job: _Job | None = None
    # The running job's state.
    prompt: list[int] = field(default_factory=list)
    stops: tuple[str, ...] = ()
    reused: int = 0
    budget: int = 0
    produced: int = 0
    chain: int = 0  # llama_sampler* (the sampler chain)
    grammar: int = 0  # llama_sampler* (a clone of the grammar), 0 without one
    next_token: int | None = None  # sampled, not yet decoded
    pending: str = ""
    decoder: codecs.IncrementalDecoder | None = None
    admitted_at: float = 0.0
    first_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.job is not None and len(self.cached) < len(self.prompt)


def _deliver(sink: Sink | StepSink, items: list[tuple[int, object]]) -> None:
    """Items to one sink: in one call if it takes many."""
    try:
        many = getattr(sink, "many", None)
        if many is not None:
            many(items)
            return
        for job_id, item in items:
            sink(job_id, item)
    except Exception:  # a broken sink must not take the engine down
        log.exception("the engine's sink failed for jobs %s",
                      sorted({job_id for job_id, _ in items}))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    size = min(len(a), len(b))
    index = 0
    while index < size and a[index] == b[index]:
        index += 1
    return index


_NOT_A_NAME_CHAR = re.compile(r"[^A-Za-z0-9._:/@+-]")


def model_name_for(path: Path) -> str:
    """The model's name in the API: the file name without `.gguf`, safe as a model name."""
    stem = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name
    return _NOT_A_NAME_CHAR.sub("-", stem).lstrip("._:/@+-") or "model"


# --- the engine --------------------------------------------------------------------------

class Engine:
    """One GGUF on llama.cpp, `config.slots` sequences decoded together."""

    def __init__(self, config: EngineConfig) -> None:
        if config.slots < 1 or config.batch_tokens < config.slots:
            raise SettingsError("the engine needs slots >= 1 and batch_tokens >= slots")
        self._config = config
        self._path = Path(config.model_path)
        self._model_name = model_name_for(self._path)
        self._model: _internals.LlamaModel | None = None
        self._ctx: int | None = None  # llama_context*
        self._memory: int | None = None
        self._batch: llama_cpp.llama_batch | None = None
        self._vocab: int | None = None
        self._n_vocab = 0
        self._n_swa = 0
        self._slot_ctx = 0
        self._chat_template: llama_chat_format.Jinja2ChatFormatter | None = None
        self._slots = [_Slot(seq) for seq in range(config.slots)]
        self._lock = threading.Condition()
        self._incoming: collections.deque[_Job] = collections.deque()
        self._woken = False
        self._closed = False
        self._jobs: dict[int, _Job] = {}  # every job without its terminal item yet
        self._waiting: list[_Job] = []  # scheduler thread only
        self._grammars: collections.OrderedDict[str, Future[int]] = collections.OrderedDict()
        self._retired: list[Future[int]] = []  # out of the cache, maybe still awaited
        self._builders: ThreadPoolExecutor | None = None
        self._tokenizers: ThreadPoolExecutor | None = None
        self._progress = _NodeCounter()
        self._thread: threading.Thread | None = None
        #: What the scheduler thread's sampling sends, held until every slot is sampled.
        self._held: list[tuple[_Job, object]] | None = None
        self._steps = 0
        self._building: dict[str, float] = {}  # grammar key -> when its build began
        self._load_seconds = 0.0
        self._piece = ctypes.create_string_buffer(256)
        self._candidates: np.ndarray | None = None
        self._token_ids: np.ndarray | None = None
        self._side: SideWork | None = None

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def model(self) -> _internals.LlamaModel:
        """The loaded model (a side context of its own shares its weights)."""
        assert self._model is not None, "the engine is not loaded"
        return self._model

    def attach(self, side: SideWork) -> None:
        """Run `side`'s steps on the scheduler thread, between generation steps."""
        self._side = side

    def wake(self) -> None:
        """The side work has something new: the scheduler looks at once."""
        with self._lock:
            self._wake()

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The tokens the model sees for a generation (its chat template applied);
        raises BackendRejected when the template refuses the messages. Any thread."""
        return self._prompt(request).tokens

    @property
    def context_size(self) -> int:
        """Tokens one slot holds (0 before loading)."""
        return self._slot_ctx

    # --- lifecycle -----------------------------------------------------------------------

    def load(self) -> ModelInfo:
        """Load the model, make the context and start the threads (raises SettingsError)."""
        path, config = self._path, self._config
        if not path.is_file():
            raise SettingsError(f"--gguf / AGENTLOOP_GGUF: no file at {path}")
        started = time.monotonic()
        llama_cpp.llama_backend_init()
        set_verbose(False)  # llama.cpp's own lines: errors only
        try:
            model = _internals.LlamaModel(path_model=str(path),
                                          params=llama_cpp.llama_model_default_params(),
                                          verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise SettingsError(f"--gguf / AGENTLOOP_GGUF: cannot load {path}: {exc}") from None
        trained = model.n_ctx_train()
        per_slot = min(config.n_ctx, trained) if trained > 0 else config.n_ctx
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = per_slot * config.slots
        params.n_batch = params.n_ubatch = config.batch_tokens
        params.n_seq_max = config.slots
        params.n_threads = params.n_threads_batch = config.threads
        # One KV stream for all sequences by default: llama.cpp decodes a step in one pass
        # whichever slots are busy (with one stream each, a pass takes only consecutive
        # sequence ids and the same number of tokens from each, so slots {0, 2, 4} take
        # three). Attention then spans every slot's cells, but flash attention (llama.cpp's
        # "auto" turns it on for the CPU) skips most of the cells a sequence's mask hides: 7
        # idle slots of 2,000 cached tokens each slow 3 streams by 0-10%, where slots apart
        # with a stream each cost 10-18% (bench_workloads).
        params.kv_unified = config.kv_unified
        # Reusing a prefix longer than the sliding window needs the window's layers whole.
        params.swa_full = config.prefix_reuse
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model.model, params)
        if not ctx:
            model.close()
            raise SettingsError(f"--gguf / AGENTLOOP_GGUF: cannot make a context for {path}")
        self._model, self._ctx = model, ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._vocab = model.vocab
        self._n_vocab = model.n_vocab()
        self._n_swa = llama_cpp.llama_model_n_swa(model.model)
        # A shared cache holds every slot's tokens: each slot keeps to its share of it.
        self._slot_ctx = min(llama_cpp.llama_n_ctx_seq(ctx), per_slot)
        self._batch = llama_cpp.llama_batch_init(config.batch_tokens, 0, 1)
        self._token_ids = np.arange(self._n_vocab, dtype=np.int32)
        self._candidates = np.zeros(self._n_vocab, dtype=np.dtype(
            [("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True))
        self._load_seconds = time.monotonic() - started
        metadata = model.metadata()
        template = metadata.get("tokenizer.chat_template")
        if template:
            self._chat_template = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=_token_text(model, model.token_eos()),
                bos_token=_token_text(model, model.token_bos()),
            )
        stat = path.stat()
        info = ModelInfo(
            name=self._model_name,
            size_bytes=stat.st_size,
            loaded=True,
            family=metadata.get("general.architecture", ""),
            parameter_size=metadata.get("general.size_label", ""),
            quantization_level=_quantization(metadata),
            modified_at=stat.st_mtime,
        )
        self._progress.attach(ctx)
        self._builders = ThreadPoolExecutor(_GRAMMAR_BUILDERS,
                                            thread_name_prefix=GRAMMAR_THREAD_PREFIX)
        self._tokenizers = ThreadPoolExecutor(_TOKENIZERS,
                                              thread_name_prefix=TOKENIZER_THREAD_PREFIX)
        self._thread = threading.Thread(target=self._schedule, name=SCHEDULER_THREAD_NAME,
                                        daemon=True)
        self._thread.start()
        log.info("llama engine: loaded %s (%s, %d slots x %d tokens, prefix reuse %s, "
                 "%d threads) in %.2fs", self._model_name,
                 info.quantization_level or "unknown quantization", config.slots,
                 self._slot_ctx, "on" if config.prefix_reuse else "off", config.threads,
                 self._load_seconds)
        return info

    def close(self) -> None:
        """Stop every job (each gets its terminal item), join the threads, free the model."""
        with self._lock:
            self._closed = True
            self._wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for pool in (self._builders, self._tokenizers):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._builders = self._tokenizers = None
        if self._side is not None:
            self._side.close()  # its context goes before the model it shares
        for job in list(self._jobs.values()):  # submitted while closing, never scheduled
            self._end(job, _shutting_down())
        for built in [*self._grammars.values(), *self._retired]:
            _free_grammar(built)
        self._grammars.clear()
        self._retired.clear()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = self._memory = None
        if self._model is not None:
            self._model.close()
            self._model = None

    # --- the API the backend calls -------------------------------------------------------

    def submit(self, job_id: int, request: GenerationRequest, sink: Sink) -> None:
        """Queue a job; never blocks. Its items arrive through `sink` on engine threads (a
        `StepSink` gets each step's items of its jobs in one call)."""
        job = _Job(job_id, request, sink)
        with self._lock:
            if self._closed or self._thread is None:
                refused = True
            else:
                refused = False
                self._jobs[job_id] = job
                self._incoming.append(job)
                self._wake()
        if refused:
            job.send(BackendUnavailable("the embedded engine is not loaded", retry_after=1.0))

    def cancel(self, job_id: int) -> None:
        """Stop the job at the next step (it ends with `Cancelled`) and free its slot."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                job.cancelled = True
                self._wake()

    def stats(self) -> EngineStats:
        slots = self._slots
        in_use = sum(1 for slot in slots if slot.job is not None)
        prefilling = sum(1 for slot in slots if slot.prefilling)
        return EngineStats(
            slots=len(slots),
            slots_in_use=in_use,
            running=in_use - prefilling,
            waiting=len(self._incoming) + len(self._waiting),
            cache_tokens=sum(len(slot.cached) for slot in slots),
            cache_capacity=self._slot_ctx * len(slots),
            steps=self._steps,
            nodes=self._progress.total(),
            building_since=min(tuple(self._building.values()), default=None),
        )

    def _wake(self) -> None:
        """Under the lock: the scheduler has something to look at."""
        self._woken = True
        self._lock.notify()

    def _end(self, job: _Job, item: object) -> None:
        with self._lock:
            self._jobs.pop(job.job_id, None)
        self._send(job, item)

    def _send(self, job: _Job, item: object) -> None:
        if self._held is not None and threading.current_thread() is self._thread:
            self._held.append((job, item))
        else:
            job.send(item)

    def _send_held(self) -> None:
        """A step's items to their sinks, after its sampling: each sink's run of them in one
        call. The engine's child then wakes its writer thread once per step and sends one
        frame, where waking it for each token lets it take the GIL and a core from the
        scheduler between samples (2-8% of a busy gateway's tokens/s, side by side)."""
        held, self._held = self._held or [], None
        accepted = [(job, item) for job, item in held if job.accepts(item)]
        for sink, run in itertools.groupby(accepted, key=lambda pair: pair[0].sink):
            _deliver(sink, [(job.job_id, item) for job, item in run])

    # --- the scheduler thread ------------------------------------------------------------

    def _schedule(self) -> None:
        while self._take_new():
            now = time.monotonic()
            try:
                self._expire(now)
                self._admit()
                generating = any(slot.job is not None for slot in self._slots)
                if generating:
                    self._step()
                if self._side is not None and self._side.step(generating):
                    self._steps += 1
                elif not generating:
                    self._idle(now)
            except Exception:
                log.exception("the llama engine failed")
                for slot in self._slots:  # what they hold is no longer known to be right
                    if slot.job is not None:
                        self._truncate(slot, 0)
                        self._release(slot, BackendProtocolError("the embedded engine failed"))
        failure = _shutting_down()
        for slot in self._slots:
            if slot.job is not None:
                self._release(slot, failure)
        for job in self._waiting:
            self._end(job, failure)
        self._waiting.clear()

    def _take_new(self) -> bool:
        """Move submitted jobs to the waiting list; False once the engine closes."""
        with self._lock:
            if self._closed:
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                return False
            self._woken = False
            new = list(self._incoming)
            self._incoming.clear()
        assert self._tokenizers is not None
        for job in new:
            try:
                job.grammar = self._grammar(job.request)
            except AgentLoopError as exc:
                self._end(job, exc)
                continue
            job.prepared = self._tokenizers.submit(self._prepare, job)
            job.prepared.add_done_callback(self._prepared)
            self._waiting.append(job)
        if new:
            futures.wait([job.prepared for job in new if job.prepared is not None],
                         timeout=_TOKENIZE_GRACE_S)
        return True

    def _prepare(self, job: _Job) -> _Prompt | None:
        """The job's prompt as tokens, checked against the context; on a tokenizer thread.

        None when the job ended before its turn (the scheduler ends it)."""
        if job.expired(time.monotonic()) is not None:
            return None
        try:
            prompt = self._prompt(job.request)
        except AgentLoopError:
            raise
        except Exception:
            log.exception("tokenizing a prompt failed")
            raise BackendProtocolError("the embedded engine failed") from None
        if len(prompt.tokens) >= self._slot_ctx:
            raise BackendRejected(
                f"the prompt is {len(prompt.tokens)} tokens; the embedded engine's "
                f"context holds {self._slot_ctx}",
                metadata={"model": self._model_name},
            )
        return prompt

    def _idle(self, now: float) -> None:
        """Nothing to decode: sleep until a job arrives, a grammar is built or a deadline."""
        deadlines = [job.request.deadline for job in self._waiting
                     if job.request.deadline is not None]
        timeout = max(0.0, min(deadlines) - now) + 0.001 if deadlines else None
        with self._lock:
            if not self._woken:
                self._lock.wait(timeout)

    def _expire(self, now: float) -> None:
        """End the jobs cancelled or past their deadline, running or waiting."""
        for slot in self._slots:
            if slot.job is not None and (error := slot.job.expired(now)) is not None:
                self._release(slot, error)
        for job in list(self._waiting):
            if (error := job.expired(now)) is not None:
                self._waiting.remove(job)
                self._end(job, error)

    def _admit(self) -> None:
        """Give free slots to waiting jobs in arrival order among those ready (prompt
        tokenized, grammar built): a short prompt may pass a long one queued before it."""
        for job in list(self._waiting):
            prepared = job.prepared
            if prepared is not None and prepared.done() and job.prompt is None:
                try:
                    job.prompt = prepared.result()
                except AgentLoopError as exc:
                    self._waiting.remove(job)
                    self._end(job, exc)
                    continue
            if not any(slot.job is None for slot in self._slots):
                continue  # no slot: only ended jobs leave the list now
            if job.prompt is None or (job.grammar is not None and not job.grammar.done()):
                continue
            free = [slot for slot in self._slots if slot.job is None]
            self._waiting.remove(job)
            try:
                grammar = (llama_cpp.llama_sampler_clone(job.grammar.result())
                           if job.grammar is not None else 0)
            except AgentLoopError as exc:
                self._end(job, exc)
                continue
            except Exception:
                log.exception("building a grammar failed")
                self._end(job, BackendProtocolError("the embedded engine failed"))
                continue
            self._start(self._pick(free, job), job, grammar)
        self._free_retired()

    def _pick(self, free: list[_Slot], job: _Job) -> _Slot:
        """The free slot whose cache serves the job best; among those that serve it no
        better than an empty one, the least recently used (a never-used slot first)."""
        return max(free, key=lambda slot: (self._reuse_score(slot, job), -slot.last_used))

    def _reusable(self, slot: _Slot, job: _Job) -> int:
        """Tokens of the job's prompt the slot's cache may serve: the one place that decides
        whether a cache may be reused at all (prefix reuse on, the same cache scope: another
        tenant's prefix is never reused, its cached_input_tokens and timings would tell the
        caller what someone else sent)."""
        assert job.prompt is not None
        if not self._config.prefix_reuse or slot.scope != job.request.context.cache_scope:
            return 0
        return _common_prefix(slot.cached, job.prompt.tokens)

    def _reuse_score(self, slot: _Slot, job: _Job) -> int:
        """How much picking this slot saves: its reusable prefix, when that is a fair share
        of what the slot holds (else 0, like an empty slot: keep the warm cache for the
        conversation it belongs to)."""
        shared = self._reusable(slot, job)
        return shared if shared >= _REUSE_MIN_SHARE * len(slot.cached) else 0

    def _start(self, slot: _Slot, job: _Job, grammar: int) -> None:
        assert job.prompt is not None
        tokens = job.prompt.tokens
        # At least one prompt token is evaluated: its logits give the first token.
        keep = min(self._reusable(slot, job), len(tokens) - 1)
        self._truncate(slot, keep)
        opts = job.request.options
        slot.job = job
        slot.scope = job.request.context.cache_scope
        slot.prompt = tokens
        slot.stops = job.prompt.stops
        slot.reused = len(slot.cached)
        slot.budget = min(opts.max_tokens, self._slot_ctx - len(tokens))
        slot.produced = 0
        slot.chain = _sampler_chain(opts, self._n_vocab)
        slot.grammar = grammar
        slot.next_token = None
        slot.pending = ""
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.admitted_at = time.perf_counter()
        slot.first_at = None

    def _truncate(self, slot: _Slot, keep: int) -> None:
        """Drop the slot's cached tokens from `keep` on (all of them if that cannot be)."""
        memory = self._memory
        if keep < len(slot.cached) and not llama_cpp.llama_memory_seq_rm(
                memory, slot.seq, keep, -1):
            keep = 0
        if 0 < keep and self._n_swa > 0:
            # A sliding-window cache that already dropped positions the rest needs.
            oldest = llama_cpp.llama_memory_seq_pos_min(memory, slot.seq)
            if oldest > max(0, keep - self._n_swa):
                keep = 0
        if keep == 0 and slot.cached:
            llama_cpp.llama_memory_seq_rm(memory, slot.seq, -1, -1)
        del slot.cached[keep:]

    def _release(self, slot: _Slot, item: object) -> None:
        """End the slot's job with `item`; the slot keeps its cache for the next job."""
        job = slot.job
        assert job is not None
        if slot.chain:
            llama_cpp.llama_sampler_free(slot.chain)
        if slot.grammar:
            llama_cpp.llama_sampler_free(slot.grammar)
        slot.chain = slot.grammar = 0
        slot.job = None
        slot.prompt = []
        slot.next_token = None
        slot.last_used = time.monotonic()
        self._end(job, item)

    # --- one step ------------------------------------------------------------------------

    def _step(self) -> None:
        """One llama_decode over every generating sequence plus prompt chunks."""
        batch = self._batch
        assert batch is not None
        batch.n_tokens = 0
        outputs: list[tuple[_Slot, int]] = []
        busy = [slot for slot in self._slots if slot.job is not None]
        for slot in busy:
            if slot.next_token is not None:
                outputs.append((slot, self._add(slot, slot.next_token, True)))
                slot.next_token = None
        room = self._config.batch_tokens - batch.n_tokens
        # The prompt budget goes to the shortest rest first: a short prompt's first token
        # never waits behind whole long prompts, and a long one still gets what is left.
        for slot in sorted((s for s in busy if s.prefilling),
                           key=lambda s: (len(s.prompt) - len(s.cached), s.admitted_at)):
            if room <= 0:
                break
            chunk = slot.prompt[len(slot.cached):len(slot.cached) + room]
            room -= len(chunk)
            last = len(slot.cached) + len(chunk) == len(slot.prompt)
            for index, token in enumerate(chunk):
                at = self._add(slot, token, last and index == len(chunk) - 1)
            if last:
                outputs.append((slot, at))
        if batch.n_tokens == 0:
            return
        status = llama_cpp.llama_decode(self._ctx, batch)
        self._progress.step_done()
        self._steps += 1
        if status != 0:
            log.warning("llama_decode failed (%d) on a batch of %d tokens", status,
                        batch.n_tokens)
            for slot in busy:
                self._truncate(slot, 0)
                self._release(slot, BackendUnavailable(
                    "the embedded engine failed to evaluate the request", retry_after=1.0))
            return
        self._held = []
        try:
            for slot, index in outputs:
                if slot.job is not None:
                    self._advance(slot, self._sample(slot, index))
        finally:
            self._send_held()

    def _add(self, slot: _Slot, token: int, logits: bool) -> int:
        """Append one token of the slot's sequence to the batch; its index there."""
        batch = self._batch
        assert batch is not None
        index = batch.n_tokens
        batch.token[index] = token
        batch.pos[index] = len(slot.cached)
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = slot.seq
        batch.logits[index] = logits
        batch.n_tokens = index + 1
        slot.cached.append(token)
        return index

    def _sample(self, slot: _Slot, index: int) -> int:
        """The slot's next token from the logits at `index` of the last batch."""
        if not slot.grammar:
            return llama_cpp.llama_sampler_sample(slot.chain, self._ctx, index)
        candidates = self._fill_candidates(index)
        llama_cpp.llama_sampler_apply(slot.chain, ctypes.byref(candidates))
        token = candidates.data[candidates.selected].id
        # Most tokens the chain picks are ones the grammar allows: check only that one.
        single = llama_cpp.llama_token_data(token, 1.0, 0.0)
        check = llama_cpp.llama_token_data_array(ctypes.pointer(single), 1, -1, False)
        llama_cpp.llama_sampler_apply(slot.grammar, ctypes.byref(check))
        if single.logit == -math.inf:
            token = self._resample(slot, index)
        llama_cpp.llama_sampler_accept(slot.grammar, token)
        llama_cpp.llama_sampler_accept(slot.chain, token)
        return token

    def _resample(self, slot: _Slot, index: int) -> int:
        """Sample among the tokens the grammar allows (the chain's pick was rejected).

        The grammar costs about as much per candidate as it is large, so it is applied to
        the most likely tokens first and to the whole vocabulary only when none of those
        fits: what lies beyond them has a vanishing share of the probability.
        """
        likely = self._fill_candidates(index)
        cut = llama_cpp.llama_sampler_init_top_k(_LIKELY_TOKENS)
        llama_cpp.llama_sampler_apply(cut, ctypes.byref(likely))
        llama_cpp.llama_sampler_free(cut)
        llama_cpp.llama_sampler_apply(slot.grammar, ctypes.byref(likely))
        likely.sorted = False  # the grammar set logits to -inf, keeping the flag
        allowed = np.ctypeslib.as_array(likely.data, shape=(likely.size,))["logit"]
        if np.isfinite(allowed).any():
            candidates = likely
        else:
            candidates = self._fill_candidates(index)
            llama_cpp.llama_sampler_apply(slot.grammar, ctypes.byref(candidates))
        llama_cpp.llama_sampler_apply(slot.chain, ctypes.byref(candidates))
        return candidates.data[candidates.selected].id

    def _fill_candidates(self, index: int) -> llama_cpp.llama_token_data_array:
        """Every token with its logit at `index` of the last batch, for a sampler to apply."""
        candidates, ids = self._candidates, self._token_ids
        assert candidates is not None and ids is not None
        logits = llama_cpp.llama_get_logits_ith(self._ctx, index)
        candidates["id"] = ids
        candidates["logit"] = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        candidates["p"] = 0.0
        data = candidates.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        return llama_cpp.llama_token_data_array(data, self._n_vocab, -1, False)

    def _advance(self, slot: _Slot, token: int) -> None:
        """Handle one sampled token: end of generation, text out, stop strings, budget."""
        job, decoder = slot.job, slot.decoder
        assert job is not None and decoder is not None
        if slot.first_at is None:
            slot.first_at = time.perf_counter()
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(slot, FinishReason.STOP, stopped=False)
            return
        slot.produced += 1
        slot.pending += decoder.decode(self._token_piece(token))
        end, stopped = split_on_stops(slot.pending, slot.stops)
        if end:
            self._send(job, slot.pending[:end])
            slot.pending = slot.pending[end:]
        if stopped:  # the stop string and whatever follows it are not sent
            self._finish(slot, FinishReason.STOP, stopped=True)
        elif slot.produced >= slot.budget:
            self._finish(slot, FinishReason.LENGTH, stopped=False)
        else:
            slot.next_token = token

    def _finish(self, slot: _Slot, reason: FinishReason, *, stopped: bool) -> None:
        job, decoder = slot.job, slot.decoder
        assert job is not None and decoder is not None
        if not stopped:
            # What was held back as a possible stop string start, and any partial character.
            tail = slot.pending + decoder.decode(b"", final=True)
            if tail:
                self._send(job, tail)
        ended = time.perf_counter()
        first_at = slot.first_at or ended
        self._release(slot, GenerationEnd(
            finish_reason=reason,
            usage=Usage(input_tokens=len(slot.prompt), output_tokens=slot.produced,
                        cached_input_tokens=slot.reused),
            # No call waits for a load: the model loads before the engine takes any job.
            timings=Timings(load=0.0, prompt_eval=first_at - slot.admitted_at,
                            eval=ended - first_at),
            model=self._model_name,
        ))

    def _token_piece(self, token: int) -> bytes:
        buffer = self._piece
        size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        if size < 0:  # a longer piece than the buffer: grow it once
            self._piece = buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0,
                                                  False)
        return buffer.raw[:size]

    # --- prompts and grammars ------------------------------------------------------------

    def _tokenize(self, text: str, add_bos: bool, *, special: bool = False) -> list[int]:
        """Text as tokens; `special` reads control tokens' texts (`<end_of_turn>`) as those
        tokens, which only the chat template's own text may do."""
        assert self._model is not None
        if not text:
            return [self._model.token_bos()] if add_bos else []
        return self._model.tokenize(text.encode(), add_bos=add_bos, special=special)

    def _prompt(self, request: GenerationRequest) -> _Prompt:
        """The tokens the model sees and the stop strings that go with them.

        What callers and tools wrote is tokenized as plain text: `<end_of_turn>` in a
        message is those characters, not a turn the caller forged. Only the template's own
        text (turn markers, BOS) is tokenized with control tokens: the conversation is
        rendered with a marker in place of each message's content, and the contents go in
        between the template's pieces as text.
        """
        stops = tuple(request.options.stop)
        if not request.is_chat:
            text = f"{request.system}\n\n{request.prompt}" if request.system else request.prompt
            return _Prompt(self._tokenize(text or "", add_bos=True), stops)
        messages = _chat_messages(request)
        if self._chat_template is None:
            # A base model without a template (the packaged Gemma 3 270M): Gemma's turns.
            messages = _fold_system(messages)
        marked = [{**message, "content": f"{_MARK_OPEN}{index}{_MARK_CLOSE}"}
                  for index, message in enumerate(messages)]
        try:
            if self._chat_template is not None:
                rendered = self._chat_template(messages=marked)
            else:
                rendered = llama_chat_format.format_gemma(messages=marked)
        except Exception as exc:  # any template failure is this request's alone
            raise BackendRejected(
                f"the model's chat template rejected the messages: {_clean(exc)}"
            ) from None
        pieces = _MARK.split(rendered.prompt)  # template, index, template, index, ...
        tokens = self._tokenize(pieces[0], add_bos=not rendered.added_special, special=True)
        for index, template_text in zip(pieces[1::2], pieces[2::2], strict=True):
            number = int(index)
            if number < len(messages):
                tokens += self._tokenize(messages[number]["content"], add_bos=False)
            tokens += self._tokenize(template_text, add_bos=False, special=True)
        extra = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        return _Prompt(tokens, stops + tuple(s for s in extra if s))

    def _grammar(self, request: GenerationRequest) -> Future[int] | None:
        """The compiled grammar for the format, or for the tool calls the request allows:
        cached per schema, built off this thread."""
        fmt = request.format
        tools = offered_tools(request)
        if tools:
            # A call of one of the tools, or (tool choice auto) text instead.
            forced = request.forces_tool_call
            key = ("tools-forced:" if forced else "tools:") + json.dumps(calls_schema(tools))
        elif fmt.kind is OutputFormat.TEXT:
            return None
        else:
            # The schema as given, keys unsorted: the grammar writes properties in the
            # schema's order (an agent's thought before its action), so key order makes
            # another grammar.
            key = "json" if fmt.kind is OutputFormat.JSON else json.dumps(fmt.json_schema)
        built = self._grammars.get(key)
        if built is not None:
            self._grammars.move_to_end(key)
            return built
        assert self._builders is not None
        built = self._builders.submit(self._build_grammar, key)
        built.add_done_callback(self._prepared)
        self._grammars[key] = built
        if len(self._grammars) > _GRAMMAR_CACHE_SIZE:
            self._retired.append(self._grammars.popitem(last=False)[1])
        return built

    def _free_retired(self) -> None:
        """Free the grammars out of the cache that no waiting job will clone any more."""
        awaited = {id(job.grammar) for job in self._waiting}
        for built in [b for b in self._retired if b.done() and id(b) not in awaited]:
            self._retired.remove(built)
            _free_grammar(built)

    def _prepared(self, _: Future[object]) -> None:
        """A prompt is tokenized or a grammar built: the scheduler may admit its job."""
        with self._lock:
            self._wake()

    def _build_grammar(self, key: str) -> int:
        """A grammar sampler (the prototype each job clones); on a builder thread."""
        self._building[key] = time.monotonic()
        try:
            return self._make_grammar(key)
        finally:
            self._building.pop(key, None)

    def _make_grammar(self, key: str) -> int:
        kind, _, schema = key.partition(":")
        what, field = ("the tools' schemas", TOOLS_FIELD) if kind.startswith("tools") else (
            "this JSON schema", FORMAT_SCHEMA_FIELD)
        if key == "json":
            text = llama_grammar.JSON_GBNF
        else:
            try:
                text = (grammar_for_tool_calls(schema, forced=kind == "tools-forced")
                        if kind.startswith("tools") else grammar_for_schema(key))
            except RecursionError:
                raise BackendRejected(
                    f"the embedded engine cannot enforce {what}: they have too many "
                    "parts for the grammar converter", field=field) from None
            except Exception as exc:  # the converter raises plain Exceptions
                raise BackendRejected(
                    f"the embedded engine cannot enforce {what}: {_clean(exc)}",
                    field=field) from None
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, text.encode(), b"root")
        if not sampler:  # llama.cpp could not parse it
            raise BackendRejected(f"the embedded engine cannot enforce {what}", field=field)
        return sampler


# --- helpers -----------------------------------------------------------------------------

def _sampler_chain(opts: SamplingOptions, n_vocab: int) -> int:
    """The job's sampler chain: what llama-cpp-python builds for the same options.

    The repeat penalty looks up every candidate it is given: over Gemma's 262k tokens that
    is most of a token's sampling time. A repeat penalty >= 1 only lowers the logits of the
    (at most `_PENALTY_LAST_N`) tokens it has seen, so the top k after the penalty are
    always among the top k + `_PENALTY_LAST_N` before it: cutting to those first gives the
    same token, for a tenth of the time.
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    greedy = opts.temperature <= 0
    # top_k 0 means no cut: here the requests' limit, which bounds the sort per token.
    keep = 1 if greedy else min(opts.top_k or TOP_K_MAX, TOP_K_MAX)
    parts = []
    if keep > 0 and opts.repeat_penalty >= 1:
        parts.append(llama_cpp.llama_sampler_init_top_k(keep + _PENALTY_LAST_N))
    parts.append(llama_cpp.llama_sampler_init_penalties(
        n_vocab, _PENALTY_LAST_N, opts.repeat_penalty, 0.0, 0.0))
    if greedy:
        parts.append(llama_cpp.llama_sampler_init_greedy())
    else:
        seed = random.randrange(_NO_SEED) if opts.seed is None else opts.seed % _NO_SEED
        parts += [
            llama_cpp.llama_sampler_init_top_k(keep),
            llama_cpp.llama_sampler_init_top_p(opts.top_p, 1),
            llama_cpp.llama_sampler_init_temp(opts.temperature),
            llama_cpp.llama_sampler_init_dist(seed),
        ]
    for part in parts:
        llama_cpp.llama_sampler_chain_add(chain, part)  # the chain owns its parts
    return chain


class _NodeCounter:
    """Progress inside a `llama_decode`: the graph nodes it has computed so far.

    ggml's CPU backend calls the context's abort callback after every graph node. The
    callback is libc's `sem_post` on a semaphore of our own, called straight from C: no
    Python, no GIL, so a slow step (a big model, a long prompt chunk) still shows progress
    to the watchdog, and the decoding threads never wait on Python. `sem_post` returns 0
    ("do not abort"); the count is folded into a total after each step, long before it could
    reach the semaphore's maximum.
    """

    _SEM_T_SIZE = 64  # at least sizeof(sem_t) (32 on 64-bit Linux)

    def __init__(self) -> None:
        self._sem = ctypes.create_string_buffer(self._SEM_T_SIZE)
        self._done = 0
        self._libc: ctypes.CDLL | None = None
        self._callback: object = None  # kept alive while the context may call it

    def attach(self, ctx: int) -> None:
        """Count `ctx`'s nodes; without a POSIX libc, only whole steps count."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            post = ctypes.cast(libc.sem_post, ctypes.c_void_p).value
        except (OSError, AttributeError):
            return
        if libc.sem_init(self._sem, 0, 0) != 0:
            return
        self._libc = libc
        self._callback = llama_cpp.ggml_abort_callback(post)
        llama_cpp.llama_set_abort_callback(ctx, self._callback, ctypes.cast(
            self._sem, ctypes.c_void_p))

    def current(self) -> int:
        """Nodes computed in the step under way (any thread may ask)."""
        if self._libc is None:
            return 0
        value = ctypes.c_int(0)
        self._libc.sem_getvalue(self._sem, ctypes.byref(value))
        return value.value

    def total(self) -> int:
        return self._done + self.current()

    def step_done(self) -> None:
        """On the scheduler thread, between steps (nothing posts now): fold the count."""
        if self._libc is not None:
            self._done += self.current()
            self._libc.sem_init(self._sem, 0, 0)


def _free_grammar(built: Future[int]) -> None:
    if built.done() and not built.cancelled() and built.exception() is None:
        llama_cpp.llama_sampler_free(built.result())


def _shutting_down() -> ShuttingDown:
    return ShuttingDown("the embedded engine is shutting down", retry_after=1.0)


def open_llama(path: Path, n_ctx: int, threads: int) -> llama_cpp.Llama:
    """A llama-cpp-python `Llama` as a plain single-stream user runs it (the benchmark)."""
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def _chat_messages(request: GenerationRequest) -> list[dict[str, str]]:
    """The chat as the template takes it. Gemma 3's template has no tool format: the tools
    are described in the system text, earlier calls written as the grammar has the model
    write them, and tool results told as user turns."""
    system = request.system
    if tools := offered_tools(request):
        instructions = tools_instructions(tools, request.forces_tool_call)
        system = f"{system}\n\n{instructions}" if system else instructions
    messages = [{"role": "system", "content": system}] if system else []
    names = call_names(request.messages)
    for message in request.messages:
        if message.images:
            raise BackendRejected("the embedded engine's model does not read images")
        content = message.content
        if message.role is Role.SYSTEM:
            role = "system"
        elif message.role is Role.ASSISTANT:
            role = "assistant"
            content = "\n".join([content, *map(call_text, message.tool_calls)]).strip()
        else:  # user turns and tool results: both are what the model is told
            role = "user"
            if message.role is Role.TOOL and message.tool_call_id:
                name = names.get(message.tool_call_id, "")
                content = f"Result of the {name} call {message.tool_call_id}:\n{content}"
        messages.append({"role": role, "content": content})
    return messages


def _fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Gemma has no system turn: put the system text at the start of the first user turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    turns = [m for m in messages if m["role"] != "system"]
    if not system:
        return turns
    for index, message in enumerate(turns):
        if message["role"] == "user":
            folded = {"role": "user", "content": f"{system}\n\n{message['content']}"}
            return [*turns[:index], folded, *turns[index + 1:]]
    return [{"role": "user", "content": system}, *turns]


def _token_text(model: _internals.LlamaModel, token: int) -> str:
    return model.token_get_text(token) if token >= 0 else ""


def _quantization(metadata: dict[str, str]) -> str:
    try:
        return _FILE_TYPES.get(int(metadata.get("general.file_type", "")), "")
    except ValueError:
        return ""


def _clean(message: object) -> str:
    """Short and single-line: fit for a client."""
    return " ".join(str(message).split())[:300]
