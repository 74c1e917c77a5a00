"""Answers carry the evidence frames of the spans they cite.

:class:`FramedReplies` sits between the engine and where its answers go: each final answer gets
one stored JPEG per cited span (``memory.frames.FrameStore``; at most ``limit``). The store's
index is in memory, so this costs a lookup, never a disk read, on the event loop.
"""

from __future__ import annotations

import dataclasses

from memory.frames import FrameStore
from streamer.engine.errors import QueryError
from streamer.engine.outbox import Replies
from streamer.engine.types import Answer, Ticket


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
