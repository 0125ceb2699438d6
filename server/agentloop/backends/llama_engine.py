"""The llama.cpp engine: a synchronous, thread-based generator with no asyncio and no gRPC.

`Engine` loads one GGUF, renders prompts (the GGUF's chat template, else Gemma's turns),
builds grammars for JSON output and runs the submitted jobs on one scheduler thread.
Everything it reports goes through the job's sink: text deltas (stop strings already cut),
then exactly one terminal item, a `GenerationEnd` or an `AgentLoopError`.
"""

from __future__ import annotations

import codecs
import collections
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
from llama_cpp import llama_chat_format, llama_grammar

from agentloop.config import SettingsError
from agentloop.domain import (
    FinishReason,
    GenerationEnd,
    GenerationRequest,
    ModelInfo,
    OutputFormat,
    ResponseFormat,
    Role,
    Timings,
    Usage,
)
from agentloop.errors import (
    AgentLoopError,
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
    Cancelled,
    DeadlineExceeded,
    ShuttingDown,
)

log = logging.getLogger(__name__)

SCHEDULER_THREAD_NAME = "agentloop-engine"
# llama.cpp's file types (enum llama_ftype) for the quantizations people actually use.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}
_GRAMMAR_CACHE_SIZE = 32
_NO_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp picks a random seed

Sink = Callable[[int, object], None]


@dataclass(frozen=True)
class EngineConfig:
    model_path: str  # the GGUF file (already assembled)
    n_ctx: int  # context per slot (tokens); capped to the model's training context
    slots: int  # sequences decoded together (1 = serial)
    threads: int
    prefix_reuse: bool = True
    batch_tokens: int = 512  # tokens per llama_decode step (prompt chunks + running sequences)


@dataclass(frozen=True)
class EngineStats:
    """Load signals, cheap to compute."""

    slots: int
    slots_in_use: int
    running: int
    waiting: int
    cache_tokens: int
    cache_capacity: int


# --- stop strings ------------------------------------------------------------------------

def split_on_stops(pending: str, stops: Sequence[str]) -> tuple[int, bool]:
    """How much of the unsent text may go out now, and whether a stop string was found.

    Returns (end, stopped): send `pending[:end]`. With `stopped`, `end` is where the first
    stop string begins; otherwise the text after `end` is a possible start of a stop string
    and waits for the next token.
    """
    if not stops:
        return len(pending), False
    found = [index for index in (pending.find(stop) for stop in stops) if index >= 0]
    if found:
        return min(found), True
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(pending)), hold, -1):
            if pending.endswith(stop[:size]):
                hold = size
                break
    return len(pending) - hold, False


# --- jobs --------------------------------------------------------------------------------

@dataclass(eq=False)
class _Job:
    job_id: int
    request: GenerationRequest
    sink: Sink
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: bool = False

    def send(self, item: object) -> None:
        if self.ended:
            return
        if not isinstance(item, str):
            self.ended = True
        try:
            self.sink(self.job_id, item)
        except Exception:  # a broken sink must not take the engine down
            log.exception("the engine's sink failed for job %d", self.job_id)


@dataclass
class _Prompt:
    tokens: list[int]
    stops: tuple[str, ...]


class Engine:
    """One GGUF on llama.cpp; jobs run on the scheduler thread, one at a time."""

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._path = Path(config.model_path)
        from agentloop.backends.embedded import model_name_for  # embedded imports this module

        self._model = model_name_for(self._path)
        self._llama: llama_cpp.Llama | None = None
        self._chat_template: llama_chat_format.Jinja2ChatFormatter | None = None
        self._grammars: collections.OrderedDict[str, llama_grammar.LlamaGrammar] = (
            collections.OrderedDict())
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._jobs: dict[int, _Job] = {}
        self._jobs_lock = threading.Lock()
        self._running: _Job | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._load_seconds = 0.0
        self._load_reported = False

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def context_size(self) -> int:
        llama = self._llama
        return llama.n_ctx() if llama is not None else 0

    # --- lifecycle -----------------------------------------------------------------------

    def load(self) -> ModelInfo:
        """Load the model and start the scheduler thread (raises SettingsError)."""
        path, config = self._path, self._config
        if not path.is_file():
            raise SettingsError(f"--gguf / AGENTLOOP_GGUF: no file at {path}")
        started = time.monotonic()
        try:
            llama = open_llama(path, config.n_ctx, config.threads)
            trained = llama._model.n_ctx_train()
            if 0 < trained < llama.n_ctx():
                # Never run past the context the model was trained on.
                llama.close()
                llama = open_llama(path, trained, config.threads)
        except (ValueError, RuntimeError, OSError) as exc:
            raise SettingsError(f"--gguf / AGENTLOOP_GGUF: cannot load {path}: {exc}") from None
        self._load_seconds = time.monotonic() - started
        metadata = llama.metadata
        template = metadata.get("tokenizer.chat_template")
        if template:
            self._chat_template = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=_token_text(llama, llama.token_eos()),
                bos_token=_token_text(llama, llama.token_bos()),
            )
        self._llama = llama
        stat = path.stat()
        info = ModelInfo(
            name=self._model,
            size_bytes=stat.st_size,
            loaded=True,
            family=metadata.get("general.architecture", ""),
            parameter_size=metadata.get("general.size_label", ""),
            quantization_level=_quantization(metadata),
            modified_at=stat.st_mtime,
        )
        self._thread = threading.Thread(target=self._schedule, name=SCHEDULER_THREAD_NAME,
                                        daemon=True)
        self._thread.start()
        log.info("llama engine: loaded %s (%s, context %d tokens, %d threads) in %.2fs",
                 self._model, info.quantization_level or "unknown quantization",
                 llama.n_ctx(), config.threads, self._load_seconds)
        return info

    def close(self) -> None:
        """Stop every job (each gets its terminal item), join the threads, free the model."""
        with self._jobs_lock:
            self._closed = True
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancelled.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for job in jobs:  # those that never reached the scheduler
            self._finish(job, ShuttingDown("the embedded engine is shutting down",
                                           retry_after=1.0))
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    # --- jobs ----------------------------------------------------------------------------

    def submit(self, job_id: int, request: GenerationRequest, sink: Sink) -> None:
        """Queue a job; never blocks. Its items arrive through `sink` on engine threads."""
        job = _Job(job_id, request, sink)
        with self._jobs_lock:
            if self._closed or self._llama is None:
                job.send(BackendUnavailable("the embedded engine is not loaded",
                                            retry_after=1.0))
                return
            self._jobs[job_id] = job
        self._queue.put(job)

    def cancel(self, job_id: int) -> None:
        """Stop the job at the next token; it ends with `Cancelled`."""
        with self._jobs_lock:
            job = self._jobs.get(job_id)
        if job is not None:
            job.cancelled.set()

    def stats(self) -> EngineStats:
        with self._jobs_lock:
            total = len(self._jobs)
        running = 1 if self._running is not None else 0
        llama = self._llama
        return EngineStats(
            slots=1, slots_in_use=running, running=running, waiting=total - running,
            cache_tokens=llama.n_tokens if llama is not None else 0,
            cache_capacity=llama.n_ctx() if llama is not None else 0,
        )

    def _finish(self, job: _Job, item: object) -> None:
        with self._jobs_lock:
            self._jobs.pop(job.job_id, None)
        job.send(item)

    # --- the scheduler thread ------------------------------------------------------------

    def _schedule(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._closed:
                self._finish(job, ShuttingDown("the embedded engine is shutting down",
                                               retry_after=1.0))
                continue
            if job.cancelled.is_set():
                self._finish(job, Cancelled("the generation was cancelled"))
                continue
            self._running = job
            try:
                item: object = self._generate(job)
            except AgentLoopError as exc:
                item = exc
            except RuntimeError as exc:  # llama_decode and friends failed
                log.warning("llama engine failed: %s", exc)
                item = BackendUnavailable("the embedded engine failed to evaluate the request",
                                          retry_after=1.0)
            except Exception:
                log.exception("llama engine failed")
                item = BackendProtocolError("the embedded engine failed")
            finally:
                self._running = None
            self._finish(job, item)

    def _generate(self, job: _Job) -> GenerationEnd | AgentLoopError:
        llama = self._llama
        assert llama is not None
        request, opts = job.request, job.request.options
        load = 0.0 if self._load_reported else self._load_seconds
        self._load_reported = True
        started = time.perf_counter()
        prompt = self._prompt(request)
        n_ctx = llama.n_ctx()
        if len(prompt.tokens) >= n_ctx:
            raise BackendRejected(
                f"the prompt is {len(prompt.tokens)} tokens; the embedded engine's context "
                f"holds {n_ctx}",
                metadata={"model": self._model},
            )
        budget = min(opts.max_tokens, n_ctx - len(prompt.tokens))
        grammar = self._grammar(request.format)
        seed = random.randrange(_NO_SEED) if opts.seed is None else opts.seed % _NO_SEED
        llama.set_seed(seed)
        llama.reset()
        vocab = llama._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        produced = 0
        stopped = False
        finish = FinishReason.LENGTH
        first_at: float | None = None
        tokens = llama.generate(
            prompt.tokens, top_k=opts.top_k, top_p=opts.top_p, min_p=0.0,
            temp=opts.temperature, repeat_penalty=opts.repeat_penalty, grammar=grammar,
        )
        try:
            for token in tokens:
                if first_at is None:
                    first_at = time.perf_counter()
                if job.cancelled.is_set():
                    if self._closed:
                        return ShuttingDown("the embedded engine is shutting down",
                                            retry_after=1.0)
                    return Cancelled("the generation was cancelled")
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = FinishReason.STOP
                    break
                produced += 1
                pending += decoder.decode(llama.detokenize([token]))
                end, stopped = split_on_stops(pending, prompt.stops)
                if end:
                    job.send(pending[:end])
                    pending = pending[end:]
                if stopped:
                    finish = FinishReason.STOP
                    break
                if produced >= budget:
                    break
                if request.deadline is not None and time.monotonic() > request.deadline:
                    return DeadlineExceeded("the deadline passed during generation")
        finally:
            tokens.close()
        if not stopped:
            tail = pending + decoder.decode(b"", final=True)
            if tail:
                job.send(tail)
        ended = time.perf_counter()
        first_at = first_at or ended
        return GenerationEnd(
            finish_reason=finish,
            usage=Usage(input_tokens=len(prompt.tokens), output_tokens=produced),
            timings=Timings(load=load, prompt_eval=first_at - started, eval=ended - first_at),
            model=self._model,
        )

    # --- prompts and grammars ------------------------------------------------------------

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        llama = self._llama
        assert llama is not None
        return llama.tokenize(text.encode(), add_bos=add_bos, special=True)

    def _prompt(self, request: GenerationRequest) -> _Prompt:
        """The tokens the model sees and the stop strings that go with them."""
        stops = tuple(request.options.stop)
        if not request.is_chat:
            text = f"{request.system}\n\n{request.prompt}" if request.system else request.prompt
            return _Prompt(self._tokenize(text or "", add_bos=True), stops)
        messages = _chat_messages(request)
        try:
            if self._chat_template is not None:
                rendered = self._chat_template(messages=messages)
            else:
                # A base model without a template (the packaged Gemma 3 270M): Gemma's turns.
                rendered = llama_chat_format.format_gemma(messages=_fold_system(messages))
        except ValueError as exc:  # the template refused the conversation
            raise BackendRejected(
                f"the model's chat template rejected the messages: {_clean(exc)}"
            ) from None
        extra = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        tokens = self._tokenize(rendered.prompt, add_bos=not rendered.added_special)
        return _Prompt(tokens, stops + tuple(s for s in extra if s))

    def _grammar(self, fmt: ResponseFormat) -> llama_grammar.LlamaGrammar | None:
        """The grammar that constrains decoding to the format (cached per schema)."""
        if fmt.kind is OutputFormat.TEXT:
            return None
        llama = self._llama
        assert llama is not None
        key = "json" if fmt.kind is OutputFormat.JSON else json.dumps(
            fmt.json_schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is not None:
            self._grammars.move_to_end(key)
            return grammar
        if fmt.kind is OutputFormat.JSON:
            grammar = llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF,
                                                             verbose=False)
        else:
            try:
                grammar = llama_grammar.LlamaGrammar.from_json_schema(key, verbose=False)
            except Exception as exc:  # the converter raises plain Exceptions
                raise BackendRejected(
                    f"the embedded engine cannot enforce this JSON schema: {_clean(exc)}"
                ) from None
        # An invalid grammar would make llama.cpp hand back a null sampler: check it once.
        sampler = llama_cpp.llama_sampler_init_grammar(
            llama._model.vocab, grammar._grammar.encode(), grammar._root.encode())
        if not sampler:
            raise BackendRejected("the embedded engine cannot enforce this JSON schema")
        llama_cpp.llama_sampler_free(sampler)
        self._grammars[key] = grammar
        if len(self._grammars) > _GRAMMAR_CACHE_SIZE:
            self._grammars.popitem(last=False)
        return grammar


# --- helpers -----------------------------------------------------------------------------

def open_llama(path: Path, n_ctx: int, threads: int) -> llama_cpp.Llama:
    """A llama.cpp model and context as the serial engine runs them (the benchmark too)."""
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def _chat_messages(request: GenerationRequest) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": request.system}] if request.system else []
    for message in request.messages:
        if message.images:
            raise BackendRejected("the embedded engine's model does not read images")
        if message.role is Role.SYSTEM:
            role = "system"
        elif message.role is Role.ASSISTANT:
            role = "assistant"
        else:  # user turns and tool results: both are what the model is told
            role = "user"
        messages.append({"role": role, "content": message.content})
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


def _token_text(llama: llama_cpp.Llama, token: int) -> str:
    return llama._model.token_get_text(token) if token >= 0 else ""


def _quantization(metadata: dict[str, str]) -> str:
    try:
        return _FILE_TYPES.get(int(metadata.get("general.file_type", "")), "")
    except ValueError:
        return ""


def _clean(message: object) -> str:
    """Short and single-line: fit for a client."""
    return " ".join(str(message).split())[:300]
