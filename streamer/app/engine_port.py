"""Everything the operations layer (HTTP API, metrics, health, reload) asks of the engine.

One adapter, so that a new engine means changing this file only: queries (submit, cancel,
forget), statistics, the device-thread heartbeat, and adding or removing a stream's feed and
memory while running.
"""

from __future__ import annotations

import asyncio
import logging
import time

from memory.bank import MemoryBank, MemoryStats
from memory.frames import FrameStore
from memory.writer import SnapshotHealth
from streamer.engine.core import Engine, EngineStats
from streamer.engine.types import Ticket
from streamer.ingest.queues import DropQueue
from streamer.ingest.types import Clip, GapEvent

FAILOVER = "failover"  # the reason of the gap an adoption records

log = logging.getLogger(__name__)


def _now() -> float:
    return time.monotonic()


class EnginePort:
    def __init__(self, engine: Engine, bank: MemoryBank, frames: FrameStore | None = None) -> None:
        self._engine = engine
        self._bank = bank
        self._frames = frames  # evidence frames (None: off), kept consistent with the memory
        self.last_heartbeat: float | None = None  # monotonic, set by the device thread

    # ---- queries ----------------------------------------------------------------------------

    async def submit(self, ticket: Ticket) -> None:
        await self._engine.submit(ticket)

    def cancel(self, request_id: str) -> None:
        self._engine.cancel(request_id)

    async def forget(self, stream: str, start: float, end: float) -> None:
        await self._engine.forget(stream, start, end)

    # ---- statistics -------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return self._engine.stats()

    def memory_stats(self, stream: str) -> MemoryStats | None:
        return self._engine.memory_stats(stream)

    async def heartbeat(self) -> None:
        """Run a no-op on the device thread; it returns only if that thread is not wedged."""
        self.last_heartbeat = await self._engine.on_device(_now)

    def heartbeat_age_s(self) -> float | None:
        return None if self.last_heartbeat is None else time.monotonic() - self.last_heartbeat

    # ---- streams while running ----------------------------------------------------------------

    async def add_stream(
        self, name: str, clips: DropQueue[Clip], fps: float, *, failover_at: float | None = None
    ) -> GapEvent | None:
        """A new stream, with its snapshot if it had one (a stream removed and added again)
        rather than an empty memory that would overwrite it. Raises MemoryStoreError if the
        budget cannot hold another stream.

        ``failover_at`` (epoch seconds): the stream is adopted from a dead owner; the outage
        from the restored history's end to then is recorded in the same device call as the
        restore, so no query reads the restored memory without it. Returns that gap (None when
        there is none: not an adoption, or nothing restored). The stream's evidence frames are
        read again and those newer than the restored memory deleted, before any clip arrives."""
        gap = await self._engine.on_device(self._add_on_device, name, failover_at)
        if self._frames is not None:
            # the restored memory's end: where an adoption's gap starts, if one was recorded
            covered_end = gap.start if gap is not None else await self.history_end(name)
            try:
                removed = await asyncio.to_thread(self._frames.adopt, name, covered_end)
            except OSError as exc:  # frames are evidence, not memory: the stream runs on
                log.warning("evidence frames of %r not read again: %s", name, exc)
            else:
                if removed:
                    log.info("evidence frames of %r: %d newer than the restored memory deleted",
                             name, removed)  # fmt: skip
        self._engine.add_source(name, clips, fps)
        await self._engine.on_device(self._engine.refresh_memory_stats)
        return gap

    async def replace_feed(self, name: str, clips: DropQueue[Clip], fps: float) -> None:
        """A changed stream: the new ingest feeds the same memory."""
        await self._engine.remove_source(name)
        self._engine.add_source(name, clips, fps)
        await self._engine.on_device(self._engine.refresh_memory_stats)

    async def remove_stream(self, name: str) -> list[str]:
        """Stop feeding ``name``, snapshot its memory to completion, then drop it.

        Returns the snapshot problems (empty when written, or when snapshots are off).
        """
        await self._engine.remove_source(name)
        return await self._engine.on_device(self._flush_and_remove, name)

    async def drop_stream(self, name: str) -> None:
        """Stop feeding ``name`` and drop its memory with no snapshot (its lease is lost: the
        new owner's snapshot must stay as it is)."""
        self._bank.revoke_snapshots(name)  # first: any write still queued is refused
        await self._engine.remove_source(name)
        await self._engine.on_device(self._drop_on_device, name)

    def revoke(self, name: str) -> None:
        """Refuse every later snapshot write of ``name`` (its lease is lost), at once."""
        self._bank.revoke_snapshots(name)

    async def history_end(self, name: str) -> float | None:
        """Where ``name``'s memory ends (after a restore), None when it holds nothing."""
        return await self._engine.on_device(self._history_end, name)

    async def claim_fence(self, name: str, fence: int) -> None:
        """Write ``name``'s snapshots as the holder of ``fence`` (disk I/O, off the loop)."""
        await asyncio.to_thread(self._bank.claim_fence, name, fence)

    async def recorded_fence(self, name: str) -> int:
        return await asyncio.to_thread(self._bank.recorded_fence, name)

    def _drop_on_device(self, name: str) -> None:
        if name in self._bank.streams():
            self._bank.drop_stream(name)
        self._engine.refresh_memory_stats()

    def _history_end(self, name: str) -> float | None:
        span = self._bank.view(name).span
        return None if span is None else span[1]

    def _add_on_device(self, name: str, failover_at: float | None) -> GapEvent | None:
        self._bank.add_stream(name)
        self._bank.restore_snapshot(name)  # logs what it restored or moved aside
        end = self._history_end(name)
        if failover_at is None or end is None or end >= failover_at:
            return None
        self._bank.add_gap(name, end, failover_at, FAILOVER)
        return GapEvent(name, end, failover_at, FAILOVER)

    def _flush_and_remove(self, name: str) -> list[str]:
        problems = self._bank.flush_snapshots(only=name)  # waits for the writer thread
        self._bank.remove_stream(name)
        return problems

    def snapshot_health(self) -> SnapshotHealth:
        return self._bank.snapshot_health()
