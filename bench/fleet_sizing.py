"""Size a fleet on paper: simulate the pool's pick and queue for a given load.

A discrete-event simulation of what upstreams/pool.py does: `users` closed-loop users, each
asking for an answer of about `tokens` tokens (uniform within +-50%), thinking `think`
seconds between answers; endpoints with `slots` sequences each, decoding at `rate` tokens/s
per sequence; a call takes the endpoint with the fewest calls in flight under its cap, or
waits first come first served. For the load given and at 10x and 100x it prints, for the
smallest number of endpoints whose P95 latency is within `target` seconds: endpoints,
latency P50/P95, queue wait P95 and slot use. Check it against a real run: the embedded
engine on these 2 cores is about `--slots 10 --rate 12.5 --first-token 0.3`.

    .venv/bin/python -m bench.fleet_sizing --users 100 --tokens 200 --slots 10 --rate 12.5

With `--cache` it models the engines' prefix caches too, on the workload of
bench/prefix_workload.py (K long system prompts, Zipf popularity, tenants): each endpoint an
LRU of 16-token blocks holding `--cache-share` of the working set, the prompt's uncached
part prefilled at `--prefill-rate` tokens/s before the first token, and the pick either
fewest-in-flight or the gateway's own cache-aware pick (upstreams/prefix_index.py, the same
code, its `index_blocks` sized to the engine's cache). It prints, at 1x, 10x and 100x the
load, the endpoints each pick needs for a P95 time to first token within `--ttft-target`
(or with `--endpoints N`, that fleet under each pick and each of `--bounds`):

    .venv/bin/python -m bench.fleet_sizing --cache --users 16 --tokens 20 --slots 8 \
        --rate 12.5 --first-token 0.05 --prefill-rate 1000
"""

from __future__ import annotations

import argparse
import heapq
import random
from collections import OrderedDict
from dataclasses import dataclass

from agentloop.domain import (
    CallContext,
    ChatMessage,
    FinishReason,
    GenerationEnd,
    GenerationRequest,
    Role,
    SamplingOptions,
    Timings,
    Usage,
)
from agentloop.upstreams.config import PrefixRouting
from agentloop.upstreams.prefix_index import BLOCK_BYTES, Prefix, PrefixPicks, prefix_of
from bench.prefix_workload import Workload

BLOCK_TOKENS = 16


@dataclass(frozen=True)
class Load:
    users: int
    tokens: int
    think: float
    slots: int
    rate: float
    first_token: float


@dataclass(frozen=True)
class Outcome:
    endpoints: int
    p50: float
    p95: float
    wait_p95: float
    slot_use: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def simulate(load: Load, endpoints: int, answers: int = 4000, seed: int = 7) -> Outcome:
    """Run until `answers` answers finished; the first tenth is warm-up and not counted."""
    rng = random.Random(seed)
    in_flight = [0] * endpoints
    queue: list[tuple[float, int]] = []  # (arrival, user), first come first served
    events: list[tuple[float, int, int, int, float]] = []  # (time, kind, user, endpoint, arrival)
    arrive, finish = 0, 1
    for user in range(load.users):
        heapq.heappush(events, (rng.uniform(0, 1.0), arrive, user, -1, 0.0))
    latencies: list[float] = []
    waits: list[float] = []
    busy = 0.0
    last = 0.0
    done = 0

    def start(now: float, user: int, arrival: float) -> None:
        fewest = min(range(endpoints), key=lambda e: in_flight[e])
        in_flight[fewest] += 1
        tokens = rng.uniform(0.5, 1.5) * load.tokens
        took = load.first_token + tokens / load.rate
        waits.append(now - arrival)
        heapq.heappush(events, (now + took, finish, user, fewest, arrival))

    while events and done < answers:
        now, kind, user, endpoint, arrival = heapq.heappop(events)
        busy += sum(in_flight) * (now - last)
        last = now
        if kind == arrive:
            if min(in_flight) < load.slots and not queue:
                start(now, user, now)
            else:
                queue.append((now, user))
            continue
        in_flight[endpoint] -= 1
        done += 1
        if done > answers // 10:
            latencies.append(now - arrival)
        heapq.heappush(events, (now + rng.expovariate(1 / load.think) if load.think else now,
                                arrive, user, -1, 0.0))
        if queue and min(in_flight) < load.slots:
            queued_at, waiting = queue.pop(0)
            start(now, waiting, queued_at)
    capacity = endpoints * load.slots * last
    return Outcome(endpoints, percentile(latencies, 0.5), percentile(latencies, 0.95),
                   percentile(waits, 0.95), busy / capacity if capacity else 0.0)


def smallest_fleet(load: Load, target: float) -> Outcome:
    """The fewest endpoints whose P95 latency is within `target` (binary search)."""
    low, high = 1, max(1, -(-load.users // load.slots))
    best = simulate(load, high)
    while low < high:
        middle = (low + high) // 2
        outcome = simulate(load, middle)
        if outcome.p95 <= target:
            high, best = middle, outcome
        else:
            low = middle + 1
    return best if best.endpoints == low else simulate(load, low)


# --- the cache model -----------------------------------------------------------------------


@dataclass(frozen=True)
class CacheOutcome:
    endpoints: int
    ttft_p50: float
    ttft_p95: float
    cached_share: float
    #: The busiest endpoint's calls over the mean.
    busiest: float = 1.0


class _Engine:
    """One endpoint: its calls in flight and an LRU of (prompt, block) it holds."""

    def __init__(self, key: str, capacity: int) -> None:
        self.key = key
        self.in_flight = 0
        self.served = 0
        self.capacity = capacity
        self.blocks: OrderedDict[tuple[int, int], None] = OrderedDict()

    def serve(self, prompt: int, blocks: int) -> int:
        """Blocks of the prompt it held; it holds them all from now on."""
        self.served += 1
        held = 0
        while held < blocks and (prompt, held) in self.blocks:
            held += 1
        for block in reversed(range(blocks)):
            self.blocks[(prompt, block)] = None
            self.blocks.move_to_end((prompt, block))
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
        return held


def index_blocks_for(workload: Workload, cache_tokens: int) -> int:
    """The `index_blocks` that cover an engine cache of `cache_tokens` on this workload."""
    bytes_per_token = len(workload.system(0).encode()) / workload.prompt_tokens
    return max(1, round(cache_tokens * bytes_per_token / BLOCK_BYTES))


def _prefixes(workload: Workload) -> list[Prefix | None]:
    """Each system prompt's blocks as the gateway's pick hashes them (the tenant's scope)."""
    options = SamplingOptions(temperature=0.8, top_p=0.95, top_k=40, max_tokens=16,
                              repeat_penalty=1.0, num_ctx=8192)
    return [prefix_of(GenerationRequest(
        model="m", options=options, system=workload.system(k),
        messages=(ChatMessage(Role.USER, "turn"),),
        context=CallContext(cache_scope=workload.tenant(k))))
        for k in range(workload.prompts)]


def simulate_cache(load: Load, workload: Workload, endpoints: int, cache_aware: bool,
                   prefill_rate: float, cache_share: float, answers: int = 3000,
                   seed: int = 7, prefixes: list[Prefix | None] | None = None,
                   load_bound: float = PrefixRouting().load_bound) -> CacheOutcome:
    """`load.users` closed-loop callers on `endpoints` engines with prefix caches; the
    first tenth of the answers is warm-up and not counted."""
    rng = random.Random(seed)
    capacity = max(1, int(workload.working_set_tokens / BLOCK_TOKENS * cache_share))
    engines = [_Engine(f"e{n}", capacity) for n in range(endpoints)]
    now = 0.0
    # The index sized to what an engine's cache holds, as docs/upstreams.md advises.
    picks = PrefixPicks(PrefixRouting(load_bound=load_bound, index_blocks=index_blocks_for(
        workload, capacity * BLOCK_TOKENS)), clock=lambda: now)
    prefixes = prefixes if prefixes is not None else _prefixes(workload)
    weights = workload.weights()
    blocks = workload.prompt_tokens // BLOCK_TOKENS
    queue: list[tuple[float, int]] = []
    events: list[tuple[float, int, int, int, float]] = []
    arrive, finish = 0, 1
    for user in range(load.users):
        heapq.heappush(events, (rng.uniform(0, 1.0), arrive, user, -1, 0.0))
    ttfts: list[float] = []
    prompt_tokens = cached_tokens = 0
    done = 0

    def start(user: int, arrival: float) -> None:
        nonlocal prompt_tokens, cached_tokens
        k = rng.choices(range(workload.prompts), weights)[0]
        room = [e for e in engines if e.in_flight < load.slots]
        template = prefixes[k]
        if cache_aware and template is not None and len(room) > 1:
            prefix = Prefix(template.hashes, template.size)
            engine = picks.choose(room, [e.in_flight / load.slots for e in room], prefix)
        else:
            prefix = None
            fewest = min(e.in_flight for e in room)
            engine = rng.choice([e for e in room if e.in_flight == fewest])
        engine.in_flight += 1
        held = engine.serve(k, blocks) * BLOCK_TOKENS
        tokens_in = workload.prompt_tokens + workload.turn_tokens
        if prefix is not None:
            picks.learn(engine.key, prefix, GenerationEnd(
                FinishReason.STOP, Usage(tokens_in, 0, held), Timings(), "m"))
        ttft = now - arrival + load.first_token + (tokens_in - held) / prefill_rate
        tokens = rng.uniform(0.5, 1.5) * load.tokens
        if done > answers // 10:
            ttfts.append(ttft)
            prompt_tokens += tokens_in
            cached_tokens += held
        heapq.heappush(events, (arrival + ttft + tokens / load.rate, finish, user,
                                engines.index(engine), arrival))

    while events and done < answers:
        now, kind, user, endpoint, _ = heapq.heappop(events)
        if kind == arrive:
            if not queue and any(e.in_flight < load.slots for e in engines):
                start(user, now)
            else:
                queue.append((now, user))
            continue
        engines[endpoint].in_flight -= 1
        done += 1
        heapq.heappush(events, (now + rng.expovariate(1 / load.think) if load.think else now,
                                arrive, user, -1, 0.0))
        if queue:
            queued_at, waiting = queue.pop(0)
            start(waiting, queued_at)
    served = [e.served for e in engines]
    return CacheOutcome(endpoints, percentile(ttfts, 0.5), percentile(ttfts, 0.95),
                        cached_tokens / prompt_tokens if prompt_tokens else 0.0,
                        max(served) * len(served) / max(1, sum(served)))


def smallest_cached_fleet(load: Load, workload: Workload, cache_aware: bool,
                          prefill_rate: float, cache_share: float, target: float,
                          load_bound: float) -> CacheOutcome | None:
    """The fewest endpoints whose P95 time to first token is within `target`; None when
    even one endpoint per user misses it (every cache too small for the misses' share)."""
    prefixes = _prefixes(workload)

    def run(endpoints: int) -> CacheOutcome:
        return simulate_cache(load, workload, endpoints, cache_aware, prefill_rate,
                              cache_share, prefixes=prefixes, load_bound=load_bound)

    low, high = 1, max(1, -(-load.users // load.slots))
    while run(high).ttft_p95 > target:
        if high >= load.users:
            return None
        low, high = high + 1, min(load.users, high * 2)
    best = run(high)
    while low < high:
        middle = (low + high) // 2
        outcome = run(middle)
        if outcome.ttft_p95 <= target:
            high, best = middle, outcome
        else:
            low = middle + 1
    return best if best.endpoints == low else run(low)


def cache_main(args: argparse.Namespace
               ) -> list[tuple[int, CacheOutcome | None, CacheOutcome | None]]:
    workload = Workload(prompts=args.prompts, prompt_tokens=args.prompt_tokens,
                        tenants=args.tenants)
    if args.endpoints:
        fixed_fleet(args, workload)
        return []
    rows = []
    # Default goal: half a miss's time to first token, so that the 95th percentile call
    # must find its prefix cached.
    target = args.ttft_target or 0.5 * (args.first_token + args.prompt_tokens /
                                        args.prefill_rate)
    print(f"{args.prompts} system prompts of {args.prompt_tokens} tokens, each cache "
          f"{args.cache_share:.0%} of them; P95 time to first token goal {target:.2f} s")
    print("| load | users | endpoints, fewest in flight (TTFT P95, cached) | "
          "endpoints, cache-aware (TTFT P95, cached) |")
    print("| --- | ---: | --- | --- |")
    for scale in args.scales:
        load = Load(args.users * scale, args.tokens, args.think, args.slots, args.rate,
                    args.first_token)
        fewest = smallest_cached_fleet(load, workload, False, args.prefill_rate,
                                       args.cache_share, target, args.load_bound)
        aware = smallest_cached_fleet(load, workload, True, args.prefill_rate,
                                      args.cache_share, target, args.load_bound)
        rows.append((scale, fewest, aware))
        print(f"| {scale}x | {load.users} | {_fleet(fewest)} | {_fleet(aware)} |")
    return rows


def fixed_fleet(args: argparse.Namespace, workload: Workload) -> None:
    """`--endpoints N`: that fleet under each pick (and each `--load-bound` given)."""
    load = Load(args.users, args.tokens, args.think, args.slots, args.rate, args.first_token)
    prefixes = _prefixes(workload)
    print("| pick | cached share | TTFT P50 / P95 | busiest / mean calls |")
    print("| --- | ---: | --- | ---: |")
    for cache_aware, bound in [(False, 0.0)] + [(True, b) for b in args.bounds]:
        outcome = simulate_cache(load, workload, args.endpoints, cache_aware,
                                 args.prefill_rate, args.cache_share, prefixes=prefixes,
                                 load_bound=bound)
        name = f"cache-aware, load_bound {bound:g}" if cache_aware else "fewest in flight"
        print(f"| {name} | {outcome.cached_share:.1%} | {outcome.ttft_p50:.2f} / "
              f"{outcome.ttft_p95:.2f} s | {outcome.busiest:.2f}x |")


def _fleet(outcome: CacheOutcome | None) -> str:
    if outcome is None:
        return "none meets it"
    return f"{outcome.endpoints} ({outcome.ttft_p95:.2f} s, {outcome.cached_share:.0%})"


def main(argv: list[str] | None = None) -> list[tuple[int, Outcome]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=80, help="tokens per answer (mean)")
    parser.add_argument("--think", type=float, default=0.0, help="seconds between answers")
    parser.add_argument("--slots", type=int, default=10, help="sequences per endpoint")
    parser.add_argument("--rate", type=float, default=12.5,
                        help="tokens/s per sequence with the slots full")
    parser.add_argument("--first-token", type=float, default=0.3,
                        help="seconds to the first token once a slot is free")
    parser.add_argument("--target", type=float, default=None,
                        help="P95 latency goal in seconds (default: 1.2x one answer's time)")
    parser.add_argument("--cache", action="store_true",
                        help="model the engines' prefix caches (the options below)")
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--cache-share", type=float, default=1 / 3,
                        help="of the working set, what one endpoint's cache holds")
    parser.add_argument("--prefill-rate", type=float, default=1000.0,
                        help="prompt tokens/s one sequence prefills")
    parser.add_argument("--ttft-target", type=float, default=None,
                        help="P95 time to first token goal in seconds (default: half a "
                             "miss's: first token plus the whole prompt's prefill)")
    parser.add_argument("--scales", type=lambda text: [int(x) for x in text.split(",")],
                        default=[1, 10, 100], help="loads to size for, as multiples")
    parser.add_argument("--load-bound", type=float, default=PrefixRouting().load_bound)
    parser.add_argument("--endpoints", type=int, default=0,
                        help="simulate this many endpoints instead of sizing a fleet")
    parser.add_argument("--bounds", type=lambda text: [float(x) for x in text.split(",")],
                        default=[PrefixRouting().load_bound],
                        help="with --endpoints: the load bounds to compare")
    args = parser.parse_args(argv)
    if args.cache:
        cache_main(args)
        return []
    one_answer = args.first_token + args.tokens / args.rate
    target = args.target or 1.2 * one_answer * 1.5  # the longest answers are 1.5x the mean
    rows = []
    print(f"one answer of {args.tokens} tokens: {one_answer:.1f} s; P95 goal {target:.1f} s")
    print("| load | users | endpoints | latency P50 / P95 | queue wait P95 | slot use |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for scale in (1, 10, 100):
        load = Load(args.users * scale, args.tokens, args.think, args.slots, args.rate,
                    args.first_token)
        outcome = smallest_fleet(load, target)
        rows.append((scale, outcome))
        print(f"| {scale}x | {load.users} | {outcome.endpoints} | {outcome.p50:.1f} / "
              f"{outcome.p95:.1f} s | {outcome.wait_p95:.2f} s | {outcome.slot_use:.0%} |")
    return rows


if __name__ == "__main__":
    main()
