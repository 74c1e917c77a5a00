"""``whip://`` / ``whip://NAME``: frames from WebRTC publishers of the WHIP endpoint.

Passive: ``open`` waits (without a deadline) for a publisher to POST to ``/whip/{NAME}``
(NAME defaults to the stream name); the stream ends when the publisher sends DELETE or its
peer connection closes. Frames are stamped with the arrival clock (UTC epoch seconds).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from streamer.ingest.errors import SourceUnavailable
from streamer.ingest.sources.base import AvFrame, Frame, Source, SourceTraits
from streamer.ingest.whip_server import WhipInbox, WhipSession

_POLL_S = 0.2  # how often a waiting worker re-checks its stop event


def whip_key(url: str, stream_name: str) -> str:
    """The WHIP path key for a ``whip://[NAME]`` URL."""
    return urlsplit(url).netloc or stream_name


class WhipSource(Source):
    """One publisher session of a WHIP stream."""

    traits = SourceTraits(live=True, passive=True)

    def __init__(self, inbox: WhipInbox, clock: Callable[[], float]) -> None:
        super().__init__()
        self._inbox = inbox
        self._clock = clock
        self._session: WhipSession | None = None

    def open(self, stop: threading.Event) -> None:
        self._session = self._inbox.wait_session(stop, _POLL_S)
        if self._session is None:
            raise SourceUnavailable("stopped while waiting for a WHIP publisher")

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        session = self._session
        if session is None:
            return
        while not stop.is_set():
            frame = session.next_frame(stop, _POLL_S)
            self.frames_lost = session.dropped
            if frame is None:
                if session.ended:
                    return
                continue
            yield AvFrame(frame, self._clock())

    def close(self) -> None:
        # Abandoned while the publisher is still connected (a stall): drop that publisher so
        # the next attempt waits for a fresh one instead of re-attaching to a dead session.
        session = self._session
        if session is not None and not session.ended:
            session.request_close()
