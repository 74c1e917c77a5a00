"""Ingest path throughput vs raw PyAV decode of the same 1080p H.264 file, in the same run.

The ingest path is the whole per-stream pipeline (``StreamIngest`` on a file read as fast as
possible: decode on a worker thread, sample by timestamp at 1 fps, resize to 448x448 RGB, clip
assembly, the bounded queues). Raw decode is ``av.open`` + ``container.decode`` of every frame
with the same threading. Sampling by timestamp converts only the frames it keeps, so the ratio
should be close to 1 (target >= 0.9).

    python benchmarks/ingest_throughput.py [--seconds 10] [--repeats 3] [--fps 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from streamer.ingest.settings import IngestSettings, StreamSettings
from streamer.ingest.sources.testsrc import render_pattern
from streamer.ingest.supervisor import StreamIngest
from streamer.ingest.types import StreamState

RESULTS = Path(__file__).resolve().parent / "results" / "ingest_throughput.json"
IMAGE_SIZE = 448


def make_1080p(path: Path, seconds: float, fps: int = 30) -> Path:
    """A 1920x1080 H.264 (libx264 veryfast, GOP 1 s, no B-frames) moving pattern with texture."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (270, 480, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        stream.options = {"g": str(fps), "bf": "0", "preset": "veryfast", "crf": "23"}
        for i in range(int(seconds * fps)):
            img = render_pattern(1920, 1080, i / fps)
            shift = (i * 8) % 480
            img[600:870, 100:580] = np.roll(texture, shift, axis=1)  # detail that moves
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def raw_decode(path: Path) -> tuple[int, float]:
    """(frames, seconds) to decode every frame with PyAV, frame+slice threads."""
    started = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = sum(1 for _ in container.decode(stream))
    return frames, time.perf_counter() - started


async def ingest_path(path: Path, fps: float) -> tuple[int, int, float]:
    """(frames decoded, clips, seconds) for StreamIngest to read the whole file."""
    settings = StreamSettings(name="bench", url=str(path), fps=fps, realtime=False)
    ingest = StreamIngest(settings, IngestSettings(), image_size=IMAGE_SIZE, on_gap=lambda g: None)
    started = time.perf_counter()
    task = asyncio.ensure_future(ingest.run())
    clips = 0
    try:
        while ingest.state is not StreamState.ENDED or not ingest.clips.empty():
            clip = ingest.clips.get_nowait()
            if clip is None:
                await asyncio.sleep(0.002)
                continue
            clips += 1
        elapsed = time.perf_counter() - started
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return ingest.stats().frames_in, clips, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="video length, s")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fps", type=float, default=1.0, help="sampling rate of the ingest path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "1080p.mp4"
        started = time.perf_counter()
        make_1080p(path, args.seconds)
        print(
            f"generated {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s"
        )
        raw_decode(path)  # warm the page cache and the codec
        raw_fps, ingest_fps = [], []
        for _ in range(args.repeats):  # interleaved so drift hits both alike
            frames, seconds = raw_decode(path)
            raw_fps.append(frames / seconds)
            n, clips, seconds = asyncio.run(ingest_path(path, args.fps))
            ingest_fps.append(n / seconds)
            print(f"raw {raw_fps[-1]:.0f} fps | ingest {ingest_fps[-1]:.0f} fps ({clips} clips)")
    result = {
        "benchmark": "ingest_throughput",
        "video": {
            "width": 1920,
            "height": 1080,
            "fps": 30,
            "seconds": args.seconds,
            "codec": "h264",
        },
        "sampling_fps": args.fps,
        "image_size": IMAGE_SIZE,
        "raw_decode_fps": {"median": statistics.median(raw_fps), "all": raw_fps},
        "ingest_fps": {"median": statistics.median(ingest_fps), "all": ingest_fps},
        "ratio_ingest_over_raw": statistics.median(ingest_fps) / statistics.median(raw_fps),
        "target_ratio": 0.9,
        "machine": {
            "cpus": __import__("os").cpu_count(),
            "python": platform.python_version(),
            "av": av.__version__,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("raw_decode_fps", "ingest_fps", "ratio_ingest_over_raw")}
        )
    )


if __name__ == "__main__":
    main()
