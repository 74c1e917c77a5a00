"""Video files (``file:///path`` or a plain path): media-time stamps, optional real-time pacing
and looping.

Media time is the frame's pts in seconds; a missing pts continues from the previous frame. When
looping, each pass is offset so time keeps increasing. Real-time pacing follows the timestamps
but re-anchors on a jump (a pts gap or reset never makes it sleep for an hour).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import av
import av.error

from streamer.ingest.errors import SourceFatal
from streamer.ingest.settings import IngestSettings, StreamSettings
from streamer.ingest.sources.base import AvFrame, Frame, Source, SourceTraits
from streamer.ingest.sources.ffmpeg import (
    classify_av_error,
    decode_packets,
    open_video,
    stream_fps,
)

_PACING_JUMP_S = 1.0  # a timestamp step larger than this re-anchors real-time pacing
_DEFAULT_FPS = 25.0  # for frames without pts in a stream without a rate


def file_path(url: str) -> Path:
    """``file:///a/b.mp4`` or ``/a/b.mp4`` → ``Path('/a/b.mp4')``."""
    if url.startswith("file://"):
        return Path(unquote(urlsplit(url).path))
    return Path(url)


class _Pacer:
    """Sleeps so frames come out at the pace of their timestamps."""

    def __init__(self) -> None:
        self._anchor: tuple[float, float] | None = None  # (media time, monotonic)
        self._last: float | None = None

    def wait(self, t: float, stop: threading.Event) -> None:
        now = time.monotonic()
        jumped = self._last is not None and abs(t - self._last) > _PACING_JUMP_S
        self._last = t
        if self._anchor is None or jumped:
            self._anchor = (t, now)
            return
        delay = (t - self._anchor[0]) - (now - self._anchor[1])
        if delay > 0:
            stop.wait(delay)
        elif delay < -_PACING_JUMP_S:  # we fell far behind (slow decode): do not burst
            self._anchor = (t, now)


class FileSource(Source):
    """Frames of a local video file, stamped with media time (seconds)."""

    traits = SourceTraits(live=False)

    def __init__(self, settings: StreamSettings, ingest: IngestSettings) -> None:
        super().__init__()
        self._settings = settings
        self._ingest = ingest
        self._path = file_path(settings.url)
        self._container: Any = None
        self._stream: Any = None

    def open(self, stop: threading.Event) -> None:
        if not self._path.is_file():
            raise SourceFatal(f"no such file: {self._path}")
        self._open_container()

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        pacer = _Pacer() if self._settings.realtime else None
        offset = 0.0
        previous_end: float | None = None  # media time just after the previous pass
        try:
            while True:
                last: float | None = None
                for av_frame, t_raw in self._pass(stop):
                    if last is None and previous_end is not None:
                        offset = previous_end - t_raw  # this pass continues the last one
                    last = t_raw + offset
                    if pacer is not None:
                        pacer.wait(last, stop)
                    if stop.is_set():
                        return
                    yield AvFrame(av_frame, last)
                if not self._settings.loop or last is None or stop.is_set():
                    return
                previous_end = last + 1.0 / (self.nominal_fps or _DEFAULT_FPS)
                self.close()
                self._open_container()
        finally:
            self.close()

    def _pass(self, stop: threading.Event) -> Iterator[tuple[Any, float]]:
        """One pass over the file: (av frame, pts seconds)."""
        period = 1.0 / (self.nominal_fps or _DEFAULT_FPS)
        previous: float | None = None
        try:
            for frame in decode_packets(
                self._container,
                self._stream,
                stop,
                max_corrupt=self._ingest.max_corrupt_packets,
                on_corrupt=self._count_corrupt,
            ):
                t = frame.time
                if t is None:
                    t = 0.0 if previous is None else previous + period
                previous = t
                yield frame, t
        except (av.error.FFmpegError, OSError) as exc:
            raise classify_av_error(exc, opening=False, local_file=True) from None

    def _open_container(self) -> None:
        self._container, self._stream = open_video(
            str(self._path), {}, None, self._settings.decode_threads, local_file=True
        )
        self.nominal_fps = stream_fps(self._stream)

    def close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            container.close()

    def _count_corrupt(self) -> None:
        self.corrupt_packets += 1
