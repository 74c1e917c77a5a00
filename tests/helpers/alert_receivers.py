"""Alert receivers for end-to-end tests: a signed-webhook endpoint and an MQTT subscriber, both
on a private event loop thread, so a synchronous test can poll what they received."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import aiomqtt
from aiohttp import web
from redis_harness import free_port

START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Received:
    """One message as it arrived: its topic (or path), headers, body and MQTT retain flag."""

    where: str
    headers: dict[str, str]
    body: bytes
    retained: bool = False


def signature_ok(secret: str, header: str, body: bytes) -> bool:
    """Check ``t=<unix>,v1=<hex HMAC-SHA256("<t>.<body>")>`` as a receiver would (written here,
    not imported, so the test checks the sender against the documented format)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if "t" not in fields or "v1" not in fields:
        return False
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), fields["v1"])


class LoopThread:
    """An event loop on a daemon thread; ``call`` runs a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float = START_TIMEOUT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class WebhookReceiver:
    """POSTs to ``/hook`` on 127.0.0.1 (a free port), answered 204 and recorded."""

    def __init__(self, loop: LoopThread) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received: list[Received] = []
        self._loop = loop
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, dict(request.headers), await request.read()))
        return web.Response(status=204)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def start(self) -> None:
        self._loop.call(self._start())

    def stop(self) -> None:
        self._loop.call(self._stop())


class MqttSubscriber:
    """A subscription to ``topic`` (wildcards allowed) on a broker at 127.0.0.1:``port``;
    every message is recorded, retained ones flagged. ``start`` returns once subscribed."""

    def __init__(self, loop: LoopThread, port: int, topic: str) -> None:
        self.received: list[Received] = []
        self._loop = loop
        self._port = port
        self._topic = topic
        self._task: asyncio.Task[None] | None = None

    async def _run(self, subscribed: asyncio.Future[None]) -> None:
        client_id = f"e2e-sub-{id(self)}"
        async with aiomqtt.Client("127.0.0.1", self._port, identifier=client_id) as client:
            await client.subscribe(self._topic, qos=1)
            subscribed.set_result(None)
            async for message in client.messages:
                body = message.payload if isinstance(message.payload, bytes) else b""
                self.received.append(Received(str(message.topic), {}, body, message.retain))

    async def _start(self) -> None:
        subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._run(subscribed))
        done, _ = await asyncio.wait({subscribed, self._task}, timeout=START_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if subscribed not in done:
            raise RuntimeError(f"could not subscribe to {self._topic} on port {self._port}")

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task

    def start(self) -> None:
        self._loop.call(self._start())

    def stop(self) -> None:
        self._loop.call(self._stop())


@contextlib.contextmanager
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    try:
        yield loop
    finally:
        loop.stop()
