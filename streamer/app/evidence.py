"""Answers carry the evidence frames of the spans they cite; ``ask --frames`` saves them.

:class:`FramedReplies` sits between the engine and where its answers go: each final answer gets
one stored JPEG per cited span (``memory.frames.FrameStore``; at most ``limit``). The store's
index is in memory, so this costs a lookup, never a disk read, on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import ValidationError

from memory.frames import FrameStore, frame_name
from sinks.redact import redact_text
from sinks.schema import FrameRef
from streamer.engine.errors import QueryError
from streamer.engine.outbox import Replies
from streamer.engine.types import Answer, Ticket

_FETCH_TIMEOUT_S = 30.0
_STREAM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class FramedReplies:
    """A ``Replies`` that adds ``evidence_frames`` to final answers, then passes them on."""

    def __init__(self, replies: Replies, frames: FrameStore, *, limit: int) -> None:
        self._replies = replies
        self._frames = frames
        self._limit = limit

    async def token(self, request_id: str, index: int, text: str) -> None:
        await self._replies.token(request_id, index, text)

    async def finish(self, ticket: Ticket, answer: Answer) -> None:
        spans = [(span.stream, span.start, span.end) for span in answer.evidence]
        frames = self._frames.frames_for_spans(spans, self._limit)
        await self._replies.finish(
            ticket, dataclasses.replace(answer, evidence_frames=tuple(frames))
        )

    async def fail(self, ticket: Ticket, error: QueryError) -> None:
        await self._replies.fail(ticket, error)


async def save_frames(
    frames: list[dict[str, Any]], directory: Path, *, token: str | None = None
) -> tuple[list[Path], list[str]]:
    """Save an answer's ``evidence_frames`` into ``directory`` (``flashwatch ask --frames``).

    Each is copied from its path when that file is here (the daemon runs on this machine), else
    fetched from its URL (with ``token`` as the bearer). Files are named
    ``<stream>_<start_ms>_<end_ms>.jpg`` from the frame's own fields, never from a path the
    reply names. Returns the files saved and one line per frame that could not be.
    """
    directory.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    problems: list[str] = []
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=_FETCH_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        for frame in frames:
            try:
                ref = FrameRef.model_validate(frame)
            except ValidationError:
                problems.append("an evidence frame the reply describes badly")
                continue
            if not _STREAM_NAME.match(ref.stream):
                problems.append(f"a frame of an oddly named stream {ref.stream!r}")
                continue
            target = directory / f"{ref.stream}_{frame_name(ref.start, ref.end)}"
            try:
                if Path(ref.path).is_file():
                    await asyncio.to_thread(shutil.copyfile, ref.path, target)
                elif ref.url is not None:
                    async with session.get(ref.url) as response:
                        response.raise_for_status()
                        await asyncio.to_thread(target.write_bytes, await response.read())
                else:
                    problems.append(f"{target.name}: not on this machine and no URL")
                    continue
            except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                problems.append(f"{target.name}: {redact_text(str(exc)) or type(exc).__name__}")
                continue
            saved.append(target)
    return saved, problems
