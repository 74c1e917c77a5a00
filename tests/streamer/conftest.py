"""Fixtures for ingest tests: generated test videos, a real RTSP server, tiny TCP misbehavers,
fast ingest settings, and helpers to run a StreamIngest with bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pytest
from media import encode_frames, make_video, pattern_frames

from streamer.ingest.settings import IngestSettings, StreamSettings
from streamer.ingest.supervisor import StreamIngest
from streamer.ingest.types import GapEvent

HERE = Path(__file__).resolve().parent
SYSTEM_PYTHON = "/usr/bin/python3"
GST_SCRIPT = HERE / "gst_rtsp_server.py"


# ---- test media -------------------------------------------------------------------------


def make_audio_only(path: Path, seconds: float = 1.0) -> Path:
    rate = 16_000
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(int(seconds * rate / 1024)):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def small_mp4(media_dir: Path) -> Path:
    """320x240, 15 fps, 4 s, H.264 MP4 (GOP 1 s)."""
    return make_video(media_dir / "small.mp4")


# ---- settings and running -----------------------------------------------------------------


@pytest.fixture
def fast_ingest() -> IngestSettings:
    """Backoff, watchdog and debounce shrunk so fault tests finish in seconds."""
    return IngestSettings(
        backoff_initial_s=0.2,
        backoff_max_s=1.0,
        backoff_jitter=0.1,
        healthy_reset_s=5.0,
        stall_factor=10.0,
        stall_floor_s=1.5,
        offline_after_s=3.0,
        open_grace_s=1.0,
    )


@dataclass
class Running:
    """A StreamIngest running as a task, plus the gaps it reported."""

    ingest: StreamIngest
    task: asyncio.Task[None]
    gaps: list[GapEvent] = field(default_factory=list)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.task.done():
                raise AssertionError(f"ingest task ended while waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what}: {self.ingest.stats()}"
                )
            await asyncio.sleep(0.05)

    async def clips(self, n: int, timeout: float) -> list:
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"got {len(got)}/{n} clips: {self.ingest.stats()}")
            got.append(await asyncio.wait_for(self.ingest.clips.get(), left))
        return got


@contextlib.asynccontextmanager
async def running(
    stream: StreamSettings, ingest: IngestSettings, image_size: int = 32, **kwargs: object
) -> AsyncIterator[Running]:
    gaps: list[GapEvent] = []
    ing = StreamIngest(stream, ingest, image_size=image_size, on_gap=gaps.append, **kwargs)  # type: ignore[arg-type]
    task = asyncio.ensure_future(ing.run())
    try:
        yield Running(ing, task, gaps)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5.0)


# ---- network peers ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gst_available() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0')"],
        capture_output=True,
        timeout=20,
        check=False,
    )
    return probe.returncode == 0


class RtspServer:
    """gst-rtsp-server in a subprocess on a fixed loopback port; can be killed/hung/restarted."""

    def __init__(self, port: int, file: Path | None) -> None:
        self.port = port
        self.file = file
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        args = [SYSTEM_PYTHON, str(GST_SCRIPT), str(self.port)]
        if self.file is not None:
            args.append(str(self.file))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        ready = threading.Event()

        stdout = self.proc.stdout
        assert stdout is not None

        def read() -> None:
            with contextlib.suppress(ValueError, OSError):  # closed by kill()
                for line in stdout:
                    if line.startswith("READY"):
                        ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout):
            self.kill()
            raise RuntimeError("the GStreamer RTSP server did not start")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        self.proc = None


@pytest.fixture
def rtsp_server(small_mp4: Path) -> Iterator[RtspServer]:
    if not _gst_available():
        pytest.skip("gst-rtsp-server (python3-gi, gir1.2-gst-rtsp-server-1.0) is not installed")
    server = RtspServer(free_port(), small_mp4)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class TcpMisbehaver:
    """A loopback TCP server that says nothing (``silent``: a hung peer), sends junk and closes
    (``junk``), or answers every RTSP request with 401 (``auth``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        rng = np.random.default_rng(0)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.mode == "auth":
                threading.Thread(target=self._deny, args=(conn,), daemon=True).start()
            elif self.mode == "junk":
                with contextlib.suppress(OSError):
                    conn.sendall(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
                    conn.sendall(b"RTSP/1.0 garbage\r\n\r\n" + bytes(range(256)) * 4)
                conn.close()
            else:
                self._conns.append(conn)  # accept, then never answer

    def _deny(self, conn: socket.socket) -> None:
        """Answer every RTSP request with 401 Unauthorized (a camera with other credentials)."""
        conn.settimeout(5)
        buffer = b""
        with contextlib.suppress(OSError), conn:
            while not self._stop.is_set():
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buffer += chunk
                while b"\r\n\r\n" in buffer:
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    cseq = next(
                        (
                            ln.split(b":", 1)[1].strip()
                            for ln in head.split(b"\r\n")
                            if ln.lower().startswith(b"cseq:")
                        ),
                        b"1",
                    )
                    conn.sendall(
                        b"RTSP/1.0 401 Unauthorized\r\nCSeq: " + cseq + b"\r\n"
                        b'WWW-Authenticate: Basic realm="cam"\r\nContent-Length: 0\r\n\r\n'
                    )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for conn in self._conns:
            conn.close()
        self.sock.close()


@pytest.fixture
def tcp_misbehaver() -> Iterator[Callable[[str], TcpMisbehaver]]:
    made: list[TcpMisbehaver] = []

    def make(mode: str) -> TcpMisbehaver:
        server = TcpMisbehaver(mode)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


# ---- helpers handed to tests as fixtures (test modules cannot import conftest) -------------


@dataclass(frozen=True)
class MediaKit:
    encode_frames: Callable[..., Path] = encode_frames
    pattern_frames: Callable[..., Iterator[np.ndarray]] = pattern_frames
    make_video: Callable[..., Path] = make_video
    make_audio_only: Callable[..., Path] = make_audio_only


@pytest.fixture(scope="session")
def media() -> MediaKit:
    return MediaKit()


@pytest.fixture
def start_ingest() -> Callable[..., contextlib.AbstractAsyncContextManager[Running]]:
    """``async with start_ingest(stream_settings, ingest_settings, image_size=32) as run: ...``"""
    return running
