"""The fleet deployment examples (deploy/fleet): they parse, run the daemon config they ship
with its own id per daemon, share one snapshot volume and a Redis, and the config validates."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamer.app.config import load_config

REPO = Path(__file__).resolve().parents[2]
FLEET = REPO / "deploy" / "fleet"
SNAPSHOTS = "/var/lib/flashwatch/snapshots"


def _sets(args: list[str]) -> dict[str, str]:
    """The ``--set key=value`` pairs of a command line."""
    return dict(args[i + 1].split("=", 1) for i, arg in enumerate(args) if arg == "--set")


@pytest.fixture
def fleet_config(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("FLASHWATCH_HTTP_TOKEN", "from-the-secret")  # as both examples set it
    monkeypatch.setenv("FLASHWATCH_REDIS_URL", "redis+cluster://10.0.0.1:6379,10.0.0.2:6379")

    def load(daemon_id: str) -> Any:
        return load_config(
            FLEET / "fleet.yaml",
            sets=(f"fleet.daemon_id={daemon_id}", f"query.consumer_name={daemon_id}"),
        )

    return load


def test_fleet_config_validates_for_each_daemon(fleet_config: Any) -> None:
    config = fleet_config("flashwatch-0")
    assert config.fleet.daemon_id == "flashwatch-0" == config.query.consumer_name
    assert config.fleet.placement == "auto" and len(config.streams) == 6
    assert str(config.memory.snapshot_dir) == SNAPSHOTS
    assert config.redis.url.startswith("redis+cluster://")
    assert fleet_config("daemon-2").fleet.daemon_id == "daemon-2"


def test_kubernetes_statefulset_names_each_daemon_after_its_pod() -> None:
    docs = [d for d in yaml.safe_load_all((FLEET / "kubernetes.yaml").read_text()) if d]
    kinds = [doc["kind"] for doc in docs]
    assert {"StatefulSet", "PersistentVolumeClaim", "Service", "Deployment"} <= set(kinds)
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (stateful,) = [d for d in docs if d["kind"] == "StatefulSet"]
    assert stateful["spec"]["replicas"] >= 2
    pod = stateful["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    sets = _sets(container["args"])
    assert sets["fleet.daemon_id"] == "$(POD_NAME)" == sets["query.consumer_name"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["snapshots"] == SNAPSHOTS
    assert volumes["snapshots"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert volumes["config"]["configMap"]["name"] == "flashwatch-fleet"
    # The Redis the daemons are pointed at is a Service of this file.
    redis_host = re.match(r"redis://([^:/]+)", env["FLASHWATCH_REDIS_URL"]["value"])
    assert redis_host is not None
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert redis_host.group(1) in services


def test_compose_runs_three_daemons_with_one_volume_and_redis(fleet_config: Any) -> None:
    compose = yaml.safe_load((FLEET / "compose.yaml").read_text())
    services = compose["services"]
    daemons = {name: s for name, s in services.items() if name.startswith("daemon")}
    assert len(daemons) == 3 and "redis" in services
    ids = set()
    for name, service in daemons.items():
        sets = _sets(service["command"])
        assert sets["fleet.daemon_id"] == name == sets["query.consumer_name"]
        ids.add(name)
        assert f"snapshots:{SNAPSHOTS}" in service["volumes"]
        assert service["environment"]["FLASHWATCH_REDIS_URL"].startswith("redis://redis:")
        mounted = [v.split(":")[0] for v in service["volumes"] if v.startswith("./")]
        assert all((FLEET / path).exists() for path in mounted)
        assert fleet_config(name).fleet.daemon_id == name
    assert len(ids) == 3 and "snapshots" in compose["volumes"]
