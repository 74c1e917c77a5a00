"""Each token segment's mean token, kept in a few preallocated blocks (device thread).

The planner compares neighbours by the cosine of their mean tokens. Keeping one small tensor
per segment would fragment the allocator (measured: a process RSS of 3x the arena for the 7B
width, ``benchmarks/memory_bytes_per_hour.py``), so the means live as rows of blocks of
``BLOCK_ROWS`` rows, and a freed row is reused by the next segment. ``get`` returns a view of
the row; it stays valid until that segment's mean is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memory.snapshot import SegmentKey

BLOCK_ROWS = 1024


@dataclass(frozen=True, slots=True)
class MeanTable:
    """A read-only picture of a ``MeanStore``, for the planner thread."""

    rows: dict[SegmentKey, int]
    blocks: tuple[torch.Tensor, ...]

    def get(self, key: SegmentKey) -> torch.Tensor | None:
        row = self.rows.get(key)
        return None if row is None else self.blocks[row // BLOCK_ROWS][row % BLOCK_ROWS]


class MeanStore:
    """Mean tokens [H] float32 by segment key, in blocks of ``BLOCK_ROWS`` rows."""

    def __init__(self, hidden_size: int, device: torch.device) -> None:
        self._hidden_size = hidden_size
        self._device = device
        self._blocks: list[torch.Tensor] = []  # [BLOCK_ROWS, H] float32 each
        self._rows: dict[SegmentKey, int] = {}  # key -> global row
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: SegmentKey) -> bool:
        return key in self._rows

    def keys(self) -> list[SegmentKey]:
        return list(self._rows)

    def get(self, key: SegmentKey) -> torch.Tensor | None:
        row = self._rows.get(key)
        return None if row is None else self._row(row)

    def put_mean(self, key: SegmentKey, tokens: torch.Tensor) -> None:
        """Store the mean of ``tokens`` [n, H] (computed in float32) as ``key``'s."""
        torch.mean(tokens, dim=0, dtype=torch.float32, out=self._slot(key))

    def put(self, key: SegmentKey, mean: torch.Tensor) -> None:
        self._slot(key).copy_(mean)

    def pop(self, key: SegmentKey) -> None:
        row = self._rows.pop(key, None)
        if row is not None:
            self._free.append(row)

    def keep_only(self, keys: set[SegmentKey]) -> None:
        for key in [k for k in self._rows if k not in keys]:
            self.pop(key)

    def clear(self) -> None:
        self._free.extend(self._rows.values())
        self._rows.clear()

    def snapshot(self) -> MeanTable:
        """The stored means as they are (for the planner; rows in use are never rewritten).

        Copies the key map in C and no tensor: no per-segment work on the device thread.
        """
        return MeanTable(dict(self._rows), tuple(self._blocks))

    def _slot(self, key: SegmentKey) -> torch.Tensor:
        row = self._rows.get(key)
        if row is None:
            if not self._free:
                base = len(self._blocks) * BLOCK_ROWS
                self._blocks.append(
                    torch.empty(
                        BLOCK_ROWS, self._hidden_size, dtype=torch.float32, device=self._device
                    )
                )
                self._free.extend(range(base + BLOCK_ROWS - 1, base - 1, -1))
            row = self._rows[key] = self._free.pop()
        return self._row(row)

    def _row(self, row: int) -> torch.Tensor:
        return self._blocks[row // BLOCK_ROWS][row % BLOCK_ROWS]
