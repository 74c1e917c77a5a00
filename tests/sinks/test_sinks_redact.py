"""Redaction: each URL form that used to leak, in URLs, PyAV-shaped error texts and log lines,
and properties over generated secrets (never shown; scheme, host, port and path still are)."""

from __future__ import annotations

import io
import logging
import string

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sinks.redact import (
    REDACTED,
    SAFE_QUERY_KEYS,
    RedactingFormatter,
    known_secrets,
    redact_text,
    redact_url,
    url_secrets,
)

# (url, the secret in it, what must still be shown)
LEAKS = [
    ("srt://10.0.0.9:9000?passphrase=Sup3rSecretPass&mode=caller", "Sup3rSecretPass",
     "srt://10.0.0.9:9000?passphrase=***&mode=caller"),
    ("https://cdn.example/live/index.m3u8?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=f00dfeed42",
     "f00dfeed42", "https://cdn.example/live/index.m3u8?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("http://cam.example/stream.m3u8?api_key=k3y-abcdef", "k3y-abcdef",
     "http://cam.example/stream.m3u8?api_key=***"),
    ("rtsp://t0ken-abc123@10.0.0.5:554/live", "t0ken-abc123", "rtsp://***@10.0.0.5:554/live"),
    ("rtsp://admin:pa#ss-word@10.0.0.5/live", "ss-word", "rtsp://***@10.0.0.5/live"),
    ("rtsp://admin:pa/ss-word@10.0.0.5/live", "ss-word", "rtsp://***@10.0.0.5/live"),
    ("rtsp://admin:pa@ss-word@10.0.0.5/live", "ss-word", "rtsp://***@10.0.0.5/live"),
]  # fmt: skip
LEAK_IDS = ["srt-passphrase", "hls-signed", "api-key", "user-only", "hash", "slash", "at"]


@pytest.mark.parametrize(("url", "secret", "shown"), LEAKS, ids=LEAK_IDS)
def test_each_leaking_form_is_masked_in_the_url(url: str, secret: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert secret not in redact_url(url)


@pytest.mark.parametrize(("url", "secret", "shown"), LEAKS, ids=LEAK_IDS)
def test_each_leaking_form_is_masked_in_error_texts(url: str, secret: str, shown: str) -> None:
    # How PyAV (OSError with the filename), FFmpeg's log and our own messages spell a URL.
    for text in (
        f"[Errno 111] Connection refused: {url!r}",
        f'Invalid argument: "{url}" returned 22',
        f"Opening {url} failed: Connection refused",
        f"{url}",
    ):
        out = redact_text(text)
        assert secret not in out, text
        assert shown in out, text


@pytest.mark.parametrize(("url", "secret", "shown"), LEAKS, ids=LEAK_IDS)
def test_each_leaking_form_is_masked_in_log_lines(url: str, secret: str, shown: str) -> None:
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    fmt = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    handler.setFormatter(RedactingFormatter(fmt, known_secrets([url])))
    log = logging.getLogger(f"test.redact.{id(lines)}")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        log.info("opening %s", url)  # as an argument
        log.warning(f"source said: {url!r}")  # baked into the message
        try:
            raise ConnectionRefusedError(111, "Connection refused", url)
        except OSError:
            log.exception("open failed")  # in the traceback
        log.error("FFmpeg: %s", url.split("://", 1)[1])  # the URL without its scheme
    finally:
        log.removeHandler(handler)
    text = lines.getvalue()
    assert secret not in text
    assert text.count(shown) == 3 and "ConnectionRefusedError" in text
    assert text.startswith("INFO test.redact.")  # the application's layout is kept


def test_allow_listed_values_shown_only_while_plain() -> None:
    assert redact_url("testsrc://?size=320x240&fps=10") == "testsrc://?size=320x240&fps=10"
    assert redact_url("rtsp://cam/cam/realmonitor?channel=1&subtype=0") == (
        "rtsp://cam/cam/realmonitor?channel=1&subtype=0"
    )
    # A harmless key cannot smuggle a secret through its value.
    assert redact_url("srt://h:1?mode=caller;passphrase=xyz") == "srt://h:1?mode=***"
    assert redact_url("https://h/x?Token=a&TOKEN=b&tok%65n=c") == (
        "https://h/x?Token=***&TOKEN=***&tok%65n=***"
    )
    assert redact_url("https://h/x?deadbeefcafe") == "https://h/x?***"  # a bare value
    assert redact_url("https://h/x#access_token=abc") == "https://h/x#***"
    assert {"size", "fps", "channel", "db"} <= SAFE_QUERY_KEYS


def test_paths_and_plain_urls_keep_their_spelling() -> None:
    for url in ("/data/a b.mp4", "unix:///tmp/redis.sock", "redis://127.0.0.1:6379/0",
                "http://[::1]:8080/whip/cam", "file:///srv/v%20ideo.mp4"):  # fmt: skip
        assert redact_url(url) == url


def test_an_at_in_a_query_value_hides_its_tail() -> None:
    out = redact_url("https://h/p?api_key=abc@tailsecret&fps=5")
    assert "tailsecret" not in out and "abc" not in out and out.endswith("&fps=5")


def test_free_text_pairs_and_headers() -> None:
    out = redact_text(
        "Authorization: Basic dXNlcjpwdw== then Bearer eyJhbGciOi.x.y; password=hunter2 "
        "host:9000?passphrase=abc&mode=caller and the token expired; Basic auth is off"
    )
    for secret in ("dXNlcjpwdw", "eyJhbGciOi", "hunter2", "abc&"):
        assert secret not in out
    assert "the token expired" in out and "Basic auth is off" in out and "mode=caller" in out


def test_known_secrets_are_masked_however_the_text_spells_them() -> None:
    url = "rtsp://viewer:p%40ss-w0rd@10.0.0.5/live?authkey=k-123456"
    secrets = known_secrets([url], ["whip-token-1"])
    assert {"p%40ss-w0rd", "p@ss-w0rd", "k-123456", "whip-token-1"} <= set(secrets)
    text = "auth failed for viewer with p@ss-w0rd (key k-123456), token whip-token-1"
    out = redact_text(text, secrets)
    assert "p@ss-w0rd" not in out and "k-123456" not in out and "whip-token-1" not in out
    assert url_secrets("testsrc://?size=64x64") == ()
    assert redact_text("ab cd", ["ab"]) == "ab cd"  # too short to mask outside a URL


# ---- properties -----------------------------------------------------------------------------

# Anything a password, token or query value may hold unencoded, but whitespace and quotes (those
# end a bare URL in free text; quoted URLs are covered with them below).
SECRET_CHARS = string.ascii_letters + string.digits + "-._~!$&()*+,;=:@/?#%[]"
secrets = st.text(SECRET_CHARS, min_size=1, max_size=24)
any_secrets = st.text(SECRET_CHARS + " '\"\\", min_size=1, max_size=24)
schemes = st.sampled_from(["rtsp", "rtsps", "rtmp", "srt", "http", "https", "redis", "whip"])
hosts = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5}){0,2}", fullmatch=True)
ports = st.integers(1, 65535)
paths = st.from_regex(r"(/[A-Za-z0-9._-]{1,8}){0,3}", fullmatch=True)
# No per-example deadline: the machine may be loaded; the work per example is tiny anyway.
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
keys = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,12}", fullmatch=True).filter(
    lambda k: k.lower() not in SAFE_QUERY_KEYS
)


@relaxed
@given(schemes, secrets, hosts, ports, paths)
def test_userinfo_never_shown_host_port_path_kept(
    scheme: str, secret: str, host: str, port: int, path: str
) -> None:
    url = f"{scheme}://{secret}@{host}:{port}{path}"
    # A ? before the @ may start a query whose value holds the @: then the rest is masked too.
    shown = f"{scheme}://{REDACTED}@" + (REDACTED if "?" in secret else f"{host}:{port}{path}")
    assert redact_url(url) == shown
    assert redact_text(f"[Errno 111] Connection refused: {url!r}") == (
        f"[Errno 111] Connection refused: '{shown}'"
    )
    assert redact_text(f"Connection to {url} failed") == f"Connection to {shown} failed"
    assume(secret not in f"{scheme}://{REDACTED}@{host}:{port}{path}")
    assert secret not in redact_url(url)


@relaxed
@given(schemes, secrets, hosts, ports, paths, keys, st.booleans())
def test_query_values_never_shown_host_port_path_kept(
    scheme: str, secret: str, host: str, port: int, path: str, key: str, first: bool
) -> None:
    base = f"{scheme}://{host}:{port}{path}"
    query = f"{key}={secret}&fps=10" if first else f"fps=10&{key}={secret}"
    url = f"{base}?{query}"
    outs = (redact_url(url), redact_text(f"Protocol not found: {url!r}"))
    if not set(secret) & set("&#@"):  # those split the value or move the userinfo's end
        shown = f"{base}?{key}={REDACTED}&fps=10" if first else f"{base}?fps=10&{key}={REDACTED}"
        assert outs == (shown, f"Protocol not found: '{shown}'")
    every_piece = f"{base}?fps=10&{key}={REDACTED}&{REDACTED}&fps=10&{key}={REDACTED}#{REDACTED}"
    assume(secret not in every_piece)
    # a value holding "@" reads as the end of a userinfo, which is then hidden: "scheme://***@"
    assume(secret not in f"{scheme}://{REDACTED}@")
    assume(secret not in "Protocol not found: ''")  # the message's own words
    for out in outs:
        assert secret not in out


@relaxed
@given(schemes, any_secrets, hosts, ports, paths)
def test_quoted_urls_hide_secrets_with_spaces_and_quotes(
    scheme: str, secret: str, host: str, port: int, path: str
) -> None:
    url = f"{scheme}://user:{secret}@{host}:{port}{path}"
    text = f"Server returned 401 Unauthorized: {url!r}"
    assume(secret not in f"Server returned 401 Unauthorized: '{scheme}://{REDACTED}@{host}")
    assume(secret not in f"{port}{path}'\"")
    assert secret not in redact_text(text)
    assert secret not in redact_text(f"Server said {url}", url_secrets(url)) or len(secret) < 4


@relaxed
@given(st.text(max_size=200))
def test_any_text_is_redacted_without_error(text: str) -> None:
    assert isinstance(redact_text(text, ("secret-1",)), str)
    assert "secret-1" not in redact_text(text + "secret-1", ("secret-1",))
