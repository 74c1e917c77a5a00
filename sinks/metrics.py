"""Prometheus metrics: a collector that renders the daemon's immutable stats at scrape time.

Nothing here counts anything itself: the daemon hands :class:`FlashwatchCollector` a function
returning a :class:`MetricsSnapshot` (plain frozen data taken from the ingest, engine, intake,
reply and snapshot counters) and each scrape turns the latest one into metric families. No
global registry: the composition root builds a ``CollectorRegistry`` with :func:`build_registry`.

Names follow the Prometheus conventions: ``flashwatch_`` prefix, counters end in ``_total``,
base units (``_seconds``, ``_bytes``, ``_ratio``), labels for stream, reason, code, state.
:class:`Histogram` is the one mutable piece: a bounded accumulator (fixed buckets) for latencies,
read through its immutable :class:`HistogramData`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds. Encode batches take milliseconds on a GPU and seconds on a CPU; answers seconds.
BATCH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STREAM_STATES = ("connecting", "live", "stalled", "reconnecting", "offline", "ended", "failed")


@dataclass(frozen=True, slots=True)
class HistogramData:
    """Observations per bucket (``counts[i]`` ≤ ``buckets[i]``; the last is +Inf), and their sum."""

    buckets: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @classmethod
    def empty(cls, buckets: tuple[float, ...]) -> HistogramData:
        return cls(buckets, (0,) * (len(buckets) + 1), 0.0)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` pairs, the exposition format's buckets."""
        running = 0
        out = []
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class Histogram:
    """A fixed-bucket histogram (constant memory). Event-loop only."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        if list(buckets) != sorted(set(buckets)):
            raise ValueError("histogram buckets must be strictly increasing")
        self._buckets = buckets
        self._counts = [0] * (len(buckets) + 1)
        self._total = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self._counts[bisect.bisect_left(self._buckets, value)] += times
        self._total += value * times

    def snapshot(self) -> HistogramData:
        return HistogramData(self._buckets, tuple(self._counts), self._total)


@dataclass(frozen=True, slots=True)
class StreamMetrics:
    name: str
    state: str
    frames_in: int
    frames_sampled: int
    dropped: Mapping[str, int]
    clips: int
    reconnects: int
    stalls_last_hour: int
    gaps: int  # outages reported by ingest since start
    memory_tokens: int = 0
    memory_budget_tokens: int = 0
    memory_bytes: int = 0
    memory_budget_bytes: int = 0
    memory_fill: float = 0.0
    memory_segments: int = 0
    memory_gap_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class EncoderMetrics:
    clips: int
    batches: int
    lag_s: float
    batch_seconds: HistogramData


@dataclass(frozen=True, slots=True)
class QueryMetrics:
    answered: int
    failed: int
    errors: Mapping[str, int]  # error code -> queries failed with it
    in_flight: int
    queued: int
    latency_seconds: HistogramData
    ttft_seconds: HistogramData
    intake: Mapping[str, int] = field(default_factory=dict)  # intake event -> count
    entries_in_flight: int = 0  # request-stream entries handed to the engine, not yet acked
    tokens_dropped: int = 0  # token events lost (Redis away, slow HTTP client)
    finals_unstored: int = 0  # finals that could not be stored in Redis (left for redelivery)


@dataclass(frozen=True, slots=True)
class AlertRuleMetrics:
    name: str
    kind: str  # condition or summary
    firing: bool  # conditions only
    last_score: float | None  # P(yes) of the last evaluation


@dataclass(frozen=True, slots=True)
class AlertChannelMetrics:
    channel: str  # redis, webhook:<name>, mqtt, ...
    queued: int
    outcomes: Mapping[str, int]  # offered, delivered, retried, dropped, failed -> count


@dataclass(frozen=True, slots=True)
class AlertMetrics:
    rules: tuple[AlertRuleMetrics, ...]
    activity: Mapping[str, int]  # evaluations, fired, cleared, summaries, errors -> count
    channels: tuple[AlertChannelMetrics, ...]


@dataclass(frozen=True, slots=True)
class FrameMetrics:
    frames: int
    bytes: int
    budget_bytes: int
    queued: int
    outcomes: Mapping[str, int]  # written, dropped, failed, evicted -> count


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    version: str
    model: str
    device: str
    model_loaded: bool
    heartbeat_age_s: float | None  # since the device thread last answered; None before start
    redis_up: bool
    status_skipped: int
    streams: tuple[StreamMetrics, ...]
    encoder: EncoderMetrics
    queries: QueryMetrics
    snapshots_enabled: bool
    snapshot_last_success: float | None  # epoch seconds
    snapshot_failures: int
    snapshot_bytes_written: int  # data and manifests, since start
    reloads: Mapping[str, int] = field(default_factory=dict)  # outcome -> count
    alerts: AlertMetrics | None = None  # standing queries (None: none run)
    routing: Mapping[str, int] | None = None  # fleet requests coordinated here, by event
    coordinating: int = 0  # routed requests in progress here
    frames: FrameMetrics | None = None  # evidence frames (None: off)


class FlashwatchCollector(Collector):
    """Renders ``snapshot()`` at each scrape; before the daemon is built, only model_loaded."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot | None]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return []  # names are fixed; no collect() at registration

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        loaded = GaugeMetricFamily(
            "flashwatch_model_loaded", "1 once the model is loaded and the daemon serves."
        )
        loaded.add_metric([], 1.0 if snap is not None and snap.model_loaded else 0.0)
        yield loaded
        if snap is None:
            return
        info = GaugeMetricFamily(
            "flashwatch_build_info", "Always 1; labels name the version, model and device.",
            labels=["version", "model", "device"],
        )  # fmt: skip
        info.add_metric([snap.version, snap.model, snap.device], 1.0)
        yield info
        if snap.heartbeat_age_s is not None:
            yield _gauge(
                "flashwatch_device_heartbeat_age_seconds",
                "Seconds since the device thread last answered a heartbeat.",
                snap.heartbeat_age_s,
            )
        yield _gauge("flashwatch_redis_up", "1 while the query intake is connected to Redis.",
                     1.0 if snap.redis_up else 0.0)  # fmt: skip
        yield _counter(
            "flashwatch_status_publishes_skipped",
            "Status snapshots not published because Redis was away.",
            snap.status_skipped,
        )
        yield from _stream_families(snap.streams)
        yield from _encoder_families(snap.encoder)
        yield from _query_families(snap.queries)
        yield from _snapshot_families(snap)
        reloads = CounterMetricFamily(
            "flashwatch_config_reloads", "Config reloads (SIGHUP, HTTP) by outcome.",
            labels=["outcome"],
        )  # fmt: skip
        for outcome, n in sorted(snap.reloads.items()):
            reloads.add_metric([outcome], n)
        yield reloads
        if snap.alerts is not None:
            yield from _alert_families(snap.alerts)
        if snap.routing is not None:
            yield _labelled(
                CounterMetricFamily("flashwatch_fleet_routed", "Requests coordinated here over "
                                    "other daemons' streams, by event (coordinated, delivered, "
                                    "duplicates, resent, no_owner, swept).", labels=["event"]),
                (([event], n) for event, n in sorted(snap.routing.items())),
            )  # fmt: skip
            yield _gauge("flashwatch_fleet_coordinating", "Routed requests in progress here.",
                         snap.coordinating)  # fmt: skip
        if snap.frames is not None:
            yield from _frame_families(snap.frames)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def _histogram(name: str, doc: str, data: HistogramData) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], data.cumulative(), sum_value=data.total)
    return family


# (metric name, help, how to read it from a StreamMetrics); counters end in _total when shown.
_STREAM_COUNTERS: tuple[tuple[str, str, Callable[[StreamMetrics], float]], ...] = (
    ("flashwatch_stream_frames", "Frames decoded from the source.", lambda s: s.frames_in),
    ("flashwatch_stream_frames_sampled", "Frames kept by the sampler.", lambda s: s.frames_sampled),
    ("flashwatch_stream_clips", "4-frame clips assembled.", lambda s: s.clips),
    ("flashwatch_stream_reconnects", "Reconnections to the source.", lambda s: s.reconnects),
    ("flashwatch_stream_gaps", "Outages (gaps) reported by ingest.", lambda s: s.gaps),
)
_STREAM_GAUGES: tuple[tuple[str, str, Callable[[StreamMetrics], float]], ...] = (
    ("flashwatch_stream_stalls_last_hour", "Stalls in the last hour.",
     lambda s: s.stalls_last_hour),
    ("flashwatch_memory_tokens", "Tokens held in memory.", lambda s: s.memory_tokens),
    ("flashwatch_memory_budget_tokens", "The stream's token budget.",
     lambda s: s.memory_budget_tokens),
    ("flashwatch_memory_bytes", "Bytes of tokens held.", lambda s: s.memory_bytes),
    ("flashwatch_memory_budget_bytes", "The stream's budget in bytes.",
     lambda s: s.memory_budget_bytes),
    ("flashwatch_memory_fill_ratio", "Tokens held / budget (0..1).", lambda s: s.memory_fill),
    ("flashwatch_memory_segments", "Token segments in memory.", lambda s: s.memory_segments),
    ("flashwatch_memory_gap_seconds", "Seconds of recorded gaps in memory.",
     lambda s: s.memory_gap_seconds),
)  # fmt: skip


def _stream_families(streams: tuple[StreamMetrics, ...]) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "flashwatch_stream_state", "1 for the stream's current state, 0 for the others.",
        labels=["stream", "state"],
    )  # fmt: skip
    for stream in streams:
        states = STREAM_STATES if stream.state in STREAM_STATES else (*STREAM_STATES, stream.state)
        for name in states:
            state.add_metric([stream.name, name], 1.0 if name == stream.state else 0.0)
    yield state
    dropped = CounterMetricFamily(
        "flashwatch_stream_dropped", "Frames or clips dropped, by reason.",
        labels=["stream", "reason"],
    )  # fmt: skip
    for stream in streams:
        for reason, n in sorted(stream.dropped.items()):
            dropped.add_metric([stream.name, reason], n)
    yield dropped
    for name, doc, read in _STREAM_COUNTERS:
        counter = CounterMetricFamily(name, doc, labels=["stream"])
        for stream in streams:
            counter.add_metric([stream.name], read(stream))
        yield counter
    for name, doc, read in _STREAM_GAUGES:
        gauge = GaugeMetricFamily(name, doc, labels=["stream"])
        for stream in streams:
            gauge.add_metric([stream.name], read(stream))
        yield gauge


def _encoder_families(encoder: EncoderMetrics) -> Iterator[Metric]:
    yield _counter("flashwatch_encoder_clips", "Clips encoded into memory.", encoder.clips)
    yield _counter("flashwatch_encoder_batches", "Encode batches run.", encoder.batches)
    yield _gauge(
        "flashwatch_encoder_lag_seconds",
        "How late (vs the wall clock) the last batch's oldest live clip was encoded.",
        encoder.lag_s,
    )
    yield _histogram(
        "flashwatch_encoder_batch_duration_seconds",
        "Device time of encode batches.",
        encoder.batch_seconds,
    )


def _query_families(q: QueryMetrics) -> Iterator[Metric]:
    outcomes = CounterMetricFamily(
        "flashwatch_queries", "Queries finished, by outcome.", labels=["outcome"]
    )
    outcomes.add_metric(["answered"], q.answered)
    outcomes.add_metric(["failed"], q.failed)
    yield outcomes
    errors = CounterMetricFamily(
        "flashwatch_query_errors", "Failed queries by error code.", labels=["code"]
    )
    for code, n in sorted(q.errors.items()):
        errors.add_metric([code], n)
    yield errors
    yield _gauge("flashwatch_queries_in_flight", "Queries generating now.", q.in_flight)
    yield _gauge("flashwatch_queries_queued", "Queries waiting for a slot.", q.queued)
    yield _histogram(
        "flashwatch_query_latency_seconds",
        "Receipt to final answer (answered queries).",
        q.latency_seconds,
    )
    yield _histogram(
        "flashwatch_query_time_to_first_token_seconds", "Receipt to first token.", q.ttft_seconds
    )
    intake = CounterMetricFamily(
        "flashwatch_intake_events", "Redis intake events (received, invalid, busy, ...).",
        labels=["event"],
    )  # fmt: skip
    for event, n in sorted(q.intake.items()):
        intake.add_metric([event], n)
    yield intake
    yield _gauge(
        "flashwatch_intake_entries_pending",
        "Request-stream entries handed to the engine and not yet acknowledged.",
        q.entries_in_flight,
    )
    yield _counter(
        "flashwatch_reply_tokens_dropped", "Token events not delivered.", q.tokens_dropped
    )
    yield _counter(
        "flashwatch_reply_finals_unstored",
        "Final answers Redis could not store in time (entry left for redelivery).",
        q.finals_unstored,
    )


def _snapshot_families(snap: MetricsSnapshot) -> Iterator[Metric]:
    yield _gauge("flashwatch_snapshots_enabled", "1 when memory.snapshot_dir is set.",
                 1.0 if snap.snapshots_enabled else 0.0)  # fmt: skip
    if snap.snapshot_last_success is not None:
        yield _gauge(
            "flashwatch_snapshot_last_success_timestamp_seconds",
            "When memory snapshots were last written without error (epoch).",
            snap.snapshot_last_success,
        )
    yield _counter("flashwatch_snapshot_failures", "Snapshot writes that failed.",
                   snap.snapshot_failures)  # fmt: skip
    yield _counter("flashwatch_snapshot_written_bytes", "Snapshot bytes written (data and "
                   "manifests).", snap.snapshot_bytes_written)  # fmt: skip


def _labelled(
    family: CounterMetricFamily | GaugeMetricFamily, rows: Iterable[tuple[list[str], float]]
) -> CounterMetricFamily | GaugeMetricFamily:
    for labels, value in rows:
        family.add_metric(labels, value)
    return family


def _alert_families(alerts: AlertMetrics) -> Iterator[Metric]:
    conditions = [r for r in alerts.rules if r.kind == "condition"]
    yield _labelled(
        GaugeMetricFamily("flashwatch_alert_firing", "1 while a condition rule fires.",
                          labels=["rule"]),
        (([r.name], 1.0 if r.firing else 0.0) for r in conditions),
    )  # fmt: skip
    yield _labelled(
        GaugeMetricFamily("flashwatch_alert_last_score", "P(yes) of a condition's last "
                          "evaluation.", labels=["rule"]),
        (([r.name], r.last_score) for r in conditions if r.last_score is not None),
    )  # fmt: skip
    yield _labelled(
        CounterMetricFamily("flashwatch_alert_activity", "Standing-query work by kind: "
                            "evaluations, fired, cleared, summaries, errors.", labels=["kind"]),
        (([kind], n) for kind, n in sorted(alerts.activity.items())),
    )  # fmt: skip
    yield _labelled(
        CounterMetricFamily("flashwatch_alert_deliveries", "Alert events per delivery channel "
                            "by outcome (offered, delivered, retried, dropped, failed).",
                            labels=["channel", "outcome"]),
        (([c.channel, outcome], n) for c in alerts.channels
         for outcome, n in sorted(c.outcomes.items())),
    )  # fmt: skip
    yield _labelled(
        GaugeMetricFamily("flashwatch_alert_delivery_queued", "Events waiting in a channel's "
                          "bounded queue.", labels=["channel"]),
        (([c.channel], c.queued) for c in alerts.channels),
    )  # fmt: skip


def _frame_families(frames: FrameMetrics) -> Iterator[Metric]:
    yield _gauge("flashwatch_evidence_frames", "Evidence JPEGs held.", frames.frames)
    yield _gauge("flashwatch_evidence_frame_bytes", "Their size on disk.", frames.bytes)
    yield _gauge("flashwatch_evidence_frame_budget_bytes", "memory.frames.budget_mb in bytes.",
                 frames.budget_bytes)  # fmt: skip
    yield _gauge("flashwatch_evidence_frames_queued", "Frames waiting for the encoder thread.",
                 frames.queued)  # fmt: skip
    yield _labelled(
        CounterMetricFamily("flashwatch_evidence_frame_events", "Evidence frames by outcome: "
                            "written, dropped (encoder behind), failed, evicted.",
                            labels=["outcome"]),
        (([outcome], n) for outcome, n in sorted(frames.outcomes.items())),
    )  # fmt: skip


def build_registry(snapshot: Callable[[], MetricsSnapshot | None]) -> CollectorRegistry:
    """A private registry holding only flashwatch's collector (no process-global state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FlashwatchCollector(snapshot))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format of everything ``registry`` collects now."""
    return generate_latest(registry)
