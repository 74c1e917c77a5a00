"""Hide credentials in URLs before they reach a log line or a status snapshot."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"
# Query parameters that carry secrets in the URL schemes we meet (redis, rtsp, whip).
_SECRET_PARAMS = frozenset({"password", "pass", "pwd", "token", "access_token", "secret", "key"})


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
