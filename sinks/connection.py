"""Opening Redis clients, pacing reconnects, and telling "away" from "refused".

A Redis that is away (refused, timeout, reset) is retried with backoff. A Redis that answers
but refuses us (wrong or missing password, an ACL user without a needed command, key or
channel) is a different state: :func:`redis_state_of` sorts an error into one of
:class:`RedisState`, :func:`describe_redis_error` says it in one line, and
:func:`check_access` tries every kind of command the daemon sends, harmlessly, so a missing
ACL permission is reported at start instead of as an endless "unavailable".
"""

from __future__ import annotations

import asyncio
from enum import StrEnum
from typing import TypeAlias
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
    RedisClusterException,
)

from sinks.errors import BusAccessDenied
from sinks.redact import redact_text, redact_url
from sinks.settings import CLUSTER_SCHEMES, Keys, QuerySettings, RedisSettings, cluster_nodes
from streamer.ingest.backoff import Backoff

# Errors that mean "Redis is away or misbehaving": reconnect with backoff, never crash.
# redis-py raises its own ConnectionError/TimeoutError (RedisError subclasses) for most of them,
# but a refused connect or a reset socket can surface as a bare OSError.
# A Cluster none of whose nodes answers (or whose slots are not all served, mid-failover) raises
# redis-py's RedisClusterException, which is no RedisError.
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    aioredis.RedisError,
    RedisClusterException,
    OSError,
    TimeoutError,
)

JITTER_FRACTION = 0.2  # ±20 % so daemons that lost Redis together do not reconnect in lockstep
# MOVED/ASK redirects (a slot moved while resharding or after a failover) are followed by
# redis-py's retry loop, so a Cluster client keeps a few immediate retries.
CLUSTER_REDIRECT_RETRIES = 3

# A single server's client, or a Cluster's: both speak the same commands, pipelines
# (transaction=False everywhere; a transaction only on keys of one slot) and pub/sub.
RedisClient: TypeAlias = aioredis.Redis | RedisCluster


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a Redis read swallowed.

    redis-py 8 can let a blocking read (XREADGROUP with BLOCK, ``get_message`` with a timeout)
    return as usual when its task is cancelled meanwhile; the stop is lost and a read loop runs
    on. Loops that block on Redis call this after each read, so a stop always ends them.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


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
) -> RedisClient:
    """A client of the configured Redis; no connection is made yet.

    ``decode_responses=False`` gives raw bytes, for reading input others wrote (a non-UTF-8
    byte would otherwise raise inside redis-py, before the caller can reject that one entry).

    redis-py's own silent retries are switched off: callers see every failure and pace their
    reconnects with :func:`redis_backoff` instead. ``read_timeout_s`` bounds a reply wait (give more
    than any BLOCK time used on the client); None waits as long as the socket lives.
    ``health_check_interval_s`` > 0 PINGs connections idle that long before use (long-lived
    subscriptions behind NAT or firewalls that silently drop idle connections).
    """
    return open_redis_url(
        settings.url,
        connect_timeout_s=settings.connect_timeout_s,
        read_timeout_s=read_timeout_s,
        health_check_interval_s=health_check_interval_s,
        decode_responses=decode_responses,
    )


def open_redis_url(
    url: str,
    *,
    connect_timeout_s: float,
    read_timeout_s: float | None = None,
    health_check_interval_s: int = 0,
    decode_responses: bool = True,
) -> RedisClient:
    """The one client factory: a single server for ``redis://``, ``rediss://`` and ``unix://``,
    a Cluster (``redis.asyncio.cluster.RedisCluster``) for ``redis+cluster://`` and
    ``rediss+cluster://`` (see :func:`cluster_nodes`). Arguments as :func:`open_redis`."""
    if not is_cluster_url(url):
        return aioredis.Redis.from_url(
            url,
            decode_responses=decode_responses,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=read_timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=health_check_interval_s,
        )
    parts = urlsplit(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster_nodes(url)],
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ssl=url.startswith("rediss+"),
        decode_responses=decode_responses,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=read_timeout_s,
        retry=Retry(NoBackoff(), CLUSTER_REDIRECT_RETRIES),
        health_check_interval=health_check_interval_s,
    )


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def is_cluster(client: RedisClient) -> bool:
    """True for a Cluster client: a MULTI/EXEC may then only touch keys of one slot."""
    return isinstance(client, RedisCluster)


async def open_pubsub(client: RedisClient, *, ignore_subscribe_messages: bool = False) -> PubSub:
    """A pub/sub object of ``client``; not subscribed yet.

    Classic SUBSCRIBE/PUBLISH are cluster-wide, so a Cluster's pub/sub needs one connection to
    any one node: redis-py picks the node serving the first channel's slot, which needs the slot
    map, loaded here first (a fresh Cluster client has none until its first command).
    """
    if isinstance(client, RedisCluster):
        await client.initialize()
    return client.pubsub(ignore_subscribe_messages=ignore_subscribe_messages)


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


async def check_access(client: RedisClient, settings: RedisSettings, query: QuerySettings) -> None:
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


async def _subscribe_refused(client: RedisClient, keys: Keys, prefix: str) -> list[str]:
    """``+subscribe`` (or the channel pattern) when the ACL refuses a subscription."""
    pubsub = client.pubsub()  # after the probes above: a Cluster client has its slot map
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
