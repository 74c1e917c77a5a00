"""A motion-gated camera file through the whole daemon: status and answers show static spans."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_harness import ServeProcess, run_cli, status_once, wait_for
from media import CLOCK_MASK, camera_scene, encode_frames

pytestmark = pytest.mark.integration

FPS = 8
SECONDS = 24
MOTION = (8.0, 12.0)  # someone walks by; the rest is a static scene with a ticking clock


def test_static_clips_are_skipped_and_the_answer_names_them(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    def walker(t: float) -> float | None:
        return (t - MOTION[0]) / (MOTION[1] - MOTION[0]) if MOTION[0] <= t < MOTION[1] else None

    video = encode_frames(
        tmp_path / "cam.mp4",
        (camera_scene(160, 120, i / FPS, object_at=walker(i / FPS)) for i in range(SECONDS * FPS)),
        FPS,
    )
    mask = json.dumps([[list(p) for p in CLOCK_MASK]])
    settings = [
        "--set", "streams.cam.realtime=false",
        "--set", "streams.cam.fps=2",
        "--set", "streams.cam.motion.enabled=true",
        "--set", f"streams.cam.motion.masks={mask}",
    ]  # fmt: skip
    daemon = serve("--redis-url", redis_server, "--source", f"cam={video}", *settings)

    def ended() -> dict | None:
        snapshot = status_once(redis_server, cli_env)
        streams = {s["name"]: s for s in snapshot["streams"]} if snapshot else {}
        cam = streams.get("cam")
        if not cam or cam["state"] != "ended" or not cam["memory"]["tokens"]:
            return None
        span = cam["memory"]["span"]
        return cam if span and span[1] > SECONDS - 1.0 else None

    cam = wait_for(ended, 90, "the file to be ingested to its end")
    motion = cam["motion"]
    assert cam["clips"] == 12  # 24 s at 2 fps = 48 frames
    assert motion["clips_motion"] >= 2 and motion["clips_skipped"] >= 6
    assert cam["memory"]["tokens"] == 64 * (12 - motion["clips_skipped"])
    assert cam["memory"]["static_seconds"] >= 2.0 * motion["clips_skipped"]
    assert motion["encoder_saved_s"] is not None and motion["encoder_saved_s"] > 0.0

    result = run_cli("ask", "--json", "--redis-url", redis_server, "--stream", "cam",
                     "--max-new-tokens", "3", "Did anyone pass by?", env=cli_env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    static = [(s["start"], s["end"]) for s in answer["static"]]
    assert static and all(end <= MOTION[0] + 2.0 or start >= MOTION[1] for start, end in static)
    assert not answer["gaps"]
    assert daemon.terminate() == 0
