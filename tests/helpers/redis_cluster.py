"""A private three-master Redis Cluster on free loopback ports, for tests and benchmarks.

Three ``redis-server --cluster-enabled yes`` processes, joined by ``redis-cli --cluster create``
(no replicas), ready once every node reports ``cluster_state:ok``.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from redis_harness import RedisServer

READY_TIMEOUT_S = 60.0  # create + gossip on a loaded machine
BUS_PORT_OFFSET = 10_000  # each node also listens on port + 10000 (the cluster bus)
PORT_RANGE = (20_000, 45_000)  # so port + 10000 stays a valid port (Redis wants <= 55535)


class RedisCluster:
    """``start()`` the cluster, ``url`` (``redis+cluster://...``) to reach it, ``stop()`` after."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(
                _node_dir(workdir, index),
                (
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ),
                port=free_cluster_port(),
            )
            for index in range(masters)
        ]
        self.ports = [node.port for node in self.nodes]
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not installed (Debian package redis-tools)")
        for node in self.nodes:
            node.start()
        created = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT_S,
            check=False,
        )
        if created.returncode != 0:
            self.stop()
            pytest.fail(f"redis-cli --cluster create failed:\n{created.stdout}{created.stderr}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(self._state_ok(cli, port) for port in self.ports):
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the cluster on ports {self.ports} never reached cluster_state:ok")
            time.sleep(0.1)

    def keyslot(self, key: str) -> int:
        """The slot of ``key`` as the cluster itself computes it (CLUSTER KEYSLOT)."""
        return int(self._cli(self.ports[0], "CLUSTER", "KEYSLOT", key))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @staticmethod
    def _state_ok(cli: str, port: int) -> bool:
        info = subprocess.run(
            [cli, "-p", str(port), "CLUSTER", "INFO"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        return "cluster_state:ok" in info

    def _cli(self, port: int, *command: str) -> str:
        cli = shutil.which("redis-cli") or "redis-cli"
        return subprocess.run(
            [cli, "-p", str(port), *command],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()


def free_cluster_port() -> int:
    """A loopback port that, with its cluster bus port (+10000), was free a moment ago."""
    for _ in range(200):
        port = random.randint(*PORT_RANGE)
        if _free(port) and _free(port + BUS_PORT_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _node_dir(workdir: Path, index: int) -> Path:
    path = workdir / f"cluster-node{index}"
    path.mkdir(parents=True, exist_ok=True)
    return path
