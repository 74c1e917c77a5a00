"""Publishing the daemon's status snapshot on Redis for ``flashwatch status`` and dashboards.

Each snapshot is PUBLISHed on ``<prefix>:status`` and stored at ``<prefix>:status:last`` with a
short TTL, so a new viewer gets one at once and a dead daemon's last status soon disappears. In
a fleet each daemon also stores its own at ``Keys.status_of(daemon_id)`` (``status:last`` is
then whichever daemon wrote last; kept for single-daemon viewers).
Redis outages are ridden out: a failed publish is counted and skipped, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from sinks.connection import REDIS_DOWN_ERRORS, RedisClient, open_redis, redis_backoff
from sinks.redact import redact_url
from sinks.schema import DaemonStatus
from sinks.settings import Keys, RedisSettings, StatusSettings

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 2.0


class StatusPublisher:
    """``publish(status)`` never raises for Redis trouble; ``skipped`` counts lost snapshots."""

    def __init__(
        self,
        redis: RedisSettings,
        status: StatusSettings,
        *,
        daemon_id: str | None = None,
        client: RedisClient | None = None,
    ) -> None:
        """``daemon_id``: also store each snapshot at ``Keys.status_of(daemon_id)``, where the
        fleet view (``sinks.fleet.status``) finds every daemon's."""
        self._redis_settings = redis
        self._settings = status
        self._keys = Keys(redis.prefix)
        self._daemon_id = daemon_id
        self._owns_client = client is None
        self._client = client or open_redis(redis, read_timeout_s=PUBLISH_TIMEOUT_S)
        self._backoff = redis_backoff(redis)
        self._retry_at = 0.0  # monotonic; publishes are skipped until then after a failure
        self.published = 0
        self.skipped = 0

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def publish(self, status: DaemonStatus) -> bool:
        """SET the snapshot as the last one (and as this daemon's; TTL), then PUBLISH it.

        False if skipped.
        """
        if time.monotonic() < self._retry_at:
            self.skipped += 1
            return False
        payload = status.model_dump_json()
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                ttl = self._settings.last_ttl_s
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.set(self._keys.status_last, payload, ex=ttl)
                    if self._daemon_id is not None:
                        pipe.set(self._keys.status_of(self._daemon_id), payload, ex=ttl)
                    await pipe.execute()
                # Not pipelined: a Cluster client refuses PUBLISH inside a pipeline.
                await self._client.publish(self._keys.status, payload)
        except REDIS_DOWN_ERRORS as exc:
            self.skipped += 1
            delay = self._backoff.next_delay()
            self._retry_at = time.monotonic() + delay
            if self._backoff.attempt == 1:  # once per outage
                log.warning(
                    "status not published: Redis at %s unavailable (%s); retrying in %.1f s",
                    redact_url(self._redis_settings.url),
                    exc,
                    delay,
                )
            return False
        if self._backoff.attempt:
            log.info("status publishing resumed after %d skipped snapshots", self.skipped)
        self._backoff.reset()
        self.published += 1
        return True

    async def run(self, snapshot: Callable[[], DaemonStatus]) -> None:
        """Publish ``snapshot()`` every ``publish_interval_s`` until cancelled."""
        while True:
            await self.publish(snapshot())
            await asyncio.sleep(self._settings.publish_interval_s)
