"""Engine parts without the loop: frame staging, failure causes, the wire boundary."""

from __future__ import annotations

import numpy as np
import torch

from model.preprocess import preprocess_frames
from sinks.domain import query_of, wire_answer
from sinks.schema import QueryRequest
from streamer.engine.runner import FrameStager, failure_cause
from streamer.engine.types import Answer, AttendedSpan, GapSpan, Span


def test_staged_uint8_frames_normalise_exactly_as_the_cpu_preprocessing() -> None:
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for _ in range(3)]
    stager = FrameStager(torch.device("cpu"), torch.float32, 32)
    staged = stager.stage(clips)  # [3, 4, 3, 32, 32]
    expected = preprocess_frames(np.concatenate(clips), 32).view(3, 4, 3, 32, 32)
    assert torch.equal(staged, expected)
    # the host buffer is reused for a smaller batch, and a frame of another size is resized
    odd = rng.integers(0, 256, (4, 48, 40, 3), dtype=np.uint8)
    again = stager.stage([odd])
    assert torch.equal(again, preprocess_frames(odd, 32)[None])


def test_failure_causes() -> None:
    assert failure_cause(torch.OutOfMemoryError("CUDA out of memory")) == "out_of_memory"
    assert failure_cause(RuntimeError("CUDA out of memory. Tried to allocate")) == "out_of_memory"
    assert failure_cause(RuntimeError("device-side assert")) == "device_error"
    assert failure_cause(ValueError("clips must be [B, 4, 3, S, S]")) == "bad_input"


def test_the_wire_boundary_round_trip() -> None:
    request = QueryRequest.model_validate(
        {"question": "what?", "stream": "cam", "since": 10.0, "max_new_tokens": 7}
    )
    query = query_of(request)
    assert (query.id, query.stream, query.since, query.max_new_tokens) == (
        request.id, ("cam",), 10.0, 7,
    )  # fmt: skip
    answer = Answer(
        id=request.id,
        streams=("cam",),
        question="what?",
        text="red",
        evidence=(Span("cam", 20.0, 22.0), Span("cam", 10.0, 12.0)),
        attended=(AttendedSpan("cam", 10.0, 12.0, 0.25), AttendedSpan("cam", 20.0, 22.0, 0.75)),
        frames=8,
        history=(10.0, 22.0),
        gaps=(GapSpan("cam", 12.0, 20.0, "disconnected"),),
        latency_s=1.5,
        ttft_s=0.5,
        tokens=3,
        model="tiny",
    )
    wire = wire_answer(answer)
    assert wire.answer == "red" and wire.stream == ("cam",)
    assert [s.start for s in wire.evidence] == [10.0, 20.0]
    assert [s.mass for s in wire.attended] == [0.75, 0.25]
    assert wire.history is not None and (wire.history.start, wire.history.end) == (10.0, 22.0)
    assert wire.gaps[0].reason == "disconnected"
