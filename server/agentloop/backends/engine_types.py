"""The embedded engine's configuration and load report: plain data, cheap to import.

Both ends of the engine's socket use them (engine_wire.py), and the gateway must not load
llama.cpp to read them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model_path: str  # the GGUF file (already assembled)
    n_ctx: int  # context per slot (tokens); capped to the model's training context
    slots: int  # sequences decoded together (1 = serial)
    threads: int
    prefix_reuse: bool = True
    batch_tokens: int = 512  # tokens per llama_decode step (prompt chunks + running sequences)
    kv_unified: bool = True  # one KV cache for every slot (one pass per step) or one each
    #: Share of the scheduler's time side work (embeddings) gets while generations run.
    side_share: float = 0.1


@dataclass(frozen=True)
class EngineStats:
    """Load signals, cheap to compute."""

    slots: int
    slots_in_use: int  # slots holding a job (evaluating its prompt or generating)
    running: int  # jobs generating (their prompt evaluated)
    waiting: int  # jobs not in a slot yet (queued, or their grammar building)
    cache_tokens: int  # tokens the slots' KV cache holds
    cache_capacity: int
    steps: int = 0  # decode steps since load: progress, for a watchdog
    #: Graph nodes llama.cpp computed since load, the step under way included: progress
    #: inside a step, which may take long (a big model, a long prompt chunk).
    nodes: int = 0
    #: time.monotonic() when the oldest grammar build still running began (None: none runs).
    #: A build that never ends holds its builder thread for good: the watchdog's concern.
    building_since: float | None = None
