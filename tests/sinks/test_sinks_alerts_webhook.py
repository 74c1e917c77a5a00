"""The webhook channel against a real aiohttp receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from alert_events import alert_event, running, wait_until
from redis_harness import free_port

from sinks.alerts.settings import WebhookSettings
from sinks.alerts.webhook import SIGNATURE_HEADER, WebhookSink, retry_after_s, sign, verify

SECRET = "s3cret-hmac-key-0123456789"
TOKEN_PATH = "/hooks/T0KEN-IN-PATH-42"


class Receiver:
    """An HTTP endpoint that records every POST and answers with the next scripted status."""

    def __init__(
        self, port: int, statuses: tuple[int, ...] = (), headers: dict[str, str] | None = None
    ) -> None:
        self.port = port
        self.statuses = list(statuses)
        self.headers = headers or {}
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        status = self.statuses.pop(0) if self.statuses else 204
        return web.Response(status=status, headers=self.headers if status >= 400 else None)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(TOKEN_PATH, self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def hook(port: int, **overrides: Any) -> WebhookSettings:
    fields: dict[str, Any] = {
        "url": f"http://127.0.0.1:{port}{TOKEN_PATH}",
        "secret": SECRET,
        "timeout_s": 2.0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "headers": {"Authorization": "Bearer hdr-secret-value"},
    }
    fields.update(overrides)
    return WebhookSettings(**fields)


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


async def test_the_post_is_signed_and_carries_the_alert_id() -> None:
    port = free_port()
    event = alert_event("door", 3)
    async with (
        receiving(Receiver(port)) as receiver,
        running(WebhookSink(hook(port), name="home", queue_size=10)) as sink,
    ):
        sink.offer(event)
        await wait_until(lambda: sink.stats()["delivered"] == 1)
    [(headers, body)] = receiver.requests
    assert json.loads(body) == event.as_dict()
    assert headers["Idempotency-Key"] == "door:3"
    assert headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == "Bearer hdr-secret-value"
    signature = headers[SIGNATURE_HEADER]
    assert verify(SECRET.encode(), signature, body, now=time.time(), tolerance_s=300)
    # A receiver with another key, or a body changed on the way, does not accept it.
    assert not verify(b"another-key-0123456789", signature, body, now=time.time(), tolerance_s=300)
    assert not verify(SECRET.encode(), signature, body + b" ", now=time.time(), tolerance_s=300)
    assert not verify(SECRET.encode(), signature, body, now=time.time() + 3600, tolerance_s=300)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    body = b'{"a":1}'
    expected = hmac.new(b"k" * 16, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(b"k" * 16, 1_700_000_000, body) == f"t=1700000000,v1={expected}"


async def test_a_receiver_down_for_a_while_gets_the_alert_once_it_is_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()  # nothing listens there yet
    async with running(WebhookSink(hook(port), name="home", queue_size=10)) as sink:
        sink.offer(alert_event("door", 1))
        await wait_until(lambda: sink.stats()["retried"] >= 3)
        assert sink.stats()["delivered"] == 0
        async with receiving(Receiver(port)) as receiver:
            await wait_until(lambda: sink.stats()["delivered"] == 1)
            await asyncio.sleep(0.3)  # time for a (wrong) second POST to show up
    assert [h["Idempotency-Key"] for h, _ in receiver.requests] == ["door:1"]
    stats = sink.stats()
    assert stats["failed"] == 0 and stats["dropped"] == 0
    assert stats["target"] == f"http://127.0.0.1:{port}"
    # Neither the secret, the header value nor the URL's path reached our log or status
    # (the test receiver's own access log shows its path, and is left out).
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("sinks")]
    shown = "\n".join(ours) + json.dumps(stats)
    for secret in (SECRET, "hdr-secret-value", "T0KEN-IN-PATH-42"):
        assert secret not in shown
    assert any("not delivered" in line for line in ours)


async def test_a_receiver_that_never_comes_back_keeps_the_queue_bounded() -> None:
    port = free_port()
    settings = hook(port, max_attempts=1000, max_age_s=3600.0)
    async with running(WebhookSink(settings, name="gone", queue_size=5)) as sink:
        await asyncio.sleep(0.05)  # run() has started and waits for work
        for sequence in range(200):
            # offer is synchronous: it cannot wait on the dead receiver; an older one drops.
            assert sink.offer(alert_event("door", sequence))
        await wait_until(lambda: sink.stats()["retried"] >= 2)
        stats = sink.stats()
    # Five were kept (one is now in flight, four wait); the other 195 dropped and counted.
    assert stats["queued"] == 4 and stats["dropped"] == 195 and stats["delivered"] == 0


async def test_a_4xx_is_final_and_408_429_5xx_are_retried() -> None:
    port = free_port()
    receiver = Receiver(port, statuses=(503, 429, 408, 200, 400), headers={"Retry-After": "0"})
    async with (
        receiving(receiver),
        running(WebhookSink(hook(port), name="home", queue_size=10)) as sink,
    ):
        sink.offer(alert_event("door", 1))  # 503, 429, 408, then 200
        sink.offer(alert_event("door", 2))  # 400: refused, not retried
        sink.offer(alert_event("door", 3))  # 204
        await wait_until(lambda: sink.stats()["delivered"] == 2 and sink.stats()["failed"] == 1)
    keys = [h["Idempotency-Key"] for h, _ in receiver.requests]
    assert keys == ["door:1"] * 4 + ["door:2", "door:3"]
    stats = sink.stats()
    assert stats["retried"] == 3 and "400" in (stats["last_error"] or "")


async def test_out_of_attempts_counts_failed_and_moves_on() -> None:
    port = free_port()
    receiver = Receiver(port, statuses=(500, 500))
    async with (
        receiving(receiver),
        running(WebhookSink(hook(port, max_attempts=2), name="home", queue_size=10)) as sink,
    ):
        sink.offer(alert_event("door", 1))
        sink.offer(alert_event("door", 2))
        await wait_until(lambda: sink.stats()["failed"] == 1 and sink.stats()["delivered"] == 1)
    assert [h["Idempotency-Key"] for h, _ in receiver.requests] == ["door:1", "door:1", "door:2"]


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_s("7", now=0.0) == 7.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_s("soon", now=0.0) is None
    assert retry_after_s(None, now=0.0) is None


def test_the_readmes_receiver_check_accepts_a_real_signature() -> None:
    """The few lines the README gives receivers, as written, against the sink's signature."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    after = readme.split("A receiver checks the signature", 1)[1]
    code = after.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    body = alert_event("door", 1).to_json().encode()
    header = sign(SECRET.encode(), int(time.time()), body)
    assert namespace["verified"](SECRET.encode(), header, body)
    assert not namespace["verified"](SECRET.encode(), header, body + b"x")
    old = sign(SECRET.encode(), int(time.time()) - 3600, body)
    assert not namespace["verified"](SECRET.encode(), old, body)
