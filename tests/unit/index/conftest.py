"""Fixtures for the index unit tests: a real redis-server for the store contract."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from copyfree_index.embedded_redis import RedisProcess, redis_executable, start_redis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One loopback redis-server per test module (tests isolate by key prefix)."""
    try:
        redis_executable()
    except FileNotFoundError as e:
        pytest.skip(f"no redis-server binary: {e}")
    data_dir: Path = tmp_path_factory.mktemp("redis")
    proc = start_redis(data_dir)
    yield proc
    proc.stop()
