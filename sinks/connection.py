"""Opening Redis clients and pacing reconnects (exponential backoff with jitter)."""

from __future__ import annotations

import random

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sinks.settings import RedisSettings

# Errors that mean "Redis is away or misbehaving": reconnect with backoff, never crash.
# redis-py raises its own ConnectionError/TimeoutError (RedisError subclasses) for most of them,
# but a refused connect or a reset socket can surface as a bare OSError.
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    aioredis.RedisError,
    OSError,
    TimeoutError,
)

JITTER_FRACTION = 0.2  # ±20 % so daemons that lost Redis together do not reconnect in lockstep


def backoff_delay(attempt: int, initial_s: float, max_s: float, jitter: float = 0.0) -> float:
    """Seconds to wait before reconnect ``attempt`` (0-based): ``initial·2^attempt``, capped.

    ``jitter`` in [-1, 1] scales the delay by ``1 + jitter·JITTER_FRACTION`` (after the cap,
    so the cap holds to within the jitter fraction).
    """
    exponent = min(max(attempt, 0), 60)  # 2**60 already dwarfs any cap; avoids float overflow
    base = min(max_s, initial_s * (2.0**exponent))
    return base * (1.0 + max(-1.0, min(1.0, jitter)) * JITTER_FRACTION)


class Backoff:
    """Reconnect pacing state: ``next_delay()`` after a failure, ``reset()`` after a success."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._rng = rng or random.Random()
        self.attempt = 0

    @classmethod
    def for_settings(cls, settings: RedisSettings) -> Backoff:
        return cls(settings.backoff_initial_s, settings.backoff_max_s)

    def next_delay(self) -> float:
        delay = backoff_delay(self.attempt, self._initial_s, self._max_s, self._rng.uniform(-1, 1))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


def open_redis(
    settings: RedisSettings,
    *,
    read_timeout_s: float | None = None,
    health_check_interval_s: int = 0,
    decode_responses: bool = True,
) -> aioredis.Redis:
    """A text-mode (``decode_responses``) asyncio client; no connection is made yet.

    ``decode_responses=False`` gives raw bytes, for reading input others wrote (a non-UTF-8
    byte would otherwise raise inside redis-py, before the caller can reject that one entry).

    redis-py's own silent retries are switched off: callers see every failure and pace their
    reconnects with :class:`Backoff` instead. ``read_timeout_s`` bounds a reply wait (give more
    than any BLOCK time used on the client); None waits as long as the socket lives.
    ``health_check_interval_s`` > 0 PINGs connections idle that long before use (long-lived
    subscriptions behind NAT or firewalls that silently drop idle connections).
    """
    return aioredis.Redis.from_url(
        settings.url,
        decode_responses=decode_responses,
        socket_connect_timeout=settings.connect_timeout_s,
        socket_timeout=read_timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=health_check_interval_s,
    )
