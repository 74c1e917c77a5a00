"""Video sources behind one interface (``base.Source``), chosen by URL scheme.

testsrc://?size=WxH&fps=N   synthetic pattern (testsrc.py)
file:///path or /path       video file (file.py)
whip:// or whip://NAME      WebRTC publishers via the WHIP endpoint (whip.py)
any other scheme://         FFmpeg through PyAV: rtsp, rtmp, http(s) HLS, srt … (ffmpeg.py)
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from streamer.ingest.errors import SourceFatal
from streamer.ingest.settings import IngestSettings, StreamSettings
from streamer.ingest.sources.base import Frame, Source, SourceTraits
from streamer.ingest.sources.ffmpeg import FfmpegSource
from streamer.ingest.sources.file import FileSource
from streamer.ingest.sources.testsrc import TestSource, parse_testsrc_url
from streamer.ingest.sources.whip import WhipSource, whip_key
from streamer.ingest.whip_server import WhipInbox

__all__ = ["Frame", "Source", "SourceKind", "SourceTraits", "make_source", "source_kind"]


class SourceKind(enum.StrEnum):
    TESTSRC = "testsrc"
    FILE = "file"
    WHIP = "whip"
    FFMPEG = "ffmpeg"


def source_kind(url: str) -> SourceKind:
    """Which implementation serves ``url``."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        return SourceKind.FILE
    scheme = scheme.lower()
    if scheme == "testsrc":
        return SourceKind.TESTSRC
    if scheme == "file":
        return SourceKind.FILE
    if scheme == "whip":
        return SourceKind.WHIP
    return SourceKind.FFMPEG


def validate_url(settings: StreamSettings) -> None:
    """Raise SourceFatal early for a URL no attempt could ever open (e.g. bad testsrc options)."""
    if source_kind(settings.url) is SourceKind.TESTSRC:
        parse_testsrc_url(settings.url)


def make_source(
    settings: StreamSettings,
    ingest: IngestSettings,
    *,
    clock: Callable[[], float],
    whip_inbox: WhipInbox | None,
) -> Source:
    """A fresh single-use source for one connection attempt."""
    kind = source_kind(settings.url)
    if kind is SourceKind.TESTSRC:
        return TestSource(settings, clock)
    if kind is SourceKind.FILE:
        return FileSource(settings, ingest)
    if kind is SourceKind.WHIP:
        if whip_inbox is None:
            raise SourceFatal("whip:// stream but the WHIP endpoint is not running")
        return WhipSource(whip_inbox, clock)
    return FfmpegSource(settings, ingest, clock)


def whip_key_for(settings: StreamSettings) -> str | None:
    """The WHIP path key of a whip:// stream, else None."""
    if source_kind(settings.url) is not SourceKind.WHIP:
        return None
    return whip_key(settings.url, settings.name)
