"""Scoring standing conditions with the real tiny model: P(yes) from one shared prefill."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import torch

from model.loader import LoadedModel, load_model
from model.prefill import PrefillJob
from model.settings import DropSettings, ModelSettings
from streamer.engine.errors import Busy, InvalidRequest, UnknownStream
from streamer.engine.planner import plan_query
from streamer.engine.scoring import scoring_question, yes_no_ids
from streamer.engine.settings import EngineSettings
from streamer.engine.types import Query, ScoreRequest
from tests.daemon.test_daemon_engine import T0, Rig, make_rig

QUESTIONS = tuple(f"Is there a {thing} in view?" for thing in (
    "person", "car", "dog", "cat", "bicycle", "truck", "bird", "boat",
    "bus", "horse", "sheep", "cow", "train", "chair", "plane", "door",
))  # fmt: skip


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(ModelSettings(drop=DropSettings(layers=(1, 2))))


@pytest.fixture
async def rig(loaded: LoadedModel) -> AsyncIterator[Rig]:
    rig = make_rig(loaded, clock=lambda: T0 + 60.0)
    rig.clips.bind(asyncio.get_running_loop())
    task = asyncio.create_task(rig.engine.run())
    rig.feed(6)
    await rig.until(lambda: rig.engine.stats().clips_encoded == 6)
    yield rig
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    rig.engine.close()


def window(**kw: object) -> ScoreRequest:
    fields: dict[str, object] = {"stream": ("cam",), "since": T0 + 4.0, "until": T0 + 12.0, **kw}
    return ScoreRequest(**fields)  # type: ignore[arg-type]


def plain_score(loaded: LoadedModel, rig: Rig, question: str, since: float, until: float) -> float:
    """The softmax over the first answer token's Yes/No logits of one plain, unshared prefill."""
    view = rig.bank.view("cam")
    limits = rig.engine.runner._limits  # the engine's own budgets
    plan = plan_query(scoring_question(question), [view], loaded.tokenizer, limits,
                      since=since, until=until)  # fmt: skip
    visual = torch.cat([view.tokens(p.segments) for p in plan.parts]).to(loaded.dtype)
    embeds, start = loaded.model.splice(list(plan.input_ids), visual)
    with torch.inference_mode():
        out = PrefillJob(loaded.model.llm, embeds, visual_start=start,
                         visual_len=visual.shape[0], drop=loaded.drop).run()  # fmt: skip
    yes, no = yes_no_ids(loaded.tokenizer)
    logits = out.logits[0, -1].float()
    return float(torch.exp(logits[yes]) / (torch.exp(logits[yes]) + torch.exp(logits[no])))


async def test_score_is_the_yes_no_softmax_of_a_plain_prefill(
    rig: Rig, loaded: LoadedModel
) -> None:
    scores = await rig.engine.score(window(questions=(QUESTIONS[0],)))
    expected = await rig.engine.on_device(
        plain_score, loaded, rig, QUESTIONS[0], T0 + 4.0, T0 + 12.0
    )
    assert 0.0 < scores.values[0] < 1.0
    assert scores.values[0] == pytest.approx(expected, abs=1e-5)
    assert scores.history[0] >= T0 + 4.0 and scores.history[1] <= T0 + 12.0
    assert scores.device_s > 0.0


async def test_a_question_alone_equals_it_in_a_round_of_16(rig: Rig) -> None:
    alone = await rig.engine.score(window(questions=(QUESTIONS[3],)))
    hits_before = rig.engine.stats().prefix_hits
    round_ = await rig.engine.score(window(questions=QUESTIONS))
    assert round_.prefix_hit  # the window's prefix came from the cache
    assert rig.engine.stats().prefix_hits == hits_before + 1  # one prefix for all 16
    assert round_.values[3] == pytest.approx(alone.values[0], abs=1e-5)
    unshared = await rig.engine.score(window(questions=QUESTIONS, share_prefix=False))
    assert unshared.values == pytest.approx(round_.values, abs=1e-5)
    assert len(set(round_.values)) > 1  # the questions do change the score


async def test_typed_errors(rig: Rig) -> None:
    with pytest.raises(InvalidRequest):
        await rig.engine.score(window(questions=()))
    with pytest.raises(InvalidRequest):
        await rig.engine.score(window(questions=("  ",)))
    with pytest.raises(UnknownStream):
        await rig.engine.score(window(questions=("Yes?",), stream=("nowhere",)))


async def test_busy_past_the_bound_and_generate_in_process(loaded: LoadedModel) -> None:
    settings = EngineSettings(encode_batch_clips=4, evaluation_max_queued=1)
    rig = make_rig(loaded, clock=lambda: T0 + 60.0, engine=settings)
    waiting = asyncio.ensure_future(rig.engine.score(window(questions=("Person?",))))
    await asyncio.sleep(0)
    with pytest.raises(Busy):
        await rig.engine.score(window(questions=("Person?",)))
    rig.clips.bind(asyncio.get_running_loop())
    task = asyncio.create_task(rig.engine.run())
    try:
        rig.feed(6)
        assert 0.0 < (await asyncio.wait_for(waiting, 60)).values[0] < 1.0
        answer = await rig.engine.generate(
            Query(id="explain-1", question="What happened?", stream=("cam",), max_new_tokens=8)
        )
        assert answer.tokens >= 1 and answer.id == "explain-1"
        assert rig.replies.finals == {} and rig.replies.tokens == []  # nothing published
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        rig.engine.close()
