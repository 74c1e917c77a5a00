"""Offer-to-received latency of each alert delivery channel, against a bare Redis PUBLISH.

A private redis-server and mosquitto broker on loopback and an aiohttp receiver on 127.0.0.1;
every channel runs its real sink (``sinks.alerts``). One event at a time is offered and timed
until its receiver has it: the Redis stream (a blocking XREAD), the pub/sub channel (both from
the one Lua script of the Redis sink), a signed webhook POST, and an MQTT QoS 1 message with its
retained state. The baseline, measured in the same run, is a bare PUBLISH seen by a subscriber
(one Redis round trip each way): ``ratio_p50`` and ``ratio_p95`` say what each channel adds.
Receivers share the event loop with the sinks, as they would in a single test process; other
processes share the 2 cores, so the JSON has the load average.

    python benchmarks/alerts_delivery.py [--events 500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import redis.asyncio as aioredis
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from alert_events import alert_event
from mosquitto_harness import MosquittoServer
from redis_harness import RedisServer, free_port

from sinks.alerts.mqtt import MqttAlertSink
from sinks.alerts.redis import RedisAlertSink
from sinks.alerts.settings import MqttSettings, WebhookSettings
from sinks.alerts.webhook import WebhookSink
from sinks.settings import Keys, RedisSettings
from streamer.engine.standing.events import AlertSink

RESULTS = Path(__file__).resolve().parent / "results"
WAIT_S = 30.0
NAME = "bench"
WARM_UP = 20  # events offered first and not timed (connections, script cache)


class Arrivals:
    """When each alert id (or baseline token) arrived, with a wake-up for the waiter."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self._changed = asyncio.Event()

    def note(self, key: str) -> None:
        self.at.setdefault(key, time.perf_counter())
        self._changed.set()

    async def wait(self, key: str) -> float:
        async with asyncio.timeout(WAIT_S):
            while key not in self.at:
                self._changed.clear()
                await self._changed.wait()
        return self.at[key]


def summary_ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1e3, 3),
        "p95_ms": round(p95 * 1e3, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1e3, 3),
    }


@contextlib.asynccontextmanager
async def background(coro: Awaitable[None]) -> AsyncIterator[None]:
    task = asyncio.ensure_future(coro)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def running(sink: AlertSink) -> AsyncIterator[AlertSink]:
    async with background(sink.run()):
        yield sink
    await sink.aclose()


async def time_offers(
    sink: AlertSink, channels: dict[str, Arrivals], events: int, tag: str
) -> dict[str, list[float]]:
    """Offer ``events`` alerts one at a time; each channel's offer-to-arrival seconds."""
    samples: dict[str, list[float]] = {name: [] for name in channels}
    for sequence in range(-WARM_UP, events):
        event = dataclasses.replace(alert_event(NAME, sequence), alert_id=f"{tag}:{sequence}")
        offered = time.perf_counter()
        sink.offer(event)
        for name, arrivals in channels.items():
            arrived = await arrivals.wait(event.alert_id)
            if sequence >= 0:
                samples[name].append(arrived - offered)
    # The receiver has the last one before the sink has its acknowledgement: wait for that.
    async with asyncio.timeout(WAIT_S):
        while sink.stats()["delivered"] < WARM_UP + events:
            await asyncio.sleep(0.01)
    return samples


async def baseline(client: aioredis.Redis, url: str, events: int) -> list[float]:
    """A bare PUBLISH until the subscriber has it."""
    arrivals = Arrivals()
    listener = aioredis.Redis.from_url(url, decode_responses=True)
    pubsub = listener.pubsub()
    await pubsub.subscribe("bench:baseline")

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                arrivals.note(message["data"])

    samples: list[float] = []
    async with background(listen()):
        for sequence in range(-WARM_UP, events):
            token = f"b{sequence}:{time.perf_counter()}"
            start = time.perf_counter()
            await client.publish("bench:baseline", token)
            arrived = await arrivals.wait(token)
            if sequence >= 0:
                samples.append(arrived - start)
    await pubsub.aclose()
    await listener.aclose()
    return samples


async def redis_channels(url: str, events: int) -> dict[str, list[float]]:
    keys = Keys("flashwatch")
    stream, pubsub_arrivals = Arrivals(), Arrivals()
    reader = aioredis.Redis.from_url(url, decode_responses=True)
    listener = aioredis.Redis.from_url(url, decode_responses=True)
    pubsub = listener.pubsub()
    await pubsub.subscribe(keys.alert(NAME))

    async def read_stream() -> None:
        last = "$"
        while True:
            for _key, entries in await reader.xread({keys.alerts: last}, block=0, count=100):
                for entry_id, fields in entries:
                    stream.note(fields["alert_id"])
                    last = entry_id

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                pubsub_arrivals.note(json.loads(message["data"])["alert_id"])

    settings = RedisSettings(url=url)
    sink = RedisAlertSink(settings, stream_maxlen=100_000, marker_ttl_s=600, queue_size=1000)
    async with background(read_stream()), background(listen()), running(sink):
        await asyncio.sleep(0.1)  # the XREAD is blocking before the first offer
        samples = await time_offers(
            sink, {"redis_stream": stream, "redis_pubsub": pubsub_arrivals}, events, "r"
        )
    await pubsub.aclose()
    await listener.aclose()
    await reader.aclose()
    return samples


async def webhook_channel(events: int) -> dict[str, list[float]]:
    arrivals = Arrivals()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        arrivals.note(request.headers["Idempotency-Key"])
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    hook = WebhookSettings(url=f"http://127.0.0.1:{port}/hook", secret="benchmark-secret-0123")
    try:
        async with running(WebhookSink(hook, name="bench", queue_size=1000)) as sink:
            return await time_offers(sink, {"webhook": arrivals}, events, "w")
    finally:
        await runner.cleanup()


async def mqtt_channel(broker: MosquittoServer, events: int) -> dict[str, list[float]]:
    arrivals = Arrivals()
    settings = MqttSettings(url=broker.url, client_id="flashwatch-bench")
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="bench-sub") as client:
        await client.subscribe(f"flashwatch/alerts/{NAME}", qos=1)

        async def listen() -> None:
            async for message in client.messages:
                arrivals.note(json.loads(bytes(message.payload))["alert_id"])  # type: ignore[arg-type]

        sink = MqttAlertSink(settings, queue_size=1000)
        async with background(listen()), running(sink):
            async with asyncio.timeout(WAIT_S):
                while not sink.stats()["connected"]:
                    await asyncio.sleep(0.01)
            return await time_offers(sink, {"mqtt": arrivals}, events, "m")


async def measure(events: int, workdir: Path) -> dict[str, Any]:
    redis_server = RedisServer(workdir)
    broker = MosquittoServer(workdir)
    redis_server.start()
    broker.start()
    try:
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        runs: dict[str, Callable[[], Awaitable[dict[str, list[float]]]]] = {
            "redis": lambda: redis_channels(redis_server.url, events),
            "webhook": lambda: webhook_channel(events),
            "mqtt": lambda: mqtt_channel(broker, events),
        }
        base = await baseline(client, redis_server.url, events)
        channels: dict[str, list[float]] = {}
        for run in runs.values():
            channels.update(await run())
        base += await baseline(client, redis_server.url, events)  # before and after the rest
        await client.aclose()
    finally:
        broker.stop()
        redis_server.stop()
    base_summary = summary_ms(base)
    result: dict[str, Any] = {
        "events_per_channel": events,
        "baseline_publish_roundtrip": base_summary,
        "channels": {},
    }
    for name, samples in channels.items():
        shown = summary_ms(samples)
        shown["ratio_p50"] = round(shown["p50_ms"] / base_summary["p50_ms"], 2)
        shown["ratio_p95"] = round(shown["p95_ms"] / base_summary["p95_ms"], 2)
        result["channels"][name] = shown
    result["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=500, help="events timed per channel")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        result = asyncio.run(measure(args.events, Path(workdir)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "alerts_delivery.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
