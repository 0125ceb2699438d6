"""The embedded engine's own process: `python -m agentloop.backends.engine_child FD PID`.

`EmbeddedBackend` (the parent, PID) starts this module with one end of a socket pair as FD
and reads the child's stdout and stderr (merged) as llama.cpp's raw output. Everything else
travels over the socket as frames of JSON messages checked against a table of kinds
(engine_wire.py: never pickle, which would let a child taken over through llama.cpp run
code in the gateway):

parent -> child: start, then submit (a generation), embed and count (Embed and CountTokens,
                 llama_embedder), cancel, close
child -> parent: beat while loading; ready or failed after the load; then delta, end,
                 embedding, token_count and error (a job's output), stats, log

The engine's sinks only put messages on a queue (a decoding step's items at once, after
the step's sampling); one writer thread sends whatever piled up as one frame, so a slow
parent never blocks a decoding step. A heartbeat thread sends the
engine's stats every `heartbeat` seconds with a progress count (items sent plus decode
steps plus graph nodes computed, so a long step counts too): the parent's watchdog reads
silence or a standstill as a hang. The child ends when
told to close or when the socket reaches end of file (the parent is gone); it ignores
SIGINT and SIGTERM, so a Ctrl-C in a terminal or a SIGTERM to the process group stops the
parent, which then closes the engine in order.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import socket
import sys
import threading
from typing import Any

from agentloop.backends import engine_wire
from agentloop.backends.engine_wire import HEADER_SIZE, Message, encode_error, frame_size
from agentloop.domain import EmbeddingResult, GenerationEnd, TokenCount

#: Raw output lines (stdout and stderr: llama.cpp, ggml, Python's last words) are logged
#: by the parent under this logger at debug level.
RAW_OUTPUT_LOGGER = "agentloop.engine.output"

# --- the child -----------------------------------------------------------------------------

class _Channel:
    """The child's end of the socket: blocking reads on one thread, frames out on another."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._outbox: queue.SimpleQueue[list[Message] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="engine-child-writer",
                                        daemon=True)
        self._writer.start()
        self.sent_items = 0

    def receive(self) -> Message | None:
        """The next message from the parent; None at end of file (the parent is gone)."""
        header = self._file.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            return None
        [message] = engine_wire.decode_frame(self._file.read(frame_size(header)),
                                             engine_wire.PARENT_MESSAGES)
        return message

    def post(self, message: Message) -> None:
        """Queue a message for the writer thread; never blocks."""
        self._outbox.put([message])

    def post_all(self, messages: list[Message]) -> None:
        """Queue messages that go out in one frame (a decode step's); never blocks."""
        self._outbox.put(messages)

    def close(self) -> None:
        """Send what is queued, then stop the writer."""
        self._outbox.put(None)
        self._writer.join()
        self._sock.close()

    def _write(self) -> None:
        while True:
            first = self._outbox.get()
            batch = [] if first is None else list(first)
            done = first is None
            while not done:  # everything that piled up goes out as one frame
                try:
                    following = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if following is None:
                    done = True
                else:
                    batch.extend(following)
            if batch:
                self.sent_items += sum(1 for message in batch
                                       if message[0] in engine_wire.JOB_ITEMS)
                try:
                    self._sock.sendall(engine_wire.encode_frame(batch))
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
            self._channel.post(("log", level, record.name, text, record.pathname or "",
                                record.lineno or 0, record.funcName or ""))
        except Exception:  # a log line must never take the engine down
            self.handleError(record)


class _Sink:
    """Jobs' items to the parent; a decode step's items (`many`) in one frame."""

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel

    def __call__(self, job_id: int, item: object) -> None:
        self._channel.post(_message(job_id, item))

    def many(self, items: list[tuple[int, object]]) -> None:
        self._channel.post_all([_message(job_id, item) for job_id, item in items])


def _message(job_id: int, item: object) -> Message:
    if isinstance(item, str):
        return ("delta", job_id, item)
    if isinstance(item, GenerationEnd):
        return ("end", job_id, item)
    if isinstance(item, EmbeddingResult):
        return ("embedding", job_id, item)
    if isinstance(item, TokenCount):
        return ("token_count", job_id, item)
    return ("error", job_id, encode_error(item if isinstance(
        item, BaseException) else TypeError("not an item")))


def _heartbeat(engines: list[Any], loaded: threading.Event, channel: _Channel, every: float,
               stop: threading.Event) -> None:
    """A beat while llama.cpp is imported and the model loads, then the engine's stats
    with a progress count (`engines` holds the engine once it is made)."""
    while not stop.wait(every):
        if not loaded.is_set():
            channel.post(("beat",))
            continue
        try:
            stats = engines[0].stats()
        except Exception:  # stats are advisory: skip a beat rather than die
            continue
        progress = channel.sent_items + stats.steps + stats.nodes
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

    engines: list[Any] = []
    loaded, stop = threading.Event(), threading.Event()
    beats = threading.Thread(target=_heartbeat, args=(engines, loaded, channel, heartbeat, stop),
                             name="engine-child-heartbeat", daemon=True)
    beats.start()  # before importing llama.cpp, which takes a while on a busy machine

    from agentloop.backends.llama_engine import Engine
    from agentloop.config import SettingsError

    engine = Engine(config)
    engines.append(engine)
    try:
        info = engine.load()
    except SettingsError as exc:
        stop.set()
        beats.join()
        channel.post(("failed", str(exc)))
        channel.close()
        return 2
    sink = _Sink(channel)
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
