"""One real daemon (the tiny demo model) on a three-master Redis Cluster: ``flashwatch status``,
``ask`` and ``forget`` through ``redis+cluster://``, and the Python client too."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from cli_harness import ServeProcess, run_cli, status_once, wait_for
from redis_cluster import RedisCluster

from sinks import ask
from sinks.connection import open_redis_url
from sinks.settings import Keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
KEYS = Keys("flashwatch")


def test_daemon_on_a_redis_cluster_answers_shows_status_and_forgets(
    serve: Callable[..., ServeProcess], redis_cluster: RedisCluster, cli_env: dict[str, str]
) -> None:
    url = redis_cluster.url
    daemon = serve("--redis-url", url)

    def with_clips() -> dict[str, Any] | None:
        if daemon.proc.poll() is not None:
            pytest.fail(f"serve exited:\n{daemon.output()[-3000:]}")
        snapshot = status_once(url, cli_env)
        return snapshot if snapshot and snapshot["streams"][0]["clips"] >= 2 else None

    snapshot = wait_for(with_clips, 120, "two clips in the status read over the cluster")
    assert snapshot["redis"]["state"] == "connected"
    span = snapshot["streams"][0]["memory"]["span"]

    asked = run_cli("ask", "--json", "--redis-url", url, "--max-new-tokens", "2",
                    "What is shown?", env=cli_env)  # fmt: skip
    assert asked.returncode == 0, asked.stderr + daemon.output()[-3000:]
    answer = json.loads(asked.stdout)
    assert isinstance(answer["answer"], str) and answer["id"]
    assert answer["stream"] == ["demo"] and answer["evidence"]

    # The Python client, and the stored answer on the request's own slot.
    final = asyncio.run(ask(url, "What colour?", stream="demo", max_new_tokens=2, timeout_s=90))
    assert final["type"] == "final"
    stored = asyncio.run(_stored(url, answer["id"]))
    assert stored is not None
    assert json.loads(stored)["type"] == "final" and json.loads(stored)["id"] == answer["id"]

    since, until = span[0] + 0.5, span[0] + 1.5
    forgot = run_cli("forget", "--redis-url", url, "--stream", "demo", "--since", str(since),
                     "--until", str(until), "--json", env=cli_env)  # fmt: skip
    assert forgot.returncode == 0, forgot.stderr
    assert json.loads(forgot.stdout)["forgotten"] == {
        "stream": "demo",
        "start": since,
        "end": until,
    }
    assert daemon.terminate() == 0, daemon.output()[-3000:]


async def _stored(url: str, request_id: str) -> str | None:
    client = open_redis_url(url, connect_timeout_s=5.0)
    try:
        value = await client.get(KEYS.answer(request_id))
        return None if value is None else str(value)
    finally:
        await client.aclose()
