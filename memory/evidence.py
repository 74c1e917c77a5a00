"""Evidence frames: the small JPEG kept for each clip, as cited by answers and alerts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class EvidenceFrame:
    """One stored JPEG of a clip an alert or answer cites (times in stream seconds)."""

    stream: str
    start: float
    end: float
    path: str  # absolute path on the daemon's disk
    url: str | None = None  # where the daemon's HTTP server serves it, if it runs

    def as_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "start": self.start,
            "end": self.end,
            "path": self.path,
            "url": self.url,
        }
