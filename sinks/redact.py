"""Hide credentials in URLs and free text before they reach a log line, status or an error.

``rtsp://user:secret@cam/live`` → ``rtsp://user:***@cam/live``; query parameters that look like
secrets (``?token=…``) are masked the same way. Pure string functions, used by every package.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"
# Query parameters that carry secrets in the URL schemes we meet (redis, rtsp, whip).
_SECRET_PARAMS = frozenset(
    {"password", "passwd", "pass", "pwd", "token", "access_token", "secret", "key", "auth"}
)
# scheme://user:password@ anywhere in free text (FFmpeg puts the URL into its messages).
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s:/@]*):(?P<pw>[^\s@/]*)@"
)
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:" + "|".join(sorted(_SECRET_PARAMS)) + r"))=(?P<value>[^&\s'\"]*)",
    re.IGNORECASE,
)


def redact_url(url: str) -> str:
    """``url`` with its password (and secret query parameters) replaced by ``***``.

    ``redis://user:pw@host:6379/0`` → ``redis://user:***@host:6379/0``; a URL with only a
    password (``redis://:pw@host``) keeps the empty user. Unparseable input is replaced whole,
    since it might be a secret itself.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}:{REDACTED}@{hostport}" if has_password else f"{REDACTED}@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(k, REDACTED if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*"
            )
        if netloc == parts.netloc and query == parts.query:
            return url  # nothing secret; keep the exact spelling (unix:///path)
        if "://" in url:  # urlunsplit would drop the "//" of an empty netloc
            rebuilt = f"{parts.scheme}://{netloc}{parts.path}"
            rebuilt += f"?{query}" if query else ""
            return rebuilt + (f"#{parts.fragment}" if parts.fragment else "")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return REDACTED


def redact_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Free text with every ``scheme://user:pw@`` password, secret query value and each of
    ``secrets`` (e.g. the WHIP token) masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['key']}={REDACTED}", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text
