"""``testsrc://?size=320x240&fps=10&duration=0``: a synthetic moving pattern with the time
burned in, drawn with numpy (a 3×5 bitmap font; no fonts, no network).

Options (query string): ``size`` WxH (16..4096), ``fps`` (0.1..120), ``duration`` seconds
(0 = forever; > 0 ends the stream). Live (``realtime: true``) frames are paced and stamped with
UTC epoch seconds; otherwise they come as fast as possible with media time from 0.
A frame is only drawn if the sampler keeps it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import numpy as np

from streamer.ingest.errors import SourceFatal
from streamer.ingest.settings import Interpolation, StreamSettings
from streamer.ingest.sources.base import Frame, Source, SourceTraits, resize_rgb

# 3 wide × 5 tall glyphs, rows top to bottom, '1' = ink.
_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    ":": ("000", "010", "000", "010", "000"),
    ".": ("000", "000", "000", "000", "010"),
    " ": ("000", "000", "000", "000", "000"),
}
_GLYPH_BITMAPS = {
    ch: np.array([[c == "1" for c in row] for row in rows], dtype=bool)
    for ch, rows in _GLYPHS.items()
}


@dataclass(frozen=True, slots=True)
class TestsrcOptions:
    width: int = 320
    height: int = 240
    fps: float = 10.0
    duration_s: float = 0.0  # 0 = forever


def parse_testsrc_url(url: str) -> TestsrcOptions:
    """Options from a ``testsrc://?…`` URL; SourceFatal on a bad value or unknown key."""
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    unknown = set(query) - {"size", "fps", "duration"}
    if unknown:
        raise SourceFatal(f"testsrc: unknown option(s) {', '.join(sorted(unknown))}")
    try:
        width, height = (320, 240)
        if "size" in query:
            w_text, _, h_text = query["size"][-1].lower().partition("x")
            width, height = int(w_text), int(h_text)
        fps = float(query["fps"][-1]) if "fps" in query else 10.0
        duration = float(query["duration"][-1]) if "duration" in query else 0.0
    except ValueError as exc:
        raise SourceFatal(f"testsrc: bad option value ({exc})") from None
    if not (16 <= width <= 4096 and 16 <= height <= 4096):
        raise SourceFatal("testsrc: size must be within 16x16..4096x4096")
    if not (0.1 <= fps <= 120.0) or not (0.0 <= duration < 1e9):
        raise SourceFatal("testsrc: fps must be within 0.1..120 and duration >= 0")
    return TestsrcOptions(width, height, fps, duration)


def draw_text(canvas: np.ndarray, text: str, x: int, y: int, scale: int) -> None:
    """Burn ``text`` (digits ':' '.' ' ') into ``canvas`` [H, W, 3], white on black, in place."""
    h, w = canvas.shape[:2]
    for i, ch in enumerate(text):
        glyph = np.kron(_GLYPH_BITMAPS.get(ch, _GLYPH_BITMAPS[" "]), np.ones((scale, scale), bool))
        gx = x + i * 4 * scale
        box = canvas[y : y + glyph.shape[0] + scale, gx - scale : gx + glyph.shape[1] + scale]
        box[...] = 0  # a black box so the digits read on any background
        top, left = min(glyph.shape[0], h - y), min(glyph.shape[1], w - gx)
        if top > 0 and left > 0:
            canvas[y : y + top, gx : gx + left][glyph[:top, :left]] = 255


def render_pattern(width: int, height: int, t: float) -> np.ndarray:
    """A moving colour gradient and a bouncing square, time ``t`` written at the top left.

    Returns ``[height, width, 3]`` uint8 RGB.
    """
    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    phase = (t * 40.0) % width
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = ((xs + phase) * (255.0 / width)) % 256
    img[..., 1] = (ys * (255.0 / height)).astype(np.uint8)
    img[..., 2] = 128
    side = max(4, min(width, height) // 5)
    bx = int((0.5 + 0.5 * math.sin(t * 1.3)) * (width - side))
    by = int((0.5 + 0.5 * math.cos(t * 0.9)) * (height - side))
    img[by : by + side, bx : bx + side] = (255, 255, 0)
    clock = time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t * 10) % 10}"
    scale = max(1, min(width // 60, height // 20))
    draw_text(img, clock, 2 * scale, 2 * scale, scale)
    return img


class _PatternFrame(Frame):
    __slots__ = ("height", "width")

    def __init__(self, width: int, height: int, time_s: float) -> None:
        super().__init__(time_s)
        self.width = width
        self.height = height

    def to_rgb(self, size: int, interpolation: Interpolation) -> np.ndarray:
        return resize_rgb(render_pattern(self.width, self.height, self.time), size, interpolation)


class TestSource(Source):
    """The synthetic source. Live when ``realtime`` (the default)."""

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, settings: StreamSettings, clock: Callable[[], float]) -> None:
        super().__init__()
        self._options = parse_testsrc_url(settings.url)
        self._realtime = settings.realtime
        self.traits = SourceTraits(live=settings.realtime)
        self._clock = clock

    def open(self, stop: threading.Event) -> None:
        self.nominal_fps = self._options.fps

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        o = self._options
        period = 1.0 / o.fps
        count = math.inf if o.duration_s <= 0 else math.ceil(o.duration_s * o.fps)
        started = time.monotonic()
        i = 0
        while i < count and not stop.is_set():
            if self._realtime:
                delay = started + i * period - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    return
                stamp = self._clock()
            else:
                stamp = i * period
            yield _PatternFrame(o.width, o.height, stamp)
            i += 1
