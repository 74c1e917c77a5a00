"""Failover of a stream between two daemons: seconds from the owner's death to the lease moved
and to the stream live again, and what happens to durable requests sent meanwhile.

Two ``flashwatch serve`` daemons (the built-in demo: one testsrc stream, the tiny model; ids
``a`` and ``b``, ``placement: static``, both listing the stream) share a private redis-server
and one snapshot folder. Whoever holds the lease owns the stream; the other stands by. Each
round: durable requests (``sinks.client.ask``, one every 0.5 s, stream "demo") run for a few
seconds with both daemons up (the **baseline**, same run), then the owner is SIGKILLed while
the requests go on; we time the lease moving (its ``daemon`` changes in Redis) and the stream
being live again (the adopter's HTTP status shows a clip encoded after the adoption), keep
sending for a few seconds, then restart the killed daemon (it becomes the standby) and wait for
every request to end. A monitor subscribed to every reply channel counts final answers per
request: answered once, answered twice, or lost (no final within the timeout); error answers
are counted by code.

Both daemons read the one shared ``requests`` stream through one consumer group and route each
request to its stream's owner ("Fleet: routing" in the README): a request read while the lease
still names the dead owner, or names nobody, waits for the adopter (``fleet.owner_wait_s``,
default 10 s, longer than the TTL plus the restore here) instead of being answered
``unknown_stream``; the killed owner's un-acked requests are claimed after
``query.claim_idle_s`` (3 s here). The JSON records what was seen, and each phase's median
latency (send to final), whose ratio shows what the failover costs a request; the longest
wait (a request sent just after the kill) is about the lease TTL plus the restore.

    python benchmarks/fleet_failover.py [--kills 3] [--lease-ttl 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from _query_common import machine, median, private_redis, ratio, write_result

from model.errors import FlashwatchError
from sinks.client import ask
from sinks.fleet.records import read_leases
from sinks.settings import Keys

FLASHWATCH = str(Path(sys.executable).parent / "flashwatch")
HTTP_AT = re.compile(r"HTTP API, metrics and probes at (http://\S+)")
STREAM = "demo"
QUESTION = "What is moving?"
SEND_EVERY_S = 0.5
BASELINE_S = 4.0
AFTER_LIVE_S = 3.0
ANSWER_TIMEOUT_S = 60.0
KEYS = Keys()


@dataclass
class Daemon:
    daemon_id: str
    workdir: Path
    url: str
    args: tuple[str, ...]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    starts: int = 0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHWATCH_")}
        env["FLASHWATCH_STATE_DIR"] = str(self.workdir / f"state-{self.daemon_id}")
        env["PYTHONUNBUFFERED"] = "1"
        env["FLASHWATCH_HTTP_PORT"] = "0"
        self.starts += 1
        self.log_path = self.workdir / f"serve-{self.daemon_id}-{self.starts}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [FLASHWATCH, "serve", "--no-tui", "--redis-url", self.url,
                 "--set", f"fleet.daemon_id={self.daemon_id}", *self.args],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def status(self) -> dict[str, Any] | None:
        text = self.log_path.read_text(errors="replace") if self.log_path else ""
        found = HTTP_AT.search(text)
        if found is None:
            return None
        try:
            with urllib.request.urlopen(f"{found.group(1)}/v1/status", timeout=2) as response:
                status: dict[str, Any] = json.load(response)
        except (OSError, ValueError):
            return None
        return status

    def clips(self) -> int | None:
        status = self.status() or {"streams": []}
        stream = next((s for s in status["streams"] if s["name"] == STREAM), None)
        return None if stream is None else int(stream["clips"])

    def standing_by(self) -> bool:
        status = self.status()
        return bool(status and status.get("fleet") and STREAM in status["fleet"]["standby"])


@dataclass
class Requests:
    """Durable requests sent during one phase, and what came back for each."""

    sent: dict[str, float] = field(default_factory=dict)  # id -> monotonic send time
    outcome: dict[str, str] = field(default_factory=dict)  # id -> final | error code | lost
    latency_s: dict[str, float] = field(default_factory=dict)

    def summary(self, finals: Counter[str]) -> dict[str, Any]:
        ids = list(self.sent)
        codes = Counter(self.outcome.get(i, "lost") for i in ids)
        answered = [i for i in ids if finals[i] >= 1]
        return {
            "sent": len(ids),
            "answered": len(answered),
            "answered_twice": sum(1 for i in ids if finals[i] >= 2),
            "lost": codes.get("lost", 0),
            "errors": {c: n for c, n in codes.items() if c not in ("final", "lost")},
            "latency_p50_s": median([self.latency_s[i] for i in answered])
            if answered and all(i in self.latency_s for i in answered)
            else None,
            "latency_max_s": max(self.latency_s.values(), default=None),
        }


async def one_request(url: str, requests: Requests) -> None:
    request_id = uuid.uuid4().hex
    requests.sent[request_id] = time.monotonic()
    try:
        await ask(
            url, QUESTION, stream=STREAM, request_id=request_id, since="-20s", max_new_tokens=4,
            timeout_s=ANSWER_TIMEOUT_S, deadline_s=ANSWER_TIMEOUT_S,
        )  # fmt: skip
    except FlashwatchError as exc:
        requests.outcome[request_id] = getattr(exc, "code", None) or type(exc).__name__
        if requests.outcome[request_id] in ("timeout", "QueryTimeout"):
            requests.outcome[request_id] = "lost"
        return
    requests.outcome[request_id] = "final"
    requests.latency_s[request_id] = time.monotonic() - requests.sent[request_id]


async def send_until(url: str, requests: Requests, stop: asyncio.Event, tasks: set[Any]) -> None:
    while not stop.is_set():
        task = asyncio.create_task(one_request(url, requests))
        tasks.add(task)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SEND_EVERY_S)


async def count_finals(url: str, finals: Counter[str], ready: asyncio.Event) -> None:
    """Count every final event published on any reply channel, per request id."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe(f"{KEYS.prefix}:reply:*")
    ready.set()
    try:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if not message:
                continue
            with contextlib.suppress(ValueError, TypeError):
                event = json.loads(message["data"])
                if isinstance(event, dict) and event.get("type") == "final":
                    finals[str(event.get("id"))] += 1
    finally:
        await pubsub.aclose()
        await client.aclose()


async def owner_of(client: aioredis.Redis) -> tuple[str, int] | None:
    lease = (await read_leases(client, KEYS, [STREAM])).get(STREAM)
    return None if lease is None else (lease.daemon_id, lease.fence)


async def wait(predicate: Any, timeout_s: float, what: str, every_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(every_s)
    raise SystemExit(f"timed out after {timeout_s:g} s waiting for {what}")


async def run(kills: int, lease_ttl_s: float) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="fleet-failover-") as tmp,
        private_redis(Path(tmp)) as url,
    ):
        workdir = Path(tmp)
        args = (
            "--set", f"fleet.lease_ttl_s={lease_ttl_s}",
            "--set", "redis.lock_ttl_s=3",
            "--set", f"memory.snapshot_dir={workdir / 'snapshots'}",
            "--set", "memory.snapshot_interval_s=1",
            "--set", "query.claim_idle_s=3",
        )  # fmt: skip
        daemons = {d: Daemon(d, workdir, url, args) for d in ("a", "b")}
        client = aioredis.Redis.from_url(url, decode_responses=True)
        finals: Counter[str] = Counter()
        ready = asyncio.Event()
        monitor = asyncio.create_task(count_finals(url, finals, ready))
        await ready.wait()
        rounds: list[dict[str, Any]] = []
        try:
            daemons["a"].start()
            await wait(lambda: owner_of(client), 120, "daemon a to own the stream", 0.5)
            daemons["b"].start()
            standby = daemons["b"].standing_by
            await wait(lambda: asyncio.to_thread(standby), 120, "b to stand by", 0.5)
            for _ in range(kills):
                rounds.append(await one_round(client, url, daemons, finals))
        finally:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
            await client.aclose()
            for daemon in daemons.values():
                daemon.stop()
    return summarize(rounds, kills, lease_ttl_s)


async def one_round(
    client: aioredis.Redis, url: str, daemons: dict[str, Daemon], finals: Counter[str]
) -> dict[str, Any]:
    owned = await owner_of(client)
    assert owned is not None
    owner_id, fence = owned
    owner = daemons[owner_id]
    survivor = daemons["b" if owner_id == "a" else "a"]
    tasks: set[Any] = set()
    baseline, failover = Requests(), Requests()

    stop = asyncio.Event()
    sender = asyncio.create_task(send_until(url, baseline, stop, tasks))
    await asyncio.sleep(BASELINE_S)
    stop.set()
    await sender

    stop = asyncio.Event()
    sender = asyncio.create_task(send_until(url, failover, stop, tasks))
    killed_at = time.monotonic()
    owner.stop(signal.SIGKILL)

    async def moved() -> Any:
        now = await owner_of(client)
        return now is not None and now[0] == survivor.daemon_id

    await wait(moved, 60, "the lease to move")
    lease_moved_s = time.monotonic() - killed_at
    new = await owner_of(client)

    async def live() -> bool:
        clips = await asyncio.to_thread(survivor.clips)
        return clips is not None and clips >= 1

    await wait(live, 60, "the stream to be live on the survivor", 0.1)
    live_s = time.monotonic() - killed_at
    await asyncio.sleep(AFTER_LIVE_S)
    stop.set()
    await sender
    owner.start()  # it comes back as the standby
    await wait(lambda: asyncio.to_thread(owner.standing_by), 120, "the restarted daemon", 0.5)
    if tasks:
        await asyncio.wait(tasks, timeout=ANSWER_TIMEOUT_S + 10)
    await asyncio.sleep(1.0)  # late duplicates, if any
    return {
        "killed": owner_id,
        "fence_before": fence,
        "fence_after": None if new is None else new[1],
        "lease_moved_s": lease_moved_s,
        "live_again_s": live_s,
        "baseline": baseline.summary(finals),
        "during_failover": failover.summary(finals),
    }


def summarize(rounds: list[dict[str, Any]], kills: int, lease_ttl_s: float) -> dict[str, Any]:
    def total(phase: str, key: str) -> int:
        return sum(int(r[phase][key]) for r in rounds)

    errors: Counter[str] = Counter()
    for r in rounds:
        errors.update(r["during_failover"]["errors"])
    live = [r["live_again_s"] for r in rounds]
    moved = [r["lease_moved_s"] for r in rounds]
    sent_failover = total("during_failover", "sent")
    answered_failover = total("during_failover", "answered")
    sent_base = total("baseline", "sent")
    latency = {
        phase: median(p50s) if (p50s := [r[phase]["latency_p50_s"] for r in rounds
                                         if r[phase]["latency_p50_s"] is not None]) else None
        for phase in ("baseline", "during_failover")
    }  # fmt: skip
    answered_base = total("baseline", "answered")
    return {
        "benchmark": "fleet_failover",
        "setup": "2 flashwatch daemons (built-in demo, tiny model, placement static, same "
        "stream), one redis-server, one shared snapshot folder; SIGKILL of the owner",
        "kills": kills,
        "lease_ttl_s": lease_ttl_s,
        "request_every_s": SEND_EVERY_S,
        "routing": "shared requests stream, one consumer group; each request routed to its "
        "stream's owner, a request without a live owner waits up to fleet.owner_wait_s",
        "lease_moved_s_median": median(moved) if moved else None,
        "live_again_s_median": median(live) if live else None,
        "live_again_over_lease_ttl": ratio(median(live) if live else None, lease_ttl_s),
        "baseline": {
            "sent": sent_base,
            "answered": answered_base,
            "answered_twice": total("baseline", "answered_twice"),
            "lost": total("baseline", "lost"),
            "latency_p50_s": latency["baseline"],
        },
        "during_failover": {
            "sent": sent_failover,
            "answered": answered_failover,
            "answered_twice": total("during_failover", "answered_twice"),
            "lost": total("during_failover", "lost"),
            "errors": dict(errors),
            "latency_p50_s": latency["during_failover"],
            "latency_max_s": max(
                (r["during_failover"]["latency_max_s"] or 0.0 for r in rounds), default=None
            ),
        },
        "latency_p50_failover_over_baseline": ratio(
            latency["during_failover"], latency["baseline"]
        ),
        "answered_ratio_failover_over_baseline": ratio(
            ratio(answered_failover, sent_failover), ratio(answered_base, sent_base)
        ),
        "rounds": rounds,
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs of the owner")
    parser.add_argument("--lease-ttl", type=float, default=3.0, help="fleet.lease_ttl_s")
    options = parser.parse_args()
    result = asyncio.run(run(options.kills, options.lease_ttl))
    path = write_result("fleet_failover", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rounds", "machine")},
                     indent=1))  # fmt: skip
    print(f"written to {path}")


if __name__ == "__main__":
    main()
