"""The engine's own settings: scheduling policy, failure escalation, start-up."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    encode_batch_clips: int = Field(
        8,
        ge=1,
        le=256,
        description="Most clips encoded in one batch (across streams); the daemon takes it "
        "from model.encode_batch_clips (a different value here is refused).",
    )
    decode_batch_max: int = Field(
        8, ge=1, le=256, description="Most in-flight answers advanced by one batched decode step."
    )
    prefill_chunk_tokens: int = Field(
        2048,
        ge=16,
        le=131_072,
        description="Most prompt tokens prefilled in one step; encoding waits at most one chunk.",
    )
    query_share: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Fraction of device time queries may take while clips wait to be encoded.",
    )
    evaluation_share: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Fraction of device time standing-query scoring may take: while clips "
        "wait, on top of the encoder's time (0.2: a quarter of it); else while queries also "
        "have work.",
    )
    evaluation_max_queued: int = Field(
        16,
        ge=1,
        le=1024,
        description="Scoring rounds (one window, its questions) waiting at most; more are "
        "refused busy.",
    )
    evaluation_max_questions: int = Field(
        64, ge=1, le=1024, description="Most questions in one scoring round."
    )
    selection_grid_s: float = Field(
        8.0,
        ge=0.0,
        le=3600.0,
        description="Seconds: an over-budget selection's open end snaps down to this grid, so "
        "questions asked close together read the same memory and share its prefix KV "
        "(0 = no snapping).",
    )
    prefix_cache_mb: float = Field(
        256.0, ge=0.0, le=1_048_576.0, description="Bound of the prefix KV cache, MiB (0 = off)."
    )
    kv_slot_text_tokens: int = Field(
        2048,
        ge=64,
        le=131_072,
        description="Text tokens one preallocated KV slot holds besides the visual tokens and "
        "the answer; a longer prompt gets its own cache and is decoded alone.",
    )
    maintenance_slice_s: float = Field(
        0.05, gt=0.0, le=10.0, description="Seconds of memory maintenance per slice."
    )
    maintenance_max_wait_s: float = Field(
        5.0, gt=0.0, le=3600.0, description="Seconds due maintenance may wait behind other work."
    )
    stream_failure_limit: int = Field(
        5, ge=1, le=10_000, description="Failed encodes in a row after which a stream is failed."
    )
    device_failure_limit: int = Field(
        10,
        ge=1,
        le=10_000,
        description="Failed device steps in a row (nothing succeeding between) after which the "
        "engine, and so the daemon, stops as failed.",
    )
    warm_up: bool = Field(True, description="Run one throw-away encode/prefill/decode at start.")
