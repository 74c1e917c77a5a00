"""Client side of standing-query administration: ``alert add|list|rm|test`` over Redis.

A request is one JSON object published on ``Keys.alerts_admin``; the daemon answers on
``Keys.reply(id)`` (and keeps the answer at ``Keys.answer(id)`` a minute) with a final event,
or an error event whose ``code`` becomes the matching QueryError subclass.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from sinks.client import _reply_events, _subscribed, error_from_event
from sinks.errors import BusError
from sinks.settings import Keys
from streamer.engine.errors import QueryError, QueryTimeout

AdminOp = Literal["add", "list", "rm", "test"]


async def alert_admin(
    url: str,
    op: AdminOp,
    *,
    prefix: str = "flashwatch",
    timeout_s: float = 60.0,
    rule: dict[str, Any] | None = None,
    name: str | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Run one admin request; the daemon's final event. BusError when no daemon listens."""
    request_id = uuid.uuid4().hex
    keys = Keys(prefix)
    request: dict[str, Any] = {"v": 1, "id": request_id, "op": op}
    if rule is not None:
        request["rule"] = rule
    if name is not None:
        request["name"] = name
    if replace:
        request["replace"] = True
    deadline = time.monotonic() + timeout_s
    async with _subscribed(url, keys.reply(request_id)) as (client, pubsub):
        if await client.publish(keys.alerts_admin, json.dumps(request)) == 0:
            raise BusError(f"no daemon is subscribed to {keys.alerts_admin}")
        async for event in _reply_events(client, pubsub, keys, request_id, deadline, timeout_s):
            if event.get("type") == "error":
                raise error_from_event(event)
            if event.get("type") == "final":
                return event
    raise QueryTimeout(f"no reply to alert request {request_id}")


__all__ = ["AdminOp", "QueryError", "alert_admin"]
