"""WHIP ingest with a real WebRTC peer: an aiortc publisher on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import aioice.ice
import pytest
from whip_peer import Publisher

from streamer.ingest.settings import IngestSettings, StreamSettings, WhipSettings
from streamer.ingest.types import StreamState
from streamer.ingest.whip_server import WhipServer

pytestmark = pytest.mark.integration
TOKEN = "test-token-123"


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test only: ICE host candidates on 127.0.0.1, so no traffic leaves loopback."""
    monkeypatch.setattr(
        aioice.ice, "get_host_addresses", lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]
    )


@contextlib.asynccontextmanager
async def whip_server(**kw: object) -> AsyncIterator[WhipServer]:
    server = WhipServer(WhipSettings(port=0, token=TOKEN, **kw))  # type: ignore[arg-type]
    yield server
    await server.stop()


async def test_publish_ingest_delete_and_republish(start_ingest, fast_ingest: IngestSettings):
    async with whip_server() as server, aiohttp.ClientSession() as http:
        settings = StreamSettings(name="cam", url="whip://", fps=4.0)
        async with start_ingest(settings, fast_ingest, whip=server) as run:
            await server.start()
            first = Publisher(server.url, "cam", TOKEN)
            try:
                assert await first.publish(http) == 201
                clips = await run.clips(2, timeout=20)
                assert run.ingest.state is StreamState.LIVE
                assert clips[0].frames.shape == (4, 32, 32, 3)
                assert await first.delete(http) == 200
                await run.wait_for(lambda: run.ingest.state is StreamState.OFFLINE, 10, "offline")
                assert server.session_count() == 0
                assert await first.delete(http) == 404  # already gone
            finally:
                await first.close()
            second = Publisher(server.url, "cam", TOKEN)
            try:
                assert await second.publish(http) == 201
                await run.wait_for(lambda: run.ingest.state is StreamState.LIVE, 20, "live again")
            finally:
                await second.close()
            await run.wait_for(
                lambda: run.ingest.state is not StreamState.LIVE, 10, "closed pc ends"
            )
        stats = run.ingest.stats()
    gaps = [g for g in run.gaps if g.reason != "dropped"]
    assert len(gaps) >= 1 and gaps[0].end > gaps[0].start
    assert stats.reconnects == 0  # publishers leaving is not a reconnect of ours


async def test_auth_unknown_stream_and_limits(fast_ingest: IngestSettings):
    async with (
        whip_server(max_body_bytes=2000, cors_origins=["http://page.example"]) as server,
        aiohttp.ClientSession() as http,
    ):
        server.register("cam")
        await server.start()
        wrong = Publisher(server.url, "cam", "not-the-token")
        anonymous = Publisher(server.url, "cam", None)
        unknown = Publisher(server.url, "nope", TOKEN)
        try:
            assert await wrong.publish(http) == 401
            assert await anonymous.publish(http) == 401
            assert await unknown.publish(http) == 404
        finally:
            for p in (wrong, anonymous, unknown):
                await p.close()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(f"{server.url}/whip/cam", data="v=0", headers=auth) as r:
            assert r.status == 415  # not application/sdp
            assert "Access-Control-Allow-Origin" not in r.headers  # no Origin: not a page
        big = "v=0\r\n" + "a=x\r\n" * 1000
        headers = {**auth, "Content-Type": "application/sdp"}
        async with http.post(f"{server.url}/whip/cam", data=big, headers=headers) as r:
            assert r.status == 413
        async with http.post(
            f"{server.url}/whip/cam", data="v=0\r\nnonsense", headers=headers
        ) as r:
            assert r.status == 400
        async with http.delete(f"{server.url}/whip/resource/abc") as r:
            assert r.status == 401
        preflight = {"Origin": "http://page.example", "Access-Control-Request-Method": "POST"}
        async with http.options(f"{server.url}/whip/cam", headers=preflight) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "http://page.example"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
            assert r.headers["Access-Control-Expose-Headers"] == "Location"
        assert server.session_count() == 0


async def test_whip_stream_without_endpoint_fails(start_ingest, fast_ingest: IngestSettings):
    async with start_ingest(StreamSettings(name="cam", url="whip://"), fast_ingest) as run:
        await run.wait_for(lambda: run.ingest.state is StreamState.FAILED, 5, "failed")
        assert "WHIP" in (run.ingest.stats().last_error or "")


async def test_cors_allow_list(fast_ingest: IngestSettings):
    async with (
        whip_server(cors_origins=["http://ok.example"]) as server,
        aiohttp.ClientSession() as http,
    ):
        server.register("cam")
        await server.start()
        for origin, allowed in (("http://ok.example", True), ("http://evil.example", False)):
            async with http.options(f"{server.url}/whip/cam", headers={"Origin": origin}) as r:
                assert (r.headers.get("Access-Control-Allow-Origin") == origin) is allowed
                assert r.status == (204 if allowed else 403)
    await asyncio.sleep(0)


async def test_silent_publisher_is_a_stall_and_gets_dropped(start_ingest, fast_ingest):
    """A publisher that stops sending without DELETE: the watchdog calls a stall (aiortc alone
    would notice only after ~30 s) and the session is closed so a new publisher can take over."""
    async with whip_server() as server, aiohttp.ClientSession() as http:
        settings = StreamSettings(name="cam", url="whip://cam", fps=4.0)
        async with start_ingest(settings, fast_ingest, whip=server) as run:
            await server.start()
            hung = Publisher(server.url, "cam", TOKEN, freeze_after=60)
            try:
                assert await hung.publish(http) == 201
                await run.wait_for(lambda: run.ingest.state is StreamState.LIVE, 20, "live")
                await run.wait_for(lambda: run.ingest.stats().stalls_last_hour >= 1, 15, "stall")
                await run.wait_for(lambda: server.session_count() == 0, 10, "session dropped")
            finally:
                await hung.close()
            fresh = Publisher(server.url, "cam", TOKEN)
            try:
                assert await fresh.publish(http) == 201
                await run.wait_for(lambda: run.ingest.state is StreamState.LIVE, 20, "live again")
            finally:
                await fresh.close()
    assert [g.reason for g in run.gaps if g.reason != "dropped"][:1] == ["stalled"]
