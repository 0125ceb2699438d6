"""The embedded engine's own process: `python -m agentloop.backends.engine_child FD PID`.

`EmbeddedBackend` (the parent, PID) starts this module with one end of a socket pair as FD
and reads the child's stdout and stderr (merged) as llama.cpp's raw output. Everything else
travels over the socket as frames: a 4-byte big-endian length, then a pickled list of
messages (the two ends are the same code base, so pickle is safe here and carries the
domain types as they are).

parent -> child: ("start", EngineConfig, heartbeat seconds, log level), then
                 ("submit", job_id, GenerationRequest), ("embed", job_id, EmbeddingRequest),
                 ("count", job_id, TokenCountRequest), ("cancel", job_id), ("close",)
child -> parent: ("beat",) while loading; ("ready", ModelInfo, context size) or
                 ("failed", message) after the load, then
                 ("item", job_id, item), ("stats", EngineStats, progress), ("log", ...)

An item is a text delta (str), a GenerationEnd, an EmbeddingResult or a TokenCount (the
one item of an embed or count job: llama_embedder), or an encoded error (`encode_error`). The
engine's sinks only put messages on a queue; one writer thread sends whatever piled up as
one frame, so a slow parent never blocks a decoding step. A heartbeat thread sends the
engine's stats every `heartbeat` seconds with a progress count (items sent plus decode
steps): the parent's watchdog reads silence or a standstill as a hang. The child ends when
told to close or when the socket reaches end of file (the parent is gone); it ignores
SIGINT and SIGTERM, so a Ctrl-C in a terminal or a SIGTERM to the process group stops the
parent, which then closes the engine in order.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import queue
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

from agentloop.errors import AgentLoopError, BackendProtocolError

_HEADER = struct.Struct(">I")
#: Raw output lines (stdout and stderr: llama.cpp, ggml, Python's last words) are logged
#: by the parent under this logger at debug level.
RAW_OUTPUT_LOGGER = "agentloop.engine.output"

Message = tuple[Any, ...]


# --- framing (both sides) ------------------------------------------------------------------

def encode_frame(messages: list[Message]) -> bytes:
    body = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def frame_size(header: bytes) -> int:
    return int(_HEADER.unpack(header)[0])


def decode_frame(body: bytes) -> list[Message]:
    return pickle.loads(body)


HEADER_SIZE = _HEADER.size


def encode_error(exc: BaseException) -> tuple[str, type[AgentLoopError], str, dict[str, Any]]:
    """An engine error as plain data: pickling the exception itself would call its
    constructor with the message alone, which several error classes do not take."""
    if not isinstance(exc, AgentLoopError):
        exc = BackendProtocolError("the embedded engine failed")
    return ("error", type(exc), exc.message, dict(vars(exc)))


def decode_error(encoded: tuple[str, type[AgentLoopError], str, dict[str, Any]]
                 ) -> AgentLoopError:
    _, kind, message, state = encoded
    error = kind.__new__(kind)
    Exception.__init__(error, message)
    vars(error).update(state)
    return error


# --- the child -----------------------------------------------------------------------------

class _Channel:
    """The child's end of the socket: blocking reads on one thread, frames out on another."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._outbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="engine-child-writer",
                                        daemon=True)
        self._writer.start()
        self.sent_items = 0

    def receive(self) -> Message | None:
        """The next message from the parent; None at end of file (the parent is gone)."""
        header = self._file.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            return None
        [message] = decode_frame(self._file.read(frame_size(header)))
        return message

    def post(self, message: Message) -> None:
        """Queue a message for the writer thread; never blocks."""
        self._outbox.put(message)

    def close(self) -> None:
        """Send what is queued, then stop the writer."""
        self._outbox.put(None)
        self._writer.join()
        self._sock.close()

    def _write(self) -> None:
        while True:
            first = self._outbox.get()
            batch = [] if first is None else [first]
            done = first is None
            while not done:  # everything that piled up goes out as one frame
                try:
                    following = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if following is None:
                    done = True
                else:
                    batch.append(following)
            if batch:
                self.sent_items += sum(1 for message in batch if message[0] == "item")
                try:
                    self._sock.sendall(encode_frame(batch))
                except OSError:  # the parent is gone: nobody listens any more
                    return
            if done:
                return


class _LogRelay(logging.Handler):
    """Python log records go to the parent's logger. Only the agentloop code's records keep
    their level; llama-cpp-python's and the like arrive at debug."""

    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelno if record.name.startswith("agentloop") else logging.DEBUG
            text = record.getMessage()
            if record.exc_info:  # the traceback stays with its line
                text = f"{text}\n{logging.Formatter().formatException(record.exc_info)}"
            self._channel.post(("log", level, record.name, text, record.pathname,
                                record.lineno, record.funcName))
        except Exception:  # a log line must never take the engine down
            self.handleError(record)


def _sink_for(channel: _Channel) -> Callable[[int, object], None]:
    def sink(job_id: int, item: object) -> None:
        if isinstance(item, BaseException):
            item = encode_error(item)
        channel.post(("item", job_id, item))
    return sink


def _heartbeat(engine: Any, loaded: threading.Event, channel: _Channel, every: float,
               stop: threading.Event) -> None:
    """A beat while the model loads, then the engine's stats with a progress count."""
    while not stop.wait(every):
        if not loaded.is_set():
            channel.post(("beat",))
            continue
        try:
            stats = engine.stats()
        except Exception:  # stats are advisory: skip a beat rather than die
            continue
        progress = channel.sent_items + stats.steps
        channel.post(("stats", stats, progress))


def serve(sock: socket.socket) -> int:
    """Load the engine, run the parent's commands until close or end of file."""
    channel = _Channel(sock)
    start = channel.receive()
    if start is None or start[0] != "start":
        channel.close()
        return 2
    _, config, heartbeat, log_level = start
    root = logging.getLogger()
    root.handlers[:] = [_LogRelay(channel)]
    root.setLevel(log_level)

    from agentloop.backends.llama_engine import Engine
    from agentloop.config import SettingsError

    engine = Engine(config)
    loaded, stop = threading.Event(), threading.Event()
    beats = threading.Thread(target=_heartbeat, args=(engine, loaded, channel, heartbeat, stop),
                             name="engine-child-heartbeat", daemon=True)
    beats.start()
    try:
        info = engine.load()
    except SettingsError as exc:
        stop.set()
        beats.join()
        channel.post(("failed", str(exc)))
        channel.close()
        return 2
    sink = _sink_for(channel)
    # Embed and CountTokens: their commands, steps and tokenizer live in llama_embedder.
    from agentloop.backends import llama_embedder

    embedder = llama_embedder.Embedder(engine, sink)
    engine.attach(embedder)
    channel.post(("ready", llama_embedder.with_embedding_facts(info, engine),
                  engine.context_size))
    loaded.set()
    try:
        while (message := channel.receive()) is not None:
            command = message[0]
            if command == "submit":
                engine.submit(message[1], message[2], sink)
            elif command in llama_embedder.COMMANDS:
                embedder.handle(message)
            elif command == "cancel":
                engine.cancel(message[1])
                embedder.cancel(message[1])
            elif command == "close":
                break
    finally:
        stop.set()
        beats.join()
        engine.close()  # every job still running gets its terminal item
        channel.close()
    return 0


def _die_with(parent: int) -> None:
    """Be killed when the parent dies, even while stuck in llama.cpp (Linux; elsewhere the
    end of file on the socket is the only sign)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the line above
        os._exit(0)


_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    _die_with(int(argv[2]))
    # A Ctrl-C or a SIGTERM sent to the whole process group is for the gateway, which
    # then drains and closes the engine in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[1]))
    return serve(sock)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
