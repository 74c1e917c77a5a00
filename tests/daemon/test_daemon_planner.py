"""The query planner over real memory views, with the byte-level tokenizer."""

from __future__ import annotations

import pytest
import torch

from memory.bank import MemoryBank
from memory.settings import MemorySettings
from model.errors import PromptTooLongError
from model.prompt import IMAGE_TOKEN_INDEX, byte_level_tokenizer
from streamer.engine.errors import EmptyMemory, UnknownStream
from streamer.engine.planner import PlanLimits, describe_video, plan_query, resolve_streams

T0 = 1_800_000_000.0
H = 8
LIMITS = PlanLimits(
    max_context_tokens=4096, max_visual_tokens=512, tokens_per_frame=16, reserve_new_tokens=64
)
TOKENIZER = byte_level_tokenizer()


def bank_with(streams: dict[str, int], *, gap: tuple[float, float] | None = None) -> MemoryBank:
    """Streams of ``n`` 2-second clips from T0; ``gap`` makes an outage in the first stream."""
    bank = MemoryBank(
        MemorySettings(budget_mb=8.0), hidden_size=H, dtype=torch.float32,
        device=torch.device("cpu"), fingerprint="test",
    )  # fmt: skip
    for name, clips in streams.items():
        bank.add_stream(name)
        t = T0
        for i in range(clips):
            if gap is not None and name == next(iter(streams)) and i == clips // 2:
                bank.add_gap(name, t, gap[1], "disconnected")
                t = gap[1]
            bank.append_clip(name, torch.full((64, H), float(i)), t, t + 2.0)
            t += 2.0
    return bank


def test_all_streams_and_unknown_names() -> None:
    assert resolve_streams(("*",), ["a", "b"]) == ["a", "b"]
    assert resolve_streams(("b",), ["a", "b"]) == ["b"]
    with pytest.raises(UnknownStream, match="nope"):
        resolve_streams(("a", "nope"), ["a", "b"])


def test_everything_fits_and_the_prompt_is_official() -> None:
    bank = bank_with({"cam": 4})
    plan = plan_query("What happened?", [bank.view("cam")], TOKENIZER, LIMITS)
    assert plan.visual_tokens == 256 and plan.frames == 16
    assert plan.history == (T0, T0 + 8.0)
    assert plan.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert plan.prompt.endswith(
        "<image>\nThe video lasts for 8.00 seconds, and 16 frames are uniformly sampled from it. "
        "What happened?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_long_history_is_sampled_uniformly_under_the_budget() -> None:
    bank = bank_with({"cam": 40})  # 2,560 tokens, budget 512 -> 8 clips
    plan = plan_query("q", [bank.view("cam")], TOKENIZER, LIMITS)
    segments = plan.parts[0].segments
    assert plan.visual_tokens <= LIMITS.max_visual_tokens
    assert len(segments) == 8
    starts = [s.start for s in segments]
    assert starts == sorted(starts)
    assert starts[0] < T0 + 10.0 and starts[-1] > T0 + 60.0  # spread over the whole range


def test_time_range_limits_what_is_read() -> None:
    bank = bank_with({"cam": 20})
    plan = plan_query("q", [bank.view("cam")], TOKENIZER, LIMITS, since=T0 + 10.0, until=T0 + 20.0)
    for segment in plan.parts[0].segments:
        assert segment.end > T0 + 10.0 and segment.start < T0 + 20.0
    assert "10.00 seconds" in plan.prompt


def test_gaps_are_told_in_plain_words() -> None:
    bank = bank_with({"cam": 4}, gap=(T0 + 4.0, T0 + 30.0))
    plan = plan_query("q", [bank.view("cam")], TOKENIZER, LIMITS)
    assert [(g.start, g.end, g.reason) for g in plan.parts[0].gaps] == [
        (T0 + 4.0, T0 + 30.0, "disconnected")
    ]
    assert "Nothing was seen from" in plan.prompt and "(disconnected)" in plan.prompt


def test_a_gap_at_the_end_of_memory_is_named_before_the_next_clip() -> None:
    bank = bank_with({"cam": 4})  # an adoption's failover: the outage ends the history
    bank.add_gap("cam", T0 + 8.0, T0 + 20.0, "failover")
    for since in (None, T0):
        plan = plan_query("q", [bank.view("cam")], TOKENIZER, LIMITS, since=since)
        gaps = [(g.start, g.end, g.reason) for g in plan.parts[0].gaps]
        assert gaps == [(T0 + 8.0, T0 + 20.0, "failover")], since
        assert "(failover)" in plan.prompt


def test_many_gaps_are_summed_up_not_listed() -> None:
    bank = MemoryBank(
        MemorySettings(budget_mb=8.0), hidden_size=H, dtype=torch.float32,
        device=torch.device("cpu"), fingerprint="test",
    )  # fmt: skip
    bank.add_stream("cam")
    t = T0
    for i in range(40):  # a flapping camera: a clip, then a 10 s outage, 40 times
        bank.append_clip("cam", torch.full((64, H), float(i)), t, t + 2.0)
        bank.add_gap("cam", t + 2.0, t + 12.0 + (i % 7), "disconnected")
        t += 12.0 + (i % 7)
    plan = plan_query("q", [bank.view("cam")], TOKENIZER, LIMITS)
    gaps = len(plan.parts[0].gaps)  # those inside the range the selection covers
    assert gaps > 5
    assert plan.prompt.count("Nothing was seen") == 5
    assert f"There were {gaps - 5} shorter interruptions" in plan.prompt


def test_several_streams_are_labelled_and_share_the_budget() -> None:
    bank = bank_with({"door": 40, "gate": 40})
    plan = plan_query("q", [bank.view("door"), bank.view("gate")], TOKENIZER, LIMITS)
    assert [p.stream for p in plan.parts] == ["door", "gate"]
    assert plan.visual_tokens <= LIMITS.max_visual_tokens
    assert "these cameras one after another: door (" in plan.prompt and "gate (" in plan.prompt
    owners = plan.owner_of()
    assert len(owners) == plan.visual_tokens
    assert owners[0][0] == "door" and owners[-1][0] == "gate"


def test_empty_memory_and_empty_range() -> None:
    bank = bank_with({"cam": 0})
    with pytest.raises(EmptyMemory):
        plan_query("q", [bank.view("cam")], TOKENIZER, LIMITS)
    bank = bank_with({"cam": 4})
    with pytest.raises(EmptyMemory, match="range"):
        plan_query("q", [bank.view("cam")], TOKENIZER, LIMITS, since=T0 + 100, until=T0 + 200)


def test_a_question_that_cannot_fit_is_refused_not_cut() -> None:
    bank = bank_with({"cam": 4})
    with pytest.raises(PromptTooLongError):
        plan_query("x" * 5000, [bank.view("cam")], TOKENIZER, LIMITS)


def test_media_times_read_as_seconds_into_the_file() -> None:
    assert describe_video([]) == ""
    from streamer.engine.planner import format_time

    assert format_time(12.5) == "12.5 s"
    assert format_time(T0).endswith("UTC")
