"""A private mosquitto MQTT broker on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from redis_harness import free_port


class MosquittoServer:
    """mosquitto with a tiny config (anonymous, loopback only, no persistence); ``stop`` and
    ``start`` simulate an outage on the same port."""

    def __init__(self, workdir: Path, port: int = 0) -> None:
        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._config = workdir / f"mosquitto-{self.port}.conf"
        self._log = workdir / f"mosquitto-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or shutil.which("/usr/sbin/mosquitto")
        if binary is None:
            pytest.fail("mosquitto is not installed (Debian package mosquitto)")
        self._config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"log_dest file {self._log}\n"
        )
        self._proc = subprocess.Popen(
            [binary, "-c", str(self._config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        log = self._log.read_text() if self._log.exists() else ""
        pytest.fail(f"mosquitto did not come up on port {self.port}: {log[-500:]}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
