"""DropQueue: policies, counters, thread-safe producers, bounded memory."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from streamer.ingest.queues import DropQueue


async def test_drop_oldest_keeps_newest_and_counts() -> None:
    dropped: list[tuple[int, str]] = []
    q: DropQueue[int] = DropQueue(
        3, "drop_oldest", name="frames", on_drop=lambda i, r: dropped.append((i, r))
    )
    for i in range(5):
        assert q.put_nowait(i)
    assert [q.get_nowait() for _ in range(3)] == [2, 3, 4]
    assert q.get_nowait() is None
    assert q.drops() == {"frames_full": 2}
    assert dropped == [(0, "frames_full"), (1, "frames_full")]


async def test_drop_newest_refuses_new_items() -> None:
    q: DropQueue[int] = DropQueue(2, "drop_newest", name="q")
    assert [q.put_nowait(i) for i in range(4)] == [True, True, False, False]
    assert [q.get_nowait(), q.get_nowait()] == [0, 1]
    assert q.drops() == {"q_full": 2}


async def test_block_policy_waits_for_room() -> None:
    q: DropQueue[int] = DropQueue(1, "block")
    await q.put(1)
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(2)
    putter = asyncio.ensure_future(q.put(2))
    await asyncio.sleep(0.05)
    assert not putter.done()
    assert await q.get() == 1
    await asyncio.wait_for(putter, 2)
    assert await q.get() == 2
    assert q.drops() == {}


async def test_get_wakes_on_threadsafe_put() -> None:
    q: DropQueue[str] = DropQueue(4)
    q.bind(asyncio.get_running_loop())
    getter = asyncio.ensure_future(q.get())
    await asyncio.sleep(0.01)
    threading.Thread(target=lambda: q.put_threadsafe("x")).start()
    assert await asyncio.wait_for(getter, 2) == "x"


async def test_producer_thread_never_blocks_and_memory_stays_bounded() -> None:
    """A fast thread, a slow consumer: the thread never waits, the queue stays at maxsize."""
    q: DropQueue[int] = DropQueue(8, "drop_oldest", name="frames")
    q.bind(asyncio.get_running_loop())
    n = 20_000
    max_seen = 0
    done = threading.Event()

    def produce() -> None:
        nonlocal max_seen
        for i in range(n):
            q.put_threadsafe(i)
            max_seen = max(max_seen, q.qsize())
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    got = []
    while not done.is_set() or not q.empty():
        item = q.get_nowait()
        if item is None:
            await asyncio.sleep(0.001)
            continue
        got.append(item)
        await asyncio.sleep(0.001)  # a slow consumer
    thread.join(5)
    assert max_seen <= 8
    assert got == sorted(got)  # FIFO order survives drops
    assert got[-1] == n - 1  # the newest item always survives drop_oldest
    assert q.drops()["frames_full"] == n - len(got)


async def test_blocked_thread_gives_up_when_stopped() -> None:
    q: DropQueue[int] = DropQueue(1, "block")
    q.bind(asyncio.get_running_loop())
    assert q.put_threadsafe(1)
    stop = threading.Event()
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(q.put_threadsafe(2, stop=stop)))
    thread.start()
    await asyncio.sleep(0.15)
    assert thread.is_alive()  # waiting for room
    stop.set()
    started = time.monotonic()
    while thread.is_alive() and time.monotonic() - started < 5:
        await asyncio.sleep(0.02)
    assert result == [False]
    assert q.qsize() == 1


async def test_blocked_thread_resumes_when_consumer_takes() -> None:
    q: DropQueue[int] = DropQueue(1, "block")
    q.bind(asyncio.get_running_loop())
    q.put_threadsafe(1)
    thread = threading.Thread(target=lambda: q.put_threadsafe(2))
    thread.start()
    assert await asyncio.wait_for(q.get(), 2) == 1
    assert await asyncio.wait_for(q.get(), 2) == 2
    thread.join(2)


def test_threadsafe_put_needs_a_loop() -> None:
    q: DropQueue[int] = DropQueue(1)
    with pytest.raises(RuntimeError, match="bind"):
        q.put_threadsafe(1)
