"""Shared fixtures: seeded rng and a real redis-server. gRPC servers are started by the
fixtures of the folders that need them."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from copyfree_index.embedded_redis import RedisProcess, redis_executable, start_redis


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261122)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One loopback redis-server (ephemeral port, AOF on) per test module; tests
    isolate by key prefix or collection name. Skips where no binary exists."""
    try:
        redis_executable()
    except FileNotFoundError as e:
        pytest.skip(f"no redis-server binary: {e}")
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield proc
    proc.stop()
