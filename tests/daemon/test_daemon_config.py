"""Loading the daemon config: YAML, overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.errors import ConfigError
from streamer.app.config import (
    ENV_REDIS_URL,
    FlashwatchConfig,
    load_config,
    private_redis_allowed,
    reference_markdown,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_demo_yaml_is_the_built_in_default() -> None:
    assert load_config(REPO / "configs" / "demo.yaml") == load_config(None) == FlashwatchConfig()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.streams


def test_release_configs_use_the_model_card_recipe() -> None:
    for name in ("videochat-flash-2b.yaml", "videochat-flash-7b.yaml"):
        config = load_config(REPO / "configs" / name)
        assert config.model.device == "cuda" and config.model.dtype == "bfloat16"
        assert config.model.drop is not None and config.model.drop.layers == (4, 18)


def test_set_overrides_nested_values_and_streams_by_name() -> None:
    config = load_config(
        None, sets=["memory.budget_mb=64", "streams.demo.fps=0.5", "model.drop=null"]
    )
    assert config.memory.budget_mb == 64
    assert config.streams[0].fps == 0.5
    assert config.model.drop is None


def test_source_adds_and_replaces_streams() -> None:
    config = load_config(None, sources=["cam1=rtsp://10.0.0.5/s1", "demo=testsrc://?fps=5"])
    assert [(s.name, s.url) for s in config.streams] == [
        ("demo", "testsrc://?fps=5"),
        ("cam1", "rtsp://10.0.0.5/s1"),
    ]


def test_set_can_tune_a_stream_added_by_source() -> None:
    config = load_config(None, sources=["cam1=rtsp://h/s"], sets=["streams.cam1.fps=0.5"])
    assert config.streams[1].fps == 0.5


def test_redis_url_flag_wins_over_file() -> None:
    config = load_config(REPO / "configs" / "demo.yaml", redis_url="redis://127.0.0.1:7000/1")
    assert config.redis.url == "redis://127.0.0.1:7000/1"


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("memory:\n  budgetmb: 1\n", "memory.budgetmb: unknown key"),
        ("nosuchsection: {}\n", "nosuchsection: unknown key"),
        ("memory:\n  budget_mb: -1\n", "memory.budget_mb"),
        ("streams:\n  - {name: a, url: 'testsrc://'}\n  - {name: a, url: 'testsrc://'}\n",
         "duplicate stream names: a"),
        ("model:\n  drop: {layers: [4], ratios: [1.0, 2.0]}\n", "model.drop"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("memory: {budget_mb: [1,\n", "bad.yaml line"),
    ],
)  # fmt: skip
def test_errors_name_the_problem(tmp_path: Path, yaml_text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "assignment", ["no-equals-sign", "=1", "memory..budget_mb=1", "streams.9.fps=1"]
)
def test_bad_set_is_a_config_error(assignment: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        load_config(None, sets=[assignment])


def test_errors_do_not_echo_secrets() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, sets=["redis.url=http://:hunter2@host/0"])
    assert "redis.url" in str(info.value) and "hunter2" not in str(info.value)


def test_bad_source_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="NAME=URL"):
        load_config(None, sources=["just-a-url"])


def test_readme_configuration_reference_is_current() -> None:
    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate: python tests/helpers/readme_reference.py"


def test_demo_drop_recipe_follows_a_checkpoint_set_over_it() -> None:
    """The demo names no recipe of its own: a checkpoint set over it gets the one that fits."""
    config = load_config(None, sets=["model.checkpoint=/models/VideoChat-Flash-2B"])
    assert config.model.drop == "auto" and config.model.max_frames == 512
    explicit = load_config(None, sets=["model.drop=null", "model.max_frames=64"])
    assert explicit.model.drop is None and explicit.model.max_frames == 64


def test_only_the_built_in_demo_without_a_url_may_start_a_private_redis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_REDIS_URL, raising=False)
    assert private_redis_allowed(None)
    assert not private_redis_allowed(REPO / "configs" / "demo.yaml")  # a file: as configured
    assert not private_redis_allowed(None, redis_url="redis://127.0.0.1:7000/0")
    assert not private_redis_allowed(None, sets=["redis.url=redis://127.0.0.1:7000/0"])
    assert private_redis_allowed(None, sets=["redis.prefix=other"])
    monkeypatch.setenv(ENV_REDIS_URL, "redis://127.0.0.1:7000/0")
    assert not private_redis_allowed(None)


def test_the_encode_batch_size_is_set_in_one_place() -> None:
    """The daemon takes the engine's batch size from the model section: a different
    ``engine.encode_batch_clips`` is refused, never silently replaced."""
    same = load_config(None, sets=["model.encode_batch_clips=4", "engine.encode_batch_clips=4"])
    assert same.engine.encode_batch_clips == same.model.encode_batch_clips == 4
    assert load_config(None, sets=["model.encode_batch_clips=16"]).model.encode_batch_clips == 16
    with pytest.raises(ConfigError, match=r"set model\.encode_batch_clips only"):
        load_config(None, sets=["model.encode_batch_clips=16", "engine.encode_batch_clips=4"])
