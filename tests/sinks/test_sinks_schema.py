"""Request parsing, time ranges, wire events, settings and small helpers (no Redis)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sinks.connection import redis_backoff
from sinks.redact import redact_url
from sinks.schema import (
    Answer,
    AttendedSpan,
    DaemonInfo,
    DaemonStatus,
    GapStatus,
    QueryTicket,
    Span,
    StreamStatus,
    decode_request,
    error_event,
    final_event,
    one_line,
    parse_request,
    request_id_of,
    resolve_time,
    salvage_request_id,
    token_event,
)
from sinks.settings import Keys, QuerySettings, RedisSettings
from streamer.engine.errors import InvalidRequest

NOW = 1_764_000_000.0  # a fixed "now", epoch seconds
LIMITS = QuerySettings(
    consumer_name="t", max_question_chars=50, max_new_tokens_limit=64, default_max_new_tokens=16
)


def parse(**fields: object) -> object:
    return parse_request({"question": "what?", **fields}, LIMITS, now=NOW)


# ------------------------------------------------------------------ resolve_time


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("-15m", NOW - 900),
        ("-2h", NOW - 7200),
        ("-30s", NOW - 30),
        ("-1d", NOW - 86400),
        ("-1.5h", NOW - 5400),
        ("now", NOW),
        (1_700_000_000, 1_700_000_000.0),
        (1_700_000_000.25, 1_700_000_000.25),
        ("1700000000", 1_700_000_000.0),
        ("2026-11-24T04:00:00Z", datetime(2026, 11, 24, 4, tzinfo=UTC).timestamp()),
        ("2026-11-24T06:00:00+02:00", datetime(2026, 11, 24, 4, tzinfo=UTC).timestamp()),
        ("2026-11-24T04:00:00", datetime(2026, 11, 24, 4, tzinfo=UTC).timestamp()),  # naive=UTC
    ],
)
def test_resolve_time_accepts(value: object, expected: float | None) -> None:
    assert resolve_time(value, NOW) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", ["-15x", "15m", "-m", "yesterday", "", True, [1], float("nan"), -5, 1e13, "-1e9d"]
)
def test_resolve_time_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        resolve_time(value, NOW)  # type: ignore[arg-type]


# ------------------------------------------------------------------ requests


def test_minimal_request_gets_daemon_defaults() -> None:
    settings = QuerySettings(consumer_name="t", default_max_new_tokens=32, default_deadline_s=9)
    request = parse_request({"question": "q"}, settings, now=NOW)
    assert request.stream == ("*",) and request.all_streams
    assert request.max_new_tokens == 32 and request.deadline_s == 9
    assert request.since is None and request.until is None
    assert len(request.id) == 32  # uuid4 hex
    assert parse_request({"question": "q"}, settings, now=NOW).id != request.id


def test_full_request_resolves_times_and_streams() -> None:
    request = parse_request(
        {
            "v": 1,
            "id": "job-1:a.b_c",
            "stream": ["cam1", "cam2", "cam1"],
            "question": "when did the van arrive?",
            "since": "-2h",
            "until": "-15m",
            "max_new_tokens": 64,
            "temperature": 0.7,
            "top_p": 0.9,
            "deadline_s": 30,
        },
        LIMITS,
        now=NOW,
    )
    assert request.id == "job-1:a.b_c"
    assert request.stream == ("cam1", "cam2") and not request.all_streams
    assert (request.since, request.until) == (NOW - 7200, NOW - 900)
    assert (request.max_new_tokens, request.temperature, request.top_p) == (64, 0.7, 0.9)
    ticket = QueryTicket(request=request, entry_id="1-0", received_at=NOW)
    assert ticket.deadline_at == NOW + 30


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"colour": "red"}, "colour"),  # unknown key
        ({"question": None}, "question"),
        ({"question": ""}, "question"),
        ({"question": "   "}, "question"),
        ({"question": "x" * 51}, "question"),  # max_question_chars
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 65}, "max_new_tokens"),  # max_new_tokens_limit
        ({"max_new_tokens": 1.5}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"max_new_tokens": "8"}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"deadline_s": 0.05}, "deadline_s"),
        ({"deadline_s": 3601}, "deadline_s"),
        ({"id": ""}, "id"),
        ({"id": "a b"}, "id"),
        ({"id": "x" * 129}, "id"),
        ({"id": 7}, "id"),
        ({"stream": []}, "stream"),
        ({"stream": ["*", "cam1"]}, "stream"),
        ({"stream": "cam one"}, "stream"),
        ({"stream": 3}, "stream"),
        ({"since": "soon"}, "since"),
        ({"until": "-5q"}, "until"),
        ({"v": 2}, "v"),
    ],
)
def test_invalid_fields_are_named(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(**fields)
    assert str(info.value).startswith(f"{field}:"), str(info.value)
    assert info.value.code == "invalid_request"


def test_limits_are_inclusive() -> None:
    request = parse_request(
        {
            "question": "x" * 50,
            "max_new_tokens": 64,
            "temperature": 2,
            "top_p": 1,
            "deadline_s": 3600,
            "id": "x" * 128,
        },
        LIMITS,
        now=NOW,
    )
    assert len(request.question) == 50 and request.max_new_tokens == 64


@pytest.mark.parametrize(
    ("since", "until"), [("-15m", "-2h"), ("-1h", "-1h"), (NOW, NOW - 1), ("now", "-1s")]
)
def test_time_range_must_be_ordered(since: object, until: object) -> None:
    with pytest.raises(InvalidRequest, match="since must be earlier than until"):
        parse(since=since, until=until)


def test_decode_request_errors() -> None:
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        decode_request("{not json")
    with pytest.raises(InvalidRequest, match="larger than"):
        decode_request("x" * 1_000_001)
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_request(["question"], LIMITS, now=NOW)
    assert decode_request(b'{"a": 1}') == {"a": 1}


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"id": "a", "question": "\xff"}', "not UTF-8"),
        ("[" * 3000 + "]" * 3000, "nested deeper"),
        ('{"q": ' + "[" * 17 + "]" * 17 + "}", "nested deeper"),
        ('{"since": 1' + "0" * 400 + "}", "number longer"),
        ('{"since": 1' + "0" * 5000 + "}", "number longer"),  # past int's str-digits limit
        ('{"since": 1e400}', "out of range"),
        ('{"since": -1e400}', "out of range"),
        ('{"since": NaN}', "not a valid number"),
        ('{"since": Infinity}', "not a valid number"),
    ],
)
def test_decode_request_bounds_hostile_input(raw: str | bytes, needle: str) -> None:
    """Each of these raised RecursionError, OverflowError or UnicodeDecodeError before."""
    with pytest.raises(InvalidRequest, match=needle):
        decode_request(raw)


def test_decode_request_counts_brackets_in_strings_as_text() -> None:
    payload = {"id": "x", "question": "[" * 500 + "{" * 500, "stream": [["cam"]]}
    assert decode_request(json.dumps(payload)) == payload


def test_a_huge_integer_time_is_invalid_not_an_overflow() -> None:
    with pytest.raises(InvalidRequest, match="since"):
        parse_request({"question": "q", "since": 10**400}, LIMITS, now=NOW)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=40,
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200), _JSON.map(json.dumps)))
def test_any_input_is_a_request_or_invalid_request(raw: str | bytes) -> None:
    try:
        parse_request(decode_request(raw), LIMITS, now=NOW)
    except InvalidRequest as exc:
        assert "\n" not in one_line(exc)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_one_line_is_one_printable_line(text: str) -> None:
    line = one_line(text)
    assert len(line) <= 300 and not any(ch in line for ch in "\n\r\x00\x1b\u2028")
    assert "\n" not in json.loads(error_event("e", "invalid_request", text))["message"]


def test_salvage_request_id() -> None:
    assert salvage_request_id(b'{"id": "q-1", "question": "\xff') == "q-1"
    assert salvage_request_id(b'{"id": "not ok"}') is None
    assert salvage_request_id("no json at all") is None


def test_request_id_of() -> None:
    assert request_id_of({"id": "ok-1"}) == "ok-1"
    assert request_id_of({"id": "not ok"}) is None
    assert request_id_of({"id": 5}) is None
    assert request_id_of(["id"]) is None


# ------------------------------------------------------------------ events and answers


def make_answer(**overrides: object) -> Answer:
    fields: dict[str, object] = {
        "id": "q1",
        "stream": ["cam1"],
        "question": "what?",
        "answer": "a van",
        "evidence": [Span(stream="cam1", start=50, end=60), Span(stream="cam1", start=0, end=10)],
        "attended": [
            AttendedSpan(stream="cam1", start=0, end=10, mass=0.2),
            AttendedSpan(stream="cam1", start=50, end=60, mass=0.7),
        ],
        "frames": 16,
        "history": {"start": 0, "end": 60},
        "gaps": [{"stream": "cam1", "start": 20, "end": 30, "reason": "disconnected"}],
        "latency_s": 1.5,
        "ttft_s": 0.4,
        "tokens": 3,
        "model": "tiny",
    }
    fields.update(overrides)
    return Answer.model_validate(fields)


def test_answer_orders_evidence_by_time_and_attended_by_mass() -> None:
    answer = make_answer()
    assert [s.start for s in answer.evidence] == [0, 50]
    assert [s.mass for s in answer.attended] == [0.7, 0.2]


def test_answer_rejects_bad_spans_and_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        make_answer(evidence=[{"stream": "cam1", "start": 10, "end": 5}])
    with pytest.raises(ValidationError):
        make_answer(confidence=0.9)
    with pytest.raises(ValidationError):
        make_answer(latency_s=-1)


def test_events_round_trip_as_json() -> None:
    final = json.loads(final_event(make_answer()))
    assert final["type"] == "final" and final["v"] == 1 and final["id"] == "q1"
    assert final["evidence"][0] == {"stream": "cam1", "start": 0.0, "end": 10.0}
    assert Answer.model_validate({k: v for k, v in final.items() if k != "type"}) == make_answer()
    assert json.loads(token_event("q1", 3, "é")) == {
        "type": "token",
        "v": 1,
        "id": "q1",
        "index": 3,
        "text": "é",
    }
    error = json.loads(error_event("q1", "busy", "queue full"))
    assert (error["type"], error["code"], error["message"]) == ("error", "busy", "queue full")


def test_status_redacts_urls_keeps_recent_gaps_and_survives_new_fields() -> None:
    gaps = [GapStatus(start=float(i), end=i + 0.5, reason="stalled") for i in range(30, 0, -1)]
    stream = StreamStatus(
        name="cam1", url="rtsp://admin:hunter2@10.0.0.5/live", state="live", gaps=gaps
    )
    assert "hunter2" not in stream.url and stream.url == "rtsp://***@10.0.0.5/live"
    assert len(stream.gaps) == 20 and stream.gaps[-1].start == 30.0
    assert [g.start for g in stream.gaps] == sorted(g.start for g in stream.gaps)
    status = DaemonStatus(
        time=NOW,
        daemon=DaemonInfo(
            pid=1, started_at=NOW - 5, uptime_s=5, version="0.1", model="tiny", device="cpu"
        ),
        streams=[stream],
    )
    data = json.loads(status.model_dump_json())
    data["future_field"] = 1
    assert DaemonStatus.model_validate(data) == status


# ------------------------------------------------------------------ settings and helpers


def test_settings_forbid_unknown_keys_and_check_bounds() -> None:
    with pytest.raises(ValidationError):
        QuerySettings(consumer_nam="x")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        QuerySettings(max_in_flight=0)
    with pytest.raises(ValidationError):
        QuerySettings(default_max_new_tokens=2000, max_new_tokens_limit=1024)
    with pytest.raises(ValidationError):
        RedisSettings(url="http://x")
    with pytest.raises(ValidationError):
        RedisSettings(backoff_initial_s=5, backoff_max_s=1)
    assert QuerySettings().consumer_name.endswith(str(__import__("os").getpid()))


def test_redis_settings_never_show_the_password() -> None:
    settings = RedisSettings(url="redis://user:s3cret@db:6379/0")
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)
    assert settings.url.endswith("@db:6379/0")  # the real value is still there to connect


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@h:1/0", "redis://***@h:1/0"),
        ("redis://u:p@ss@h:1/0", "redis://***@h:1/0"),
        ("rtsp://admin:secret@cam/stream", "rtsp://***@cam/stream"),
        ("https://h/whip?token=abc&x=1", "https://h/whip?token=***&x=***"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
        ("redis+cluster://:pw@h1:1,h2:2", "redis+cluster://***@h1:1,h2:2"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_keys() -> None:
    keys = Keys("fw")
    assert (keys.requests, keys.ask, keys.cancel) == ("fw:requests", "fw:ask", "fw:cancel")
    assert (keys.status, keys.status_last) == ("fw:status", "fw:status:last")
    # The keys of one request share its hash tag (one Redis Cluster slot).
    assert keys.reply("q1") == "fw:reply:{q1}" and keys.answer("q1") == "fw:answer:{q1}"
    assert keys.seen("q1") == "fw:seen:{q1}"


def test_redis_backoff_doubles_and_caps() -> None:
    settings = RedisSettings(backoff_initial_s=0.5, backoff_max_s=10)
    backoff = redis_backoff(settings)
    delays = [backoff.next_delay() for _ in range(8)]
    assert backoff.attempt == 8
    assert all(0.4 <= d <= 10 for d in delays) and delays[-1] > delays[0]
    assert delays[-1] >= 8.0  # at the cap, less at most the jitter
    backoff.reset()
    assert backoff.attempt == 0 and backoff.next_delay() <= 0.6
