"""A private redis-server for the built-in demo, and how ``ask``/``status`` find it.

Only the built-in demo with no configured Redis URL gets one: ``serve`` starts it on a free
loopback port with persistence off and records its URL and pid in a small state file, which
``ask`` and ``status`` read when they are not given a URL. Whoever holds an exclusive ``flock``
on ``serve.lock`` owns the state file: a second demo ``serve`` finds the lock taken and refuses,
naming the running one, and no process writes or removes a state file it does not own. The
kernel drops the lock of a SIGKILLed daemon; the next owner stops the redis-server it left.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from sinks.connection import REDIS_DOWN_ERRORS, open_redis_url
from sinks.errors import BusError, DaemonConflict

log = logging.getLogger(__name__)

STATE_FILE_NAME = "embedded-redis.json"
LOCK_FILE_NAME = "serve.lock"  # never deleted: deleting a lock file races with its next user
_START_TIMEOUT_S = 10.0


async def reachable(url: str, timeout_s: float = 1.0) -> bool:
    """True when a Redis server (or a Cluster node) answers PING at ``url``."""
    client = open_redis_url(url, connect_timeout_s=timeout_s, read_timeout_s=timeout_s)
    try:
        return bool(await client.ping())
    except REDIS_DOWN_ERRORS:
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
        self._lock_fd: int | None = None
        self.url = ""

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    async def start(self) -> str:
        """Start the private redis-server. Raises DaemonConflict when another demo runs."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise BusError("redis-server is not installed")
        self._own_state()
        _stop_orphan(self._state_dir)  # we own the state: a file there is a dead daemon's
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
        state = {"url": self.url, "pid": os.getpid(), "redis_pid": self._proc.pid}
        _write_atomically(self._state_dir / STATE_FILE_NAME, json.dumps(state))
        return self.url

    async def stop(self) -> None:
        if self._lock_fd is not None:  # only the owner of the state removes it
            with contextlib.suppress(FileNotFoundError):
                (self._state_dir / STATE_FILE_NAME).unlink()
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
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _own_state(self) -> None:
        """Take the exclusive lock on the state folder, or raise DaemonConflict naming its owner."""
        self._state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._state_dir / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonConflict(_running_demo(self._state_dir)) from None
        self._lock_fd = fd


def _running_demo(state_dir: Path) -> str:
    """One line naming the demo daemon that holds the state folder."""
    try:
        state = json.loads((state_dir / STATE_FILE_NAME).read_text())
        who = f"pid {int(state['pid'])}, its Redis at {state['url']}"
    except (OSError, ValueError, KeyError, TypeError):
        who = f"it holds {state_dir / LOCK_FILE_NAME}"
    return (
        f"the demo is already being served ({who}); stop that one first, or give this one "
        "its own Redis with --redis-url or a config with -c"
    )


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _stop_orphan(state_dir: Path) -> None:
    """End the redis-server a hard-killed daemon left behind.

    Called only by the holder of the state lock: a state file found then is a dead daemon's.
    """
    try:
        state = json.loads((state_dir / STATE_FILE_NAME).read_text())
        orphan = int(state["redis_pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
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
