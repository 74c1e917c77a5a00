"""The live terminal view of a daemon status (rich).

It renders immutable :class:`~sinks.schema.DaemonStatus` snapshots only; it never touches the
pipeline. ``flashwatch serve`` feeds it the daemon's own snapshots, ``flashwatch status`` the
ones read over Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from sinks.schema import DaemonStatus, GapStatus, StreamStatus

MEDIA_TIME_BEFORE_S = 1e9  # times below this (2001) are media seconds (files), not UTC epochs
GAPS_SHOWN = 3
ENCODER_LAG_WARN_S = 10.0  # encoder lag shown in red past this (ingest falling behind)
_STATE_STYLE = {
    "live": "green",
    "connecting": "yellow",
    "reconnecting": "yellow",
    "stalled": "yellow",
    "offline": "red",
    "failed": "bold red",
    "ended": "dim",
}


def format_time(t: float, now: float | None = None) -> str:
    """Epoch seconds as local ``HH:MM:SS`` (with the date when not today); media time as
    ``H:MM:SS``."""
    if t < MEDIA_TIME_BEFORE_S:
        return format_duration(t)
    moment = datetime.fromtimestamp(t).astimezone()
    today = datetime.fromtimestamp(time.time() if now is None else now).astimezone().date()
    return moment.strftime("%H:%M:%S" if moment.date() == today else "%Y-%m-%d %H:%M:%S")


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``Dd H:MM:SS`` past a day)."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _gaps(gaps: tuple[GapStatus, ...], now: float) -> str:
    if not gaps:
        return "none"
    recent = [
        f"{format_time(g.start, now)}–{format_time(g.end, now)} {g.reason}"
        for g in gaps[-GAPS_SHOWN:]
    ]
    more = len(gaps) - len(recent)
    return "\n".join(recent + ([f"(+{more} earlier)"] if more > 0 else []))


def _memory_lines(stream: StreamStatus, now: float) -> tuple[str, str, str, str]:
    """(memory, capacity, history, levels) texts of one stream."""
    memory = stream.memory
    if memory is None:
        return "-", "-", "-", "-"
    held = (
        f"{memory.tokens:,} / {memory.budget_tokens:,} tok ({memory.fill:.0%}), "
        f"{format_bytes(memory.bytes)} / {format_bytes(memory.budget_bytes)}"
    )
    capacity = "-" if memory.capacity_hours is None else f"{memory.capacity_hours:.1f} h"
    history = (
        "empty"
        if memory.span is None
        else f"{format_time(memory.span[0], now)} – {format_time(memory.span[1], now)} "
        f"({format_duration(memory.span[1] - memory.span[0])})"
    )
    levels = ", ".join(f"L{level} {n}" for level, n in sorted(memory.levels.items()))
    return held, capacity, history, f"{memory.segments} ({levels})" if levels else "0"


def render_stream(stream: StreamStatus, now: float) -> RenderableType:
    """One stream as a small two-pair-per-row table (fits an 80-column terminal)."""
    state = Text(stream.state, style=_STATE_STYLE.get(stream.state, ""))
    state.append(f"  quality {stream.quality}")
    dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(stream.dropped.items()) if n)
    held, capacity, history, segments = _memory_lines(stream, now)
    table = Table(
        title=Text(stream.name, style="bold"),
        title_justify="left",
        show_header=False,
        expand=True,
        box=None,
        padding=(0, 1),
    )
    table.add_column(style="dim", no_wrap=True)
    table.add_column(ratio=1, overflow="fold")
    table.add_column(style="dim", no_wrap=True)
    table.add_column(ratio=1, overflow="fold")
    table.add_row(
        "state", state, "fps in/sampled", f"{stream.fps_in:.1f} / {stream.fps_sampled:.1f}"
    )
    table.add_row("clips", str(stream.clips), "dropped", dropped or "0")
    table.add_row(
        "reconnects",
        f"{stream.reconnects} ({stream.reconnects_last_hour} last hour)",
        "stalls",
        f"{stream.stalls_last_hour} last hour",
    )
    table.add_row("memory", held, "capacity", capacity)
    table.add_row("history", history, "segments", segments)
    table.add_row("gaps", _gaps(stream.gaps, now), "source", stream.url)
    if stream.last_error and stream.state != "live":
        table.add_row("last error", Text(stream.last_error, style="red"), "", "")
    return table


def render_status(status: DaemonStatus) -> RenderableType:
    """A rich renderable of one snapshot: header, a table per stream, queries and encoder."""
    now = status.time
    daemon = status.daemon
    header = Text.assemble(
        ("flashwatch ", "bold"),
        f"{daemon.version}  pid {daemon.pid}  up {format_duration(daemon.uptime_s)}  ",
        f"model {daemon.model[:24]} on {daemon.device}  at {format_time(now, now)}",
    )
    streams: list[RenderableType] = [render_stream(stream, now) for stream in status.streams]
    if not streams:
        streams.append(Text("(no streams)", style="dim"))
    q = status.queries
    queries = Text(
        f"queries: pending {q.pending}  in flight {q.in_flight}  completed {q.completed}  "
        f"failed {q.failed}  latency p50 {_seconds(q.latency_p50_s)} "
        f"p95 {_seconds(q.latency_p95_s)}  TTFT p95 {_seconds(q.ttft_p95_s)}"
    )
    e = status.encoder
    last_batch = "-" if e.last_batch_ms is None else f"{e.last_batch_ms:.0f} ms"
    encoder = Text(
        f"encoder: clips {e.clips_encoded}  batches {e.batches}  lag {e.lag_s:.1f}s  "
        f"last batch {last_batch}",
        style="red" if e.lag_s > ENCODER_LAG_WARN_S else "",
    )
    if e.failures or e.failure:
        causes = "  ".join(f"{cause} {n}" for cause, n in sorted(e.failures.items()))
        encoder.append(f"\nencode failures: {causes or '-'}", style="red")
        if e.failure:
            encoder.append(f"\nengine failed: {e.failure}", style="bold red")
    return Panel(Group(*streams, Rule(style="dim"), queries, encoder), title=header)


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
        console: Console | None = None,
        refresh_per_second: float = 2.0,
    ) -> None:
        self._latest = latest
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
        waiting = Text("waiting for the first status snapshot…", style="dim")
        with Live(waiting, console=self._console, auto_refresh=False, transient=False) as live:
            while True:
                status = self._latest()
                live.update(waiting if status is None else render_status(status), refresh=True)
                await asyncio.sleep(self._period_s)
