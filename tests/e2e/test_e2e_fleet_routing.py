"""Two real daemons on one redis-server, disjoint streams: questions reach their owners.

Ownership comes from each daemon's leases (sinks.fleet); a third daemon's presence, without a
lease, stands for a stream being adopted. Waits are bounded; nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from cli_harness import ServeProcess, run_cli, wait_for

from sinks.client import ask
from sinks.fleet.records import DaemonRecord
from sinks.settings import Keys

pytestmark = pytest.mark.integration
KEYS = Keys()
WAIT_S = 90.0


def _config(path: Path, daemon_id: str, stream: str) -> Path:
    config = {
        "streams": [{"name": stream, "url": "testsrc://?size=160x120&fps=10", "fps": 2.0}],
        "memory": {"budget_mb": 8.0},
        "fleet": {"daemon_id": daemon_id, "lease_ttl_s": 4.0, "owner_wait_s": 2.0},
        "query": {"claim_idle_s": 2.0, "consumer_name": daemon_id},
        "status": {"publish_interval_s": 1.0},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _start_pair(
    serve: Callable[..., ServeProcess], url: str, tmp_path: Path, env: dict[str, str]
) -> tuple[ServeProcess, ServeProcess]:
    first = serve("--config", str(_config(tmp_path / "a.yaml", "a", "cama")), "--redis-url", url)
    second = serve("--config", str(_config(tmp_path / "b.yaml", "b", "camb")), "--redis-url", url)
    client = redis.Redis.from_url(url, decode_responses=True)

    def owned() -> bool:
        return all(client.exists(KEYS.lease(name)) for name in ("cama", "camb"))

    wait_for(owned, WAIT_S, "both daemons to own their streams")
    for name in ("cama", "camb"):  # until each owner has memory to answer from
        wait_for(lambda n=name: _answered(url, n, env), WAIT_S, f"a first answer about {name}")
    client.close()
    return first, second


def _answered(url: str, stream: str, env: dict[str, str]) -> bool:
    result = run_cli("ask", "--json", "--redis-url", url, "--stream", stream,
                     "--max-new-tokens", "2", "--timeout", "20", "What?", env=env)  # fmt: skip
    return result.returncode == 0


def _answerers(final: dict[str, Any]) -> dict[str, str | None]:
    """stream -> daemon that answered it (a section's owner, else the lone answerer)."""
    if final.get("sections"):
        return {name: s["daemon"] for s in final["sections"] for name in s["stream"]}
    return {name: final["daemon"] for name in final["stream"]}


def test_questions_reach_their_owners_and_star_is_merged(
    serve: Callable[..., ServeProcess], redis_server: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    env = cli_env
    first, second = _start_pair(serve, redis_server, tmp_path, env)
    client = redis.Redis.from_url(redis_server, decode_responses=True)

    async def questions() -> None:
        for _ in range(3):  # whichever daemon reads it, the owner answers
            for name, owner in (("cama", "a"), ("camb", "b")):
                final = await ask(redis_server, "What?", stream=name, max_new_tokens=2)
                assert _answerers(final) == {name: owner}, final
        merged = await ask(redis_server, "What?", stream="*", max_new_tokens=2)
        assert _answerers(merged) == {"cama": "a", "camb": "b"}, merged
        starts = [span["start"] for span in merged["evidence"]]
        assert starts == sorted(starts) and {s["stream"] for s in merged["evidence"]} == {
            "cama", "camb"
        }  # fmt: skip

        now = time.time()  # a daemon that may serve camc and holds no lease on it (yet)
        record = DaemonRecord("c", "host", 1, now, now + 120, serves=("camc",))
        client.hset(KEYS.daemons, "c", record.to_json())
        named = await ask(redis_server, "What?", stream=["cama", "camc"], max_new_tokens=2)
        sections = {tuple(s["stream"]): s for s in named["sections"]}
        assert sections[("camc",)]["error"] == "no_owner" and sections[("cama",)]["daemon"] == "a"
        assert any(g["stream"] == "camc" and g["reason"] == "no_owner" for g in named["gaps"])

    asyncio.run(questions())
    verbose = run_cli("ask", "--verbose", "--redis-url", redis_server, "--stream", "*",
                      "--max-new-tokens", "2", "What?", env=env)  # fmt: skip
    assert verbose.returncode == 0, verbose.stderr
    assert "[cama]" in verbose.stdout and "[camb]" in verbose.stdout, verbose.stdout
    assert "stream cama: a" in verbose.stderr, verbose.stderr
    assert "stream camc: no live owner" in verbose.stderr, verbose.stderr

    def routing() -> dict[str, int] | None:  # what both coordinators counted, from status
        counted: dict[str, int] = {}
        for daemon_id in ("a", "b"):
            raw = client.get(KEYS.status_of(daemon_id))
            if raw is None:
                return None
            for event, n in json.loads(raw)["fleet"]["routing"].items():
                counted[event] = counted.get(event, 0) + n
        settled = counted.get("no_owner", 0) >= 2 and counted["delivered"] >= 3
        return counted if settled and counted["delivered"] == counted["coordinated"] else None

    # *, [cama, camc] and the verbose * were coordinated (camc twice without an owner), and
    # each coordinated request was delivered once, by its coordinator
    counted = wait_for(routing, WAIT_S, "the routing counters in both daemons' status")
    assert counted["duplicates"] == 0, counted
    client.close()
    assert first.terminate() == 0, first.output()[-3000:]
    assert second.terminate() == 0, second.output()[-3000:]


def test_killing_the_coordinator_mid_request_gives_one_final_each(
    serve: Callable[..., ServeProcess], redis_server: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    survivor, victim = _start_pair(serve, redis_server, tmp_path, cli_env)
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    finals: dict[str, list[str]] = {}
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.psubscribe(KEYS.reply("*"))
    ids = [f"kill-{index}" for index in range(6)]
    # The survivor paused: the victim reads every request and coordinates it, and its parts
    # for cama cannot be answered yet, so the kill lands mid-request.
    survivor.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.3)  # past the intake's XREADGROUP BLOCK: the stopped one's read returned
        for request_id in ids:  # both streams: routed
            request = {"v": 1, "id": request_id, "stream": ["cama", "camb"], "question": "What?",
                       "max_new_tokens": 8, "deadline_s": 60}  # fmt: skip
            client.xadd(KEYS.requests, {"request": json.dumps(request)})

        def held_by_victim() -> int:
            # The paused daemon's XREADGROUP, blocked when it stopped, may still get one entry.
            summary = client.xpending(KEYS.requests, "flashwatch")
            held = {c["name"]: c["pending"] for c in summary["consumers"]}.get("b", 0)
            return held if summary["pending"] == len(ids) and held >= len(ids) - 1 else 0

        victim_held = wait_for(held_by_victim, WAIT_S, "the victim to read the requests")
        wait_for(lambda: client.xlen(KEYS.inbox("a")) >= victim_held, WAIT_S, "parts sent to a")
        victim.terminate(signal.SIGKILL)
    finally:
        survivor.proc.send_signal(signal.SIGCONT)

    def all_answered() -> bool:
        while (message := listener.get_message(timeout=0.05)) is not None:
            event = json.loads(message["data"])
            if event.get("type") in ("final", "error"):
                finals.setdefault(event["id"], []).append(event["type"])
        return all(client.exists(KEYS.answer(request_id)) for request_id in ids)

    wait_for(all_answered, WAIT_S, "every request to be answered after the kill")
    wait_for(lambda: client.xpending(KEYS.requests, "flashwatch")["pending"] == 0, WAIT_S,
             "no request entry left pending")  # fmt: skip
    time.sleep(1.0)
    all_answered()  # late duplicates, if any, would show now
    for request_id in ids:
        event = json.loads(client.get(KEYS.answer(request_id)))
        assert event["type"] == "final", event
        assert finals.get(request_id) == ["final"], finals
        owners = _answerers(event)
        assert owners.get("cama") == "a", event  # the survivor's own stream always answered
    assert survivor.output().count("claimed request entry") >= victim_held, survivor.output()
    inbox = KEYS.inbox("a")
    wait_for(lambda: client.xpending(inbox, "flashwatch")["pending"] == 0, WAIT_S,
             "nothing pending in the survivor's inbox")  # fmt: skip
    listener.close()
    client.close()
    assert survivor.terminate() == 0, survivor.output()[-3000:]
