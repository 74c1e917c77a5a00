"""Shared pieces of the ``query_*`` benchmarks: a scaled-down model, an in-memory reply sink,
an engine run as a task, a private redis-server, and small statistics helpers.

Not a benchmark itself (the leading underscore keeps it out of "one command per figure").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from memory.bank import MemoryBank
from memory.settings import MemorySettings
from model.errors import FlashwatchError
from model.loader import LoadedModel
from model.prompt import byte_level_tokenizer
from model.qwen2 import DropPlan
from model.tiny import build_random, tiny_config
from sinks.domain import ticket_of
from sinks.schema import QueryRequest
from streamer.engine.core import Engine
from streamer.engine.errors import QueryError
from streamer.engine.runner import Generated, Prefilled
from streamer.engine.scheduler import PrefillChunk
from streamer.engine.types import Answer, Ticket
from streamer.ingest.queues import DropQueue
from streamer.ingest.types import Clip

RESULTS = Path(__file__).resolve().parent / "results"
# The model-card recipe (VideoChat-Flash §5) on a 28-layer decoder, as in model_prefill_drop.
DROP_PLAN = DropPlan("uniform0_attention", (4, 18), (1.0, 0.75, 0.25))
CLIP_TOKENS = 64  # HiCo: 16 tokens per frame, 4 frames per clip


def scaled_loaded(
    hidden: int,
    *,
    layers: int = 28,
    drop: DropPlan | None,
    seed: int = 0,
    heads: tuple[int, int] = (4, 2),
    ffn: int | None = None,
) -> LoadedModel:
    """The tiny vision tower with a Qwen2 decoder of real depth and reduced width.

    ``layers`` decoder layers of width ``hidden`` (``heads``: 4 query / 2 KV heads, FFN ``ffn``
    or 4x), vocab 512 and the byte-level tokenizer; random weights (answers are nonsense; their
    cost is not). ``scaled_loaded(1536, heads=(12, 2), ffn=8960)`` is the 2B checkpoint's width.
    """
    base = tiny_config()
    llm = dataclasses.replace(
        base.llm,
        hidden_size=hidden,
        intermediate_size=ffn or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads[0],
        num_key_value_heads=heads[1],
    )
    config = dataclasses.replace(base, llm=llm)
    model = build_random(config, seed)
    fingerprint = hashlib.sha256(f"{config.canonical_json()}|seed={seed}".encode()).hexdigest()
    return LoadedModel(
        model=model,
        tokenizer=byte_level_tokenizer(),
        fingerprint=fingerprint,
        device=torch.device("cpu"),
        dtype=torch.float32,
        attention="sdpa",
        drop=drop,
        max_context_tokens=32768,
    )


@dataclasses.dataclass
class MemoryReplies:
    """An in-memory reply sink: each request's final answer or error resolves a future."""

    tokens: int = 0
    _waiting: dict[str, asyncio.Future[Answer]] = dataclasses.field(default_factory=dict)

    def expect(self, request_id: str) -> asyncio.Future[Answer]:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return future

    async def token(self, request_id: str, index: int, text: str) -> None:
        self.tokens += 1

    async def finish(self, ticket: Ticket, answer: Answer) -> None:
        future = self._waiting.pop(ticket.request.id, None)
        if future is not None and not future.done():
            future.set_result(answer)

    async def fail(self, ticket: Ticket, error: QueryError) -> None:
        future = self._waiting.pop(ticket.request.id, None)
        if future is not None and not future.done():
            future.set_exception(error)


class LagRecordingBank(MemoryBank):
    """A MemoryBank that notes, for each live clip appended, its end and when it reached memory
    (wall clock); ``lags`` are the differences (seconds)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recording = False
        self.arrivals: list[tuple[float, float]] = []  # (clip end, stored at)

    def append_clip(
        self, stream: str, tokens: torch.Tensor, start: float, end: float, *, static: bool = False
    ) -> None:
        super().append_clip(stream, tokens, start, end, static=static)
        if self.recording:  # list.append is atomic: read on the loop later
            self.arrivals.append((end, time.time()))

    @property
    def lags(self) -> list[float]:
        return [stored - end for end, stored in self.arrivals]


def history_bank(
    loaded: LoadedModel, rng: np.random.Generator, *, clips: int, clip_s: float, budget_mb: float
) -> tuple[LagRecordingBank, float]:
    """A bank whose stream "cam" holds ``clips`` random clips ending now, recording the live
    clips appended after it; returns it and that "now"."""
    hidden = loaded.model.hidden_size
    bank = LagRecordingBank(
        MemorySettings(budget_mb=budget_mb),
        hidden_size=hidden,
        dtype=torch.float32,
        device=torch.device("cpu"),
        fingerprint=loaded.fingerprint,
    )
    bank.add_stream("cam")
    now = time.time()
    for i in range(clips):
        end = now - clip_s * (clips - 1 - i)
        bank.append_clip("cam", random_clip_tokens(rng, hidden), end - clip_s, end)
    bank.recording = True
    return bank, now


@dataclasses.dataclass
class LiveClips:
    """A live camera for an engine: one 4-frame clip every ``clip_s`` wall-clock seconds after
    ``after`` into a bounded clip queue, each clip available at its end time."""

    engine: Engine
    loaded: LoadedModel
    rng: np.random.Generator
    after: float
    clip_s: float
    produced: int = 0

    def __post_init__(self) -> None:
        self.queue: DropQueue[Clip] = DropQueue(256, "drop_oldest", name="clips")
        self.queue.bind(asyncio.get_running_loop())
        self.engine.add_source("cam", self.queue)
        size = self.loaded.model.image_size
        self.frames = [
            self.rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8) for _ in range(4)
        ]

    async def run(self) -> None:
        while True:
            end = self.after + self.clip_s * (self.produced + 1)
            await asyncio.sleep(max(0.0, end - time.time()))
            frames = self.frames[self.produced % len(self.frames)]
            self.queue.put_nowait(Clip("cam", self.produced, frames, end - self.clip_s, end))
            self.produced += 1


def warm_up(loaded: LoadedModel, visual: int, *, decode_steps: int = 4) -> None:
    """One prefill (and ``decode_steps`` decode steps) at a benchmark's size, and one encode
    batch: the allocator and the kernels are warm before anything is timed."""
    llm = loaded.model.llm
    embeds = torch.randn(1, visual + 80, loaded.model.hidden_size)
    with torch.inference_mode():
        out = llm.prefill(embeds, visual_start=14, visual_len=visual, drop=loaded.drop)
        for _ in range(decode_steps):
            llm.decode(65, out.cache)
        size = loaded.model.image_size
        loaded.model.encode_clips(torch.randn(2, 4, 3, size, size))


class WholeAnswerEngine(Engine):
    """The baseline: an answer's prefill and all its decode steps run as one device call.

    Same planner, runner and replies as ``Engine``; only the scheduling differs, so clips that
    arrive during an answer wait until it is complete.
    """

    async def _prefill(self, item: PrefillChunk) -> None:
        job = self._jobs.get(item.job_id)
        if job is None:
            return
        runner = self.runner

        def whole_answer() -> tuple[Prefilled, list[Generated]]:
            prefilled = runner.prefill(job.id, 0)
            while not prefilled.done:  # every chunk, no encoding between
                prefilled = runner.prefill(job.id, 0)
            assert prefilled.first is not None
            steps = [prefilled.first]
            while not steps[-1].finished:
                steps.append(runner.decode([job.id])[job.id])
            return prefilled, steps

        try:
            prefilled, steps = await self.on_device(whole_answer)
        except (FlashwatchError, RuntimeError) as exc:
            self._fail_job(job, exc, "whole answer")
            return
        job.first_token_at = self._clock()
        self._running[job.id].summary = prefilled.summary
        job.phase = "decode"
        for step in steps:
            self._accept(job, step)


async def ask_engine(
    engine: Engine, replies: MemoryReplies, question: str, *, now: float, **fields: Any
) -> Answer:
    """Submit one question to a running engine and wait for its answer (errors raise)."""
    request = QueryRequest.model_validate({"question": question, "stream": "cam", **fields})
    future = replies.expect(request.id)
    await engine.submit(ticket_of(request, None, now))
    return await future


@contextlib.asynccontextmanager
async def running(engine: Engine) -> AsyncIterator[Engine]:
    """``engine.run()`` as a task for the duration of the block; closed afterwards."""
    task = asyncio.create_task(engine.run())
    try:
        yield engine
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        engine.close()


def random_clip_tokens(rng: np.random.Generator, hidden: int) -> torch.Tensor:
    """[64, hidden] float32 tokens with roughly the scale of projector outputs."""
    return torch.from_numpy(rng.standard_normal((CLIP_TOKENS, hidden), dtype=np.float32))


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, p50, p95, max, min of a sample (None fields for an empty one)."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "max": None, "min": None}
    array = np.asarray(values, dtype=float)
    return {
        "n": len(values),
        "mean": float(array.mean()),
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "max": float(array.max()),
        "min": float(array.min()),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0.0:
        return None
    return numerator / denominator


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def machine() -> dict[str, Any]:
    """Where the numbers came from (load matters: other processes share the 2 cores)."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m_at_end": os.getloadavg()[0],
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    """``benchmarks/results/<name>.json``, or under ``$FLASHWATCH_BENCH_RESULTS`` when set (the
    benchmarks' smoke tests, which must not overwrite the figures)."""
    folder = Path(os.environ.get("FLASHWATCH_BENCH_RESULTS") or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


# ---- a private redis-server (for the daemon benchmark) ---------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def private_redis(workdir: Path, timeout_s: float = 10.0) -> Iterator[str]:
    """A redis-server on a free loopback port without persistence; yields its URL, stops it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"redis-server did not come up on port {port}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
