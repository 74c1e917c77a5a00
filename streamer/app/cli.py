"""``flashwatch``: serve, ask, forget, status, config, redis-url.

Every failure (bad config or URL, unreachable Redis, an error answer, even a bug) ends in one
line on stderr and a non-zero exit, never a traceback; a closed pipe (``ask … | head``) ends
quietly. Times shown to people are ISO 8601 with the local offset (``sinks.timefmt``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from model.errors import ConfigError, FlashwatchError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except FlashwatchError as exc:
        _error(_one_line(exc))
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 (a bug: still one line, never a traceback)
        _error(f"unexpected {type(exc).__name__}: {_one_line(exc)}")
        return EXIT_FAILED


def _error(message: str) -> None:
    from sinks.redact import redact_text

    print(f"flashwatch: {redact_text(message)}", file=sys.stderr)


def _silence_stdout() -> None:
    """The reader went away (``| head``): drop what is left, so exit does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"flashwatch: {self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flashwatch",
        description="Watch live video streams and answer questions about their history.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon (the built-in demo without --config)")
    serve.add_argument("-c", "--config", type=Path, help="YAML config (default: the built-in demo)")
    serve.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set memory.budget_mb=64 (repeatable)",
    )  # fmt: skip
    serve.add_argument(
        "--source", action="append", default=[], metavar="NAME=URL",
        help="add a stream or replace its URL (repeatable)",
    )  # fmt: skip
    serve.add_argument("--redis-url", help="Redis to use; never starts a private one")
    serve.add_argument("--no-tui", action="store_true", help="plain logs instead of the live view")
    serve.add_argument(
        "--log-format", choices=("auto", "text", "json"),
        help="log lines: rich on a terminal (auto), plain text, or one JSON object a line",
    )  # fmt: skip
    serve.set_defaults(run=_serve)

    ask = commands.add_parser("ask", help="ask a running daemon a question")
    ask.add_argument("question")
    ask.add_argument("--stream", default="*", help="stream name, or * for all (default)")
    ask.add_argument(
        "--since", help="start of the range: ISO 8601, epoch seconds, or relative (--since=-15m)"
    )
    ask.add_argument("--until", help="end of the time range (same forms as --since)")
    ask.add_argument("--max-new-tokens", type=int, help="longest answer in tokens")
    ask.add_argument("--temperature", type=float, help="0 = greedy (default)")
    ask.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    ask.add_argument("--quick", action="store_true", help="use pub/sub (at-most-once) intake")
    ask.add_argument("--json", action="store_true", help="print the final answer object as JSON")
    ask.add_argument(
        "--verbose", action="store_true", help="name each stream's owner (fleet) on stderr"
    )
    _add_client_options(ask)
    ask.set_defaults(run=_ask)

    forget = commands.add_parser("forget", help="remove an interval from a stream's memory")
    forget.add_argument("--stream", required=True, help="the stream to edit")
    forget.add_argument("--since", required=True, help="start (same forms as ask --since)")
    forget.add_argument("--until", required=True, help="end (same forms as ask --since)")
    forget.add_argument("--json", action="store_true", help="print the confirmation as JSON")
    _add_client_options(forget)
    forget.set_defaults(run=_forget)

    config = commands.add_parser("config", help="print the effective config, or its reference")
    config.add_argument("-c", "--config", type=Path, help="YAML config (default: the demo)")
    config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    config.add_argument("--source", action="append", default=[], metavar="NAME=URL")
    config.add_argument(
        "--reference", action="store_true", help="print every key as Markdown tables"
    )
    config.set_defaults(run=_config)

    status = commands.add_parser("status", help="show a running daemon's status")
    status.add_argument("--json", action="store_true", help="print JSON snapshots")
    status.add_argument("--once", action="store_true", help="print one snapshot and exit")
    _add_client_options(status)
    status.set_defaults(run=_status)

    redis_url = commands.add_parser(
        "redis-url", help="print the Redis URL ask and status would use (for redis-cli -u)"
    )
    redis_url.add_argument("--redis-url", help=argparse.SUPPRESS)
    redis_url.set_defaults(run=_redis_url)
    return parser


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="the daemon's Redis (default: found automatically)")
    parser.add_argument("--prefix", default="flashwatch", help="key prefix (default flashwatch)")


# ---- serve ------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    if args.log_format != "json":  # JSON logs stay one object a line
        print("starting flashwatch…", file=sys.stderr, flush=True)  # the imports take seconds
    from streamer.app.config import load_config, private_redis_allowed
    from streamer.app.daemon import Daemon
    from streamer.app.logs import setup_logging

    sets = [*args.set, *([f"logging.format={args.log_format}"] if args.log_format else [])]
    config = load_config(args.config, sets=sets, sources=args.source, redis_url=args.redis_url)
    tui = not args.no_tui and sys.stdout.isatty() and config.logging.format != "json"
    tty = sys.stdout.isatty()  # rich log lines (on stdout) on a terminal, with or without the view
    setup_logging(config.log_level, config.logging.format, tty=tty, secrets=_secrets(config))
    daemon = Daemon(
        config,
        tui=tui,
        private_redis=private_redis_allowed(args.config, sets=args.set, redis_url=args.redis_url),
        config_path=args.config,
        overrides=(tuple(sets), tuple(args.source), args.redis_url),
    )
    asyncio.run(daemon.run())
    return EXIT_OK


def _secrets(config: Any) -> tuple[str, ...]:
    """Values no log line may show, literally: the secrets in the configured URLs (as written
    and percent-decoded) and the HTTP and WHIP tokens."""
    from sinks.redact import known_secrets

    tokens = (config.http.token, config.ingest.whip.token)
    return known_secrets(
        [config.redis.url, *(stream.url for stream in config.streams)],
        [t.get_secret_value() for t in tokens if t is not None],
    )


def _config(args: argparse.Namespace) -> int:
    import yaml

    from sinks.redact import redact_url
    from streamer.app.config import load_config, reference_markdown

    if args.reference:
        print(reference_markdown(), end="")
        return EXIT_OK
    config = load_config(args.config, sets=args.set, sources=args.source)
    dumped = config.model_dump(mode="json")
    dumped["redis"]["url"] = redact_url(dumped["redis"]["url"])
    for stream in dumped["streams"]:
        stream["url"] = redact_url(stream["url"])
    print(yaml.safe_dump(dumped, sort_keys=False), end="")
    return EXIT_OK


# ---- ask ----------------------------------------------------------------------------------------


def _ask(args: argparse.Namespace) -> int:
    return asyncio.run(_ask_async(args))


async def _ask_async(args: argparse.Namespace) -> int:
    from sinks.client import ask_stream, owners

    url = await _client_url(args.redis_url)
    if args.verbose:
        for name, owner, warning in await owners(url, args.stream, prefix=args.prefix):
            if owner is not None:
                print(f"stream {name}: {owner}", file=sys.stderr)
            if warning is not None:
                print(f"flashwatch: warning: stream {name}: {warning}", file=sys.stderr)
    generation: dict[str, Any] = {}
    if args.max_new_tokens is not None:
        generation["max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        generation["temperature"] = args.temperature
    final: dict[str, Any] | None = None
    streamed = False
    async for event in ask_stream(
        url,
        args.question,
        stream=args.stream,
        since=args.since,
        until=args.until,
        timeout_s=args.timeout,
        prefix=args.prefix,
        durable=not args.quick,
        **generation,
    ):
        if event["type"] == "token" and not args.json:
            print(event["text"], end="", flush=True)
            streamed = True
        elif event["type"] in ("final", "error"):
            final = event
    if final is None or final["type"] == "error":
        code = final["code"] if final else "internal"
        message = final["message"] if final else "no answer"
        print(f"flashwatch: {code}: {message}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({k: v for k, v in final.items() if k != "type"}, indent=2))
    elif streamed:
        print()
    else:  # an answer routed through the fleet comes as one final, without token events
        print(final.get("answer", ""))
    return EXIT_OK


def _forget(args: argparse.Namespace) -> int:
    return asyncio.run(_forget_async(args))


async def _forget_async(args: argparse.Namespace) -> int:
    from sinks.client import forget
    from sinks.timefmt import iso_time

    url = await _client_url(args.redis_url)
    event = await forget(url, args.stream, args.since, args.until, prefix=args.prefix)
    done = event["forgotten"]
    if args.json:
        print(json.dumps(event, indent=2))
    else:
        print(f"forgot {done['stream']} from {iso_time(done['start'])} to {iso_time(done['end'])}")
    return EXIT_OK


# ---- status -------------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    return asyncio.run(_status_async(args))


async def _status_async(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sinks.client import fetch_status, watch_status
    from sinks.schema import DaemonStatus
    from sinks.tui import LiveView, render_status

    url = await _client_url(args.redis_url)
    if args.once or (not args.json and not sys.stdout.isatty()):  # piped: one plain snapshot
        snapshot = await fetch_status(url, prefix=args.prefix)
        if args.json:
            print(json.dumps(snapshot, indent=2))
        else:
            Console().print(render_status(DaemonStatus.model_validate(snapshot)))
        return EXIT_OK
    if args.json:
        async for snapshot in watch_status(url, prefix=args.prefix):
            print(json.dumps(snapshot), flush=True)
        return EXIT_OK
    latest: list[DaemonStatus | None] = [None]
    view = LiveView(lambda: latest[-1])  # shows "waiting…" at once
    view.start()
    try:
        async for snapshot in watch_status(url, prefix=args.prefix):
            latest[-1] = DaemonStatus.model_validate(snapshot)
    finally:
        view.stop()
        await view.wait_closed()
    return EXIT_OK


# ---- finding the daemon's Redis -------------------------------------------------------------


def _redis_url(args: argparse.Namespace) -> int:
    print(asyncio.run(_client_url(args.redis_url)))
    return EXIT_OK


async def _client_url(explicit: str | None) -> str:
    """The daemon's Redis: --redis-url, else FLASHWATCH_REDIS_URL, else a running demo's
    private one, else the default URL when it answers."""
    from sinks.errors import BusError
    from streamer.app.config import load_config, private_redis_allowed, state_dir
    from streamer.app.embedded_redis import discover, reachable

    if explicit is not None:
        return _checked_url(explicit)
    configured = load_config(None).redis.url  # FLASHWATCH_REDIS_URL, else the default
    if not private_redis_allowed(None):  # FLASHWATCH_REDIS_URL is set: that one, as given
        return configured
    embedded = discover(state_dir())
    if embedded is not None and await reachable(embedded):
        return embedded
    if await reachable(configured):
        return configured
    raise BusError("no flashwatch daemon found: Redis is unreachable (is `flashwatch serve` up?)")


def _checked_url(url: str) -> str:
    """``url`` if it is a Redis URL; ConfigError in one line otherwise."""
    from pydantic import ValidationError

    from sinks.redact import redact_url
    from sinks.settings import RedisSettings

    try:
        return RedisSettings(url=url).url
    except ValidationError as exc:
        raise ConfigError(
            f"--redis-url {redact_url(url)!r}: not a Redis URL (expected redis://host:port/db, "
            "rediss://… or unix:///path)"
        ) from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
