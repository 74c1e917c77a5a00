"""Delivery settings, the shared queue and the composition of the channels (no servers)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from alert_events import alert_event
from pydantic import ValidationError

from sinks.alerts.build import build_sinks
from sinks.alerts.mqtt import MqttAlertSink
from sinks.alerts.queue import AlertQueue
from sinks.alerts.redis import RedisAlertSink
from sinks.alerts.settings import DeliverySettings, MqttSettings, WebhookSettings
from sinks.alerts.webhook import WebhookSink
from sinks.settings import Keys, RedisSettings

SECRET = "0123456789abcdef-hmac"


def crc16_xmodem(data: bytes) -> int:
    """Redis Cluster's key hash (CRC16/XMODEM), written out to check hash tags."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def cluster_slot(key: str) -> int:
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16_xmodem(key.encode()) % 16384


def test_crc16_matches_the_redis_reference_value() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3  # the check value in the Cluster spec


@pytest.mark.parametrize("alert_id", ["door:1", "front.door:12345", "a{b}c:7"])
def test_the_sent_marker_shares_the_alert_streams_slot(alert_id: str) -> None:
    keys = Keys("site-a")
    marker = keys.alert_sent(alert_id)
    assert marker.startswith("site-a:")  # inside the prefix, for ACL key patterns
    assert cluster_slot(marker) == cluster_slot(keys.alerts)
    assert keys.alert_sent("door:1") != keys.alert_sent("door:2")


def test_webhook_settings_hide_the_secret_path_and_headers() -> None:
    hook = WebhookSettings(
        url="https://hooks.example.com:8443/api/T0KEN-PATH?sig=QUERYSECRET",
        secret=SECRET,
        headers={"Authorization": "Bearer HEADERSECRET"},
    )
    shown = repr(hook) + str(hook)
    for secret in (SECRET, "T0KEN-PATH", "QUERYSECRET", "HEADERSECRET"):
        assert secret not in shown
    assert hook.origin == "https://hooks.example.com:8443"
    assert {SECRET, "Bearer HEADERSECRET", "/api/T0KEN-PATH"} <= set(hook.secrets())


@pytest.mark.parametrize(
    "fields",
    [
        {"url": "ftp://example.com/x"},
        {"url": "https:///nohost"},
        {"secret": "short"},
        {"headers": {"Idempotency-Key": "x"}},
        {"headers": {"X-Bad": "a\r\nInjected: 1"}},
        {"backoff_initial_s": 10.0, "backoff_max_s": 1.0},
        {"max_attempts": 0},
        {"unknown": 1},
    ],
)
def test_webhook_settings_reject_bad_values(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        WebhookSettings(**{"url": "https://example.com/hook", "secret": SECRET, **fields})


def test_mqtt_settings_read_the_url_and_hide_the_password() -> None:
    mqtt = MqttSettings(url="mqtts://ha%40home:pa%3Ass@broker.lan")
    assert (mqtt.host, mqtt.port, mqtt.tls) == ("broker.lan", 8883, True)
    assert (mqtt.username, mqtt.password) == ("ha@home", "pa:ss")
    assert "pa%3Ass" not in repr(mqtt)
    plain = MqttSettings(url="mqtt://10.0.0.2")
    assert (plain.port, plain.tls, plain.username, plain.qos) == (1883, False, None, 1)


@pytest.mark.parametrize(
    "fields",
    [
        {"url": "http://broker:1883"},
        {"url": "mqtt://broker:notaport"},
        {"url": "mqtt://broker/topic"},
        {"url": "mqtt://broker", "topic_prefix": "a/+/b"},
        {"url": "mqtt://broker", "topic_prefix": "/lead"},
        {"url": "mqtt://broker", "qos": 3},
    ],
)
def test_mqtt_settings_reject_bad_values(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        MqttSettings(**fields)


def test_delivery_settings_reject_duplicate_webhook_names() -> None:
    hook = {"url": "https://example.com/hook", "secret": SECRET, "name": "same"}
    with pytest.raises(ValidationError):
        DeliverySettings(webhooks=[hook, hook])


async def test_build_sinks_makes_every_configured_channel() -> None:
    delivery = DeliverySettings(
        webhooks=[
            {"url": "https://a.example/h", "secret": SECRET},
            {"url": "https://b.example/h", "secret": SECRET, "name": "ops"},
        ],
        mqtt={"url": "mqtt://127.0.0.1:1"},
    )
    sinks = build_sinks(delivery, RedisSettings(url="redis://127.0.0.1:1/0"))
    assert [type(s) for s in sinks] == [RedisAlertSink, WebhookSink, WebhookSink, MqttAlertSink]
    assert [s.name for s in sinks] == ["redis", "webhook:webhook0", "webhook:ops", "mqtt"]
    only_redis = build_sinks(DeliverySettings(), RedisSettings(url="redis://127.0.0.1:1/0"))
    assert [s.name for s in only_redis] == ["redis"]
    for sink in sinks:
        await sink.aclose()


async def test_the_queue_drops_the_oldest_and_keeps_order() -> None:
    queue = AlertQueue("test", size=3)
    for sequence in range(5):
        assert queue.put(alert_event("door", sequence))
    assert (len(queue), queue.dropped, queue.offered) == (3, 2, 5)
    taken = [(await queue.get()).event.alert_id for _ in range(3)]
    assert taken == ["door:2", "door:3", "door:4"]


async def test_a_put_back_event_comes_first_and_get_waits_for_one() -> None:
    queue = AlertQueue("test", size=2)
    waiting = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    queue.put(alert_event("door", 1))
    first = await asyncio.wait_for(waiting, 5.0)
    queue.put(alert_event("door", 2))
    queue.put_back(first)
    assert [(await queue.get()).event.alert_id for _ in range(2)] == ["door:1", "door:2"]
    queue.put(alert_event("door", 3))
    queue.put(alert_event("door", 4))
    queue.put_back(first)  # full: the put-back one is the oldest and is dropped
    assert (len(queue), queue.dropped) == (2, 1)
    assert queue.close() == 2 and not queue.put(alert_event("door", 5))
    assert queue.dropped == 4


def test_error_texts_are_masked_and_bounded() -> None:
    queue = AlertQueue("test", size=1, secrets=("/hooks/T0KEN",))
    shown = queue.note_error("GET https://u:pw@h/hooks/T0KEN failed\n" + "x" * 1000)
    assert "T0KEN" not in shown and "pw" not in shown and "\n" not in shown
    assert len(shown) <= 300 and queue.stats()["last_error"] == shown


async def test_unsettled_is_what_was_neither_delivered_nor_given_up() -> None:
    queue = AlertQueue("test", size=2)
    for sequence in (1, 2, 3):  # door:1 is pushed out: given up on, settled
        queue.put(alert_event("door", sequence))
    assert queue.unsettled() == {"door:2", "door:3"}
    await queue.get()  # door:2 in flight: still owed
    assert queue.unsettled() == {"door:2", "door:3"}
    queue.note_delivered()
    assert queue.unsettled() == {"door:3"}
    await queue.get()  # door:3 in flight when the channel stops
    queue.put(alert_event("door", 4))
    queue.close()
    assert queue.unsettled() == {"door:3", "door:4"}  # owed by the next run
