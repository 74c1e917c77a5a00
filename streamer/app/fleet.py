"""The fleet reconciler: from placement and leases, which streams this daemon runs right now.

Every ``fleet.lease_ttl_s / 3`` seconds, one step:

    renew held leases ──lost──▶ stop those streams at once (no snapshot, no more writes)
        lapsed (not renewed within the TTL: this process was paused) ──▶ free: take it again;
        another daemon's: lost. Redis away past the TTL ──▶ run on provisionally (snapshots
        stay fenced by the folder), settled once Redis answers
    placement (static list, or auto over the live daemons) ──▶ wanted streams
    wanted, not held ──▶ take the lease (fence above the snapshot folder's) ──▶ claim the
        folder's fence, restore the snapshot, start ingest; adopted at run time: the outage
        is a gap (reason "failover")
    held, no longer wanted (auto) ──▶ final snapshot, stop, release (the other adopts it)

Streams are started and stopped through the same ``StreamSet`` a SIGHUP reload uses, under the
daemon's reload lock. A stream this daemon does not run is unknown to its engine, so its intake
answers nothing for it (routing to its owner is ``sinks.fleet`` routing's work).

At start (``start()``), leases are taken before the model is built, and only owned streams are
built. When Redis does not answer then, every wanted stream runs *provisionally* (as a lone
daemon always did: ingest goes on through a Redis outage); once Redis answers, each provisional
stream either gets its lease or stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from memory.errors import StaleFence
from model.errors import FlashwatchError
from sinks.connection import REDIS_DOWN_ERRORS, RedisClient, describe_redis_error, open_redis
from sinks.fleet.leases import Leases
from sinks.fleet.placement import moves, wanted
from sinks.fleet.records import LeaseRecord, read_daemons
from sinks.fleet.settings import FleetSettings
from sinks.schema import FleetStatus, LeaseStatus
from sinks.settings import Keys, RedisSettings
from streamer.app.engine_port import FAILOVER, EnginePort
from streamer.app.reload import StreamSet
from streamer.ingest.backoff import Backoff
from streamer.ingest.settings import StreamSettings
from streamer.ingest.types import GapEvent

log = logging.getLogger(__name__)

BACKOFF_JITTER = 0.2


class FleetReconciler:
    """Owns this daemon's leases; ``start()`` once, then ``run()`` as a task; ``stop()``."""

    def __init__(
        self,
        fleet: FleetSettings,
        redis: RedisSettings,
        *,
        candidates: Callable[[], Sequence[StreamSettings]],
        lock: asyncio.Lock,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``candidates()``: the streams the config lists now (static: this daemon's own list;
        auto: the list all daemons share). ``lock``: the daemon's reload lock."""
        self._fleet = fleet
        self._redis = redis
        self._keys = Keys(redis.prefix)
        self._candidates = candidates
        self._lock = lock
        self._clock = clock
        self.leases = Leases(self._keys, fleet.daemon_id, fleet.lease_ttl_s, clock=clock)
        self._provisional: set[str] = set()
        self._standby: tuple[str, ...] = ()
        self._streams: StreamSet | None = None
        self._port: EnginePort | None = None
        self._on_gap: Callable[[GapEvent], None] = lambda event: None
        self._client: RedisClient | None = None
        self._down: str | None = None  # the Redis error of the current outage, logged once

    # ---- start-up ---------------------------------------------------------------------------

    async def start(self, fences: Callable[[str], int]) -> list[StreamSettings]:
        """Take the leases of the wanted streams; the streams to build the daemon with.

        ``fences(name)``: the highest fence the stream's snapshot folder records. When Redis
        does not answer, every wanted stream is returned and runs provisionally.
        """
        candidates = {s.name: s for s in self._candidates()}
        try:
            want = await self._wanted(candidates)
            for name in want:
                await self.leases.try_acquire(self._open(), name, floor=fences(name))
        except REDIS_DOWN_ERRORS as exc:
            self._redis_down(exc)
            want = tuple(candidates)  # auto too: balanced once Redis answers
            self._provisional = set(want)
            return [candidates[name] for name in want]
        owned = set(self.leases.owned())
        self._standby = tuple(n for n in want if n not in owned)
        for name in self._standby:
            log.info("fleet: stream %r is owned by another daemon; standing by", name)
        return [s for name, s in candidates.items() if name in owned]

    def attach(
        self, streams: StreamSet, port: EnginePort, on_gap: Callable[[GapEvent], None]
    ) -> None:
        """The running streams to start and stop (after the daemon is built). ``on_gap``:
        hears an adoption's failover gap (already in memory) for the status."""
        self._streams, self._port, self._on_gap = streams, port, on_gap

    async def claim_started(self) -> None:
        """Claim the snapshot folders of the streams owned at start (before ingest writes)."""
        assert self._port is not None
        for name in self.leases.owned():
            record = self.leases.record(name)
            assert record is not None
            try:
                await self._port.claim_fence(name, record.fence)
            except (StaleFence, OSError) as exc:  # counted by the writer when it fails too
                log.warning("fleet: cannot claim the snapshot folder of %r: %s", name, exc)

    # ---- running ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile every third of the lease TTL until cancelled."""
        backoff = Backoff(self._redis.backoff_initial_s, self._redis.backoff_max_s, BACKOFF_JITTER)
        while True:
            try:
                await self.step()
            except REDIS_DOWN_ERRORS as exc:
                self._redis_down(exc)
                self._lapse_untrusted()
                await asyncio.sleep(min(backoff.next_delay(), self.leases.beat_s))
                continue
            backoff.reset()
            await asyncio.sleep(self.leases.beat_s)

    async def step(self) -> None:
        """One reconciliation: renew, stop the lost, hand over, adopt. Raises Redis errors."""
        assert self._streams is not None and self._port is not None
        client = self._open()
        beat = await self.leases.beat(client)
        for name in beat.lost:
            await self._stop(name, snapshot=False)
        for name, record in beat.retaken.items():
            await self._claim_or_stop(name, record)
        for name, old in beat.lapsed.items():
            await self._recheck(client, name, old)
        candidates = {s.name: s for s in self._candidates()}
        want = await self._wanted(candidates)
        await self._settle_provisional(client, want)
        if self._down is not None:
            await client.ping()
            log.info("fleet: Redis answers again; leases are renewed")
            self._down = None
        running = set(self._streams.running())
        adopt, hand_over = moves(self.leases.owned(), want)
        adopt = tuple(name for name in adopt if name not in running)  # provisional ones
        for name in hand_over:
            await self._hand_over(client, name)
        standby = []
        for name in adopt:
            if not await self._adopt(client, candidates[name]):
                standby.append(name)
        self._standby = tuple(standby)

    async def take(self, settings: StreamSettings) -> bool:
        """A stream a reload adds: take its lease now if placement wants it here and it is free
        (the reload then starts it); False leaves it to the reconciler (standby)."""
        assert self._port is not None
        try:
            candidates = {s.name: s for s in self._candidates()}
            if settings.name not in await self._wanted({**candidates, settings.name: settings}):
                return False
            floor = await self._port.recorded_fence(settings.name)
            record = await self.leases.try_acquire(self._open(), settings.name, floor=floor)
            if record is None:
                return False
        except REDIS_DOWN_ERRORS as exc:
            self._redis_down(exc)
            self._provisional.add(settings.name)  # started; its lease is taken once Redis is back
            return True
        return await self._claim_or_release(settings.name, record)

    async def forget(self, name: str) -> None:
        """A stream a reload removed (already snapshotted and stopped): release its lease."""
        self._provisional.discard(name)
        await self._release(name)

    async def stop(self) -> None:
        """Release every lease (after the final snapshot) and close the connection."""
        try:
            await self.leases.release_all(self._open())
        finally:
            if self._client is not None:
                await self._client.aclose()
                self._client = None

    def status(self) -> FleetStatus:
        return FleetStatus(
            daemon_id=self._fleet.daemon_id,
            placement=self._fleet.placement,
            lease_ttl_s=self._fleet.lease_ttl_s,
            leases=tuple(
                LeaseStatus(
                    stream=v.stream, fence=v.fence, age_s=v.age_s, renewed_s_ago=v.renewed_s_ago
                )
                for v in self.leases.views()
            ),
            standby=self._standby,
            provisional=tuple(sorted(self._provisional)),
        )

    # ---- internals --------------------------------------------------------------------------

    async def _wanted(self, candidates: dict[str, StreamSettings]) -> tuple[str, ...]:
        weights = {name: s.weight for name, s in candidates.items()}
        live: dict[str, float] = {}
        if self._fleet.placement == "auto":
            records = await read_daemons(self._open(), self._keys)
            live = {d.daemon_id: d.weight for d in records.values()}
        return wanted(self._fleet.placement, self._fleet.daemon_id, self._fleet.weight,
                      weights, live)  # fmt: skip

    async def _settle_provisional(self, client: RedisClient, want: Sequence[str]) -> None:
        """Streams run while Redis was away: take their leases, or stop them."""
        assert self._port is not None
        for name in sorted(self._provisional):
            record = None
            if name in want:
                floor = await self._port.recorded_fence(name)
                record = await self.leases.try_acquire(client, name, floor=floor)
            self._provisional.discard(name)  # decided (a Redis error leaves it provisional)
            if record is not None and await self._claim_or_release(name, record):
                continue
            self.leases.lose(name, "it ran provisionally, and is not this daemon's now")
            await self._stop(name, snapshot=False)

    async def _adopt(self, client: RedisClient, settings: StreamSettings) -> bool:
        """Take a free stream's lease and start it; False when it is someone else's."""
        assert self._streams is not None and self._port is not None
        name = settings.name
        record = await self.leases.try_acquire(
            client, name, floor=await self._port.recorded_fence(name)
        )
        if record is None:
            return False
        started = self._clock()
        if not await self._claim_or_release(name, record):
            return False
        try:
            async with self._lock:
                # the gap is in memory before any query reads the restored stream
                gap = await self._streams.add(settings, failover_at=started)
        except (FlashwatchError, ValueError, OSError) as exc:
            log.error("fleet: could not adopt stream %r: %s", name, exc)
            await self._release(name)
            return False
        if gap is not None:
            self._on_gap(gap)
        since = "" if gap is None else f"; a {gap.end - gap.start:.1f} s gap recorded"
        log.info("fleet: adopted stream %r (fence %d)%s", name, record.fence, since)
        return True

    async def _hand_over(self, client: RedisClient, name: str) -> None:
        """Placement moved ``name`` elsewhere: final snapshot, stop, then release."""
        assert self._streams is not None
        async with self._lock:
            problems = await self._streams.remove(name, snapshot=True)
        for problem in problems:
            log.error("fleet: handing %r over: %s", name, problem)
        await self.leases.release(client, name)
        log.info("fleet: handed stream %r over (placement: auto)", name)

    async def _stop(self, name: str, *, snapshot: bool) -> None:
        assert self._streams is not None and self._port is not None
        if not snapshot:
            self._port.revoke(name)  # at once, before waiting for the lock
        async with self._lock:
            if name in self._streams.running():
                await self._streams.remove(name, snapshot=snapshot)

    def _lapse_untrusted(self) -> None:
        """Redis away past a lease's TTL: the stream runs on provisionally (its snapshots stay
        fenced: refused once another daemon claims the folder); once Redis answers it gets its
        lease again, or stops if another daemon took it meanwhile."""
        for name in list(self.leases.owned()):
            if not self.leases.trusted(name):
                record = self.leases.give_up(name)
                self._provisional.add(name)
                log.warning("fleet: lease of %r (fence %s) lapsed while Redis is unreachable; "
                            "the stream runs on provisionally", name,
                            None if record is None else record.fence)  # fmt: skip

    async def _recheck(self, client: RedisClient, name: str, old: LeaseRecord) -> None:
        """A lease that lapsed (this process was paused, or Redis slow): take it again if it is
        free, else stop the stream at once (one line)."""
        assert self._port is not None
        try:
            floor = max(old.fence, await self._port.recorded_fence(name))
            record = await self.leases.try_acquire(client, name, floor=floor)
        except REDIS_DOWN_ERRORS:
            self._provisional.add(name)
            raise
        if record is None:
            self.leases.lose(name, "not renewed within its TTL, and another daemon holds it now",
                             fence=old.fence)  # fmt: skip
            await self._stop(name, snapshot=False)
            return
        log.info("fleet: lease of %r had lapsed and was free; taken again (fence %d)",
                 name, record.fence)  # fmt: skip
        await self._claim_or_stop(name, record)

    async def _claim_or_release(self, name: str, record: LeaseRecord) -> bool:
        """Claim the snapshot folder for a lease just taken; False (lease released) when a
        higher fence owns it. An unwritable folder is a warning: the writer counts its own
        failures, and the stream is served all the same."""
        assert self._port is not None
        try:
            await self._port.claim_fence(name, record.fence)
        except StaleFence as exc:
            log.warning("fleet: not taking stream %r: %s", name, exc)
            await self._release(name)
            return False
        except OSError as exc:
            log.warning("fleet: cannot claim the snapshot folder of %r: %s", name, exc)
        return True

    async def _claim_or_stop(self, name: str, record: LeaseRecord) -> None:
        """Write ``name``'s snapshots under a new fence of ours; stop it if that is refused."""
        assert self._port is not None
        try:
            await self._port.claim_fence(name, record.fence)
        except StaleFence as exc:
            self.leases.lose(name, str(exc))
            await self._stop(name, snapshot=False)
        except OSError as exc:  # the writer counts its own failures; ownership is unchanged
            log.warning("fleet: cannot claim the snapshot folder of %r: %s", name, exc)

    async def _release(self, name: str) -> None:
        try:
            await self.leases.release(self._open(), name)
        except REDIS_DOWN_ERRORS as exc:
            log.warning("fleet: could not release %r (it expires by itself): %s", name, exc)

    def _open(self) -> RedisClient:
        if self._client is None:
            timeout = min(self._redis.connect_timeout_s, self.leases.beat_s) + 1.0
            self._client = open_redis(self._redis, read_timeout_s=timeout)
        return self._client

    def _redis_down(self, exc: BaseException) -> None:
        message = describe_redis_error(exc, self._redis.url)
        if message != self._down:
            log.warning("fleet: %s; leases are kept only while their TTL lasts", message)
            self._down = message


__all__ = ["FAILOVER", "FleetReconciler"]
