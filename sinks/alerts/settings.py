"""The ``delivery:`` part of the ``alerts:`` section: where alert events go, and how hard to try.

Every channel has its own bounded queue (``queue_size``, the oldest event dropped and counted
when full). Secrets (a webhook's HMAC key and headers, credentials in a URL) are kept out of
reprs, logs and status.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from sinks.redact import REDACTED, redact_url

# Headers flashwatch sets itself on every webhook POST; a configured header may not replace them.
RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "host", "x-flashwatch-signature", "idempotency-key"}
)
MQTT_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _default_client_id() -> str:
    """``flashwatch-hostname-pid``: unique per running daemon (MQTT allows 23+ characters on
    every broker we know; mosquitto takes up to 65535)."""
    host = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in socket.gethostname())
    return f"flashwatch-{host[:80] or 'host'}-{os.getpid()}"


class WebhookSettings(_Strict):
    """One HTTP endpoint that receives every alert as a signed JSON POST."""

    url: str = Field(
        min_length=8,
        max_length=2048,
        description="http:// or https:// URL the alert JSON is POSTed to. Shown as its origin "
        "only (scheme, host, port) in logs and status: a path may hold a token.",
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Label in status and logs; default webhook<index>.",
    )
    secret: SecretStr = Field(
        min_length=16,
        max_length=4096,
        description="HMAC-SHA256 key of the X-Flashwatch-Signature header (at least 16 "
        "characters). Never logged.",
    )
    timeout_s: float = Field(
        10.0, gt=0.0, le=300.0, description="Seconds one POST may take, connect included."
    )
    max_attempts: int = Field(
        10, ge=1, le=1000, description="Attempts of one alert before it is counted failed."
    )
    max_age_s: float = Field(
        3600.0,
        gt=0.0,
        le=7 * 86400.0,
        description="Seconds after it was offered past which an alert is no longer retried "
        "(counted failed), whatever max_attempts says.",
    )
    backoff_initial_s: float = Field(
        1.0, gt=0.0, le=600.0, description="First retry delay in seconds (then doubles)."
    )
    backoff_max_s: float = Field(
        60.0, gt=0.0, le=3600.0, description="Cap of the retry delay in seconds."
    )
    retry_after_max_s: float = Field(
        300.0,
        ge=0.0,
        le=3600.0,
        description="Longest Retry-After (on 429, 503) that is honoured, in seconds; a longer "
        "one waits this long.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description="Extra request headers (for example Authorization). Values are never "
        "logged; Content-Type, X-Flashwatch-Signature and Idempotency-Key are set by flashwatch.",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be http://host[:port]/path or https://…")
        return value

    @field_validator("headers")
    @classmethod
    def _own_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for header, text in value.items():
            if not header or any(ch in header for ch in ":\r\n ") or len(header) > 128:
                raise ValueError(f"invalid header name {header!r}")
            if header.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {header!r} is set by flashwatch itself")
            if "\r" in text or "\n" in text or len(text) > 8192:
                raise ValueError(f"invalid value of header {header!r}")
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> WebhookSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self

    @property
    def origin(self) -> str:
        """``https://hooks.example.com:8443``: what logs and status show of the URL."""
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"

    def secrets(self) -> tuple[str, ...]:
        """Strings to mask wherever they turn up in an error text (RedactingFormatter)."""
        parts = urlsplit(self.url)
        found = [self.secret.get_secret_value(), *self.headers.values()]
        if parts.path not in ("", "/"):
            found.append(parts.path)
        if parts.query:
            found.append(parts.query)
        if parts.username:
            found.append(parts.username)
        if parts.password:
            found.append(parts.password)
        return tuple(s for s in found if s)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name == "url":
                yield name, self.origin
            elif name == "headers":
                yield name, dict.fromkeys(value, REDACTED)
            else:
                yield name, value


class MqttSettings(_Strict):
    """An MQTT broker (Home Assistant, Frigate setups): events, retained state, availability."""

    url: str = Field(
        min_length=8,
        max_length=2048,
        description="mqtt://[user:password@]host[:port] (1883), mqtts:// for TLS (8883). "
        "Shown redacted in logs and reprs.",
    )
    topic_prefix: str = Field(
        "flashwatch",
        pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$",
        max_length=128,
        description="Topics are <prefix>/alerts/<name>, <prefix>/alerts/<name>/state and "
        "<prefix>/status.",
    )
    client_id: str = Field(
        default_factory=_default_client_id,
        pattern=r"^[A-Za-z0-9_.:-]{1,128}$",
        description="MQTT client identifier; default flashwatch-hostname-pid.",
    )
    qos: Literal[0, 1, 2] = Field(
        1, description="QoS of event and state messages (1: at least once, acknowledged)."
    )
    keepalive_s: int = Field(
        30, ge=5, le=3600, description="Keepalive interval; a silent client is dropped "
        "(and its last will published) after 1.5 times this."
    )  # fmt: skip
    retain_state: bool = Field(
        True,
        description="Publish each condition's ON/OFF state retained, so a subscriber that "
        "connects later sees the current state at once.",
    )
    connect_timeout_s: float = Field(
        10.0, gt=0.0, le=300.0, description="Seconds a connect or an acknowledged publish waits."
    )
    backoff_initial_s: float = Field(
        0.5, gt=0.0, le=600.0, description="First reconnect delay in seconds (then doubles)."
    )
    backoff_max_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="Cap of the reconnect delay in seconds."
    )
    ca_file: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="PEM file of the CA that signs the broker's certificate (mqtts://); "
        "default the system's CAs.",
    )

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            _ = parts.port  # a port that is not a number raises here
        except ValueError as exc:
            raise ValueError(f"url is not mqtt://host[:port]: {exc}") from None
        if parts.scheme not in MQTT_DEFAULT_PORTS or not parts.hostname:
            raise ValueError("url must be mqtt://[user:password@]host[:port] or mqtts://…")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("an MQTT url has no path, query or fragment")
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> MqttSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or MQTT_DEFAULT_PORTS[parts.scheme]

    @property
    def username(self) -> str | None:
        user = urlsplit(self.url).username
        return unquote(user) if user else None

    @property
    def password(self) -> str | None:
        password = urlsplit(self.url).password
        return unquote(password) if password else None

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "url" else value


class DeliverySettings(_Strict):
    """Where alert events are delivered. The Redis stream and pub/sub are always on."""

    stream_maxlen: int = Field(
        10_000,
        ge=10,
        le=10_000_000,
        description="Approximate MAXLEN of the <prefix>:alerts stream (XADD MAXLEN ~).",
    )
    sent_marker_ttl_s: int = Field(
        7 * 86400,
        ge=60,
        le=90 * 86400,
        description="Seconds an alert id is remembered as added to the stream, so a "
        "redelivery after a restart is not added twice.",
    )
    queue_size: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Alerts each channel holds while its receiver is away; past it the "
        "oldest is dropped and counted.",
    )
    webhooks: list[WebhookSettings] = Field(
        default_factory=list, max_length=16, description="HTTP endpoints, each signed."
    )
    mqtt: MqttSettings | None = Field(None, description="An MQTT broker; none by default.")

    @field_validator("webhooks")
    @classmethod
    def _unique_names(cls, value: list[WebhookSettings]) -> list[WebhookSettings]:
        names = [hook.name for hook in value if hook.name is not None]
        if len(names) != len(set(names)):
            raise ValueError("webhook names must be unique")
        return value
