"""Standing queries end to end: the real daemon and tiny model on the synthetic source.

A condition whose threshold comes from ``alert test`` fires and its event reaches the Redis
alert stream; a summary on a short schedule produces its text. Events are read from the
stream by ``alert_events`` (one place to extend when more channels are checked here).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
from cli_harness import ServeProcess, run_cli, status_once, wait_for

from sinks.settings import Keys

pytestmark = pytest.mark.integration

QUESTION = "Is there a colourful test pattern?"


def alert_events(url: str) -> list[dict[str, Any]]:
    """Every event on the Redis alert stream, oldest first."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        entries = client.xrange(Keys().alerts)
    finally:
        client.close()
    return [json.loads(fields["event"]) for _, fields in entries]


def test_a_condition_fires_and_a_summary_runs(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str]
) -> None:
    recap = "[{kind: summary, name: recap, streams: [demo], every_minutes: 0.1}]"
    daemon = serve("--redis-url", redis_server, "--set", f"alerts.rules={recap}",
                   "--set", "engine.warm_up=false")  # fmt: skip
    client = ["--redis-url", redis_server]

    def with_clips() -> bool:
        snapshot = status_once(redis_server, cli_env)
        return bool(snapshot and snapshot["streams"][0]["clips"] >= 3)

    wait_for(with_clips, 90, "three clips")
    tested = run_cli("alert", "test", *client, "--json", "--stream", "demo",
                     "--question", QUESTION, "--window", "8", env=cli_env)  # fmt: skip
    assert tested.returncode == 0, tested.stderr
    score = json.loads(tested.stdout)["test"]["score"]
    assert 0.0 < score < 1.0
    threshold = f"{max(0.001, score / 2):.6f}"  # well below today's score: it fires
    added = run_cli("alert", "add", "look", *client, "--stream", "demo", "--question", QUESTION,
                    "--window", "8", "--threshold", threshold, "--clear-threshold", "0.0005",
                    env=cli_env)  # fmt: skip
    assert added.returncode == 0, added.stderr
    again = run_cli("alert", "add", "look", *client, "--stream", "demo", "--question", "x",
                    env=cli_env)  # fmt: skip
    assert again.returncode == 1 and "exists" in again.stderr

    def fired() -> dict[str, Any] | None:
        events = [e for e in alert_events(redis_server) if e["name"] == "look"]
        return events[0] if events else None

    event = wait_for(fired, 60, "the condition's alert on the Redis stream")
    assert event["alert_id"] == "look:1" and event["state"] == "fired"
    assert event["score"] >= float(threshold) and event["streams"] == ["demo"]

    def summary() -> dict[str, Any] | None:
        events = [e for e in alert_events(redis_server) if e["name"] == "recap"]
        return events[0] if events else None

    text = wait_for(summary, 60, "the summary on the Redis stream")
    assert text["alert_id"] == "recap:1" and text["state"] == "summary" and text["text"]
    listed = run_cli("alert", "list", *client, "--json", env=cli_env)
    names = {item["rule"]["name"]: item for item in json.loads(listed.stdout)["rules"]}
    assert names["look"]["source"] == "runtime" and names["recap"]["source"] == "config"
    snapshot = status_once(redis_server, cli_env)
    assert snapshot is not None
    rules = {r["name"]: r for r in snapshot["alerts"]["rules"]}
    assert rules["look"]["state"] == "firing" and rules["look"]["last_score"] is not None
    removed = run_cli("alert", "rm", "recap", *client, env=cli_env)
    assert removed.returncode == 1 and "config" in removed.stderr
    assert run_cli("alert", "rm", "look", *client, env=cli_env).returncode == 0
    assert daemon.terminate() == 0


def test_a_restart_restores_rules_and_repeats_no_alert(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str]
) -> None:
    client = ["--redis-url", redis_server]
    first = serve(*client, "--set", "engine.warm_up=false")

    def with_clips() -> bool:
        snapshot = status_once(redis_server, cli_env)
        return bool(snapshot and snapshot["streams"][0]["clips"] >= 2)

    wait_for(with_clips, 90, "two clips")
    # threshold just above 0 and never clearing: it fires once, and stays firing
    added = run_cli("alert", "add", "always", *client, "--stream", "demo", "--question", QUESTION,
                    "--threshold", "0.000001", "--clear-threshold", "0", env=cli_env)  # fmt: skip
    assert added.returncode == 0, added.stderr

    def ids() -> list[str]:
        return [e["alert_id"] for e in alert_events(redis_server) if e["name"] == "always"]

    wait_for(ids, 60, "the first alert")
    assert first.terminate() == 0
    second = serve(*client, "--set", "engine.warm_up=false")

    def evaluated_again() -> dict[str, Any] | None:
        snapshot = status_once(redis_server, cli_env)
        if not snapshot or not snapshot.get("alerts"):
            return None
        if snapshot["daemon"]["pid"] != second.proc.pid:
            return None  # the first daemon's last snapshot
        rule = snapshot["alerts"]["rules"][0]
        return rule if rule["last_score"] is not None and rule["lag_s"] is not None else None

    rule = wait_for(evaluated_again, 90, "the restored rule evaluated by the new daemon")
    assert rule["name"] == "always" and rule["state"] == "firing" and rule["seq"] == 1
    assert ids() == ["always:1"]  # exactly once across the restart
    assert second.terminate() == 0
