"""Waking on work: ClipFeeds.wait returns when a clip arrives and never loses one."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np

from streamer.engine.feeds import ClipFeeds
from streamer.ingest.queues import DropQueue
from streamer.ingest.types import Clip

FRAMES = np.zeros((4, 2, 2, 3), dtype=np.uint8)


def feeds_of(*names: str) -> tuple[ClipFeeds, dict[str, DropQueue[Clip]]]:
    feeds = ClipFeeds()
    queues = {name: DropQueue[Clip](8, "drop_oldest", name=name) for name in names}
    for name, queue in queues.items():
        feeds.add(name, queue)
    return feeds, queues


async def test_wait_returns_when_a_clip_arrives_from_a_worker_thread() -> None:
    feeds, queues = feeds_of("a", "b")
    queues["b"].bind(asyncio.get_running_loop())
    waiter = asyncio.create_task(feeds.wait())
    await asyncio.sleep(0.05)
    assert not waiter.done()  # nothing to do: it sleeps
    clip = Clip("b", 0, FRAMES, 0.0, 2.0)
    threading.Thread(target=queues["b"].put_threadsafe, args=(clip,)).start()
    async with asyncio.timeout(5.0):
        await waiter
    assert feeds.waiting()
    assert feeds.take(4) == [clip]


async def test_a_cancelled_wait_keeps_the_clip_it_took_and_the_order() -> None:
    feeds, queues = feeds_of("a")
    for _ in range(3):  # cancel idle waits: nothing is lost, nothing is taken
        waiter = asyncio.create_task(feeds.wait())
        await asyncio.sleep(0.01)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
    assert not feeds.waiting()
    clips = [Clip("a", i, FRAMES, 2.0 * i, 2.0 * i + 2.0) for i in range(3)]
    waiter = asyncio.create_task(feeds.wait())
    await asyncio.sleep(0.01)
    for clip in clips:
        queues["a"].put_nowait(clip)
    waiter.cancel()  # possibly after its getter took the first clip
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    assert feeds.take(8) == clips  # all three, in order
