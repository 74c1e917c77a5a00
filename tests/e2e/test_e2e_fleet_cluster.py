"""Three real daemons, six streams, a three-master Redis Cluster (issue 12's first acceptance).

Static placement: a owns s1 and s2, b owns s3 and s4 and stands by for s1 and s2, c owns s5
and s6. Each question is answered by its stream's owner, ``*`` by one merged answer over all
six, ``flashwatch status --fleet`` lists every daemon and every owner; after a SIGKILL of a, b
adopts s1 and s2 and answers for them. Waits are bounded; nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_harness import ServeProcess, run_cli, wait_for
from redis_cluster import RedisCluster

from model.errors import FlashwatchError
from sinks.client import ask

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
WAIT_S = 120.0
OWNS = {"a": ("s1", "s2"), "b": ("s3", "s4"), "c": ("s5", "s6")}
STANDBY = {"b": ("s1", "s2")}  # b may serve a's streams too


def _config(path: Path, daemon_id: str, snapshots: Path) -> Path:
    names = OWNS[daemon_id] + STANDBY.get(daemon_id, ())
    config = {
        "streams": [
            {"name": name, "url": "testsrc://?size=64x48&fps=4", "fps": 1.0} for name in names
        ],
        "memory": {"budget_mb": 4.0, "snapshot_dir": str(snapshots), "snapshot_interval_s": 2.0},
        "fleet": {"daemon_id": daemon_id, "lease_ttl_s": 3.0, "owner_wait_s": 10.0},
        "query": {"claim_idle_s": 2.0, "consumer_name": daemon_id},
        "status": {"publish_interval_s": 1.0},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _fleet(url: str, env: dict[str, str]) -> dict[str, Any] | None:
    result = run_cli("status", "--fleet", "--json", "--once", "--redis-url", url, env=env)
    if result.returncode != 0:
        return None
    view: dict[str, Any] = json.loads(result.stdout)
    return view


def _owners(view: dict[str, Any] | None) -> dict[str, str | None]:
    return {} if view is None else {s["name"]: s["owner"] for s in view.get("streams", [])}


def _answerers(final: dict[str, Any]) -> dict[str, str | None]:
    """stream -> daemon that answered it (a section's owner, else the lone answerer)."""
    if final.get("sections"):
        return {name: s["daemon"] for s in final["sections"] for name in s["stream"]}
    return {name: final["daemon"] for name in final["stream"]}


async def _answered_by(url: str, stream: str) -> dict[str, str | None] | None:
    try:
        final = await ask(url, "What?", stream=stream, max_new_tokens=2, timeout_s=30)
    except FlashwatchError:
        return None  # no memory yet (or the owner still starting): asked again
    return _answerers(final) if final.get("evidence") else None


def test_three_daemons_six_streams_on_a_cluster_with_failover(
    serve: Callable[..., ServeProcess],
    redis_cluster: RedisCluster,
    cli_env: dict[str, str],
    tmp_path: Path,
) -> None:
    url = redis_cluster.url
    snapshots = tmp_path / "snapshots"

    def start(daemon_id: str) -> ServeProcess:
        config = _config(tmp_path / f"{daemon_id}.yaml", daemon_id, snapshots)
        return serve("--config", str(config), "--redis-url", url)

    daemons = {"a": start("a")}  # first, so that a (not its standby b) owns s1 and s2
    wanted = {name: owner for owner, names in OWNS.items() for name in names}
    wait_for(lambda: all(_owners(_fleet(url, cli_env)).get(n) == "a" for n in OWNS["a"]),
             WAIT_S, "a to own s1 and s2")  # fmt: skip
    daemons |= {"b": start("b"), "c": start("c")}
    view = wait_for(lambda: (v := _fleet(url, cli_env)) and _owners(v) == wanted and v,
                    WAIT_S, "every stream owned as placed")  # fmt: skip
    assert sorted(d["id"] for d in view["daemons"]) == ["a", "b", "c"], view
    assert all(d["state"] == "live" for d in view["daemons"]), view
    by_id = {d["id"]: d for d in view["daemons"]}
    assert {d: sorted(by_id[d]["owns"]) for d in by_id} == {d: list(n) for d, n in OWNS.items()}
    standby = {s["name"]: s["candidates"] for s in view["streams"]}
    assert "b" in standby["s1"] and "b" in standby["s2"], view

    async def questions() -> None:
        for name, owner in wanted.items():  # the first answer waits for memory
            answerers = await _wait_async(lambda n=name: _answered_by(url, n), f"{name} answered")
            assert answerers == {name: owner}
        merged = await ask(url, "What?", stream="*", max_new_tokens=2, timeout_s=60)
        assert _answerers(merged) == wanted, merged
        assert len(merged["sections"]) == 3 and not any(s.get("error") for s in merged["sections"])
        assert {span["stream"] for span in merged["evidence"]} == set(wanted), merged

    asyncio.run(questions())

    daemons["a"].terminate(signal.SIGKILL)
    adopted = {**wanted, "s1": "b", "s2": "b"}
    view = wait_for(lambda: (v := _fleet(url, cli_env)) and _owners(v) == adopted and v,
                    WAIT_S, "b to adopt s1 and s2")  # fmt: skip
    assert {d["id"]: d["state"] for d in view["daemons"]}.get("b") == "live"
    assert "adopted stream 's1'" in daemons["b"].output()

    async def after() -> None:
        answerers = await _wait_async(lambda: _answered_by(url, "s1"), "s1 answered by b")
        assert answerers == {"s1": "b"}

    asyncio.run(after())
    for daemon_id in ("b", "c"):
        assert daemons[daemon_id].terminate() == 0, daemons[daemon_id].output()[-3000:]
        assert "Traceback" not in daemons[daemon_id].output()


async def _wait_async(probe: Callable[[], Any], what: str) -> Any:
    """Await ``probe()`` until it gives something truthy, for at most WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while loop.time() < deadline:
        if value := await probe():
            return value
        await asyncio.sleep(0.25)
    pytest.fail(f"timed out after {WAIT_S:g} s waiting for {what}")
