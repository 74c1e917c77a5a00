"""Errors of the message bus, Redis (see the tree in ``model.errors``)."""

from __future__ import annotations

from model.errors import FlashwatchError


class BusError(FlashwatchError):
    """The message bus (Redis) is unreachable or misbehaving; reconnect with backoff."""

    recoverable = True


class BusAccessDenied(BusError):
    """Redis answers but refuses us: authentication failed or the ACL user lacks a permission.

    Fatal at start (retrying with the same credentials cannot help); while running it is a
    state shown in status, and the daemon keeps retrying in case the credentials come back.
    """

    recoverable = False


class DaemonConflict(BusError):
    """Another running daemon owns this Redis and key prefix (or the demo's private Redis).

    Fatal: two daemons on one consumer group would split questions between two memories.
    """

    recoverable = False
