"""The per-stream supervisor: connect, decode, sample, assemble clips; reconnect and watch.

    worker thread (one per connection attempt)            event loop
    source.open → frames ─▶ sampler ─▶ resize ─▶ [frames DropQueue] ─▶ ClipAssembler ─▶ [clips]
                                    (motion score)                       (motion gate)   engine
                     ▲
    supervisor: state machine, stall watchdog, backoff, gaps, stats ◀── attempt.finished

States: ``connecting`` (first attempt) → ``live`` on the first frame; a fault or a silent end of a
live stream → ``reconnecting`` (after a stall: ``stalled``) with exponential backoff and jitter,
``offline`` once the outage outlasts ``offline_after_s``; files end as ``ended``; a fault that
retrying cannot fix (401, no video track, missing codec) → ``failed`` with ``last_error``.

Every outage of a stream that has been seen becomes a ``GapEvent(start=last frame time,
end=first new frame time)`` delivered to ``on_gap``; clips dropped by backpressure become
``dropped`` gaps. The decoder thread never blocks on a slow consumer for live sources (queues drop
the oldest); files read as fast as possible block instead, so nothing is lost.
A hung attempt is abandoned (its thread ends at its socket timeout), never joined on the loop.
With motion gating (``streamer.ingest.motion``) the worker scores each sampled frame and the
assembler's gate marks static clips skipped; a reconnect, hole or dropped clip resets the gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import av.error
import numpy as np

from sinks.redact import redact_text, redact_url, url_secrets
from streamer.ingest.backoff import Backoff, EventWindow, connection_quality, stall_timeout_s
from streamer.ingest.clips import ClipAssembler, SampledFrame
from streamer.ingest.errors import SourceError, SourceFatal, SourceUnavailable
from streamer.ingest.motion import MotionDetector, MotionGate, motion_enabled
from streamer.ingest.queues import DropPolicy, DropQueue
from streamer.ingest.sampler import TimestampSampler
from streamer.ingest.settings import IngestSettings, StreamSettings
from streamer.ingest.sources import (
    Source,
    SourceKind,
    make_source,
    source_kind,
    validate_url,
    whip_key_for,
)
from streamer.ingest.sources.ffmpeg import describe_error
from streamer.ingest.types import Clip, GapEvent, IngestStats, StreamState
from streamer.ingest.whip_server import WhipInbox, WhipServer

log = logging.getLogger(__name__)

_TICK_S = 0.1  # supervisor polling period
_RATE_WINDOW_S = 5.0  # fps_in / fps_sampled are averaged over this
_DROP_GAP_QUIET_S = 5.0  # a run of dropped clips is reported once no drop came for this long
_PASSIVE_PAUSE_S = 0.1  # after a WHIP publisher leaves, before waiting for the next one


StillSink = Callable[[str, float, float, np.ndarray], object]  # stream, start, end, [S, S, 3]


class _Stalled(Exception):
    """The watchdog saw no frame for longer than the stall timeout."""


@dataclass(eq=False)
class _Attempt:
    """One connection attempt; the worker thread writes the frame fields, the loop reads them."""

    epoch: int
    source: Source
    stop: threading.Event
    finished: asyncio.Future[BaseException | None]
    started_mono: float
    opened_mono: float | None = None
    first_frame_time: float | None = None  # stream time base (UTC epoch or media time)
    last_frame_time: float | None = None
    last_frame_mono: float | None = None
    frames: int = 0
    live_since_mono: float | None = None  # set by the loop when the first frame is seen


@dataclass
class _Counters:
    frames_in: int = 0
    frames_sampled: int = 0
    reconnects: int = 0
    gaps: int = 0
    corrupt_packets: int = 0
    source_lost: int = 0  # frames a source dropped itself (WHIP backlog)
    stale_frames: int = 0  # frames of an abandoned attempt that arrived late
    detector_s: float = 0.0  # motion detector CPU time (worker threads)
    frames_scored: int = 0  # frames the motion detector saw
    rate_samples: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=64))


def is_live(settings: StreamSettings) -> bool:
    """Live sources get wall-clock stamps and drop-oldest queues; files read in a batch block."""
    kind = source_kind(settings.url)
    if kind in (SourceKind.FFMPEG, SourceKind.WHIP):
        return True
    return settings.realtime


class StreamIngest:
    """Ingest of one stream, run as one asyncio task (``run``) plus worker threads."""

    def __init__(
        self,
        settings: StreamSettings,
        ingest: IngestSettings,
        *,
        image_size: int,
        on_gap: Callable[[GapEvent], None],
        whip: WhipServer | None = None,
        clock: Callable[[], float] = time.time,
        on_still: StillSink | None = None,
    ) -> None:
        """``on_still(stream, start, end, rgb)`` receives each clip's middle frame (static
        clips too), on the event loop; it must not block (the evidence frame store queues)."""
        if not 8 <= image_size <= 4096:
            raise ValueError(f"image_size {image_size} is outside 8..4096")
        self.settings = settings
        self._ingest = ingest
        self._image_size = image_size
        self._on_gap = on_gap
        self._on_still = on_still
        self._clock = clock
        self._url = redact_url(settings.url)
        # Error texts spell the URL their own way (decoded, cut, reordered): its secrets are
        # also masked wherever they appear.
        self._secrets = url_secrets(settings.url)
        key = whip_key_for(settings)
        self._whip_inbox: WhipInbox | None = (
            whip.register(key) if whip is not None and key is not None else None
        )
        self._live = is_live(settings)
        policy: DropPolicy = "drop_oldest" if self._live else "block"
        self.clips: DropQueue[Clip] = DropQueue(
            settings.queue_clips, policy, name="clips", on_drop=self._clip_dropped
        )
        self._frames: DropQueue[SampledFrame] = DropQueue(
            settings.queue_frames, policy, name="frames"
        )
        self._gate = MotionGate(settings.motion) if motion_enabled(settings) else None
        self._assembler = ClipAssembler(settings.name, settings.fps, gate=self._gate)
        self._backoff = Backoff(
            ingest.backoff_initial_s, ingest.backoff_max_s, ingest.backoff_jitter
        )
        self._state = StreamState.CONNECTING
        self._last_error: str | None = None
        self._ever_live = False
        self._epoch = 0
        self._attempt: _Attempt | None = None
        self._outage: tuple[float, str] | None = None  # (stream time of last frame, reason)
        self._down_since: float | None = None  # monotonic; None while live
        self._drop_gap: list[float] | None = None  # [start, end, monotonic of last drop]
        self._reconnect_window = EventWindow()
        self._stall_window = EventWindow()
        self._c = _Counters()

    # ---- public ----------------------------------------------------------------------------

    @property
    def state(self) -> StreamState:
        return self._state

    async def run(self) -> None:
        """Ingest until cancelled. Source faults never escape: they show in ``stats()``."""
        loop = asyncio.get_running_loop()
        self._frames.bind(loop)
        self.clips.bind(loop)
        self._down_since = time.monotonic()
        assembler = asyncio.ensure_future(self._assemble())
        try:
            await self._supervise()
        finally:
            assembler.cancel()
            # asyncio.wait never raises the assembler's CancelledError, so a cancellation of
            # this task arriving meanwhile is not swallowed (suppress() would swallow it).
            await asyncio.wait({assembler})
            self._abandon_attempt()
            self._flush_drop_gap()
            if self._outage is not None:  # report the outage so far: the history has a hole
                self._end_outage(self._clock())

    def stats(self) -> IngestStats:
        """An immutable snapshot; cheap (no locks held for long, no I/O)."""
        now = time.monotonic()
        c = self._c
        fps_in, fps_sampled = _rates(c.rate_samples, now, c.frames_in, c.frames_sampled)
        dropped = self._frames.drops()
        for reason, n in self.clips.drops().items():
            dropped[reason] = dropped.get(reason, 0) + n
        extra = {
            "corrupt_packets": c.corrupt_packets + self._attempt_corrupt(),
            "partial_clip": self._assembler.discarded,
            "source_backlog": c.source_lost + self._attempt_lost(),
            "stale": c.stale_frames,
        }
        dropped.update({k: v for k, v in extra.items() if v})
        reconnects_hour = self._reconnect_window.count(now)
        stalls_hour = self._stall_window.count(now)
        return IngestStats(
            name=self.settings.name,
            url=self._url,
            state=self._state,
            fps_in=fps_in,
            fps_sampled=fps_sampled,
            frames_in=c.frames_in,
            frames_sampled=c.frames_sampled,
            dropped=dropped,
            clips=self._assembler.clips_made,
            reconnects=c.reconnects,
            reconnects_last_hour=reconnects_hour,
            stalls_last_hour=stalls_hour,
            quality=connection_quality(self._state, reconnects_hour, stalls_hour, self._ever_live),
            last_error=self._last_error,
            gaps=c.gaps,
            motion=None if self._gate is None else self._gate.stats(c.detector_s, c.frames_scored),
        )

    # ---- supervisor ------------------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            validate_url(self.settings)
        except SourceFatal as exc:
            await self._park_failed(exc)
        while True:
            try:
                attempt = self._start_attempt()
            except SourceFatal as exc:  # e.g. whip:// without a WHIP endpoint
                await self._park_failed(exc)
            outcome = await self._watch(attempt)
            self._abandon_attempt()
            if attempt.frames > 0 and attempt.live_since_mono is None:
                self._went_live(attempt, time.monotonic())  # it ended between two ticks
            source = attempt.source
            if isinstance(outcome, SourceFatal):
                self._begin_outage(attempt, "failed")
                await self._park_failed(outcome)
            if not source.traits.live:
                if outcome is None:
                    self._set_state(StreamState.ENDED)
                    await _forever()
                await self._park_failed(outcome)
            reason = "disconnected"
            if isinstance(outcome, _Stalled):
                reason = "stalled"
                self._last_error = f"no frame for {self._stall_s(source):.1f} s"
            elif outcome is None:
                self._last_error = None if source.traits.passive else "the live stream ended"
            else:
                self._last_error = redact_text(str(outcome), self._secrets)
            self._begin_outage(attempt, reason)
            if source.traits.passive and outcome is None:  # the publisher left (DELETE)
                self._set_state(StreamState.OFFLINE)
                await asyncio.sleep(_PASSIVE_PAUSE_S)
                continue
            self._c.reconnects += 1
            self._reconnect_window.add(time.monotonic())
            if attempt.live_since_mono is not None and (
                time.monotonic() - attempt.live_since_mono >= self._ingest.healthy_reset_s
            ):
                self._backoff.reset()
            delay = self._backoff.next_delay()
            log.info(
                "%s: %s (%s); retrying in %.1f s",
                self.settings.name, reason, self._last_error, delay,
            )  # fmt: skip
            self._set_down_state(StreamState.STALLED if reason == "stalled" else None)
            await self._sleep_in_outage(delay)

    def _start_attempt(self) -> _Attempt:
        self._epoch += 1
        loop = asyncio.get_running_loop()
        source = make_source(
            self.settings, self._ingest, clock=self._clock, whip_inbox=self._whip_inbox
        )
        attempt = _Attempt(
            epoch=self._epoch,
            source=source,
            stop=threading.Event(),
            finished=loop.create_future(),
            started_mono=time.monotonic(),
        )
        self._attempt = attempt
        if self._state is not StreamState.CONNECTING:
            self._set_down_state(None)
        thread = threading.Thread(
            target=self._work,
            args=(attempt, loop),
            name=f"ingest-{self.settings.name}",
            daemon=True,
        )
        thread.start()
        return attempt

    async def _watch(self, attempt: _Attempt) -> BaseException | None:
        """Wait for the attempt to finish or stall; returns its outcome (None = clean end)."""
        source = attempt.source
        open_deadline_s = self.settings.timeout_s + self._ingest.open_grace_s
        while True:
            done, _ = await asyncio.wait({attempt.finished}, timeout=_TICK_S)
            if done:
                return attempt.finished.result()
            now = time.monotonic()
            self._tick(now)
            if attempt.opened_mono is None:
                if not source.traits.passive and now - attempt.started_mono > open_deadline_s:
                    return SourceUnavailable(f"open timed out after {open_deadline_s:.1f} s")
                self._debounce_offline(now)
                continue
            if attempt.frames > 0 and attempt.live_since_mono is None:
                self._went_live(attempt, now)
            if not self._live:
                continue  # files and batch testsrc block on backpressure: no stall watchdog
            last = attempt.last_frame_mono or attempt.opened_mono
            if now - last > self._stall_s(source):
                self._stall_window.add(now)
                return _Stalled()
            if attempt.live_since_mono is not None and (
                now - attempt.live_since_mono >= self._ingest.healthy_reset_s
            ):
                self._backoff.reset()

    def _went_live(self, attempt: _Attempt, now: float) -> None:
        attempt.live_since_mono = now
        self._ever_live = True
        self._down_since = None
        if self._outage is not None and attempt.first_frame_time is not None:
            self._end_outage(attempt.first_frame_time)
        self._set_state(StreamState.LIVE)

    async def _sleep_in_outage(self, delay_s: float) -> None:
        deadline = time.monotonic() + delay_s
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, _TICK_S))
            now = time.monotonic()
            self._tick(now)
            self._debounce_offline(now)

    def _debounce_offline(self, now: float) -> None:
        since = self._down_since
        if since is not None and now - since >= self._ingest.offline_after_s:
            self._set_state(StreamState.OFFLINE)

    def _set_down_state(self, state: StreamState | None) -> None:
        """``reconnecting`` (or ``state``) while down, unless the outage already shows offline."""
        if self._state is not StreamState.OFFLINE:
            self._set_state(state or StreamState.RECONNECTING)

    async def _park_failed(self, exc: BaseException | None) -> NoReturn:
        self._last_error = redact_text(str(exc), self._secrets) if exc is not None else "failed"
        log.error("%s (%s): %s; not retrying", self.settings.name, self._url, self._last_error)
        self._set_state(StreamState.FAILED)
        await _forever()

    def _set_state(self, state: StreamState) -> None:
        if state is not self._state:
            log.info("%s: %s → %s", self.settings.name, self._state.value, state.value)
            self._state = state

    def _stall_s(self, source: Source) -> float:
        return stall_timeout_s(
            source.nominal_fps, self._ingest.stall_factor, self._ingest.stall_floor_s
        )

    def _abandon_attempt(self) -> None:
        """Tell the worker to stop; never wait for it (a hung read ends at its socket timeout)."""
        attempt, self._attempt = self._attempt, None
        if attempt is None:
            return
        attempt.stop.set()
        self._c.corrupt_packets += attempt.source.corrupt_packets
        self._c.source_lost += attempt.source.frames_lost

    def _attempt_corrupt(self) -> int:
        attempt = self._attempt
        return attempt.source.corrupt_packets if attempt is not None else 0

    def _attempt_lost(self) -> int:
        attempt = self._attempt
        return attempt.source.frames_lost if attempt is not None else 0

    # ---- gaps ------------------------------------------------------------------------------

    def _begin_outage(self, attempt: _Attempt, reason: str) -> None:
        self._assembler.flush()
        if self._down_since is None:
            self._down_since = time.monotonic()
        if self._outage is not None or not self._ever_live:
            return  # already in an outage, or nothing seen yet (no hole in any history)
        start = attempt.last_frame_time if attempt.last_frame_time is not None else self._clock()
        self._outage = (start, reason)

    def _end_outage(self, end: float) -> None:
        outage, self._outage = self._outage, None
        if outage is None:
            return
        self._emit_gap(GapEvent(self.settings.name, outage[0], max(end, outage[0]), outage[1]))

    def _clip_dropped(self, clip: Clip, reason: str) -> None:
        if self._gate is not None:
            self._gate.reset()  # memory gets a hole: the next clip must be encoded, not extend
        gap = self._drop_gap
        now = time.monotonic()
        if gap is not None and clip.start <= gap[1] + 1.0 / self.settings.fps:
            gap[1], gap[2] = max(gap[1], clip.end), now
            return
        self._flush_drop_gap()
        self._drop_gap = [clip.start, clip.end, now]

    def _flush_drop_gap(self) -> None:
        gap, self._drop_gap = self._drop_gap, None
        if gap is not None:
            self._emit_gap(GapEvent(self.settings.name, gap[0], gap[1], "dropped"))

    def _emit_gap(self, event: GapEvent) -> None:
        self._c.gaps += 1
        log.info("%s: gap %.1f s (%s)", self.settings.name, event.end - event.start, event.reason)
        self._on_gap(event)

    # ---- periodic --------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        c = self._c
        if not c.rate_samples or now - c.rate_samples[-1][0] >= 0.5:
            c.rate_samples.append((now, c.frames_in, c.frames_sampled))
        gap = self._drop_gap
        if gap is not None and now - gap[2] > _DROP_GAP_QUIET_S:
            self._flush_drop_gap()

    # ---- clip assembly (event loop) --------------------------------------------------------

    async def _assemble(self) -> None:
        while True:
            frame = await self._frames.get()
            if frame.epoch != self._epoch:
                self._c.stale_frames += 1  # from an abandoned attempt
                continue
            clip = self._assembler.add(frame)
            if clip is None:
                continue
            if self._on_still is not None and clip.still is not None:
                self._on_still(clip.stream, clip.start, clip.end, clip.still)
            await self.clips.put(clip)  # waits only with the "block" policy (files)

    # ---- worker thread ---------------------------------------------------------------------

    def _work(self, attempt: _Attempt, loop: asyncio.AbstractEventLoop) -> None:
        """Open, decode, sample and resize on this thread; report the outcome to the loop."""
        source, stop = attempt.source, attempt.stop
        sampler = TimestampSampler(self.settings.fps)
        size, interpolation = self._image_size, self.settings.interpolation
        # One detector per attempt: a new connection may show another view, and an abandoned
        # attempt's thread may still be running.
        detector = MotionDetector(self.settings.motion, size) if self._gate is not None else None
        outcome: BaseException | None = None
        try:
            source.open(stop)
            attempt.opened_mono = time.monotonic()
            for frame in source.frames(stop):
                if stop.is_set():
                    break
                attempt.last_frame_mono = time.monotonic()
                attempt.last_frame_time = frame.time
                if attempt.frames == 0:
                    attempt.first_frame_time = frame.time
                attempt.frames += 1
                self._c.frames_in += 1
                if sampler.keep(frame.time):
                    rgb = frame.to_rgb(size, interpolation)  # only kept frames are converted
                    self._c.frames_sampled += 1
                    motion = 0.0
                    if detector is not None:
                        started = time.thread_time()
                        motion = detector.score(rgb)
                        self._c.detector_s += time.thread_time() - started
                        self._c.frames_scored += 1
                    sampled = SampledFrame(attempt.epoch, frame.time, rgb, motion)
                    self._frames.put_threadsafe(sampled, stop=stop)
        except SourceError as exc:
            outcome = exc
        except (av.error.FFmpegError, OSError) as exc:  # a source that did not classify it
            outcome = SourceUnavailable(describe_error(exc))
        except Exception as exc:
            log.exception("%s: unexpected error in the source", self.settings.name)
            outcome = SourceUnavailable(describe_error(exc))
        finally:
            try:
                source.close()
            except (av.error.FFmpegError, OSError) as exc:
                log.debug(
                    "%s: close failed: %s",
                    self.settings.name,
                    redact_text(describe_error(exc), self._secrets),
                )
            with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
                loop.call_soon_threadsafe(_resolve, attempt.finished, outcome)


def _resolve(future: asyncio.Future[BaseException | None], outcome: BaseException | None) -> None:
    if not future.done():
        future.set_result(outcome)


async def _forever() -> NoReturn:
    """Park the supervisor (ended/failed) until the daemon cancels it."""
    while True:
        await asyncio.sleep(3600.0)


def _rates(
    samples: deque[tuple[float, int, int]], now: float, frames_in: int, frames_sampled: int
) -> tuple[float, float]:
    """(decoded fps, sampled fps) over the last ``_RATE_WINDOW_S`` seconds of samples."""
    base = None
    for sample in samples:
        if now - sample[0] <= _RATE_WINDOW_S:
            base = sample
            break
    if base is None or now - base[0] < 0.2:
        return 0.0, 0.0
    dt = now - base[0]
    return (frames_in - base[1]) / dt, (frames_sampled - base[2]) / dt
