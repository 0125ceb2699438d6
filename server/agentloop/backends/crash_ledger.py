"""Which requests crash the embedded engine, and what the crash printed.

When the engine's process dies, every generation in flight is a suspect. `CrashLedger`
counts crashes per caller and request shape: the caller is its tenant (API keys), else
its `x-agentloop-session`, else the anonymous caller; the shape is a digest of what the
request asks (prompt or messages, system text, output format). A shape that was in flight
for `budget` crashes within `window` seconds is refused for that caller until the window
has passed, so resending a payload that kills llama.cpp cannot keep a replica restarting
(and NOT_SERVING); everyone else is served meanwhile.

`crash_cause` picks, out of the last lines a dying child printed, the one that says why:
after GGML_ABORT, ggml prints the assertion and then a backtrace.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import time
from collections.abc import Iterable, Sequence

from agentloop.domain import GenerationRequest

CRASH_BUDGET = 2
CRASH_WINDOW = 600.0
# Shapes remembered at most: a caller sending a new payload per crash cannot grow this.
_MAX_SHAPES = 4096

_CAUSE = re.compile(r"GGML_ASSERT|GGML_ABORT|error|fatal|failed|abort|assert", re.IGNORECASE)
# A backtrace's frame: gdb's "#3  0x... in f ()", glibc's "lib.so(f+0x1c)[0x7f...]",
# or a bare address.
_FRAME = re.compile(r"^\s*#\d+\s|\[0x[0-9a-f]+\]\s*$|^\s*0x[0-9a-f]+\b", re.IGNORECASE)


def crash_cause(lines: Sequence[str]) -> str:
    """The line that says why the process died: the last one naming an error that is not
    a backtrace frame; else the last line."""
    for line in reversed(lines):
        if _CAUSE.search(line) and not _FRAME.search(line):
            return line
    return lines[-1] if lines else ""


def caller_of(request: GenerationRequest) -> str:
    context = request.context
    if context.tenant:
        return f"tenant:{context.tenant}"
    return f"session:{context.session}" if context.session else "anonymous"


def shape_of(request: GenerationRequest) -> str:
    """A digest of what the request asks the engine (not its sampling options)."""
    asked = [request.prompt, request.system,
             [(message.role.value, message.content) for message in request.messages],
             request.format.kind.value, request.format.json_schema]
    return hashlib.sha256(json.dumps(asked, sort_keys=False).encode()).hexdigest()


class CrashLedger:
    """Crashes per caller and shape within a window; refuses a shape over its budget."""

    def __init__(self, budget: int = CRASH_BUDGET, window: float = CRASH_WINDOW) -> None:
        self.budget = budget
        self.window = window
        self._crashes: collections.OrderedDict[tuple[str, str], list[float]] = (
            collections.OrderedDict())
        self._callers: collections.Counter[str] = collections.Counter()  # shapes per caller

    def blame(self, requests: Iterable[GenerationRequest], now: float | None = None) -> None:
        """A crash happened with these requests in flight."""
        now = time.monotonic() if now is None else now
        for key in {(caller_of(request), shape_of(request)) for request in requests}:
            times = [t for t in self._crashes.pop(key, []) if now - t < self.window]
            if not times:
                self._callers[key[0]] += 1
            self._crashes[key] = [*times, now]
        while len(self._crashes) > _MAX_SHAPES:
            self._forget(*self._crashes.popitem(last=False))

    def refused_for(self, request: GenerationRequest, now: float | None = None) -> float:
        """Seconds this request stays refused (0: it may run). Callers without a crash
        on record cost a dictionary look-up: their request is not hashed."""
        caller = caller_of(request)
        if caller not in self._callers:
            return 0.0
        key = (caller, shape_of(request))
        now = time.monotonic() if now is None else now
        recent = [t for t in self._crashes.get(key, ()) if now - t < self.window]
        if not recent:
            if key in self._crashes:
                self._forget(key, self._crashes.pop(key))
            return 0.0
        if len(recent) < self.budget:
            return 0.0
        return recent[-self.budget] + self.window - now

    def _forget(self, key: tuple[str, str], _: list[float]) -> None:
        self._callers[key[0]] -= 1
        if self._callers[key[0]] <= 0:
            del self._callers[key[0]]
