"""The request stream is the queue, through the real daemon (issue 9).

Old daemon: of 500 requests XADDed at once, 35 were answered and 465 got ``busy``; requests read
before the first clip got ``empty_memory`` although the stream was starting, also when a
restarted daemon (stable consumer name) drained its own pending entries; a poison entry was
never acked and every later request waited forever.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from cli_harness import ServeProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REQUESTS = "flashwatch:requests"
GROUP = "flashwatch"
CONSUMER_NAME = "flashwatch-test"
CONSUMER = ["--set", f"query.consumer_name={CONSUMER_NAME}"]


@pytest.fixture
def client(redis_server: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_server, decode_responses=True)
    yield connection
    connection.close()


class AllReplies:
    """Final and error events on every reply channel (PSUBSCRIBE), counted per request id."""

    def __init__(self, client: redis.Redis) -> None:
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe("flashwatch:reply:*")
        self.finals: dict[str, list[dict[str, Any]]] = {}

    def poll(self, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=0.05)
            if message and message["type"] == "pmessage":
                event = json.loads(message["data"])
                if event["type"] in ("final", "error"):
                    self.finals.setdefault(event["id"], []).append(event)
        return sum(len(events) for events in self.finals.values())

    def close(self) -> None:
        self._pubsub.close()


def request(request_id: str, **fields: Any) -> str:
    body = {"id": request_id, "question": "What is shown?", "max_new_tokens": 1, **fields}
    return json.dumps(body)


def wait_all_answered(
    replies: AllReplies, count: int, daemon: ServeProcess, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while replies.poll(1.0) < count:
        if daemon.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(
                f"{sum(map(len, replies.finals.values()))} of {count} answered:\n"
                f"{daemon.output()[-3000:]}"
            )


def test_500_requests_xadded_at_once_are_all_answered_once(
    serve: Any, redis_server: str, client: redis.Redis
) -> None:
    count = 500
    replies = AllReplies(client)
    try:
        pipe = client.pipeline(transaction=False)
        for index in range(count):
            # A short answer over the last 30 s keeps each query cheap; deadline_s: on a loaded
            # CPU the 500 answers still take minutes, and none may time out.
            body = request(f"burst-{index}", max_new_tokens=2, since="-30s", deadline_s=900)
            pipe.xadd(REQUESTS, {"request": body})
        pipe.execute()  # all there before the daemon reads (and before its first clip)
        # A short engine queue and answers of a few tokens: the intake must wait for room.
        daemon = serve("--redis-url", redis_server, *CONSUMER, "--set", "query.max_queued=4")
        wait_all_answered(replies, count, daemon, timeout_s=600)
        replies.poll(2.0)  # nothing answered twice arrives late
        assert daemon.terminate() == 0
    finally:
        replies.close()
    codes = [events[0].get("code", "final") for events in replies.finals.values()]
    assert len(replies.finals) == count, "some ids were never answered"
    assert all(len(events) == 1 for events in replies.finals.values()), "answered twice"
    assert codes == ["final"] * count, {code: codes.count(code) for code in set(codes)}
    assert int(client.xpending(REQUESTS, GROUP)["pending"]) == 0


def test_restarted_consumer_waits_for_memory_and_poison_does_not_wedge_it(
    serve: Any, redis_server: str, client: redis.Redis
) -> None:
    # An entry this consumer name read in an earlier run and never answered (a restart
    # drains it at once, before the stream's first clip), then poison, then a valid request.
    client.xgroup_create(REQUESTS, GROUP, id="0", mkstream=True)
    client.xadd(REQUESTS, {"request": request("left-pending")})
    client.xreadgroup(GROUP, CONSUMER_NAME, {REQUESTS: ">"}, count=10)
    raw = redis.Redis.from_url(redis_server)
    poison = {
        "deep": b'{"id": "deep", "question": "q", "stream": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        "huge": b'{"id": "huge", "question": "q", "since": 1' + b"0" * 400 + b"}",
        "bytes": b'{"id": "bytes", "question": "\xff"}',
    }
    for body in poison.values():
        raw.xadd(REQUESTS, {b"request": body})
    raw.close()
    client.xadd(REQUESTS, {"request": request("after-poison")})
    replies = AllReplies(client)
    try:
        daemon = serve("--redis-url", redis_server, *CONSUMER)
        wait_all_answered(replies, 2 + len(poison), daemon, timeout_s=240)
        assert daemon.terminate() == 0
    finally:
        replies.close()
    for request_id in ("left-pending", "after-poison"):
        assert [e["type"] for e in replies.finals[request_id]] == ["final"], replies.finals
    for request_id in poison:
        assert replies.finals[request_id][0]["code"] == "invalid_request"
    assert int(client.xpending(REQUESTS, GROUP)["pending"]) == 0
    assert "Traceback" not in daemon.output()
