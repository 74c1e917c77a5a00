"""sd_notify over a real datagram socket; JSON and text log lines, redacted."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sinks.redact import RedactingFormatter
from streamer.app.logs import JsonFormatter, log_context, setup_logging
from streamer.app.notify import SystemdNotifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5.0)
    try:
        yield path, sock
    finally:
        sock.close()


def test_ready_watchdog_and_stopping_reach_the_socket(
    notify_socket: tuple[str, socket.socket],
) -> None:
    path, sock = notify_socket
    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = SystemdNotifier.from_environ(environ)
    assert notifier.enabled and notifier.watchdog_interval_s == 2.0
    assert notifier.ready("2 stream(s)")
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 stream(s)"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_socket_names_are_supported() -> None:
    name = f"flashwatch-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5.0)
        assert SystemdNotifier(f"@{name}").ready()
        assert sock.recv(64) == b"READY=1"


def test_no_socket_means_no_op_and_a_foreign_watchdog_is_ignored(tmp_path: Path) -> None:
    assert not SystemdNotifier.from_environ({}).ready()
    other_pid = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert SystemdNotifier.from_environ(other_pid).watchdog_interval_s is None
    gone = SystemdNotifier(str(tmp_path / "missing.sock"))
    assert gone.enabled and not gone.watchdog()  # logged once, never raised


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("streamer.test", logging.WARNING, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_stream_and_query_and_hide_secrets() -> None:
    formatter = JsonFormatter(secrets=("tok-123",))
    with log_context(stream="cam1"):
        line = json.loads(
            formatter.format(_record("open %s with %s", "rtsp://u:hunter2@cam/live", "tok-123"))
        )
    assert line["level"] == "warning" and line["logger"] == "streamer.test"
    assert line["stream"] == "cam1" and "query_id" not in line
    assert line["time"].endswith("Z")
    assert "hunter2" not in line["message"] and "tok-123" not in line["message"]
    assert "rtsp://***@cam/live" in line["message"]
    explicit = json.loads(formatter.format(_record("done", query_id="q7", stream="cam2")))
    assert explicit["query_id"] == "q7" and explicit["stream"] == "cam2"


def test_an_exception_stays_inside_one_json_line() -> None:
    try:
        raise RuntimeError("redis://:pw@host:6379 broke")
    except RuntimeError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    text = JsonFormatter().format(record)
    assert "\n" not in text
    assert "pw@" not in text and "RuntimeError" in json.loads(text)["error"]


def test_text_lines_are_redacted_too() -> None:
    formatter = RedactingFormatter(logging.Formatter("%(message)s"), ("tok-9",))
    text = formatter.format(_record("x tok-9 rtsp://a:b@c/"))
    assert text == "x *** rtsp://***@c/"


def test_setup_logging_json_writes_one_object_a_line(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("info", "json", tty=False, secrets=("zzzz",))
        logging.getLogger("flashwatch.test").info("hello zzzz")
        logging.getLogger("flashwatch.test").debug("not shown")
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["message"] == "hello ***"
