"""The WHIP endpoint under hostile clients: raw loopback sockets that connect and hold, dribble
half a request or never send the body; offers that race to replace a live publisher; requests
without the token to streams that do not exist."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import aioice.ice
import pytest
from whip_peer import Publisher

from streamer.ingest.settings import WhipSettings
from streamer.ingest.whip_guard import ReplacementLimiter
from streamer.ingest.whip_server import WhipServer

pytestmark = pytest.mark.integration
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test only: ICE host candidates on 127.0.0.1, so no traffic leaves loopback."""
    monkeypatch.setattr(
        aioice.ice, "get_host_addresses", lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]
    )


@contextlib.asynccontextmanager
async def started(**kw: object) -> AsyncIterator[WhipServer]:
    server = WhipServer(WhipSettings(port=0, token=TOKEN, **kw))  # type: ignore[arg-type]
    server.register("cam")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def server_socket_fds(port: int) -> int:
    """File descriptors of this process that are sockets bound to local ``port`` (the listener
    and the connections the server accepted; the test's own client sockets are not)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            link = str(fd.readlink())
            if link.startswith("socket:[") and link[8:-1] in inodes:
                count += 1
    return count


async def hold(port: int, first: bytes = b"", dribble: bytes = b"") -> bytes:
    """Connect, send ``first``, then one byte of ``dribble`` every 0.2 s; return what the server
    sent before closing (bounded: 20 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(first)
        got = b""
        async with asyncio.timeout(20):
            for byte in dribble:
                writer.write(bytes([byte]))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        got += await reader.read(4096)
                if reader.at_eof():
                    return got
            while chunk := await reader.read(4096):
                got += chunk
        return got
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def port_of(server: WhipServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def test_half_open_connections_time_out() -> None:
    async with started(header_timeout_s=1.0, body_timeout_s=1.0, max_connections=32) as server:
        port = port_of(server)
        head = b"POST /whip/cam HTTP/1.1\r\nHost: x\r\n"
        no_body = (
            head + f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/sdp\r\n".encode()
            + b"Content-Length: 500\r\n\r\nv=0\r\n"
        )  # fmt: skip
        began = time.monotonic()
        answers = await asyncio.gather(
            *(hold(port) for _ in range(8)),  # connect and say nothing
            *(hold(port, dribble=head + b"X-Slow: " + b"a" * 40) for _ in range(8)),  # slowloris
            *(hold(port, no_body) for _ in range(2)),  # headers, then no body
        )
        elapsed = time.monotonic() - began
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
        assert elapsed < 15  # closed by the deadlines, not by our own 20 s bound
        await wait_until(lambda: server.connection_count() == 0)
        assert server_socket_fds(port) == 1  # the listener only
        await assert_publisher_works(server)


async def test_connection_cap_bounds_file_descriptors() -> None:
    cap = 16
    async with started(header_timeout_s=2.0, max_connections=cap) as server:
        port = port_of(server)
        holders = [asyncio.ensure_future(hold(port)) for _ in range(100)]
        await wait_until(lambda: sum(h.done() for h in holders) >= 100 - cap)
        peak = server_socket_fds(port)
        assert server.connection_count() <= cap and peak <= cap + 1
        answers = await asyncio.gather(*holders)
        refused = sum(a.startswith(b"HTTP/1.1 503") for a in answers)
        timed_out = sum(a.startswith(b"HTTP/1.1 408") for a in answers)
        assert refused >= 100 - cap and refused + timed_out == 100
        await wait_until(lambda: server.connection_count() == 0)
        assert server_socket_fds(port) == 1
        await assert_publisher_works(server)


async def test_auth_comes_before_routing() -> None:
    async with started() as server, aiohttp.ClientSession() as http:
        sdp = {"Content-Type": "application/sdp"}
        for path in ("/whip/nope", "/whip/cam", "/anything", "/whip/resource/abc"):
            for headers in (sdp, {**sdp, "Authorization": "Bearer wrong"}):
                async with http.post(server.url + path, data="v=0", headers=headers) as r:
                    assert r.status == 401, (path, headers)
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.post(f"{server.url}/whip/nope", data="v=0", headers={**sdp, **AUTH}) as r:
            assert r.status == 404  # only with the token does one learn the stream is unknown


async def test_cors_origins_are_empty_by_default() -> None:
    async with started() as server, aiohttp.ClientSession() as http:
        page = {"Origin": "http://localhost:3000"}
        preflight = {**page, "Access-Control-Request-Method": "POST"}
        async with http.options(f"{server.url}/whip/cam", headers=preflight) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        # Even a request that skips the preflight (and carries the token) is refused.
        headers = {**page, **AUTH, "Content-Type": "application/sdp"}
        async with http.post(f"{server.url}/whip/cam", data="v=0", headers=headers) as r:
            assert r.status == 403
    with pytest.raises(ValueError, match="not an origin"):
        WhipSettings(cors_origins=["http://ok.example/path"])


async def test_racing_offers_cannot_replace_a_publisher_each() -> None:
    async with started(replace_interval_s=30.0) as server, aiohttp.ClientSession() as http:
        offer_from = Publisher(server.url, "cam", TOKEN)
        try:
            await offer_from.pc.setLocalDescription(await offer_from.pc.createOffer())
            offer = offer_from.pc.localDescription.sdp
            headers = {**AUTH, "Content-Type": "application/sdp"}

            async def post() -> tuple[int, str | None]:
                async with http.post(f"{server.url}/whip/cam", data=offer, headers=headers) as r:
                    return r.status, r.headers.get("Retry-After")

            results = await asyncio.gather(*(post() for _ in range(20)))  # an empty stream
            assert sorted(status for status, _ in results) == [201] + [429] * 19, results
            assert all(int(after) >= 1 for status, after in results if status == 429)
            assert server.session_count() == 1
            current = server.register("cam").current()
            later = await asyncio.gather(*(post() for _ in range(10)))  # now one is live
            assert {status for status, _ in later} == {429}
            assert server.register("cam").current() is current and server.session_count() == 1
        finally:
            await offer_from.close()


def test_replacement_limiter_paces_replacements_only() -> None:
    now = [100.0]
    limiter = ReplacementLimiter(2.0, clock=lambda: now[0])
    assert limiter.admit("cam", has_live_publisher=False) == 0
    assert limiter.admit("cam", has_live_publisher=False) == 1  # one negotiation at a time
    assert limiter.admit("other", has_live_publisher=False) == 0  # per stream
    limiter.done("cam", attached=True)
    now[0] += 0.5
    assert limiter.admit("cam", has_live_publisher=True) == 2  # ceil(1.5 s)
    assert limiter.admit("cam", has_live_publisher=False) == 0  # it left: a new one at once
    limiter.done("cam", attached=False)  # refused offers do not count as a replacement
    now[0] += 1.6
    assert limiter.admit("cam", has_live_publisher=True) == 0
    assert ReplacementLimiter(0.0).admit("cam", has_live_publisher=True) == 0


async def assert_publisher_works(server: WhipServer) -> None:
    async with aiohttp.ClientSession() as http:
        publisher = Publisher(server.url, "cam", TOKEN)
        try:
            assert await publisher.publish(http) == 201
            assert await publisher.delete(http) == 200
        finally:
            await publisher.close()


async def wait_until(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
