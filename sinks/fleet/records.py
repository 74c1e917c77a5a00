"""What the fleet writes in Redis about itself, and how anyone reads it back.

Two kinds of record, both JSON:

- a **lease** per stream at ``Keys.lease(stream)`` (an expiring key; its fencing counter at
  ``Keys.fence(stream)``, both under the stream's hash tag so they share a Cluster slot): which
  daemon owns the stream and with which fence;
- a **presence** record per daemon, a field of the hash ``Keys.daemons`` keyed by daemon id,
  refreshed by the daemon's heartbeat; a record whose ``expires_at`` has passed is a daemon that
  is gone (the hash itself never expires, so readers judge by the stamp).

Writers live in ``sinks.fleet.leases`` (leases, fences, presence). Everything that only needs to
know who serves what (routing, the CLI, the client, fleet status) reads through this module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sinks.connection import RedisClient
from sinks.settings import Keys


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The owner of one stream, as its lease says."""

    stream: str
    daemon_id: str
    fence: int  # strictly increasing per stream, across owners and restarts
    acquired_at: float  # epoch seconds

    def to_json(self) -> str:
        return json.dumps(
            {
                "stream": self.stream,
                "daemon": self.daemon_id,
                "fence": self.fence,
                "acquired_at": self.acquired_at,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> LeaseRecord:
        data = json.loads(raw)
        return cls(
            stream=str(data["stream"]),
            daemon_id=str(data["daemon"]),
            fence=int(data["fence"]),
            acquired_at=float(data["acquired_at"]),
        )


@dataclass(frozen=True, slots=True)
class DaemonRecord:
    """One daemon's presence: who it is, where it runs, what it may serve and serves now."""

    daemon_id: str
    host: str
    pid: int
    started_at: float  # epoch seconds
    expires_at: float  # epoch seconds; past it the daemon counts as gone
    serves: tuple[str, ...] = field(default=())  # streams its config allows it to own
    owns: tuple[str, ...] = field(default=())  # streams it holds leases on now
    weight: float = 1.0  # its capacity for `placement: auto`
    extra: dict[str, Any] = field(default_factory=dict)  # versions, http url, ...

    def alive(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.expires_at

    def to_json(self) -> str:
        return json.dumps(
            {
                "daemon": self.daemon_id,
                "host": self.host,
                "pid": self.pid,
                "started_at": self.started_at,
                "expires_at": self.expires_at,
                "serves": list(self.serves),
                "owns": list(self.owns),
                "weight": self.weight,
                "extra": self.extra,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> DaemonRecord:
        data = json.loads(raw)
        return cls(
            daemon_id=str(data["daemon"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            started_at=float(data["started_at"]),
            expires_at=float(data["expires_at"]),
            serves=tuple(str(s) for s in data.get("serves", ())),
            owns=tuple(str(s) for s in data.get("owns", ())),
            weight=float(data.get("weight", 1.0)),
            extra=dict(data.get("extra") or {}),
        )


async def read_leases(
    client: RedisClient, keys: Keys, streams: Iterable[str]
) -> dict[str, LeaseRecord]:
    """The live lease of each named stream that has one (an absent stream has no owner).

    One GET per key in a pipeline without a transaction, so it works on a Cluster too (the
    keys of different streams live on different slots).
    """
    names = list(dict.fromkeys(streams))
    if not names:
        return {}
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.get(keys.lease(name))
    raws = await pipe.execute()
    leases: dict[str, LeaseRecord] = {}
    for name, raw in zip(names, raws, strict=True):
        if raw is None:
            continue
        try:
            leases[name] = LeaseRecord.from_json(raw)
        except (ValueError, KeyError, TypeError):
            continue  # a record this version cannot read is no owner it can trust
    return leases


async def read_daemons(
    client: RedisClient, keys: Keys, *, include_gone: bool = False
) -> dict[str, DaemonRecord]:
    """Every daemon's presence record, by id; gone ones only when asked for."""
    raw = await client.hgetall(keys.daemons)
    now = time.time()
    daemons: dict[str, DaemonRecord] = {}
    for value in raw.values():
        try:
            record = DaemonRecord.from_json(value)
        except (ValueError, KeyError, TypeError):
            continue
        if include_gone or record.alive(now):
            daemons[record.daemon_id] = record
    return daemons


async def fleet_streams(client: RedisClient, keys: Keys) -> tuple[str, ...]:
    """Every stream some live daemon may serve or owns, sorted: what ``*`` means in a fleet."""
    names: set[str] = set()
    for record in (await read_daemons(client, keys)).values():
        names.update(record.serves)
        names.update(record.owns)
    return tuple(sorted(names))
