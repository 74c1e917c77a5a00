"""Evidence frames at the daemon's edges: answers carry them, the HTTP route serves them from
the store's index behind the token (no traversal), ``ask --frames`` fetches them."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from memory.frames import FrameStore
from memory.settings import FrameSettings
from sinks.domain import wire_answer
from sinks.settings import QuerySettings
from streamer.app.api.server import build_app
from streamer.app.evidence import FramedReplies, save_frames
from streamer.app.notify import SystemdNotifier
from streamer.app.ops import Operations, Runtime
from streamer.app.ops_settings import HttpSettings
from streamer.engine.errors import QueryError
from streamer.engine.types import Answer, Query, Span, Ticket

TOKEN = "frames-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _no_reload() -> dict[str, object]:
    return {}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    (tmp_path / "secret.txt").write_text("not a frame")
    store = FrameStore(FrameSettings(), tmp_path / "frames")
    store.open()
    store.write("cam", 0.0, 2.0, np.full((32, 32, 3), 200, np.uint8))
    settings = HttpSettings.model_validate({"token": TOKEN})
    ops = Operations(settings, QuerySettings(), notifier=SystemdNotifier(None), reload=_no_reload)
    ops.attach(cast(Runtime, SimpleNamespace(frames=store)))  # the route reads only the store
    client = TestClient(TestServer(build_app(ops, settings)))
    await client.start_server()
    yield client
    await client.close()
    store.close()


async def test_a_stored_frame_is_served_as_jpeg(client: TestClient) -> None:
    response = await client.get("/frames/cam/0_2000.jpg", headers=AUTH)
    assert response.status == 200 and response.content_type == "image/jpeg"
    with Image.open(io.BytesIO(await response.read())) as image:
        assert image.format == "JPEG" and image.size == (32, 32)


async def test_the_route_needs_the_token(client: TestClient) -> None:
    assert (await client.get("/frames/cam/0_2000.jpg")).status == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await client.get("/frames/cam/0_2000.jpg", headers=wrong)).status == 401


@pytest.mark.parametrize(
    "path",
    [
        "/frames/cam/2000_4000.jpg",  # a name of the right form, not stored
        "/frames/other/0_2000.jpg",  # an unknown stream
        "/frames/cam/..%2F..%2Fsecret.txt",
        "/frames/..%2Fcam/0_2000.jpg",
        "/frames/cam/%2e%2e%2fsecret.txt",
        "/frames/cam/0_2000.jpg%00.txt",
        "/frames/cam/.tmp-1-0_2000.jpg",
    ],
)
async def test_unknown_names_and_traversal_are_404(client: TestClient, path: str) -> None:
    response = await client.get(path, headers=AUTH)
    assert response.status == 404
    assert b"not a frame" not in await response.read()


async def test_traversal_outside_the_route_never_reaches_a_file(client: TestClient) -> None:
    for path in ("/frames/../secret.txt", "/frames/cam/../../secret.txt"):
        response = await client.get(path, headers=AUTH)
        assert response.status in (401, 404) and b"not a frame" not in await response.read()


async def test_ask_frames_fetches_by_url_when_the_file_is_not_here(
    client: TestClient, tmp_path: Path
) -> None:
    url = str(client.make_url("/frames/cam/0_2000.jpg"))
    here = {"stream": "cam", "start": 0.0, "end": 2.0, "path": "/nowhere/0_2000.jpg", "url": url}
    odd = {**here, "stream": "../up"}  # a reply never picks where a file lands
    saved, problems = await save_frames([here, odd, {"stream": "x"}], tmp_path / "out",
                                        token=TOKEN)  # fmt: skip
    assert [p.name for p in saved] == ["cam_0_2000.jpg"] and len(problems) == 2
    with Image.open(saved[0]) as image:
        assert image.format == "JPEG"
    _, refused = await save_frames([here], tmp_path / "out2", token="wrong")
    assert len(refused) == 1 and "401" in refused[0]


class _Recorder:
    """An in-memory ``Replies``: keeps what reaches it."""

    def __init__(self) -> None:
        self.finished: list[Answer] = []

    async def token(self, request_id: str, index: int, text: str) -> None:
        pass

    async def finish(self, ticket: Ticket, answer: Answer) -> None:
        self.finished.append(answer)

    async def fail(self, ticket: Ticket, error: QueryError) -> None:
        pass


async def test_final_answers_carry_one_frame_per_cited_span(tmp_path: Path) -> None:
    store = FrameStore(FrameSettings(), tmp_path)
    for i in range(10):
        store.write("cam", 2.0 * i, 2.0 * i + 2.0, np.full((16, 16, 3), 20 * i, np.uint8))
    recorder = _Recorder()
    replies = FramedReplies(recorder, store, limit=2)
    evidence = (Span("cam", 0.0, 6.0), Span("cam", 10.0, 12.0), Span("cam", 14.0, 20.0))
    answer = Answer(id="a" * 8, streams=("cam",), question="q", text="t", evidence=evidence,
                    attended=(), frames=4, history=(0.0, 20.0), gaps=(), latency_s=1.0,
                    ttft_s=None, tokens=1, model="tiny")  # fmt: skip
    ticket = Ticket(request=Query(id="a" * 8, question="q"), entry_id=None, received_at=0.0)
    await replies.finish(ticket, answer)
    (framed,) = recorder.finished
    assert [(f.start, f.end) for f in framed.evidence_frames] == [(2.0, 4.0), (16.0, 18.0)]
    wire = wire_answer(framed)  # the wire form keeps them, paths and all
    assert [f.path for f in wire.evidence_frames] == [f.path for f in framed.evidence_frames]
    assert wire_answer(answer).evidence_frames == ()  # an answer without frames still reads
