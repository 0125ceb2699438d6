"""The workload of cache-aware routing, shared by bench_prefix_routing and fleet_sizing.

K long system prompts (a fleet of services each sending its own instructions, tool lists
and documents), picked with Zipf popularity, each followed by a short user turn; many
callers without sessions; tenants with their own prompts (prompt k belongs to tenant
k mod T, and the tenant's calls carry its cache key, so no two tenants share a prefix).
Tokens are words, as the fake OpenAI counts them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Call:
    prompt: int  # which system prompt
    tenant: str
    turn: str  # the user's short turn


@dataclass(frozen=True)
class Workload:
    prompts: int = 30
    prompt_tokens: int = 2000
    turn_tokens: int = 12
    zipf: float = 1.0
    tenants: int = 3
    seed: int = 7

    @property
    def working_set_tokens(self) -> int:
        """Tokens of every system prompt: what the engines' caches would hold to hit all."""
        return self.prompts * self.prompt_tokens

    def weights(self) -> list[float]:
        return [1 / (k + 1) ** self.zipf for k in range(self.prompts)]

    def tenant(self, prompt: int) -> str:
        return f"tenant{prompt % max(1, self.tenants)}"

    def system(self, prompt: int) -> str:
        return " ".join(f"p{prompt}w{i}" for i in range(self.prompt_tokens))

    def calls(self, count: int) -> list[Call]:
        rng = random.Random(self.seed)
        picks = rng.choices(range(self.prompts), self.weights(), k=count)
        return [Call(k, self.tenant(k), " ".join(f"u{rng.randrange(10_000)}"
                                                 for _ in range(self.turn_tokens)))
                for k in picks]
