"""The rules of retries and circuit breakers, which the router applies to every endpoint
(a single engine is a pool of one); nothing here knows the engine.

A generation is retried only while nothing has reached the caller (it would see an item
twice) and only for errors the backend marks `retryable_before_first_token`. The circuit
counts only failures no request can cause (`is_backend_failure`: the engine never started
on the request), so no caller can take the replica out of rotation for the others. The
behaviour and its settings: docs/security.md ("Retries", "Circuit breaker").
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable

from agentloop.config import Settings
from agentloop.errors import AgentLoopError, BackendUnavailable, CircuitOpen

log = logging.getLogger(__name__)

# The shortest RetryInfo a fail-fast answer carries: "now" would invite a busy loop.
MIN_RETRY_AFTER = 0.1


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Counts consecutive backend failures; `on_change` hears every state change."""

    def __init__(
        self,
        failure_threshold: int,
        reset_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.on_change: Callable[[], None] | None = None
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self._half_open_timer: asyncio.TimerHandle | None = None

    @property
    def closed(self) -> bool:
        """CLOSED, without reading the clock (the path every call takes)."""
        return self._opened_at is None

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened_at < self.reset_timeout:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    def open_error(self) -> CircuitOpen:
        """What a call refused by the open circuit raises."""
        remaining = 0.0 if self._opened_at is None else (
            self._opened_at + self.reset_timeout - self._clock())
        return CircuitOpen(
            "circuit open: the backend failed repeatedly; failing fast until it is back",
            retry_after=max(remaining, MIN_RETRY_AFTER),
        )

    def admit(self) -> bool:
        """Let a call through or raise CircuitOpen; True when the call is the half-open probe."""
        if self._opened_at is None:
            return False
        state = self.state
        if state is CircuitState.CLOSED:
            return False
        if state is CircuitState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        raise self.open_error()

    def record_success(self) -> None:
        if self._opened_at is None and not self._failures:
            return  # closed with no failures to forget: nothing changes
        if self.state is CircuitState.OPEN:
            return  # a call admitted before the circuit opened says nothing about now
        self._failures = 0
        self._probing = False
        if self._opened_at is not None:
            self._opened_at = None
            self._cancel_timer()
            log.info("circuit closed: the backend answers again")
            self._changed()

    def record_failure(self) -> None:
        state = self.state
        if state is CircuitState.OPEN:
            return
        self._probing = False
        self._failures += 1
        if state is CircuitState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._open()

    def release_probe(self, probe: bool) -> None:
        """The probe ended without a verdict (cancelled, or a client error): another may probe."""
        if probe:
            self._probing = False

    def close(self) -> None:
        self._cancel_timer()

    def _open(self) -> None:
        log.warning("circuit open after %d consecutive backend failures; probing in %.1fs",
                    self._failures, self.reset_timeout)
        self._opened_at = self._clock()
        self._failures = 0
        self._cancel_timer()
        # Tell the listener when half-open starts, so the health task probes at once.
        self._half_open_timer = asyncio.get_running_loop().call_later(
            self.reset_timeout, self._changed)
        self._changed()

    def _cancel_timer(self) -> None:
        if self._half_open_timer is not None:
            self._half_open_timer.cancel()
            self._half_open_timer = None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def retry_delay(exc: AgentLoopError, attempt: int, settings: Settings, time_left: float | None,
                rng: random.Random, delivered: bool) -> float | None:
    """Seconds to wait before the next attempt, or None when this failure is final: after
    the first item, for a failure not marked retryable, past the attempts, or when the
    backoff would outlast the caller's deadline. Full jitter, doubling per attempt."""
    if delivered or not exc.retryable_before_first_token or attempt >= settings.retry_attempts:
        return None
    delay = rng.uniform(0.0, min(settings.retry_backoff_max, settings.retry_backoff * 2**attempt))
    if time_left is not None and delay >= time_left:
        return None
    return delay


def is_backend_failure(exc: AgentLoopError) -> bool:
    """Failures that say the backend itself is down: it was not reached, or it dropped the
    connection before answering (the engine never started on the request, so the request
    cannot be the cause). Busy answers, bad requests and failures of one request or one
    model (HTTP 500, mid-stream errors, hangs, malformed streams) do not count."""
    return isinstance(exc, BackendUnavailable) and exc.retryable_before_first_token \
        and not isinstance(exc, CircuitOpen)
