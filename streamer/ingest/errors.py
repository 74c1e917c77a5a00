"""Errors of video sources (see the tree in ``model.errors``)."""

from __future__ import annotations

from model.errors import FlashwatchError


class SourceError(FlashwatchError):
    """A video source failed."""


class SourceUnavailable(SourceError):
    """The source is unreachable or dropped out; reconnecting may help."""

    recoverable = True


class SourceFatal(SourceError):
    """The source can never work as configured (no video track, codec, 401)."""
