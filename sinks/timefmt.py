"""How flashwatch shows times to people: the CLI, the live view and one-line messages.

``iso_time`` is the full form (ISO 8601 with the local offset, ``2026-11-24T14:03:07+01:00``);
``clock_time`` the short one of the live view (``14:03:07``, with the date when not today).
Times below ``MEDIA_TIME_BEFORE_S`` are seconds into a file, shown as a duration.
"""

from __future__ import annotations

import time
from datetime import datetime

MEDIA_TIME_BEFORE_S = 1e9  # times below this (2001) are media seconds (files), not UTC epochs


def iso_time(t: float) -> str:
    """Epoch seconds as local ISO 8601 with offset; media seconds as ``H:MM:SS`` into the file."""
    if t < MEDIA_TIME_BEFORE_S:
        return format_duration(t)
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def clock_time(t: float, now: float | None = None) -> str:
    """Epoch seconds as local ``HH:MM:SS`` (with the date when not today); media time as
    ``H:MM:SS``."""
    if t < MEDIA_TIME_BEFORE_S:
        return format_duration(t)
    moment = datetime.fromtimestamp(t).astimezone()
    today = datetime.fromtimestamp(time.time() if now is None else now).astimezone().date()
    return moment.strftime("%H:%M:%S" if moment.date() == today else "%Y-%m-%d %H:%M:%S")


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``Dd H:MM:SS`` past a day)."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock
