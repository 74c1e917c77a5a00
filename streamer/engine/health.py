"""Device failures, counted and escalated: never an endless log.

- a clip that fails to encode is counted by cause; its stream's failures in a row are counted,
  and at ``stream_failure_limit`` the stream is failed (its clips are dropped, status says why);
- a device step that fails (an encode batch in which nothing encoded, a query step failing
  outside the query's own errors, a maintenance slice) counts toward ``device_failure_limit``
  failures in a row; any success resets it; at the limit :class:`EngineFailed` is raised with
  the reason, which stops the engine and so the daemon.

The first failure of each stream is logged (with its message); later ones only counted.
"""

from __future__ import annotations

import logging
from collections import Counter

from streamer.engine.errors import EngineFailed

log = logging.getLogger(__name__)


class EngineHealth:
    def __init__(self, *, stream_failure_limit: int, device_failure_limit: int) -> None:
        self._stream_limit = stream_failure_limit
        self._device_limit = device_failure_limit
        self.encode_failures: Counter[str] = Counter()  # clips by cause
        self.failed_streams: dict[str, str] = {}  # stream -> reason
        self.failure: str | None = None  # why the engine failed
        self._stream_in_row: Counter[str] = Counter()
        self._device_in_row = 0

    def clip_failed(self, stream: str, cause: str, message: str) -> bool:
        """Count one failed clip; True when this failure fails its stream."""
        self.encode_failures[cause] += 1
        self._stream_in_row[stream] += 1
        if self._stream_in_row[stream] == 1:
            log.warning(
                "encoding a clip of %s failed (%s: %s); counted in status from now on",
                stream, cause, message,
            )  # fmt: skip
        if self._stream_in_row[stream] < self._stream_limit or stream in self.failed_streams:
            return False
        self.failed_streams[stream] = f"{cause}: {message}"
        log.error(
            "stream %s failed: %d clips in a row did not encode (%s: %s); its clips are dropped",
            stream, self._stream_limit, cause, message,
        )  # fmt: skip
        return True

    def stream_ok(self, stream: str) -> None:
        self._stream_in_row[stream] = 0

    def device_ok(self) -> None:
        self._device_in_row = 0

    def device_failed(self, reason: str) -> None:
        """Count a failed device step; raises EngineFailed at the limit."""
        self._device_in_row += 1
        if self._device_in_row >= self._device_limit:
            self.failure = f"{self._device_in_row} device steps failed in a row; last: {reason}"
            log.error("the engine stops: %s", self.failure)
            raise EngineFailed(self.failure)
