"""``flashwatch``: serve, ask, status.

Every expected failure (bad config, unreachable Redis, an error answer) ends in one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

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
        print(f"flashwatch: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    return parser


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="the daemon's Redis (default: found automatically)")
    parser.add_argument("--prefix", default="flashwatch", help="key prefix (default flashwatch)")


# ---- serve ------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from streamer.app.config import load_config
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
        redis_url_explicit=args.redis_url is not None,
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
    from sinks.client import ask_stream

    url = await _client_url(args.redis_url)
    generation: dict[str, Any] = {}
    if args.max_new_tokens is not None:
        generation["max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        generation["temperature"] = args.temperature
    final: dict[str, Any] | None = None
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
        elif event["type"] in ("final", "error"):
            final = event
    if final is None or final["type"] == "error":
        code = final["code"] if final else "internal"
        message = final["message"] if final else "no answer"
        print(f"flashwatch: {code}: {message}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({k: v for k, v in final.items() if k != "type"}, indent=2))
    else:
        print()
    return EXIT_OK


def _forget(args: argparse.Namespace) -> int:
    return asyncio.run(_forget_async(args))


async def _forget_async(args: argparse.Namespace) -> int:
    from sinks.client import forget

    url = await _client_url(args.redis_url)
    event = await forget(url, args.stream, args.since, args.until, prefix=args.prefix)
    done = event["forgotten"]
    if args.json:
        print(json.dumps(event, indent=2))
    else:
        print(f"forgot {done['stream']} from {done['start']:.3f} to {done['end']:.3f}")
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
    if args.once:
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
    latest: list[DaemonStatus] = [DaemonStatus.model_validate(await fetch_status(url, args.prefix))]
    view = LiveView(lambda: latest[-1])
    view.start()
    try:
        async for snapshot in watch_status(url, prefix=args.prefix):
            latest[-1] = DaemonStatus.model_validate(snapshot)
    finally:
        view.stop()
        await view.wait_closed()
    return EXIT_OK


async def _client_url(explicit: str | None) -> str:
    """The daemon's Redis: --redis-url, else the configured default, else its embedded one."""
    from model.errors import BusError
    from streamer.app.config import load_config, state_dir
    from streamer.app.embedded_redis import discover, reachable

    if explicit is not None:
        return explicit
    default = load_config(None).redis.url  # FLASHWATCH_REDIS_URL, else the built-in default
    if await reachable(default):
        return default
    embedded = discover(state_dir())
    if embedded is not None and await reachable(embedded):
        return embedded
    raise BusError("no flashwatch daemon found: Redis is unreachable (is `flashwatch serve` up?)")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
