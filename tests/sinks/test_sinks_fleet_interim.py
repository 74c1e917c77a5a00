"""The interim lease writer (until sinks.fleet.leases): claims, keeps off others', lets go."""

from __future__ import annotations

from typing import Any

from sinks.fleet.interim import InterimLeases
from sinks.fleet.records import LeaseRecord, fleet_streams, read_leases
from sinks.fleet.settings import FleetSettings
from sinks.settings import Keys

KEYS = Keys()


async def test_claims_free_streams_only_and_lets_removed_ones_go(kit: Any) -> None:
    client = kit.client()
    await client.set(KEYS.lease("theirs"), LeaseRecord("theirs", "other", 7, 0.0).to_json())
    streams = ["mine", "theirs"]
    leases = InterimLeases(
        kit.redis_settings(kit.url), FleetSettings(daemon_id="me"), lambda: list(streams)
    )
    await leases.beat()
    held = await read_leases(client, KEYS, ["mine", "theirs"])
    assert held["mine"].daemon_id == "me" and held["mine"].fence == 1
    assert held["theirs"].daemon_id == "other" and leases.owned == {"mine"}
    assert await fleet_streams(client, KEYS) == ("mine", "theirs")

    await leases.beat()  # a renewal keeps the fence
    assert (await read_leases(client, KEYS, ["mine"]))["mine"].fence == 1

    streams.remove("mine")  # a reload removed it
    await leases.beat()
    assert leases.owned == frozenset() and not await client.exists(KEYS.lease("mine"))

    streams.append("mine")
    await leases.beat()  # claimed again, under a higher fence
    assert (await read_leases(client, KEYS, ["mine"]))["mine"].fence == 2
    await leases.aclose()  # a clean stop lets go of leases and presence
    assert not await client.exists(KEYS.lease("mine"))
    assert not await client.hexists(KEYS.daemons, "me")
    assert await client.exists(KEYS.lease("theirs"))
    await client.aclose()
