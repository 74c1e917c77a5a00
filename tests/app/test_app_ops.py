"""Fast tests of the operations layer: metrics rendering (promtool), the answer hub, reload
plans, the HTTP settings, the OpenAPI document against the routes, probes before start."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient, TestServer
from scrape import promtool, samples, value

from memory.frames import FrameStats
from model.errors import ConfigError
from sinks.metrics import (
    BATCH_BUCKETS_S,
    EncoderMetrics,
    Histogram,
    HistogramData,
    MetricsSnapshot,
    QueryMetrics,
    StreamMetrics,
    build_registry,
    render,
)
from sinks.schema import Answer, QueryRequest, QueryTicket
from sinks.settings import QuerySettings
from streamer.app.api.answers import AnswerHub
from streamer.app.api.openapi import openapi_document
from streamer.app.api.server import build_app
from streamer.app.config import FlashwatchConfig, load_config
from streamer.app.notify import SystemdNotifier
from streamer.app.ops import Operations, alert_metrics, frame_metrics
from streamer.app.ops_settings import HttpSettings, is_loopback
from streamer.app.reload import effective_config, plan_reload
from streamer.engine.errors import Busy, InvalidRequest, QueryTimeout
from streamer.ingest.settings import StreamSettings
from streamer.ingest.types import StreamState

REPO = Path(__file__).resolve().parents[2]


def _snapshot(clips: int = 3) -> MetricsSnapshot:
    batches = Histogram(BATCH_BUCKETS_S)
    batches.observe(0.02, times=clips)
    latency = Histogram((0.5, 1.0))
    latency.observe(0.7)
    return MetricsSnapshot(
        version="0.1.0", model="tiny", device="cpu", model_loaded=True, heartbeat_age_s=0.3,
        redis_up=False, status_skipped=4,
        streams=(
            StreamMetrics(name="cam1", state="live", frames_in=100, frames_sampled=20,
                          dropped={"queue_full": 2}, clips=clips, reconnects=1,
                          stalls_last_hour=0, gaps=1, memory_tokens=128, memory_fill=0.5),
            StreamMetrics(name="cam2", state="failed", frames_in=0, frames_sampled=0,
                          dropped={}, clips=0, reconnects=0, stalls_last_hour=0, gaps=0),
        ),
        encoder=EncoderMetrics(clips=clips, batches=clips, lag_s=0.1,
                               batch_seconds=batches.snapshot()),
        queries=QueryMetrics(answered=1, failed=2, errors={"busy": 1, "timeout": 1},
                             in_flight=0, queued=1, latency_seconds=latency.snapshot(),
                             ttft_seconds=HistogramData.empty((0.5,)),
                             intake={"received": 3}),
        snapshots_enabled=True, snapshot_last_success=1.7e9, snapshot_failures=0,
        snapshot_bytes_written=2048, reloads={"applied": 1},
    )  # fmt: skip


def test_rendered_metrics_pass_promtool_and_show_the_snapshot() -> None:
    text = render(build_registry(lambda: _snapshot(clips=3))).decode()
    checked = promtool(text)
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr
    found = samples(text)
    assert found[("flashwatch_stream_clips_total", (("stream", "cam1"),))] == 3
    assert found[("flashwatch_stream_state", (("state", "failed"), ("stream", "cam2")))] == 1
    assert found[("flashwatch_stream_state", (("state", "live"), ("stream", "cam2")))] == 0
    dropped = ("flashwatch_stream_dropped_total", (("reason", "queue_full"), ("stream", "cam1")))
    assert found[dropped] == 2
    assert found[("flashwatch_query_errors_total", (("code", "busy"),))] == 1
    assert found[("flashwatch_query_latency_seconds_bucket", (("le", "0.5"),))] == 0
    assert found[("flashwatch_query_latency_seconds_bucket", (("le", "1.0"),))] == 1
    assert found[("flashwatch_encoder_batch_duration_seconds_count", ())] == 3
    assert found[("flashwatch_redis_up", ())] == 0
    more = samples(render(build_registry(lambda: _snapshot(clips=5))).decode())
    assert more[("flashwatch_encoder_clips_total", ())] == 5


def test_before_the_daemon_is_built_only_model_loaded_is_shown() -> None:
    found = samples(render(build_registry(lambda: None)).decode())
    assert found == {("flashwatch_model_loaded", ()): 0.0}


def test_histogram_buckets_are_cumulative_and_bounded() -> None:
    histogram = Histogram((1.0, 2.0))
    for seconds in (0.5, 1.0, 1.5, 9.0):
        histogram.observe(seconds)
    data = histogram.snapshot()
    assert data.cumulative() == [("1.0", 2.0), ("2.0", 3.0), ("+Inf", 4.0)]
    assert data.count == 4 and data.total == pytest.approx(12.0)
    with pytest.raises(ValueError):
        Histogram((2.0, 1.0))


class _Redis:
    """An in-memory Redis ReplyPublisher stand-in: records what would be published."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    async def token(self, request_id: str, index: int, text: str) -> None:
        self.events.append(("token", request_id))

    async def finish(self, ticket: QueryTicket, answer: Answer) -> None:
        self.events.append(("final", ticket.request.id))

    async def fail(self, ticket: QueryTicket, error: Any) -> None:
        self.events.append(("error", ticket.request.id))


def _ticket(request_id: str) -> QueryTicket:
    return QueryTicket(QueryRequest(id=request_id, question="q"), None, time.time())


def _answer(request_id: str) -> Answer:
    return Answer(id=request_id, stream=("cam1",), question="q", answer="hi", latency_s=0.2,
                  ttft_s=0.1, model="tiny")  # fmt: skip


async def test_http_answers_stay_local_and_redis_answers_go_to_redis() -> None:
    redis = _Redis()
    hub = AnswerHub(redis, keep=2, max_subscribers=2)
    local = hub.subscribe("h1")
    await hub.token("h1", 0, "hi")
    await hub.finish(_ticket("h1"), _answer("h1"))
    await hub.token("r1", 0, "x")
    await hub.fail(_ticket("r1"), QueryTimeout("late"))
    assert redis.events == [("token", "r1"), ("error", "r1")]
    assert (await local.next_event())["text"] == "hi"
    assert (await local.next_event())["answer"] == "hi"
    assert hub.answer("h1")["answer"] == "hi" and hub.answer("r1")["code"] == "timeout"
    assert (hub.answered, hub.failed, dict(hub.errors)) == (1, 1, {"timeout": 1})
    assert hub.latency.snapshot().count == 1

    await hub.finish(_ticket("r2"), _answer("r2"))
    assert hub.answer("h1") is None, "only the newest `keep` answers are kept"
    with pytest.raises(InvalidRequest):
        hub.subscribe("r2")  # an id already answered


async def test_an_abandoned_http_request_is_never_published_on_redis() -> None:
    redis = _Redis()
    hub = AnswerHub(redis, keep=8, max_subscribers=1)
    hub.subscribe("h1")
    with pytest.raises(Busy):
        hub.subscribe("h2")
    hub.unsubscribe("h1", submitted=True)
    await hub.token("h1", 0, "late")
    await hub.finish(_ticket("h1"), _answer("h1"))
    assert redis.events == []
    hub.subscribe("h3")  # the slot is free again


def test_reload_plan_names_streams_and_sections_needing_a_restart() -> None:
    running = FlashwatchConfig(streams=[StreamSettings(name="a", url="testsrc://"),
                                        StreamSettings(name="b", url="testsrc://")])  # fmt: skip
    new = FlashwatchConfig.model_validate(
        {"streams": [{"name": "a", "url": "testsrc://", "fps": 2.0},
                     {"name": "c", "url": "testsrc://"}],
         "log_level": "debug", "memory": {"budget_mb": 32.0}}
    )  # fmt: skip
    plan = plan_reload(running, new)
    assert [s.name for s in plan.added] == ["c"]
    assert plan.removed == ("b",)
    assert [s.name for s in plan.changed] == ["a"]
    assert plan.applied == ("log_level",)
    assert plan.needs_restart == ("memory",)
    after = effective_config(running, new)
    assert after.memory == running.memory and after.log_level == "debug"
    assert [s.name for s in after.streams] == ["a", "c"]
    assert plan_reload(after, after).empty


def test_a_public_address_needs_a_token_and_the_token_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("camera-host")
    with pytest.raises(ConfigError, match=r"http\.token is required"):
        load_config(None, sets=["http.host=0.0.0.0"])
    monkeypatch.setenv("FLASHWATCH_HTTP_TOKEN", "from-env")
    monkeypatch.setenv("FLASHWATCH_HTTP_PORT", "0")
    config = load_config(None, sets=["http.host=0.0.0.0"])
    assert config.http.token is not None and config.http.token.get_secret_value() == "from-env"
    assert config.http.port == 0 and "from-env" not in repr(config)


def _operations() -> Operations:
    async def reload() -> dict[str, Any]:
        return {}

    return Operations(HttpSettings(), QuerySettings(), notifier=SystemdNotifier(None),
                      reload=reload)  # fmt: skip


def test_every_route_served_is_documented_and_every_documented_route_served() -> None:
    app = build_app(_operations(), HttpSettings())
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {
        (method, path) for path, item in openapi_document()["paths"].items() for method in item
    }
    assert served == documented


async def test_probes_before_the_model_is_loaded() -> None:
    client = TestClient(TestServer(build_app(_operations(), HttpSettings())))
    await client.start_server()
    try:
        ready = await client.get("/readyz")
        assert ready.status == 503 and (await ready.json())["model_loaded"] is False
        assert (await client.get("/healthz")).status == 200  # alive while loading
        ask = await client.post("/v1/ask", json={"question": "early?"})
        assert ask.status == 503 and (await ask.json())["code"] == "not_ready"
        metrics = await client.get("/metrics")
        assert "flashwatch_model_loaded 0.0" in await metrics.text()
        bad = await client.post("/v1/ask", data=b"{not json")
        assert bad.status == 400 and (await bad.json())["code"] == "invalid_request"
    finally:
        await client.close()


def test_shipped_deployment_configs_load() -> None:
    gpu = load_config(REPO / "configs" / "production-gpu.yaml")
    assert gpu.model.device == "cuda" and len(gpu.streams) >= 2
    assert gpu.http.enabled and gpu.logging.format == "json"
    res224 = load_config(REPO / "configs" / "videochat-flash-7b-res224.yaml")
    assert res224.model.checkpoint.endswith("7B_res224")


def _emitted_names() -> set[str]:
    text = render(build_registry(_with_alerts_and_frames)).decode()
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_dashboard_queries_only_metrics_the_daemon_exports() -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    emitted = _emitted_names()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in re.findall(r"flashwatch_[a-z0-9_]+", expr)}
    assert used and used <= emitted, sorted(used - emitted)


class _StalePort:
    """Stands in for EnginePort: a device thread that last answered ``age_s`` ago."""

    def __init__(self, age_s: float) -> None:
        self.age_s = age_s

    def heartbeat_age_s(self) -> float:
        return self.age_s

    async def heartbeat(self) -> None:
        await asyncio.sleep(3600)  # wedged: never answers

    def stats(self) -> Any:
        return type("Stats", (), {"batches": 0, "last_batch_ms": 0.0})()


async def test_a_stale_device_heartbeat_fails_healthz_and_starves_the_watchdog(
    tmp_path: Path,
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        settings = HttpSettings(heartbeat_interval_s=0.05, heartbeat_stale_s=5.0)
        notifier = SystemdNotifier(str(path), watchdog_usec=100_000)

        async def reload() -> dict[str, Any]:
            return {}

        ops = Operations(settings, QuerySettings(), notifier=notifier, reload=reload)
        port = _StalePort(age_s=0.1)
        ops.attach(cast(Any, SimpleNamespace(port=port)))
        client = TestClient(TestServer(build_app(ops, settings)))
        await client.start_server()
        runner = asyncio.ensure_future(ops.run())
        try:
            assert (await client.get("/healthz")).status == 200
            await asyncio.sleep(0.3)
            assert _drain(sock).count(b"WATCHDOG=1") >= 1, "fed while the heartbeat is fresh"
            port.age_s = 60.0
            stale = await client.get("/healthz")
            assert stale.status == 503 and (await stale.json())["device_heartbeat_age_s"] == 60.0
            _drain(sock)
            await asyncio.sleep(0.3)
            assert b"WATCHDOG=1" not in _drain(sock), "not fed once the device thread is stuck"
        finally:
            runner.cancel()
            await asyncio.wait({runner})
            await client.close()


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out.append(sock.recv(64))
    return out


class _QuietPort:
    """An engine that takes queries and records cancellations (answers come from the test)."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.submitted: list[str] = []

    async def submit(self, ticket: QueryTicket) -> None:
        self.submitted.append(ticket.request.id)

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


async def test_an_sse_client_that_goes_away_cancels_its_query() -> None:
    redis = _Redis()
    hub = AnswerHub(redis, keep=8, max_subscribers=8)
    port = _QuietPort()
    ops = _operations()
    ops.attach(cast(Any, SimpleNamespace(port=port, hub=hub)))
    client = TestClient(TestServer(build_app(ops, HttpSettings())))
    await client.start_server()
    try:
        response = await client.post("/v1/ask?stream=true", json={"id": "q1", "question": "?"})
        assert response.status == 200
        await hub.token("q1", 0, "first")
        assert (await response.content.readline()).startswith(b"event: token")
        response.close()  # the client leaves mid-answer

        async def cancelled() -> bool:
            await hub.token("q1", 1, "more")  # the next write notices the closed socket
            return port.cancelled == ["q1"]

        deadline = time.monotonic() + 10
        while not await cancelled():
            assert time.monotonic() < deadline, "the query was not cancelled"
            await asyncio.sleep(0.05)
        await hub.finish(_ticket("q1"), _answer("q1"))
        assert hub.answer("q1") is not None and redis.events == []  # kept, never on Redis
    finally:
        await client.close()


def test_ready_needs_redis_and_one_stream_that_has_not_failed() -> None:
    ops = _operations()
    intake = SimpleNamespace(connected=True)
    ingests = [SimpleNamespace(state=StreamState.FAILED), SimpleNamespace(state=StreamState.LIVE)]
    ops.attach(cast(Any, SimpleNamespace(intake=intake, ingests=ingests)))
    assert ops.readiness() == (True, {"model_loaded": True, "redis": True, "streams_up": 1})
    ingests[1].state = StreamState.FAILED
    assert ops.readiness()[0] is False
    ingests[1].state = StreamState.RECONNECTING  # down for now, but not given up
    intake.connected = False
    assert ops.readiness() == (False, {"model_loaded": True, "redis": False, "streams_up": 1})
    ops.detach()  # stopping
    assert ops.readiness()[0] is False


def _with_alerts_and_frames() -> MetricsSnapshot:
    """``_snapshot()`` with three standing queries, two delivery channels, evidence frames and
    requests routed over a fleet."""
    status = {  # the shape of AlertManager.status()
        "rules": [
            {"name": "door", "kind": "condition", "state": "firing", "last_score": 0.8},
            {"name": "quiet", "kind": "condition", "state": "clear", "last_score": None},
            {"name": "recap", "kind": "summary", "state": "scheduled", "next_at": 1.7e9},
        ],
        "counters": {"evaluations": 12, "fired": 1, "summaries": 2},
        "sinks": [
            {"channel": "redis", "queued": 0, "offered": 3, "delivered": 3, "retried": 0,
             "dropped": 0, "failed": 0, "last_error": None, "duplicates": 0},
            {"channel": "webhook:ops", "queued": 2, "offered": 3, "delivered": 1, "retried": 4,
             "dropped": 0, "failed": 0, "last_error": "HTTP 503", "target": "https://x"},
        ],
    }  # fmt: skip
    frames = FrameStats(frames=40, bytes=300_000, budget_bytes=1 << 28, written=41, dropped=1,
                        failed=0, evicted=1, queued=0)  # fmt: skip
    routing = {"coordinated": 5, "delivered": 4, "no_owner": 1}
    return dataclasses.replace(
        _snapshot(), alerts=alert_metrics(status), frames=frame_metrics(frames), routing=routing,
        coordinating=1,
    )  # fmt: skip


def test_alerts_and_evidence_frames_are_metrics_too() -> None:
    text = render(build_registry(_with_alerts_and_frames)).decode()
    checked = promtool(text)
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr
    found = samples(text)
    assert value(found, "flashwatch_alert_firing", rule="door") == 1
    assert ("flashwatch_alert_firing", (("rule", "quiet"),)) in found
    assert ("flashwatch_alert_firing", (("rule", "recap"),)) not in found  # a summary
    assert value(found, "flashwatch_alert_last_score", rule="door") == 0.8
    assert value(found, "flashwatch_alert_activity_total", kind="evaluations") == 12
    webhook = {"channel": "webhook:ops"}
    assert value(found, "flashwatch_alert_deliveries_total", outcome="retried", **webhook) == 4
    assert value(found, "flashwatch_alert_delivery_queued", **webhook) == 2
    assert value(found, "flashwatch_evidence_frames") == 40
    assert value(found, "flashwatch_evidence_frame_events_total", outcome="evicted") == 1
    assert value(found, "flashwatch_fleet_routed_total", event="no_owner") == 1
    assert value(found, "flashwatch_fleet_coordinating") == 1
    assert alert_metrics(None) is None  # no rule runs: no alert families
    plain = samples(render(build_registry(_snapshot)).decode())
    assert not any(name.startswith("flashwatch_alert") for name, _ in plain)
