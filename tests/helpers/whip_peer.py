"""A WHIP publisher for tests: an aiortc peer sending a moving bar (160x120, 30 fps)."""

from __future__ import annotations

import asyncio
import fractions

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack


class MovingBar(VideoStreamTrack):
    """160x120 frames at VideoStreamTrack's 30 fps pace."""

    def __init__(self, freeze_after: int | None = None) -> None:
        super().__init__()
        self.n = 0
        self.freeze_after = freeze_after  # then stop sending, like a hung publisher

    async def recv(self) -> av.VideoFrame:
        if self.freeze_after is not None and self.n >= self.freeze_after:
            await asyncio.sleep(3600)
        pts, time_base = await self.next_timestamp()
        img = np.zeros((120, 160, 3), np.uint8)
        img[:, (self.n * 3) % 160] = 255
        self.n += 1
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = pts, fractions.Fraction(time_base)
        return frame


class Publisher:
    def __init__(
        self, base_url: str, stream: str, token: str | None, freeze_after: int | None = None
    ) -> None:
        self.url = f"{base_url}/whip/{stream}"
        self.base_url = base_url
        self.token = token
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver(MovingBar(freeze_after), direction="sendonly")
        self.location: str | None = None

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/sdp"}
        if self.token is not None:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    async def publish(self, http: aiohttp.ClientSession) -> int:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with http.post(
            self.url, data=self.pc.localDescription.sdp, headers=self.headers()
        ) as r:
            if r.status != 201:
                return r.status
            assert r.content_type == "application/sdp"
            self.location = r.headers["Location"]
            answer = await r.text()
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        return 201

    async def delete(self, http: aiohttp.ClientSession) -> int:
        assert self.location is not None
        async with http.delete(self.base_url + self.location, headers=self.headers()) as r:
            return r.status

    async def close(self) -> None:
        await self.pc.close()
