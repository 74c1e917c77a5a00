"""The ``fleet:`` config section: who this daemon is among several, and how streams are placed."""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def _default_daemon_id() -> str:
    """The host name, made safe for key names: one daemon per host by default."""
    host = "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in socket.gethostname())
    return host[:64] or "flashwatch"


class FleetSettings(BaseModel):
    """Several daemons on one Redis. A lone daemon (the default) needs none of this changed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    daemon_id: str = Field(
        default_factory=_default_daemon_id,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="This daemon's id in the fleet, unique per Redis and prefix (default: the "
        "host name; a Kubernetes StatefulSet passes the pod name).",
    )
    placement: Literal["static", "auto"] = Field(
        "static",
        description="static: claim every stream in `streams:` (a stream listed by two daemons "
        "has an owner and a standby); auto: `streams:` is the shared list and streams are "
        "balanced by weight across the live daemons.",
    )
    weight: float = Field(
        1.0, gt=0.0, le=1000.0, description="This daemon's capacity for placement: auto."
    )
    lease_ttl_s: float = Field(
        15.0,
        ge=1.0,
        le=600.0,
        description="Seconds a stream's lease outlives its owner's last renewal (renewed every "
        "third of it): how soon a dead owner's streams can be adopted.",
    )
    owner_wait_s: float = Field(
        10.0,
        ge=0.0,
        le=3600.0,
        description="Seconds a request waits for a stream with no live owner (one being "
        "adopted) before the answer names it as having none.",
    )
