"""Errors of the token memory (see the tree in ``model.errors``)."""

from __future__ import annotations

from model.errors import FlashwatchError


class MemoryStoreError(FlashwatchError):
    """The token memory refused an operation."""


class SnapshotError(MemoryStoreError):
    """A snapshot on disk is corrupt, truncated or from another model."""

    recoverable = True
