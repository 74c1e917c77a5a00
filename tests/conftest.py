"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_cluster import RedisCluster
from redis_harness import RedisServer


@pytest.fixture
def redis_server_handle(tmp_path: Path) -> Iterator[RedisServer]:
    """The server object itself, for tests that stop and restart Redis."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(redis_server_handle: RedisServer) -> str:
    """URL of a private, empty redis-server on a free loopback port."""
    return redis_server_handle.url


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A private three-master Redis Cluster on free loopback ports (``.url`` to reach it)."""
    cluster = RedisCluster(tmp_path)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
