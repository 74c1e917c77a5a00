"""Fleet status: the pure merge of presence records, leases and snapshots; its drawing; reading
it from a real redis-server; ``flashwatch status`` showing every daemon.

Records are written directly (DaemonRecord / LeaseRecord / status JSON), as the daemons would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cli_harness import run_cli
from rich.console import Console

from sinks.fleet.records import DaemonRecord, LeaseRecord
from sinks.fleet.status import FleetView, merge_fleet, read_fleet, render_fleet
from sinks.schema import DaemonInfo, DaemonStatus, StreamStatus
from sinks.settings import Keys, StatusSettings
from sinks.status import StatusPublisher
from sinks.tui import render_view

KEYS = Keys("flashwatch")
NOW = 1_900_000_000.0


def daemon(daemon_id: str, *, alive: bool = True, serves: tuple[str, ...] = ()) -> DaemonRecord:
    return DaemonRecord(
        daemon_id=daemon_id,
        host=f"host-{daemon_id}",
        pid=100,
        started_at=NOW - 600,
        expires_at=NOW + 10 if alive else NOW - 30,
        serves=serves,
        owns=serves[:1],
    )


def lease(stream: str, owner: str, fence: int, age_s: float) -> LeaseRecord:
    return LeaseRecord(stream=stream, daemon_id=owner, fence=fence, acquired_at=NOW - age_s)


def snapshot(*streams: tuple[str, str]) -> dict[str, Any]:
    status = DaemonStatus(
        time=NOW,
        daemon=DaemonInfo(
            pid=100, started_at=NOW - 600, uptime_s=600, version="0", model="tiny", device="cpu"
        ),
        streams=tuple(StreamStatus(name=n, url="file:///v.mp4", state=s) for n, s in streams),
    )
    return json.loads(status.model_dump_json())


def three_daemons() -> FleetView:
    return merge_fleet(
        {
            "a": daemon("a", serves=("gate", "dock")),
            "b": daemon("b", serves=("dock", "yard")),
            "c": daemon("c", alive=False, serves=("lot",)),
        },
        {
            "gate": lease("gate", "a", 3, 120.0),
            "yard": lease("yard", "b", 1, 5.0),
            "lot": lease("lot", "c", 7, 40.0),  # its owner's presence expired
        },
        {"a": snapshot(("gate", "live")), "b": snapshot(("yard", "stalled"), ("pier", "live"))},
        NOW,
    )


def test_merge_shows_every_daemon_and_every_stream_with_its_owner() -> None:
    view = three_daemons()
    by_id = {d.daemon_id: d for d in view.daemons}
    assert [d.daemon_id for d in view.daemons] == ["a", "b", "c"]
    assert (by_id["a"].state, by_id["b"].state, by_id["c"].state) == ("live", "live", "gone")
    assert view.live_daemons == 2
    assert by_id["a"].host == "host-a" and by_id["a"].uptime_s == pytest.approx(600)
    assert by_id["c"].uptime_s == pytest.approx(570)  # until its presence expired
    assert by_id["a"].owns == ("gate",) and by_id["a"].lease_ages_s == {"gate": 120.0}
    assert by_id["b"].owns == ("yard",)

    streams = {s.name: s for s in view.streams}
    # dock: allowed on a and b, leased by none; pier: only in b's snapshot, no lease.
    assert sorted(streams) == ["dock", "gate", "lot", "pier", "yard"]
    assert (streams["gate"].owner, streams["gate"].fence, streams["gate"].state) == ("a", 3, "live")
    assert streams["yard"].state == "stalled" and streams["yard"].lease_age_s == 5.0
    assert streams["lot"].owner == "c" and streams["lot"].owner_state == "gone"
    assert streams["dock"].owner is None and streams["dock"].candidates == ("a", "b")
    assert streams["pier"].owner is None and streams["pier"].state is None
    assert streams["lot"].candidates == ()  # its only candidate is gone


def test_merge_of_nothing_is_an_empty_view_and_json_round_trips() -> None:
    empty = merge_fleet({}, {}, {}, NOW)
    assert empty.daemons == () and empty.streams == ()
    data = json.loads(json.dumps(three_daemons().to_json()))
    assert [d["state"] for d in data["daemons"]] == ["live", "live", "gone"]
    assert {s["name"]: s["owner"] for s in data["streams"]}["dock"] is None


def test_snapshots_with_unexpected_shapes_are_read_defensively() -> None:
    view = merge_fleet(
        {"a": daemon("a", serves=("gate",))},
        {"gate": lease("gate", "a", 1, 1.0)},
        {"a": {"streams": [{"name": "gate"}, "junk", {"state": "live"}]}},
        NOW,
    )
    assert [(s.name, s.state) for s in view.streams] == [("gate", "?")]


def rendered(renderable: Any) -> str:
    console = Console(record=True, width=160, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_render_names_gone_daemons_and_streams_without_owner() -> None:
    text = rendered(render_fleet(three_daemons()))
    assert "fleet: 2 of 3 daemons live" in text
    assert "gone" in text and "c (gone)" in text and "no owner" in text
    assert "gate (0:02:00)" in text  # the lease age next to the stream


def test_live_view_adds_the_fleet_tables_only_with_more_than_one_daemon() -> None:
    status = DaemonStatus.model_validate(snapshot(("gate", "live")))
    alone = merge_fleet({"a": daemon("a", serves=("gate",))}, {}, {}, NOW)
    assert "fleet:" not in rendered(render_view(status, alone))
    assert "fleet:" not in rendered(render_view(status, None))
    both = rendered(render_view(status, three_daemons(), height=60))
    assert "fleet: 2 of 3" in both and "gate" in both


# ---- against a real redis-server -------------------------------------------------------------


async def write_fleet(redis: Any) -> None:
    now = __import__("time").time()
    for record in (
        DaemonRecord("a", "host-a", 1, now - 60, now + 30, serves=("gate",), owns=("gate",)),
        DaemonRecord("b", "host-b", 2, now - 60, now - 1, serves=("yard",)),  # gone
    ):
        await redis.hset(KEYS.daemons, record.daemon_id, record.to_json())
    await redis.set(KEYS.lease("gate"), LeaseRecord("gate", "a", 4, now - 20).to_json(), ex=30)


@pytest.mark.integration
async def test_read_fleet_merges_records_leases_and_published_snapshots(kit: Any) -> None:
    publisher = StatusPublisher(
        kit.redis_settings(kit.url), StatusSettings(last_ttl_s=10), daemon_id="a"
    )
    try:
        assert await publisher.publish(DaemonStatus.model_validate(snapshot(("gate", "live"))))
    finally:
        await publisher.aclose()
    async with kit.client() as redis:
        await write_fleet(redis)
        assert 0 < await redis.ttl(KEYS.status_of("a")) <= 10
        assert await redis.get(KEYS.status_last) == await redis.get(KEYS.status_of("a"))
        view = await read_fleet(redis, KEYS)
    assert [(d.daemon_id, d.state) for d in view.daemons] == [("a", "live"), ("b", "gone")]
    streams = {s.name: s for s in view.streams}
    assert (streams["gate"].owner, streams["gate"].fence, streams["gate"].state) == (
        "a",
        4,
        "live",
    )
    assert streams["yard"].owner is None


@pytest.mark.integration
async def test_flashwatch_status_shows_the_fleet(kit: Any, tmp_path: Path) -> None:
    async with kit.client() as redis:
        await write_fleet(redis)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHWATCH_")}
    env["FLASHWATCH_STATE_DIR"] = str(tmp_path / "state")
    result = run_cli("status", "--json", "--once", "--redis-url", kit.url, env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {d["id"]: d["state"] for d in data["daemons"]} == {"a": "live", "b": "gone"}
    assert {s["name"]: s["owner"] for s in data["streams"]} == {"gate": "a", "yard": None}
    plain = run_cli("status", "--once", "--redis-url", kit.url, env=env)
    assert plain.returncode == 0, plain.stderr
    assert "fleet: 1 of 2 daemons live" in plain.stdout and "host-b" in plain.stdout
