"""The query planner: which memory a question reads, and the prompt around it.

Pure functions over memory views and plain data, so they are tested without a model. The plan
keeps, for every visual token, the segment it came from, so an answer can cite the spans it read
and the spans whose tokens survived attention-based dropping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from memory.bank import MemoryView, Segment, select_segments
from memory.segments import static_spans
from model.errors import PromptTooLongError
from model.prompt import Tokenizer, build_prompt, check_context, plain_text, tokenize_prompt
from streamer.engine.errors import EmptyMemory, UnknownStream

# Epoch seconds above this are wall-clock times (live sources); below, media time (files).
_WALL_CLOCK_EPOCH_S = 1e9
# Gaps named one by one in a prompt, per stream (the longest); the rest are summed up, so a
# flapping camera cannot push the question out of the context. The same for static spans.
MAX_GAPS_NAMED = 5
MAX_STATIC_NAMED = 5
# Room kept for that preamble when sizing the visual budget (stream labels and gap sentences).
_PREAMBLE_TOKENS = 512


@dataclass(frozen=True, slots=True)
class PlanLimits:
    """Token budgets for one query."""

    max_context_tokens: int  # the whole prompt: text + visual + answer
    max_visual_tokens: int  # the trained regime: 512 frames x 16 tokens = 8,192
    tokens_per_frame: int  # 16 after HiCo
    reserve_new_tokens: int  # room left for the answer
    # Over-budget selections sample instants over a range whose open end is snapped down to
    # this grid, so the selection (and its cached prefix KV) stays the same while clips land
    # (0 = no snapping: every new clip moves every instant).
    selection_grid_s: float = 0.0


@dataclass(frozen=True, slots=True)
class StreamPart:
    """What one stream contributes: segments read (time order), gaps and static spans in range."""

    stream: str
    segments: tuple[Segment, ...]
    gaps: tuple[Segment, ...]
    statics: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True, slots=True)
class QueryPlan:
    parts: tuple[StreamPart, ...]
    prompt: str
    input_ids: tuple[int, ...]  # with one image placeholder (-200)
    visual_tokens: int
    frames: int
    history: tuple[float, float]

    def owner_of(self) -> list[tuple[str, Segment]]:
        """For each visual token, in prompt order, the (stream, segment) it came from."""
        owners: list[tuple[str, Segment]] = []
        for part in self.parts:
            for segment in part.segments:
                owners.extend([(part.stream, segment)] * segment.count)
        return owners


def resolve_streams(requested: tuple[str, ...], known: list[str]) -> list[str]:
    """``("*",)`` means every stream; otherwise each name must be known."""
    if requested == ("*",):
        return list(known)
    names = list(requested)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UnknownStream(f"unknown stream(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def plan_query(
    question: str,
    views: list[MemoryView],
    tokenizer: Tokenizer,
    limits: PlanLimits,
    *,
    since: float | None = None,
    until: float | None = None,
) -> QueryPlan:
    """Select memory for the question's time range under the context budget; build the prompt.

    The visual budget is split equally between the streams; each stream's share is spread
    uniformly over the range, as the model's own uniform frame sampling does.
    """
    question = plain_text(question)  # a question cannot close the user turn or add a video
    nonempty = [v for v in views if v.span is not None]
    if not nonempty:
        names = ", ".join(v.stream for v in views)
        raise EmptyMemory(f"no memory yet for {names}: wait for the first clips")
    # A first tokenization without video tells how much room the text needs.
    text_only = tokenize_prompt(tokenizer, _prompt(question, [], 0.0, 0))
    room = limits.max_context_tokens - len(text_only) - limits.reserve_new_tokens - _PREAMBLE_TOKENS
    visual_budget = min(limits.max_visual_tokens, room)
    if visual_budget < limits.tokens_per_frame:
        raise PromptTooLongError(
            f"the question leaves no room for video in {limits.max_context_tokens} tokens"
        )
    share = visual_budget // len(nonempty)
    parts = []
    for view in nonempty:
        end = until if until is not None else _snapped_end(view, since, share, limits)
        segments = select_segments(view, since=since, until=end, token_budget=share)
        if segments:
            lo = segments[0].start if since is None else since
            # Open-ended and unsnapped: up to the memory's end, so a trailing gap (an outage
            # just ended, an adoption's failover) is named before the next clip arrives.
            hi = until if until is not None else segments[-1].end if end is not None else None
            gaps, statics = tuple(view.gaps(lo, hi)), tuple(static_spans(view.segments, lo, hi))
            parts.append(StreamPart(view.stream, tuple(segments), gaps, statics))
    if not parts:
        raise EmptyMemory("no memory inside the requested time range")
    visual = sum(seg.count for part in parts for seg in part.segments)
    frames = max(1, visual // limits.tokens_per_frame)
    history = (
        min(p.segments[0].start for p in parts),
        max(p.segments[-1].end for p in parts),
    )
    prompt = _prompt(question, parts, history[1] - history[0], frames)
    input_ids = tokenize_prompt(tokenizer, prompt)
    check_context(
        len(input_ids) - 1 + visual + limits.reserve_new_tokens, limits.max_context_tokens
    )
    return QueryPlan(tuple(parts), prompt, tuple(input_ids), visual, frames, history)


def _snapped_end(
    view: MemoryView, since: float | None, budget: int, limits: PlanLimits
) -> float | None:
    """The open end of a stable selection: None (everything) while the range fits the budget,
    else the last segment end snapped down to the grid (the newest few seconds wait for the next
    grid step; uniform sampling would skip most of them anyway)."""
    grid = limits.selection_grid_s
    tokens = [s for s in view.segments if not s.is_gap and (since is None or s.end > since)]
    if grid <= 0.0 or not tokens or sum(s.count for s in tokens) <= budget:
        return None
    snapped = math.floor(tokens[-1].end / grid) * grid
    return snapped if snapped > tokens[0].start else None


def _prompt(question: str, parts: list[StreamPart], duration_s: float, frames: int) -> str:
    return build_prompt(
        question, duration_s=duration_s, n_frames=frames, video_preamble=describe_video(parts)
    )


def describe_video(parts: list[StreamPart]) -> str:
    """Plain words for what the official prompt cannot say: stream sections, gaps, static spans."""
    sentences = []
    if len(parts) > 1:
        sections = ", ".join(
            f"{p.stream} ({format_time(p.segments[0].start)} to {format_time(p.segments[-1].end)})"
            for p in parts
        )
        sentences.append(f"The video shows these cameras one after another: {sections}.")
    for part in parts:
        label = f" on {part.stream}" if len(parts) > 1 else ""
        longest = sorted(part.gaps, key=lambda g: g.end - g.start, reverse=True)
        for gap in sorted(longest[:MAX_GAPS_NAMED], key=lambda g: g.start):
            sentences.append(
                f"Nothing was seen{label} from {format_time(gap.start)} to "
                f"{format_time(gap.end)} ({gap.reason or 'gap'})."
            )
        rest = longest[MAX_GAPS_NAMED:]
        if rest:
            total = sum(g.end - g.start for g in rest)
            sentences.append(
                f"There were {len(rest)} shorter interruptions{label} ({total:.0f} s in total)."
            )
        sentences.extend(_static_sentences(part.statics, label))
    return " ".join(sentences)


def _static_sentences(statics: tuple[tuple[float, float], ...], label: str) -> list[str]:
    """'No change from X to Y' for the longest static spans; the rest summed up."""
    longest = sorted(statics, key=lambda s: s[1] - s[0], reverse=True)
    sentences = [
        f"No change was seen{label} from {format_time(lo)} to {format_time(hi)} "
        "(a static scene, shown once)."
        for lo, hi in sorted(longest[:MAX_STATIC_NAMED])
    ]
    rest = longest[MAX_STATIC_NAMED:]
    if rest:
        total = sum(hi - lo for lo, hi in rest)
        sentences.append(
            f"There were {len(rest)} shorter spans without change{label} ({total:.0f} s in total)."
        )
    return sentences


def format_time(t: float) -> str:
    """Wall-clock times as UTC clock times; media times as seconds into the file."""
    if t >= _WALL_CLOCK_EPOCH_S:
        return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{t:.1f} s"
