"""Config sections of the query service (``redis:``, ``query:``, ``status:``) and key names.

Every key and channel flashwatch uses in Redis is built by :class:`Keys`, so the prefix is the
only thing to change when several deployments share one Redis.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sinks.redact import redact_url

_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")  # Redis Cluster, plain or TLS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _default_consumer_name() -> str:
    """``hostname-pid``: unique per running daemon, readable in ``XINFO CONSUMERS``."""
    host = "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in socket.gethostname())
    return f"{host[:100] or 'host'}-{os.getpid()}"


class RedisSettings(_Strict):
    """Where Redis is and how to reach it. The URL may hold a password: never log it raw."""

    url: str = Field(
        "redis://127.0.0.1:6379/0",
        min_length=8,
        max_length=2048,
        description="redis://[user:password@]host:port/db, rediss:// for TLS or unix:///path; "
        "a Redis Cluster: redis+cluster://[user:password@]host:port[,host:port...] (or "
        "rediss+cluster://), any reachable node is enough. Shown redacted in logs and reprs.",
    )
    prefix: str = Field(
        "flashwatch",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Prefix of every key and channel (flashwatch:requests, ...).",
    )
    connect_timeout_s: float = Field(
        5.0, gt=0.0, le=120.0, description="Seconds to wait for a TCP connect to Redis."
    )
    backoff_initial_s: float = Field(
        0.5, gt=0.0, le=60.0, description="First reconnect delay in seconds (then doubles)."
    )
    backoff_max_s: float = Field(
        10.0, gt=0.0, le=600.0, description="Cap of the reconnect delay in seconds."
    )
    lock_ttl_s: float = Field(
        15.0,
        ge=1.0,
        le=600.0,
        description="Seconds this daemon's presence record (one running daemon per "
        "fleet.daemon_id) outlives its last heartbeat (renewed every third of it): how soon "
        "a killed daemon's id is free and the fleet counts it gone.",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if value.startswith(CLUSTER_SCHEMES):
            cluster_nodes(value)
        elif not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "url must start with redis://, rediss://, unix://, redis+cluster:// or "
                "rediss+cluster://"
            )
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> RedisSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # pydantic's repr/str would otherwise print the password.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "url" else value


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The seed nodes of ``redis+cluster://[user:password@]host:port[,host:port...][/0]``.

    Any one reachable node is enough: the client learns the others (and the slot map) from it.
    Raises ValueError for a malformed URL (no node, a bad port, a database other than 0).
    """
    if not url.startswith(CLUSTER_SCHEMES):
        raise ValueError("a Cluster url starts with redis+cluster:// or rediss+cluster://")
    netloc, _, path = url.split("://", 1)[1].partition("/")
    if path not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0 (end the url with /0 or nothing)")
    nodes: list[tuple[str, int]] = []
    for item in netloc.rpartition("@")[2].split(","):
        host, sep, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a Cluster node is host:port, not {redact_url(item.strip())!r}")
        nodes.append((host, int(port)))
    return nodes


class QuerySettings(_Strict):
    """The query service: consumer group, limits of a request, retention of answers."""

    consumer_group: str = Field(
        "flashwatch", pattern=_NAME_PATTERN, description="Consumer group on the request stream."
    )
    consumer_name: str = Field(
        default_factory=_default_consumer_name,
        pattern=_NAME_PATTERN,
        description="This daemon's consumer name in the group; default hostname-pid. Give a "
        "stable name to let a restarted daemon drain its own pending requests at once.",
    )
    max_in_flight: int = Field(
        4,
        ge=1,
        le=64,
        description="Queries generating at the same time: their decode steps run as one "
        "batched forward pass, each in its own KV slot (engine).",
    )
    max_queued: int = Field(
        16,
        ge=0,
        le=10_000,
        description="Queries waiting in the engine beyond those in flight. Durable requests "
        "beyond it wait in the request stream (never busy); quick (pub/sub) ones get busy.",
    )
    answer_ttl_s: int = Field(
        3600, ge=10, le=30 * 86400, description="Seconds a final answer is kept at answer:<id>."
    )
    claim_idle_s: float = Field(
        60.0,
        gt=0.0,
        le=86400.0,
        description="Seconds a request may sit un-acked (its consumer silent) before another "
        "consumer claims it with XAUTOCLAIM. Live consumers refresh their own entries.",
    )
    stream_maxlen: int = Field(
        10_000,
        ge=10,
        le=10_000_000,
        description="Length of the request stream past which the daemon trims entries already "
        "answered (never one still waiting); clients' XADD MAXLEN should be larger.",
    )
    dedupe_ttl_s: int = Field(
        86_400, ge=10, le=30 * 86400, description="Seconds a request id is remembered as seen."
    )
    max_question_chars: int = Field(
        2000, ge=1, le=100_000, description="Longest accepted question, in characters."
    )
    max_new_tokens_limit: int = Field(
        1024, ge=1, le=131_072, description="Largest max_new_tokens a request may ask for."
    )
    default_max_new_tokens: int = Field(
        128, ge=1, le=131_072, description="max_new_tokens when a request does not say."
    )
    default_deadline_s: float = Field(
        120.0, ge=0.1, le=3600.0, description="Seconds until a request without deadline_s fails."
    )
    final_store_deadline_s: float = Field(
        30.0,
        gt=0.0,
        le=3600.0,
        description="Seconds to keep retrying to store a final answer across a Redis outage "
        "before leaving its entry un-acked for redelivery.",
    )
    read_batch: int = Field(
        8, ge=1, le=1000, description="Stream entries fetched per XREADGROUP / XAUTOCLAIM."
    )
    max_deliveries: int = Field(
        5,
        ge=1,
        le=1000,
        description="Deliveries of one request-stream entry (XPENDING times-delivered) after "
        "which it is moved to <prefix>:requests:dead with the reason and answered internal.",
    )
    dead_letter_maxlen: int = Field(
        10_000, ge=10, le=10_000_000, description="Approximate MAXLEN of the dead-letter stream."
    )

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> QuerySettings:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("default_max_new_tokens must be <= max_new_tokens_limit")
        return self


class StatusSettings(_Strict):
    """Publishing the daemon's status snapshot, and the terminal view."""

    publish_interval_s: float = Field(
        1.0, ge=0.05, le=3600.0, description="Seconds between status publishes."
    )
    last_ttl_s: int = Field(
        10, ge=1, le=86400, description="TTL in seconds of the stored last snapshot."
    )
    tui: bool = Field(True, description="Show the live terminal view when serving.")


class Keys:
    """Names of every Redis key and channel, under one prefix."""

    def __init__(self, prefix: str = "flashwatch") -> None:
        self.prefix = prefix
        self.requests = f"{prefix}:requests"  # stream of durable requests
        self.requests_dead = f"{prefix}:requests:dead"  # entries given up on, with the reason
        self.ask = f"{prefix}:ask"  # channel of quick (at-most-once) requests
        self.cancel = f"{prefix}:cancel"  # channel; payload = request id
        self.forget = f"{prefix}:forget"  # channel of forget requests (confirmed on reply:<id>)
        self.status = f"{prefix}:status"  # channel of status snapshots
        self.status_last = f"{prefix}:status:last"  # the last snapshot, short TTL
        self.probe = f"{prefix}:probe"  # key and channel of the start-up access check
        # The fleet (sinks.fleet): presence of every daemon, one hash, a field per daemon id
        # (sinks.daemon_lock writes it: one running daemon per id).
        self.daemons = f"{prefix}:daemons"
        # Standing queries (streamer.engine.standing, sinks.alerts).
        self.alerts = f"{prefix}:alerts"  # stream of alert events (MAXLEN bounded)
        self.alerts_rules = f"{prefix}:alerts:rules"  # hash: rules added at run time, by name
        self.alerts_state = f"{prefix}:alerts:state"  # hash: per-rule sequence and edge state
        # hash: alert id -> the event and the channels that have not delivered it yet
        self.alerts_outbox = f"{prefix}:alerts:outbox"
        self.alerts_admin = f"{prefix}:alerts:admin"  # channel of alert add|list|rm|test requests

    def lease(self, stream: str) -> str:
        """The expiring key naming a stream's owner; hash-tagged by stream (one Cluster slot)."""
        return f"{self.prefix}:{{{stream}}}:lease"

    def fence(self, stream: str) -> str:
        """The stream's fencing counter (never expires, only grows); same slot as its lease."""
        return f"{self.prefix}:{{{stream}}}:fence"

    def inbox(self, daemon_id: str) -> str:
        """Stream of requests routed to one daemon by the coordinator that read them."""
        return f"{self.prefix}:inbox:{daemon_id}"

    def status_of(self, daemon_id: str) -> str:
        """One daemon's last status snapshot (short TTL); the fleet view merges them all."""
        return f"{self.prefix}:status:last:{daemon_id}"

    def alert(self, name: str) -> str:
        """Pub/sub channel of one standing query's events."""
        return f"{self.prefix}:alert:{name}"

    def alert_sent(self, alert_id: str) -> str:
        """Marker (with a TTL) that an alert id is already in the alerts stream. Its hash tag is
        the stream's own name, so both share one Cluster slot and one script touches both."""
        return f"{self.prefix}:alerts:sent:{{{self.alerts}}}:{alert_id}"

    # The keys of one request share the hash tag {<id>}: on a Cluster they live in one slot, so
    # storing a final and dropping its seen-marker is one MULTI/EXEC (sinks.replies).

    def reply(self, request_id: str) -> str:
        """Channel of token, final and error events of one request."""
        return f"{self.prefix}:reply:{{{request_id}}}"

    def answer(self, request_id: str) -> str:
        """Key holding the final (or error) event of one request, with a TTL."""
        return f"{self.prefix}:answer:{{{request_id}}}"

    def seen(self, request_id: str) -> str:
        """Key marking a request id as taken (SET NX), for deduplication."""
        return f"{self.prefix}:seen:{{{request_id}}}"
