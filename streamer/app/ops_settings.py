"""Config sections for operating the daemon: the HTTP server (``http:``) and logs (``logging:``)."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; everything else is reachable from elsewhere."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it resolves to something public


class HttpSettings(BaseModel):
    """Metrics, health probes and the HTTP API, on one aiohttp server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Serve /metrics, /healthz, /readyz and /v1/*.")
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        max_length=255,
        description="Address to bind. Anything but loopback requires http.token.",
    )
    port: int = Field(
        8470,
        ge=0,
        le=65535,
        description="TCP port; 0 picks a free one (the URL is logged). "
        "FLASHWATCH_HTTP_PORT overrides it.",
    )
    token: SecretStr | None = Field(
        None,
        description="Bearer token required on /metrics and /v1/* (health probes stay open). "
        "FLASHWATCH_HTTP_TOKEN sets it without writing it into a file.",
    )
    heartbeat_interval_s: float = Field(
        1.0, ge=0.05, le=60.0, description="Seconds between device-thread heartbeats."
    )
    heartbeat_stale_s: float = Field(
        120.0,
        ge=1.0,
        le=3600.0,
        description="Seconds without a device heartbeat after which /healthz fails and the "
        "systemd watchdog is no longer fed (one long prefill must fit inside).",
    )
    answers_kept: int = Field(
        1024, ge=1, le=1_000_000, description="Final answers kept for GET /v1/answers/{id}."
    )
    max_subscribers: int = Field(
        256, ge=1, le=100_000, description="HTTP asks waiting for their answer at the same time."
    )

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpSettings:
        if self.enabled and self.token is None and not is_loopback(self.host):
            raise ValueError("http.token is required when http.host is not a loopback address")
        return self


class LoggingSettings(BaseModel):
    """How log lines look."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["auto", "text", "json"] = Field(
        "auto",
        description="auto: rich on a terminal, plain text otherwise; json: one object a line "
        "(time, level, logger, message, stream, query_id).",
    )
