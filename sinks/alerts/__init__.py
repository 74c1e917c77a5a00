"""Alert delivery: a Redis stream and pub/sub, webhooks, MQTT; each at-least-once."""
