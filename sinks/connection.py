"""Opening Redis clients, pacing reconnects, and telling "away" from "refused".

A Redis that is away (refused, timeout, reset) is retried with backoff. A Redis that answers
but refuses us (wrong or missing password, an ACL user without a needed command, key or
channel) is a different state: :func:`redis_state_of` sorts an error into one of
:class:`RedisState`, :func:`describe_redis_error` says it in one line, and
:func:`check_access` tries every kind of command the daemon sends, harmlessly, so a missing
ACL permission is reported at start instead of as an endless "unavailable".
"""

from __future__ import annotations

from enum import StrEnum
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
)

from sinks.errors import BusAccessDenied
from sinks.redact import redact_text, redact_url
from sinks.settings import Keys, QuerySettings, RedisSettings
from streamer.ingest.backoff import Backoff

# Errors that mean "Redis is away or misbehaving": reconnect with backoff, never crash.
# redis-py raises its own ConnectionError/TimeoutError (RedisError subclasses) for most of them,
# but a refused connect or a reset socket can surface as a bare OSError.
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    aioredis.RedisError,
    OSError,
    TimeoutError,
)

JITTER_FRACTION = 0.2  # ±20 % so daemons that lost Redis together do not reconnect in lockstep


def redis_backoff(settings: RedisSettings) -> Backoff:
    """Reconnect pacing for Redis, with the project's one backoff: ``next_delay()`` after a
    failure, ``reset()`` after a success, ``attempt`` counts the failures since."""
    return Backoff(settings.backoff_initial_s, settings.backoff_max_s, jitter=JITTER_FRACTION)


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
    reconnects with :func:`redis_backoff` instead. ``read_timeout_s`` bounds a reply wait (give more
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


class RedisState(StrEnum):
    """How the daemon stands with its Redis, as status shows it."""

    CONNECTING = "connecting"  # not tried yet
    CONNECTED = "connected"
    UNREACHABLE = "unreachable"  # refused, timed out, reset: retried with backoff
    AUTH_FAILED = "auth_failed"  # wrong or missing password (or a rotated one)
    NO_PERMISSION = "no_permission"  # the ACL user lacks a command, key or channel


def redis_state_of(exc: BaseException) -> RedisState:
    """The state an error from redis-py (or the socket under it) means."""
    if isinstance(exc, AuthenticationError | AuthenticationWrongNumberOfArgsError):
        return RedisState.AUTH_FAILED
    if isinstance(exc, NoPermissionError):
        return RedisState.NO_PERMISSION
    return RedisState.UNREACHABLE


def describe_redis_error(exc: BaseException, url: str) -> str:
    """One line for a log or status: ``Redis at redis://:***@host/0: authentication failed``."""
    shown = redact_url(url)
    state = redis_state_of(exc)
    if state is RedisState.AUTH_FAILED:
        why = (
            "wrong user name or password"
            if _password_of(url)
            else "the server requires a password and the URL has none"
        )
        return f"Redis at {shown}: authentication failed ({why})"
    detail = redact_text(" ".join(str(exc).split()))[:200] or type(exc).__name__
    if state is RedisState.NO_PERMISSION:
        return f"Redis at {shown}: ACL user {_user_of(url)!r} is refused: {detail}"
    return f"Redis at {shown} is unreachable ({type(exc).__name__}: {detail})"


async def check_access(
    client: aioredis.Redis, settings: RedisSettings, query: QuerySettings
) -> None:
    """Try each kind of command the daemon sends, in a form that changes nothing.

    Raises BusAccessDenied naming every missing permission in one line (``ACL user 'x' lacks
    +xgroup, +xautoclaim``); lets other Redis errors through (the caller retries those).
    """
    keys = Keys(settings.prefix)
    # Stream commands run on the probe key, which holds no stream, with a group that does not
    # exist: Redis checks the ACL first, then fails them (no such key, NOGROUP), touching
    # nothing (an XREADGROUP on the real stream would count a redelivery of pending entries).
    scratch, group, consumer = keys.probe, "flashwatch-probe", query.consumer_name
    probes = {
        "+ping": lambda: client.ping(),
        "+del": lambda: client.delete(scratch),
        "+xgroup": lambda: client.xgroup_create(scratch, group, id="0"),
        "+xreadgroup": lambda: client.xreadgroup(group, consumer, {scratch: ">"}, count=1),
        "+xack": lambda: client.xack(scratch, group, "0-1"),
        "+xclaim": lambda: client.xclaim(scratch, group, consumer, 0, ["0-1"], justid=True),
        "+xautoclaim": lambda: client.xautoclaim(scratch, group, consumer, 0, count=1),
        "+xinfo": lambda: client.xinfo_consumers(scratch, group),
        "+xtrim": lambda: client.xtrim(scratch, maxlen=1),
        "+xadd": lambda: client.xadd(scratch, {"probe": "1"}, maxlen=1),
        "+get": lambda: client.get(scratch),
        "+hget": lambda: client.hget(keys.daemons, "probe"),
        "+set": lambda: client.set(scratch, "1", px=1000),  # replaces the probe stream; expires
        "+publish": lambda: client.publish(scratch, "probe"),
        "+eval": lambda: client.eval("return 1", 0),
    }
    missing: list[str] = []
    for permission, probe in probes.items():
        try:
            await probe()
        except NoPermissionError as exc:
            missing.append(_refused(permission, exc, settings.prefix))
        except aioredis.ResponseError:
            pass  # permitted, and failed for another reason (no group yet, no such key): fine
    missing += await _subscribe_refused(client, keys, settings.prefix)
    if missing:
        raise BusAccessDenied(
            f"Redis at {redact_url(settings.url)}: ACL user {_user_of(settings.url)!r} lacks "
            + ", ".join(missing)
        )


async def _subscribe_refused(client: aioredis.Redis, keys: Keys, prefix: str) -> list[str]:
    """``+subscribe`` (or the channel pattern) when the ACL refuses a subscription."""
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(keys.status)
        await pubsub.unsubscribe()
        return []
    except NoPermissionError as exc:
        return [_refused("+subscribe", exc, prefix)]
    finally:
        await pubsub.aclose()


def _refused(permission: str, exc: NoPermissionError, prefix: str) -> str:
    """The permission a NOPERM error is about: the command itself, or its keys or channels."""
    text = str(exc)
    if "keys" in text:
        return f"{permission} on keys ~{prefix}:*"
    if "channels" in text:
        return f"{permission} on channels &{prefix}:*"
    return permission


def _user_of(url: str) -> str:
    try:
        user = urlsplit(url).username
    except ValueError:
        return "default"
    return unquote(user) if user else "default"


def _password_of(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None
