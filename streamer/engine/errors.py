"""Errors of queries and of the engine itself (see the tree in ``model.errors``).

A ``QueryError`` fails one query (recoverable; its ``code`` goes to the client); an
``EngineError`` is about the engine: ``StreamFailed`` (one stream's clips keep failing to
encode: they are dropped, counted, and status says why) and ``EngineFailed`` (the device keeps
failing: ``Engine.run`` raises it and the daemon stops with the reason).
"""

from __future__ import annotations

from model.errors import FlashwatchError


class QueryError(FlashwatchError):
    """A query failed; ``code`` is the error code sent to the client."""

    recoverable = True
    code: str = "internal"


class InvalidRequest(QueryError):
    code = "invalid_request"


class UnknownStream(QueryError):
    code = "unknown_stream"


class EmptyMemory(QueryError):
    code = "empty_memory"


class Busy(QueryError):
    code = "busy"


class QueryTimeout(QueryError):
    code = "timeout"


class QueryCancelled(QueryError):
    code = "cancelled"


class NotReady(QueryError):
    """The daemon cannot take queries yet (model loading) or any more (stopping)."""

    code = "not_ready"


class EngineError(FlashwatchError):
    """Something went wrong in the engine itself (not in one query)."""


class StreamFailed(EngineError):
    """One stream's clips keep failing to encode; the stream is marked failed."""


class EngineFailed(EngineError):
    """The device keeps failing; the engine stops and the daemon goes to a failed state."""
