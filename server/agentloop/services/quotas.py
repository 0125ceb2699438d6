"""Each named tenant's limits, replica-wide and for every kind of call: calls at once,
requests per minute, tokens per minute. Checked once per call, before it queues anywhere
(where it then waits is the router's: upstreams/admission.py).

Token quotas count what is used: a call's input is charged when it is admitted (an
estimate from its text, `estimate_tokens`), its output as it streams, and the end report's
counts settle the difference; a cancelled call has paid for its input. A call whose input
alone is past what the tenant has left waits for the bucket (RESOURCE_EXHAUSTED with the
time it refills); one whose input is past the whole per-minute budget is refused outright.
A stream may run past the budget (it finishes, nothing is cut); the tenant's next call then
waits until the bucket refills, at most a minute (the debt is bounded, whatever an upstream
reports).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agentloop.domain import CallContext, ChatMessage, Usage
from agentloop.errors import QuotaExceeded
from agentloop.tenants import DEFAULT_TENANT, Tenant
from agentloop.upstreams.admission import AdmissionObserver

#: Bytes of text per token when a call's input is estimated before the engine counts it
#: (English and code run at about four).
BYTES_PER_TOKEN = 4


@dataclass(slots=True)
class _Quota:
    """A named tenant's request and token buckets (each refills to its cap in a minute;
    the token bucket may go below zero while a stream runs past it, by a minute at most)."""

    limits: Tenant
    stamp: float
    tokens: float = field(init=False)
    requests: float = field(init=False)
    #: Calls of the tenant admitted and not yet ended, of every kind.
    active: int = 0

    def __post_init__(self) -> None:
        self.tokens = float(self.limits.tokens_per_minute)
        self.requests = float(self.limits.requests_per_minute)

    def refill(self, now: float) -> None:
        """Each bucket gains what the time since the last refill gives, up to its cap.
        (Plain comparisons, not min/max: this runs per streamed token.)"""
        elapsed = now - self.stamp
        if elapsed <= 0.0:
            return
        self.stamp = now
        tpm, rpm = self.limits.tokens_per_minute, self.limits.requests_per_minute
        if tpm:
            tokens = self.tokens + elapsed * tpm / 60.0
            self.tokens = tokens if tokens < tpm else float(tpm)
        if rpm:
            requests = self.requests + elapsed * rpm / 60.0
            self.requests = requests if requests < rpm else float(rpm)

    def spend(self, tokens: float, now: float) -> None:
        """Take `tokens` (a refund when negative) from the bucket refilled to `now`; the
        debt never passes a minute's worth."""
        tpm = self.limits.tokens_per_minute
        if tpm:
            self.refill(now)
            cap = float(tpm)
            level = self.tokens - tokens
            self.tokens = cap if level > cap else (-cap if level < -cap else level)

    def resize(self, limits: Tenant) -> None:
        """New limits from a reloaded keys file: what was spent stays spent."""
        old, self.limits = self.limits, limits
        self.tokens = _carried(self.tokens, old.tokens_per_minute, limits.tokens_per_minute)
        self.requests = _carried(self.requests, old.requests_per_minute,
                                 limits.requests_per_minute)


def _carried(level: float, old_cap: int, new_cap: int) -> float:
    spent = old_cap - level if old_cap else 0.0
    return max(-float(new_cap), min(float(new_cap), new_cap - spent))


class TokenMeter:
    """One call's place in its tenant's limits, from `async with` entry (its limits checked,
    its input paid) to exit, and its tokens: the output as it streams, settled against the
    end report."""

    __slots__ = ("_charged_input", "_count_tokens", "_input", "_quota", "_quotas", "_tenant",
                 "output")

    def __init__(self, quotas: Quotas, tenant: Tenant,
                 input_tokens: int | Callable[[], int], count_tokens: bool) -> None:
        self._quotas = quotas
        self._tenant = tenant
        self._input = input_tokens
        self._count_tokens = count_tokens
        #: The tenant's bucket where this call's tokens count (set on entry).
        self._quota: _Quota | None = None
        self._charged_input = 0
        #: Output tokens counted so far (about one per streamed delta).
        self.output = 0

    async def __aenter__(self) -> TokenMeter:
        quotas = self._quotas
        input_tokens = self._input() if callable(self._input) else self._input
        counted = input_tokens if self._count_tokens else 0
        quota = quotas._check(self._tenant, counted)  # the input paid there
        quota.active += 1
        self._quota = quota
        self._charged_input = counted
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._quota is not None:
            self._quota.active -= 1

    def add_output(self, tokens: int = 1) -> None:
        self.output += tokens
        if self._count_tokens and self._quota is not None:
            self._quota.spend(tokens, self._quotas.clock())

    def settle(self, usage: Usage) -> None:
        """The end report's counts replace the estimates (where it reports any)."""
        if not self._count_tokens or self._quota is None:
            return
        input_tokens = usage.input_tokens or self._charged_input
        output = usage.output_tokens or self.output
        tokens = input_tokens - self._charged_input + output - self.output
        if tokens:
            self._quota.spend(tokens, self._quotas.clock())
        self._charged_input, self.output = input_tokens, output


class _Uncounted:
    """The place of a call whose tenant has no limits: nothing to check, keep or count (one
    shared object: such calls allocate nothing here)."""

    __slots__ = ()

    async def __aenter__(self) -> _Uncounted:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass

    def add_output(self, tokens: int = 1) -> None:
        pass

    def settle(self, usage: Usage) -> None:
        pass


UNCOUNTED = _Uncounted()


class Quotas:
    """Each named tenant's limits, replica-wide and across every kind of call (the default
    tenant has none): calls at once, requests and tokens per minute."""

    def __init__(self, tenants: Callable[[str], Tenant] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tenants: Callable[[str], Tenant] = tenants or (lambda _name: DEFAULT_TENANT)
        self.observer: AdmissionObserver | None = None
        self.clock = clock
        self._book: dict[str, _Quota] = {}

    def admit(self, context: CallContext, input_tokens: int | Callable[[], int] = 0, *,
              tokens: bool = True) -> TokenMeter | _Uncounted:
        """Count one call against its tenant's limits for the body of `async with` (which
        gives its meter), its input paid on entry (QuotaExceeded past a limit; a callable is
        asked only where a tenant counts tokens); `tokens=False` for a call that costs no
        tokens (a count)."""
        tenant = self.tenants(context.tenant) if context.tenant else None
        if tenant is None or not tenant.has_quota:
            return UNCOUNTED
        return TokenMeter(self, tenant, input_tokens, tokens)

    def _check(self, tenant: Tenant, input_tokens: int) -> _Quota:
        """Refuse a named tenant past a limit, most immediate first; count the request and
        take its input from the token bucket."""
        now = self.clock()
        quota = self._book.get(tenant.name)
        if quota is None:
            quota = self._book[tenant.name] = _Quota(tenant, now)
        elif quota.limits is not tenant:  # a reload made new limits
            quota.resize(tenant)
        if tenant.max_concurrency and quota.active >= tenant.max_concurrency:
            self._over(tenant, "max_concurrency", 1.0, f"{tenant.max_concurrency} calls at once")
        quota.refill(now)
        rpm, tpm = tenant.requests_per_minute, tenant.tokens_per_minute
        if rpm and quota.requests < 1.0:
            self._over(tenant, "requests_per_minute", (1.0 - quota.requests) * 60.0 / rpm,
                       f"{rpm} requests per minute")
        if tpm and input_tokens > tpm:
            self._over(tenant, "tokens_per_minute", 60.0,
                       f"{tpm} tokens per minute: this call's input alone is about "
                       f"{input_tokens} tokens")
        if tpm and quota.tokens < max(input_tokens, 1):
            needed = max(input_tokens, 1) - quota.tokens
            self._over(tenant, "tokens_per_minute", needed * 60.0 / tpm,
                       f"{tpm} tokens per minute")
        if rpm:
            quota.requests -= 1.0
        if tpm and input_tokens:
            quota.tokens = max(-float(tpm), quota.tokens - input_tokens)
        return quota

    def _over(self, tenant: Tenant, limit: str, retry_after: float, what: str) -> None:
        if self.observer is not None:
            self.observer.refused(tenant.label, limit)
        raise QuotaExceeded(
            tenant.name, limit,
            f"tenant {tenant.name} is past its limit of {what} ({limit}); retry in "
            f"{retry_after:.2f}s", retry_after=retry_after)


def estimate_tokens(*texts: str, messages: Iterable[ChatMessage] = ()) -> int:
    """A call's input in tokens before the engine counts it: its text at BYTES_PER_TOKEN."""
    size = 0
    for text in texts:
        size += _utf8_size(text)
    for message in messages:
        size += _utf8_size(message.content)
    return math.ceil(size / BYTES_PER_TOKEN)


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())
