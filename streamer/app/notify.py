"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``), in a few lines.

systemd passes ``NOTIFY_SOCKET`` (a datagram socket path; ``@`` = the abstract namespace) and,
with a watchdog, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). We send ``READY=1`` once the model is
loaded and the streams are started, ``WATCHDOG=1`` every half watchdog period while the device
thread's heartbeat is fresh (a wedged device thread stops the feeding and systemd restarts
us), ``RELOADING=1``/``READY=1`` around a reload and ``STOPPING=1`` at shutdown. Without
``NOTIFY_SOCKET`` every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, socket_path: str | None, watchdog_usec: int | None = None) -> None:
        self._address = _address(socket_path) if socket_path else None
        self.watchdog_interval_s = watchdog_usec / 2e6 if watchdog_usec else None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> SystemdNotifier:
        """From the variables systemd sets; the watchdog only if it is meant for this process."""
        usec_text = environ.get("WATCHDOG_USEC", "")
        pid_text = environ.get("WATCHDOG_PID", "")
        usec = int(usec_text) if usec_text.isdigit() and int(usec_text) > 0 else None
        if pid_text.isdigit() and int(pid_text) != os.getpid():
            usec = None
        return cls(environ.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False (logged once) if it could not."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._warned:  # once: a missing socket would otherwise log every second
                log.warning("systemd notification failed: %s", exc)
                self._warned = True
            return False
        return True


def _address(path: str) -> str | bytes:
    # "@name" is Linux's abstract namespace: a leading NUL byte instead of a file.
    return b"\0" + path[1:].encode() if path.startswith("@") else path
