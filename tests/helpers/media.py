"""Test videos generated with PyAV (libx264), for any test folder; a synthetic camera scene."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np


def encode_frames(
    path: Path,
    frames: Iterator[np.ndarray],
    fps: int,
    *,
    fmt: str | None = None,
    gop: int | None = None,
) -> Path:
    """Encode RGB frames ``[H, W, 3]`` with libx264 (ultrafast, no B-frames) into ``path``."""
    first = next(frames)
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(gop or fps), "bf": "0", "preset": "ultrafast"}
        for img in (first, *frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def pattern_frames(width: int, height: int, n: int) -> Iterator[np.ndarray]:
    """``n`` frames whose red channel encodes the frame index (i * 8 mod 256) plus a moving bar."""
    for i in range(n):
        img = np.zeros((height, width, 3), np.uint8)
        img[..., 0] = (i * 8) % 256
        img[:, (i * 4) % width] = 255
        yield img


def make_video(
    path: Path, *, width: int = 320, height: int = 240, fps: int = 15, seconds: float = 4.0
) -> Path:
    return encode_frames(path, pattern_frames(width, height, int(fps * seconds)), fps)


# ---- a static camera scene (motion gating) ------------------------------------------------

# The clock overlay lies inside this polygon (normalised [x, y] vertices, as motion masks take).
CLOCK_MASK = [(0.0, 0.0), (0.62, 0.0), (0.62, 0.25), (0.0, 0.25)]
_CLOCK_TEXT_WIDTH = 0.56  # of the frame width
_FONT = cv2.FONT_HERSHEY_SIMPLEX


@functools.lru_cache(maxsize=4)
def _backdrop(width: int, height: int, seed: int) -> np.ndarray:
    """A fixed street-like scene: smooth gradient, a few blocks, fine texture. [H, W, 3] uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack(
        [60 + 80 * x / width, 70 + 60 * y / height, 90 + 40 * (x + y) / (width + height)]
    )
    img = np.ascontiguousarray(np.moveaxis(img, 0, -1))
    for _ in range(6):
        x0, y0 = (
            int(rng.integers(0, width * 3 // 4)),
            int(rng.integers(height // 5, height * 3 // 4)),
        )
        w, h = (
            int(rng.integers(width // 10, width // 4)),
            int(rng.integers(height // 10, height // 3)),
        )
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(40, 200, 3)
    img += rng.normal(0.0, 4.0, img.shape)
    img.setflags(write=False)
    return img


def camera_scene(
    width: int,
    height: int,
    t: float,
    *,
    object_at: float | None = None,
    light: float = 1.0,
    clock: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """One frame [H, W, 3] uint8 of a static camera at time ``t`` seconds.

    ``object_at`` (0..1): a person-sized block that far across the frame (None: nobody);
    ``light``: a brightness factor (slow drift); ``clock``: a ticking HH:MM:SS.d overlay, top-left,
    inside ``CLOCK_MASK``.
    """
    img = _backdrop(width, height, seed) * light
    if object_at is not None:
        ow, oh = max(2, width // 6), max(2, height // 3)
        x0, y0 = int(object_at * (width - ow)), height // 2
        img[y0 : y0 + oh, x0 : x0 + ow] = (25.0, 20.0, 30.0)  # dark: far from the grey scene
    frame = np.clip(img, 0, 255).astype(np.uint8)
    if clock:
        seconds, tenths = int(t), int(t * 10) % 10
        text = f"{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}.{tenths}"
        thickness = max(1, height // 30)
        (tw, th), _ = cv2.getTextSize("00:00:00.0", _FONT, 1.0, thickness)
        scale = _CLOCK_TEXT_WIDTH * width / tw
        org = (max(1, width // 50), int(0.03 * height + th * scale))
        frame[: int(0.24 * height), : int(0.61 * width)] = 0
        cv2.putText(frame, text, org, _FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return frame
