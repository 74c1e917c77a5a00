"""Errors of the token memory (see the tree in ``model.errors``)."""

from __future__ import annotations

from model.errors import FlashwatchError


class MemoryStoreError(FlashwatchError):
    """The token memory refused an operation."""


class SnapshotError(MemoryStoreError):
    """A snapshot on disk is corrupt, truncated or from another model."""

    recoverable = True


class StaleFence(MemoryStoreError):
    """A snapshot write refused: a newer owner's fence is recorded in the stream's folder.

    Not recoverable for this writer: another daemon owns the stream now (see sinks.fleet).
    """

    recoverable = False
