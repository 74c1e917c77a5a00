"""The MQTT channel against a real mosquitto broker on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from alert_events import alert_event, running, wait_until
from mosquitto_harness import MosquittoServer

from sinks.alerts.mqtt import MqttAlertSink, topic_level
from sinks.alerts.settings import MqttSettings
from streamer.engine.standing.events import AlertState

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoServer]:
    server = MosquittoServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def mqtt_settings(url: str, **overrides: Any) -> MqttSettings:
    fields: dict[str, Any] = {
        "url": url,
        "client_id": "flashwatch-test",
        "connect_timeout_s": 5.0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.3,
    }
    fields.update(overrides)
    return MqttSettings(**fields)


@contextlib.asynccontextmanager
async def subscribed(broker: MosquittoServer, topic: str) -> AsyncIterator[list[aiomqtt.Message]]:
    """Every message on ``topic`` (retained ones first) while the block runs."""
    received: list[aiomqtt.Message] = []
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"sub-{id(received)}") as client:
        await client.subscribe(topic, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                received.append(message)

        task = asyncio.get_running_loop().create_task(collect())
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def payloads(messages: list[aiomqtt.Message], topic: str) -> list[str]:
    return [bytes(m.payload).decode() for m in messages if m.topic.value == topic]  # type: ignore[arg-type]


async def test_events_arrive_at_qos_1_and_the_state_is_retained(broker: MosquittoServer) -> None:
    fired, cleared = alert_event("door", 1), alert_event("door", 2, AlertState.CLEARED)
    summary = alert_event("daily", 1, AlertState.SUMMARY)
    async with (
        subscribed(broker, "flashwatch/#") as seen,
        running(MqttAlertSink(mqtt_settings(broker.url), queue_size=10)) as sink,
    ):
        for event in (fired, cleared, summary):
            sink.offer(event)
        await wait_until(lambda: sink.stats()["delivered"] == 3)
        await wait_until(lambda: len(payloads(seen, "flashwatch/alerts/daily")) == 1)
        assert sink.stats()["connected"]
    events = [m for m in seen if m.topic.value == "flashwatch/alerts/door"]
    assert [json.loads(bytes(m.payload)) for m in events] == [fired.as_dict(), cleared.as_dict()]  # type: ignore[arg-type]
    assert all(m.qos == 1 and not m.retain for m in events)
    assert payloads(seen, "flashwatch/alerts/door/state") == ["ON", "OFF"]
    assert payloads(seen, "flashwatch/alerts/daily/state") == []  # a summary has no state
    # A subscriber that connects later reads the current state and the availability at once.
    async with subscribed(broker, "flashwatch/#") as late:
        await wait_until(lambda: len(late) >= 2)
    retained = {m.topic.value: bytes(m.payload).decode() for m in late if m.retain}  # type: ignore[arg-type]
    assert retained == {"flashwatch/alerts/door/state": "OFF", "flashwatch/status": "offline"}


async def test_a_broker_restart_is_reconnected_and_nothing_is_lost(
    broker: MosquittoServer,
) -> None:
    async with running(MqttAlertSink(mqtt_settings(broker.url), queue_size=10)) as sink:
        await wait_until(lambda: sink.stats()["connected"])
        broker.stop()
        await wait_until(lambda: not sink.stats()["connected"])
        sink.offer(alert_event("door", 1))  # waits in the queue while the broker is away
        await wait_until(lambda: sink.stats()["last_error"] is not None)
        broker.start()
        async with subscribed(broker, "flashwatch/alerts/#") as seen:
            await wait_until(lambda: sink.stats()["delivered"] == 1)
            await wait_until(lambda: len(payloads(seen, "flashwatch/alerts/door/state")) == 1)
        assert sink.stats()["connects"] >= 2


CHILD = """
import asyncio, sys
from sinks.alerts.mqtt import MqttAlertSink
from sinks.alerts.settings import MqttSettings
settings = MqttSettings(url=sys.argv[1], client_id="flashwatch-child", keepalive_s=5)
asyncio.run(MqttAlertSink(settings, queue_size=10).run())
"""


async def test_the_last_will_says_offline_when_the_daemon_dies(broker: MosquittoServer) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, broker.url], env=env, cwd=REPO)
    try:
        async with subscribed(broker, "flashwatch/status") as seen:
            await wait_until(lambda: "online" in payloads(seen, "flashwatch/status"), 60.0)
            child.send_signal(signal.SIGKILL)  # no clean disconnect: the broker sends the will
            await wait_until(lambda: payloads(seen, "flashwatch/status")[-1:] == ["offline"])
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
    async with subscribed(broker, "flashwatch/status") as late:
        await wait_until(lambda: len(late) == 1)
    assert late[0].retain and bytes(late[0].payload) == b"offline"  # type: ignore[arg-type]


def test_alert_names_become_one_topic_level() -> None:
    assert topic_level("front.door") == "front.door"
    assert topic_level("a/b+c#d") == "a_b_c_d"
