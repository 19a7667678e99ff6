"""IndexSettings: one index shard's configuration, from INDEX_* variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from copyfree.serving.settings import ServiceSettings

DEFAULT_PORT = 50061
DEFAULT_MAX_CANDIDATES = 100
MAX_CANDIDATES_LIMIT = 10_000


class IndexSettings(ServiceSettings):
    """INDEX_SHARD_ID, INDEX_NUM_SHARDS, INDEX_REDIS_URL, ... (see the README)."""

    model_config = SettingsConfigDict(env_prefix="INDEX_", frozen=True)

    port: int = Field(DEFAULT_PORT, ge=0, le=65535)  # 0 = ephemeral (tests)
    # Which shard this process owns: items with routing.shard_for(id, num_shards) == id.
    shard_id: int = Field(0, ge=0)
    num_shards: int = Field(1, ge=1, le=4096)
    # "" = start an embedded redis-server (loopback only) with its files in data_dir.
    redis_url: str = ""
    data_dir: Path = Path("./.copyfree/redis")
    # How long to keep retrying (with backoff) to reach Redis at start before exiting.
    redis_wait_s: float = Field(60.0, gt=0)
    # "auto": ask the server (INFO cluster) and use a cluster client for a cluster
    # node; "yes"/"no" skip the question.
    redis_cluster: Literal["auto", "yes", "no"] = "auto"
    # Embedded Redis only (an external Redis is configured by its operator; the shard
    # logs what it finds): AOF fsync policy. "always": an acknowledged write is on
    # disk; "everysec": survives a crash of Redis (the write is in the OS page
    # cache), may lose up to ~1 s of writes on an OS crash or power loss; "no": the OS
    # decides when to flush (~30 s on Linux).
    redis_appendfsync: Literal["always", "everysec", "no"] = "everysec"
    # Detect: stage-1 candidates returned when the request leaves max_candidates at 0.
    max_candidates: int = Field(DEFAULT_MAX_CANDIDATES, ge=1, le=MAX_CANDIDATES_LIMIT)

    @model_validator(mode="after")
    def _shard_in_range(self) -> Self:
        if self.shard_id >= self.num_shards:
            raise ValueError(
                f"shard_id {self.shard_id} must be < num_shards {self.num_shards}"
            )
        if self.num_shards > 1 and "shard_id" not in self.model_fields_set:
            # Defaulting to 0 here would make every pod of a StatefulSet shard 0.
            raise ValueError(
                f"shard_id must be set when num_shards is {self.num_shards}"
            )
        return self
