"""A minimal Redis delivery of alert events, used until ``sinks.alerts`` (branch a1) lands.

Each event is XADDed to ``Keys.alerts`` (MAXLEN ~ bounded) and published on
``Keys.alert(name)``, from a bounded queue (the oldest dropped and counted when full) by its
own task, which retries with the project's backoff while Redis is away. The full channels
(deduplicating Redis stream, webhooks, MQTT) replace it through ``build_sinks`` on merge.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import redis.asyncio as aioredis

from sinks.connection import REDIS_DOWN_ERRORS
from sinks.schema import one_line
from sinks.settings import Keys
from streamer.engine.standing.events import AlertEvent
from streamer.ingest.backoff import Backoff

log = logging.getLogger(__name__)


class RedisStreamAlertSink:
    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        backoff: Backoff,
        *,
        maxlen: int = 10_000,
        queue_size: int = 256,
    ) -> None:
        self.name = "redis"
        self._client, self._keys, self._backoff = client, keys, backoff
        self._maxlen = maxlen
        self._queue: deque[AlertEvent] = deque()
        self._queue_size = queue_size
        self._wakeup = asyncio.Event()
        self._counts = {"delivered": 0, "retried": 0, "dropped": 0}
        self._last_error: str | None = None

    def offer(self, event: AlertEvent) -> bool:
        if len(self._queue) >= self._queue_size:
            self._queue.popleft()
            self._counts["dropped"] += 1
        self._queue.append(event)
        self._wakeup.set()
        return True

    async def run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            event = self._queue[0]
            try:
                await self._deliver(event)
            except REDIS_DOWN_ERRORS as exc:
                self._counts["retried"] += 1
                self._last_error = one_line(exc)
                await asyncio.sleep(self._backoff.next_delay())
                continue
            self._backoff.reset()
            if self._queue and self._queue[0] is event:
                self._queue.popleft()
            self._counts["delivered"] += 1

    async def _deliver(self, event: AlertEvent) -> None:
        payload = event.to_json()
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self._keys.alerts,
                {"alert_id": event.alert_id, "event": payload},
                maxlen=self._maxlen,
                approximate=True,
            )
            pipe.publish(self._keys.alert(event.name), payload)
            await pipe.execute()

    async def aclose(self) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "queued": len(self._queue),
            **self._counts,
            "last_error": self._last_error,
        }
