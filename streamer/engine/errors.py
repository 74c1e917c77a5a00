"""Errors the engine raises, under the project's one root (``model.errors.FlashwatchError``).

    FlashwatchError
    └── EngineError
        ├── StreamFailed   fatal for one stream: its clips failed to encode too many times in a
        │                  row; the stream's clips are dropped (counted) and status says why
        └── EngineFailed   fatal for the daemon: the device failed too many times in a row;
                           ``Engine.run`` raises it, the daemon stops with the reason

Per-query failures stay ``model.errors.QueryError`` (recoverable: they fail that query only).
"""

from __future__ import annotations

from model.errors import FlashwatchError


class EngineError(FlashwatchError):
    """Something went wrong in the engine itself (not in one query)."""


class StreamFailed(EngineError):
    """One stream's clips keep failing to encode; the stream is marked failed."""


class EngineFailed(EngineError):
    """The device keeps failing; the engine stops and the daemon goes to a failed state."""
