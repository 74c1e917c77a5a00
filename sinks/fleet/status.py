"""The fleet at a glance: every daemon and every stream with its owner, merged from Redis.

Three sources, all written by the daemons themselves (see :mod:`sinks.fleet.records`):

- the presence hash ``Keys.daemons`` (who runs where, since when, what it serves and owns;
  a record past its ``expires_at`` is a daemon that is ``gone``),
- the leases ``Keys.lease(stream)`` (the owner of each stream, with its fence and age),
- each daemon's last status snapshot at ``Keys.status_of(daemon_id)`` (stream states; short
  TTL, so a dead daemon's soon disappears).

:func:`merge_fleet` is pure (records in, one frozen :class:`FleetView` out) and
:func:`render_fleet` draws it; :func:`read_fleet` is the only part that talks to Redis. Fields
a daemon's snapshot may or may not carry are read defensively: a lone daemon of an older
version shows with what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from sinks.connection import REDIS_DOWN_ERRORS, RedisClient, open_redis
from sinks.fleet.records import DaemonRecord, LeaseRecord, read_daemons, read_leases
from sinks.settings import Keys, RedisSettings
from sinks.timefmt import format_duration

log = logging.getLogger(__name__)

DaemonState = Literal["live", "gone"]
FLEET_READ_TIMEOUT_S = 5.0  # one read of the whole fleet (a few pipelined GETs)


@dataclass(frozen=True, slots=True)
class FleetDaemon:
    """One daemon as the fleet sees it."""

    daemon_id: str
    host: str
    pid: int
    state: DaemonState
    uptime_s: float  # since started_at; for a gone daemon, until its presence expired
    serves: tuple[str, ...]
    owns: tuple[str, ...]  # streams whose live lease names it
    lease_ages_s: Mapping[str, float]  # stream -> seconds since this daemon acquired it


@dataclass(frozen=True, slots=True)
class FleetStream:
    """One stream and its owner (None: no live lease, nobody serves it now)."""

    name: str
    owner: str | None
    owner_state: DaemonState | None  # None when there is no owner
    fence: int | None
    lease_age_s: float | None
    state: str | None  # the stream's state in its owner's last snapshot (live, stalled, ...)
    candidates: tuple[str, ...]  # live daemons whose config allows them to serve it


@dataclass(frozen=True, slots=True)
class FleetView:
    """Every daemon and every stream at ``time`` (epoch seconds)."""

    time: float
    daemons: tuple[FleetDaemon, ...]
    streams: tuple[FleetStream, ...]

    @property
    def live_daemons(self) -> int:
        return sum(daemon.state == "live" for daemon in self.daemons)

    def to_json(self) -> dict[str, Any]:
        """The view as plain JSON data (``flashwatch status --json`` in a fleet)."""
        return {
            "v": 1,
            "time": self.time,
            "daemons": [
                {
                    "id": d.daemon_id,
                    "host": d.host,
                    "pid": d.pid,
                    "state": d.state,
                    "uptime_s": d.uptime_s,
                    "serves": list(d.serves),
                    "owns": list(d.owns),
                    "lease_ages_s": dict(d.lease_ages_s),
                }
                for d in self.daemons
            ],
            "streams": [
                {
                    "name": s.name,
                    "owner": s.owner,
                    "owner_state": s.owner_state,
                    "fence": s.fence,
                    "lease_age_s": s.lease_age_s,
                    "state": s.state,
                    "candidates": list(s.candidates),
                }
                for s in self.streams
            ],
        }


def merge_fleet(
    daemons: Mapping[str, DaemonRecord],
    leases: Mapping[str, LeaseRecord],
    snapshots: Mapping[str, Mapping[str, Any]],
    now: float,
) -> FleetView:
    """One view from presence records (live and gone), leases and status snapshots by daemon.

    Streams are the union of what any daemon serves or owns, what any lease names and what any
    snapshot lists; ownership comes from the leases (the one truth), not from what a daemon
    says it owns.
    """
    state_of: dict[str, DaemonState] = {
        daemon_id: ("live" if record.alive(now) else "gone")
        for daemon_id, record in daemons.items()
    }
    names: set[str] = set(leases)
    for record in daemons.values():
        names.update(record.serves)
        names.update(record.owns)
    stream_state: dict[tuple[str, str], str] = {}  # (daemon, stream) -> state
    for daemon_id, snapshot in snapshots.items():
        for stream in _snapshot_streams(snapshot):
            names.add(stream["name"])
            stream_state[(daemon_id, stream["name"])] = stream["state"]

    streams = []
    for name in sorted(names):
        lease = leases.get(name)
        owner = lease.daemon_id if lease is not None else None
        streams.append(
            FleetStream(
                name=name,
                owner=owner,
                owner_state=None if owner is None else _state(state_of, owner),
                fence=None if lease is None else lease.fence,
                lease_age_s=None if lease is None else max(0.0, now - lease.acquired_at),
                state=None if owner is None else stream_state.get((owner, name)),
                candidates=tuple(
                    sorted(
                        daemon_id
                        for daemon_id, record in daemons.items()
                        if state_of[daemon_id] == "live" and name in record.serves
                    )
                ),
            )
        )

    fleet_daemons = []
    for daemon_id, record in sorted(daemons.items()):
        owned = {s.name: s.lease_age_s for s in streams if s.owner == daemon_id}
        until = now if state_of[daemon_id] == "live" else min(now, record.expires_at)
        fleet_daemons.append(
            FleetDaemon(
                daemon_id=daemon_id,
                host=record.host,
                pid=record.pid,
                state=state_of[daemon_id],
                uptime_s=max(0.0, until - record.started_at),
                serves=record.serves,
                owns=tuple(sorted(owned)),
                lease_ages_s={name: age for name, age in sorted(owned.items()) if age is not None},
            )
        )
    return FleetView(time=now, daemons=tuple(fleet_daemons), streams=tuple(streams))


def _state(state_of: Mapping[str, DaemonState], daemon_id: str) -> DaemonState:
    # A lease naming a daemon without any presence record: it left no trace of being alive.
    return state_of.get(daemon_id, "gone")


def _snapshot_streams(snapshot: Mapping[str, Any]) -> list[dict[str, str]]:
    """(name, state) of each stream in a status snapshot; malformed entries are skipped."""
    streams = snapshot.get("streams")
    if not isinstance(streams, list):
        return []
    found = []
    for stream in streams:
        if isinstance(stream, dict) and isinstance(stream.get("name"), str):
            state = stream.get("state")
            found.append({"name": stream["name"], "state": str(state) if state else "?"})
    return found


async def read_fleet(client: RedisClient, keys: Keys, now: float | None = None) -> FleetView:
    """Read presence records, every daemon's last snapshot and the leases of every stream."""
    daemons = await read_daemons(client, keys, include_gone=True)
    snapshots = await _read_snapshots(client, keys, sorted(daemons))
    names: set[str] = set()
    for record in daemons.values():
        names.update(record.serves)
        names.update(record.owns)
    for snapshot in snapshots.values():
        names.update(stream["name"] for stream in _snapshot_streams(snapshot))
    leases = await read_leases(client, keys, sorted(names))
    return merge_fleet(daemons, leases, snapshots, time.time() if now is None else now)


async def _read_snapshots(
    client: RedisClient, keys: Keys, daemon_ids: list[str]
) -> dict[str, dict[str, Any]]:
    if not daemon_ids:
        return {}
    pipe = client.pipeline(transaction=False)  # one GET per daemon; fine across slots
    for daemon_id in daemon_ids:
        pipe.get(keys.status_of(daemon_id))
    raws = await pipe.execute()
    snapshots: dict[str, dict[str, Any]] = {}
    for daemon_id, raw in zip(daemon_ids, raws, strict=True):
        try:
            snapshot = json.loads(raw) if raw is not None else None
        except ValueError:
            continue
        if isinstance(snapshot, dict):
            snapshots[daemon_id] = snapshot
    return snapshots


# ---- drawing ----------------------------------------------------------------------------------

_DAEMON_STYLE = {"live": "green", "gone": "red"}
_STREAM_STYLE = {"live": "green", "stalled": "yellow", "offline": "red", "failed": "bold red"}


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def render_fleet(view: FleetView) -> RenderableType:
    """Two tables: the daemons (id, host, state, uptime, streams, lease ages), the streams."""
    daemons = Table(title=f"fleet: {view.live_daemons} of {len(view.daemons)} daemons live")
    for column in ("daemon", "host", "state", "up", "owns (lease age)", "may serve"):
        daemons.add_column(column, no_wrap=column != "may serve")
    for d in view.daemons:
        owns = ", ".join(f"{name} ({_age(d.lease_ages_s.get(name))})" for name in d.owns)
        daemons.add_row(
            d.daemon_id,
            d.host,
            Text(d.state, style=_DAEMON_STYLE[d.state]),
            format_duration(d.uptime_s),
            owns or "-",
            ", ".join(d.serves) or "-",
        )
    streams = Table(title=f"streams: {sum(s.owner is not None for s in view.streams)} owned")
    for column in ("stream", "owner", "state", "lease age", "fence", "standby"):
        streams.add_column(column, no_wrap=True)
    for s in view.streams:
        owner = (
            Text("no owner", style="bold red")
            if s.owner is None
            else Text(
                s.owner if s.owner_state == "live" else f"{s.owner} (gone)",
                style="" if s.owner_state == "live" else "red",
            )
        )
        standby = [name for name in s.candidates if name != s.owner]
        streams.add_row(
            s.name,
            owner,
            Text(s.state or "-", style=_STREAM_STYLE.get(s.state or "", "")),
            _age(s.lease_age_s),
            "-" if s.fence is None else str(s.fence),
            ", ".join(standby) or "-",
        )
    return Group(daemons, streams)


class FleetWatch:
    """Keeps :attr:`latest` (a FleetView, None before the first read) fresh for a live view.

    Reads the fleet every ``interval_s`` until cancelled; a Redis outage keeps the last view
    (the status line already reports Redis) and is retried at the next turn, never raised.
    """

    def __init__(self, redis: RedisSettings, interval_s: float) -> None:
        self._redis_settings = redis
        self._interval_s = interval_s
        self.latest: FleetView | None = None

    async def run(self) -> None:
        client = open_redis(self._redis_settings, read_timeout_s=FLEET_READ_TIMEOUT_S)
        keys = Keys(self._redis_settings.prefix)
        try:
            while True:
                try:
                    async with asyncio.timeout(FLEET_READ_TIMEOUT_S):
                        self.latest = await read_fleet(client, keys)
                except REDIS_DOWN_ERRORS as exc:
                    log.debug("fleet view not refreshed: %s", exc)
                await asyncio.sleep(self._interval_s)
        finally:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await client.aclose()
