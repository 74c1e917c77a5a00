"""Operating a running daemon over HTTP: metrics (promtool), probes, the /v1 API with SSE and a
bearer token, JSON logs, and SIGHUP reconfiguration. Real daemon, real redis-server, real
aiohttp client, all on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cli_harness import ServeProcess
from redis_harness import RedisServer
from scrape import probes_url, promtool, samples, value

pytestmark = pytest.mark.integration

WAIT_S = 90.0  # generous: the machine is shared
TOKEN = "s3cret-token-for-tests"


async def _until(predicate: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


async def _base_url(daemon: ServeProcess) -> str:
    url: str = await _until(lambda: probes_url(daemon.output()), "the HTTP server's URL in the log")
    return url


async def _get(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with session.get(url, **kw) as response:
        body = await response.read()
        kind = response.headers.get("Content-Type", "")
        return response.status, json.loads(body) if "json" in kind else body.decode()


async def test_metrics_pass_promtool_and_move_with_clips_queries_and_a_failed_stream(
    serve: Callable[..., ServeProcess], redis_server: str
) -> None:
    daemon = serve("--redis-url", redis_server, "--source", "broken=testsrc://?size=bogus")
    base = await _base_url(daemon)
    async with aiohttp.ClientSession() as session:

        async def scrape() -> dict[Any, float]:
            status, text = await _get(session, f"{base}/metrics")
            assert status == 200
            return samples(text)

        async def clips_at_least(n: int) -> dict[Any, float] | None:
            found = await scrape()
            return found if value(found, "flashwatch_encoder_clips_total") >= n else None

        before = await _until(lambda: clips_at_least(1), "a first encoded clip")
        _, text = await _get(session, f"{base}/metrics")
        checked = promtool(text)
        problems = checked.stdout + checked.stderr
        assert checked.returncode == 0 and not checked.stdout.strip(), problems

        assert value(before, "flashwatch_stream_state", stream="broken", state="failed") == 1
        assert value(before, "flashwatch_stream_state", stream="demo", state="failed") == 0
        answered = value(before, "flashwatch_queries_total", outcome="answered")
        count = value(before, "flashwatch_query_latency_seconds_count")

        ask = {"question": "What moves?", "max_new_tokens": 4, "stream": "demo"}
        async with session.post(f"{base}/v1/ask", json=ask) as response:
            assert response.status == 200, await response.text()
        async with session.post(f"{base}/v1/ask", json={**ask, "stream": "broken"}) as response:
            assert response.status == 409  # a failed stream has nothing in memory
            assert (await response.json())["code"] == "empty_memory"

        after = await _until(
            lambda: clips_at_least(value(before, "flashwatch_encoder_clips_total") + 1),
            "another encoded clip",
        )
        assert value(after, "flashwatch_stream_clips_total", stream="demo") > value(
            before, "flashwatch_stream_clips_total", stream="demo"
        )
        assert value(after, "flashwatch_queries_total", outcome="answered") == answered + 1
        assert value(after, "flashwatch_query_errors_total", code="empty_memory") == 1
        assert value(after, "flashwatch_query_latency_seconds_count") == count + 1  # answered
        assert value(after, "flashwatch_memory_tokens", stream="demo") > 0
        assert value(after, "flashwatch_redis_up") == 1
    assert daemon.terminate() == 0, daemon.output()[-3000:]


async def test_sse_answers_need_the_bearer_token_and_the_api_matches_its_document(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str]
) -> None:
    env = dict(cli_env, FLASHWATCH_HTTP_TOKEN=TOKEN)
    daemon = serve("--redis-url", redis_server, env=env)
    base = await _base_url(daemon)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            for path in ("/v1/status", "/metrics", "/v1/openapi.json"):
                status, body = await _get(session, base + path, headers=headers)
                assert status == 401, (path, headers, body)
            async with session.post(f"{base}/v1/ask", json={"question": "x"}, headers=headers) as r:
                assert r.status == 401
        status, _ = await _get(session, f"{base}/healthz")  # probes stay open
        assert status == 200

        async def has_memory() -> bool:
            status, body = await _get(session, f"{base}/v1/status", headers=auth)
            return status == 200 and (body["streams"][0]["memory"] or {}).get("tokens", 0) > 0

        await _until(has_memory, "memory to hold a clip")
        ask = {"id": "sse-1", "question": "What is on screen?", "max_new_tokens": 6,
               "stream": True}  # fmt: skip
        events: list[tuple[str, dict[str, Any]]] = []
        async with session.post(f"{base}/v1/ask", json=ask, headers=auth) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            kind = ""
            async for raw in response.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line.removeprefix("data: "))))
        kinds = [kind for kind, _ in events]
        assert kinds[-1] == "final" and kinds.count("final") == 1, kinds
        assert kinds[:-1] and set(kinds[:-1]) == {"token"}, "tokens come before the answer"
        final = events[-1][1]
        assert final["id"] == "sse-1" and final["tokens"] >= 1 and final["evidence"]
        text = "".join(event["text"] for kind, event in events if kind == "token")
        assert text == final["answer"]

        status, stored = await _get(session, f"{base}/v1/answers/sse-1", headers=auth)
        assert status == 200 and stored["answer"] == final["answer"]
        status, missing = await _get(session, f"{base}/v1/answers/nope", headers=auth)
        assert status == 404 and missing["code"] == "not_found"
        async with session.post(f"{base}/v1/ask", json={"question": ""}, headers=auth) as r:
            assert r.status == 400 and (await r.json())["code"] == "invalid_request"

        start, end = final["evidence"][0]["start"], final["evidence"][0]["end"]
        forget = {"stream": "demo", "since": start, "until": end}
        async with session.post(f"{base}/v1/forget", json=forget, headers=auth) as r:
            assert r.status == 200
            assert (await r.json())["forgotten"] == {"stream": "demo", "start": start, "end": end}

        status, document = await _get(session, f"{base}/v1/openapi.json", headers=auth)
        assert status == 200 and document["openapi"].startswith("3.")
        for path, methods in document["paths"].items():
            for method in methods:
                if "{" in path or method != "get":
                    continue
                status, _ = await _get(session, base + path, headers=auth)
                assert status == 200, f"documented GET {path} answers {status}"
    assert daemon.terminate() == 0, daemon.output()[-3000:]
    assert TOKEN not in daemon.output()


async def test_readyz_is_503_while_redis_is_down_and_200_again_after(
    serve: Callable[..., ServeProcess], redis_server_handle: RedisServer
) -> None:
    daemon = serve("--redis-url", redis_server_handle.url, "--set", "redis.backoff_max_s=1")
    base = await _base_url(daemon)
    async with aiohttp.ClientSession() as session:

        async def ready_is(expected: int) -> bool:
            status, _ = await _get(session, f"{base}/readyz")
            return status == expected

        async def has_memory() -> bool:
            status, body = await _get(session, f"{base}/v1/status")
            return status == 200 and (body["streams"][0]["memory"] or {}).get("tokens", 0) > 0

        await _until(lambda: ready_is(200), "ready")
        await _until(has_memory, "a clip in memory")
        redis_server_handle.stop()
        await _until(lambda: ready_is(503), "not ready while Redis is down")
        status, body = await _get(session, f"{base}/readyz")
        assert body == {"ready": False, "model_loaded": True, "redis": False, "streams_up": 1}
        status, _ = await _get(session, f"{base}/healthz")
        assert status == 200  # alive all the same
        ask = {"question": "Still there?", "max_new_tokens": 2}
        async with session.post(f"{base}/v1/ask", json=ask) as response:
            assert response.status == 200, "HTTP questions need no Redis"
        redis_server_handle.start()
        await _until(lambda: ready_is(200), "ready again once Redis is back")
    assert daemon.terminate() == 0, daemon.output()[-3000:]


def _write_config(
    path: Path, snapshots: Path, names: list[str], fps: float = 2.0, **more: Any
) -> None:
    streams = [{"name": n, "url": "testsrc://?size=160x120&fps=10", "fps": fps} for n in names]
    memory = {"budget_mb": 16.0, "snapshot_dir": str(snapshots)}
    path.write_text(yaml.safe_dump({"streams": streams, "memory": memory, **more}))


async def test_sighup_adds_and_removes_streams_without_touching_the_others(
    serve: Callable[..., ServeProcess], redis_server: str, tmp_path: Path
) -> None:
    config, snapshots = tmp_path / "site.yaml", tmp_path / "snapshots"
    _write_config(config, snapshots, ["keep", "drop"])
    daemon = serve("--config", str(config), "--redis-url", redis_server, "--log-format", "json")
    base = await _base_url(daemon)
    async with aiohttp.ClientSession() as session:

        async def status() -> dict[str, Any]:
            code, body = await _get(session, f"{base}/v1/status")
            return {s["name"]: s for s in body["streams"]} if code == 200 else {}  # 503: starting

        async def clips(name: str, n: int) -> bool:
            stream = (await status()).get(name)
            return (
                stream is not None
                and (stream["memory"] or {}).get("tokens", 0) > 0
                and (stream["clips"] >= n)
            )

        await _until(lambda: clips("keep", 2), "clips of keep")
        await _until(lambda: clips("drop", 1), "clips of drop")
        kept_before = (await status())["keep"]
        _write_config(config, snapshots, ["keep", "new"])
        daemon.proc.send_signal(signal.SIGHUP)
        await _until(lambda: clips("new", 1), "the added stream to go live and encode")
        streams = await status()
        assert "drop" not in streams
        assert streams["new"]["state"] == "live"
        assert (snapshots / "drop.fwmem" / "manifest.json").is_file(), (
            "the removed stream's memory is on disk"
        )
        await _until(lambda: clips("keep", kept_before["clips"] + 1), "keep to go on encoding")
        keep = (await status())["keep"]
        assert keep["state"] == "live" and keep["reconnects"] == 0
        assert keep["gaps"] == [], "the untouched stream has no gap"

        async with session.post(f"{base}/v1/config/reload") as response:
            raw = await response.text()
            assert response.status == 200, (raw, daemon.output()[-4000:])
            report = json.loads(raw)
        assert report["ok"] is True
        assert report["streams"] == {"added": [], "removed": [], "changed": [], "failed": {}}

        dropped_at = time.time()
        _write_config(config, snapshots, ["keep", "new", "drop"], fps=1.0,
                      query={"max_queued": 3})  # fmt: skip
        async with session.post(f"{base}/v1/config/reload") as response:
            report = await response.json()
        assert report["streams"]["changed"] == ["keep", "new"]
        assert report["streams"]["added"] == ["drop"]
        assert report["needs_restart"] == ["query"]
        back = (await status())["drop"]["memory"]
        assert back["tokens"] > 0 and back["span"][0] < dropped_at, "its snapshot is restored"
        config.write_text("streams: [{name: x, url: testsrc://, bogus: 1}]\n")
        async with session.post(f"{base}/v1/config/reload") as response:
            report = await response.json()
        assert report["ok"] is False and "bogus: unknown key" in report["error"]
        clips_now = (await status())["new"]["clips"]
        await _until(lambda: clips("new", clips_now + 1), "the changed stream to go on")

    assert daemon.terminate() == 0, daemon.output()[-3000:]
    lines = [json.loads(line) for line in daemon.output().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line.get("stream") == "new" for line in lines), "ingest lines name their stream"
    assert any("reload" in line["message"] and "added" in line["message"] for line in lines)


async def test_systemd_hears_ready_and_a_fed_watchdog(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        env = dict(cli_env, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="1000000")
        daemon = serve("--redis-url", redis_server, env=env)
        loop = asyncio.get_running_loop()
        messages: list[bytes] = []

        async def heard(wanted: bytes) -> bool:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    messages.append(await loop.sock_recv(sock, 4096))
            return any(m.startswith(wanted) for m in messages)

        await _until(lambda: heard(b"READY=1"), "READY=1")
        await _until(lambda: heard(b"WATCHDOG=1"), "WATCHDOG=1")
        fed = messages.count(b"WATCHDOG=1")

        async def fed_again() -> bool:
            await heard(b"WATCHDOG=1")
            return messages.count(b"WATCHDOG=1") > fed

        await _until(fed_again, "the watchdog fed again")
        assert daemon.terminate() == 0, daemon.output()[-3000:]
        await _until(lambda: heard(b"STOPPING=1"), "STOPPING=1", timeout_s=10)
