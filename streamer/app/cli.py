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
from typing import TYPE_CHECKING, Any, NoReturn

from model.errors import ConfigError, FlashwatchError

if TYPE_CHECKING:
    from sinks.fleet.status import FleetView

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
FLEET_REFRESH_S = 1.0  # how often `flashwatch status` re-reads the fleet


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
        "--frames", type=Path, metavar="DIR", help="save the answer's evidence frames (JPEG) here"
    )
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
    status.add_argument(
        "--fleet",
        action="store_true",
        help="show the fleet (every daemon, every stream and its owner) even with one daemon; "
        "it shows by itself when more than one daemon is present",
    )
    _add_client_options(status)
    status.set_defaults(run=_status)

    alert = commands.add_parser("alert", help="standing queries: add, list, rm, test")
    alert_ops = alert.add_subparsers(dest="alert_op", required=True)
    add = alert_ops.add_parser("add", help="add a condition (--question) or a --summary")
    add.add_argument("name")
    _add_rule_options(add)
    add.add_argument("--replace", action="store_true", help="replace a run-time rule")
    listing = alert_ops.add_parser("list", help="every rule with its state")
    rm = alert_ops.add_parser("rm", help="remove a run-time rule")
    rm.add_argument("name")
    test = alert_ops.add_parser("test", help="a condition's current score, without firing")
    test.add_argument("name", nargs="?", help="a rule's name (or give --question, --stream)")
    _add_rule_options(test)
    for sub in (add, listing, rm, test):
        sub.add_argument("--json", action="store_true", help="print the reply as JSON")
        sub.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")
        _add_client_options(sub)
        sub.set_defaults(run=_alert)

    redis_url = commands.add_parser(
        "redis-url", help="print the Redis URL ask and status would use (for redis-cli -u)"
    )
    redis_url.add_argument("--redis-url", help=argparse.SUPPRESS)
    redis_url.set_defaults(run=_redis_url)
    return parser


def _add_rule_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stream", action="append", default=[], help="stream (repeatable)")
    parser.add_argument("--question", help="a condition's yes/no question")
    parser.add_argument("--summary", metavar="TEXT", help="a summary's instruction")
    parser.add_argument("--every-minutes", type=float, help="summary: minutes between runs")
    parser.add_argument("--daily-at", metavar="HH:MM", help="summary: daily, local time")
    parser.add_argument("--window", type=float, help="condition: seconds of memory read")
    parser.add_argument("--every", type=float, help="condition: seconds between evaluations")
    parser.add_argument("--threshold", type=float, help="condition: P(yes) that hits")
    parser.add_argument("--clear-threshold", type=float, help="condition: P(yes) that clears")
    parser.add_argument("--hits", type=int, help="condition: consecutive hits to fire")
    parser.add_argument("--cooldown", type=float, help="condition: seconds between firings")


def _rule_of(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The rule the options describe (validated by the daemon, like any request)."""
    if args.summary is not None:
        fields = {"kind": "summary", "question": args.summary, "every_minutes": args.every_minutes,
                  "daily_at": args.daily_at}  # fmt: skip
    else:
        fields = {"kind": "condition", "question": args.question, "window_s": args.window,
                  "every_s": args.every, "threshold": args.threshold,
                  "clear_threshold": args.clear_threshold, "hits_to_fire": args.hits,
                  "cooldown_s": args.cooldown}  # fmt: skip
    rule = {"name": name, "streams": args.stream, **fields}
    return {key: value for key, value in rule.items() if value is not None}


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
    if args.frames is not None:
        return await _save_frames(final.get("evidence_frames") or [], args.frames)
    return EXIT_OK


async def _save_frames(frames: list[dict[str, Any]], directory: Path) -> int:
    """``ask --frames DIR``: copy or fetch the cited frames; one line per frame not saved."""
    from streamer.app.config import load_config
    from streamer.app.evidence import save_frames

    token = load_config(None).http.token  # FLASHWATCH_HTTP_TOKEN, for frames fetched by URL
    try:
        saved, problems = await save_frames(
            frames, directory, token=None if token is None else token.get_secret_value()
        )
    except OSError as exc:
        raise ConfigError(f"--frames {directory}: {exc.strerror or exc}") from exc
    for problem in problems:
        _error(f"evidence frame not saved: {problem}")
    print(f"{len(saved)} evidence frame(s) saved in {directory}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


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


# ---- alert --------------------------------------------------------------------------------------


def _alert(args: argparse.Namespace) -> int:
    return asyncio.run(_alert_async(args))


async def _alert_async(args: argparse.Namespace) -> int:
    from sinks.alert_admin import alert_admin

    url = await _client_url(args.redis_url)
    op = args.alert_op
    fields: dict[str, Any] = {"prefix": args.prefix, "timeout_s": args.timeout}
    if op == "add":
        fields.update(rule=_rule_of(args, args.name), replace=args.replace)
    elif op == "rm":
        fields["name"] = args.name
    elif op == "test":
        if args.question is not None:
            fields["rule"] = _rule_of(args, args.name or "test")
        else:
            fields["name"] = args.name
    reply = await alert_admin(url, op, **fields)
    if args.json:
        print(json.dumps(reply, indent=2))
    elif op == "add":
        print(f"added {reply['added']}")
    elif op == "rm":
        print(f"removed {reply['removed']}")
    elif op == "test":
        test = reply["test"]
        hit = "hits" if test["would_hit"] else "does not hit"
        print(f"{test['name']}: score {test['score']:.4f}, {hit} threshold {test['threshold']:g}")
    else:
        for item in reply["rules"]:
            rule = item["rule"]
            score = "-" if item["last_score"] is None else f"{item['last_score']:.3f}"
            print(f"{rule['name']:<20} {rule['kind']:<9} {item['state']:<9} score {score:<6} "
                  f"seq {item['seq']:<4} {item['source']}  {rule['question']}")  # fmt: skip
    return EXIT_OK


# ---- status -------------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    return asyncio.run(_status_async(args))


async def _status_async(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sinks.client import fetch_fleet, fetch_status, watch_status
    from sinks.schema import DaemonStatus
    from sinks.tui import LiveView, render_status

    url = await _client_url(args.redis_url)
    fleet = await fetch_fleet(url, prefix=args.prefix)
    if args.fleet or len(fleet.daemons) > 1:
        return await _fleet_status(args, url, fleet)
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


async def _fleet_status(args: argparse.Namespace, url: str, fleet: FleetView) -> int:
    """The fleet's tables (or JSON): once when piped or --once, else refreshed every second."""
    from rich.console import Console
    from rich.live import Live

    from sinks.client import fetch_fleet
    from sinks.fleet.status import render_fleet

    if args.once or (not args.json and not sys.stdout.isatty()):
        if args.json:
            print(json.dumps(fleet.to_json(), indent=2))
        else:
            Console().print(render_fleet(fleet))
        return EXIT_OK
    if args.json:
        while True:
            print(json.dumps(fleet.to_json()), flush=True)
            await asyncio.sleep(FLEET_REFRESH_S)
            fleet = await fetch_fleet(url, prefix=args.prefix)
    with Live(render_fleet(fleet), auto_refresh=False) as live:
        while True:
            await asyncio.sleep(FLEET_REFRESH_S)
            fleet = await fetch_fleet(url, prefix=args.prefix)
            live.update(render_fleet(fleet), refresh=True)


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
            "rediss://…, unix:///path or redis+cluster://host:port,host:port)"
        ) from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
