"""Deduplication of requests by id, and the age check of stream entries.

A request id is "answered" once a non-retryable final or error event is stored at
``answer:<id>``. While it runs, ``seen:<id>`` (SET NX, TTL ``dedupe_ttl_s``) holds a small JSON
marker ``{"entry", "consumer", "until"}`` naming the stream entry that took the id, so a
redelivery of that same entry (its daemon died) is served again while a second entry with the
same id is not.

An id is answered once, whatever was stored for it before: a stored retryable event (``busy``,
from the quick path or an older daemon) lets the id be taken again, but only through the
``seen`` marker's SET NX, so two retries of one id never both run.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from sinks.connection import RedisClient
from sinks.replies import RETRYABLE_CODES
from sinks.schema import QueryRequest
from sinks.settings import Keys, QuerySettings


class Seen(enum.Enum):
    """What to do with one delivery of a request id."""

    NEW = "new"  # first time (or a redelivery of the same entry): serve it
    ANSWERED = "answered"  # a final event is stored: ack, do not answer again
    IN_PROGRESS = "in_progress"  # another entry/daemon holds this id right now: ack only
    REUSED = "reused"  # id seen before but its answer has expired: reject


async def mark_seen(
    client: RedisClient,
    keys: Keys,
    query: QuerySettings,
    request: QueryRequest,
    entry_id: str | None,
    received_at: float,
) -> Seen:
    """Decide whether this delivery of ``request`` should be served, and take the id if so.

    ``entry_id`` is the stream entry (None for the pub/sub path); ``received_at`` epoch seconds.
    """
    stored = await client.get(keys.answer(request.id))
    if stored is not None and not _is_retryable(stored):
        return Seen.ANSWERED
    marker = json.dumps(
        {
            "entry": entry_id,
            "consumer": query.consumer_name,
            "until": received_at + request.deadline_s,
        }
    )
    ttl = query.dedupe_ttl_s
    if await client.set(keys.seen(request.id), marker, nx=True, ex=ttl):
        if stored is not None:
            # The stale retryable event must not be read back as this retry's answer.
            await client.delete(keys.answer(request.id))
        return Seen.NEW
    holder = _parse_marker(await client.get(keys.seen(request.id)))
    # A redelivery of the very entry that took the id (its daemon died) is served again.
    # Another delivery is not, even if a retryable event is stored: the marker says a retry
    # of that id already runs (replying busy drops the marker in the same transaction).
    if entry_id is not None and holder.get("entry") == entry_id:
        await client.set(keys.seen(request.id), marker, ex=ttl)
        return Seen.NEW
    until = holder.get("until")
    if isinstance(until, int | float) and until + query.claim_idle_s < received_at:
        return Seen.REUSED
    return Seen.IN_PROGRESS


async def is_answered(client: RedisClient, keys: Keys, request_id: str) -> bool:
    """True when a final (non-retryable) event is stored for ``request_id``."""
    stored = await client.get(keys.answer(request_id))
    return stored is not None and not _is_retryable(stored)


def waited_too_long(entry_id: str, request: QueryRequest, now: float) -> bool:
    """True when the entry (XADD time from its id, ms) is older than the request's deadline."""
    added_at = entry_added_at(entry_id)
    return added_at is not None and now - added_at > request.deadline_s


def entry_added_at(entry_id: str) -> float | None:
    """Epoch seconds of a stream entry's XADD, from its id ``<ms>-<seq>`` (Redis's clock)."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000.0
    except ValueError:
        return None


def _is_retryable(stored_event: str | bytes) -> bool:
    try:
        event = json.loads(stored_event)
    except ValueError:
        return False
    return (
        isinstance(event, dict)
        and event.get("type") == "error"
        and event.get("code") in RETRYABLE_CODES
    )


def _parse_marker(value: str | bytes | None) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        marker = json.loads(value)
    except ValueError:
        return {}
    return marker if isinstance(marker, dict) else {}
