"""WebRTC ingest over WHIP: one aiohttp app for every ``whip://`` stream.

    POST   /whip/{stream}          SDP offer → 201, SDP answer, ``Location: /whip/resource/{id}``
    DELETE /whip/resource/{id}     ends that publisher's session → 200
    OPTIONS (both)                 CORS preflight → 204

Checks, in order: a request from a browser page whose ``Origin`` is not in ``cors_origins``
(empty by default) → 403; the bearer token when one is configured, before routing, so an
unknown stream cannot be probed without it (401 + ``WWW-Authenticate``); unknown stream → 404;
``Content-Type: application/sdp`` (415); SDP bodies capped at ``max_body_bytes`` (413) and read
within ``body_timeout_s`` (408); ``max_sessions`` (503); a live publisher replaced sooner than
``replace_interval_s`` after the last, or while another offer for the stream negotiates → 429 +
``Retry-After``. Connections are capped and must send their headers within ``header_timeout_s``
(``whip_guard.py``); each serves one request. CORS headers go on every answer to an allowed
origin, so a browser page can publish and read errors. aiortc receives the media with no STUN
servers (``iceServers=[]``: no DNS lookups; aiortc's answer is non-trickle and already carries
every candidate).

Decoded video frames are handed to the stream's ``WhipInbox``, which the ingest worker thread
reads (``sources/whip.py``). Each session buffers a few frames and drops the oldest beyond that.
The token is compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from streamer.ingest.settings import WhipSettings
from streamer.ingest.whip_guard import ConnectionGuard, ReplacementLimiter

log = logging.getLogger(__name__)

SDP_TYPE = "application/sdp"
_CORS_METHODS = "POST, DELETE, OPTIONS"
_CORS_HEADERS = "Authorization, Content-Type"


class WhipSession:
    """One publisher's peer connection and its small frame buffer.

    ``push``/``finish`` run on the event loop; ``next_frame`` on the ingest worker thread.
    """

    def __init__(self, key: str, pc: RTCPeerConnection, buffer: int) -> None:
        self.id = uuid.uuid4().hex
        self.key = key
        self.pc = pc
        self.dropped = 0  # frames discarded because the worker thread was behind
        self.frames_received = 0
        self._frames: deque[Any] = deque()
        self._buffer = buffer
        self._cond = threading.Condition()
        self._ended = False
        self.request_close: Callable[[], None] = lambda: None  # set by the server

    @property
    def ended(self) -> bool:
        return self._ended

    def push(self, frame: Any) -> None:
        with self._cond:
            if len(self._frames) >= self._buffer:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)
            self.frames_received += 1
            self._cond.notify()

    def finish(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def next_frame(self, stop: threading.Event, poll_s: float) -> Any | None:
        """The oldest buffered frame; None when the session has ended or ``stop`` is set."""
        with self._cond:
            while not self._frames:
                if self._ended or stop.is_set():
                    return None
                self._cond.wait(poll_s)
            return self._frames.popleft()


class WhipInbox:
    """Where one stream's current publisher session is found (thread-safe)."""

    def __init__(self, key: str, buffer: int) -> None:
        self.key = key
        self.buffer = buffer
        self._cond = threading.Condition()
        self._session: WhipSession | None = None

    def attach(self, session: WhipSession) -> WhipSession | None:
        """Make ``session`` current; returns the one it replaces."""
        with self._cond:
            old, self._session = self._session, session
            self._cond.notify_all()
        return old

    def detach(self, session: WhipSession) -> None:
        with self._cond:
            if self._session is session:
                self._session = None

    def current(self) -> WhipSession | None:
        with self._cond:
            return self._session

    def wait_session(self, stop: threading.Event, poll_s: float) -> WhipSession | None:
        """Block until a live publisher session exists (None if ``stop`` is set first)."""
        with self._cond:
            while self._session is None or self._session.ended:
                if stop.is_set():
                    return None
                self._cond.wait(poll_s)
            return self._session


class WhipServer:
    """The WHIP endpoint. ``register`` a stream key before publishers can POST to it."""

    def __init__(self, settings: WhipSettings) -> None:
        self._settings = settings
        self._inboxes: dict[str, WhipInbox] = {}
        self._sessions: dict[str, WhipSession] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._guard: ConnectionGuard | None = None
        self._limiter = ReplacementLimiter(settings.replace_interval_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` (after ``start``)."""
        if self._url is None:
            raise RuntimeError("WhipServer.url is known after start()")
        return self._url

    def register(self, key: str) -> WhipInbox:
        """The inbox for stream ``key`` (publishers POST to ``/whip/{key}``)."""
        inbox = self._inboxes.get(key)
        if inbox is None:
            inbox = self._inboxes[key] = WhipInbox(key, self._settings.frame_buffer)
        return inbox

    def session_count(self) -> int:
        return len(self._sessions)

    def connection_count(self) -> int:
        """Open HTTP connections (after ``start``)."""
        return self._guard.open_count() if self._guard is not None else 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        app = web.Application(
            client_max_size=self._settings.max_body_bytes, middlewares=[self._middleware]
        )
        app.router.add_route("OPTIONS", "/whip/resource/{id}", self._preflight)
        app.router.add_route("DELETE", "/whip/resource/{id}", self._delete)
        app.router.add_route("OPTIONS", "/whip/{stream}", self._preflight)
        app.router.add_route("POST", "/whip/{stream}", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        aiohttp_protocol = self._runner.server
        assert aiohttp_protocol is not None  # set by setup()
        self._guard = ConnectionGuard(
            aiohttp_protocol,
            max_connections=self._settings.max_connections,
            header_timeout_s=self._settings.header_timeout_s,
        )
        host = self._settings.host
        # Our own listener (not web.TCPSite) so that every connection passes the guard first.
        self._server = await self._loop.create_server(
            self._guard.protocol, host, self._settings.port
        )
        port = self._server.sockets[0].getsockname()[1]
        self._url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def stop(self) -> None:
        for session in list(self._sessions.values()):
            await self._close_session(session)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()  # stop listening
        if self._guard is not None:
            self._guard.abort_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # ---- HTTP handlers ---------------------------------------------------------------------

    async def _post(self, request: web.Request) -> web.StreamResponse:
        inbox = self._inboxes.get(request.match_info["stream"])  # auth was checked already
        if inbox is None:
            return web.Response(status=404, text="unknown stream\n")
        if request.content_type != SDP_TYPE:
            return web.Response(status=415, text=f"Content-Type must be {SDP_TYPE}\n")
        limit = self._settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return web.Response(status=413, text="offer too large\n")
        try:
            async with asyncio.timeout(self._settings.body_timeout_s):
                body = await request.read()  # 413 past client_max_size (= max_body_bytes)
        except TimeoutError:
            return web.Response(status=408, text="the offer did not arrive in time\n")
        if len(self._sessions) >= self._settings.max_sessions:
            return web.Response(status=503, text="too many publishers\n")
        try:
            offer = body.decode("utf-8")
        except UnicodeDecodeError:
            return web.Response(status=400, text="offer is not UTF-8 text\n")
        current = inbox.current()
        wait_s = self._limiter.admit(
            inbox.key, has_live_publisher=current is not None and not current.ended
        )
        if wait_s:
            return web.Response(
                status=429,
                text="this stream's publisher was just replaced; retry later\n",
                headers={"Retry-After": str(wait_s)},
            )
        session: WhipSession | None = None
        try:
            session = await self._answer(inbox.key, offer)
        finally:
            self._limiter.done(inbox.key, attached=session is not None)
        if session is None:
            return web.Response(status=400, text="cannot accept this offer (no usable video)\n")
        replaced = inbox.attach(session)
        if replaced is not None:  # a reloaded page: the newest publisher wins
            await self._close_session(replaced)
        log.info("WHIP publisher %s connected to %s", session.id[:8], inbox.key)
        return web.Response(
            status=201,
            content_type=SDP_TYPE,
            text=session.pc.localDescription.sdp,
            headers={"Location": f"/whip/resource/{session.id}"},
        )

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        session = self._sessions.get(request.match_info["id"])
        if session is None:
            return web.Response(status=404, text="no such session\n")
        await self._close_session(session)
        log.info("WHIP publisher %s left %s", session.id[:8], session.key)
        return web.Response(status=200)

    async def _preflight(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self._guard is not None:
            self._guard.headers_received(request.transport)
        origin = request.headers.get("Origin")
        allowed = self._origin_allowed(origin)
        response: web.StreamResponse
        if not allowed:  # a browser page we were not told to trust: not even a preflight
            response = web.Response(status=403, text="origin not allowed\n")
        elif request.method != "OPTIONS" and not self._authorized(request):  # before routing
            response = _unauthorized()
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # 404/405/413 raised by aiohttp itself
                response = web.Response(status=exc.status, text=exc.text, headers=exc.headers)
        if origin is not None and allowed:
            wildcard = "*" in self._settings.cors_origins
            response.headers["Access-Control-Allow-Origin"] = "*" if wildcard else origin
            if not wildcard:
                response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Allow-Methods"] = _CORS_METHODS
            response.headers["Access-Control-Allow-Headers"] = _CORS_HEADERS
            response.headers["Access-Control-Expose-Headers"] = "Location"
        response.force_close()  # one request per connection: nothing idles past its deadlines
        return response

    def _origin_allowed(self, origin: str | None) -> bool:
        """No Origin (OBS, ffmpeg, aiortc: not a browser page) or one in ``cors_origins``."""
        allowed = self._settings.cors_origins
        return origin is None or "*" in allowed or origin in allowed

    def _authorized(self, request: web.Request) -> bool:
        token = self._settings.token
        if token is None:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        expected = token.get_secret_value().encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)

    # ---- WebRTC ----------------------------------------------------------------------------

    async def _answer(self, key: str, offer: str) -> WhipSession | None:
        """Build a receiving peer connection for ``offer``; None if it cannot be accepted."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        session = WhipSession(key, pc, self._settings.frame_buffer)
        session.request_close = lambda: self._close_from_thread(session)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._spawn(self._consume(session, track))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self._close_session(session)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            if not any(t.kind == "video" for t in pc.getTransceivers()):
                raise ValueError("the offer has no video")
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # noqa: BLE001
            # aiortc raises ValueError, InvalidStateError, OperationError … for offers it cannot
            # parse or negotiate; whatever the class, the publisher gets a 400 and we go on.
            log.warning("WHIP offer for %s refused: %s: %s", key, type(exc).__name__, exc)
            await pc.close()
            return None
        self._sessions[session.id] = session
        return session

    async def _consume(self, session: WhipSession, track: MediaStreamTrack) -> None:
        """Drain one track: video frames go to the session, audio is discarded."""
        try:
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    session.push(frame)
        except MediaStreamError:
            pass  # the track ended: the peer connection closed
        if track.kind == "video":
            await self._close_session(session)

    async def _close_session(self, session: WhipSession) -> None:
        if self._sessions.pop(session.id, None) is None and session.ended:
            return
        session.finish()
        inbox = self._inboxes.get(session.key)
        if inbox is not None:
            inbox.detach(session)
        await session.pc.close()

    def _close_from_thread(self, session: WhipSession) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(lambda: self._spawn(self._close_session(session)))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _unauthorized() -> web.Response:
    return web.Response(
        status=401, text="unauthorized\n", headers={"WWW-Authenticate": 'Bearer realm="whip"'}
    )
