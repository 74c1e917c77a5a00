"""The engine's counters, and the immutable snapshot of them that status views read."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True, slots=True)
class EngineStats:
    clips_encoded: int
    batches: int
    last_batch_ms: float
    lag_s: float  # how late (vs the wall clock) the oldest clip of the last batch was encoded
    refused: dict[str, int]  # clips the memory refused (not newer than it), by stream
    encode_failures: dict[str, int]  # clips that failed to encode, by cause
    failed_streams: dict[str, str]  # stream -> why it was failed (its clips are dropped)
    dropped_failed: dict[str, int]  # clips dropped because their stream was failed
    state: Literal["running", "failed"]
    failure: str | None  # why the engine failed
    pending: int
    waiting_memory: int  # queued queries waiting for their streams' first memory
    in_flight: int
    completed: int
    failed: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    ttft_p95_s: float | None
    warm_up_s: float | None
    prefix_hits: int  # prefills resumed from a cached question-independent prefix
    prefix_misses: int
    kv_slots_free: int
    encode_ms_per_clip: float | None = None  # mean device time per encoded clip


@dataclass
class Counters:
    clips_encoded: int = 0
    batches: int = 0
    last_batch_ms: float = 0.0
    lag_s: float = 0.0
    encode_s: float = 0.0  # device seconds spent in encode batches
    completed: int = 0
    failed: int = 0
    warm_up_s: float | None = None
    refused: Counter[str] = field(default_factory=Counter)
    dropped_failed: Counter[str] = field(default_factory=Counter)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    ttfts: deque[float] = field(default_factory=lambda: deque(maxlen=256))


def percentile(values: deque[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.fromiter(values, dtype=float), q))
