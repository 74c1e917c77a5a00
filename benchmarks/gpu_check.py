"""One-command device check at the full 2B geometry (random weights, bf16 on a GPU).

Measures, on one GPU (H100/H200 class) in well under 8 minutes:

- clips/s for clip encoding at batch 1–32: UMT-L (width 1024, 24 declared / 23 built layers,
  448 px, 3136 tokens per clip) -> HiCo ToMe to 64 -> projector to 1536, uint8 frames
  normalised on the device;
- LLM prefill ms at 8k tokens (28 layers, hidden 1536, 12 / 2 heads, FFN 8960, vocab 151936):
  no dropping, the model card's dropping (uniform0_attention [4, 18], [1, 0.75, 0.25]), and a
  second question resumed from the cached prefix; plus the longest step of a chunked 32k prefill
  vs the whole one (what an encode batch would wait);
- decode tokens/s for 1–8 concurrent answers at ~8k context each (pooled KV, batched);
- each LLM figure per attention backend: sdpa, and flash_attention_2 where flash-attn is
  installed;
- exactness checks in the run's dtype: prefix reuse vs plain prefill (max |Δ logits|), batched
  vs one-at-a-time greedy ids;
- the device thread's time per snapshot chunk (2 MiB of memory rows at hidden 1536) while
  device work is queued: ``memory.maintenance.SnapshotCopy`` (asynchronous into pinned memory,
  the writer waits) vs a synchronous ``.to("cpu")`` of the same rows.

It imports only torch, safetensors and pydantic (through model/ and memory/) and this project's
code: no PyAV, Redis, aiortc or tokenizer. ``--smoke`` runs a tiny geometry on the CPU in
seconds (tested). JSON goes to ``--out`` (default benchmarks/results/gpu_check.json).

    python benchmarks/gpu_check.py            # on the GPU machine
    python benchmarks/gpu_check.py --smoke    # anywhere
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from memory.maintenance import SnapshotCopy
from memory.segments import Segment
from memory.writer import RecordChunk
from model.generation import GenerationSession, SamplingParams, decode_batch
from model.kv import KVCache, KVPool, layer_capacity
from model.prefill import PrefillJob, prefix_job
from model.qwen2 import DropPlan, Qwen2LM
from model.synthetic import UMT_L_448, llm_2b_config, model_card_drop, random_llm, random_vision
from model.vision import VisionConfig

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
MEAN = (0.485, 0.456, 0.406)  # ImageNet, as the official preprocessing
STD = (0.229, 0.224, 0.225)
FORBIDDEN = ("av", "redis", "aiortc", "tokenizers", "cv2")


@dataclass(frozen=True)
class Geometry:
    vision: VisionConfig
    llm_layers: int
    vocab: int
    clip_batches: tuple[int, ...]
    prefill_tokens: int
    long_prefill_tokens: int
    chunk_tokens: int
    decode_concurrency: tuple[int, ...]
    decode_context: int
    decode_steps: int
    repeats: int
    snapshot_segments: int  # 64-row segments in the arena the snapshot chunks are copied from


FULL = Geometry(
    vision=UMT_L_448,
    llm_layers=28,
    vocab=151936,
    clip_batches=(1, 2, 4, 8, 16, 32),
    prefill_tokens=8192,
    long_prefill_tokens=32768,
    chunk_tokens=2048,
    decode_concurrency=(1, 2, 4, 8),
    decode_context=8192,
    decode_steps=32,
    repeats=3,
    snapshot_segments=2048,
)
SMOKE = Geometry(
    vision=VisionConfig(image_size=112, width=64, declared_layers=3, num_heads=4),
    llm_layers=6,
    vocab=512,
    clip_batches=(1, 2),
    prefill_tokens=192,
    long_prefill_tokens=320,
    chunk_tokens=64,
    decode_concurrency=(1, 2),
    decode_context=96,
    decode_steps=3,
    repeats=1,
    snapshot_segments=32,
)
HEADER, QUESTION = 14, 40  # prompt rows before the visual tokens; rows after them


class Clock:
    """Wall time of device work: synchronises before reading the clock on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], repeats: int) -> float:
        """Median seconds of ``fn`` over ``repeats`` runs after one warm-up."""
        fn()
        samples = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)


def clips_per_second(geo: Geometry, clock: Clock, dtype: torch.dtype) -> list[dict[str, Any]]:
    vision, projector = random_vision(geo.vision, 1536, device=clock.device, dtype=dtype)
    cfg = geo.vision
    mean = torch.tensor(MEAN, device=clock.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(STD, device=clock.device).view(1, 1, 3, 1, 1)
    rows = []
    for batch in geo.clip_batches:
        frames = torch.randint(
            0, 256, (batch, 4, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8
        )
        frames = frames.pin_memory() if clock.device.type == "cuda" else frames

        def encode(frames: torch.Tensor = frames) -> None:
            x = frames.to(clock.device, non_blocking=True).float().div_(255.0)
            x = ((x - mean) / std).to(dtype)  # normalised on the device
            with torch.no_grad():
                projector(vision(x), 64)

        seconds = clock.time(encode, geo.repeats)
        rows.append({"batch": batch, "clips_per_s": batch / seconds, "ms_per_batch": 1e3 * seconds})
    return rows


def prefill_figures(lm: Qwen2LM, geo: Geometry, clock: Clock, plan: DropPlan) -> dict[str, Any]:
    hidden = lm.config.hidden_size
    device, dtype = clock.device, lm.dtype
    visual = geo.prefill_tokens - HEADER - QUESTION
    generator = torch.Generator(device=device).manual_seed(0)
    embeds = torch.randn(1, geo.prefill_tokens, hidden, generator=generator, device=device).to(
        dtype
    )
    split = HEADER + visual

    def plain(drop: DropPlan | None) -> Callable[[], object]:
        return lambda: lm.prefill(embeds, visual_start=HEADER, visual_len=visual, drop=drop)

    state = prefix_job(lm, embeds[:, :split], visual_start=HEADER, drop=plan).run_prefix()
    out: dict[str, Any] = {
        "tokens": geo.prefill_tokens,
        "nodrop_ms": 1e3 * clock.time(plain(None), geo.repeats),
        "drop_ms": 1e3 * clock.time(plain(plan), geo.repeats),
        "prefix_compute_ms": 1e3
        * clock.time(
            lambda: prefix_job(lm, embeds[:, :split], visual_start=HEADER, drop=plan).run_prefix(),
            geo.repeats,
        ),
        "prefix_reuse_ms": 1e3
        * clock.time(lambda: PrefillJob.resume(lm, state, embeds[:, split:]).run(), geo.repeats),
        "prefix_state_mib": state.nbytes / 2**20,
    }
    out["reuse_vs_drop"] = out["prefix_reuse_ms"] / out["drop_ms"]
    reused = PrefillJob.resume(lm, state, embeds[:, split:]).run().logits.float()
    full = lm.prefill(embeds, visual_start=HEADER, visual_len=visual, drop=plan).logits.float()
    out["check_prefix_reuse_max_abs_logit_diff"] = float((reused - full).abs().max())
    out["check_prefix_reuse_same_argmax"] = bool(reused.argmax() == full.argmax())

    long_visual = geo.long_prefill_tokens - HEADER - QUESTION
    long_embeds = torch.randn(
        1, geo.long_prefill_tokens, hidden, generator=generator, device=device
    ).to(dtype)

    def step_times(chunk: int | None) -> list[float]:
        job = PrefillJob(
            lm,
            long_embeds,
            visual_start=HEADER,
            visual_len=long_visual,
            drop=plan,
            chunk_tokens=chunk,
        )
        times, done = [], False
        while not done:
            clock.sync()
            start = time.perf_counter()
            done = job.step()
            clock.sync()
            times.append(time.perf_counter() - start)
        return times

    step_times(geo.chunk_tokens)  # warm-up
    whole = sum(step_times(None))
    chunked = step_times(geo.chunk_tokens)
    out["long_prefill"] = {
        "tokens": geo.long_prefill_tokens,
        "chunk_tokens": geo.chunk_tokens,
        "whole_ms": 1e3 * whole,
        "chunked_longest_step_ms": 1e3 * max(chunked),
        "chunked_total_ms": 1e3 * sum(chunked),
        "stall_ratio": max(chunked) / whole,
    }
    return out


def fill(lm: Qwen2LM, cache: KVCache, rows: int, generator: torch.Generator) -> None:
    """Random K/V rows in every layer, as a prefill of ``rows`` tokens would leave."""
    heads, dim = lm.config.num_key_value_heads, lm.config.head_dim
    for layer in cache.layers:
        k = torch.randn(1, heads, rows, dim, generator=generator, device=generator.device)
        layer.append(k.to(lm.dtype), (-k).to(lm.dtype))
    cache.next_position = rows


def decode_figures(lm: Qwen2LM, geo: Geometry, clock: Clock) -> list[dict[str, Any]]:
    n_layers = lm.config.num_hidden_layers
    slots = max(geo.decode_concurrency)
    steps = geo.decode_steps
    capacity = layer_capacity(
        n_layers, max_text=geo.decode_context, max_visual=0, max_new=4 * steps + 8
    )
    pool = KVPool.for_model(
        lm.config, slots=slots, layer_capacity=capacity, device=clock.device, dtype=lm.dtype
    )
    generator = torch.Generator(device=clock.device).manual_seed(1)
    caches = []
    for _ in range(slots):
        caches.append(pool.acquire())
        fill(lm, caches[-1], geo.decode_context - 2 * steps - 4, generator)
    rows = []
    for n in geo.decode_concurrency:
        tokens = torch.arange(n, device=clock.device)
        batch = caches[:n]

        marks = [(c.lengths(), c.next_position) for c in batch]

        def run(
            batch: list[KVCache] = batch,
            marks: list[tuple[list[int], int]] = marks,
            tokens: torch.Tensor = tokens,
        ) -> None:
            for cache, (lengths, position) in zip(batch, marks, strict=True):
                cache.truncate(lengths, position)  # every run decodes at the same context
            for _ in range(steps):
                lm.decode_batch(tokens, batch)

        seconds = clock.time(run, geo.repeats)
        rows.append(
            {
                "concurrent": n,
                "tokens_per_s": n * steps / seconds,
                "ms_per_step": 1e3 * seconds / steps,
                "context": geo.decode_context,
            }
        )
    for cache in caches:
        pool.release(cache)
    return rows


def batched_greedy_check(lm: Qwen2LM, device: torch.device) -> dict[str, Any]:
    """Greedy ids of 3 ragged prompts decoded together equal each decoded alone."""
    hidden = lm.config.hidden_size
    generator = torch.Generator(device=device).manual_seed(2)
    prompts = [
        torch.randn(1, n, hidden, generator=generator, device=device).to(lm.dtype)
        for n in (70, 110, 90)
    ]
    max_new = 8
    capacity = layer_capacity(
        lm.config.num_hidden_layers, max_text=128, max_visual=0, max_new=max_new
    )
    pool = KVPool.for_model(
        lm.config, slots=3, layer_capacity=capacity, device=device, dtype=lm.dtype
    )

    def session(embeds: torch.Tensor, cache: KVCache | None) -> GenerationSession:
        return GenerationSession(
            lm, embeds, visual_start=4, visual_len=48, drop=None,
            sampling=SamplingParams(max_new_tokens=max_new), stop_ids=frozenset(), cache=cache,
        )  # fmt: skip

    alone = []
    for embeds in prompts:
        s = session(embeds, None)
        s.prefill()
        while s.step() is not None:
            pass
        alone.append(s.new_tokens)
    together = [session(embeds, pool.acquire()) for embeds in prompts]
    for s in together:
        s.prefill()
    while live := [s for s in together if not s.done]:
        decode_batch(lm, live)
    same = [a == s.new_tokens for a, s in zip(alone, together, strict=True)]
    return {"check_batched_greedy_same": all(same), "per_sequence": same}


def snapshot_copy_figures(geo: Geometry, clock: Clock, dtype: torch.dtype) -> dict[str, Any]:
    """Device-thread ms per snapshot chunk with device work queued before it (as between engine
    steps): the daemon's ``SnapshotCopy.next_chunk`` vs a synchronous copy of the same rows.
    On a CPU both are copies; on a GPU the synchronous one waits for the queued work."""
    hidden, device = 1536, clock.device
    rows = 64 * geo.snapshot_segments
    storage = torch.randn(rows, hidden, device=device).to(dtype)
    sizes = torch.ones(rows, device=device)
    segments = tuple(
        Segment(start=float(i), end=float(i + 1), offset=64 * i, count=64)
        for i in range(geo.snapshot_segments)
    )
    chunk_rows = 64 * max(1, (2 << 20) // (64 * hidden * storage.element_size()))  # whole segments
    busy = torch.randn(4096, 4096, device=device, dtype=dtype)

    def queue_work() -> None:  # device work in flight, as an engine step leaves it
        for _ in range(4 if device.type == "cuda" else 1):
            busy @ busy

    def chunks(copy_rows: Callable[[int, int], object]) -> list[float]:
        samples, waits = [], []
        for lo in range(0, rows, chunk_rows):
            clock.sync()
            queue_work()
            start = time.perf_counter()
            out = copy_rows(lo, min(rows, lo + chunk_rows))
            samples.append(time.perf_counter() - start)
            waits.append(out)
        clock.sync()
        for out in waits:  # the writer thread's wait (done here, after the timing)
            ready = getattr(out, "ready", None)
            if ready is not None:
                ready.synchronize()
        return samples

    def synchronous(lo: int, hi: int) -> object:
        return storage[lo:hi].to("cpu"), sizes[lo:hi].to("cpu")

    copy = SnapshotCopy(
        stream="cam", job=1, version=1, segments=segments, storage=storage, sizes=sizes,
        known=frozenset(), chunk_rows=chunk_rows, saved_at=0.0,
    )  # fmt: skip
    copied: list[RecordChunk] = []

    def pieces(lo: int, hi: int) -> object:
        chunk = copy.next_chunk()
        copied.append(chunk)
        return chunk

    old, new = chunks(synchronous), chunks(pieces)
    same = all(
        torch.equal(c.tokens, storage[c.segments[0].offset : c.segments[-1].offset + 64].cpu())
        for c in copied
        if c.segments
    )
    return {
        "chunk_rows": chunk_rows,
        "chunks": len(new),
        "synchronous_ms": {"median": 1e3 * statistics.median(old), "max": 1e3 * max(old)},
        "snapshot_copy_ms": {"median": 1e3 * statistics.median(new), "max": 1e3 * max(new)},
        "check_rows_same": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny geometry on the CPU")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sections past this")
    args = parser.parse_args()
    started = time.perf_counter()
    geo = SMOKE if args.smoke else FULL
    if args.smoke:  # tiny tensors: extra intra-op threads only wait on a shared CPU
        torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    clock = Clock(device)
    result: dict[str, Any] = {
        "figure": "full 2B geometry device check" if not args.smoke else "smoke (tiny, CPU)",
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "geometry": {**asdict(geo), "vision": asdict(geo.vision)},
        "llm_shapes": "hidden 1536, 12/2 heads, FFN 8960" if not args.smoke else "tiny",
        "skipped": [],
    }
    if not cuda and not args.smoke:
        result["warning"] = "no CUDA device: full geometry on the CPU will be very slow"

    def over_budget(section: str) -> bool:
        if time.perf_counter() - started > args.budget_s:
            result["skipped"].append(section)
            return True
        return False

    result["clips"] = clips_per_second(geo, clock, dtype)
    if args.smoke:
        config = llm_2b_config(num_layers=geo.llm_layers, vocab_size=geo.vocab)
        config = type(config)(
            **{
                **asdict(config),
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_attention_heads": 4,
            }
        )
    else:
        config = llm_2b_config(num_layers=geo.llm_layers, vocab_size=geo.vocab)
    lm = random_llm(config, device=device, dtype=dtype)
    plan = model_card_drop(geo.llm_layers)
    result["plan"] = {"kind": plan.kind, "layers": plan.layers, "ratios": plan.ratios}
    backends = ["sdpa"]
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        backends.append("flash_attention_2")
    result["backends"] = {}
    for name in backends:
        lm.set_attention(name)
        figures: dict[str, Any] = {}
        if not over_budget(f"prefill:{name}"):
            figures["prefill"] = prefill_figures(lm, geo, clock, plan)
        if not over_budget(f"decode:{name}"):
            figures["decode"] = decode_figures(lm, geo, clock)
        if not over_budget(f"checks:{name}"):
            figures["checks"] = batched_greedy_check(lm, device)
        result["backends"][name] = figures
        if cuda:
            figures["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if not over_budget("snapshot_copy"):
        result["snapshot_copy"] = snapshot_copy_figures(geo, clock, dtype)
    result["imported_forbidden"] = sorted(m for m in FORBIDDEN if m in sys.modules)
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("device", "dtype", "seconds", "skipped")}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
