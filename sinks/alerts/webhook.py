"""Alerts as signed HTTP POSTs of the event JSON.

Every attempt carries ``X-Flashwatch-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<body>">`` under the webhook's secret, and ``Idempotency-Key: <alert_id>`` (the same on
every retry, so a receiver keeps one copy). A receiver checks the HMAC and that ``t`` is
recent (README, "Alerts: delivery").

Connection errors, timeouts, 5xx, 408 and 429 are retried with backoff (a ``Retry-After`` is
honoured up to ``retry_after_max_s``) until ``max_attempts`` or ``max_age_s``; any other status
outside 2xx is a refusal, counted failed. Redirects are not followed (they would carry the
signature elsewhere). The URL is shown by its origin only; secret, path and header values never
reach a log or status.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import logging
import time
from typing import Any

import aiohttp

from sinks.alerts.errors import DeliveryError, DeliveryRejected
from sinks.alerts.queue import AlertQueue, Queued
from sinks.alerts.settings import WebhookSettings
from streamer.engine.standing.events import AlertEvent
from streamer.ingest.backoff import Backoff

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Flashwatch-Signature"
JITTER_FRACTION = 0.2
RETRIED_STATUSES = frozenset({408, 429})
USER_AGENT = "flashwatch-webhook/1"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value: ``t=<timestamp>,v1=<hex HMAC-SHA256(secret, "t.body")>``."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: bytes, header: str, body: bytes, *, now: float, tolerance_s: float) -> bool:
    """What a receiver does: the HMAC matches and ``t`` is within ``tolerance_s`` of ``now``."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def retry_after_s(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header in seconds from ``now``: delta-seconds or an HTTP date."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - now)


class WebhookSink:
    """The ``webhook:<name>`` channel: one endpoint, its own bounded queue and retries."""

    def __init__(self, settings: WebhookSettings, *, name: str, queue_size: int) -> None:
        self.name = f"webhook:{name}"
        self._settings = settings
        self._secret = settings.secret.get_secret_value().encode()
        self._queue = AlertQueue(self.name, queue_size, settings.secrets())
        self._session: aiohttp.ClientSession | None = None

    def offer(self, event: AlertEvent) -> bool:
        return self._queue.put(event)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            try:
                while True:
                    await self._deliver_one(await self._queue.get())
            finally:
                self._session = None

    async def _deliver_one(self, item: Queued) -> None:
        settings = self._settings
        backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s, JITTER_FRACTION)
        alert_id = item.event.alert_id
        body = item.event.to_json().encode()
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._post(alert_id, body)
            except asyncio.CancelledError:
                self._queue.put_back(item)
                raise
            except DeliveryRejected as exc:
                self._queue.failed += 1
                shown = self._queue.note_error(str(exc))
                log.warning("%s refused alert %s: %s", self.name, alert_id, shown)
                return
            except DeliveryError as exc:
                shown = self._queue.note_error(str(exc))
                delay = backoff.next_delay()
                if exc.retry_after_s is not None:
                    delay = max(delay, min(exc.retry_after_s, settings.retry_after_max_s))
                age_s = time.monotonic() - item.offered_at
                if attempt >= settings.max_attempts or age_s + delay > settings.max_age_s:
                    self._queue.failed += 1
                    log.warning("%s: gave up on alert %s after %d attempt(s): %s",
                                self.name, alert_id, attempt, shown)  # fmt: skip
                    return
                self._queue.retried += 1
                log.info("%s: alert %s not delivered (%s); retrying in %.1f s",
                         self.name, alert_id, shown, delay)  # fmt: skip
                await asyncio.sleep(delay)
            else:
                self._queue.note_delivered()
                return

    async def _post(self, alert_id: str, body: bytes) -> None:
        """One attempt; raises DeliveryError (retry) or DeliveryRejected (give up)."""
        assert self._session is not None
        headers = {
            **self._settings.headers,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Idempotency-Key": alert_id,
            SIGNATURE_HEADER: sign(self._secret, int(time.time()), body),
        }
        try:
            async with self._session.post(
                self._settings.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                retry_after = retry_after_s(response.headers.get("Retry-After"), time.time())
                await response.read()  # drain it, so the connection is reused
        except TimeoutError:
            raise DeliveryError(
                f"no answer from {self._settings.origin} within {self._settings.timeout_s} s"
            ) from None
        except aiohttp.ClientError as exc:
            # The text may hold the URL: the queue masks its path and secrets before showing it.
            raise DeliveryError(
                f"{self._settings.origin} unreachable ({type(exc).__name__}: {exc})"
            ) from exc
        if 200 <= status < 300:
            return
        if status >= 500 or status in RETRIED_STATUSES:
            raise DeliveryError(f"{self._settings.origin} answered {status}",
                                retry_after_s=retry_after)  # fmt: skip
        raise DeliveryRejected(f"{self._settings.origin} answered {status}")

    async def aclose(self) -> None:
        left = self._queue.close()
        if left:
            log.warning("%s: %d alert(s) not delivered at shutdown", self.name, left)

    def unsettled(self) -> set[str]:
        return self._queue.unsettled()

    def stats(self) -> dict[str, Any]:
        return {**self._queue.stats(), "target": self._settings.origin}
