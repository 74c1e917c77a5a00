"""Where results go: the Redis query service, replies, status publishing, the TUI, a client."""

from sinks.client import ask, ask_stream

__all__ = ["ask", "ask_stream"]
