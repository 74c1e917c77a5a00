"""Latency of questions answered locally vs routed to another daemon vs merged over two, and
exactly one final per request after coordinator kills.

Two real daemons (``flashwatch serve --no-tui``, the tiny demo model, one testsrc stream each:
``a`` owns ``cama``, ``b`` owns ``camb``) share a private redis-server started here. Questions
go through ``sinks.client.ask`` on the shared request stream; whichever daemon reads one
coordinates it, so a one-stream question is answered locally (its reader owns the stream: no
sections in the answer) or routed (one section, from the other daemon). The baseline is the
local answers of the same run; ``*`` questions are merged over both owners.

Kills: per round, daemon ``a`` is paused (SIGSTOP) while a question over both streams is sent,
``b`` reads and coordinates it, ``b`` is SIGKILLed mid-request, ``a`` resumes, claims the entry
and coordinates it again. Every final event published is counted (PSUBSCRIBE on the reply
channels): answered once / lost / answered twice. ``b`` is restarted after each round.

    python benchmarks/fleet_routing.py [--questions 20] [--kills 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import yaml
from _query_common import machine, private_redis, ratio, summary, write_result

from model.errors import FlashwatchError
from sinks.client import ask
from sinks.settings import Keys

FLASHWATCH = str(Path(sys.executable).parent / "flashwatch")
KEYS = Keys()
QUESTION = "What is moving?"
WAIT_S = 120.0
STREAMS = {"a": "cama", "b": "camb"}
BLOCKED_READ_S = 1.3  # past sinks.intake.BLOCK_MS: a stopped reader's last read has returned


def start_daemon(url: str, workdir: Path, daemon_id: str) -> subprocess.Popen[bytes]:
    config = workdir / f"{daemon_id}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "streams": [
                    {
                        "name": STREAMS[daemon_id],
                        "url": "testsrc://?size=160x120&fps=10",
                        "fps": 2.0,
                    }
                ],
                "memory": {"budget_mb": 8.0},
                "fleet": {"daemon_id": daemon_id, "lease_ttl_s": 4.0, "owner_wait_s": 2.0},
                "query": {"claim_idle_s": 2.0, "consumer_name": daemon_id},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHWATCH_")}
    env.update(FLASHWATCH_STATE_DIR=str(workdir / "state"), PYTHONUNBUFFERED="1")
    env["FLASHWATCH_HTTP_PORT"] = "0"
    with (workdir / f"{daemon_id}.log").open("ab") as log:
        return subprocess.Popen(
            [FLASHWATCH, "serve", "--no-tui", "--config", str(config), "--redis-url", url],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def until_answered(url: str, stream: str) -> None:
    """Until the owner of ``stream`` has memory to answer from."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            await ask(url, QUESTION, stream=stream, max_new_tokens=2, timeout_s=20)
            return
        except FlashwatchError:
            await asyncio.sleep(0.5)
    raise SystemExit(f"no answer about {stream} within {WAIT_S:g} s")


async def latencies(url: str, questions: int) -> dict[str, list[float]]:
    """Client round trips, seconds, by kind: local, routed (one stream), merged (``*``)."""
    kinds: dict[str, list[float]] = {"local": [], "routed": [], "merged": []}
    for index in range(questions):
        stream = STREAMS["a" if index % 2 == 0 else "b"]
        for target in (stream, "*"):
            started = time.perf_counter()
            final = await ask(url, QUESTION, stream=target, max_new_tokens=4, since="-20s")
            elapsed = time.perf_counter() - started
            if target == "*":
                kinds["merged"].append(elapsed)
            else:
                kinds["routed" if final.get("sections") else "local"].append(elapsed)
    return kinds


def kill_round(
    url: str, client: redis.Redis, daemons: dict[str, subprocess.Popen[bytes]], index: int
) -> tuple[str, bool]:
    """One coordinator kill: the id of the request sent during it, and whether ``b`` held it
    (were the paused daemon's blocked XREADGROUP still waiting, it would get the entry)."""
    request_id = f"bench-kill-{index}-{time.time_ns()}"
    request = {"v": 1, "id": request_id, "stream": ["cama", "camb"], "question": QUESTION,
               "max_new_tokens": 4, "deadline_s": 60}  # fmt: skip
    daemons["a"].send_signal(signal.SIGSTOP)
    try:
        time.sleep(BLOCKED_READ_S)  # a's XREADGROUP, blocked when it stopped, times out
        client.xadd(KEYS.requests, {"request": json.dumps(request)})
        deadline = time.monotonic() + WAIT_S
        held = False
        while time.monotonic() < deadline:
            summary = client.xpending(KEYS.requests, "flashwatch")
            held = {c["name"]: c["pending"] for c in summary["consumers"]}.get("b", 0) >= 1
            if summary["pending"] >= 1:
                break
            time.sleep(0.02)
        time.sleep(0.2)  # its parts are out: the kill lands mid-request
        daemons["b"].send_signal(signal.SIGKILL)
        daemons["b"].wait(timeout=10)
    finally:
        daemons["a"].send_signal(signal.SIGCONT)
    return request_id, held


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp)) as url:
        workdir = Path(tmp)
        daemons = {name: start_daemon(url, workdir, name) for name in STREAMS}
        try:
            for stream in STREAMS.values():
                await until_answered(url, stream)
            kinds = await latencies(url, args.questions)
            kills = await run_kills(url, workdir, daemons, args.kills)
        finally:
            for proc in daemons.values():
                stop_daemon(proc)
    stats = {kind: summary(values) for kind, values in kinds.items()}
    local = stats["local"]
    result: dict[str, Any] = {
        "benchmark": "fleet_routing",
        "questions": args.questions,
        "latency_s": stats,
        "ratio_p50_to_local": {
            kind: ratio(stats[kind]["p50"], local["p50"]) for kind in ("routed", "merged")
        },
        "ratio_p95_to_local": {
            kind: ratio(stats[kind]["p95"], local["p95"]) for kind in ("routed", "merged")
        },
        "kills": kills,
        "machine": machine(),
    }
    path = write_result("fleet_routing", result)
    print(json.dumps(result, indent=1))
    print(f"written to {path}")


async def run_kills(
    url: str, workdir: Path, daemons: dict[str, subprocess.Popen[bytes]], kills: int
) -> dict[str, Any]:
    client = redis.Redis.from_url(url, decode_responses=True)
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.psubscribe(KEYS.reply("*"))
    finals: dict[str, int] = {}
    sent: list[str] = []
    recovery_s: list[float] = []
    coordinator_killed = 0

    def drain() -> None:
        while (message := listener.get_message(timeout=0.01)) is not None:
            event = json.loads(message["data"])
            if event.get("type") in ("final", "error") and event.get("id") in sent:
                finals[event["id"]] = finals.get(event["id"], 0) + 1

    for index in range(kills):
        started = time.monotonic()
        request_id, held = kill_round(url, client, daemons, index)
        sent.append(request_id)
        coordinator_killed += held
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not client.exists(KEYS.answer(request_id)):
            drain()
        recovery_s.append(time.monotonic() - started)
        daemons["b"] = start_daemon(url, workdir, "b")
        await until_answered(url, "camb")
        drain()
    time.sleep(1.0)
    drain()
    pending = client.xpending(KEYS.requests, "flashwatch")["pending"]
    listener.close()
    client.close()
    return {
        "rounds": kills,
        "rounds_killing_the_coordinator": coordinator_killed,
        "answered_once": sum(1 for r in sent if finals.get(r) == 1),
        "lost": sum(1 for r in sent if not finals.get(r)),
        "answered_twice_or_more": sum(1 for r in sent if finals.get(r, 0) > 1),
        "left_pending": int(pending),
        "kill_to_final_s": summary(recovery_s),
    }


if __name__ == "__main__":
    asyncio.run(main())
