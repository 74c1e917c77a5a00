"""The device runner: owns the model, the memory bank and every job's KV cache.

Every method runs on the engine's single device thread (never on the event loop, never two at
once) and executes one scheduler work item. Results are plain data (host ints, lists, frozen
dataclasses): the engine never touches a tensor.

Device hygiene:
- frames travel as uint8 (4x smaller than float32) through a reused host buffer, pinned when
  the device is CUDA, and are normalised on the device;
- ``warm_up`` runs one encode, prefill and decode before the first real work (kernels chosen,
  allocator primed) without touching memory;
- a decode step syncs with the host once, to sample; text is detokenised incrementally by the
  engine (``model.detok.IncrementalDetokenizer``).

Queries:
- **batched decode**: every in-flight answer whose KV sits in the preallocated ``KVPool`` (one
  slot per ``max_in_flight``) advances in one forward pass per ``DecodeStep``; a prompt too
  long for a slot gets its own growable cache and is decoded alone (same tokens, slower);
- **prefix KV reuse**: the question-independent part of a prefill (layers before the first
  attention-scored drop, over the header and the selected visual tokens) is cached under the
  exact selection (header ids, and per stream the segments read), bounded in bytes with LRU, and
  reused by every later question on the same selection (concurrent ones, follow-ups);
- **chunked prefill**: a prefill advances one chunk of rows through one segment of layers per
  ``PrefillChunk``, so encode batches run between chunks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from memory.bank import MemoryBank, MemoryStats
from memory.errors import MemoryStoreError
from model.generation import GenerationSession, SamplingParams, decode_batch
from model.kv import KVCache, KVPool, layer_capacity
from model.loader import LoadedModel
from model.prefill import PrefillJob, PrefixCache, PrefixState, prefix_job
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_square
from model.prompt import IMAGE_TOKEN_INDEX, stop_token_ids
from streamer.engine.answers import PrefillSummary
from streamer.engine.planner import PlanLimits, QueryPlan, plan_query, resolve_streams
from streamer.engine.scoring import RoundInput, ScoreRound, scoring_question, yes_no_ids
from streamer.engine.types import Query, ScoreRequest
from streamer.ingest.types import Clip, GapEvent

log = logging.getLogger(__name__)

_WARM_UP_TEXT_TOKENS = 16


def failure_cause(exc: BaseException) -> str:
    """A short, stable name for why device work failed (status counts by it)."""
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out_of_memory"
    if isinstance(exc, ValueError | TypeError | IndexError):
        return "bad_input"
    if isinstance(exc, RuntimeError):
        return "device_error"
    return type(exc).__name__


@dataclass(frozen=True, slots=True)
class ClipFailure:
    stream: str
    cause: str
    message: str


@dataclass(frozen=True, slots=True)
class EncodeOutcome:
    encoded: dict[str, int]  # stream -> clips now in memory
    refused: dict[str, int]  # stream -> clips the memory refused (not newer than it)
    failures: tuple[ClipFailure, ...]
    static: dict[str, int] = field(default_factory=dict)  # stream -> skipped clips recorded


@dataclass(frozen=True, slots=True)
class Started:
    plan: QueryPlan
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Generated:
    """One step of one job: the new token (None: a stop id) and whether the answer is done."""

    token: int | None
    finished: bool


@dataclass(frozen=True, slots=True)
class Prefilled:
    done: bool  # the prefill is complete
    first: Generated | None  # the first answer token, once complete
    summary: PrefillSummary | None


PrefixKey = tuple[tuple[int, ...], tuple[tuple[str, tuple[tuple[float, ...], ...]], ...]]


def prefix_key(plan: QueryPlan) -> PrefixKey:
    """The exact selection a prefix state depends on: the text before the visual tokens and,
    per stream, every segment read (span, arena rows, level, merges)."""
    ids = plan.input_ids
    header = tuple(ids[: ids.index(IMAGE_TOKEN_INDEX)])
    visual = tuple(
        (
            part.stream,
            tuple(
                (s.start, s.end, float(s.offset), float(s.count), float(s.level), float(s.merges))
                for s in part.segments
            ),
        )
        for part in plan.parts
    )
    return header, visual


@dataclass
class _Sequence:
    """Device-side state of one job."""

    plan: QueryPlan
    inputs_embeds: torch.Tensor  # [1, L, H]
    visual_start: int
    visual_len: int
    sampling: SamplingParams
    cache: KVCache  # a pool slot, or a growable cache for a prompt too long for a slot
    key: PrefixKey | None  # prefix-cache key (None: reuse off)
    prefix: PrefillJob | None = None  # computing the prefix state (a cache miss)
    session: GenerationSession | None = None


class FrameStager:
    """uint8 frames [B, 4, S, S, 3] -> normalised model input [B, 4, 3, S, S] on the device.

    The host buffer is reused (and pinned on CUDA so the copy is asynchronous); before it is
    overwritten, the previous copy out of it is waited for.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, image_size: int) -> None:
        self.device, self.dtype, self.size = device, dtype, image_size
        self._pin = device.type == "cuda"
        self._host: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device)
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device)

    def stage(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        n, s = len(frames), self.size
        host = self._buffer(n)
        if self._copied is not None:
            self._copied.synchronize()  # the last batch's copy has left the buffer
        for i, clip in enumerate(frames):
            if clip.shape[1:3] != (s, s):
                clip = np.stack([resize_square(np.ascontiguousarray(f), s) for f in clip])
            host[i].copy_(torch.from_numpy(np.ascontiguousarray(clip)))
        on_device = host[:n].to(self.device, non_blocking=self._pin)
        if self._pin:
            self._copied = torch.cuda.Event()
            self._copied.record()
        # Same float32 arithmetic as model.preprocess.preprocess_frames (golden-exact on CPU).
        x = on_device.float() / 255.0  # [B, 4, S, S, 3]
        x = (x - self._mean) / self._std
        return x.permute(0, 1, 4, 2, 3).contiguous().to(self.dtype)  # [B, 4, 3, S, S]

    def _buffer(self, n: int) -> torch.Tensor:
        if self._host is None or self._host.shape[0] < n:
            shape = (n, 4, self.size, self.size, 3)
            self._host = torch.empty(shape, dtype=torch.uint8, pin_memory=self._pin)
            self._copied = None
        return self._host


@dataclass(frozen=True, slots=True)
class RunnerLimits:
    slots: int  # KV pool slots: answers in flight at once
    chunk_tokens: int  # prefill rows per step
    prefix_cache_bytes: int  # 0 = no prefix reuse
    slot_text_tokens: int  # text rows a KV slot holds besides the visual ones and the answer
    max_new_tokens: int  # answer rows a KV slot holds


@dataclass(frozen=True, slots=True)
class RunnerStats:
    prefix_hits: int
    prefix_misses: int
    prefix_bytes: int
    kv_pool_bytes: int
    kv_slots_free: int
    unpooled: int  # answers whose prompt did not fit a KV slot (decoded alone)


class Runner:
    def __init__(
        self, loaded: LoadedModel, bank: MemoryBank, limits: PlanLimits, run: RunnerLimits
    ) -> None:
        self._loaded = loaded
        self._bank = bank
        self._limits = limits
        self._run = run
        self._model = loaded.model
        lm = loaded.model.llm
        self._drop_layers = loaded.drop.layers if loaded.drop is not None else ()
        self._drop_ratios = loaded.drop.ratios if loaded.drop is not None else (1.0,)
        self._pool = KVPool.for_model(
            lm.config,
            slots=run.slots,
            layer_capacity=self._rows(
                run.slot_text_tokens, limits.max_visual_tokens, run.max_new_tokens
            ),
            device=loaded.device,
            dtype=loaded.dtype,
        )
        self._prefixes = PrefixCache(run.prefix_cache_bytes) if run.prefix_cache_bytes else None
        self._unpooled = 0
        self._computing: dict[PrefixKey, int] = {}  # prefix key -> the job computing it
        self._stager = FrameStager(loaded.device, loaded.dtype, loaded.model.image_size)
        self._stop_ids = stop_token_ids(loaded.tokenizer)
        self._sequences: dict[int, _Sequence] = {}
        self._rounds: dict[int, tuple[ScoreRound, QueryPlan]] = {}
        self._yes_no = yes_no_ids(loaded.tokenizer)
        self._fps: dict[str, float] = {}
        # Memory statistics as of the last change, published for the event loop to read
        # (a dict of immutable snapshots, replaced entry by entry).
        self.memory_stats: dict[str, MemoryStats] = {}

    # ---- memory -----------------------------------------------------------------------

    def set_fps(self, stream: str, fps: float) -> None:
        self._fps[stream] = fps

    def remove_stream(self, stream: str) -> None:
        """Forget a removed stream's rate and statistics (its memory stays in the bank)."""
        self._fps.pop(stream, None)
        self.memory_stats.pop(stream, None)

    def refresh_stats(self, streams: Sequence[str] | None = None) -> None:
        for name in self._bank.streams() if streams is None else streams:
            self.memory_stats[name] = self._bank.stats(name, self._fps.get(name, 1.0))

    def encode(self, clips: Sequence[Clip]) -> EncodeOutcome:
        """Encode clips into memory; a failed batch is retried clip by clip to name the cause."""
        encoded: dict[str, int] = {}
        refused: dict[str, int] = {}
        static: dict[str, int] = {}
        failures: list[ClipFailure] = []
        to_encode = [clip for clip in clips if clip.gate.encoded]  # skipped ones have no frames
        try:
            tokens = self._encode_tokens(to_encode) if to_encode else None
        except Exception as exc:  # noqa: BLE001 (a stage boundary: counted, escalated)
            if len(clips) == 1:
                failures.append(ClipFailure(clips[0].stream, failure_cause(exc), str(exc)))
                return EncodeOutcome(encoded, refused, tuple(failures))
            outcomes = [self.encode([clip]) for clip in clips]
            for outcome in outcomes:
                for name, n in outcome.encoded.items():
                    encoded[name] = encoded.get(name, 0) + n
                for name, n in outcome.refused.items():
                    refused[name] = refused.get(name, 0) + n
                for name, n in outcome.static.items():
                    static[name] = static.get(name, 0) + n
                failures.extend(outcome.failures)
            return EncodeOutcome(encoded, refused, tuple(failures), static)
        tokens_of = {} if tokens is None else dict(zip(map(id, to_encode), tokens, strict=True))
        for clip in clips:  # in order: a static span extends the segment recorded before it
            clip_tokens = tokens_of.get(id(clip))
            try:
                if clip_tokens is None:
                    self._bank.extend_static(clip.stream, clip.start, clip.end)
                else:
                    self._bank.append_clip(
                        clip.stream, clip_tokens, clip.start, clip.end, static=clip.gate.static
                    )
            except MemoryStoreError as exc:  # e.g. a file restarted behind restored memory
                refused[clip.stream] = refused.get(clip.stream, 0) + 1
                log.debug("memory refused a clip of %s: %s", clip.stream, exc)
            else:
                counts = encoded if clip_tokens is not None else static
                counts[clip.stream] = counts.get(clip.stream, 0) + 1
        self.refresh_stats(sorted({clip.stream for clip in clips}))
        return EncodeOutcome(encoded, refused, tuple(failures), static)

    def _encode_tokens(self, clips: Sequence[Clip]) -> torch.Tensor:
        with torch.inference_mode():  # the staging buffer too: it is made and reused in here
            batch = self._stager.stage([clip.frames for clip in clips])
            return self._model.encode_clips(batch)  # [B, 64, H]

    def apply_gaps(self, gaps: Sequence[GapEvent]) -> None:
        for gap in gaps:
            try:
                self._bank.add_gap(gap.stream, gap.start, gap.end, gap.reason)
            except MemoryStoreError as exc:
                log.warning("memory refused a gap of %s: %s", gap.stream, exc)
        self.refresh_stats(sorted({gap.stream for gap in gaps}))

    def forget(self, stream: str, start: float, end: float) -> None:
        self._bank.forget(stream, start, end)
        self.refresh_stats([stream])

    def maintenance_due(self) -> bool:
        """Whether the memory has maintenance to do now: consolidation steps or snapshot
        chunks (the bank's check is cheap and safe from any thread, so the loop asks it)."""
        return self._bank.maintenance_due()

    def maintenance(self, budget_s: float) -> None:
        """About ``budget_s`` of the memory's maintenance (device thread)."""
        self._bank.run_maintenance(budget_s)

    # ---- queries ------------------------------------------------------------------------

    def start(self, job_id: int, query: Query) -> Started:
        """Plan the query over memory and set up its sequence (no forward pass yet)."""
        names = resolve_streams(query.stream, self._bank.streams())
        views = [self._bank.view(name) for name in names]
        plan = plan_query(
            query.question,
            views,
            self._loaded.tokenizer,
            self._limits,
            since=query.since,
            until=query.until,
        )
        by_name = {view.stream: view for view in views}
        visual = torch.cat([by_name[part.stream].tokens(part.segments) for part in plan.parts])
        visual = visual.to(device=self._loaded.device, dtype=self._loaded.dtype)
        inputs_embeds, visual_start = self._model.splice(list(plan.input_ids), visual)
        sampling = SamplingParams(
            max_new_tokens=query.max_new_tokens,
            temperature=query.temperature,
            top_p=query.top_p,
        )
        text_len = inputs_embeds.shape[1] - visual.shape[0]
        needed = self._rows(text_len, visual.shape[0], query.max_new_tokens)
        fits = all(n <= c for n, c in zip(needed, self._pool.capacity, strict=True))
        if fits and self._pool.free_slots:
            cache = self._pool.acquire()
        else:  # decoded alone, in its own growable cache
            cache = KVCache(self._model.llm.config.num_hidden_layers)
            self._unpooled += 1
        key = prefix_key(plan) if self._prefixes is not None else None
        seq = _Sequence(plan, inputs_embeds, visual_start, visual.shape[0], sampling, cache, key)
        self._sequences[job_id] = seq
        if key is None:
            self._open_session(seq, None)
        elif key not in self._computing:  # else: wait for the job computing this prefix
            self._prefix_or_session(job_id, seq)
        return Started(plan, inputs_embeds.shape[1])

    def _prefix_or_session(self, job_id: int, seq: _Sequence) -> None:
        """Resume from the cached prefix, or start computing it (others will wait for it)."""
        assert self._prefixes is not None and seq.key is not None
        state = self._prefixes.get(seq.key)
        if state is not None:
            self._open_session(seq, state)
            return
        self._computing[seq.key] = job_id
        seq.prefix = prefix_job(
            self._model.llm,
            seq.inputs_embeds[:, : seq.visual_start + seq.visual_len],
            visual_start=seq.visual_start,
            drop=self._loaded.drop,
            chunk_tokens=self._run.chunk_tokens,
        )

    def _open_session(self, seq: _Sequence, state: PrefixState | None) -> None:
        embeds = seq.inputs_embeds
        if state is not None:  # the rows after the visual tokens resume from the prefix
            embeds = embeds[:, seq.visual_start + seq.visual_len :]
        seq.session = GenerationSession(
            self._model.llm,
            embeds,
            visual_start=seq.visual_start,
            visual_len=seq.visual_len,
            drop=self._loaded.drop,
            sampling=seq.sampling,
            stop_ids=self._stop_ids,
            cache=seq.cache,
            chunk_tokens=self._run.chunk_tokens,
            prefix=state,
        )

    def prefill(self, job_id: int, max_tokens: int) -> Prefilled:
        """Advance the job's prefill by one chunk (at most ``chunk_tokens`` rows through one
        segment of layers; ``max_tokens`` is the scheduler's bound, the same figure)."""
        seq = self._sequences[job_id]
        if seq.prefix is None and seq.session is None:  # waited for another job's prefix
            if seq.key in self._computing:
                return Prefilled(False, None, None)
            self._prefix_or_session(job_id, seq)
        with torch.inference_mode():
            if seq.prefix is not None:
                if seq.prefix.step():
                    state = seq.prefix.prefix_state()
                    seq.prefix = None
                    assert self._prefixes is not None and seq.key is not None
                    self._prefixes.put(seq.key, state)
                    del self._computing[seq.key]
                    self._open_session(seq, state)
                return Prefilled(False, None, None)
            session = seq.session
            assert session is not None
            if not session.prefill_step():
                return Prefilled(False, None, None)
        seq.inputs_embeds = seq.inputs_embeds[:, :0]  # the cache holds what is needed now
        out = session.prefill_output
        assert out is not None
        summary = PrefillSummary(
            tuple(out.kept_visual.tolist()),
            None if out.visual_attention is None else tuple(out.visual_attention.tolist()),
        )
        return Prefilled(True, Generated(session.last_token, session.done), summary)

    def decode(self, job_ids: Sequence[int]) -> dict[int, Generated]:
        """One new token for each job: one batched forward over the pooled ones."""
        sessions: dict[int, GenerationSession] = {}
        for job_id in job_ids:
            session = self._sequences[job_id].session
            assert session is not None, "decode before the prefill finished"
            sessions[job_id] = session
        pooled = [(i, s) for i, s in sessions.items() if s.cache.pool is not None]
        results: dict[int, Generated] = {}
        with torch.inference_mode():
            if pooled:
                tokens = decode_batch(self._model.llm, [s for _, s in pooled])
                for (job_id, session), token in zip(pooled, tokens, strict=True):
                    results[job_id] = Generated(token, session.done)
            for job_id, session in sessions.items():
                if job_id not in results:  # its prompt did not fit a pool slot: alone
                    results[job_id] = Generated(session.step(), session.done)
        return results

    def release(self, job_id: int) -> None:
        seq = self._sequences.pop(job_id, None)
        if seq is None:
            return
        if seq.key is not None and self._computing.get(seq.key) == job_id:
            del self._computing[seq.key]  # a waiter computes it itself
        if seq.cache.pool is not None:
            self._pool.release(seq.cache)

    # ---- scoring (standing conditions) ------------------------------------------------------

    def score_start(self, round_id: int, request: ScoreRequest) -> None:
        """Plan every question of a round over the same window (no forward pass yet)."""
        names = resolve_streams(request.stream, self._bank.streams())
        views = [self._bank.view(name) for name in names]
        inputs: list[RoundInput] = []
        plans: list[QueryPlan] = []
        visual: torch.Tensor | None = None
        for question in request.questions:
            plan = plan_query(
                scoring_question(question),
                views,
                self._loaded.tokenizer,
                self._limits,
                since=request.since,
                until=request.until,
            )
            if visual is None:  # the same selection for every question of the window
                by_name = {view.stream: view for view in views}
                visual = torch.cat([by_name[p.stream].tokens(p.segments) for p in plan.parts])
                visual = visual.to(device=self._loaded.device, dtype=self._loaded.dtype)
            embeds, start = self._model.splice(list(plan.input_ids), visual)
            inputs.append(RoundInput(embeds, start, visual.shape[0]))
            plans.append(plan)
        keys = {prefix_key(plan) for plan in plans}
        key = keys.pop() if request.share_prefix and len(keys) == 1 else None
        shared = ScoreRound(
            self._model.llm,
            inputs,
            drop=self._loaded.drop,
            yes_no=self._yes_no,
            chunk_tokens=self._run.chunk_tokens,
            cache=self._prefixes,
            key=key,
        )
        self._rounds[round_id] = (shared, plans[0])

    def score_step(self, round_id: int) -> tuple[float, ...] | None:
        """One chunk of the round; its scores once done."""
        return self._rounds[round_id][0].step()

    def score_plan(self, round_id: int) -> tuple[QueryPlan, bool]:
        shared, plan = self._rounds[round_id]
        return plan, shared.prefix_hit

    def score_release(self, round_id: int) -> None:
        self._rounds.pop(round_id, None)

    def stats(self) -> RunnerStats:
        prefixes = self._prefixes
        return RunnerStats(
            prefix_hits=prefixes.stats.hits if prefixes else 0,
            prefix_misses=prefixes.stats.misses if prefixes else 0,
            prefix_bytes=prefixes.nbytes if prefixes else 0,
            kv_pool_bytes=self._pool.nbytes,
            kv_slots_free=self._pool.free_slots,
            unpooled=self._unpooled,
        )

    def _rows(self, text: int, visual: int, new: int) -> tuple[int, ...]:
        return layer_capacity(
            self._model.llm.config.num_hidden_layers,
            max_text=text,
            max_visual=visual,
            max_new=new,
            drop_layers=self._drop_layers,
            drop_ratios=self._drop_ratios,
        )

    # ---- start-up -------------------------------------------------------------------------

    def warm_up(self) -> float:
        """One encode, prefill and batched decode on throw-away inputs (memory untouched);
        returns the seconds it took."""
        started = time.perf_counter()
        model, size = self._model, self._model.image_size
        frames = np.zeros((4, size, size, 3), dtype=np.uint8)
        with torch.inference_mode():
            tokens = model.encode_clips(self._stager.stage([frames]))[0]  # [64, H]
            text = torch.zeros(_WARM_UP_TEXT_TOKENS, dtype=torch.long, device=tokens.device)
            embeds = torch.cat([model.llm.embed(text), tokens.to(self._loaded.dtype)])[None]
            cache = self._pool.acquire()
            try:
                session = GenerationSession(
                    model.llm,
                    embeds,
                    visual_start=_WARM_UP_TEXT_TOKENS,
                    visual_len=tokens.shape[0],
                    drop=self._loaded.drop,
                    sampling=SamplingParams(max_new_tokens=2),
                    stop_ids=frozenset(),
                    cache=cache,
                    chunk_tokens=self._run.chunk_tokens,
                )
                session.prefill()
                if not session.done:
                    decode_batch(model.llm, [session])
            finally:
                self._pool.release(cache)
        return time.perf_counter() - started
