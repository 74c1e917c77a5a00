"""Test videos generated with PyAV (libx264), for any test folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av
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
