"""The composition of the delivery channels from the ``alerts.delivery`` settings."""

from __future__ import annotations

from sinks.alerts.mqtt import MqttAlertSink
from sinks.alerts.redis import RedisAlertSink
from sinks.alerts.settings import DeliverySettings
from sinks.alerts.webhook import WebhookSink
from sinks.connection import RedisClient
from sinks.settings import Keys, RedisSettings
from streamer.engine.standing.events import AlertSink


def build_sinks(
    delivery: DeliverySettings,
    redis: RedisSettings,
    keys: Keys | None = None,
    *,
    redis_client: RedisClient | None = None,
) -> list[AlertSink]:
    """Every configured channel: the Redis stream and pub/sub always, then each webhook, then
    MQTT. ``redis_client`` shares an open client (closed by its owner); without it the Redis
    channel opens its own. The caller runs each ``run()`` as a task and ``aclose``s them."""
    sinks: list[AlertSink] = [
        RedisAlertSink(
            redis,
            stream_maxlen=delivery.stream_maxlen,
            marker_ttl_s=delivery.sent_marker_ttl_s,
            queue_size=delivery.queue_size,
            keys=keys,
            client=redis_client,
        )
    ]
    for index, hook in enumerate(delivery.webhooks):
        sinks.append(
            WebhookSink(hook, name=hook.name or f"webhook{index}", queue_size=delivery.queue_size)
        )
    if delivery.mqtt is not None:
        sinks.append(MqttAlertSink(delivery.mqtt, queue_size=delivery.queue_size))
    return sinks
