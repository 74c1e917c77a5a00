"""Secrets in source URLs never reach status (``url``, ``last_error``) or the ingest's log lines:
real PyAV opens against a closed loopback port, so the error texts are FFmpeg's own."""

from __future__ import annotations

import io
import logging

import pytest

from sinks.redact import RedactingFormatter, known_secrets
from streamer.ingest.settings import StreamSettings

# (url on a closed loopback port, the secret in it, the URL as status shows it)
LEAKS = [
    ("srt://127.0.0.1:1?passphrase=Sup3rSecretPass&mode=caller", "Sup3rSecretPass",
     "srt://127.0.0.1:1?passphrase=***&mode=caller"),
    ("http://127.0.0.1:1/index.m3u8?X-Amz-Signature=f00dfeed42&X-Amz-Expires=60", "f00dfeed42",
     "http://127.0.0.1:1/index.m3u8?X-Amz-Signature=***&X-Amz-Expires=***"),
    ("http://127.0.0.1:1/live.m3u8?api_key=k3y-abcdef", "k3y-abcdef",
     "http://127.0.0.1:1/live.m3u8?api_key=***"),
    ("rtsp://t0ken-abc123@127.0.0.1:1/live", "t0ken-abc123", "rtsp://***@127.0.0.1:1/live"),
    ("rtsp://admin:pa#ss-word@127.0.0.1:1/live", "ss-word", "rtsp://***@127.0.0.1:1/live"),
    ("rtsp://admin:pa/ss-word@127.0.0.1:1/live", "ss-word", "rtsp://***@127.0.0.1:1/live"),
    ("rtsp://admin:pa@ss-word@127.0.0.1:1/live", "ss-word", "rtsp://***@127.0.0.1:1/live"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("url", "secret", "shown"),
    LEAKS,
    ids=["srt-passphrase", "hls-signed", "api-key", "user-only", "hash", "slash", "at"],
)
async def test_status_and_logs_never_show_the_secret(
    start_ingest, fast_ingest, caplog: pytest.LogCaptureFixture, url: str, secret: str, shown: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="streamer")
    lines = io.StringIO()  # what the daemon's handler prints (cli.py installs this formatter)
    handler = logging.StreamHandler(lines)
    handler.setFormatter(RedactingFormatter(logging.Formatter(), known_secrets([url])))
    logging.getLogger("streamer").addHandler(handler)
    try:
        settings = StreamSettings(name="cam", url=url, timeout_s=1.0)
        async with start_ingest(settings, fast_ingest) as run:
            await run.wait_for(lambda: run.ingest.stats().last_error is not None, 20, "an error")
            stats = run.ingest.stats()
    finally:
        logging.getLogger("streamer").removeHandler(handler)
    assert stats.url == shown
    assert stats.last_error is not None and secret not in stats.last_error
    assert "127.0.0.1:1" in stats.last_error or "not found" in stats.last_error.lower()
    assert secret not in caplog.text  # the ingest's own log arguments are redacted already
    assert secret not in lines.getvalue() and "cam" in lines.getvalue()
