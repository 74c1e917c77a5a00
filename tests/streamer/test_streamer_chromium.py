"""Headless Chromium (fake camera) publishing over WHIP from a page on another origin (so CORS
is exercised for real). Skipped when chromium is not installed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import aioice.ice
import pytest
from aiohttp import web

from streamer.ingest.settings import StreamSettings, WhipSettings
from streamer.ingest.types import StreamState
from streamer.ingest.whip_server import WhipServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PAGE = Path(__file__).with_name("whip_publish.html")
TOKEN = "chromium-token"


@pytest.fixture(autouse=True)
def strict_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test only: aioice offers 127.0.0.1 and ignores datagrams from any other address."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium is not installed ({CHROMIUM})")
    monkeypatch.setattr(
        aioice.ice, "get_host_addresses", lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]
    )
    original = aioice.ice.StunProtocol.datagram_received

    def only_loopback(self: Any, data: bytes, addr: tuple[Any, ...]) -> None:
        if addr[0] == "127.0.0.1":
            original(self, data, addr)

    monkeypatch.setattr(aioice.ice.StunProtocol, "datagram_received", only_loopback)


@contextlib.asynccontextmanager
async def page_server(events: asyncio.Queue[dict[str, Any]]):  # type: ignore[no-untyped-def]
    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE.read_text(), content_type="text/html")

    async def report(request: web.Request) -> web.Response:
        events.put_nowait(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/publish.html", page)
    app.router.add_post("/report", report)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def run_chromium(
    url: str, run_dir: Path, events: asyncio.Queue[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Launch headless Chromium on ``url``; return the page's events up to ``done`` (≤ 40 s)."""
    home = run_dir / "home"
    home.mkdir(parents=True)
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}  # fmt: skip
    args = [
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={run_dir / 'profile'}",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--allow-loopback-in-peer-connection", url,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    seen: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(40):
            exited = asyncio.ensure_future(proc.wait())
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, exited}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    raise AssertionError(f"chromium exited early (rc {proc.returncode}): {seen}")
                seen.append(getter.result())
                if seen[-1]["ev"] == "done":
                    return seen
    finally:
        await stop_chromium(proc, run_dir)


async def stop_chromium(proc: asyncio.subprocess.Process, run_dir: Path) -> None:
    """SIGTERM the browser only, then SIGKILL by PID whatever of this run is left (crashpad)."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if str(run_dir).encode() in cmdline and state != "Z":
                os.kill(int(entry.name), signal.SIGKILL)


async def test_chromium_publishes_over_whip(start_ingest, fast_ingest, tmp_path):
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    settings = StreamSettings(name="browser", url="whip://", fps=4.0)
    async with page_server(events) as page:
        # CORS origins are empty by default: the page's origin is allowed explicitly.
        server = WhipServer(WhipSettings(port=0, token=TOKEN, cors_origins=[page]))
        try:
            async with start_ingest(settings, fast_ingest, whip=server) as run:
                await server.start()
                whip = f"{server.url}/whip/browser"  # another origin than the page: CORS applies
                url = f"{page}/publish.html?whip={whip}&token={TOKEN}&dur=4000"
                seen = await run_chromium(url, tmp_path / "ok", events)
                assert [e["ev"] for e in seen][-1] == "done" and seen[-1]["ok"], seen
                assert {"ev": "deleted", "status": 200} in seen
                await run.wait_for(lambda: run.ingest.state is StreamState.OFFLINE, 10, "offline")
                stats = run.ingest.stats()
                assert stats.clips >= 1 and stats.frames_in >= 20
                assert run.ingest.clips.qsize() >= 1

                bad = f"{page}/publish.html?whip={whip}&token=wrong&dur=500"
                seen = await run_chromium(bad, tmp_path / "bad", events)
                assert {"ev": "whip-failed", "status": 401} in seen
        finally:
            await server.stop()


async def test_a_page_from_an_origin_not_allowed_cannot_publish(
    start_ingest, fast_ingest, tmp_path
):
    """The default (no CORS origins): a page on another origin is refused, even with the token."""
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    server = WhipServer(WhipSettings(port=0, token=TOKEN))
    settings = StreamSettings(name="browser", url="whip://", fps=4.0)
    try:
        async with page_server(events) as page, start_ingest(settings, fast_ingest, whip=server):
            await server.start()
            whip = f"{server.url}/whip/browser"
            url = f"{page}/publish.html?whip={whip}&token={TOKEN}&dur=500"
            seen = await run_chromium(url, tmp_path / "blocked", events)
            assert seen[-1] == {"ev": "done", "ok": False}, seen  # fetch() fails: CORS blocked
            assert any(e["ev"] == "error" for e in seen), seen
            assert server.session_count() == 0
    finally:
        await server.stop()
