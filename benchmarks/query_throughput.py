"""Requests per second for short answers with 1, 2, 4 and 8 concurrent clients, end to end.

The whole daemon runs as a subprocess (``flashwatch serve --no-tui``: the built-in demo, i.e. a
synthetic 2 fps stream being encoded all the time and the tiny model, with
``query.max_in_flight=4`` and ``query.max_queued=64``) against a private redis-server started
here (free loopback port, no persistence). Once the memory holds clips, N asyncio clients in
this process each call ``sinks.client.ask(url, question, since="-20s", max_new_tokens=4)`` in a
loop (durable path: request stream, reply channel; a fixed 20 s window so the answer's cost does
not grow with the memory during the run). Levels run for ``--seconds`` each, in the order
1, 2, 4, 8, 8, 4, 2, 1 so drift and load from other processes hit every level alike.

Reported per level: completed requests per second (answers finished inside the window over the
window), client round-trip latency p50/p95, the daemon's own ``latency_s`` (receipt to final
token) p50, errors; and requests/s relative to 1 client (the baseline, same run).

    python benchmarks/query_throughput.py [--seconds 6] [--levels 1,2,4,8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _query_common import (
    MemoryReplies,
    ask_engine,
    machine,
    median,
    private_redis,
    random_clip_tokens,
    ratio,
    running,
    summary,
    write_result,
)

from memory.bank import MemoryBank
from memory.settings import MemorySettings
from model.errors import FlashwatchError
from model.loader import load_model
from sinks.client import ask, fetch_status
from sinks.settings import QuerySettings
from streamer.app.config import FlashwatchConfig
from streamer.engine.core import Engine
from streamer.engine.settings import EngineSettings

FLASHWATCH = str(Path(sys.executable).parent / "flashwatch")
QUESTION = "What is moving?"
# Each question reads the last 20 s (10 clips, 640 visual tokens), so the cost of an answer does
# not grow with the demo's memory during the run; the run starts once 20 s are in memory.
SINCE = "-20s"
WARM_CLIPS = 12


def start_daemon(url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHWATCH_")}
    env["FLASHWATCH_STATE_DIR"] = str(workdir / "state")
    env["PYTHONUNBUFFERED"] = "1"
    env["FLASHWATCH_HTTP_PORT"] = "0"  # never collide with another daemon on this host
    log_path = workdir / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [FLASHWATCH, "serve", "--no-tui", "--redis-url", url,
             "--set", "query.max_in_flight=4", "--set", "query.max_queued=64"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return proc, log_path


def stop_daemon(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


async def wait_for_clips(
    url: str, proc: subprocess.Popen[bytes], clips: int, timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited early with code {proc.returncode}")
        try:
            status = await fetch_status(url, once=True, timeout_s=2.0)
        except FlashwatchError:
            status = None
        stream = status["streams"][0] if status and status["streams"] else None
        if stream is not None and stream["clips"] >= clips and stream["memory"]["tokens"] > 0:
            assert status is not None
            return status
        await asyncio.sleep(0.5)
    raise SystemExit(f"no {clips} encoded clips within {timeout_s:g} s")


async def run_level(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` loops of ask() for ``seconds``; requests finishing inside the window count."""
    start = time.perf_counter()
    end = start + seconds
    round_trips: list[float] = []
    daemon_latency: list[float] = []
    frames: list[int] = []
    in_flight: list[int] = []
    pending: list[int] = []
    late = 0
    errors: dict[str, int] = {}

    async def sampler() -> None:  # the daemon's own view of its queue (published each second)
        while time.perf_counter() < end:
            await asyncio.sleep(0.5)
            try:
                queries = (await fetch_status(url, once=True, timeout_s=2.0))["queries"]
            except FlashwatchError:
                continue  # a missed sample; the clients' numbers do not depend on it
            in_flight.append(int(queries["in_flight"]))
            pending.append(int(queries["pending"]))

    async def client() -> None:
        nonlocal late
        while time.perf_counter() < end:
            asked = time.perf_counter()
            try:
                answer = await ask(url, QUESTION, since=SINCE, max_new_tokens=4, timeout_s=60.0)
            except FlashwatchError as exc:
                name = getattr(exc, "code", type(exc).__name__)
                errors[name] = errors.get(name, 0) + 1
                await asyncio.sleep(0.1)  # do not spin on a refusing daemon
                continue
            done = time.perf_counter()
            if done > end:
                late += 1  # finished after the window: not counted
                continue
            round_trips.append(done - asked)
            daemon_latency.append(float(answer["latency_s"]))
            frames.append(int(answer["frames"]))

    await asyncio.gather(sampler(), *(client() for _ in range(clients)))
    completed = len(round_trips)
    return {
        "clients": clients,
        "seconds": seconds,
        "completed": completed,
        "requests_per_s": completed / seconds,
        "round_trip_s": summary(round_trips),
        "daemon_latency_s": summary(daemon_latency),
        "frames_read": summary(frames),
        "daemon_in_flight_max": max(in_flight, default=None),
        "daemon_pending_max": max(pending, default=None),
        "finished_after_window": late,
        "errors": errors,
    }


async def engine_only(clients: int, seconds: float) -> dict[str, Any]:
    """The same questions to an in-process Engine (demo model, 10 clips of memory, no Redis):
    what the device thread alone sustains, to tell engine cost from the Redis round trips."""
    config = FlashwatchConfig()
    loaded = load_model(config.model)
    hidden = loaded.model.hidden_size
    bank = MemoryBank(
        MemorySettings(budget_mb=16.0),
        hidden_size=hidden,
        dtype=loaded.dtype,
        device=loaded.device,
        fingerprint=loaded.fingerprint,
    )
    bank.add_stream("cam")
    rng = np.random.default_rng(0)
    now = time.time()
    for i in range(10):  # 2 s clips ending now, as the demo's 2 fps stream makes them
        end = now - 2.0 * (9 - i)
        bank.append_clip("cam", random_clip_tokens(rng, hidden).to(loaded.dtype), end - 2.0, end)
    replies = MemoryReplies()
    settings = QuerySettings(max_in_flight=4, max_queued=64)
    engine = Engine(loaded, bank, replies, settings, EngineSettings(encode_batch_clips=8))
    latencies: list[float] = []
    async with running(engine):
        for _ in range(5):  # warm-up
            await ask_engine(engine, replies, QUESTION, now=time.time(), max_new_tokens=4)
        end = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < end:
                asked = time.perf_counter()
                await ask_engine(
                    engine, replies, QUESTION, now=time.time(), since=now - 20.0, max_new_tokens=4
                )
                if time.perf_counter() <= end:
                    latencies.append(time.perf_counter() - asked)

        await asyncio.gather(*(client() for _ in range(clients)))
    return {
        "clients": clients,
        "requests_per_s": len(latencies) / seconds,
        "latency_s": summary(latencies),
        "torch_threads": torch.get_num_threads(),
    }


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    in_process = [await engine_only(n, 4.0) for n in (1, 8)]
    for row in in_process:
        print(
            f"  in-process engine, {row['clients']} client(s): {row['requests_per_s']:.1f} req/s",
            flush=True,
        )
    with private_redis(workdir) as url:
        proc, log_path = start_daemon(url, workdir)
        try:
            started = time.perf_counter()
            status = await wait_for_clips(url, proc, clips=WARM_CLIPS, timeout_s=120.0)
            ready_s = time.perf_counter() - started
            print(f"  daemon ready in {ready_s:.1f} s", flush=True)
            await run_level(url, 1, 2.0)  # warm-up: connections, first answers (not recorded)
            order = [*args.levels, *reversed(args.levels)]
            levels: list[dict[str, Any]] = []
            for clients in order:
                level = await run_level(url, clients, args.seconds)
                levels.append(level)
                rt = level["round_trip_s"]
                print(
                    f"  {clients} client(s): {level['requests_per_s']:6.1f} req/s  "
                    f"p50 {rt['p50'] or 0:.3f} s  p95 {rt['p95'] or 0:.3f} s  "
                    f"errors {level['errors']}",
                    flush=True,
                )
            final = await fetch_status(url, once=False, timeout_s=5.0)
        finally:
            code = stop_daemon(proc)
        tail = log_path.read_text(errors="replace")[-2000:]
    return {
        "engine_only": in_process,
        "levels": levels,
        "ready_s": ready_s,
        "status_at_start": status["queries"],
        "status_at_end": {"queries": final["queries"], "encoder": final["encoder"]},
        "daemon_exit_code": code,
        "daemon_log_tail": tail if code != 0 or "Traceback" in tail else "",
    }


def tabulate(levels: list[dict[str, Any]], counts: list[int]) -> list[dict[str, Any]]:
    """Per client count: median req/s over its runs, latencies pooled by median of medians."""
    table: list[dict[str, Any]] = []
    for clients in counts:
        mine = [lv for lv in levels if lv["clients"] == clients]
        table.append(
            {
                "clients": clients,
                "requests_per_s": median([lv["requests_per_s"] for lv in mine]),
                "requests_per_s_runs": [lv["requests_per_s"] for lv in mine],
                "round_trip_p50_s": median([lv["round_trip_s"]["p50"] for lv in mine]),
                "round_trip_p95_s": median([lv["round_trip_s"]["p95"] for lv in mine]),
                "daemon_latency_p50_s": median([lv["daemon_latency_s"]["p50"] for lv in mine]),
                "daemon_in_flight_max": max(lv["daemon_in_flight_max"] or 0 for lv in mine),
                "daemon_pending_max": max(lv["daemon_pending_max"] or 0 for lv in mine),
                "errors": sum(sum(lv["errors"].values()) for lv in mine),
            }
        )
    base = table[0]["requests_per_s"]
    for row in table:
        row["ratio_vs_1_client"] = ratio(row["requests_per_s"], base)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per level and pass")
    parser.add_argument(
        "--levels",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2, 4, 8],
        help="concurrent clients, comma-separated; the first is the baseline",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flashwatch-bench-") as tmp:
        measured = asyncio.run(measure(args, Path(tmp)))
    table = tabulate(measured["levels"], args.levels)
    result = {
        "figure": "requests/s for short answers (max_new_tokens=4) vs concurrent clients",
        "daemon": "flashwatch serve (built-in demo, tiny model), max_in_flight=4, max_queued=64",
        "seconds_per_level_and_pass": args.seconds,
        "table": table,
        **measured,
        "wall_s": time.perf_counter() - started,
        "machine": machine(),
    }
    path = write_result("query_throughput", result)
    print(f"{'clients':>7} {'req/s':>7} {'x 1 client':>10} {'rt p50':>7} {'rt p95':>7} "
          f"{'daemon p50':>10} {'in flight':>9} {'errors':>6}")  # fmt: skip
    for row in table:
        print(
            f"{row['clients']:7d} {row['requests_per_s']:7.1f} {row['ratio_vs_1_client']:10.2f} "
            f"{row['round_trip_p50_s']:7.3f} {row['round_trip_p95_s']:7.3f} "
            f"{row['daemon_latency_p50_s']:10.3f} {row['daemon_in_flight_max']:9d} "
            f"{row['errors']:6d}"
        )
    print(f"wrote {path} in {result['wall_s']:.0f} s (daemon exit {measured['daemon_exit_code']})")


if __name__ == "__main__":
    main()
