"""Hide credentials in URLs, free text and log lines before they reach a log, status or an error.

Safe by construction, not by a list of secret-looking names:

- every userinfo is masked whole: ``rtsp://admin:pw@cam/s1`` and ``rtsp://token@cam/s1`` both
  become ``rtsp://***@cam/s1``. The userinfo ends at the *last* ``@`` of the URL, so a password
  with an unencoded ``#``, ``/`` or ``@`` is masked too (at worst a path holding an ``@`` is
  masked with it). A ``?`` before that ``@`` may start a query whose value holds the ``@``
  (``?key=a@b``): then what follows the ``@`` is masked like a query value, host included;
- every query value is masked (``?X-Amz-Signature=***``, ``?passphrase=***``, a bare ``?abc``
  piece too) except the values of a short allow-list of harmless keys (``size``, ``fps``,
  ``channel``…), and those only while they look like plain numbers or words; a fragment is masked;
- the scheme, host, port and path stay readable.

Free text (PyAV/FFmpeg put the URL into their messages, quoted or bare) gets the same treatment
for every ``scheme://`` it holds, plus ``[?&]key=value`` pieces outside URLs, ``Bearer …`` and
``password=…``-style pairs. The secrets a component knows (its own URL's userinfo and query
values, the WHIP token: ``known_secrets``) are also replaced wherever they appear, however an
error message spells the URL around them. ``RedactingFormatter`` applies all this to every line
a logging handler prints, tracebacks included.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import NamedTuple
from urllib.parse import unquote

REDACTED = "***"

# Query keys whose values are shown: options of the sources we open (testsrc, camera channel
# selection, SRT mode, Redis db), never anything that can carry a credential.
SAFE_QUERY_KEYS = frozenset(
    {
        "size", "fps", "duration", "width", "height",
        "channel", "subtype", "stream", "profile", "resolution", "codec",
        "transport", "rtsp_transport", "mode", "latency", "timeout", "db", "protocol",
    }
)  # fmt: skip
# A shown value must look like a number, a size or a word: ``1``, ``320x240``, ``caller``.
_HARMLESS_VALUE = re.compile(r"[A-Za-z0-9._:+-]{0,32}")
# Literal secrets shorter than this are not replaced in free text (they would mask ordinary
# words); inside a URL they are masked whatever their length.
MIN_LITERAL_SECRET = 4

_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*://"
# A URL in free text: inside '…' or "…" (Python reprs, FFmpeg messages) up to the closing quote,
# spaces included; bare up to whitespace or a quote.
_URL_IN_TEXT = re.compile(
    rf"'(?P<single>{_SCHEME}(?:\\.|[^'\\\n])*)'"
    rf'|"(?P<double>{_SCHEME}(?:\\.|[^"\\\n])*)"'
    rf"|(?P<bare>{_SCHEME}[^\s'\"<>]*)"
)
_QUERY_PAIR = re.compile(r"(?<=[?&])(?P<key>[^\s=&?#'\"]+)=(?P<value>[^\s&#'\"]*)")
# ``Authorization: Basic …`` and ``Bearer …`` (the header's own spelling, not the prose word).
_AUTH_HEADER = re.compile(
    r"(?P<head>(?i:\bauthorization)\s*[:=]\s*(?:[A-Za-z]+\s+)?|\bBearer\s+)"
    r"(?!\*\*\*)[A-Za-z0-9._~+/=-]+"
)
_SECRET_PAIR = re.compile(
    r"(?i)\b(?P<key>password|passwd|passphrase|secret|token|api_?key|access_?key)"
    r"(?P<sep>\s*=\s*)(?!\*\*\*)(?P<value>[^\s,;&'\"]+)"
)


def redact_url(url: str) -> str:
    """``url`` with its userinfo, query values (but harmless ones) and fragment masked.

    ``rtsp://admin:pw@cam:554/s1?channel=1&token=t`` → ``rtsp://***@cam:554/s1?channel=1&token=***``.
    A plain path keeps its spelling (``unix:///path`` and ``/data/a b.mp4`` too).
    """
    if re.match(_SCHEME, url):
        return _redact_url_token(url)
    return redact_text(url)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Free text with every URL redacted (``redact_url``), query values, ``Bearer`` tokens and
    ``password=``-style values outside URLs masked, and each of ``secrets`` replaced."""
    text = _URL_IN_TEXT.sub(_redact_url_match, text)
    text = _QUERY_PAIR.sub(_redact_query_match, text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['head']}{REDACTED}", text)
    text = _SECRET_PAIR.sub(lambda m: f"{m['key']}{m['sep']}{REDACTED}", text)
    # Longest first: a secret that contains a shorter one is replaced whole.
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= MIN_LITERAL_SECRET:
            text = text.replace(secret, REDACTED)
    return text


def url_secrets(url: str) -> tuple[str, ...]:
    """What ``redact_url`` masks in ``url`` (userinfo and its parts, query values, fragment), as
    written and percent-decoded, to replace wherever else they turn up (``redact_text``)."""
    if not re.match(_SCHEME, url):
        return ()
    parts = _split_url(url)
    found: list[str] = []
    if parts.userinfo is not None:
        found += [parts.userinfo, *parts.userinfo.split(":", 1)]
    if parts.fragment:
        found.append(parts.fragment)
    for piece in (parts.query or "").split("&"):
        key, equals, value = piece.partition("=")
        if not _is_shown(key, value, equals=bool(equals)):
            found.append(value if equals else key)
    decoded = [unquote(s) for s in found]
    return tuple(s for s in dict.fromkeys(found + decoded) if len(s) >= MIN_LITERAL_SECRET)


def known_secrets(urls: Iterable[str], tokens: Iterable[str | None] = ()) -> tuple[str, ...]:
    """Every secret of ``urls`` (``url_secrets``) and each token, for ``RedactingFormatter``."""
    found = [s for url in urls for s in url_secrets(url)]
    found += [t for t in tokens if t is not None and len(t) >= MIN_LITERAL_SECRET]
    return tuple(dict.fromkeys(found))


class RedactingFormatter(logging.Formatter):
    """A logging formatter whose every line (message, arguments, traceback) is ``redact_text``-ed.

    Wraps the handler's own formatter, so the layout stays the one the application chose::

        handler.setFormatter(RedactingFormatter(logging.Formatter(fmt), secrets))
    """

    def __init__(self, inner: logging.Formatter | None = None, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._inner = inner or logging.Formatter()
        self._secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(self._inner.format(record), self._secrets)


# ---- the pieces ----------------------------------------------------------------------------


class _UrlParts(NamedTuple):
    scheme: str
    userinfo: str | None  # None: no @
    base: str  # host, port and path, shown
    query: str | None  # None: no ?
    fragment: str | None  # None: no #


def _split_url(url: str) -> _UrlParts:
    """Split ``scheme://…`` the way that hides most: the userinfo ends at the last ``@``."""
    scheme, _, rest = url.partition("://")
    userinfo, at, rest = rest.rpartition("@")
    if at and "?" in userinfo:
        # …?key=a@b: the @ may sit in a query value, and then what follows it is the value's
        # tail. It cannot be told from a password holding ``?``, so it is masked like a value.
        rest, hash_, fragment = rest.partition("#")
        return _UrlParts(scheme, userinfo, "", rest, fragment if hash_ else None)
    rest, hash_, fragment = rest.partition("#")
    base, question, query = rest.partition("?")
    return _UrlParts(
        scheme, userinfo if at else None, base, query if question else None,
        fragment if hash_ else None,
    )  # fmt: skip


def _redact_url_token(url: str) -> str:
    parts = _split_url(url)
    shown = f"{parts.scheme}://{'' if parts.userinfo is None else REDACTED + '@'}{parts.base}"
    if parts.query is not None:
        pieces = "&".join(_redact_query_piece(piece) for piece in parts.query.split("&"))
        shown += pieces if parts.userinfo is not None and not parts.base else "?" + pieces
    if parts.fragment is not None:
        shown += "#" + (REDACTED if parts.fragment else "")
    return shown


def _redact_url_match(match: re.Match[str]) -> str:
    if match["single"] is not None:
        return f"'{_redact_url_token(match['single'])}'"
    if match["double"] is not None:
        return f'"{_redact_url_token(match["double"])}"'
    return _redact_url_token(match["bare"])


def _redact_query_piece(piece: str) -> str:
    if not piece:
        return piece
    key, equals, value = piece.partition("=")
    if not equals:
        return piece if _is_shown(key, "", equals=False) else REDACTED
    return piece if _is_shown(key, value, equals=True) else f"{key}={REDACTED}"


def _redact_query_match(match: re.Match[str]) -> str:
    key, value = match["key"], match["value"]
    return match[0] if _is_shown(key, value, equals=True) else f"{key}={REDACTED}"


def _is_shown(key: str, value: str, *, equals: bool) -> bool:
    """An allow-listed key (a bare flag, or with a plain value) is shown; anything else is not."""
    if unquote(key).lower() not in SAFE_QUERY_KEYS:
        return False
    return not equals or _HARMLESS_VALUE.fullmatch(value) is not None
