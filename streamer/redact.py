"""Keep credentials out of logs, stats and error messages.

``rtsp://user:secret@cam/live`` → ``rtsp://user:***@cam/live``; query parameters that look like
secrets (``?token=…``) are masked the same way. Pure string functions.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

MASK = "***"
_SECRET_PARAMS = frozenset({"token", "password", "passwd", "pass", "pwd", "secret", "key", "auth"})
# scheme://user:password@ anywhere in free text (FFmpeg puts the URL into its messages).
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s:/@]*):(?P<pw>[^\s@/]*)@"
)
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:" + "|".join(sorted(_SECRET_PARAMS)) + r"))=(?P<value>[^&\s'\"]*)",
    re.IGNORECASE,
)


def redact_url(url: str) -> str:
    """The URL with its password and secret-looking query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    changed = False
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        if has_password:
            netloc, changed = f"{user}:{MASK}@{host}", True
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            masked = [(k, MASK if k.lower() in _SECRET_PARAMS else v) for k, v in pairs]
            query, changed = urlencode(masked, safe="*"), True
    if not changed:
        return url
    text = f"{parts.scheme}://{netloc}{parts.path}"
    text += f"?{query}" if query else ""
    return text + (f"#{parts.fragment}" if parts.fragment else "")


def redact_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Free text with every ``scheme://user:pw@`` password, secret query value and each of
    ``secrets`` (e.g. the WHIP token) masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['key']}={MASK}", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text
