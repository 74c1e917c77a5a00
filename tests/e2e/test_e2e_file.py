"""A file through the whole daemon: ingested as fast as possible, asked about in media time."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_harness import ServeProcess, run_cli, status_once, wait_for
from media import make_video

pytestmark = pytest.mark.integration


def test_a_file_is_watched_to_the_end_and_answered_about(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    video = make_video(tmp_path / "clip.mp4", fps=15, seconds=8.0)
    settings = ["--set", "streams.clip.realtime=false", "--set", "streams.clip.fps=2"]
    daemon = serve("--redis-url", redis_server, "--source", f"clip={video}", *settings)

    def ended() -> dict | None:
        snapshot = status_once(redis_server, cli_env)
        streams = {s["name"]: s for s in snapshot["streams"]} if snapshot else {}
        clip = streams.get("clip")
        return clip if clip and clip["state"] == "ended" and clip["memory"]["tokens"] else None

    clip = wait_for(ended, 90, "the file to be ingested to its end")
    assert clip["clips"] == 4  # 8 s at 2 fps = 16 frames = 4 clips
    start, end = clip["memory"]["span"]
    assert 0.0 <= start < 1.0 and 7.0 < end <= 8.5  # media time, seconds into the file

    result = run_cli("ask", "--json", "--redis-url", redis_server, "--stream", "clip",
                     "--max-new-tokens", "3", "What is in the file?", env=cli_env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["stream"] == ["clip"] and answer["frames"] == 16
    assert all(0.0 <= s["start"] < s["end"] <= 8.5 for s in answer["evidence"])
    assert daemon.terminate() == 0
