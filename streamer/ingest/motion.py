"""Motion gating: a cheap change detector per stream, and the policy that skips static clips.

    worker thread: sampled frame [S, S, 3] ─▶ MotionDetector.score ─▶ changed-area fraction
    event loop:    4 scores per clip ─▶ MotionGate.decide ─▶ Gate (encode it, or extend memory)

The detector (OpenCV, in the spirit of Frigate's): the frame shrunk to a small grey image and
blurred, compared with a running-average background (which absorbs slow lighting drift and
sensor noise), pixels differing by more than ``pixel_threshold`` grey levels count as changed,
masked polygons never count; the score is the changed fraction of the unmasked area. It costs a
fraction of a millisecond per sampled frame and runs on the ingest worker thread, never on the
device thread. One detector per connection attempt: a new connection may show another view.

The policy (``MotionGate``, pure state): a clip is encoded when it has motion, when it is the
first after a discontinuity (start, reconnect, hole, dropped clip), or when ``keepalive_s``
passed since the last encode; otherwise it is skipped and the memory extends the stream's newest
segment over its span as ``static``. Every encode is a full clip at the model's input size, so the
first clip in which motion starts is always encoded in full, at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from streamer.ingest.settings import MotionSettings, StreamSettings
from streamer.ingest.types import Gate, MotionStats

# Schemes of IP cameras: gating is on by default for them ("auto").
_CAMERA_SCHEMES = ("rtsp", "rtsps")
_BLUR_PX = 5  # Gaussian kernel on the small grey frame: compression and sensor noise
# Motion fraction shown in status: over this many of the latest gated clips.
_RECENT_CLIPS = 900  # one hour of clips at 1 fps
_EPS_S = 1e-6


def motion_enabled(stream: StreamSettings) -> bool:
    """Whether ``stream`` is gated: ``motion.enabled``, or for ``auto`` whether it is a camera."""
    enabled = stream.motion.enabled
    if enabled == "auto":
        scheme, sep, _ = stream.url.partition("://")
        return bool(sep) and scheme.lower() in _CAMERA_SCHEMES
    return bool(enabled)


def mask_image(settings: MotionSettings, width: int, height: int) -> np.ndarray | None:
    """[height, width] bool, True where pixels count, False inside the ignore polygons (or None)."""
    if not settings.masks:
        return None
    keep = np.full((height, width), 255, np.uint8)
    scale = np.array([width, height], np.float64)
    polygons = [np.round(np.array(p, np.float64) * scale).astype(np.int32) for p in settings.masks]
    cv2.fillPoly(keep, polygons, 0)
    return keep > 0


class MotionDetector:
    """Changed-area fraction of each sampled frame against a running background (one thread)."""

    def __init__(self, settings: MotionSettings, image_size: int) -> None:
        self._settings = settings
        self._width = min(settings.width, image_size)
        self._height = self._width  # sampled frames are square (squashed to the model's input)
        self._keep = mask_image(settings, self._width, self._height)
        self._area = float(
            self._width * self._height if self._keep is None else np.count_nonzero(self._keep)
        )
        self._background: np.ndarray | None = None  # [h, w] float32 grey

    def score(self, rgb: np.ndarray) -> float:
        """Fraction (0..1) of the unmasked area that changed; 0.0 for the first frame.

        ``rgb`` is one sampled frame [S, S, 3] uint8.
        """
        grey_u8 = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)  # grey first: the resize reads 1/3
        small = cv2.resize(grey_u8, (self._width, self._height), interpolation=cv2.INTER_AREA)
        grey = cv2.GaussianBlur(small, (_BLUR_PX, _BLUR_PX), 0).astype(np.float32)  # [h, w]
        background = self._background
        if background is None:
            self._background = grey
            return 0.0
        delta = cv2.absdiff(grey, background)
        changed = delta > self._settings.pixel_threshold  # [h, w] bool
        if self._keep is not None:
            changed &= self._keep
        cv2.accumulateWeighted(grey, background, self._settings.background_alpha)
        if self._area <= 0.0:
            return 0.0  # everything masked: nothing can count
        return float(np.count_nonzero(changed)) / self._area


@dataclass
class _Tally:
    skipped: int = 0
    keepalive: int = 0
    motion: int = 0  # encoded because something moved
    first: int = 0  # encoded after a discontinuity
    static_s: float = 0.0  # stream seconds covered by skipped clips


class MotionGate:
    """Decide, clip by clip, whether a stream's clip is encoded (event loop, pure state).

    ``decide(start, end, scores)`` takes the clip's span (seconds) and its frames' motion scores.
    """

    def __init__(self, settings: MotionSettings) -> None:
        self._settings = settings
        self._last_end: float | None = None  # end of the previous clip, any decision
        self._last_encoded: float | None = None  # start of the last encoded clip
        self._static_since: float | None = None  # start of the current static stretch
        self._recent: deque[bool] = deque(maxlen=_RECENT_CLIPS)  # motion, per clip
        self._tally = _Tally()
        self.last_score = 0.0

    def reset(self) -> None:
        """A discontinuity (reconnect, dropped clip): the next clip is encoded."""
        self._last_end = None

    def decide(self, start: float, end: float, scores: list[float]) -> Gate:
        moved = any(s >= self._settings.min_area for s in scores)
        self.last_score = max(scores, default=0.0)
        self._recent.append(moved)
        tally = self._tally
        last_end, self._last_end = self._last_end, end
        continuous = last_end is not None and abs(start - last_end) <= _period_slack(start, end)
        if not continuous or self._last_encoded is None:
            gate = Gate.FIRST
            tally.first += 1
        elif moved:
            gate = Gate.MOTION
            tally.motion += 1
        elif start - self._last_encoded >= self._settings.keepalive_s - _EPS_S:
            gate = Gate.KEEPALIVE
            tally.keepalive += 1
        else:
            tally.skipped += 1
            tally.static_s += end - start
            if self._static_since is None:
                self._static_since = start
            return Gate.SKIPPED
        self._last_encoded = start
        if gate is not Gate.KEEPALIVE:
            self._static_since = None
        return gate

    def stats(self, detector_s: float, frames_scored: int) -> MotionStats:
        tally, recent = self._tally, self._recent
        return MotionStats(
            clips_skipped=tally.skipped,
            clips_keepalive=tally.keepalive,
            clips_motion=tally.motion,
            clips_first=tally.first,
            static_s=tally.static_s,
            motion_fraction=sum(recent) / len(recent) if recent else 0.0,
            last_score=self.last_score,
            static_since=self._static_since,
            detector_ms_per_frame=1000.0 * detector_s / frames_scored if frames_scored else 0.0,
        )


def _period_slack(start: float, end: float) -> float:
    """How far a clip may start from the previous end and still continue it: half a period."""
    return max(_EPS_S, (end - start) / 8.0)  # a clip is 4 periods long
