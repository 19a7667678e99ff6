"""IndexSettings: environment prefix, defaults and the shard range check."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from copyfree_index.settings import IndexSettings


def test_reads_index_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INDEX_SHARD_ID", "2")
    monkeypatch.setenv("INDEX_NUM_SHARDS", "3")
    monkeypatch.setenv("INDEX_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("INDEX_MAX_CANDIDATES", "50")
    s = IndexSettings()
    assert (s.shard_id, s.num_shards, s.redis_url, s.max_candidates) == (
        2,
        3,
        "redis://redis:6379/0",
        50,
    )


def test_defaults_are_one_local_shard_with_embedded_redis() -> None:
    s = IndexSettings()
    assert (s.shard_id, s.num_shards, s.redis_url, s.port) == (0, 1, "", 50061)
    assert s.max_candidates == 100 and s.redis_wait_s > 0


def test_rejects_shard_id_outside_num_shards() -> None:
    with pytest.raises(ValidationError, match="shard_id 2 must be < num_shards 2"):
        IndexSettings(shard_id=2, num_shards=2)


def test_requires_explicit_shard_id_when_sharded() -> None:
    with pytest.raises(ValidationError, match="shard_id must be set"):
        IndexSettings(num_shards=4)
