"""A private redis-server for the demo, and how ``ask``/``status`` find it.

When the configured Redis is unreachable, ``redis-server`` is installed and the user gave no
explicit ``--redis-url``, ``serve`` starts one on a free loopback port with persistence off and
records its URL and pid in a small state file; ``ask`` and ``status`` read that file when they
are not given a URL and the default one does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import redis.asyncio as aioredis

from model.errors import BusError

log = logging.getLogger(__name__)

STATE_FILE_NAME = "embedded-redis.json"
_START_TIMEOUT_S = 10.0


async def reachable(url: str, timeout_s: float = 1.0) -> bool:
    """True when a Redis server answers PING at ``url``."""
    client = aioredis.Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
    )
    try:
        return bool(await client.ping())
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()


def discover(state_dir: Path) -> str | None:
    """The URL of a running daemon's embedded Redis, if its state file names a live process."""
    try:
        state = json.loads((state_dir / STATE_FILE_NAME).read_text())
        pid, url = int(state["pid"]), str(state["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if _alive(pid) else None


class EmbeddedRedis:
    """A loopback redis-server owned by this process; ``stop`` ends it and removes the state."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._proc: asyncio.subprocess.Process | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.url = ""

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    async def start(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BusError("redis-server is not installed")
        _stop_orphan(self._state_dir)
        self._workdir = tempfile.TemporaryDirectory(prefix="flashwatch-redis-")
        port = _free_port()
        self._proc = await asyncio.create_subprocess_exec(
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--dir", self._workdir.name, "--daemonize", "no", "--loglevel", "warning",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{port}/0"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT_S
        while not await reachable(self.url, timeout_s=0.2):
            if self._proc.returncode is not None or loop.time() > deadline:
                await self.stop()
                raise BusError("the embedded redis-server did not start")
            await asyncio.sleep(0.05)
        self._state_dir.mkdir(parents=True, exist_ok=True)
        state = {"url": self.url, "pid": os.getpid(), "redis_pid": self._proc.pid}
        (self._state_dir / STATE_FILE_NAME).write_text(json.dumps(state))
        return self.url

    async def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            state_file = self._state_dir / STATE_FILE_NAME
            if discover(self._state_dir) == self.url:
                state_file.unlink()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 5.0)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        self._proc = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None


def _stop_orphan(state_dir: Path) -> None:
    """End the redis-server a hard-killed daemon left behind (its owner pid is gone)."""
    try:
        state = json.loads((state_dir / STATE_FILE_NAME).read_text())
        owner, orphan = int(state["pid"]), int(state["redis_pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if _alive(owner):
        return  # another daemon's, in use
    if _alive(orphan) and "redis" in _command_of(orphan):
        log.warning("stopping redis-server %d left behind by a daemon that was killed", orphan)
        os.kill(orphan, signal.SIGTERM)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / STATE_FILE_NAME).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _command_of(pid: int) -> str:
    """The process's command line (Linux), or "" where unknown: a pid may have been reused."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
