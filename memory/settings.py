"""How the rolling token memory is sized, consolidated and persisted (the ``memory:`` section)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

StreamWeight = Annotated[float, Field(gt=0.0, le=1000.0)]


class FrameSettings(BaseModel):
    """Evidence frames: one small JPEG per clip, kept on disk for answers and alerts to cite.

    The folder is the index: ``<dir>/<stream>/<start_ms>_<end_ms>.jpg`` (stream seconds x 1000),
    so the store survives restarts. Disk use is bounded by ``budget_mb`` (the stream holding the
    most bytes loses its oldest frame first) and by ``retention_s``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Keep evidence frames (needs a folder, see dir).")
    dir: str | None = Field(
        None,
        description="Folder for the frames; null: 'frames' inside memory.snapshot_dir, and no "
        "frames when snapshots are off too.",
    )
    max_side_px: int = Field(
        320, ge=16, le=4096, description="Longest side of a stored frame, pixels (never upscaled)."
    )
    jpeg_quality: int = Field(75, ge=10, le=95, description="JPEG quality, 10..95.")
    budget_mb: float = Field(
        256.0,
        gt=0.0,
        le=1_048_576.0,
        description="Disk budget for every stream's frames together, MiB; over it the stream "
        "holding the most bytes loses its oldest frame first.",
    )
    retention_s: float = Field(
        7 * 86_400.0,
        ge=60.0,
        le=366 * 86_400.0,
        description="Frames older than this many stream seconds before their stream's newest "
        "frame are deleted.",
    )
    queue_frames: int = Field(
        32,
        ge=1,
        le=4096,
        description="Frames waiting for the encoder thread at most; beyond it a frame is "
        "dropped and counted (the clip is still encoded, only its picture is missing).",
    )
    max_per_answer: int = Field(
        8, ge=0, le=256, description="Most frames one answer or alert carries (one per span)."
    )


class MemorySettings(BaseModel):
    """The global token budget, how a full stream makes room, and snapshots.

    Budget accounting counts the post-projector tokens only: ``hidden_size x dtype size`` bytes per
    token. The per-token merge sizes (4 bytes per token, float32) and the index are bookkeeping on
    top, well under 1 % for real hidden sizes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget_mb: float = Field(
        64.0,
        gt=0.0,
        le=1_048_576.0,
        description="Global budget for every stream's tokens together, MiB (2**20 bytes).",
    )
    stream_weights: dict[str, StreamWeight] = Field(
        default_factory=dict,
        description="Share weight per stream name (default 1.0 each); a stream's share of the "
        "budget is its weight over the sum of the weights of the streams present.",
    )
    recent_window_s: float = Field(
        600.0,
        ge=0.0,
        le=7 * 86_400.0,
        description="Seconds of newest history never consolidated. If this window alone would "
        "exceed a stream's share, the window shrinks (the budget wins).",
    )
    policy: Literal["merge", "thin"] = Field(
        "merge",
        description="How a full stream makes room: 'merge' token-merges the adjacent old pair "
        "with the lowest StreamForest-style penalty; 'thin' keeps every other old segment.",
    )
    merge_target_tokens: int = Field(
        64,
        ge=1,
        le=65_536,
        description="Tokens a merged pair is reduced to (an absolute count: two 64-token clips "
        "become one 64-token segment covering both spans). Pairs already at or below this "
        "count together are not merged (nothing to gain).",
    )
    consolidate_to: float = Field(
        0.9,
        ge=0.5,
        le=1.0,
        description="When a stream reaches its share, consolidation brings it down to this "
        "fraction of the share, so the cost of compaction is paid once per many appends.",
    )
    consolidate_at: float = Field(
        0.97,
        ge=0.5,
        le=1.0,
        description="Fill fraction of a stream's share at which consolidation starts as "
        "background maintenance (planned off the device thread, written in bounded slices); "
        "an append that finds the share full still consolidates at once. Never below "
        "consolidate_to (the higher of the two applies).",
    )
    similarity_weight: float = Field(
        0.4, ge=0.0, le=1.0, description="Merge penalty weight of dissimilarity (StreamForest g)."
    )
    time_weight: float = Field(
        0.2, ge=0.0, le=1.0, description="Merge penalty weight of recency (StreamForest a)."
    )
    merge_count_weight: float = Field(
        0.4,
        ge=0.0,
        le=1.0,
        description="Merge penalty weight of times already merged (StreamForest b).",
    )
    gap_tolerance_s: float = Field(
        2.0,
        ge=0.0,
        le=3600.0,
        description="A hole between consecutive clips up to this long is absorbed into the next "
        "clip's span; a longer one is recorded as a gap with reason 'unrecorded'.",
    )
    snapshot_dir: str | None = Field(
        None, description="Folder for snapshots; null disables snapshots."
    )
    snapshot_interval_s: float = Field(
        300.0, ge=1.0, le=86_400.0, description="Seconds between periodic snapshots."
    )
    maintenance_chunk_mb: float = Field(
        2.0,
        gt=0.0,
        le=1024.0,
        description="Most MiB of tokens one piece of maintenance handles: copied device -> host "
        "for a snapshot, or written by a consolidation step. The engine's maintenance slices "
        "are made of such pieces.",
    )
    snapshot_queue_chunks: int = Field(
        8,
        ge=1,
        le=1024,
        description="Chunks waiting for the snapshot writer thread at most; when it is full "
        "the copy waits for the next slice (host memory is bounded by this times the chunk).",
    )
    snapshot_compact_ratio: float = Field(
        2.0,
        ge=1.1,
        le=100.0,
        description="When a stream's snapshot files hold this many times the bytes of the "
        "segments still in memory, the live records are rewritten into one fresh file.",
    )

    frames: FrameSettings = Field(
        default_factory=FrameSettings,
        description="Evidence frames: one small JPEG per clip on disk.",
    )

    @model_validator(mode="after")
    def _check(self) -> MemorySettings:
        if self.similarity_weight + self.time_weight + self.merge_count_weight <= 0.0:
            raise ValueError("the merge penalty weights must not all be zero")
        return self

    def frames_dir(self) -> str | None:
        """The evidence frames' folder, or None when frames are off (or have no folder)."""
        if not self.frames.enabled:
            return None
        if self.frames.dir is not None:
            return self.frames.dir
        if self.snapshot_dir is None:
            return None
        return str(Path(self.snapshot_dir) / "frames")
