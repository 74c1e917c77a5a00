"""The real daemon with leaking source URLs: neither its log output nor its status shows a secret
(``serve`` installs the redacting formatter on its log handler)."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import pytest
from cli_harness import ServeProcess, status_once, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SOURCES = {  # nothing listens on 127.0.0.1:1
    "srt": "srt://127.0.0.1:1?passphrase=Sup3rSecretPass&mode=caller",
    "hls": "http://127.0.0.1:1/index.m3u8?X-Amz-Signature=f00dfeed42",
    "key": "http://127.0.0.1:1/live.m3u8?api_key=k3y-abcdef",
    "user": "rtsp://t0ken-abc123@127.0.0.1:1/live",
    "hash": "rtsp://admin:pa#ss-word@127.0.0.1:1/live",
    "slash": "rtsp://admin:pa/ss-word@127.0.0.1:1/live",
}
SECRETS = ("Sup3rSecretPass", "f00dfeed42", "k3y-abcdef", "t0ken-abc123", "ss-word", "hunter2")


def test_daemon_logs_and_status_never_show_url_secrets(
    serve: Callable[..., ServeProcess], redis_server: str, cli_env: dict[str, str]
) -> None:
    sources = [arg for name, url in SOURCES.items() for arg in ("--source", f"{name}={url}")]
    daemon = serve("--redis-url", redis_server, "--set", "log_level=debug",
                   "--set", "ingest.whip.token=hunter2-whip", *sources)  # fmt: skip

    def all_failed_once() -> dict[str, Any] | None:
        snapshot = status_once(redis_server, cli_env)
        if snapshot is None:
            return None
        errors = {s["name"]: s["last_error"] for s in snapshot["streams"] if s["name"] in SOURCES}
        return snapshot if len(errors) == len(SOURCES) and all(errors.values()) else None

    snapshot = wait_for(all_failed_once, 90, "an error on every leaking stream")
    assert daemon.terminate(signal.SIGTERM) == 0, daemon.output()[-3000:]
    shown = json.dumps(snapshot)
    output = daemon.output()
    for secret in SECRETS:
        assert secret not in shown, secret
        assert secret not in output, secret
    assert "rtsp://***@127.0.0.1:1/live" in shown
    assert "127.0.0.1:1" in output  # the log still says where
