"""Budget arithmetic: bytes per token, per-stream shares, hours of history a share holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

MIB = 2**20
SECONDS_PER_HOUR = 3600.0


def bytes_per_token(hidden_size: int, dtype_bytes: int) -> int:
    """Bytes of one post-projector token: ``hidden_size x dtype size``."""
    if hidden_size < 1 or dtype_bytes < 1:
        raise ValueError("hidden_size and dtype_bytes must be positive")
    return hidden_size * dtype_bytes


def budget_bytes(budget_mb: float) -> int:
    """The global budget in bytes (``budget_mb`` is MiB)."""
    return int(budget_mb * MIB)


def stream_shares(
    total_bytes: int, token_bytes: int, streams: Sequence[str], weights: Mapping[str, float]
) -> dict[str, int]:
    """Each stream's share of the global budget, in whole tokens.

    A stream's share is ``weight / sum(weights)`` of the budget (weight 1.0 unless configured),
    rounded down to whole tokens, so the shares never add up to more than the budget.
    """
    if not streams:
        return {}
    w = {name: float(weights.get(name, 1.0)) for name in streams}
    total_weight = sum(w.values())
    total_tokens = total_bytes // token_bytes
    return {name: int(total_tokens * w[name] / total_weight) for name in streams}


def capacity_hours(share_tokens: int, fps: float, tokens_per_frame: float) -> float | None:
    """Hours of full-resolution history a share holds at ``fps`` sampled frames per second.

    ``None`` when the rate is unknown (``fps <= 0``). Example: 57,600 tokens at 1 fps and 16
    tokens per frame is exactly one hour.
    """
    if fps <= 0.0 or tokens_per_frame <= 0.0:
        return None
    return share_tokens / (tokens_per_frame * fps * SECONDS_PER_HOUR)
