"""Errors of alert delivery (see the tree in ``model.errors``)."""

from __future__ import annotations

from model.errors import FlashwatchError


class DeliveryError(FlashwatchError):
    """One attempt to deliver an alert failed (receiver away, timeout, 5xx): retry with backoff.

    ``retry_after_s`` is the receiver's own hint (HTTP Retry-After), when it gave one.
    """

    recoverable = True

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeliveryRejected(DeliveryError):
    """The receiver refused the alert for good (a 4xx other than 408/429): counted failed."""

    recoverable = False
