"""Durable ask round trip on a three-master Redis Cluster vs a single redis-server.

Both run side by side on loopback, each served by the real query intake and reply publisher
(``sinks.intake``, ``sinks.replies``) with an engine that answers at once, so the time is the
bus alone: ``sinks.ask`` opens its client, subscribes to ``reply:{id}``, XADDs the request, the
intake reads it (XREADGROUP), dedupes it (SET NX on ``seen:{id}``), the final is stored at
``answer:{id}``, published and acked, and the client gets it. Asks alternate between the two so
machine load hits both alike; p50/p95 of each and the cluster/single ratio go to
``benchmarks/results/redis_cluster_roundtrip.json``.

    python benchmarks/redis_cluster_roundtrip.py [--asks 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from _query_common import machine, ratio, write_result

from sinks import ask
from sinks.intake import QueryIntake
from sinks.replies import ReplyPublisher
from sinks.schema import Answer, QueryTicket
from sinks.settings import QuerySettings, RedisSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from redis_cluster import RedisCluster
from redis_harness import RedisServer

WARMUP_ASKS = 10
CONNECTED_WAIT_S = 30.0


class AnswerAtOnce:
    """The engine's place: every ticket is answered with a fixed final, right away."""

    def __init__(self, replies: ReplyPublisher) -> None:
        self._replies = replies
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, ticket: QueryTicket) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(ticket))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self, _request_id: str) -> None:
        pass

    async def _answer(self, ticket: QueryTicket) -> None:
        request = ticket.request
        answer = Answer(
            id=request.id,
            stream=list(request.stream),
            question=request.question,
            answer="ok",
            frames=1,
            latency_s=0.0,
            tokens=1,
            model="none",
        )
        await self._replies.finish(ticket, answer)


@contextlib.asynccontextmanager
async def serving(url: str) -> AsyncIterator[None]:
    redis = RedisSettings(url=url, connect_timeout_s=2.0)
    query = QuerySettings(consumer_name="bench")
    replies = ReplyPublisher(redis, query)
    engine = AnswerAtOnce(replies)
    intake = QueryIntake(redis, query, submit=engine.submit, cancel=engine.cancel, replies=replies)
    task = asyncio.get_running_loop().create_task(intake.run())
    try:
        deadline = time.monotonic() + CONNECTED_WAIT_S
        while not intake.connected:
            if task.done() or time.monotonic() > deadline:
                raise SystemExit(f"the intake did not connect to {url}")
            await asyncio.sleep(0.05)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await replies.aclose()


async def round_trip(url: str) -> float:
    start = time.perf_counter()
    final = await ask(url, "what is shown?", stream="cam", timeout_s=30)
    elapsed = time.perf_counter() - start
    if final.get("type") != "final":
        raise SystemExit(f"unexpected reply: {final}")
    return elapsed


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "asks": len(values),
        "p50_ms": round(percentile(values, 50) * 1000, 3),
        "p95_ms": round(percentile(values, 95) * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3),
    }


async def measure(single_url: str, cluster_url: str, asks: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"single": [], "cluster": []}
    async with serving(single_url), serving(cluster_url):
        for _ in range(WARMUP_ASKS):
            await round_trip(single_url)
            await round_trip(cluster_url)
        for _ in range(asks):
            times["single"].append(await round_trip(single_url))
            times["cluster"].append(await round_trip(cluster_url))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--asks", type=int, default=200, help="asks on each (after warm-up)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        single = RedisServer(Path(workdir) / "single")
        (Path(workdir) / "single").mkdir()
        cluster = RedisCluster(Path(workdir) / "cluster")
        single.start()
        cluster.start()
        try:
            times = asyncio.run(measure(single.url, cluster.url, args.asks))
        finally:
            cluster.stop()
            single.stop()
    result = {
        "what": "durable sinks.ask round trip (client connect, XADD, intake, store, publish, "
        "ack, reply) with an engine that answers at once; asks alternate between the two",
        "command": f"python benchmarks/redis_cluster_roundtrip.py --asks {args.asks}",
        "single": summary(times["single"]),
        "cluster": summary(times["cluster"]),
        "ratio_p50_cluster_over_single": ratio(
            percentile(times["cluster"], 50), percentile(times["single"], 50)
        ),
        "ratio_p95_cluster_over_single": ratio(
            percentile(times["cluster"], 95), percentile(times["single"], 95)
        ),
        "machine": machine(),
    }
    path = write_result("redis_cluster_roundtrip", result)
    print(f"single p50 {result['single']['p50_ms']} ms, cluster p50 "
          f"{result['cluster']['p50_ms']} ms (x{result['ratio_p50_cluster_over_single']:.2f}); "
          f"{path}")  # fmt: skip


if __name__ == "__main__":
    main()
