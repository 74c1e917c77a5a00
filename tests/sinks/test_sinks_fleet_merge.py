"""Merging owners' parts into one final answer (pure)."""

from __future__ import annotations

from sinks.fleet.merge import NO_OWNER, Part, merge_parts
from sinks.fleet.records import LeaseRecord
from sinks.fleet.router import plan_parts, sub_request_id
from sinks.schema import Answer, GapSpan, HistorySpan, Span


def owner_answer(streams: tuple[str, ...], text: str, *, start: float, daemon: str) -> Answer:
    return Answer(
        id="sub",
        stream=streams,
        question="what?",
        answer=text,
        evidence=tuple(
            Span(stream=s, start=start + i, end=start + i + 1) for i, s in enumerate(streams)
        ),
        frames=4 * len(streams),
        history=HistorySpan(start=start, end=start + 10),
        gaps=(GapSpan(stream=streams[0], start=start + 2, end=start + 3, reason="stall"),),
        latency_s=0.5,
        ttft_s=0.1 + start / 1000,
        tokens=3,
        model="tiny",
        daemon=daemon,
    )


def merged(parts: list[Part], streams: tuple[str, ...] = ("cam1", "cam2", "cam3")) -> Answer:
    return merge_parts(
        "q1",
        "what?",
        streams,
        parts,
        coordinator="c",
        window=(None, None),
        latency_s=1.0,
        now=500.0,
    )


def test_two_owners_make_one_answer_with_sections_in_stream_order() -> None:
    late = Part(("cam2",), "d2", answer=owner_answer(("cam2",), "blue", start=100.0, daemon="d2"))
    early = Part(("cam1",), "d1", answer=owner_answer(("cam1",), "red", start=200.0, daemon="d1"))
    answer = merged([late, early], ("cam1", "cam2"))
    assert [s.daemon for s in answer.sections] == ["d1", "d2"]
    assert answer.answer == "[cam1] red\n[cam2] blue"
    assert answer.daemon == "c"
    assert answer.stream == ("cam1", "cam2")
    assert [span.start for span in answer.evidence] == sorted(s.start for s in answer.evidence)
    assert answer.history == HistorySpan(start=100.0, end=210.0)
    assert answer.frames == 8 and answer.tokens == 6
    assert answer.ttft_s == 0.2
    assert {g.reason for g in answer.gaps} == {"stall"}


def test_a_lone_part_keeps_its_text() -> None:
    only = Part(("cam1",), "d1", answer=owner_answer(("cam1",), "red", start=0.0, daemon="d1"))
    assert merged([only], ("cam1",)).answer == "red"


def test_a_stream_without_owner_is_named_with_a_gap_over_the_window() -> None:
    answered = Part(("cam1",), "d1", answer=owner_answer(("cam1",), "red", start=0.0, daemon="d1"))
    answer = merge_parts(
        "q1",
        "what?",
        ("cam1", "cam3"),
        [answered, Part.unowned(["cam3"], 2.0)],
        coordinator="c",
        window=(50.0, None),
        latency_s=1.0,
        now=90.0,
    )
    no_owner = [g for g in answer.gaps if g.reason == NO_OWNER]
    assert [(g.stream, g.start, g.end) for g in no_owner] == [("cam3", 50.0, 90.0)]
    assert answer.sections[1].error == NO_OWNER and answer.sections[1].daemon is None
    assert "cam3" in answer.answer and "cam3" not in answer.stream


def test_only_unowned_streams_still_make_an_answer() -> None:
    answer = merged([Part.unowned(["cam3"], 1.0)], ("cam3",))
    assert answer.stream == () and answer.model == "none"
    assert answer.gaps[0].start == answer.gaps[0].end == 500.0


def test_sub_request_ids_change_with_the_fence_and_stay_within_bounds() -> None:
    assert sub_request_id("q1", "d1", {"cam1": 3}) == sub_request_id("q1", "d1", {"cam1": 3})
    assert sub_request_id("q1", "d1", {"cam1": 3}) != sub_request_id("q1", "d1", {"cam1": 4})
    long_id = sub_request_id("x" * 128, "d" * 64, {"cam1": 1})
    assert len(long_id) <= 128


def test_plan_groups_streams_by_owner() -> None:
    leases = {
        "a": LeaseRecord("a", "d1", 1, 0.0),
        "b": LeaseRecord("b", "d2", 5, 0.0),
        "c": LeaseRecord("c", "d1", 2, 0.0),
    }
    subs = {s.owner: s for s in plan_parts("q", ["a", "b", "c", "z"], leases)}
    assert subs["d1"].streams == ("a", "c") and subs["d1"].fences == (1, 2)
    assert subs["d2"].streams == ("b",)
    assert subs["d1"].still_owned(leases)
    assert not subs["d1"].still_owned({**leases, "c": LeaseRecord("c", "d2", 3, 0.0)})
