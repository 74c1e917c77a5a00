"""Alerts into Redis: the ``<prefix>:alerts`` stream for consumer groups, pub/sub for listeners.

One Lua script does both, guarded by a marker key per alert id (``Keys.alert_sent``, with a
TTL): the first delivery of an id adds the stream entry (MAXLEN ~ bounded), remembers the entry
id in the marker and publishes on ``<prefix>:alert:<name>``; a redelivery of the same id (a
retry whose reply was lost, the engine re-emitting after a restart) finds the marker and adds
nothing. The marker's hash tag is the stream's name, so the script is Cluster-safe.

While Redis is away the event is retried with the project's backoff, for as long as it takes;
the others wait in the bounded queue behind it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sinks.alerts.queue import AlertQueue
from sinks.connection import (
    REDIS_DOWN_ERRORS,
    RedisClient,
    describe_redis_error,
    open_redis,
    redis_backoff,
)
from sinks.redact import url_secrets
from sinks.settings import Keys, RedisSettings
from streamer.engine.standing.events import AlertEvent

log = logging.getLogger(__name__)

ATTEMPT_TIMEOUT_S = 5.0  # one script call, beyond the connect timeout

# KEYS[1] the alerts stream, KEYS[2] the alert id's marker (same slot).
# ARGV: alert id, name, event JSON, MAXLEN, marker TTL (s), pub/sub channel.
# Returns {1, entry id} when added, {0, entry id or false} when the id was already there.
ADD_ONCE_LUA = """
local seen = redis.call('GET', KEYS[2])
if seen then
  return {0, seen}
end
local entry = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*',
  'alert_id', ARGV[1], 'name', ARGV[2], 'event', ARGV[3])
redis.call('SET', KEYS[2], entry, 'EX', ARGV[5])
redis.call('PUBLISH', ARGV[6], ARGV[3])
return {1, entry}
"""


class RedisAlertSink:
    """The ``redis`` channel: stream entry + pub/sub message, once per alert id."""

    name = "redis"

    def __init__(
        self,
        redis: RedisSettings,
        *,
        stream_maxlen: int,
        marker_ttl_s: int,
        queue_size: int,
        keys: Keys | None = None,
        client: RedisClient | None = None,
    ) -> None:
        self._settings = redis
        self._keys = keys or Keys(redis.prefix)
        self._stream_maxlen = stream_maxlen
        self._marker_ttl_s = marker_ttl_s
        self._owns_client = client is None
        self._client = client or open_redis(
            redis, read_timeout_s=redis.connect_timeout_s + ATTEMPT_TIMEOUT_S
        )
        self._script = self._client.register_script(ADD_ONCE_LUA)
        self._queue = AlertQueue(self.name, queue_size, url_secrets(redis.url))
        self.duplicates = 0  # deliveries of an id already in the stream (nothing added)

    def offer(self, event: AlertEvent) -> bool:
        return self._queue.put(event)

    async def run(self) -> None:
        backoff = redis_backoff(self._settings)
        while True:
            item = await self._queue.get()
            while True:
                try:
                    await self.deliver(item.event)
                except asyncio.CancelledError:
                    self._queue.put_back(item)  # still owed: aclose counts it as dropped
                    raise
                except REDIS_DOWN_ERRORS as exc:
                    self._queue.retried += 1
                    shown = self._queue.note_error(describe_redis_error(exc, self._settings.url))
                    delay = backoff.next_delay()
                    log.warning("alert %s not stored: %s; retrying in %.1f s", item.event.alert_id,
                                shown, delay)  # fmt: skip
                    await asyncio.sleep(delay)
                else:
                    backoff.reset()
                    self._queue.note_delivered()
                    break

    async def deliver(self, event: AlertEvent) -> bool:
        """Add ``event`` once: True when added now, False when its id was already there."""
        keys = self._keys
        async with asyncio.timeout(self._settings.connect_timeout_s + ATTEMPT_TIMEOUT_S):
            added, _entry = await self._script(
                keys=[keys.alerts, keys.alert_sent(event.alert_id)],
                args=[
                    event.alert_id,
                    event.name,
                    event.to_json(),
                    self._stream_maxlen,
                    self._marker_ttl_s,
                    keys.alert(event.name),
                ],
            )
        if not int(added):
            self.duplicates += 1
            log.info("alert %s was already in the stream; not added again", event.alert_id)
            return False
        return True

    async def aclose(self) -> None:
        left = self._queue.close()
        if left:
            log.warning("%d alert(s) not stored in Redis at shutdown", left)
        if self._owns_client:
            await self._client.aclose()

    def unsettled(self) -> set[str]:
        return self._queue.unsettled()

    def stats(self) -> dict[str, Any]:
        return {**self._queue.stats(), "duplicates": self.duplicates}
