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
"""

from __future__ import annotations

import argparse
import heapq
import random
from dataclasses import dataclass


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
    args = parser.parse_args(argv)
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
