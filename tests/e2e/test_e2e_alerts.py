"""Standing queries end to end: the real daemon and tiny model.

A condition whose threshold comes from ``alert test`` fires over a PyAV-made file in which a dark
block (the "event") appears at a known time; its event reaches the Redis alert stream, pub/sub,
a local signed webhook and a real mosquitto broker (event topic and retained state), each with
the evidence frames of its window, whose pixels show the block exactly in the clips after the
event. A summary on a short schedule produces its text and frames. A restart restores the rules
and repeats no alert (the synthetic source). Events are read from the stream by
``alert_events``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from alert_receivers import MqttSubscriber, WebhookReceiver, loop_thread, signature_ok
from cli_harness import ServeProcess, run_cli, status_once, wait_for
from media import camera_scene, encode_frames
from mosquitto_harness import MosquittoServer
from PIL import Image
from scrape import fetch, probes_url, value

from sinks.settings import Keys

pytestmark = pytest.mark.integration

QUESTION = "Is there a colourful test pattern?"
SECRET = "e2e-webhook-secret-0123456789"
EVENT_AT_S = 8.0  # media time the block appears; clips are 2 s (4 frames at 2 fps): a boundary
FILE_FPS, FILE_S = 4, 90.0  # long enough never to end during the test (paced in real time)
WAIT_S = 90.0  # generous: the machine is shared


def alert_events(url: str) -> list[dict[str, Any]]:
    """Every event on the Redis alert stream, oldest first."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        entries = client.xrange(Keys().alerts)
    finally:
        client.close()
    return [json.loads(fields["event"]) for _, fields in entries]


def event_video(path: Path) -> Path:
    """A static scene; from ``EVENT_AT_S`` on, a dark block stands in its middle."""

    def frames() -> Iterator[np.ndarray]:
        for i in range(int(FILE_FPS * FILE_S)):
            t = i / FILE_FPS
            yield camera_scene(160, 120, t, object_at=0.5 if t >= EVENT_AT_S else None,
                               clock=False)  # fmt: skip

    return encode_frames(path, frames(), FILE_FPS)


def block_shown(path: str) -> bool:
    """Whether the frame shows the dark block (the patch it covers is dark)."""
    with Image.open(path) as image:
        assert image.format == "JPEG"
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = rgb.shape[:2]
    patch = rgb[int(0.6 * h) : int(0.74 * h), int(0.45 * w) : int(0.55 * w)]
    return float(patch.mean()) < 60.0  # the block is ~25, the scene there ~107


def check_frames(event: dict[str, Any], stream: str) -> None:
    """The event carries frames of its window, each a JPEG on disk showing the block exactly
    when its clip lies after the event."""
    start, end = event["window"]
    assert event["frames"], event
    for frame in event["frames"]:
        assert frame["stream"] == stream and frame["start"] < end and frame["end"] > start
        assert Path(frame["path"]).is_file()
        if frame["start"] >= EVENT_AT_S:
            assert block_shown(frame["path"]), frame
        elif frame["end"] <= EVENT_AT_S:
            assert not block_shown(frame["path"]), frame


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoServer]:
    server = MosquittoServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_condition_fires_everywhere_with_frames_and_a_summary_runs(
    serve: Callable[..., ServeProcess],
    redis_server: str,
    cli_env: dict[str, str],
    tmp_path: Path,
    broker: MosquittoServer,
) -> None:
    video = event_video(tmp_path / "door.mp4")
    with loop_thread() as loop:
        hook = WebhookReceiver(loop)
        hook.start()
        events_sub = MqttSubscriber(loop, broker.port, "flashwatch/alerts/+")
        events_sub.start()
        try:
            _fire_and_summarise(serve, redis_server, cli_env, tmp_path, broker, video, hook,
                                events_sub, loop)  # fmt: skip
        finally:
            events_sub.stop()
            hook.stop()


def _fire_and_summarise(
    serve: Callable[..., ServeProcess],
    redis_server: str,
    cli_env: dict[str, str],
    tmp_path: Path,
    broker: MosquittoServer,
    video: Path,
    hook: WebhookReceiver,
    events_sub: MqttSubscriber,
    loop: Any,
) -> None:
    recap = "[{kind: summary, name: recap, streams: [door], every_minutes: 0.1}]"
    webhooks = f"[{{name: recv, url: '{hook.url}', secret: {SECRET}, timeout_s: 5}}]"
    mqtt = f"{{url: '{broker.url}', client_id: flashwatch-e2e}}"
    daemon = serve("--redis-url", redis_server, "--source", f"door={video}",
                   "--set", "streams.door.fps=2", "--set", f"alerts.rules={recap}",
                   "--set", f"alerts.delivery.webhooks={webhooks}",
                   "--set", f"alerts.delivery.mqtt={mqtt}",
                   "--set", f"memory.snapshot_dir={tmp_path / 'snapshots'}",
                   "--set", "engine.warm_up=false")  # fmt: skip
    client = ["--redis-url", redis_server]
    listener = redis.Redis.from_url(redis_server, decode_responses=True)
    pubsub = listener.pubsub()
    pubsub.subscribe(Keys().alert("look"))  # before it can fire
    try:

        def with_clips() -> bool:
            snapshot = status_once(redis_server, cli_env)
            return bool(snapshot and snapshot["streams"][0]["clips"] >= 3)

        wait_for(with_clips, WAIT_S, "three clips")
        tested = run_cli("alert", "test", *client, "--json", "--stream", "door",
                         "--question", QUESTION, "--window", "8", env=cli_env)  # fmt: skip
        assert tested.returncode == 0, tested.stderr
        score = json.loads(tested.stdout)["test"]["score"]
        assert 0.0 < score < 1.0
        threshold = f"{max(0.001, score / 2):.6f}"  # well below today's score: it fires
        added = run_cli("alert", "add", "look", *client, "--stream", "door",
                        "--question", QUESTION, "--window", "8", "--threshold", threshold,
                        "--clear-threshold", "0.0005", env=cli_env)  # fmt: skip
        assert added.returncode == 0, added.stderr
        again = run_cli("alert", "add", "look", *client, "--stream", "door", "--question", "x",
                        env=cli_env)  # fmt: skip
        assert again.returncode == 1 and "exists" in again.stderr

        def fired() -> dict[str, Any] | None:
            events = [e for e in alert_events(redis_server) if e["name"] == "look"]
            return events[0] if events else None

        event = wait_for(fired, WAIT_S, "the condition's alert on the Redis stream")
        assert event["alert_id"] == "look:1" and event["state"] == "fired"
        assert event["score"] >= float(threshold) and event["streams"] == ["door"]
        check_frames(event, "door")

        def published() -> dict[str, Any] | None:
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            return json.loads(message["data"]) if message else None

        assert wait_for(published, WAIT_S, "the alert on pub/sub") == event

        def hooked() -> Any:
            return [r for r in hook.received if json.loads(r.body)["name"] == "look"]

        posted = wait_for(hooked, WAIT_S, "the alert at the webhook")[0]
        assert signature_ok(SECRET, posted.headers["X-Flashwatch-Signature"], posted.body)
        assert posted.headers["Idempotency-Key"] == "look:1"
        assert json.loads(posted.body) == event

        def on_mqtt() -> Any:
            return [m for m in events_sub.received if m.where == "flashwatch/alerts/look"]

        assert json.loads(wait_for(on_mqtt, WAIT_S, "the alert over MQTT")[0].body) == event
        state_sub = MqttSubscriber(loop, broker.port, "flashwatch/alerts/look/state")
        state_sub.start()  # after the firing: what it gets is the retained state
        try:
            state = wait_for(lambda: state_sub.received, WAIT_S, "the retained state")[0]
        finally:
            state_sub.stop()
        assert state.body == b"ON" and state.retained

        def summary() -> dict[str, Any] | None:
            events = [e for e in alert_events(redis_server) if e["name"] == "recap"]
            return events[0] if events else None

        text = wait_for(summary, WAIT_S, "the summary on the Redis stream")
        assert text["alert_id"] == "recap:1" and text["state"] == "summary" and text["text"]
        check_frames(text, "door")
        snapshot = status_once(redis_server, cli_env)
        assert snapshot is not None
        rule = next(r for r in snapshot["alerts"]["rules"] if r["name"] == "recap")
        assert rule["next_at"] > text["at"]  # the next run is scheduled
        listed = run_cli("alert", "list", *client, "--json", env=cli_env)
        names = {item["rule"]["name"]: item for item in json.loads(listed.stdout)["rules"]}
        assert names["look"]["source"] == "runtime" and names["recap"]["source"] == "config"
        rules = {r["name"]: r for r in snapshot["alerts"]["rules"]}
        assert rules["look"]["state"] == "firing" and rules["look"]["last_score"] is not None
        sinks = {s["channel"]: s for s in snapshot["alerts"]["sinks"]}
        assert set(sinks) == {"redis", "webhook:recv", "mqtt"}
        assert all(s["delivered"] >= 1 and s["dropped"] == 0 for s in sinks.values()), sinks
        base = probes_url(daemon.output())
        assert base is not None, "the daemon logged no HTTP address"
        metrics = fetch(base + "/metrics")  # the same, for Prometheus
        assert value(metrics, "flashwatch_alert_firing", rule="look") == 1
        for channel in sinks:
            delivered = {"channel": channel, "outcome": "delivered"}
            assert value(metrics, "flashwatch_alert_deliveries_total", **delivered) >= 1
        assert value(metrics, "flashwatch_alert_activity_total", kind="fired") >= 1
        assert value(metrics, "flashwatch_evidence_frames") >= 1
        removed = run_cli("alert", "rm", "recap", *client, env=cli_env)
        assert removed.returncode == 1 and "config" in removed.stderr
        assert run_cli("alert", "rm", "look", *client, env=cli_env).returncode == 0
        assert daemon.terminate() == 0
    finally:
        pubsub.close()
        listener.close()


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
