"""Log output: rich on a terminal, plain text, or JSON (one object a line) for log shippers.

Every line is redacted before it is written: credentials in URLs and the daemon's own secrets
(the HTTP token, the Redis password) never reach a log, whatever module logged them.

The stream and query a line is about come from :data:`LOG_STREAM` / :data:`LOG_QUERY_ID`
(context variables: a task started inside :func:`log_context` carries them, so every line an
ingest task logs names its stream) or from ``extra={"stream": ..., "query_id": ...}``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Literal

from sinks.redact import RedactingFormatter, redact_text

LogFormat = Literal["auto", "text", "json"]

LOG_STREAM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flashwatch_log_stream", default=None
)
LOG_QUERY_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flashwatch_log_query_id", default=None
)
_NOISY_LOGGERS = ("aioice", "aiortc", "libav", "aiohttp.access")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def log_context(*, stream: str | None = None, query_id: str | None = None) -> Iterator[None]:
    """Lines logged inside (and by tasks created inside) name this stream / query."""
    tokens = []
    if stream is not None:
        tokens.append((LOG_STREAM, LOG_STREAM.set(stream)))
    if query_id is not None:
        tokens.append((LOG_QUERY_ID, LOG_QUERY_ID.set(query_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "stream"?, "query_id"?, "error"?}`` per line."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, tz=UTC)
        line: dict[str, object] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self._redact(record.getMessage()),
        }
        stream = getattr(record, "stream", None) or LOG_STREAM.get()
        query_id = getattr(record, "query_id", None) or LOG_QUERY_ID.get()
        if stream:
            line["stream"] = str(stream)
        if query_id:
            line["query_id"] = str(query_id)
        if record.exc_info:
            # the trace stays in the one JSON line (never a multi-line dump a shipper splits)
            line["error"] = self._redact(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)

    def _redact(self, text: str) -> str:
        return redact_text(text, self._secrets)


def setup_logging(
    level: str, log_format: LogFormat, *, tty: bool, secrets: tuple[str, ...] = ()
) -> None:
    """Configure the root logger once, at start (the CLI calls it before the daemon runs)."""
    handler: logging.Handler
    kept = tuple(s for s in secrets if s)
    if log_format == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter(kept))
    elif log_format == "auto" and tty:
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(RedactingFormatter(logging.Formatter("%(message)s"), kept))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(RedactingFormatter(logging.Formatter(_TEXT_FORMAT), kept))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
