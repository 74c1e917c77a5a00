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
  engine (``answers.IncrementalText``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from memory.bank import MemoryBank, MemoryStats
from model.errors import MemoryStoreError, QueryError
from model.generation import SamplingParams, next_token
from model.loader import LoadedModel
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_square
from model.prompt import stop_token_ids
from model.qwen2 import PrefillOutput
from streamer.engine.answers import PrefillSummary
from streamer.engine.planner import PlanLimits, QueryPlan, plan_query, resolve_streams
from streamer.engine.types import Query
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
    left: int  # prompt tokens still to prefill (0: the prefill is complete)
    first: Generated | None  # the first answer token, once complete
    summary: PrefillSummary | None


@dataclass
class _Sequence:
    """Device-side state of one job."""

    plan: QueryPlan
    inputs_embeds: torch.Tensor  # [1, L, H]; emptied once prefilled
    visual_start: int
    visual_len: int
    sampling: SamplingParams
    generator: torch.Generator
    output: PrefillOutput | None = None
    tokens: list[int] = field(default_factory=list)


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


class Runner:
    def __init__(self, loaded: LoadedModel, bank: MemoryBank, limits: PlanLimits) -> None:
        self._loaded = loaded
        self._bank = bank
        self._limits = limits
        self._model = loaded.model
        self._stager = FrameStager(loaded.device, loaded.dtype, loaded.model.image_size)
        self._stop_ids = stop_token_ids(loaded.tokenizer)
        self._sequences: dict[int, _Sequence] = {}
        self._fps: dict[str, float] = {}
        # Memory statistics as of the last change, published for the event loop to read
        # (a dict of immutable snapshots, replaced entry by entry).
        self.memory_stats: dict[str, MemoryStats] = {}
        # The memory's bounded maintenance slices, where the bank offers them (the seam for
        # consolidation off the append path; until then consolidation runs inside append).
        self._maintenance_due: Callable[[], bool] | None = getattr(bank, "maintenance_due", None)
        self._run_maintenance: Callable[[float], object] | None = getattr(
            bank, "run_maintenance", None
        )
        self.maintenance_due = False

    # ---- memory -----------------------------------------------------------------------

    def set_fps(self, stream: str, fps: float) -> None:
        self._fps[stream] = fps

    def refresh_stats(self, streams: Sequence[str] | None = None) -> None:
        for name in self._bank.streams() if streams is None else streams:
            self.memory_stats[name] = self._bank.stats(name, self._fps.get(name, 1.0))
        self._check_maintenance()

    def encode(self, clips: Sequence[Clip]) -> EncodeOutcome:
        """Encode clips into memory; a failed batch is retried clip by clip to name the cause."""
        encoded: dict[str, int] = {}
        refused: dict[str, int] = {}
        failures: list[ClipFailure] = []
        try:
            tokens = self._encode_tokens(clips)
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
                failures.extend(outcome.failures)
            return EncodeOutcome(encoded, refused, tuple(failures))
        for clip, clip_tokens in zip(clips, tokens, strict=True):
            try:
                self._bank.append_clip(clip.stream, clip_tokens, clip.start, clip.end)
            except MemoryStoreError as exc:  # e.g. a file restarted behind restored memory
                refused[clip.stream] = refused.get(clip.stream, 0) + 1
                log.debug("memory refused a clip of %s: %s", clip.stream, exc)
            else:
                encoded[clip.stream] = encoded.get(clip.stream, 0) + 1
        self.refresh_stats(sorted({clip.stream for clip in clips}))
        return EncodeOutcome(encoded, refused, tuple(failures))

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

    def maintenance(self, budget_s: float) -> None:
        if self._run_maintenance is not None:
            self._run_maintenance(budget_s)
        self._check_maintenance()

    def _check_maintenance(self) -> None:
        self.maintenance_due = bool(self._maintenance_due is not None and self._maintenance_due())

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
        generator = torch.Generator(device=self._model.llm.lm_head.weight.device)
        generator.seed()
        self._sequences[job_id] = _Sequence(
            plan, inputs_embeds, visual_start, visual.shape[0], sampling, generator
        )
        return Started(plan, inputs_embeds.shape[1])

    def prefill(self, job_id: int, max_tokens: int) -> Prefilled:
        """Advance the job's prefill by at most ``max_tokens`` prompt tokens."""
        seq = self._sequences[job_id]
        if seq.output is not None:
            raise QueryError("prefill requested twice")
        with torch.inference_mode():
            seq.output = self._model.llm.prefill(
                seq.inputs_embeds,
                visual_start=seq.visual_start,
                visual_len=seq.visual_len,
                drop=self._loaded.drop,
            )
        seq.inputs_embeds = seq.inputs_embeds[:, :0]  # the cache holds what is needed now
        first = self._accept(seq, seq.output.logits[0, -1])
        out = seq.output
        summary = PrefillSummary(
            tuple(out.kept_visual.tolist()),
            None if out.visual_attention is None else tuple(out.visual_attention.tolist()),
        )
        return Prefilled(0, first, summary)

    def decode(self, job_ids: Sequence[int]) -> dict[int, Generated]:
        """One new token for each job (time-sliced until the batched primitive lands)."""
        results: dict[int, Generated] = {}
        with torch.inference_mode():
            for job_id in job_ids:
                seq = self._sequences[job_id]
                assert seq.output is not None and seq.tokens
                logits = self._model.llm.decode(seq.tokens[-1], seq.output.cache)
                results[job_id] = self._accept(seq, logits)
        return results

    def release(self, job_id: int) -> None:
        self._sequences.pop(job_id, None)

    def _accept(self, seq: _Sequence, logits: torch.Tensor) -> Generated:
        token = next_token(logits, seq.sampling, seq.generator)  # the one host sync per token
        if token in self._stop_ids:
            return Generated(None, True)
        seq.tokens.append(token)
        return Generated(token, len(seq.tokens) >= seq.sampling.max_new_tokens)

    # ---- start-up -------------------------------------------------------------------------

    def warm_up(self) -> float:
        """One encode, prefill and decode on throw-away inputs; returns the seconds it took."""
        started = time.perf_counter()
        model, size = self._model, self._model.image_size
        frames = np.zeros((4, size, size, 3), dtype=np.uint8)
        with torch.inference_mode():
            tokens = model.encode_clips(self._stager.stage([frames]))[0]  # [64, H]
            text = torch.zeros(_WARM_UP_TEXT_TOKENS, dtype=torch.long, device=tokens.device)
            embeds = torch.cat([model.llm.embed(text), tokens.to(self._loaded.dtype)])[None]
            out = model.llm.prefill(
                embeds, visual_start=_WARM_UP_TEXT_TOKENS, visual_len=0, drop=None
            )
            model.llm.decode(int(out.logits[0, -1].argmax().item()), out.cache)
        return time.perf_counter() - started
