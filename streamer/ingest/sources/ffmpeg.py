"""Network sources FFmpeg opens (rtsp, rtmp, http(s)/HLS, srt, …) through PyAV.

Always with socket timeouts: without one a hung peer blocks ``read`` forever. FFmpeg's option
names differ by protocol (``stimeout`` is silently ignored by FFmpeg >= 5, and rtmp's
``timeout`` means *listen*), so each scheme gets its own; PyAV's own ``timeout=(open, read)``
(an interrupt callback) backs them all up. Probing is kept short so an open takes ~0.2 s, not 1 s.

The packet loop (``decode_packets``) is shared with the file source: packets that fail to decode
are skipped and counted; too many in a row is a disconnect.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import av
import av.error

from sinks.redact import redact_text, redact_url
from streamer.ingest.errors import SourceError, SourceFatal, SourceUnavailable
from streamer.ingest.settings import IngestSettings, StreamSettings
from streamer.ingest.sources.base import AvFrame, Frame, Source, SourceTraits, sane_fps

_FAST_PROBE = {"analyzeduration": "500000", "probesize": "65536"}  # 0.5 s, 64 KiB

# Errors where retrying cannot help: credentials, missing codec/protocol/demuxer support.
_FATAL_AV_ERRORS: tuple[type[BaseException], ...] = (
    av.error.HTTPUnauthorizedError,
    av.error.HTTPForbiddenError,
    av.error.DecoderNotFoundError,
    av.error.DemuxerNotFoundError,
    av.error.ProtocolNotFoundError,
    av.error.PatchWelcomeError,
)


def network_options(settings: StreamSettings) -> dict[str, str]:
    """FFmpeg options for ``settings.url``: transport, socket timeout (µs), short probing."""
    scheme = settings.url.split("://", 1)[0].lower()
    timeout_us = str(int(settings.timeout_s * 1_000_000))
    options = dict(_FAST_PROBE)
    if scheme in ("rtsp", "rtsps"):
        options["rtsp_transport"] = settings.rtsp_transport
        options["timeout"] = timeout_us  # RTSP socket I/O timeout
    elif scheme in ("http", "https", "srt"):
        options["timeout"] = timeout_us  # socket I/O timeout for these protocols
    else:
        options["rw_timeout"] = timeout_us  # generic protocol read/write timeout (rtmp, tcp, …)
    return options


def describe_error(exc: BaseException) -> str:
    """A one-line message for status: class name and FFmpeg's text, credentials masked."""
    return redact_text(f"{type(exc).__name__}: {exc}")


def classify_av_error(exc: BaseException, *, opening: bool, local_file: bool) -> SourceError:
    """Map a PyAV/OS error to SourceFatal (retrying cannot help) or SourceUnavailable."""
    message = describe_error(exc)
    if isinstance(exc, _FATAL_AV_ERRORS):
        return SourceFatal(message)
    if local_file and opening:
        # A local file that cannot be opened or parsed will not get better by retrying.
        return SourceFatal(message)
    return SourceUnavailable(message)


def open_container(url: str, options: dict[str, str], timeout_s: float | None) -> Any:
    """``av.open`` for reading, with PyAV's (open, read) timeout when given."""
    if timeout_s is None:
        return av.open(url, options=options)
    return av.open(url, options=options, timeout=(timeout_s, timeout_s))


def select_video(container: Any, threads: str) -> Any:
    """The first video stream, set up for decoding; SourceFatal if there is none."""
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["nothing"]
        raise SourceFatal(f"no video track (found: {', '.join(kinds)})")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise SourceFatal(f"no decoder for codec {stream.codec_context_name!r}")
    if threads != "NONE":
        stream.thread_type = threads
    return stream


def open_video(
    url: str, options: dict[str, str], timeout_s: float | None, threads: str, *, local_file: bool
) -> tuple[Any, Any]:
    """Open ``url`` and pick its video stream: (container, stream), or a classified SourceError.

    The container is closed again when anything fails, so a failed open leaks nothing.
    """
    container = None
    try:
        container = open_container(url, options, timeout_s)
        return container, select_video(container, threads)
    except SourceError:
        if container is not None:
            container.close()
        raise
    except (av.error.FFmpegError, OSError) as exc:
        if container is not None:
            container.close()
        raise classify_av_error(exc, opening=True, local_file=local_file) from None


def stream_fps(stream: Any) -> float | None:
    """The stream's frame rate from its headers, if sane."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            value = sane_fps(float(rate))
            if value is not None:
                return value
    return None


def decode_packets(
    container: Any,
    stream: Any,
    stop: threading.Event,
    *,
    max_corrupt: int,
    on_corrupt: Callable[[], None],
) -> Iterator[Any]:
    """Decoded ``av.VideoFrame``s of ``stream``; undecodable packets are skipped and counted.

    Raises SourceUnavailable after ``max_corrupt`` consecutive bad packets (garbage, not video).
    Demux errors propagate as PyAV errors (the caller classifies them).
    """
    codec = stream.codec_context
    bad_in_a_row = 0
    for packet in container.demux(stream):
        if stop.is_set():
            return
        try:
            frames = codec.decode(packet)  # an empty flush packet at EOF drains the decoder
        except (av.error.InvalidDataError, av.error.UndefinedError):
            on_corrupt()
            bad_in_a_row += 1
            if bad_in_a_row >= max_corrupt:
                raise SourceUnavailable(f"{bad_in_a_row} undecodable packets in a row") from None
            continue
        bad_in_a_row = 0
        yield from frames


class FfmpegSource(Source):
    """A live network stream opened by FFmpeg; frames are stamped with the arrival clock.

    Why arrival time: live pts jump and reset across reconnects and camera clocks lie; at 1 fps
    sampling the decode latency (tens of ms) is far below the sampling period.
    """

    traits = SourceTraits(live=True)

    def __init__(
        self, settings: StreamSettings, ingest: IngestSettings, clock: Callable[[], float]
    ) -> None:
        super().__init__()
        self._settings = settings
        self._ingest = ingest
        self._clock = clock
        self._container: Any = None
        self._stream: Any = None

    def open(self, stop: threading.Event) -> None:
        self._container, self._stream = open_video(
            self._settings.url,
            network_options(self._settings),
            self._settings.timeout_s,
            self._settings.decode_threads,
            local_file=False,
        )
        self.nominal_fps = stream_fps(self._stream)

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        try:
            for frame in decode_packets(
                self._container,
                self._stream,
                stop,
                max_corrupt=self._ingest.max_corrupt_packets,
                on_corrupt=self._count_corrupt,
            ):
                yield AvFrame(frame, self._clock())
        except (av.error.FFmpegError, OSError) as exc:
            raise classify_av_error(exc, opening=False, local_file=False) from None
        finally:
            self.close()

    def close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            container.close()

    def _count_corrupt(self) -> None:
        self.corrupt_packets += 1

    def __repr__(self) -> str:
        return f"FfmpegSource({redact_url(self._settings.url)})"


def wall_clock() -> float:
    """UTC epoch seconds (the live sources' time base)."""
    return time.time()
