"""The HTTP server: metrics, health probes and the ``/v1`` API, next to Redis (aiohttp).

    GET  /metrics              Prometheus text format
    GET  /healthz              200 while the process and its device thread are alive
    GET  /readyz               200 once the model is loaded, Redis reachable and a stream up
    POST /v1/ask               the Redis request schema; SSE with ?stream=true, Accept:
                               text/event-stream or a boolean "stream": true
    GET  /v1/answers/{id}      a recent final (or error) event
    GET  /v1/status            the status snapshot
    POST /v1/forget            remove an interval of a stream's memory
    POST /v1/config/reload     re-read the config file (as SIGHUP does)
    GET  /v1/openapi.json      this API's OpenAPI document
    GET  /frames/{stream}/{file}  an evidence frame (JPEG) an answer cites

With ``http.token`` set, ``/metrics`` and ``/v1/*`` need ``Authorization: Bearer <token>``
(401 otherwise); the probes stay open for load balancers. The daemon refuses a non-loopback
address without a token (config validation). Errors are JSON ``{"code", "message"}`` with the
query service's codes; no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from model.errors import FlashwatchError
from sinks.domain import ticket_of
from sinks.metrics import CONTENT_TYPE
from sinks.schema import (
    MAX_REQUEST_BYTES,
    ForgetRequest,
    decode_request,
    parse_forget,
    parse_request,
)
from sinks.settings import QuerySettings
from streamer.app.api.answers import Subscription
from streamer.app.api.openapi import openapi_document
from streamer.app.logs import log_context
from streamer.app.ops_settings import HttpSettings
from streamer.engine.errors import NotReady, QueryError
from streamer.engine.types import Ticket

log = logging.getLogger(__name__)

# HTTP status of each query error code; anything unknown is a 500.
_STATUS_OF_CODE = {
    "invalid_request": 400,
    "unknown_stream": 404,
    "not_found": 404,
    "empty_memory": 409,
    "cancelled": 409,
    "busy": 429,
    "not_ready": 503,
    "timeout": 504,
    "internal": 500,
}
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_ANSWER_GRACE_S = 5.0  # waited past a request's deadline for the engine's own timeout event
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class ApiBackend(Protocol):
    """What the server needs from the daemon (``streamer.app.ops.Operations``)."""

    query_settings: QuerySettings

    def health(self) -> tuple[bool, dict[str, Any]]: ...
    def readiness(self) -> tuple[bool, dict[str, Any]]: ...
    def metrics(self) -> bytes: ...
    def status(self) -> dict[str, Any] | None: ...
    def answer(self, request_id: str) -> dict[str, Any] | None: ...
    def frame_file(self, stream: str, name: str) -> Path | None: ...
    async def ask(self, ticket: Ticket) -> Subscription: ...
    def abandon(self, request_id: str) -> None: ...
    async def forget(self, request: ForgetRequest) -> dict[str, Any]: ...
    async def reload(self) -> dict[str, Any]: ...


BACKEND = web.AppKey("backend", ApiBackend)
TOKEN = web.AppKey("token", str)


def build_app(backend: ApiBackend, settings: HttpSettings) -> web.Application:
    app = web.Application(
        client_max_size=MAX_REQUEST_BYTES, middlewares=[_errors_middleware, _auth_middleware]
    )
    app[BACKEND] = backend
    app[TOKEN] = settings.token.get_secret_value() if settings.token is not None else ""
    routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("GET", "/metrics", _metrics),
        ("GET", "/healthz", _healthz),
        ("GET", "/readyz", _readyz),
        ("POST", "/v1/ask", _ask),
        ("GET", "/v1/answers/{id}", _answer),
        ("GET", "/v1/status", _status),
        ("POST", "/v1/forget", _forget),
        ("POST", "/v1/config/reload", _reload),
        ("GET", "/v1/openapi.json", _openapi),
        ("GET", "/frames/{stream}/{file}", _frame),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


class HttpServer:
    """Runs :func:`build_app` on ``host:port``; ``url`` is known after ``start``."""

    def __init__(self, backend: ApiBackend, settings: HttpSettings) -> None:
        self._settings = settings
        self._runner = web.AppRunner(build_app(backend, settings), access_log=None)
        self.url: str | None = None

    async def start(self) -> None:
        """Bind and serve; raises OSError (e.g. the port is taken)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._settings.host, self._settings.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"

    async def stop(self) -> None:
        await self._runner.cleanup()


# ---- middlewares ----------------------------------------------------------------------------


def _error(code: str, message: str, status: int | None = None) -> web.Response:
    return web.json_response(
        {"code": code, "message": message}, status=status or _STATUS_OF_CODE.get(code, 500)
    )


@web.middleware
async def _errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error("not_found" if exc.status == 404 else "invalid_request", exc.reason,
                          exc.status)  # fmt: skip
        raise
    except QueryError as exc:
        return _error(exc.code, str(exc) or exc.code)
    except FlashwatchError as exc:
        return _error("internal", str(exc) or type(exc).__name__)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:  # a bug answers 500 and is logged with its trace, never sent
        log.exception("HTTP %s %s failed", request.method, request.path)
        return _error("internal", "internal error (see the daemon's log)")


@web.middleware
async def _auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    token = request.app[TOKEN]
    if token and request.path not in _OPEN_PATHS:
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), token):
            response = _error("unauthorized", "a valid bearer token is required", 401)
            response.headers["WWW-Authenticate"] = 'Bearer realm="flashwatch"'
            return response
    return await handler(request)


# ---- probes and metrics -----------------------------------------------------------------------


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[BACKEND].metrics()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _healthz(request: web.Request) -> web.Response:
    ok, detail = request.app[BACKEND].health()
    return web.json_response({"ok": ok, **detail}, status=200 if ok else 503)


async def _readyz(request: web.Request) -> web.Response:
    ok, detail = request.app[BACKEND].readiness()
    return web.json_response({"ready": ok, **detail}, status=200 if ok else 503)


# ---- the API ------------------------------------------------------------------------------------


async def _ask(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    payload = decode_request(await request.read())
    sse = _wants_sse(request, payload)
    if isinstance(payload, dict) and isinstance(payload.get("stream"), bool):
        payload = {k: v for k, v in payload.items() if k != "stream"}  # the SSE switch
    query = parse_request(payload, backend.query_settings, time.time())
    ticket = ticket_of(query, None, time.time())
    with log_context(query_id=query.id):
        subscription = await backend.ask(ticket)
        wait_s = query.deadline_s + _ANSWER_GRACE_S
        try:
            if sse:
                return await _stream_events(request, subscription, wait_s)
            async with asyncio.timeout(wait_s):
                final = await subscription.final()
        except TimeoutError:
            final = _timeout_event(query.id, wait_s)
        finally:
            if not subscription.finished:  # timed out, or the client went away: cancel it
                backend.abandon(query.id)
    return _event_response(final)


def _timeout_event(request_id: str, wait_s: float) -> dict[str, Any]:
    return {"type": "error", "v": 1, "id": request_id, "code": "timeout",
            "message": f"no answer within {wait_s:g} s"}  # fmt: skip


def _wants_sse(request: web.Request, payload: Any) -> bool:
    if request.query.get("stream", "").lower() in ("1", "true", "yes"):
        return True
    if "text/event-stream" in request.headers.get("Accept", ""):
        return True
    return isinstance(payload, dict) and payload.get("stream") is True


def _event_response(event: dict[str, Any]) -> web.Response:
    body = {k: v for k, v in event.items() if k != "type"}
    if event.get("type") == "error":
        return web.json_response(body, status=_STATUS_OF_CODE.get(str(event.get("code")), 500))
    return web.json_response(body)


async def _stream_events(
    request: web.Request, subscription: Subscription, wait_s: float
) -> web.StreamResponse:
    """``event: token`` lines as they are generated, then ``event: final`` (or ``error``)."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        async with asyncio.timeout(wait_s):
            while True:
                event = await subscription.next_event()
                await _write_event(response, event)
                if event.get("type") != "token":
                    break
    except TimeoutError:
        await _write_event(response, _timeout_event(subscription.request_id, wait_s))
    await response.write_eof()
    return response


async def _write_event(response: web.StreamResponse, event: dict[str, Any]) -> None:
    kind = str(event.get("type", "token"))
    data = json.dumps(event, ensure_ascii=False)
    await response.write(f"event: {kind}\ndata: {data}\n\n".encode())


async def _answer(request: web.Request) -> web.Response:
    request_id = request.match_info["id"]
    event = request.app[BACKEND].answer(request_id)
    if event is None:
        return _error("not_found", f"no answer kept for {request_id!r}")
    return _event_response(event)


async def _status(request: web.Request) -> web.Response:
    status = request.app[BACKEND].status()
    if status is None:
        raise NotReady("the daemon is starting")
    return web.json_response(status)


async def _forget(request: web.Request) -> web.Response:
    forget = parse_forget(await request.read(), time.time())
    return web.json_response(await request.app[BACKEND].forget(forget))


async def _reload(request: web.Request) -> web.Response:
    return web.json_response(await request.app[BACKEND].reload())


async def _frame(request: web.Request) -> web.StreamResponse:
    """One evidence frame; the name is looked up in the store's index, never joined blindly."""
    stream, name = request.match_info["stream"], request.match_info["file"]
    path = request.app[BACKEND].frame_file(stream, name)
    if path is None:
        return _error("not_found", "no such evidence frame")
    try:
        body = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:  # deleted (budget, forget) since the lookup
        return _error("not_found", "no such evidence frame")
    return web.Response(body=body, content_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})  # fmt: skip


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


__all__ = ["ApiBackend", "HttpServer", "build_app"]
