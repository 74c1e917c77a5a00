"""The daemon's configuration: one section per component, loaded from YAML with overrides.

``FlashwatchConfig()`` with no arguments *is* the demo (a synthetic source, the built-in tiny
model, a small memory budget), so ``flashwatch serve`` runs anywhere without a file;
``configs/demo.yaml`` spells the same values out (a test keeps the two equal).
This module is the only place that reads files or the environment for configuration.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticUndefined

from memory.settings import MemorySettings
from model.errors import ConfigError
from model.settings import ModelSettings
from sinks.fleet.settings import FleetSettings
from sinks.redact import redact_text
from sinks.settings import QuerySettings, RedisSettings, StatusSettings
from streamer.app.alerts_settings import AlertSettings
from streamer.app.ops_settings import HttpSettings, LoggingSettings
from streamer.engine.settings import EngineSettings
from streamer.ingest.settings import IngestSettings, StreamSettings

ENV_REDIS_URL = "FLASHWATCH_REDIS_URL"
ENV_HTTP_TOKEN = "FLASHWATCH_HTTP_TOKEN"
ENV_HTTP_PORT = "FLASHWATCH_HTTP_PORT"


def _demo_model() -> ModelSettings:
    # drop "auto": the tiny model gets the model-card recipe scaled to its 3 layers, and a
    # checkpoint set over the demo (--set model.checkpoint=...) gets the recipe that fits it.
    return ModelSettings()


def _demo_streams() -> list[StreamSettings]:
    return [StreamSettings(name="demo", url="testsrc://?size=320x240&fps=10", fps=2.0)]


class FlashwatchConfig(BaseModel):
    """Everything the daemon needs; each component receives only its own section."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: ModelSettings = Field(default_factory=_demo_model, description="The model to run.")
    streams: list[StreamSettings] = Field(
        default_factory=_demo_streams, description="Video sources to watch."
    )
    ingest: IngestSettings = Field(
        default_factory=IngestSettings, description="Reconnects, watchdog, WHIP endpoint."
    )
    memory: MemorySettings = Field(
        default_factory=lambda: MemorySettings(budget_mb=16.0),
        description="The rolling token memory.",
    )
    redis: RedisSettings = Field(default_factory=RedisSettings, description="The Redis bus.")
    query: QuerySettings = Field(default_factory=QuerySettings, description="Query service.")
    engine: EngineSettings = Field(
        default_factory=EngineSettings,
        description="Scheduling on the device: decode batching, prefill chunks, prefix cache.",
    )
    status: StatusSettings = Field(default_factory=StatusSettings, description="Status view.")
    fleet: FleetSettings = Field(
        default_factory=FleetSettings,
        description="This daemon among several on one Redis: id, placement, leases.",
    )
    http: HttpSettings = Field(
        default_factory=HttpSettings, description="Metrics, health probes and the HTTP API."
    )
    alerts: AlertSettings = Field(
        default_factory=AlertSettings,
        description="Standing queries (conditions, scheduled summaries) and their delivery.",
    )
    logging: LoggingSettings = Field(
        default_factory=LoggingSettings, description="How log lines look."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Logging threshold."
    )

    @model_validator(mode="after")
    def _unique_stream_names(self) -> FlashwatchConfig:
        names = [s.name for s in self.streams]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate stream names: {', '.join(duplicates)}")
        unknown = sorted({s for r in self.alerts.rules for s in r.streams} - set(names))
        if unknown:
            raise ValueError(f"alerts.rules read unknown streams: {', '.join(unknown)}")
        # One batch size, kept with the model (the checkpoints' configs set it): a different
        # engine.encode_batch_clips would otherwise be silently replaced by it.
        batch = self.engine.encode_batch_clips
        if "encode_batch_clips" in self.engine.model_fields_set and (
            batch != self.model.encode_batch_clips
        ):
            raise ValueError(
                f"engine.encode_batch_clips ({batch}) differs from model.encode_batch_clips "
                f"({self.model.encode_batch_clips}): set model.encode_batch_clips only"
            )
        return self


def load_config(
    path: Path | None = None,
    *,
    sets: Iterable[str] = (),
    sources: Iterable[str] = (),
    redis_url: str | None = None,
) -> FlashwatchConfig:
    """Read ``path`` (or the built-in demo), apply ``--set`` / ``--source`` / ``--redis-url``.

    Raises ConfigError with a one-line message naming the offending file, key or value.
    """
    raw: dict[str, Any] = _read_yaml(path) if path is not None else _demo_raw()
    for source in sources:  # first, so --set can tune a stream that --source adds
        _apply_source(raw, source)
    for assignment in sets:
        _apply_set(raw, assignment)
    url = redis_url or os.environ.get(ENV_REDIS_URL)
    if url:
        raw.setdefault("redis", {})["url"] = url
    _apply_http_env(raw)
    try:
        return FlashwatchConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from exc


def _apply_http_env(raw: dict[str, Any]) -> None:
    """The HTTP token (kept out of files) and port (tests pick free ones) from the environment."""
    token, port = os.environ.get(ENV_HTTP_TOKEN), os.environ.get(ENV_HTTP_PORT)
    if not token and not port:
        return
    http = raw.setdefault("http", {})
    if not isinstance(http, dict):
        raise ConfigError("http: must be a section")
    if token:
        http["token"] = token
    if port:
        if not port.isdigit():
            raise ConfigError(f"{ENV_HTTP_PORT}: expected a port number")
        http["port"] = int(port)


def private_redis_allowed(
    path: Path | None, *, sets: Iterable[str] = (), redis_url: str | None = None
) -> bool:
    """True only for the built-in demo (no config file) with no Redis URL from anywhere.

    Everything else uses its Redis as configured and waits for it when it is down: a private,
    non-persistent Redis there would take requests no client ever sends to it.
    """
    url_set = any(assignment.partition("=")[0].strip() == "redis.url" for assignment in sets)
    return path is None and not redis_url and not os.environ.get(ENV_REDIS_URL) and not url_set


def _demo_raw() -> dict[str, Any]:
    dumped: dict[str, Any] = FlashwatchConfig().model_dump(mode="json", exclude_unset=False)
    del dumped["engine"]["encode_batch_clips"]  # it follows model.encode_batch_clips
    return dumped


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise ConfigError(f"{path}{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _apply_set(raw: dict[str, Any], assignment: str) -> None:
    """``a.b.c=value``: the value is parsed as a YAML scalar or flow collection."""
    key, sep, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML") from exc
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, parts[: i + 1], assignment)
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(parts[:i])} is not a section")
        node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        index = _index(node, last, parts, assignment)
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {assignment!r}: {'.'.join(parts[:-1])} is not a section")


def _list_item(node: list[Any], part: str, path: list[str], assignment: str) -> Any:
    """A list step in a --set path: an index (``streams.0.fps``) or a stream name."""
    for item in node:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    return node[_index(node, part, path, assignment)]


def _index(node: list[Any], part: str, path: list[str], assignment: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {assignment!r}: no item {part!r} in {'.'.join(path[:-1])}")
    return int(part)


def _apply_source(raw: dict[str, Any], source: str) -> None:
    """``NAME=URL`` adds a stream or replaces the URL of the stream with that name."""
    name, sep, url = source.partition("=")
    if not sep or not name.strip() or not url.strip():
        raise ConfigError(f"--source {source!r}: expected NAME=URL")
    streams = raw.setdefault("streams", [])
    if not isinstance(streams, list):
        raise ConfigError("streams: must be a list")
    for stream in streams:
        if isinstance(stream, dict) and stream.get("name") == name.strip():
            stream["url"] = url.strip()
            return
    streams.append({"name": name.strip(), "url": url.strip()})


def _describe(exc: ValidationError, path: Path | None) -> str:
    """One line naming the first offending key: ``demo.yaml: memory.budgetmb: unknown key``."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    else:
        message = error["msg"]
        if "input" in error and not isinstance(error["input"], dict | list):
            message += f" (got {redact_text(repr(error['input']))})"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    origin = f"{path}: " if path is not None else "config: "
    return f"{origin}{key}: {message}{more}"


def state_dir() -> Path:
    """Where a running daemon leaves small state (the embedded Redis URL) for ``ask``/``status``.

    ``FLASHWATCH_STATE_DIR`` overrides it (tests use a private one).
    """
    explicit = os.environ.get("FLASHWATCH_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "flashwatch"


def reference_markdown() -> str:
    """The configuration reference as Markdown tables, generated from the models (README)."""
    lines: list[str] = []
    for name, field in FlashwatchConfig.model_fields.items():
        section = _model_of(field.annotation)
        if section is None:
            lines += [f"**`{name}`**: {field.description}", ""]
            continue
        lines += [f"**`{name}:`** {field.description}", ""]
        lines += ["| key | default | meaning |", "|---|---|---|"]
        lines += list(_rows(section, prefix=""))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``list[X]`` or ``X | None``, if any."""
    models = _models_of(annotation)
    return models[0] if models else None


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    """Every pydantic model inside an annotation (``list[A | B]``: both), in order."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()):
        found += [m for m in _models_of(arg) if m not in found]
    return found


def _rows(model: type[BaseModel], prefix: str) -> Iterable[str]:
    for key, field in model.model_fields.items():
        nested = _models_of(field.annotation)
        if nested and field.default is not None:
            if isinstance(field.default, str):  # a keyword ("auto") or a section: one row first
                yield _row(f"{prefix}{key}", json_default(field.default), field.description)
            yield from _union_rows(nested, prefix=f"{prefix}{key}.")
            continue
        default = field.get_default(call_default_factory=False)
        if field.default_factory is not None:
            default = "(computed)" if not nested else "(section)"
        yield _row(f"{prefix}{key}", json_default(default), field.description)


def _union_rows(models: list[type[BaseModel]], prefix: str) -> Iterable[str]:
    """Rows of one model, or of each member of a union (e.g. rule kinds): a key already shown
    by an earlier member is not repeated; keys of later members name their model."""
    seen: set[str] = set()
    for index, model in enumerate(models):
        for row in _rows(model, prefix):
            key = row.split("`", 2)[1]
            if key in seen:
                continue
            seen.add(key)
            if index > 0:
                head, _, rest = row.rpartition("| ")
                row = f"{head}| ({model.__name__}) {rest}"
            yield row


def _row(key: str, shown: str, description: str | None) -> str:
    return f"| `{key}` | `{shown}` | {(description or '').replace('|', chr(92) + '|')} |"


def json_default(value: Any) -> str:
    if value is PydanticUndefined:
        return "(required)"
    if hasattr(value, "get_secret_value"):
        return "(secret)"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("\n...").removesuffix(" ...").replace("|", "\\|")
