"""Evidence frames: CPU per clip to keep one JPEG, and disk bytes per hour per stream.

Frames are the sampled frames' size (448 px, the 448-px checkpoints' input) of a synthetic
static camera with a walker and a ticking clock (tests/helpers/media.py ``camera_scene``). Per
clip the store encodes one frame (PIL JPEG, shrunk to ``max_side_px``) and writes it atomically
(tmp + rename) into a temporary folder, through ``memory.frames.FrameStore.write``, the encoder
thread's step.

Baseline, measured in the same run: the motion detector's CPU for the same clip's 4 frames
(``streamer.ingest.motion.MotionDetector``), the other per-clip CPU work ingest does off the
device thread. ``ratio`` = frame store per clip / detector per clip.

Bytes per hour per stream: the mean stored JPEG size x the clips of an hour (4 frames per clip)
at 1 and 2 sampled frames per second, for each size and quality measured.

    python benchmarks/frames_cost.py [--clips 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from memory.frames import FrameStore
from memory.settings import FrameSettings
from streamer.ingest.clips import FRAMES_PER_CLIP
from streamer.ingest.motion import MotionDetector
from streamer.ingest.settings import MotionSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from media import camera_scene

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 448
SETTINGS = [(320, 75), (224, 60), (448, 85)]  # (max_side_px, jpeg_quality); the first: defaults


def scene(clips: int) -> list[np.ndarray]:
    """One frame per clip position: the walker crosses now and then, the clock ticks."""
    frames = []
    for i in range(clips * FRAMES_PER_CLIP):
        t = i * 1.0
        walker = (i % 120) / 30.0 if i % 120 < 30 else None
        frames.append(camera_scene(SIZE, SIZE, t, object_at=walker))
    return frames


def store_cost(frames: list[np.ndarray], max_side: int, quality: int) -> tuple[float, float]:
    """(CPU ms per clip, mean bytes per frame) of keeping each clip's middle frame."""
    with tempfile.TemporaryDirectory() as folder:
        store = FrameStore(FrameSettings(max_side_px=max_side, jpeg_quality=quality), Path(folder))
        store.open()
        clips = len(frames) // FRAMES_PER_CLIP
        start = time.process_time()
        for c in range(clips):
            still = frames[c * FRAMES_PER_CLIP + FRAMES_PER_CLIP // 2]
            store.write("cam", 4.0 * c, 4.0 * c + 4.0, still)
        cpu_s = time.process_time() - start
        stats = store.stats()
        store.close()
    return cpu_s * 1e3 / clips, stats.bytes / stats.frames


def detector_cost(frames: list[np.ndarray]) -> float:
    """CPU ms per clip of the motion detector (the baseline)."""
    detector = MotionDetector(MotionSettings(), SIZE)
    start = time.process_time()
    for frame in frames:
        detector.score(frame)
    return (time.process_time() - start) * 1e3 / (len(frames) / FRAMES_PER_CLIP)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    args = parser.parse_args()
    frames = scene(args.clips)
    store_cost(frames[: 8 * FRAMES_PER_CLIP], *SETTINGS[0])  # warm up PIL
    baseline_ms = detector_cost(frames)
    rows = []
    for max_side, quality in SETTINGS:
        ms, size = store_cost(frames, max_side, quality)
        per_hour = {
            f"fps_{fps:g}": round(size * 3600 * fps / FRAMES_PER_CLIP) for fps in (1.0, 2.0)
        }
        rows.append({"max_side_px": max_side, "jpeg_quality": quality,
                     "ms_per_clip": round(ms, 3), "bytes_per_frame": round(size),
                     "bytes_per_hour_per_stream": per_hour,
                     "ratio_to_detector": round(ms / baseline_ms, 3)})  # fmt: skip
    result = {
        "frame_px": SIZE,
        "clips": args.clips,
        "baseline": {
            "what": "motion detector CPU per 4-frame clip",
            "ms_per_clip": round(baseline_ms, 3),
        },
        "settings": rows,
        "ms_per_clip": rows[0]["ms_per_clip"],
        "bytes_per_hour_per_stream": rows[0]["bytes_per_hour_per_stream"],
        "ratio": rows[0]["ratio_to_detector"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "frames_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
