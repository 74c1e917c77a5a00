"""Nothing lost: requests made while the daemon is down, a daemon killed mid-answer, Redis
restarting under the daemon; answers cite spans inside the range asked about."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from cli_harness import ServeProcess, status_once, wait_for
from redis_harness import RedisServer

pytestmark = pytest.mark.integration

CONSUMER = ["--set", "query.consumer_name=flashwatch-test"]  # a restart drains its own entries


class Replies:
    """Every event published on one request's reply channel, from a background subscriber."""

    def __init__(self, client: redis.Redis, request_id: str) -> None:
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(f"flashwatch:reply:{{{request_id}}}")
        self._pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        self.events: list[dict[str, Any]] = []

    def poll(self, seconds: float = 0.2) -> list[dict[str, Any]]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=0.05)
            if message and message["type"] == "message":
                self.events.append(json.loads(message["data"]))
        return self.events

    def finals(self) -> list[dict[str, Any]]:
        return [e for e in self.poll() if e["type"] in ("final", "error")]


@pytest.fixture
def client(redis_server: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_server, decode_responses=True)
    yield connection
    connection.close()


def xadd(client: redis.Redis, request: dict[str, Any] | str) -> None:
    body = request if isinstance(request, str) else json.dumps(request)
    client.xadd("flashwatch:requests", {"request": body})


def pending(client: redis.Redis) -> int:
    try:
        return int(client.xpending("flashwatch:requests", "flashwatch")["pending"])
    except redis.ResponseError:  # no group yet
        return 0


def _has_clips(url: str, env: dict[str, str], n: int = 1) -> bool:
    snapshot = status_once(url, env)
    return snapshot is not None and snapshot["streams"][0]["clips"] >= n


def test_request_made_while_down_is_answered_once_after_start(
    serve: Callable[..., ServeProcess], redis_server: str, client: redis.Redis,
    cli_env: dict[str, str],
) -> None:  # fmt: skip
    replies = Replies(client, "early-bird")
    # since=-1h: the daemon has no memory before it starts; the question waits in Redis.
    xadd(client, {"id": "early-bird", "question": "What changed?", "max_new_tokens": 4})
    daemon = serve("--redis-url", redis_server, *CONSUMER)
    finals = wait_for(replies.finals, 90, "the answer to the early request")
    time.sleep(2.0)
    finals = replies.finals()
    assert len(finals) == 1, finals
    # Memory may still be empty when the daemon reads it: then the answer is an error event
    # that says so; either way it is answered exactly once, stored and acknowledged.
    assert finals[0]["type"] == "final" or finals[0]["code"] == "empty_memory"
    assert json.loads(client.get("flashwatch:answer:{early-bird}"))["id"] == "early-bird"
    assert pending(client) == 0
    assert daemon.terminate() == 0


def test_daemon_killed_mid_answer_leaves_the_request_for_the_next_one(
    serve: Callable[..., ServeProcess], redis_server: str, client: redis.Redis,
    cli_env: dict[str, str],
) -> None:  # fmt: skip
    first = serve("--redis-url", redis_server, *CONSUMER)
    wait_for(lambda: _has_clips(redis_server, cli_env, 2), 90, "clips")
    for attempt in range(5):  # the tiny model may stop early: retry until killed mid-answer
        request_id = f"long-{attempt}"
        replies = Replies(client, request_id)
        xadd(client, {"id": request_id, "question": "Describe everything.",
                      "max_new_tokens": 1024, "temperature": 1.0})  # fmt: skip
        wait_for(lambda: replies.poll(0.05), 60, "the first token")  # noqa: B023
        first.terminate(signal.SIGKILL)
        if not replies.finals():
            break
        first = serve("--redis-url", redis_server, *CONSUMER)
        wait_for(lambda: _has_clips(redis_server, cli_env, 2), 90, "clips")
    else:
        pytest.skip("every answer finished before the kill")
    assert pending(client) == 1, "the killed daemon never acknowledged it"

    second = serve("--redis-url", redis_server, *CONSUMER)
    wait_for(replies.finals, 120, "the answer from the restarted daemon")
    time.sleep(2.0)
    assert len(replies.finals()) == 1
    assert pending(client) == 0
    assert second.terminate() == 0


def test_redis_restart_under_a_running_daemon(
    serve: Callable[..., ServeProcess], redis_server_handle: RedisServer,
    cli_env: dict[str, str],
) -> None:  # fmt: skip
    url = redis_server_handle.url
    daemon = serve("--redis-url", url)
    wait_for(lambda: _has_clips(url, cli_env, 1), 90, "clips")
    redis_server_handle.stop()
    time.sleep(2.0)
    redis_server_handle.start()  # same port, empty: the daemon must re-create its group
    wait_for(lambda: _has_clips(url, cli_env, 2), 60, "status again after the restart")
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        replies = Replies(client, "after-restart")
        xadd(client, {"id": "after-restart", "question": "Still there?", "max_new_tokens": 4})
        finals = wait_for(replies.finals, 60, "an answer after Redis came back")
        assert finals[0]["type"] == "final"
    finally:
        client.close()
    assert daemon.terminate() == 0
    assert "Traceback" not in daemon.output()


def test_bad_requests_get_codes_and_answers_stay_in_range(
    serve: Callable[..., ServeProcess], redis_server: str, client: redis.Redis,
    cli_env: dict[str, str],
) -> None:  # fmt: skip
    daemon = serve("--redis-url", redis_server)
    wait_for(lambda: _has_clips(redis_server, cli_env, 4), 90, "four clips")
    bad = {
        "bad-json": "{not json",
        "no-question": {"id": "no-question"},
        "huge": {"id": "huge", "question": "x" * 100_000},
        "backwards": {"id": "backwards", "question": "q", "since": "-1m", "until": "-2m"},
        "nope": {"id": "nope", "question": "q", "stream": "nope"},
    }
    for body in bad.values():
        xadd(client, body)
    expected = {"no-question": "invalid_request", "huge": "invalid_request",
                "backwards": "invalid_request", "nope": "unknown_stream"}  # fmt: skip
    for request_id, code in expected.items():
        stored = wait_for(lambda: client.get(f"flashwatch:answer:{{{request_id}}}"), 30, request_id)  # noqa: B023
        assert json.loads(stored)["code"] == code, stored

    now = time.time()
    since, until = now - 6.0, now - 2.0
    replies = Replies(client, "in-range")
    xadd(client, {"id": "in-range", "question": "What happened?", "since": since,
                  "until": until, "max_new_tokens": 4})  # fmt: skip
    final = wait_for(replies.finals, 60, "the ranged answer")[0]
    assert final["type"] == "final", final
    assert final["evidence"]
    for span in final["evidence"] + final["attended"]:
        assert span["end"] > since and span["start"] < until  # overlaps the range asked about
    assert pending(client) == 0
    assert daemon.terminate() == 0
