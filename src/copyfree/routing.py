"""Which shard owns an item: stable across processes, machines and Python versions."""

from __future__ import annotations

import hashlib

MAX_ID_CHARS = 256


def shard_for(item_id: str, num_shards: int) -> int:
    """hash(id) mod S with a fixed hash (blake2b), never Python's salted hash()."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards
