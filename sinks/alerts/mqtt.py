"""Alerts over MQTT, the way home-automation setups (Home Assistant, Frigate) expect them.

- ``<prefix>/alerts/<name>``: every event's JSON, at the configured QoS (1), not retained;
- ``<prefix>/alerts/<name>/state``: ``ON`` when a condition fires, ``OFF`` when it clears,
  retained, so a subscriber that connects later (a Home Assistant ``binary_sensor``) knows the
  state at once; summaries have no state;
- ``<prefix>/status``: ``online`` (retained) once connected; the broker publishes the last will
  ``offline`` if the connection dies, and a clean shutdown publishes it itself.

Through aiomqtt (on paho-mqtt). A lost broker is reconnected with backoff; the event whose
publish was interrupted goes back to the head of the bounded queue and is sent again
(at-least-once: a receiver deduplicates on ``alert_id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

import aiomqtt

from sinks.alerts.queue import AlertQueue, Queued
from sinks.alerts.settings import MqttSettings
from sinks.redact import redact_url, url_secrets
from streamer.engine.standing.events import AlertEvent, AlertKind, AlertState
from streamer.ingest.backoff import Backoff

log = logging.getLogger(__name__)

JITTER_FRACTION = 0.2
GOODBYE_TIMEOUT_S = 1.0  # the "offline" publish of a clean shutdown waits no longer
ONLINE, OFFLINE = "online", "offline"
STATE_PAYLOADS = {AlertState.FIRED: "ON", AlertState.CLEARED: "OFF"}
_TOPIC_UNSAFE = str.maketrans({"/": "_", "+": "_", "#": "_", "\0": "_"})


def topic_level(name: str) -> str:
    """``name`` as one topic level: no ``/`` (a new level) and no ``+``/``#`` (wildcards)."""
    return name.translate(_TOPIC_UNSAFE) or "_"


class MqttTopics:
    """The topic names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.status = f"{prefix}/status"

    def event(self, name: str) -> str:
        return f"{self.prefix}/alerts/{topic_level(name)}"

    def state(self, name: str) -> str:
        return f"{self.event(name)}/state"


class MqttAlertSink:
    """The ``mqtt`` channel: one broker connection, kept up with backoff."""

    name = "mqtt"

    def __init__(self, settings: MqttSettings, *, queue_size: int) -> None:
        self._settings = settings
        self.topics = MqttTopics(settings.topic_prefix)
        self._queue = AlertQueue(self.name, queue_size, url_secrets(settings.url))
        self.connected = False
        self.connects = 0

    def offer(self, event: AlertEvent) -> bool:
        return self._queue.put(event)

    async def run(self) -> None:
        settings = self._settings
        backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s, JITTER_FRACTION)
        while True:
            try:
                await self._serve_connection(backoff)
            except (aiomqtt.MqttError, OSError) as exc:
                shown = self._queue.note_error(f"{type(exc).__name__}: {exc}")
                delay = backoff.next_delay()
                log.warning("MQTT broker %s: %s; reconnecting in %.1f s",
                            redact_url(settings.url), shown, delay)  # fmt: skip
                await asyncio.sleep(delay)

    async def _serve_connection(self, backoff: Backoff) -> None:
        async with self._client() as client:
            watcher = asyncio.get_running_loop().create_task(_until_disconnected(client))
            try:
                await client.publish(self.topics.status, ONLINE, qos=1, retain=True)
                self.connected = True
                self.connects += 1
                backoff.reset()
                while True:
                    item = await self._next_unless(watcher)
                    try:
                        await self._publish(client, item.event)
                    except aiomqtt.MqttError:
                        self._queue.retried += 1
                        self._queue.put_back(item)
                        raise
                    except asyncio.CancelledError:
                        self._queue.put_back(item)
                        raise
                    self._queue.note_delivered()
            except asyncio.CancelledError:
                # A clean disconnect suppresses the last will: say "offline" ourselves.
                with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                    async with asyncio.timeout(GOODBYE_TIMEOUT_S):
                        await client.publish(self.topics.status, OFFLINE, qos=1, retain=True)
                raise
            finally:
                self.connected = False
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await watcher

    async def _next_unless(self, watcher: asyncio.Task[None]) -> Queued:
        """The next event, or the disconnect's MqttError if the connection drops first (an idle
        channel notices a lost broker at once, not at its next event)."""
        getter = asyncio.ensure_future(self._queue.get())
        try:
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            getter.cancel()
            if getter.done() and not getter.cancelled():
                self._queue.put_back(getter.result())  # taken just as we were cancelled
            raise
        if getter.done():
            return getter.result()
        getter.cancel()  # still waiting: nothing was taken
        watcher.result()  # raises what ended the connection
        raise aiomqtt.MqttError("disconnected from the broker")

    async def _publish(self, client: aiomqtt.Client, event: AlertEvent) -> None:
        qos = self._settings.qos
        await client.publish(self.topics.event(event.name), event.to_json(), qos=qos)
        state = STATE_PAYLOADS.get(event.state)
        if event.kind is AlertKind.CONDITION and state is not None:
            await client.publish(
                self.topics.state(event.name), state, qos=qos, retain=self._settings.retain_state
            )

    def _client(self) -> aiomqtt.Client:
        settings = self._settings
        tls = ssl.create_default_context(cafile=settings.ca_file) if settings.tls else None
        return aiomqtt.Client(
            settings.host,
            settings.port,
            username=settings.username,
            password=settings.password,
            identifier=settings.client_id,
            will=aiomqtt.Will(self.topics.status, OFFLINE, qos=1, retain=True),
            keepalive=settings.keepalive_s,
            timeout=settings.connect_timeout_s,
            tls_context=tls,
            logger=log,
        )

    async def aclose(self) -> None:
        left = self._queue.close()
        if left:
            log.warning("%d alert(s) not published over MQTT at shutdown", left)

    def unsettled(self) -> set[str]:
        return self._queue.unsettled()

    def stats(self) -> dict[str, Any]:
        return {**self._queue.stats(), "connected": self.connected, "connects": self.connects}


async def _until_disconnected(client: aiomqtt.Client) -> None:
    """Ends (with MqttError) when the connection does: the channel subscribes to nothing, so
    the message iterator only ever reports the disconnect."""
    async for _message in client.messages:
        pass
