"""The live terminal view of a daemon status (rich).

It renders immutable :class:`~sinks.schema.DaemonStatus` snapshots only; it never touches the
pipeline. ``flashwatch serve`` feeds it the daemon's own snapshots, ``flashwatch status`` the
ones read over Redis. With more than one daemon present, the fleet's tables (every daemon, every
stream and its owner: :mod:`sinks.fleet.status`) show below.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from sinks.fleet.status import FleetView, render_fleet
from sinks.schema import AlertsStatus, DaemonStatus, QueryStats, RedisStatus, StreamStatus
from sinks.timefmt import MEDIA_TIME_BEFORE_S, clock_time, format_duration

__all__ = [
    "MEDIA_TIME_BEFORE_S",
    "LiveView",
    "format_bytes",
    "format_duration",
    "format_time",
    "render_status",
    "render_stream",
    "render_view",
]

format_time = clock_time  # the live view's short form (kept under its old name)

ENCODER_LAG_WARN_S = 10.0  # encoder lag shown in red past this (ingest falling behind)
STREAM_LINES = 2  # every stream is two lines, whatever the terminal
FIXED_LINES = 6  # panel borders (2), a blank, the Redis, query and encoder lines
_STATE_STYLE = {
    "live": "green",
    "connecting": "yellow",
    "reconnecting": "yellow",
    "stalled": "yellow",
    "offline": "red",
    "failed": "bold red",
    "ended": "dim",
}
# Which streams stay on screen when not all fit: troubled ones first.
_SEVERITY = ("failed", "offline", "stalled", "reconnecting", "connecting", "live", "ended")
_REDIS_STYLE = {"connected": "green", "connecting": "yellow", "unreachable": "red"}
WAITING = Text("starting… waiting for the first status snapshot", style="dim")


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _line(*parts: str | tuple[str, str]) -> Text:
    """One terminal line: cut with an ellipsis at the edge, never wrapped mid-word."""
    return Text.assemble(*parts, no_wrap=True, overflow="ellipsis")


def _memory(stream: StreamStatus, now: float) -> str:
    memory = stream.memory
    if memory is None:
        return "memory -"
    capacity = "" if memory.capacity_hours is None else f"  {memory.capacity_hours:.1f} h"
    history = (
        "empty"
        if memory.span is None
        else f"{format_time(memory.span[0], now)}–{format_time(memory.span[1], now)}"
    )
    return (
        f"mem {memory.tokens:,}/{memory.budget_tokens:,} tok {memory.fill:.0%}"
        f"  {format_bytes(memory.bytes)}{capacity}  {history}"
    )


def _gaps(stream: StreamStatus, now: float) -> str:
    if not stream.gaps:
        return ""
    last = stream.gaps[-1]
    return f"  gap {format_time(last.start, now)} {last.reason}"


def _clips(stream: StreamStatus) -> str:
    """Clips made; for a motion-gated stream also how many were skipped and what that saved."""
    motion = stream.motion
    if motion is None:
        return f"{stream.clips} clips"
    saved = "" if motion.encoder_saved_s is None else f", {motion.encoder_saved_s:.0f}s saved"
    return (
        f"{stream.clips} clips ({motion.clips_skipped} static skipped, "
        f"{motion.motion_fraction:.0%} motion{saved})"
    )


def render_stream(stream: StreamStatus, now: float) -> RenderableType:
    """One stream in two lines: health, then memory (or the error of a stream not live)."""
    health = _line(
        (f"{stream.name} ", "bold"),
        (stream.state, _STATE_STYLE.get(stream.state, "")),
        f"  {stream.quality}  {stream.fps_in:.1f}/{stream.fps_sampled:.1f} fps"
        f"  {_clips(stream)}  {sum(stream.dropped.values())} dropped"
        f"  {stream.reconnects} reconnects",
    )
    if stream.last_error and stream.state != "live":
        detail = _line("  ", (f"error: {stream.last_error}", "red"))
    else:
        detail = _line(f"  {_memory(stream, now)}{_gaps(stream, now)}")
    return Group(health, detail)


def _shown_streams(streams: tuple[StreamStatus, ...], room: int) -> list[StreamStatus]:
    """The streams that fit ``room`` lines (troubled ones first), in their own order."""
    fit = max(0, room // STREAM_LINES)
    if len(streams) <= fit:
        return list(streams)
    fit = max(0, (room - 1) // STREAM_LINES)  # one line for "+N more"

    def severity(stream: StreamStatus) -> int:
        state = stream.state
        return _SEVERITY.index(state) if state in _SEVERITY else 0

    kept = set(sorted(range(len(streams)), key=lambda i: severity(streams[i]))[:fit])
    return [stream for i, stream in enumerate(streams) if i in kept]


def _redis_line(redis: RedisStatus | None) -> Text:
    if redis is None:
        return _line(("redis -", "dim"))
    style = _REDIS_STYLE.get(redis.state, "bold red")
    if redis.last_error and redis.state != "connected":
        why = redis.last_error.removeprefix(f"Redis at {redis.url}").lstrip(": ")
        return _line("redis ", (redis.state, style), f"  {redis.url}  ", (why, style))
    return _line("redis ", (redis.state, style), f"  {redis.url}")


def render_status(status: DaemonStatus, height: int | None = None) -> RenderableType:
    """One snapshot: header, two lines per stream, Redis, queries, encoder.

    With ``height`` (terminal lines), streams that do not fit are summed up in a ``+N more``
    line, so the queries and encoder lines always show.
    """
    now = status.time
    daemon = status.daemon
    header = Text(
        f"flashwatch {daemon.version}  pid {daemon.pid}  up {format_duration(daemon.uptime_s)}"
        f"  {daemon.model[:24]} on {daemon.device}  {format_time(now, now)}",
        style="bold",
    )
    fixed = FIXED_LINES + (1 if status.alerts is not None else 0)  # the alerts line
    room = len(status.streams) * STREAM_LINES if height is None else height - fixed
    shown = _shown_streams(status.streams, room)
    rows: list[RenderableType] = [render_stream(stream, now) for stream in shown]
    hidden = [stream for stream in status.streams if stream not in shown]
    if hidden:
        states = ", ".join(sorted({stream.state for stream in hidden}))
        rows.append(_line((f"+{len(hidden)} more ({states})", "dim")))
    if not status.streams:
        rows.append(Text("(no streams)", style="dim"))
    q = status.queries
    queries = _line(
        f"queries  {q.pending} pending  {q.in_flight} running  {q.completed} done"
        f"  {q.failed} failed  p50 {_seconds(q.latency_p50_s)} p95 {_seconds(q.latency_p95_s)}"
        f" TTFT {_seconds(q.ttft_p95_s)}"
    )
    e = status.encoder
    last_batch = "-" if e.last_batch_ms is None else f"{e.last_batch_ms:.0f} ms"
    encoder = _line(
        (
            f"encoder  lag {e.lag_s:.1f}s  clips {e.clips_encoded}  batches {e.batches}"
            f"  last batch {last_batch}",
            "red" if e.lag_s > ENCODER_LAG_WARN_S else "",
        )
    )
    if e.failures or e.failure:
        causes = "  ".join(f"{cause} {n}" for cause, n in sorted(e.failures.items()))
        encoder.append(f"\nencode failures: {causes or '-'}", style="red")
        if e.failure:
            encoder.append(f"\nengine failed: {e.failure}", style="bold red")
    backlog = _backlog(q)
    lines = [queries, encoder] if backlog is None else [queries, backlog, encoder]
    if status.alerts is not None:
        lines.append(_alerts_line(status.alerts))
    body = Group(*rows, Text(""), _redis_line(status.redis), *lines)
    return Panel(body, title=header, title_align="left", padding=(0, 1))


def _alerts_line(alerts: AlertsStatus) -> Text:
    """One line: each standing query's state and last score (firing ones in red)."""
    line = Text("alerts  ")
    for rule in alerts.rules:
        score = "" if rule.last_score is None else f" {rule.last_score:.2f}"
        style = "bold red" if rule.state == "firing" else ("yellow" if rule.error else "")
        line.append(f"{rule.name} {rule.state}{score}", style=style)
        line.append("  ")
    lags = [rule.lag_s for rule in alerts.rules if rule.lag_s is not None]
    if lags:
        line.append(f"eval lag {max(lags):.1f}s")
    return line


def _backlog(q: QueryStats) -> Text | None:
    """The request stream's backlog, shown only when something waits or was given up on."""
    counts = (q.stream_waiting or 0, q.stream_pending or 0, q.dead_letters or 0)
    if not any(counts):
        return None
    waiting, pending, dead = counts
    return Text(
        f"request stream: waiting {waiting}  pending {pending}  dead letters {dead}",
        style="yellow" if dead else "",
    )


def render_view(
    status: DaemonStatus | None, fleet: FleetView | None, height: int | None = None
) -> RenderableType:
    """One daemon's snapshot, with the fleet's tables below it when more than one daemon is
    present (a lone daemon's view stays as it was)."""
    if fleet is None or len(fleet.daemons) <= 1:
        return WAITING if status is None else render_status(status, height)
    tables = render_fleet(fleet)
    if status is None:
        return tables
    room = None if height is None else max(FIXED_LINES, height - _fleet_lines(fleet))
    return Group(render_status(status, room), tables)


def _fleet_lines(fleet: FleetView) -> int:
    # Two tables, each a title, three rules and a header line, plus a row per entry.
    return 2 * 5 + len(fleet.daemons) + len(fleet.streams)


class LiveView:
    """A ``rich.live.Live`` view refreshed from ``latest()`` about twice a second.

    ``latest`` returns the most recent immutable snapshot (or None before the first).
    Start and stop it from asyncio: ``view.start()`` ... ``view.stop()`` (and ``await
    view.wait_closed()`` to be sure the terminal is restored before printing more).
    """

    def __init__(
        self,
        latest: Callable[[], DaemonStatus | None],
        *,
        fleet: Callable[[], FleetView | None] | None = None,
        console: Console | None = None,
        refresh_per_second: float = 2.0,
    ) -> None:
        self._latest = latest
        self._fleet = fleet
        self._console = console
        self._period_s = 1.0 / refresh_per_second
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="live-view")

    def stop(self) -> None:
        """Cancel the refresh; the display closes as the task unwinds (next loop turn)."""
        if self._task is not None:
            self._task.cancel()

    async def wait_closed(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Refresh until cancelled (updates happen on the event loop; no rich thread)."""
        with Live(WAITING, console=self._console, auto_refresh=False, transient=False) as live:
            while True:
                status = self._latest()
                fleet = self._fleet() if self._fleet is not None else None
                live.update(render_view(status, fleet, live.console.size.height), refresh=True)
                await asyncio.sleep(self._period_s)
