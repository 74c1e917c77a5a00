"""Connection hygiene for the WHIP endpoint: a cap on open connections, a deadline for the request
headers, and a per-stream limit on how often a live publisher can be replaced.

aiohttp has no request-header timeout of its own (a client that connects and sends nothing, or
half a request line, holds a socket and a file descriptor for as long as it likes), so every
connection goes through ``GuardedConnection``: a thin ``asyncio.Protocol`` in front of aiohttp's
own that refuses connections past the cap (503) and closes one whose headers are not in by the
deadline (408). The server's middleware calls ``ConnectionGuard.headers_received`` when a request
reaches it; the body has its own deadline in the handler, and every response closes its
connection, so nothing idles between requests either.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

_REFUSED = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class ConnectionGuard:
    """Open connections of one server; ``protocol`` is the factory for ``loop.create_server``."""

    def __init__(
        self,
        inner: Callable[[], asyncio.BaseProtocol],
        *,
        max_connections: int,
        header_timeout_s: float,
    ) -> None:
        self._inner = inner
        self._max = max_connections
        self._header_timeout_s = header_timeout_s
        self._open: dict[asyncio.Transport, GuardedConnection] = {}
        self.refused = 0  # connections closed at once: the cap was reached
        self.timed_out = 0  # connections closed: no complete request headers in time

    def protocol(self) -> GuardedConnection:
        return GuardedConnection(self)

    def admit(self, transport: asyncio.Transport, connection: GuardedConnection) -> bool:
        """Count ``connection`` in, unless the cap is reached."""
        if len(self._open) >= self._max:
            self.refused += 1
            return False
        self._open[transport] = connection
        return True

    def forget(self, transport: asyncio.Transport) -> None:
        self._open.pop(transport, None)

    def new_inner(self) -> asyncio.BaseProtocol:
        return self._inner()

    @property
    def header_timeout_s(self) -> float:
        return self._header_timeout_s

    def open_count(self) -> int:
        return len(self._open)

    def headers_received(self, transport: asyncio.Transport | None) -> None:
        """A request on ``transport`` is complete up to its body: its header deadline is met."""
        connection = self._open.get(transport) if transport is not None else None
        if connection is not None:
            connection.cancel_deadline()

    def abort_all(self) -> None:
        for transport in list(self._open):
            transport.abort()


class GuardedConnection(asyncio.Protocol):
    """One connection: admitted under the cap, with a header deadline, else aiohttp's protocol."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._inner: Any = None  # aiohttp's RequestHandler once admitted
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if not guard.admit(transport, self):
            transport.write(_REFUSED)
            transport.close()
            return
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(guard.header_timeout_s, self._expire)
        self._inner = guard.new_inner()
        self._inner.connection_made(transport)

    def cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        self._guard.timed_out += 1
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_TIMED_OUT)
            self._transport.close()

    # ---- everything else is aiohttp's --------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_deadline()
        if self._transport is not None:
            self._guard.forget(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)


class ReplacementLimiter:
    """Per stream: one offer negotiates at a time, and a live publisher is replaced at most once
    per ``interval_s``. A stream with no live publisher takes a new one at once (a DELETE and
    re-publish is not a replacement)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._negotiating: set[str] = set()
        self._attached_at: dict[str, float] = {}  # one per registered stream: bounded

    def admit(self, key: str, *, has_live_publisher: bool) -> int:
        """0: go ahead (``done`` must follow); else the seconds to wait (``Retry-After``)."""
        if key in self._negotiating:
            return 1
        since = self._clock() - self._attached_at.get(key, -math.inf)
        if has_live_publisher and since < self._interval_s:
            return max(1, math.ceil(self._interval_s - since))
        self._negotiating.add(key)
        return 0

    def done(self, key: str, *, attached: bool) -> None:
        self._negotiating.discard(key)
        if attached:
            self._attached_at[key] = self._clock()
