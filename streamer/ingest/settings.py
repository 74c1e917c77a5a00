"""Ingest configuration: one stream (``streams:`` items) and the ``ingest:`` section.

Every model forbids unknown keys, is frozen, and says each field's unit and bounds.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

Interpolation = Literal["AREA", "BILINEAR", "FAST_BILINEAR", "BICUBIC"]
# What a browser sends as Origin: scheme://host[:port], no path.
_ORIGIN = re.compile(r"https?://[^\s/?#@]+")

# A mask vertex: (x, y) as fractions of the frame's width and height, 0 (left/top) to 1.
Point = tuple[Annotated[float, Field(ge=0.0, le=1.0)], Annotated[float, Field(ge=0.0, le=1.0)]]
Polygon = Annotated[list[Point], Field(min_length=3, max_length=64)]


class MotionSettings(BaseModel):
    """Motion gating of one stream: clips in which nothing changed are not encoded.

    Mask polygons are in normalised coordinates (fractions of the width and height, origin
    top-left), so one mask fits every resolution of a source and survives the squash to the
    model's square input.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool | Literal["auto"] = Field(
        default="auto",
        description=(
            "Gate the encoder by motion. auto: on for cameras (rtsp://, rtsps://), off for "
            "broadcasts (rtmp, http, srt), WHIP publishers, files and testsrc."
        ),
    )
    keepalive_s: float = Field(
        default=120.0,
        ge=4.0,
        le=86_400.0,
        description="Encode a static scene anyway this often (light drifts), seconds.",
    )
    width: int = Field(
        default=64, ge=16, le=512, description="Detector works on a grey frame this wide, px."
    )
    pixel_threshold: int = Field(
        default=25,
        ge=1,
        le=255,
        description="A pixel changed if it differs this much from the background, grey levels.",
    )
    min_area: float = Field(
        default=0.005,
        gt=0.0,
        le=1.0,
        description="Motion when at least this fraction of the unmasked frame changed.",
    )
    background_alpha: float = Field(
        default=0.05,
        gt=0.0,
        le=1.0,
        description="Background update weight per sampled frame (higher forgets faster).",
    )
    masks: list[Polygon] = Field(
        default_factory=list,
        max_length=32,
        description="Polygons to ignore (timestamps, trees, a road), [[x, y], ...] in 0..1.",
    )


class StreamSettings(BaseModel):
    """One video source and how to sample it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Stream name (ids, Redis keys, WHIP path).",
    )
    url: str = Field(
        ...,
        min_length=1,
        max_length=4096,
        description=(
            "rtsp:// rtmp:// http(s):// srt:// (PyAV), file:// or a path, "
            "testsrc://?size=WxH&fps=N, or whip:// / whip://NAME (frames from WHIP publishers)."
        ),
    )
    fps: float = Field(
        default=1.0, gt=0.0, le=30.0, description="Sampling rate, frames per second."
    )
    weight: float = Field(
        default=1.0,
        gt=0.0,
        le=1000.0,
        description="Its load for fleet placement: auto (streams are balanced by weight).",
    )
    realtime: bool = Field(
        default=True,
        description="Files and testsrc: pace in real time (True) or as fast as possible.",
    )
    loop: bool = Field(
        default=False, description="Files: start again at the end instead of ending."
    )
    rtsp_transport: Literal["tcp", "udp"] = Field(
        default="tcp", description="RTSP lower transport."
    )
    timeout_s: float = Field(
        default=5.0,
        ge=0.5,
        le=120.0,
        description="Socket open/read timeout for network sources, seconds.",
    )
    queue_clips: int = Field(
        default=8, ge=1, le=1024, description="Clips buffered for the encoder."
    )
    queue_frames: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="Sampled frames buffered between decoder thread and clips.",
    )
    interpolation: Interpolation = Field(
        default="AREA", description="swscale filter for the resize to the model's square input."
    )
    decode_threads: Literal["AUTO", "SLICE", "FRAME", "NONE"] = Field(
        default="AUTO", description="FFmpeg decoder threading (AUTO is frame + slice)."
    )
    motion: MotionSettings = Field(
        default_factory=MotionSettings, description="Motion gating of the encoder."
    )


class WhipSettings(BaseModel):
    """The WHIP (WebRTC ingest) HTTP endpoint shared by every ``whip://`` stream."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=False, description="Start the endpoint even if no stream is whip://."
    )
    host: str = Field(
        default="127.0.0.1", min_length=1, description="Bind address (loopback by default)."
    )
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    token: SecretStr | None = Field(
        default=None,
        description="Bearer token publishers must send; None accepts anyone (loopback only).",
    )
    max_body_bytes: int = Field(
        default=64_000, ge=1_000, le=1_000_000, description="Largest SDP offer accepted, bytes."
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        max_length=64,
        description=(
            "Browser page origins allowed to publish (scheme://host[:port]); empty: none, "
            '["*"]: any page.'
        ),
    )
    frame_buffer: int = Field(
        default=4, ge=1, le=256, description="Decoded frames buffered per session (oldest dropped)."
    )
    max_sessions: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Concurrent publisher sessions, all streams together.",
    )
    max_connections: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Open HTTP connections, all clients together; past it: 503 and closed.",
    )
    header_timeout_s: float = Field(
        default=5.0,
        gt=0.0,
        le=120.0,
        description="A connection must send its request headers within this, s; else 408.",
    )
    body_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        le=120.0,
        description="The SDP offer must arrive within this after the headers, s; else 408.",
    )
    replace_interval_s: float = Field(
        default=2.0,
        ge=0.0,
        le=3600.0,
        description=(
            "A stream's live publisher is replaced at most once per this, s; "
            "sooner: 429 with Retry-After (0: no limit)."
        ),
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], or *)")
        return origins

    @model_validator(mode="after")
    def _token_off_loopback(self) -> WhipSettings:
        if self.token is None and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("whip.token is required when whip.host is not a loopback address")
        return self


class IngestSettings(BaseModel):
    """Reconnects, watchdog and the WHIP endpoint, shared by all streams."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backoff_initial_s: float = Field(
        default=1.0, gt=0.0, le=60.0, description="First reconnect delay, s."
    )
    backoff_max_s: float = Field(
        default=30.0, gt=0.0, le=3600.0, description="Largest reconnect delay, s."
    )
    backoff_jitter: float = Field(
        default=0.2, ge=0.0, le=1.0, description="Random spread of each delay, as a fraction (±)."
    )
    healthy_reset_s: float = Field(
        default=60.0,
        gt=0.0,
        le=86_400.0,
        description="Live this long → the backoff starts over, s.",
    )
    stall_factor: float = Field(
        default=10.0,
        ge=1.0,
        le=1000.0,
        description="Stalled after this many missing frame periods.",
    )
    stall_floor_s: float = Field(
        default=5.0, gt=0.0, le=600.0, description="Never call a stall sooner than this, s."
    )
    offline_after_s: float = Field(
        default=10.0,
        ge=0.0,
        le=3600.0,
        description="An outage longer than this shows as offline, s.",
    )
    open_grace_s: float = Field(
        default=2.0,
        ge=0.0,
        le=600.0,
        description="Extra time over timeout_s for opening a source, s.",
    )
    max_corrupt_packets: int = Field(
        default=200, ge=1, le=1_000_000, description="Consecutive undecodable packets → disconnect."
    )
    whip: WhipSettings = Field(default_factory=WhipSettings, description="WHIP endpoint.")

    @model_validator(mode="after")
    def _backoff_order(self) -> IngestSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self
