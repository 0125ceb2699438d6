"""Embeddings and token counts in the embedded engine's process (llama.cpp).

`Embedder` owns a llama.cpp context of its own on the engine's model (embeddings on), made
on the first Embed. Its steps run on the engine's scheduler thread between generation steps
(`Engine.attach`): each step is one `llama_decode` of at most `batch_tokens` tokens (a
quarter of that while generations run), texts packed together (one sequence each), so
generation never waits longer than one such step; while generations run, embeddings get
`side_share` of the thread's time, and all of it otherwise. A vector is the mean of the
text's final hidden states (llama.cpp's mean pooling, computed here from the per-token
embeddings so that a text longer than one step is carried over steps in the KV cache, the
way a prompt is), then normalized if asked.

Tokenizing (for Embed, and CountTokens) runs on one thread of its own: a large text never
holds up the scheduler or the reader of the parent's commands. Texts are tokenized as text
(special tokens not parsed: a caller's "<start_of_turn>" is just characters); a chat is
counted as Generate sends it, the model's chat template applied.

The child's command loop hands it two message kinds (`COMMANDS`): ("embed", job_id,
EmbeddingRequest) and ("count", job_id, TokenCountRequest); each job ends with one item
through the sink: an EmbeddingResult, a TokenCount, or an error.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from agentloop.backends.llama_engine import Engine
from agentloop.domain import (
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    ModelInfo,
    SamplingOptions,
    TokenCount,
    TokenCountRequest,
)
from agentloop.errors import (
    AgentLoopError,
    BackendProtocolError,
    BackendUnavailable,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ShuttingDown,
    Unimplemented,
)

log = logging.getLogger(__name__)

#: The commands of the parent this module serves (engine_child routes them here).
COMMANDS = ("embed", "count")
TOKENIZER_THREAD_NAME = "agentloop-tokenizer"
#: Texts embedded at once (sequences of the embedding context).
MAX_SEQUENCES = 64
#: While generations run, an embedding step takes this fraction of batch_tokens: every
#: token of an embedding context costs its logits too (llama.cpp computes them for every
#: token it embeds), so a full step would hold the streams up several times longer than a
#: generation step of as many tokens.
SHARED_STEP_DIVISOR = 4

Sink = Callable[[int, object], None]


def with_embedding_facts(info: ModelInfo, engine: Engine) -> ModelInfo:
    """ListModels' facts: the model embeds (a causal model: see `Embedder`) and how long
    its vectors are."""
    if not _causal(engine):
        return info
    return dataclasses.replace(info, embeds=True, embedding_dimensions=engine.model.n_embd())


def _causal(engine: Engine) -> bool:
    """Mean pooling carried over steps needs causal attention: an encoder-style embedding
    model (`<arch>.attention.causal` false) must see the whole text in one step."""
    metadata = engine.model.metadata()
    arch = metadata.get("general.architecture", "")
    return metadata.get(f"{arch}.attention.causal", "true").lower() != "false"


@dataclass(eq=False)
class _EmbedJob:
    job_id: int
    request: EmbeddingRequest
    tokens: list[list[int]]
    vectors: list[np.ndarray | None]
    next_text: int = 0  # the first text not started yet
    left: int = 0  # texts without their vector yet
    cancelled: bool = False
    ended: bool = False

    def expired(self, now: float) -> AgentLoopError | None:
        if self.cancelled:
            return Cancelled("the embedding was cancelled")
        deadline = self.request.deadline
        if deadline is not None and now > deadline:
            return DeadlineExceeded("the deadline passed before the embedding ended")
        return None


@dataclass(eq=False)
class _Sequence:
    """One text being embedded: its place in the KV cache and its running sum."""

    job: _EmbedJob
    index: int
    seq: int
    tokens: list[int]
    done: int = 0
    total: np.ndarray = field(default_factory=lambda: np.zeros(0))


class Embedder:
    """Embeds on a context of its own, in steps the engine's scheduler interleaves."""

    def __init__(self, engine: Engine, sink: Sink) -> None:
        self._engine = engine
        self._sink = sink
        config = engine.config
        self._step_tokens = config.batch_tokens
        self._share = config.side_share
        self._limit = engine.context_size  # tokens one text may have
        self._n_embd = engine.model.n_embd()
        self._causal = _causal(engine)
        self._lock = threading.Lock()
        self._ready: collections.deque[_EmbedJob] = collections.deque()  # tokenized
        self._jobs: dict[int, _EmbedJob] = {}  # every embed job without its end
        self._active: list[_Sequence] = []  # scheduler thread only
        self._free_seqs = list(range(MAX_SEQUENCES - 1, -1, -1))
        self._cells = 0  # KV cells the active sequences hold (their whole texts)
        self._ctx: int | None = None  # llama_context*, made on the first embed
        self._batch: llama_cpp.llama_batch | None = None
        self._next_allowed = 0.0
        self._tokenizer = ThreadPoolExecutor(1, thread_name_prefix=TOKENIZER_THREAD_NAME)
        self._tokenizing: set[int] = set()  # jobs queued for the tokenizer
        self._cancelled: set[int] = set()  # of those, the ones cancelled meanwhile

    # --- commands (the child's reader thread) --------------------------------------------

    def handle(self, message: tuple[object, ...]) -> None:
        """An ("embed" | "count", job_id, request) command: tokenized on the tokenizer thread."""
        kind, job_id, request = message
        assert isinstance(job_id, int)
        if kind == "embed" and isinstance(request, EmbeddingRequest):
            self._queue(job_id, functools.partial(self._tokenize_job, job_id, request))
        elif kind == "count" and isinstance(request, TokenCountRequest):
            self._queue(job_id, functools.partial(self._count, job_id, request))
        else:
            self._end(job_id, BackendProtocolError("the embedded engine got a bad command"))

    def _queue(self, job_id: int, work: Callable[[], None]) -> None:
        with self._lock:
            self._tokenizing.add(job_id)
        self._tokenizer.submit(work)

    def cancel(self, job_id: int) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                job.cancelled = True
            elif job_id in self._tokenizing:
                self._cancelled.add(job_id)
        self._engine.wake()

    # --- the tokenizer thread ------------------------------------------------------------

    def _tokenize_job(self, job_id: int, request: EmbeddingRequest) -> None:
        with self._lock:
            self._tokenizing.discard(job_id)
            cancelled = job_id in self._cancelled
            self._cancelled.discard(job_id)
        if cancelled:
            self._end(job_id, Cancelled("the embedding was cancelled"))
            return
        try:
            job = self._embed_job(job_id, request)
        except AgentLoopError as exc:
            self._end(job_id, exc)
            return
        except Exception:
            log.exception("tokenizing an embedding request failed")
            self._end(job_id, BackendProtocolError("the embedded engine failed"))
            return
        with self._lock:
            self._jobs[job_id] = job
            self._ready.append(job)
        self._engine.wake()

    def _embed_job(self, job_id: int, request: EmbeddingRequest) -> _EmbedJob:
        if not self._causal:
            raise Unimplemented("the embedded engine embeds with causal models only; this "
                                "model's attention is not causal")
        if request.dimensions is not None and request.dimensions != self._n_embd:
            raise InvalidArgument([("dimensions", f"the model has no shorter vectors (not a "
                                                  f"Matryoshka model): its vectors have "
                                                  f"{self._n_embd} dimensions")])
        tokens = [self._text_tokens(text) for text in request.texts]
        too_long = [(f"texts[{index}]", f"{len(ids)} tokens; the model's context holds "
                                        f"{self._limit} (set truncate to cut it)")
                    for index, ids in enumerate(tokens) if len(ids) > self._limit]
        if too_long and not request.truncate:
            raise InvalidArgument(too_long)
        tokens = [ids[:self._limit] for ids in tokens]
        return _EmbedJob(job_id, request, tokens, [None] * len(tokens), left=len(tokens))

    def _text_tokens(self, text: str) -> list[int]:
        return self._engine.model.tokenize(text.encode(), add_bos=True, special=False)

    def _count(self, job_id: int, request: TokenCountRequest) -> None:
        with self._lock:
            self._tokenizing.discard(job_id)
            self._cancelled.discard(job_id)  # a count is quick: it ends either way
        try:
            if request.texts:
                counts = tuple(len(self._text_tokens(text)) for text in request.texts)
            else:
                chat = GenerationRequest(model=request.model, options=_COUNTING,
                                         messages=request.messages, system=request.system)
                counts = (len(self._engine.prompt_tokens(chat)),)
        except AgentLoopError as exc:
            self._end(job_id, exc)
            return
        except Exception:
            log.exception("counting tokens failed")
            self._end(job_id, BackendProtocolError("the embedded engine failed"))
            return
        self._end(job_id, TokenCount(counts=counts, context_length=self._limit,
                                     model=self._engine.model_name))

    # --- the scheduler thread ------------------------------------------------------------

    def step(self, generating: bool) -> bool:
        """One decode of up to `batch_tokens` tokens of the texts under way; while
        generations run, only once the share allows it."""
        if not self._active and not self._ready:
            return False
        if generating and time.perf_counter() < self._next_allowed:
            return False
        started = time.perf_counter()
        try:
            self._drop_ended(time.monotonic())
            # Beside generations, shorter steps: a stream waits for one of them at most.
            decoded = self._decode_step(self._step_tokens // SHARED_STEP_DIVISOR
                                        if generating else self._step_tokens)
        except Exception:
            log.exception("an embedding step failed")
            self._fail_active(BackendProtocolError("the embedded engine failed"))
            decoded = False
        ended = time.perf_counter()
        self._next_allowed = ended + (ended - started) * (1 - self._share) / self._share
        return decoded

    def _drop_ended(self, now: float) -> None:
        """Cancelled jobs and jobs past their deadline end now and free their sequences."""
        with self._lock:
            jobs = [job for job in self._jobs.values() if job.expired(now) is not None]
        for job in jobs:
            error = job.expired(now)
            assert error is not None
            self._finish_job(job, error)

    def _decode_step(self, room: int) -> bool:
        """Decode up to `room` tokens of the texts under way (started in order)."""
        self._admit()
        if not self._active:
            return False
        ctx, batch = self._context()
        batch.n_tokens = 0
        chunks: list[tuple[_Sequence, int, int]] = []  # sequence, first row, rows
        room = max(1, room)
        for sequence in self._active:
            if room <= 0:
                break
            chunk = sequence.tokens[sequence.done:sequence.done + room]
            first = batch.n_tokens
            for offset, token in enumerate(chunk):
                index = batch.n_tokens
                batch.token[index] = token
                batch.pos[index] = sequence.done + offset
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = sequence.seq
                batch.logits[index] = True
                batch.n_tokens = index + 1
            chunks.append((sequence, first, len(chunk)))
            room -= len(chunk)
        status = llama_cpp.llama_decode(ctx, batch)
        if status != 0:
            log.warning("llama_decode failed (%d) on an embedding batch of %d tokens", status,
                        batch.n_tokens)
            self._fail_active(BackendUnavailable(
                "the embedded engine failed to embed the texts", retry_after=1.0))
            return True
        rows = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings(ctx),
                                     shape=(batch.n_tokens, self._n_embd))
        for sequence, first, count in chunks:
            sequence.total += rows[first:first + count].sum(axis=0, dtype=np.float64)
            sequence.done += count
            if sequence.done == len(sequence.tokens):
                self._text_done(sequence)
        return True

    def _admit(self) -> None:
        """Start the waiting texts, first come first served, while sequences and KV cells
        last (a text holds its whole length of cells until its vector is out)."""
        while self._free_seqs:
            with self._lock:
                job = self._ready[0] if self._ready else None
            if job is None:
                return
            if job.next_text == len(job.tokens):
                with self._lock:
                    self._ready.popleft()
                continue
            tokens = job.tokens[job.next_text]
            if self._cells + len(tokens) > self._limit and self._active:
                return
            sequence = _Sequence(job, job.next_text, self._free_seqs.pop(), tokens,
                                 total=np.zeros(self._n_embd, dtype=np.float64))
            job.next_text += 1
            self._cells += len(tokens)
            self._active.append(sequence)

    def _text_done(self, sequence: _Sequence) -> None:
        job = sequence.job
        vector = sequence.total / max(1, len(sequence.tokens))
        if job.request.normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        job.vectors[sequence.index] = vector
        job.left -= 1
        self._release(sequence)
        if job.left == 0:
            result = EmbeddingResult(
                vectors=tuple(tuple(v.astype(np.float32).tolist()) for v in job.vectors
                              if v is not None),
                model=self._engine.model_name,
                input_tokens=sum(len(ids) for ids in job.tokens))
            self._finish_job(job, result)

    def _release(self, sequence: _Sequence) -> None:
        if sequence in self._active:
            self._active.remove(sequence)
            self._cells -= len(sequence.tokens)
            if self._ctx is not None:
                llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx),
                                              sequence.seq, -1, -1)
            self._free_seqs.append(sequence.seq)

    def _finish_job(self, job: _EmbedJob, item: object) -> None:
        for sequence in [s for s in self._active if s.job is job]:
            self._release(sequence)
        with self._lock:
            self._jobs.pop(job.job_id, None)
            if job in self._ready:
                self._ready.remove(job)
        if not job.ended:
            job.ended = True
            self._end(job.job_id, item)

    def _fail_active(self, error: AgentLoopError) -> None:
        for job in {id(s.job): s.job for s in self._active}.values():
            self._finish_job(job, error)
        if self._ctx is not None:  # what the cache holds is no longer known to be right
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)

    def _context(self) -> tuple[int, llama_cpp.llama_batch]:
        """The embedding context (made on first use) and its batch."""
        if self._ctx is None or self._batch is None:
            config = self._engine.config
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = self._limit
            params.n_batch = params.n_ubatch = self._step_tokens
            params.n_seq_max = MAX_SEQUENCES
            params.n_threads = params.n_threads_batch = config.threads
            params.embeddings = True
            # Mean pooling is done here, over steps (see the module's docstring).
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
            params.kv_unified = True  # one pool of cells for all the texts
            params.no_perf = True
            ctx = llama_cpp.llama_init_from_model(self._engine.model.model, params)
            if not ctx:
                raise BackendUnavailable("the embedded engine cannot make an embedding context",
                                         retry_after=1.0)
            self._ctx = ctx
            self._batch = llama_cpp.llama_batch_init(self._step_tokens, 0, 1)
            log.info("embedding context: %d tokens, %d-token steps, %d texts at once",
                     self._limit, self._step_tokens, MAX_SEQUENCES)
        return self._ctx, self._batch

    # --- the end -------------------------------------------------------------------------

    def close(self) -> None:
        """Called by Engine.close once the scheduler has stopped: fail what is left."""
        self._tokenizer.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            jobs = list(self._jobs.values())
            never_tokenized = list(self._tokenizing)  # their work was cancelled unrun
            self._tokenizing.clear()
        shutting_down = ShuttingDown("the embedded engine is shutting down", retry_after=1.0)
        for job in jobs:
            self._finish_job(job, shutting_down)
        for job_id in never_tokenized:
            self._end(job_id, shutting_down)
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def _end(self, job_id: int, item: object) -> None:
        try:
            self._sink(job_id, item)
        except Exception:  # a broken sink must not take the engine down
            log.exception("the embedder's sink failed for job %d", job_id)


#: Options of the GenerationRequest a chat is counted through: only its prompt is used.
_COUNTING = SamplingOptions(temperature=0.0, top_p=1.0, top_k=0, max_tokens=1,
                            repeat_penalty=1.0, num_ctx=1)
