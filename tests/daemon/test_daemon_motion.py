"""Motion-gated clips through the engine with the tiny model: static spans in memory and answers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import streamer.engine.runner as engine_runner
from memory.bank import MemoryBank
from memory.segments import Segment
from memory.settings import MemorySettings
from model.loader import LoadedModel, load_model
from model.settings import DropSettings, ModelSettings
from sinks.domain import ticket_of
from sinks.schema import QueryRequest
from sinks.settings import QuerySettings
from streamer.engine.core import Engine
from streamer.engine.errors import QueryError
from streamer.engine.planner import MAX_STATIC_NAMED, StreamPart, describe_video, format_time
from streamer.engine.settings import EngineSettings
from streamer.engine.types import Answer, Ticket
from streamer.ingest.queues import DropQueue
from streamer.ingest.types import Clip, Gate

T0 = 1_800_000_000.0  # a wall-clock epoch second
CLIP_S = 2.0


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(ModelSettings(drop=DropSettings(layers=(1, 2))))


class Replies:
    def __init__(self) -> None:
        self.finals: dict[str, Answer] = {}
        self.errors: dict[str, QueryError] = {}
        self.done = asyncio.Event()

    async def token(self, request_id: str, index: int, text: str) -> None:
        pass

    async def finish(self, ticket: Ticket, answer: Answer) -> None:
        self.finals[ticket.request.id] = answer
        self.done.set()

    async def fail(self, ticket: Ticket, error: QueryError) -> None:
        self.errors[ticket.request.id] = error
        self.done.set()


async def until(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def gated_clips(size: int, gates: list[Gate]) -> list[Clip]:
    rng = np.random.default_rng(0)
    clips = []
    for seq, gate in enumerate(gates):
        shape = (4 if gate.encoded else 0, size, size, 3)
        frames = rng.integers(0, 256, shape, dtype=np.uint8)
        start = T0 + CLIP_S * seq
        clips.append(Clip("cam", seq, frames, start, start + CLIP_S, gate))
    return clips


async def test_a_question_over_a_static_span(loaded: LoadedModel, monkeypatch) -> None:
    bank = MemoryBank(
        MemorySettings(budget_mb=4.0),
        hidden_size=loaded.model.hidden_size,
        dtype=loaded.dtype,
        device=loaded.device,
        fingerprint=loaded.fingerprint,
    )
    bank.add_stream("cam")
    replies = Replies()
    engine = Engine(
        loaded,
        bank,
        replies,
        QuerySettings(),
        EngineSettings(encode_batch_clips=4),
        clock=lambda: T0 + 120.0,
    )
    queue: DropQueue[Clip] = DropQueue(64, "drop_oldest", name="clips")
    engine.add_source("cam", queue, fps=2.0)
    queue.bind(asyncio.get_running_loop())
    plans: list[Any] = []
    real_plan_query = engine_runner.plan_query

    def spy(*args: Any, **kwargs: Any) -> Any:
        plans.append(real_plan_query(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(engine_runner, "plan_query", spy)
    S, K, M = Gate.SKIPPED, Gate.KEEPALIVE, Gate.MOTION
    # motion until 2 s, static 2-60 s (one keep-alive encode at 30 s), motion again at 60 s
    gates = [Gate.FIRST] + [S] * 14 + [K] + [S] * 14 + [M, M]
    for clip in gated_clips(loaded.model.image_size, gates):
        queue.put_nowait(clip)
    task = asyncio.create_task(engine.run())
    try:
        # the bank changes on the device thread before the engine counts the batch
        await until(lambda: bank.view("cam").span == (T0, T0 + CLIP_S * len(gates)))
        await until(lambda: engine.stats().clips_encoded >= 4)
        assert engine.stats().clips_encoded == 4  # first, keep-alive, two with motion
        assert bank.view("cam").tokens_held == 4 * 64
        request = QueryRequest.model_validate(
            {"question": "Did anything happen?", "stream": "cam", "max_new_tokens": 4}
        )
        await engine.submit(ticket_of(request, "1-0", received_at=T0 + 120.0))
        await until(replies.done.is_set)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        engine.close()
    assert not replies.errors, replies.errors
    answer = replies.finals[request.id]
    static_start, static_end = T0 + CLIP_S, T0 + 30 * CLIP_S
    assert [(s.start, s.end) for s in answer.static] == [(static_start, static_end)]
    assert not answer.gaps  # static is not a gap
    assert answer.history is not None
    assert answer.history == (T0, T0 + CLIP_S * len(gates))
    (plan,) = plans
    sentence = f"No change was seen from {format_time(static_start)} to {format_time(static_end)}"
    assert sentence in plan.prompt
    stats = engine.memory_stats("cam")
    assert stats is not None and stats.static_seconds == pytest.approx(static_end - static_start)


def test_many_static_spans_are_summed_up() -> None:
    clip = Segment(0.0, 1.0, 0, 64)
    statics = tuple((100.0 * i, 100.0 * i + 10.0 + i) for i in range(MAX_STATIC_NAMED + 3))
    text = describe_video([StreamPart("cam", (clip,), (), statics)])
    assert text.count("No change was seen") == MAX_STATIC_NAMED
    assert "3 shorter spans without change (33 s in total)" in text  # 10 + 11 + 12
    assert "from 0.0 s to 10.0 s" not in text  # the shortest are summed, not named
    two = describe_video(
        [StreamPart("a", (clip,), (), ((0.0, 5.0),)), StreamPart("b", (clip,), (), ())]
    )
    assert "No change was seen on a from 0.0 s to 5.0 s" in two
