"""Evidence frames end to end: a real daemon (tiny demo model, testsrc) keeps one JPEG per clip,
answers carry the frames of the spans they cite (path and URL), ``ask --frames`` saves them, the
HTTP route serves them, forget deletes the frames of the interval, and a restart deletes frames
newer than the restored memory (what a crash leaves)."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_harness import ServeProcess, run_cli, status_once, wait_for
from PIL import Image

pytestmark = pytest.mark.integration

WAIT_S = 90.0  # generous: the machine is shared


def _is_jpeg(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.format == "JPEG"


def test_answers_carry_frames_that_ask_saves_and_forget_deletes(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    snapshots = tmp_path / "snapshots"
    daemon = serve("--redis-url", redis_server, "--set", f"memory.snapshot_dir={snapshots}",
                   "--set", "memory.frames.max_per_answer=4")  # fmt: skip

    def with_frames() -> dict[str, Any] | None:
        snapshot = status_once(redis_server, cli_env)
        frames = snapshot.get("frames") if snapshot else None
        return snapshot if frames and frames["frames"] >= 4 else None

    status = wait_for(with_frames, WAIT_S, "four evidence frames in status")
    assert status["frames"]["bytes"] > 0 and status["frames"]["failed"] == 0
    folder = snapshots / "frames" / "demo"  # the default: inside the snapshot folder
    assert len(list(folder.glob("*.jpg"))) >= 4

    saved = tmp_path / "saved"
    asked = run_cli("ask", "--json", "--redis-url", redis_server, "--max-new-tokens", "2",
                    "--frames", str(saved), "What happened?", env=cli_env)  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    frames = answer["evidence_frames"]
    assert 1 <= len(frames) <= 4, answer
    for frame in frames:
        assert frame["stream"] == "demo" and frame["start"] < frame["end"]
        assert any(
            span["start"] <= frame["start"] < span["end"]
            or frame["start"] <= span["start"] < frame["end"]
            for span in answer["evidence"]
        ), "a frame outside every cited span"
        assert _is_jpeg(Path(frame["path"]).read_bytes())
        with urllib.request.urlopen(frame["url"], timeout=30) as response:
            assert response.headers["Content-Type"] == "image/jpeg"
            assert response.read() == Path(frame["path"]).read_bytes()
    copies = sorted(saved.glob("*.jpg"))
    assert len(copies) == len(frames) and all(_is_jpeg(p.read_bytes()) for p in copies)

    first = frames[0]
    interval = ["--since", str(first["start"]), "--until", str(first["end"])]
    forgot = run_cli("forget", "--redis-url", redis_server, "--stream", "demo", *interval,
                     env=cli_env)  # fmt: skip
    assert forgot.returncode == 0, forgot.stderr
    wait_for(lambda: not Path(first["path"]).exists(), 10, "the forgotten frame's file to go")
    with pytest.raises(urllib.error.HTTPError) as gone:
        urllib.request.urlopen(first["url"], timeout=30)
    gone.value.close()
    assert gone.value.code == 404
    assert daemon.terminate() == 0

    # A crash leaves frames newer than the last snapshot: the next start deletes them.
    kept = sorted(folder.glob("*.jpg"))
    after = kept[-1].name.split("_")[1].removesuffix(".jpg")
    late = folder / f"{int(after) + 86_400_000}_{int(after) + 86_402_000}.jpg"
    late.write_bytes(kept[-1].read_bytes())
    again = serve("--redis-url", redis_server, "--set", f"memory.snapshot_dir={snapshots}")
    wait_for(lambda: "flashwatch is running" in again.output(), WAIT_S, "the restarted daemon")
    assert not late.exists() and "newer than the restored memory deleted" in again.output()
    assert kept[0].exists(), "a frame the restored memory covers was deleted"
    assert again.terminate() == 0
