"""CPU cost of ingesting 1080p30 live streams sampled at 1 fps, and how it scales with 1-8 streams.

Each stream is a paced (real-time) looping file source: the same decode → sample-by-timestamp →
448x448 resize → clip path a camera takes, minus the network. For N = 1, 2, 4, 8 concurrent
streams, the process CPU time (all threads) over a measuring window is divided by the minutes of
video actually decoded in it (frames decoded / the file's frame rate, summed over streams): CPU
seconds per minute of video decoded, not per minute of wall time, so a stream that fell behind
cannot look cheap. Baseline in the same run: decoding every frame of the same file with raw PyAV
(CPU seconds per minute of video, one stream), so the ratio shows the ingest overhead.
Every stream must keep real time (decoded fps at least ``REAL_TIME_FRACTION`` of the file's);
the run fails (exit status 1, after writing the JSON) if one did not.

    python benchmarks/ingest_cpu.py [--window 15] [--warmup 3] [--streams 1 2 4 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import av
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from ingest_throughput import make_1080p

from streamer.ingest.settings import IngestSettings, StreamSettings
from streamer.ingest.supervisor import StreamIngest

RESULTS = Path(__file__).resolve().parent / "results"
IMAGE_SIZE = 448
REAL_TIME_FRACTION = 0.95  # decoded fps / the file's fps a stream must reach to count as real time


def video_fps(path: Path) -> float:
    with av.open(str(path)) as container:
        return float(container.streams.video[0].average_rate or 30)


def raw_decode_cpu_per_minute(path: Path) -> float:
    """CPU seconds to decode one minute of the video with raw PyAV (every frame)."""
    cpu0 = time.process_time()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = sum(1 for _ in container.decode(stream))
        fps = float(stream.average_rate or 30)
    return (time.process_time() - cpu0) / (frames / fps) * 60.0


async def measure(
    path: Path, n: int, warmup_s: float, window_s: float, threads: str = "AUTO"
) -> dict[str, float | bool]:
    ingests = [
        StreamIngest(
            StreamSettings(
                name=f"cam{i}",
                url=str(path),
                fps=1.0,
                realtime=True,
                loop=True,
                decode_threads=threads,  # type: ignore[arg-type]
            ),
            IngestSettings(),
            image_size=IMAGE_SIZE,
            on_gap=lambda g: None,
        )
        for i in range(n)
    ]
    tasks = [asyncio.ensure_future(ing.run()) for ing in ingests]

    async def drain() -> None:  # the engine's role: take clips as they come
        while True:
            for ing in ingests:
                while ing.clips.get_nowait() is not None:
                    pass
            await asyncio.sleep(0.05)

    drainer = asyncio.ensure_future(drain())
    try:
        await asyncio.sleep(warmup_s)
        frames0 = [ing.stats().frames_in for ing in ingests]
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(window_s)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        decoded = [ing.stats().frames_in - f0 for ing, f0 in zip(ingests, frames0, strict=True)]
    finally:
        for task in (*tasks, drainer):
            task.cancel()
        await asyncio.gather(*tasks, drainer, return_exceptions=True)
    source_fps = video_fps(path)
    video_min = sum(decoded) / source_fps / 60.0  # minutes of video decoded, all streams
    per_video_min = cpu / video_min if video_min > 0 else float("inf")
    fps = [d / wall for d in decoded]
    return {
        "streams": n,
        "video_min_decoded": video_min,
        # CPU seconds per minute of video decoded, for one stream ...
        "cpu_s_per_min_per_stream": per_video_min,
        # ... and for all N streams running in real time together
        "cpu_s_per_min_total": per_video_min * n,
        "cores_busy": cpu / wall,
        "min_stream_fps": min(fps),
        "mean_stream_fps": sum(fps) / n,
        "source_fps": source_fps,
        "real_time_kept": min(fps) >= REAL_TIME_FRACTION * source_fps,
    }


def plot(rows: list[dict[str, float | bool]], raw_per_min: float, path: Path) -> None:
    ns = [r["streams"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [r["cpu_s_per_min_total"] for r in rows], "o-", label="ingest, all streams")
    ax.plot(ns, [rows[0]["cpu_s_per_min_per_stream"] * n for n in ns], "--", label="linear from 1")
    ax.plot(ns, [raw_per_min * n for n in ns], ":", label="raw PyAV decode × N")
    ax.axhline(60.0 * (os.cpu_count() or 1), color="grey", lw=0.8, label="all cores")
    ax.set_xlabel("concurrent 1080p30 streams (sampled at 1 fps)")
    ax.set_ylabel("CPU seconds per minute of video")
    ax.set_xticks(ns)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=15.0, help="measuring window, s")
    parser.add_argument("--warmup", type=float, default=3.0, help="ignored start, s")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", default="AUTO", choices=["AUTO", "SLICE", "FRAME", "NONE"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_1080p(Path(tmp) / "1080p30.mp4", seconds=10.0)
        raw_per_min = raw_decode_cpu_per_minute(path)
        print(f"raw PyAV decode: {raw_per_min:.1f} CPU s per minute of video")
        rows = []
        for n in args.streams:
            row = asyncio.run(measure(path, n, args.warmup, args.window, args.threads))
            row["ratio_per_stream_vs_raw_decode"] = row["cpu_s_per_min_per_stream"] / raw_per_min
            rows.append(row)
            print(
                json.dumps({k: v if isinstance(v, bool) else round(v, 3) for k, v in row.items()})
            )
    result = {
        "benchmark": "ingest_cpu",
        "video": "1920x1080 H.264 30 fps, paced in real time, looping; sampled at 1 fps to 448x448",
        "window_s": args.window,
        "decode_threads": args.threads,
        "raw_decode_cpu_s_per_min": raw_per_min,
        "rows": rows,
        "cpus": os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, raw_per_min, RESULTS / "ingest_cpu.png")
    print(f"wrote {RESULTS / 'ingest_cpu.json'} and ingest_cpu.png")
    behind = [row["streams"] for row in rows if not row["real_time_kept"]]
    if behind:
        raise SystemExit(
            f"real time NOT kept with {behind} stream(s): the figures there are not "
            f"per-real-time-minute costs (see min_stream_fps)"
        )


if __name__ == "__main__":
    main()
