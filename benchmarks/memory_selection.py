"""Cost of choosing a query's segments as the history grows (``select_segments``, pure).

Histories of 100 to 100,000 segments (a 4-s clip each, a gap every 1,000 segments, the oldest half
consolidated to 40-s segments) and a budget of 8,192 tokens (512 frames x 16, the trained regime).
Measured: the median time of one selection over the whole history and over the last hour, and
of reading the chosen tokens through a view of a real bank (the copy a query makes). Baseline in
the same run: 1,000 segments (100 simply fit the budget); the ratio of each cost to it shows
how selection scales.

    python benchmarks/memory_selection.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from _timing import median_seconds

from memory.bank import MemoryBank
from memory.segments import Segment, SegmentKind, gap
from memory.selection import select_segments
from memory.settings import MemorySettings

RESULTS = Path(__file__).resolve().parent / "results" / "memory_selection.json"
TOKEN_BUDGET = 8192
SIZES = (100, 1_000, 10_000, 100_000)


def history(n: int) -> list[Segment]:
    """``n`` token segments: the older half consolidated (40 s each), a gap every 1,000."""
    segments: list[Segment] = []
    t, offset = 0.0, 0
    for i in range(n):
        if i and i % 1000 == 0:
            segments.append(gap(t, t + 30.0, offset, "disconnected"))
            t += 30.0
        length, level = (40.0, 3) if i < n // 2 else (4.0, 0)
        kind: SegmentKind = "consolidated" if level else "clip"
        segments.append(Segment(t, t + length, offset, 64, level, kind, None, level, 1))
        t += length
        offset += 64
    return segments


def read_cost(repeats: int) -> dict[str, float]:
    """Reading 8,192 selected tokens through a view of a bank holding 2,000 clips (H=896)."""
    hidden = 896
    settings = MemorySettings(budget_mb=2000 * 64 * hidden * 4 / 2**20)
    bank = MemoryBank(
        settings, hidden_size=hidden, dtype=torch.float32, device=torch.device("cpu"),
        fingerprint="bench",
    )  # fmt: skip
    bank.add_stream("cam")
    clip = torch.randn(64, hidden)
    for i in range(2000):
        bank.append_clip("cam", clip, 4.0 * i, 4.0 * i + 4)
    view = bank.view("cam")
    chosen = select_segments(view, since=None, until=None, token_budget=TOKEN_BUDGET)
    return {
        "view_ms": median_seconds(lambda: bank.view("cam"), repeats) * 1e3,
        "read_selected_ms": median_seconds(lambda: view.tokens(chosen), repeats) * 1e3,
        "selected_tokens": sum(s.count for s in chosen),
    }


def _selector(segments: list[Segment], since: float | None) -> Callable[[], object]:
    return lambda: select_segments(segments, since=since, token_budget=TOKEN_BUDGET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in SIZES:
        segments = history(n)
        end = segments[-1].end
        whole = median_seconds(_selector(segments, None), args.repeats)
        hour = median_seconds(_selector(segments, end - 3600), args.repeats)
        chosen = select_segments(segments, token_budget=TOKEN_BUDGET)
        rows.append(
            {
                "segments": n,
                "whole_history_ms": whole * 1e3,
                "last_hour_ms": hour * 1e3,
                "chosen": len(chosen),
                "chosen_tokens": sum(s.count for s in chosen),
            }
        )
    base = rows[1]  # the smallest history that does not simply fit the budget
    for row in rows:
        row["whole_ratio_vs_1000"] = row["whole_history_ms"] / base["whole_history_ms"]
        row["us_per_segment"] = row["whole_history_ms"] * 1e3 / row["segments"]
    result = {
        "token_budget": TOKEN_BUDGET,
        "rows": rows,
        "read": read_cost(args.repeats),
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
